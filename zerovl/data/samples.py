"""The one in-memory sample every reader produces, and the messages-JSONL reader.

A :class:`Sample` is a chat (``messages``) plus absolute image paths. Each sample keeps ``source``
(``file:line``) so any later failure — a missing image, too many ``<image>`` tags — can name the exact
line to fix.
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


def count_image_tags(messages: list[dict[str, str]]) -> int:
    return sum(m["content"].count(IMAGE_TAG) for m in messages)


def validate_sample(sample: Sample) -> None:
    """Raise DataError for structural problems that no amount of training can fix."""
    if not sample.messages:
        raise DataError(f"{sample.source}: 'messages' is empty")
    for i, m in enumerate(sample.messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(
                f"{sample.source}: messages[{i}] must be {{'role': system|user|assistant, 'content': str}}"
            )
    if not any(m["role"] == "assistant" for m in sample.messages):
        raise DataError(f"{sample.source}: no assistant message, so nothing to learn from")
    tags = count_image_tags(sample.messages)
    if tags != len(sample.images):
        raise DataError(
            f"{sample.source}: {tags} {IMAGE_TAG} tag(s) in the text but {len(sample.images)} image(s); "
            f"put one {IMAGE_TAG} where each image belongs"
        )


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
                record = json.loads(line)
                if not isinstance(record, dict) or "messages" not in record:
                    raise DataError(f"{source}: expected an object with a 'messages' list")
                images = record.get("images") or []
                if isinstance(images, str):
                    images = [images]
                sample = Sample(
                    messages=record["messages"],
                    images=[p if os.path.isabs(p) else os.path.join(root, p) for p in images],
                    source=source,
                    meta={k: v for k, v in record.items() if k not in ("messages", "images")},
                )
                validate_sample(sample)
            except (json.JSONDecodeError, DataError, TypeError) as e:
                err = e if isinstance(e, DataError) else DataError(f"{source}: not valid JSON ({e})")
                if not skip_bad:
                    raise err from None
                skipped["bad_record"] += 1
                log.warning("skipping %s", err)
                continue
            samples.append(sample)
    return samples
