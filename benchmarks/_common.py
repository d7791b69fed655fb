"""Shared by the benchmark scripts: demo data, the demo config, self-relaunch under torchrun, timing.

Each script is run plainly (``python benchmarks/X.py``); it generates the demo scenes once, then
relaunches itself on ``--nproc`` ranks with torchrun, and the ranks measure both contenders side by
side in the same processes, alternating their order every round so drift on a shared machine
affects both alike. When the ranks fail, the first rank's own error line is what the script says.

``--smoke`` (every script under benchmarks/ has one) runs a few steps, one round, on a small
dataset in a scratch directory, so the test suite can check each script still runs end to end and
prints its ratio line. Smoke figures are not results: they are labelled so and never recorded.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"


def arguments(description: str, extra=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    if extra is not None:
        extra(p)
    p.add_argument("--work", default="runs/bench_scripts", help="data, runs and results go here")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per measured run")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing")
    p.add_argument("--rounds", type=int, default=3, help="alternating runs of each contender")
    p.add_argument("--images", type=int, default=600, help="demo scenes to generate")
    p.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. deepspeed=zero3 train.micro_batch_size=8")
    args = p.parse_args()
    if args.smoke:  # 3 timed steps after 1 warm-up (per_step needs 3 timestamps), one round, a small set
        args.steps, args.warmup, args.rounds, args.images = 5, 1, 1, 32
        if args.work == p.get_default("work"):
            args.work = smoke_dir("bench_scripts")
    return args


SMOKE_HELP = "a few steps, one round, small data in a scratch directory: checks the script runs; not a result"
SMOKE_NOTE = "(smoke run: checks that the benchmark runs; the figures are not results)"


_SCRATCH: list[str] = []


def smoke_dir(name: str) -> str:
    """A scratch directory for a smoke run, removed at exit (kept when the run failed, for its log),
    so smoke figures are never recorded."""
    path = tempfile.mkdtemp(prefix=f"zerovl-smoke-{name}-")
    if not _SCRATCH:
        atexit.register(lambda: [shutil.rmtree(p, ignore_errors=True) for p in _SCRATCH])
    _SCRATCH.append(path)
    return path


def fail(message: str) -> SystemExit:
    """The exception a script raises when its ranks failed; keeps any smoke directory for the log."""
    _SCRATCH.clear()
    return SystemExit(message)


def is_rank() -> bool:
    return "LOCAL_RANK" in os.environ


def relaunch(script: str, args: argparse.Namespace) -> dict[str, Any]:
    """Generate the data (once), run this script on ``args.nproc`` ranks, return rank 0's results."""
    from zerovl.data.demo_scenes import generate

    work = Path(args.work).absolute()
    data = work / "data"
    if not (data / "train.jsonl").is_file():
        generate(data, num_train_images=args.images, num_val_images=8)
    result = work / "result.json"
    result.unlink(missing_ok=True)
    shutil.rmtree(work / "runs", ignore_errors=True)  # metrics.jsonl appends: every run starts fresh
    from zerovl.engine.launch import run_ranks, torchrun

    cmd = torchrun(args.nproc, script, *sys.argv[1:], "--work", str(work))
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    launch = run_ranks(cmd, work / "ranks.log", echo=True, env=env)
    if not result.is_file():
        raise fail(f"benchmark ranks failed: {launch.error or f'exit {launch.exit_code}'} "
                   f"(full log: {launch.log_path})")
    return {**json.loads(result.read_text()), "exit_code": launch.exit_code}


# The batches sections 1-3 of RESULTS.md were measured on: the demo model with padded micro-batches of
# 16. configs/demo.yaml itself moved to packed rows of 8 for accuracy; the loop comparisons keep
# theirs so their figures stay comparable (a script's own overrides still win).
BENCHMARK_BATCHES = ("data.packing=false", "train.micro_batch_size=16")


def demo_config(work: Path, run_dir: Path, steps: int, overrides: list[str]):
    """configs/demo.yaml on the generated data with ``BENCHMARK_BATCHES``, no eval, no periodic
    checkpoints, fresh run dir."""
    from zerovl.config import load_config

    data = work / "data"
    return load_config(DEMO_CONFIG, [
        f"data.train={data / 'train.jsonl'}", "data.val=null", f"model.tokenizer={data / 'tokenizer'}",
        f"train.output_dir={run_dir}", f"train.max_steps={steps}", "train.save_every=0", "train.eval_every=0",
        "train.resume=none", "train.log_every=1", "train.warmup_steps=0", "eval.exact_match=false",
        *BENCHMARK_BATCHES, *overrides])


