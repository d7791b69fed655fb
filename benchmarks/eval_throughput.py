"""Eval samples/s of `zerovl eval` on 2 ranks: a full copy per rank vs ZeRO-3, batched vs one at a time.

    python benchmarks/eval_throughput.py [--val-images 150] [--train-steps 100] [--rounds 3] [--smoke]

The benchmark trains one small run first (``configs/demo.yaml`` on generated demo scenes, ZeRO-2,
``--train-steps`` steps, so the model gives short answers), then scores its val questions with
``zerovl eval RUN --task vqa --metric exact --prompt ""`` under every setting below, each a fresh
``torchrun --standalone --nproc_per_node 2`` launch, the order alternating every round:

- ``ZeRO-2 batched``: ``--zero 0`` (every rank holds the full model, as a ZeRO-2-trained run gets
  by default), ``--batch-size 32``;
- ``ZeRO-3 batched``: ``--zero 3`` (the model sharded over the ranks, generation in lockstep with
  ``synced_gpus``), ``--batch-size 32``;
- ``ZeRO-2 one at a time``: ``--zero 0 --batch-size 1``.

Two figures per launch: "command" samples/s is the number of questions over the wall time of the
whole torchrun command (interpreter start, imports, loading the checkpoint, DeepSpeed set-up under
ZeRO-3, generation, gathering, scoring, writing; nothing subtracted); "generation" samples/s is the
last ``sps`` figure of rank 0's progress bar (the generation loop alone). Medians over ``--rounds``,
and ratios of medians. The predictions of the batched and one-at-a-time runs (and of ZeRO-3 vs
ZeRO-2) are compared: same ids and count, and how many answers differ (left padding in a batch may
change a greedy answer slightly in fp32, so they are counted, not asserted equal).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

REPO = _common.REPO
# name -> (--zero, batch size or None for --batch-size)
SETTINGS = {
    "ZeRO-2 batched": ("0", None),
    "ZeRO-3 batched": ("3", None),
    "ZeRO-2 one at a time": ("0", 1),
}
_SPS = re.compile(r"sps=(\d+(?:\.\d+)?)")


def arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/bench_eval", help="data, the trained run and the eval outputs go here")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--train-images", type=int, default=200, help="demo scenes to train on")
    p.add_argument("--train-steps", type=int, default=100, help="optimizer steps of the run that is evaluated")
    p.add_argument("--val-images", type=int, default=150, help="val scenes (about 4.3 questions each)")
    p.add_argument("--batch-size", type=int, default=32, help="the batched settings' --batch-size")
    p.add_argument("--max-new-tokens", type=int, help="default: the vqa task's (16)")
    p.add_argument("--rounds", type=int, default=3, help="alternating launches of each setting")
    p.add_argument("--smoke", action="store_true", help=_common.SMOKE_HELP)
    args = p.parse_args()
    if args.smoke:
        args.train_images, args.train_steps, args.val_images, args.rounds = 32, 5, 4, 1
        if args.work == p.get_default("work"):
            args.work = _common.smoke_dir("eval_throughput")
    return args


def _env() -> dict[str, str]:
    return {"OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def train_run(work: Path, args: argparse.Namespace) -> Path:
    """The run every setting evaluates: configs/demo.yaml (ZeRO-2), a final checkpoint, no val set."""
    from zerovl.engine.launch import run_ranks, torchrun

    data, run_dir = work / "data", work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = torchrun(args.nproc, "-m", "zerovl", "train", str(_common.DEMO_CONFIG), f"data.train={data / 'train.jsonl'}",
                   "data.val=null", f"model.tokenizer={data / 'tokenizer'}", f"train.output_dir={run_dir}",
                   f"train.max_steps={args.train_steps}", "train.save_every=0", "train.save_final=true",
                   "train.eval_every=0", "train.resume=none", "train.warmup_steps=0", "eval.exact_match=false")
    launch = run_ranks(cmd, work / "train.log", env=_env())
    if not launch.ok:
        raise _common.fail(f"eval_throughput: training failed: {launch.reason} (full log: {launch.log_path})")
    print(f"trained {args.train_steps} steps in {launch.wall_s:.1f} s: {run_dir}", flush=True)
    return run_dir


def eval_once(run_dir: Path, val: Path, out: Path, zero: str, batch_size: int, args: argparse.Namespace) -> dict:
    """One ``zerovl eval`` launch: its wall time, rank 0's last progress-bar rate, the question count."""
    from zerovl.engine.launch import run_ranks, torchrun

    shutil.rmtree(out, ignore_errors=True)
    extra = ["--max-new-tokens", str(args.max_new_tokens)] if args.max_new_tokens else []
    cmd = torchrun(args.nproc, "-m", "zerovl", "eval", str(run_dir), "--task", "vqa", "--data", str(val),
                   "--metric", "exact", "--prompt", "", "--batch-size", str(batch_size), "--zero", zero,
                   "--out", str(out), *extra)
    launch = run_ranks(cmd, out.with_suffix(".log"), env=_env())
    if not launch.ok:
        raise _common.fail(f"eval_throughput: zerovl eval --zero {zero} --batch-size {batch_size} failed: "
                           f"{launch.reason} (full log: {launch.log_path})")
    metrics = json.loads((out / "metrics.json").read_text())
    rates = _SPS.findall(launch.log_path.read_text(errors="replace"))
    return {"wall_s": launch.wall_s, "n": metrics["n"], "accuracy": metrics["accuracy"],
            "generation_sps": float(rates[-1]) if rates else float("nan")}


