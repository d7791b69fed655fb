"""The one in-memory sample every reader produces, and the messages-JSONL reader.

A :class:`Sample` is a chat (``messages``) plus absolute image paths. Each sample keeps ``source``
(``file:line``, or ``shard:key`` for tar shards) so any later failure — a missing image, too many
``<image>`` tags — can name the exact record to fix. Other formats live in :mod:`zerovl.data.readers`.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from zerovl.errors import DataError

log = logging.getLogger(__name__)

IMAGE_TAG = "<image>"
ROLES = ("system", "user", "assistant")


@dataclass
class Sample:
    messages: list[dict[str, str]]
    images: list[str] = field(default_factory=list)
    source: str = "?"
    meta: dict[str, Any] = field(default_factory=dict)


class RecordError(DataError):
    """A record that cannot become a training sample; ``kind`` groups them in reports
    (``bad_record``: unreadable or malformed, ``tag_mismatch``: ``<image>`` tags != images)."""

    def __init__(self, message: str, kind: str = "bad_record"):
        super().__init__(message)
        self.kind = kind


def count_image_tags(messages: list[dict[str, str]]) -> int:
    return sum(m["content"].count(IMAGE_TAG) for m in messages)


def validate_sample(sample: Sample) -> None:
    """Raise DataError for structural problems that no amount of training can fix."""
    if not sample.messages:
        raise RecordError(f"{sample.source}: 'messages' is empty")
    for i, m in enumerate(sample.messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise RecordError(
                f"{sample.source}: messages[{i}] must be {{'role': system|user|assistant, 'content': str}}"
            )
    if not any(m["role"] == "assistant" for m in sample.messages):
        raise RecordError(f"{sample.source}: no assistant message, so nothing to learn from")
    tags = count_image_tags(sample.messages)
    if tags != len(sample.images):
        raise RecordError(
            f"{sample.source}: {tags} {IMAGE_TAG} tag(s) in the text but {len(sample.images)} image(s); "
            f"put one {IMAGE_TAG} where each image belongs", kind="tag_mismatch"
        )


class ImageResolver:
    """Absolute image paths for one dataset file. A relative path is taken under ``root``; when the file
    is not there, the places other tools resolve it from are tried, once per directory written in the
    data file, and the first that holds it is used for the whole directory (logged once):

    - ``root``'s parent: LLaMA-Factory keeps paths it cannot find under its ``data/`` folder relative to
      the working directory, its repository root (``data/mllm_demo_data/1.jpg``);
    - ``root`` with leading directories of the path dropped: files written relative to another project's
      root (MiniGPT4Qwen's ``example_data/image2prompt/images/x.png`` beside ``images/``).

    A path found nowhere keeps its plain ``root`` form, so the missing-image error names what the file
    says. Once ``TRUST_AFTER`` directories resolved directly, the rest are not checked (no ``stat`` per
    image on datasets with a directory per image).
    """

    TRUST_AFTER = 16

    def __init__(self, root: str, label: str = ""):
        self.root = root
        self.label = label
        self._dirs: dict[str, str] = {}
        self._direct = 0
        self._moved = False

    def __call__(self, path: str, source: str) -> str:
        if "://" in path:
            raise RecordError(f"{source}: image {path} is a URL; zerovl reads local files only and never "
                              "downloads: fetch the images and list their paths", kind="remote_image")
        if os.path.isabs(path):
            return path
        directory, name = os.path.split(os.path.normpath(path))
        base = self._dirs.get(directory)
        if base is None:
            base = self._dirs[directory] = self._find(directory, name)
        return os.path.join(base, name)

    def _find(self, directory: str, name: str) -> str:
        direct = os.path.join(self.root, directory) if directory else self.root
        if not directory or (self._direct >= self.TRUST_AFTER and not self._moved) \
                or os.path.isfile(os.path.join(direct, name)):
            self._direct += 1
            return direct
        parts = directory.split(os.sep)
        candidates = [os.path.join(os.path.dirname(self.root), directory)]
        candidates += [os.path.join(self.root, *parts[k:]) for k in range(1, len(parts) + 1)]
        for candidate in candidates:
            if os.path.isfile(os.path.join(candidate, name)):
                if not self._moved:
                    log.info("%simages written as %s/... are not under %s; found them in %s (set data.image_root "
                             "to say where they are)", f"{self.label}: " if self.label else "", directory, self.root,
                             candidate)
                self._moved = True
                return candidate
        return direct


def resolve_image_paths(images: Any, root: str | ImageResolver, source: str) -> list[str]:
    """A record's image field (one path or a list) as absolute paths under ``root`` (a directory, or an
    :class:`ImageResolver` that also looks where other tools put them)."""
    if images is None:
        return []
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise RecordError(f"{source}: images must be a path or a list of paths, got {images!r:.80}")
    if isinstance(root, ImageResolver):
        return [root(p, source) for p in images]
    return [p if os.path.isabs(p) else os.path.join(root, p) for p in images]


def sample_from_messages(record: Any, root: str | ImageResolver, source: str) -> Sample:
    """``{"messages": [...], "images": [...]}`` -> validated Sample (other keys go to ``meta``)."""
    if not isinstance(record, dict) or "messages" not in record:
        raise RecordError(f"{source}: expected an object with a 'messages' list")
    sample = Sample(
        messages=record["messages"],
        images=resolve_image_paths(record.get("images"), root, source),
        source=source,
        meta={k: v for k, v in record.items() if k not in ("messages", "images")},
    )
    validate_sample(sample)
    return sample


def read_messages_jsonl(
    path: str, image_root: str | None = None, skip_bad: bool = False, skipped: Counter | None = None
) -> list[Sample]:
    """Read ``{"messages": [...], "images": [...]}`` lines; image paths are relative to
    ``image_root`` if given, else to the JSONL file's directory."""
    if not os.path.isfile(path):
        raise DataError(f"data file {path} not found; check data.train / data.val")
    root = image_root or os.path.dirname(os.path.abspath(path))
    samples: list[Sample] = []
    skipped = skipped if skipped is not None else Counter()
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            source = f"{path}:{lineno}"
            try:
                sample = sample_from_messages(json.loads(line), root, source)
            except (json.JSONDecodeError, DataError, TypeError) as e:
                err = e if isinstance(e, DataError) else DataError(f"{source}: not valid JSON ({e})")
                if not skip_bad:
                    raise err from None
                skipped["bad_record"] += 1
                log.warning("skipping %s", err)
                continue
            samples.append(sample)
    return samples
