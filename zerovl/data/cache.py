"""The pre-tokenized training cache written by ``zerovl data prepare`` and read by training.

Layout of ``data.cache_dir``::

    fingerprint.json          what the cache was made from, and the list of shards
    d00-s00000/               dataset 0, samples [0, shard_size) of it
        ids.npy               int32 token ids of all samples, back to back (memory-mapped when read)
        supervised.npy        uint8 label mask (1 = the token is learned)
        offsets.npy           int64 sample boundaries
        image_tokens.npy      int32 image tokens per sample; text_tokens.npy the rest
        samples.json          image paths and file:line per sample
        done.json             written last: the shard is complete (counts, drops)

A shard is written under a temporary name and renamed when complete, so an interrupted ``prepare``
resumes with the shards that are missing. The fingerprint covers everything that changes the tokens:
the tokenizer files' hash, chat template, image token, tokens per image, system prompt, max_length,
the drop policies, and each dataset's reader options and files (size + mtime; images are not hashed).
Training uses the cache only when the fingerprint matches and refuses a stale one in one line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from zerovl.config import DataSettings
from zerovl.data.dataset import TokenizedDataset, encode_samples
from zerovl.data.readers import ReadReport, data_files, dataset_keys, read_dataset, resolve_format
from zerovl.data.samples import Sample
from zerovl.data.template import ChatTemplate
from zerovl.data.tokens import TokenPart, TokenTable
from zerovl.errors import DataError

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: the newline after an end-of-turn token is no longer labelled
FINGERPRINT_FILE = "fingerprint.json"
DONE_FILE = "done.json"
TOKENIZER_FILE_PREFIXES = ("tokenizer", "special_tokens_map", "added_tokens", "vocab", "merges", "chat_template",
                           "spiece", "sentencepiece")


def tokenizer_digest(directory: str) -> str:
    """sha256 over the tokenizer's own files in ``directory`` (not model weights beside them)."""
    digest = hashlib.sha256()
    names = sorted(n for n in os.listdir(directory) if n.lower().startswith(TOKENIZER_FILE_PREFIXES))
    if not names:
        raise DataError(f"{directory}: no tokenizer files to fingerprint (tokenizer.json, tokenizer_config.json...)")
    for name in names:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            digest.update(name.encode() + b"\0")
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def file_stamp(path: str) -> dict[str, Any]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"data file {path} not found; check data.train / data.datasets[].path") from None
    return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def fingerprint(template: ChatTemplate, data: DataSettings, tokenizer_dir: str) -> dict[str, Any]:
    """Everything that decides the cached tokens; equal fingerprints mean identical caches."""
    tokenizer = template.tokenizer
    return {
        "version": CACHE_VERSION,
        "tokenizer_sha256": tokenizer_digest(tokenizer_dir),
        "chat_template": template.chat_template or tokenizer.chat_template,
        "image_token": template.image_token,
        "tokens_per_image": template.image_token_spec,
        "system_prompt": template.system_prompt,
        "labels_by": "pieces" if template.pieces else "offsets",
        "closing_eos": template.closing_eos,
        "max_length": data.max_length,
        "too_long": data.too_long,
        "skip_bad_samples": data.skip_bad_samples,
        # auto is fingerprinted as the format it resolves to, so a cache made with either matches
        "datasets": [{**resolve_format(spec).model_dump(mode="json", exclude={"weight", "name"}),
                      "files": [file_stamp(p) for p in data_files(spec)]} for spec in data.train_datasets()],
    }


def fingerprint_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted names of what differs, e.g. ``tokens_per_image``, ``datasets[0].files``."""
    changed = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if key == "datasets" and isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            changed += [f"datasets[{i}].{k}" for i, (x, y) in enumerate(zip(a, b))
                        for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)]
        elif a != b:
            changed.append(key)
    return changed


# -- writing -------------------------------------------------------------------------------------------
@dataclass
class ShardTask:
    """Samples ``[start, stop)`` of dataset ``dataset`` (in reading order) become shard ``name``."""

    name: str
    dataset: int
    start: int
    stop: int


@dataclass
class PrepareResult:
    samples: int = 0
    shards_written: int = 0
    shards_reused: int = 0
    seconds: float = 0.0
    dropped: Counter = field(default_factory=Counter)
    per_dataset: list[dict[str, Any]] = field(default_factory=list)

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0


_worker_settings: dict[str, Any] = {}


def _init_worker(template: ChatTemplate, data: DataSettings, has_vision: bool,
                 samples: list[list[Sample]]) -> None:
    """Per-process state; forked workers inherit ``samples`` without copying or pickling them."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _worker_settings.update(template=template, data=data, has_vision=has_vision, samples=samples)


