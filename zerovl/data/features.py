"""The frozen-feature cache (``data.feature_cache``): the frozen prefix's output per image, on disk.

Layout of the directory::

    index.json            fingerprint, feature shape and dtype, the image keys and their shards
    s00000/               images [0, shard_size) of the sorted keys
        features.npy      (images, tokens, width) in the model's compute dtype (bf16 as a uint16 view),
                          memory-mapped when read
        keys.json         the images stored, in row order (a bad image skipped under
                          data.skip_bad_samples is absent)
        done.json         written last: the shard is complete

Shards are written under a temporary name and renamed when complete (as the token cache in
:mod:`zerovl.data.cache` does), so an interrupted build resumes with the missing shards only. The
fingerprint covers what decides the features: the frozen modules' weights (a hash), the image
processor's settings, the model config that shapes the prefix, ``data.max_pixels`` and every image
file's size and mtime; a cache made from anything else is refused in one line. This module only
stores and reads; computing features with a model is ``zerovl/recipes/features.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zerovl.data.cache import file_stamp
from zerovl.errors import DataError

FEATURE_CACHE_VERSION = 1
INDEX_FILE = "index.json"
DONE_FILE = "done.json"
SHARD_IMAGES = 1024
# what each fingerprint entry means, for the stale-cache message
CHANGE_NAMES = {"weights_sha256": "frozen weights", "processor": "image processor", "max_pixels": "data.max_pixels",
                "images": "image files", "stage": "model.connector.mode", "dtype": "train.precision",
                "shape": "feature shape", "version": "cache version"}


def images_digest(keys: list[str]) -> dict[str, Any]:
    """sha256 over every image's path, size and mtime (a missing image counts as missing)."""
    digest = hashlib.sha256()
    for key in keys:
        try:
            stamp = file_stamp(key)
            digest.update(f"{key}\0{stamp['size']}\0{stamp['mtime_ns']}\n".encode())
        except DataError:
            digest.update(f"{key}\0missing\n".encode())
    return {"count": len(keys), "sha256": digest.hexdigest()}


def changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Readable names of what differs (``model.vision.feature_layer``, ``frozen weights``...)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if a == b:
            continue
        if key == "model" and isinstance(a, dict) and isinstance(b, dict):
            out += [f"model.{part}.{k}" for part in sorted(set(a) | set(b))
                    for k in sorted(set(a.get(part) or {}) | set(b.get(part) or {}))
                    if (a.get(part) or {}).get(k) != (b.get(part) or {}).get(k)] or ["model"]
        else:
            out.append(CHANGE_NAMES.get(key, key))
    return out


def shard_plan(keys: list[str], shard_size: int) -> list[dict[str, Any]]:
    return [{"name": f"s{i // shard_size:05d}", "start": i, "stop": min(i + shard_size, len(keys))}
            for i in range(0, len(keys), shard_size)]


def to_numpy(features: torch.Tensor) -> np.ndarray:
    """Stored form: bf16 as its uint16 bit pattern (numpy has no bf16), other dtypes as they are."""
    features = features.detach().cpu().contiguous()
    if features.dtype == torch.bfloat16:
        return features.view(torch.uint16).numpy()
    return features.numpy()


