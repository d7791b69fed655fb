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


def resolve_image_paths(images: Any, root: str, source: str) -> list[str]:
    """A record's image field (one path or a list) as absolute paths under ``root``."""
    if images is None:
        return []
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise RecordError(f"{source}: images must be a path or a list of paths, got {images!r:.80}")
    return [p if os.path.isabs(p) else os.path.join(root, p) for p in images]


def sample_from_messages(record: Any, root: str, source: str) -> Sample:
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
    with open(path, encoding="utf-8") as f:
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