def _write_shard(task: ShardTask, out_dir: str) -> dict[str, Any]:
    """Encode one shard and publish it atomically (temp dir, done.json, rename)."""
    template, data = _worker_settings["template"], _worker_settings["data"]
    dropped: Counter = Counter()
    samples = _worker_settings["samples"][task.dataset][task.start : task.stop]
    kept, encoded = encode_samples(samples, template, data.max_length, data.too_long, data.skip_bad_samples,
                                   _worker_settings["has_vision"], dropped)
    part = TokenPart.from_encoded(encoded)
    final = Path(out_dir) / task.name
    tmp = Path(out_dir) / f".{task.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / "ids.npy", part.ids)
    np.save(tmp / "supervised.npy", part.supervised)
    np.save(tmp / "offsets.npy", part.offsets)
    np.save(tmp / "image_tokens.npy", part.image_tokens)
    np.save(tmp / "text_tokens.npy", (np.diff(part.offsets) - part.image_tokens).astype(np.int32))
    (tmp / "samples.json").write_text(json.dumps({"images": [s.images for s in kept],
                                                  "sources": [s.source for s in kept]}))
    done = {"samples": len(kept), "read": len(samples), "dropped": dict(dropped), "tokens": int(part.offsets[-1])}
    (tmp / DONE_FILE).write_text(json.dumps(done))
    os.replace(tmp, final)
    return {"name": task.name, **done}


def _is_done(out_dir: Path, name: str) -> bool:
    return (out_dir / name / DONE_FILE).is_file()


def prepare_cache(data: DataSettings, template: ChatTemplate, tokenizer_dir: str, has_vision: bool,
                  workers: int = 1, shard_size: int = 10_000, overwrite: bool = False) -> PrepareResult:
    """Tokenize every training dataset into ``data.cache_dir``; shards already complete are kept."""
    if data.cache_dir is None:
        raise DataError("set data.cache_dir (where the pre-tokenized shards go) to run data prepare")
    started = time.perf_counter()
    out = Path(data.cache_dir)
    current = fingerprint(template, data, tokenizer_dir)
    index_path = out / FINGERPRINT_FILE
    if index_path.is_file():
        saved = json.loads(index_path.read_text())
        changes = fingerprint_changes(saved.get("fingerprint", {}), current)
        if changes and not overwrite:
            raise DataError(f"{out} holds a cache made from other settings ({', '.join(changes[:4])} changed); "
                            "pass --overwrite to replace it or point data.cache_dir elsewhere")
        if changes or saved.get("shard_size") != shard_size:
            log.warning("replacing the cache in %s (%s)", out, ", ".join(changes) or "new shard size")
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp-*"):  # left by an interrupted run
        shutil.rmtree(stale, ignore_errors=True)

    result = PrepareResult()
    tasks, shards, everything = [], [], []
    for d, (spec, key) in enumerate(zip(data.train_datasets(), dataset_keys(data))):
        report = ReadReport(skip_bad=data.skip_bad_samples, key=key)
        samples = read_dataset(spec, report)
        everything.append(samples)
        result.dropped.update(report.counts)
        result.per_dataset.append({"name": spec.label, "read": len(samples), "skipped_records": dict(report.counts)})
        for start in range(0, max(len(samples), 1), shard_size):
            name = f"d{d:02d}-s{start // shard_size:05d}"
            shards.append({"name": name, "dataset": d})
            if not _is_done(out, name):
                tasks.append(ShardTask(name, d, start, start + shard_size))
    index_path.write_text(json.dumps({"fingerprint": current, "shard_size": shard_size, "shards": shards,
                                      "datasets": result.per_dataset}, indent=1))
    result.shards_reused = len(shards) - len(tasks)
    if result.shards_reused:
        log.info("%d of %d shards already complete; encoding the other %d", result.shards_reused, len(shards),
                 len(tasks))
    for done in _run_tasks(tasks, str(out), (template, data, has_vision, everything), workers):
        result.shards_written += 1
        result.dropped.update(done["dropped"])
        log.info("shard %s: %d samples, %d tokens", done["name"], done["samples"], done["tokens"])
    for shard in shards:
        result.samples += json.loads((out / shard["name"] / DONE_FILE).read_text())["samples"]
    result.seconds = time.perf_counter() - started
    return result