def per_step(stamps: list[tuple[int, float]], warmup: int) -> float:
    """Median seconds per step from (step, wall-clock time at its end) pairs, warm-up steps left out;
    pairs may skip steps (a run that logs every k steps). The median, not the mean: on a shared
    machine other jobs add spikes to a few steps."""
    timed = [(s, t) for s, t in stamps if s >= warmup]
    if len(timed) < 3:
        raise SystemExit(f"need at least 3 timestamps after step {warmup}, got {len(timed)}")
    return statistics.median((t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(timed, timed[1:]))


def summary(times: dict[str, list[float]], ours: str, theirs: str) -> dict[str, Any]:
    """Per-round ratios ours/theirs and the ratio of medians."""
    ratios = [a / b for a, b in zip(times[ours], times[theirs])]
    return {"seconds_per_step": times, "ratios": ratios,
            "ratio_of_medians": statistics.median(times[ours]) / statistics.median(times[theirs]),
            "median_ratio": statistics.median(ratios)}


def write_result(work: Path, result: dict[str, Any]) -> None:
    (work / "result.json").write_text(json.dumps(result, indent=2) + "\n")


def zerovl_train(cfg, is_main: bool) -> tuple[list[tuple[int, float]], float | None]:
    """zerovl's recipe, unchanged: (per-step timestamps, step-1 loss) from its metrics.jsonl (rank 0)."""
    from zerovl.engine.metrics import read_metrics
    from zerovl.recipes import train as recipe

    recipe.train(cfg)
    if not is_main:
        return [], None
    records = [r for r in read_metrics(Path(cfg.train.output_dir) / "metrics.jsonl") if r.get("split") == "train"]
    first = next((r["loss"] for r in records if r["step"] == 1), None)  # absent with train.log_every > 1
    return [(r["step"], r["time"]) for r in records], first


def trainer_model(vlm):
    """A zerovl model as transformers.Trainer takes it: Trainer reads outputs["loss"]; zerovl's models
    return the bare loss tensor. The explicit signature (no **kwargs) tells Trainer the model does not
    take num_items_in_batch, so it scales the mean loss for accumulation itself, as DeepSpeed does."""
    from torch import nn

    class WithLossDict(nn.Module):
        def __init__(self):
            super().__init__()
            self.vlm = vlm

        def forward(self, input_ids, attention_mask, labels=None, pixel_values=None, position_ids=None):
            return {"loss": self.vlm(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                                     pixel_values=pixel_values, position_ids=position_ids)}

    return WithLossDict()


def trainer_arguments(cfg, ds_config: dict, on_cpu: bool, output_dir: Path, **length):
    """TrainingArguments matching zerovl's ``cfg.train`` (batch, accumulation, AdamW settings, clipping,
    precision, seed) with the DeepSpeed config zerovl resolved, a constant LR and no logging or saving;
    ``length``: ``max_steps=N`` or ``num_train_epochs=N`` plus any other TrainingArguments field."""
    from transformers import TrainingArguments

    t = cfg.train
    return TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, learning_rate=t.lr, weight_decay=t.weight_decay,
        adam_beta1=t.betas[0], adam_beta2=t.betas[1], adam_epsilon=t.eps, max_grad_norm=t.grad_clip,
        lr_scheduler_type="constant", warmup_steps=0, bf16=t.precision == "bf16", fp16=t.precision == "fp16",
        logging_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True, seed=t.seed,
        dataloader_num_workers=cfg.data.num_workers, remove_unused_columns=False, deepspeed=ds_config,
        use_cpu=on_cpu, ddp_backend="gloo" if on_cpu else None, **length)


class ContenderFailed(Exception):
    """A contender cannot run here; it has already written the reason as the result."""


Contender = Callable[[Any, Path], tuple[list[tuple[int, float]], float | None]]


def alternate_rounds(args: argparse.Namespace, name: str, contender: Contender) -> None:
    """On a rank: run ``contender(cfg, run_dir)`` and zerovl's recipe once per round, the order
    alternating, then write rank 0's per-step times and the ratio zerovl / ``name``."""
    from zerovl.engine.distributed import init_distributed, shutdown
    from zerovl.recipes import train as recipe

    dist = init_distributed()
    recipe.shutdown = lambda: None  # train() ends the process group; keep it for the next round
    work = Path(args.work)
    runners = {name: contender, "zerovl": lambda cfg, _: zerovl_train(cfg, dist.is_main)}
    times: dict[str, list[float]] = {n: [] for n in runners}
    first_losses: dict[str, list[float | None]] = {n: [] for n in runners}
    try:
        for round_ in range(args.rounds):
            for n in (name, "zerovl") if round_ % 2 == 0 else ("zerovl", name):
                run_dir = work / "runs" / f"{n}_{round_}"
                stamps, loss = runners[n](demo_config(work, run_dir, args.steps, args.overrides), run_dir)
                if dist.is_main:
                    times[n].append(per_step(stamps, args.warmup))
                    first_losses[n].append(loss)
                    print(f"[round {round_}] {n}: {times[n][-1] * 1000:.1f} ms/step, step-1 loss {loss}", flush=True)
    except ContenderFailed:
        shutdown()
        return
    if dist.is_main:
        write_result(work, {**summary(times, "zerovl", name), "first_losses": first_losses, "args": vars(args)})
    shutdown()