def predictions(out: Path) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines() if line]
    return [(r["id"], r["prediction"]) for r in rows]


def compare(a: Path, b: Path) -> tuple[bool, int, int]:
    """(same ids in the same order, count, answers that differ)."""
    pa, pb = predictions(a), predictions(b)
    same_ids = [i for i, _ in pa] == [i for i, _ in pb]
    return same_ids, len(pa), sum(1 for (_, x), (_, y) in zip(pa, pb) if x != y)


def main() -> None:
    args = arguments()
    from zerovl.data.demo_scenes import generate

    work = Path(args.work).absolute()
    data = work / "data"
    shutil.rmtree(data, ignore_errors=True)  # the val size is part of the measurement: always regenerate
    generate(data, num_train_images=args.train_images, num_val_images=args.val_images)
    run_dir = train_run(work, args)
    val = data / "val.jsonl"
    names = list(SETTINGS)
    command: dict[str, list[float]] = {n: [] for n in names}
    generation: dict[str, list[float]] = {n: [] for n in names}
    outs: dict[str, Path] = {}
    accuracy: dict[str, float] = {}
    n = 0
    for round_ in range(args.rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            zero, batch = SETTINGS[name]
            batch = batch or args.batch_size
            out = work / "evals" / f"{re.sub(r'[^A-Za-z0-9]+', '_', name).strip('_')}_{round_}"
            got = eval_once(run_dir, val, out, zero, batch, args)
            n, outs[name], accuracy[name] = got["n"], out, got["accuracy"]
            command[name].append(n / got["wall_s"])
            generation[name].append(got["generation_sps"])
            print(f"[round {round_}] {name}: {n} questions in {got['wall_s']:.1f} s = {command[name][-1]:.2f} "
                  f"samples/s (command), {got['generation_sps']:.1f} samples/s (generation)", flush=True)
    med_cmd = {k: statistics.median(v) for k, v in command.items()}
    med_gen = {k: statistics.median(v) for k, v in generation.items()}
    print(f"\n{n} val questions ({args.val_images} scenes), {args.nproc} ranks, batched = --batch-size "
          f"{args.batch_size}, {args.rounds} round(s)")
    print(f"{'setting':<22} {'command samples/s':>18} {'generation samples/s':>21} {'accuracy':>9}")
    for name in names:
        print(f"{name:<22} {med_cmd[name]:18.2f} {med_gen[name]:21.1f} {accuracy[name]:9.4f}")
    same, count, differ = compare(outs["ZeRO-2 batched"], outs["ZeRO-2 one at a time"])
    print(f"predictions batched vs one-at-a-time: same ids {same}, {count} each, {differ} answers differ")
    same3, count3, differ3 = compare(outs["ZeRO-2 batched"], outs["ZeRO-3 batched"])
    print(f"predictions ZeRO-3 vs ZeRO-2 (batched): same ids {same3}, {count3} each, {differ3} answers differ")
    z3 = med_cmd["ZeRO-3 batched"] / med_cmd["ZeRO-2 batched"]
    batched = med_cmd["ZeRO-2 batched"] / med_cmd["ZeRO-2 one at a time"]
    z3_gen = med_gen["ZeRO-3 batched"] / med_gen["ZeRO-2 batched"]
    batched_gen = med_gen["ZeRO-2 batched"] / med_gen["ZeRO-2 one at a time"]
    print(f"generation only: ZeRO-3 / ZeRO-2 {z3_gen:.3f}, batched / one-at-a-time {batched_gen:.2f}x")
    print(f"ZeRO-3 / ZeRO-2 samples/s (ratio of medians): {z3:.3f}")
    print(f"batched / one-at-a-time samples/s (ratio of medians): {batched:.2f}x")
    (work / "result.json").write_text(json.dumps({
        "questions": n, "command_samples_per_s": command, "generation_samples_per_s": generation,
        "accuracy": accuracy, "zero3_over_zero2": z3, "batched_over_one_at_a_time": batched,
        "generation_zero3_over_zero2": z3_gen, "generation_batched_over_one_at_a_time": batched_gen,
        "batched_vs_one": {"same_ids": same, "count": count, "differ": differ},
        "zero3_vs_zero2": {"same_ids": same3, "count": count3, "differ": differ3}, "args": vars(args)},
        indent=2) + "\n")
    if args.smoke:
        print(_common.SMOKE_NOTE)


if __name__ == "__main__":
    main()