def _run_tasks(tasks: list[ShardTask], out: str, settings: tuple, workers: int):
    if workers <= 1 or len(tasks) <= 1:
        _init_worker(*settings)
        try:
            for task in tasks:
                yield _write_shard(task, out)
        finally:
            _worker_settings.clear()  # do not keep the samples alive in this process
        return
    # fork starts workers in milliseconds (spawn re-imports torch and transformers: seconds each); the parent
    # has not tokenized anything yet, so there are no tokenizer threads to inherit
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ctx.Pool(min(workers, len(tasks)), initializer=_init_worker, initargs=settings) as pool:
        yield from pool.imap_unordered(_ShardWriter(out), tasks)


class _ShardWriter:
    """Picklable ``task -> _write_shard(task, out)`` for the process pool."""

    def __init__(self, out: str):
        self.out = out

    def __call__(self, task: ShardTask) -> dict[str, Any]:
        return _write_shard(task, self.out)


# -- reading -------------------------------------------------------------------------------------------
def open_cache(data: DataSettings, template: ChatTemplate, tokenizer_dir: str, image_processor,
               name: str = "data.train") -> list[TokenizedDataset]:
    """One memory-mapped dataset per training dataset, or a one-line DataError saying what to do."""
    out = Path(data.cache_dir)
    index_path = out / FINGERPRINT_FILE
    if not index_path.is_file():
        raise DataError(f"data.cache_dir {out} holds no prepared cache; run `zerovl data prepare CONFIG` first "
                        "or unset data.cache_dir")
    index = json.loads(index_path.read_text())
    changes = fingerprint_changes(index.get("fingerprint", {}), fingerprint(template, data, tokenizer_dir))
    if changes:
        raise DataError(f"data.cache_dir {out} is stale ({', '.join(changes[:4])} changed since it was prepared); "
                        "run `zerovl data prepare CONFIG` again or unset data.cache_dir")
    missing = [s["name"] for s in index["shards"] if not _is_done(out, s["name"])]
    if missing:
        raise DataError(f"data.cache_dir {out} is incomplete ({len(missing)} of {len(index['shards'])} shards "
                        f"missing, e.g. {missing[0]}); run `zerovl data prepare CONFIG` again to finish it")
    datasets = []
    for d, spec in enumerate(data.train_datasets()):
        parts, images, sources, dropped = [], [], [], Counter()
        for shard in (s for s in index["shards"] if s["dataset"] == d):
            parts.append(_load_part(out / shard["name"]))
            listing = json.loads((out / shard["name"] / "samples.json").read_text())
            images += listing["images"]
            sources += listing["sources"]
            dropped.update(json.loads((out / shard["name"] / DONE_FILE).read_text())["dropped"])
        dropped.update(index["datasets"][d].get("skipped_records", {}))
        datasets.append(TokenizedDataset(TokenTable(parts), images, sources, image_processor, data.max_pixels,
                                         data.skip_bad_samples, dropped=dropped, name=f"{name} {spec.label}"))
    return datasets


def _load_part(directory: Path) -> TokenPart:
    def load(name: str) -> np.ndarray:
        return np.load(directory / name, mmap_mode="r")

    return TokenPart(load("ids.npy"), load("supervised.npy"), np.asarray(load("offsets.npy")),
                     np.asarray(load("image_tokens.npy")))
