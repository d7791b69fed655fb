"""Trainable-only checkpoint size on the demo model: projection-only (vision and LLM frozen) vs full.

    python benchmarks/checkpoint_size.py [--nproc 2] [--smoke] [overrides ...]

Runs ``configs/demo.yaml`` for one step twice on ``--nproc`` ranks (ZeRO-2, fp32), once with every
part trained and once MiniGPT4Qwen-style with only the connector trained, and prints the size of
each checkpoint as zerovl logged it (the ``checkpoint`` event in ``metrics.jsonl``) and their ratio.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

REPO = _common.REPO


def _run(work: Path, name: str, nproc: int, extra: list[str]) -> dict:
    data = work / "data"
    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)
    from zerovl.engine.launch import run_ranks, torchrun

    cmd = torchrun(nproc, "-m", "zerovl", "train", str(_common.DEMO_CONFIG),
                   f"data.train={data / 'train.jsonl'}", "data.val=null", f"model.tokenizer={data / 'tokenizer'}",
                   f"train.output_dir={run_dir}", "train.max_steps=1", "train.save_every=0", "train.save_final=true",
                   "train.resume=none", *extra)
    launch = run_ranks(cmd, work / f"{name}.log", env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    if not launch.ok:
        raise _common.fail(f"checkpoint_size: the {name} run failed: {launch.error} (full log: {launch.log_path})")
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return [e for e in events if e.get("event") == "checkpoint"][-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/bench_checkpoint_size")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help=_common.SMOKE_HELP)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    from zerovl.data.demo_scenes import generate

    if args.smoke and args.work == p.get_default("work"):
        args.work = _common.smoke_dir("checkpoint_size")
    work = Path(args.work).absolute()
    if not (work / "data" / "train.jsonl").is_file():
        generate(work / "data", num_train_images=16 if args.smoke else 64, num_val_images=4)
    full = _run(work, "full", args.nproc, args.overrides)
    frozen = ["model.vision.mode=frozen", "model.llm.mode=frozen"]
    proj = _run(work, "projection_only", args.nproc, [*frozen, *args.overrides])
    ratio = proj["bytes"] / full["bytes"]
    print(f"full checkpoint:            {full['bytes'] / 2**20:8.2f} MiB (trainable_only={full['trainable_only']})")
    print(f"projection-only checkpoint: {proj['bytes'] / 2**20:8.2f} MiB (trainable_only={proj['trainable_only']})")
    print(f"ratio projection-only / full: {ratio:.4f} ({100 * ratio:.2f} %)")
    if args.smoke:
        print(_common.SMOKE_NOTE)


if __name__ == "__main__":
    main()
