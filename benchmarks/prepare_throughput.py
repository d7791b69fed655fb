"""`zerovl data prepare` throughput: samples/s tokenized into the cache, on the demo data and on a
100,000-sample generated set (demo records repeated with fresh questions; images are not read by
prepare, so reusing them changes nothing). Uses the demo config's tokenizer and vision settings.

    .venv/bin/python benchmarks/prepare_throughput.py [--workers 2] [--samples 100000] [--out /tmp/zerovl-prepare] [--smoke]

Wall-clock samples/s depends on what else the machine runs; samples per CPU-second does not, and
times the number of free cores bounds what more workers can reach.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import resource
import shutil
import sys
import time
from pathlib import Path

from zerovl.config import load_config
from zerovl.data.demo_scenes import generate
from zerovl.recipes.data import prepare_data

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

REPO = _common.REPO


def big_set(train: Path, out: Path, samples: int) -> Path:
    """``samples`` lines built from the demo records, each with its image path made absolute."""
    records = [json.loads(line) for line in train.read_text().splitlines()]
    for r in records:
        r["images"] = [str(train.parent / p) for p in r["images"]]
    rng = random.Random(0)
    with open(out, "w") as f:
        for _ in range(samples):
            f.write(json.dumps(rng.choice(records)) + "\n")
    return out


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the prepare workers)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def measure(config: Path, train: Path, tokenizer: Path, cache: Path, workers: int,
            shard_size: int) -> tuple[int, float, float]:
    """(samples, wall seconds, CPU seconds) of one `zerovl data prepare` into an empty cache."""
    shutil.rmtree(cache, ignore_errors=True)
    cfg = load_config(config, [f"data.train={train}", "data.val=null", f"model.tokenizer={tokenizer}",
                               f"data.cache_dir={cache}"])
    started, cpu = time.perf_counter(), cpu_seconds()
    result = prepare_data(cfg, workers=workers, shard_size=shard_size)
    return result.samples, time.perf_counter() - started, cpu_seconds() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--out", default="/tmp/zerovl-prepare-bench")
    parser.add_argument("--smoke", action="store_true", help=_common.SMOKE_HELP)
    args = parser.parse_args()
    if args.smoke:
        args.samples, args.shard_size, args.workers = 400, 100, 1
        if args.out == parser.get_default("out"):
            args.out = _common.smoke_dir("prepare")
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # the `zerovl demo` dataset: 3000 train images
    data = generate(out / "demo", **({"num_train_images": 24, "num_val_images": 4} if args.smoke else {}))
    config = REPO / "configs" / "demo.yaml"
    measure(config, data["val"], data["tokenizer"], out / "cache", 1, args.shard_size)  # warm-up (imports, caches)
    sets = (("demo train.jsonl", data["train"], 100 if args.smoke else 1_000),
            (f"generated {args.samples:,}", big_set(data["train"], out / "big.jsonl", args.samples), args.shard_size))
    for name, train, shard_size in sets:
        for workers in sorted({1, args.workers}):
            n, seconds, cpu = measure(config, train, data["tokenizer"], out / "cache", workers, shard_size)
            print(f"{name:<18} workers={workers}  shards of {shard_size:>6,}  {n:>7,} samples  {seconds:6.1f} s  "
                  f"{n / seconds:7,.0f} samples/s  ({cpu:5.1f} CPU-s = {n / cpu:6,.0f} samples per CPU-s; "
                  f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)", flush=True)
    shutil.rmtree(out / "cache", ignore_errors=True)
    if args.smoke:
        print(_common.SMOKE_NOTE)


if __name__ == "__main__":
    main()