class FeatureCache:
    """One cache directory: check it against a fingerprint, write shards, read features by image key."""

    def __init__(self, directory: str, key: str = "data.feature_cache"):
        self.dir = Path(directory)
        self.key = key
        self._rows: dict[str, tuple[str, int]] | None = None
        self._arrays: dict[str, np.ndarray] = {}
        self.dtype: torch.dtype | None = None

    # -- checking and planning ---------------------------------------------------------------------------
    def index(self) -> dict[str, Any] | None:
        path = self.dir / INDEX_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def missing(self, fingerprint: dict[str, Any], keys: list[str], shard_size: int = SHARD_IMAGES,
                overwrite: bool = False) -> list[dict[str, Any]]:
        """The shards still to compute; a cache made from other settings is a one-line DataError (or
        removed, with ``overwrite``). Writes nothing."""
        index = self.index()
        if index is not None:
            changed = changes(index["fingerprint"], fingerprint)
            if changed and not overwrite:
                raise DataError(f"{self.key} {self.dir} is stale ({', '.join(changed[:4])} changed since it was "
                                "built); run `zerovl data prepare CONFIG --overwrite` to rebuild it or point "
                                f"{self.key} elsewhere")
            if changed:
                shutil.rmtree(self.dir)
                index = None
        plan = index["shards"] if index is not None else shard_plan(keys, shard_size)
        return [s for s in plan if not (self.dir / s["name"] / DONE_FILE).is_file()]

    def write_index(self, fingerprint: dict[str, Any], keys: list[str], shard_size: int = SHARD_IMAGES) -> None:
        """Called by one process before shards are written; an existing index (same fingerprint) is kept."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob(".*.tmp-*"):  # left by an interrupted build
            shutil.rmtree(stale, ignore_errors=True)
        if self.index() is not None:
            return
        body = {"fingerprint": fingerprint, "shard_size": shard_size, "keys": keys,
                "shards": shard_plan(keys, shard_size)}
        tmp = self.dir / f".{INDEX_FILE}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(body))
        os.replace(tmp, self.dir / INDEX_FILE)

    def keys_of(self, shard: dict[str, Any]) -> list[str]:
        return self.index()["keys"][shard["start"]:shard["stop"]]

    # -- writing -------------------------------------------------------------------------------------------
    def write_shard(self, name: str, keys: list[str], features: np.ndarray, bad: list[str]) -> None:
        """Publish one shard atomically: temp dir, features, keys, done.json, rename."""
        final = self.dir / name
        tmp = self.dir / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        np.save(tmp / "features.npy", features)
        (tmp / "keys.json").write_text(json.dumps(keys))
        (tmp / DONE_FILE).write_text(json.dumps({"images": len(keys), "bad": bad}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)

    # -- reading -------------------------------------------------------------------------------------------
    def open(self) -> FeatureCache:
        """Check every shard is complete and index its rows (features stay on disk, memory-mapped)."""
        index = self.index()
        if index is None:
            raise DataError(f"{self.key} {self.dir} holds no frozen-feature cache; run `zerovl data prepare "
                            f"CONFIG` or train with {self.key} set to build it")
        absent = [s["name"] for s in index["shards"] if not (self.dir / s["name"] / DONE_FILE).is_file()]
        if absent:
            raise DataError(f"{self.key} {self.dir} is incomplete ({len(absent)} of {len(index['shards'])} shards "
                            f"missing, e.g. {absent[0]}); run `zerovl data prepare CONFIG` to finish it")
        rows = {}
        for shard in index["shards"]:
            for row, key in enumerate(json.loads((self.dir / shard["name"] / "keys.json").read_text())):
                rows[key] = (shard["name"], row)
        self._rows = rows
        self.dtype = getattr(torch, index["fingerprint"]["dtype"])
        return self

    def _array(self, shard: str) -> np.ndarray:
        if shard not in self._arrays:
            self._arrays[shard] = np.load(self.dir / shard / "features.npy", mmap_mode="r")
        return self._arrays[shard]

    def get(self, keys: list[str], source: str = "?") -> torch.Tensor:
        """(len(keys), tokens, width) features of these images, in the order given."""
        if self._rows is None:
            self.open()
        rows = []
        for key in keys:
            where = self._rows.get(key)
            if where is None:
                raise DataError(f"{source}: image {key} is not in {self.key} {self.dir} (it could not be read "
                                "when the cache was built)")
            rows.append(self._array(where[0])[where[1]])
        stacked = torch.from_numpy(np.stack(rows))  # a copy: the memory map stays read-only
        return stacked.view(torch.bfloat16) if self.dtype == torch.bfloat16 else stacked

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers reopen their own memory maps
        return {**self.__dict__, "_arrays": {}}
