"""WebDataset tar shards: expand shard patterns, count samples, read samples in stream order.

A sample is the run of consecutive tar members that share a key (``00017.jpg``, ``00017.json``) — the
webdataset convention, whose key splitting we reuse. Reading goes through the stdlib ``tarfile`` on
local (seekable) shards, so a sample another rank owns is skipped by seeking over its bytes instead of
reading them; that keeps the position in the stream one global number that does not depend on the
world size.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from zerovl.errors import ConfigError, DataError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")


def require_webdataset() -> Any:
    try:
        import webdataset
    except ImportError:
        raise ConfigError("format webdataset needs the webdataset package: pip install 'zerovl[webdataset]'") from None
    return webdataset


def expand_shards(pattern: str) -> list[str]:
    """``shards/{000..009}.tar`` (``::`` joins several patterns) -> existing local shard paths."""
    wds = require_webdataset()
    paths = wds.shardlists.expand_urls(pattern)
    if not paths:
        raise DataError(f"{pattern}: no shards in this pattern")
    for path in paths:
        if "://" in path or path.startswith("pipe:"):
            raise DataError(f"{path}: only local (seekable) tar shards are supported; copy or mount them")
        if not os.path.isfile(path):
            raise DataError(f"shard {path} not found (from pattern {pattern})")
    return paths


@dataclass
class ShardSample:
    key: str
    members: list[tarfile.TarInfo] = field(default_factory=list)


def _split(name: str) -> tuple[str | None, str | None]:
    from webdataset.tariterators import base_plus_ext

    return base_plus_ext(name)


def _samples(tar: tarfile.TarFile) -> Iterator[ShardSample]:
    """Group members into samples by key; ``__``-prefixed names are shard metadata, not samples."""
    current: ShardSample | None = None
    for member in tar:
        if not member.isfile() or os.path.basename(member.name).startswith("__"):
            continue
        key, _ = _split(member.name)
        if key is None:
            continue
        if current is None or current.key != key:
            if current is not None:
                yield current
            current = ShardSample(key)
        current.members.append(member)
    if current is not None:
        yield current


def _open(path: str) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r")
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"shard {path} cannot be read as a tar file ({e.__class__.__name__})") from None


def count_samples(path: str) -> int:
    """Number of samples in a shard, from its headers only (data is skipped by seeking)."""
    with _open(path) as tar:
        return sum(1 for _ in _samples(tar))


def read_shard(path: str, wanted: Callable[[int], bool] | None = None,
               start: int = 0) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """(offset, key, {extension: bytes}) for the samples at ``offset >= start`` that ``wanted`` accepts;
    the others are never read."""
    with _open(path) as tar:
        for offset, sample in enumerate(_samples(tar)):
            if offset < start or (wanted is not None and not wanted(offset)):
                continue
            record = {}
            for member in sample.members:
                _, ext = _split(member.name)
                handle = tar.extractfile(member)
                record[ext.lower()] = handle.read() if handle is not None else b""
            yield offset, sample.key, record
