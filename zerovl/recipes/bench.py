"""``zerovl bench``: train the real model a few steps under each ZeRO option and compare them.

Each option is a separate ``torchrun ... zerovl train`` run (a fresh process group, as a real launch
would be) into ``OUT/<option>/``; the runs' own ``metrics.jsonl`` telemetry is summarised into
``OUT/bench.json``, ``OUT/bench.md`` and a bar chart ``OUT/bench.png``: throughput, peak memory per
rank and optimizer-state bytes per rank, next to the planner's prediction of the latter.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from zerovl.config import load_config
from zerovl.engine import planner
from zerovl.engine.metrics import read_metrics
from zerovl.errors import ConfigError, ZeroVLError
from zerovl.recipes.plan import fmt_bytes

log = logging.getLogger("zerovl.bench")

STAGE_NAMES = tuple(planner.OPTIONS_BY_NAME)  # the presets and the planner's other options


def stage_option(name: str) -> planner.Option:
    """A preset name or a planner option name -> the option (its ``override`` selects it)."""
    if name in planner.OPTIONS_BY_NAME:
        return planner.OPTIONS_BY_NAME[name]
    near = difflib.get_close_matches(name, STAGE_NAMES, n=1)
    hint = f" (did you mean {near[0]}?)" if near else ""
    raise ConfigError(f"--stages: unknown option '{name}'{hint}; choose from {', '.join(STAGE_NAMES)}")


def train_command(config: str, stage: str, steps: int, nproc: int, run_dir: Path, overrides: list[str]) -> list[str]:
    """The torchrun command of one benchmark run; bench's own settings come last so they win."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "zerovl", "train", str(config), *overrides, stage_option(stage).override,
            f"train.max_steps={steps}", "train.stop_after_steps=null", f"train.output_dir={run_dir}",
            "train.resume=none", "train.save_every=0", "train.save_final=false", "train.log_every=1",
            "train.eval_every=0", "data.val=null"]


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Throughput (median over steps after the first, which pays for warm-up), per-rank peak memory
    (max over steps) and per-rank optimizer-state bytes (last step) of one run's train records."""
    steps = [r for r in records if r.get("split") == "train"]
    timed = steps[1:] if len(steps) > 1 else steps
    out: dict[str, Any] = {
        "steps": len(steps),
        "samples_per_s": _median([r["samples_per_s"] for r in timed if "samples_per_s" in r]),
        "tokens_per_s": _median([r["tokens_per_s"] for r in timed if "tokens_per_s" in r]),
        "step_time_s": _median([r["time_total"] for r in timed if "time_total" in r]),
        "final_loss": steps[-1]["loss"] if steps else None,
    }
    for phase in ("data", "forward", "backward", "step"):
        out[f"time_{phase}"] = _median([r[f"time_{phase}"] for r in timed if f"time_{phase}" in r])
    out["mfu"] = _median([r["mfu"] for r in timed if r.get("mfu") is not None])
    peaks = [r["peak_mem_bytes"] for r in steps if r.get("peak_mem_bytes")]
    out["peak_mem_bytes"] = [max(col) for col in zip(*peaks)] if peaks else None
    states = [r["optimizer_state_bytes"] for r in steps if r.get("optimizer_state_bytes")]
    out["optimizer_state_bytes"] = states[-1] if states else None
    return out


def planned_state_bytes(shape: planner.ModelShape, stage: str, world: int, state_bytes: int = 8) -> int:
    """The planner's optimizer moments per rank for this option (what ``optimizer_state_bytes`` measures)."""
    option = stage_option(stage)
    return state_bytes * shape.trainable // (world if option.stage >= 1 else 1)


def _run(cmd: list[str], log_path: Path, timeout: int) -> tuple[int, float]:
    started = time.perf_counter()
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: torchrun and its ranks only
            proc.wait()
            code = -signal.SIGKILL
    return code, time.perf_counter() - started


def _last_error(log_path: Path) -> str:
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["no output"])[-1][:300]


def format_table(results: list[dict[str, Any]]) -> str:
    """Markdown table of the runs."""
    def per_rank(values):
        return " / ".join(fmt_bytes(v) for v in values) if values else "n/a"

    def num(value, spec=".2f"):
        return format(value, spec) if value is not None else "n/a"

    lines = ["| option | status | samples/s | tokens/s | step s | peak memory per rank | "
             "optimizer state per rank | planned per rank |",
             "|---|---|---:|---:|---:|---|---|---|"]
    for r in results:
        lines.append(f"| {r['stage']} | {r['status']} | {num(r.get('samples_per_s'))} | "
                     f"{num(r.get('tokens_per_s'), '.0f')} | {num(r.get('step_time_s'), '.3f')} | "
                     f"{per_rank(r.get('peak_mem_bytes'))} | {per_rank(r.get('optimizer_state_bytes'))} | "
                     f"{fmt_bytes(r['planned_optimizer_state_bytes']) if r.get('planned_optimizer_state_bytes') is not None else 'n/a'} |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> Path:
    """Bar chart: throughput, peak memory per rank and optimizer state per rank by option."""
    from zerovl.recipes.report import byte_unit, pyplot

    plt = pyplot()
    ok = [r for r in results if r["status"] == "ok"]
    names = [r["stage"] for r in ok]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    axes[0].bar(names, [r.get("samples_per_s") or 0 for r in ok], color="tab:blue")
    axes[0].set_title("throughput (samples/s)")
    for ax, key, title in ((axes[1], "peak_mem_bytes", "peak memory per rank"),
                           (axes[2], "optimizer_state_bytes", "optimizer state per rank")):
        unit, scale = byte_unit(max((v for r in ok for v in (r.get(key) or [])), default=0))
        ranks = max((len(r.get(key) or []) for r in ok), default=0)
        width = 0.8 / max(ranks, 1)
        for rank in range(ranks):
            xs = [i + (rank - (ranks - 1) / 2) * width for i in range(len(ok))]
            ys = [(r.get(key) or [0] * ranks)[rank] / scale for r in ok]
            ax.bar(xs, ys, width, label=f"rank {rank}")
        ax.set_xticks(range(len(ok)), names)
        ax.set_title(f"{title} ({unit})")
        if ranks > 1:
            ax.legend()
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_bench(config: str, stages: list[str], steps: int = 5, nproc: int = 2, out: str | None = None,
              overrides: list[str] | None = None, timeout: int = 1800) -> list[dict[str, Any]]:
    """Run every stage, print the table, write bench.json / bench.md / bench.png; returns the rows."""
    overrides = list(overrides or [])
    cfg = load_config(config, overrides)  # fail on a bad config before launching anything
    if not stages:
        raise ConfigError("--stages is empty; give e.g. zero0,zero1,zero2,zero3")
    for stage in stages:
        stage_option(stage)
    if steps < 1 or nproc < 1:
        raise ConfigError("--steps and --nproc must be at least 1")
    out_dir = Path(out) if out else Path(cfg.train.output_dir) / time.strftime("bench-%Y%m%d-%H%M%S")
    for stage in stages:
        if (out_dir / stage).exists() and any((out_dir / stage).iterdir()):
            raise ConfigError(f"bench: {out_dir / stage} already exists; pass a new --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    shape = planner.count_model(cfg.model)

    results = []
    for stage in stages:
        run_dir = (out_dir / stage).absolute()
        run_dir.mkdir(parents=True, exist_ok=True)
        cmd = train_command(config, stage, steps, nproc, run_dir, overrides)
        print(f"[bench] {stage}: {' '.join(cmd)}", flush=True)
        code, wall = _run(cmd, run_dir / "bench.log", timeout)
        metrics_path = run_dir / "metrics.jsonl"
        row: dict[str, Any] = {"stage": stage, "deepspeed": stage_option(stage).deepspeed, "command": cmd,
                               "exit_code": code, "wall_s": round(wall, 1),
                               "planned_optimizer_state_bytes": planned_state_bytes(shape, stage, nproc)}
        row.update(summarize(read_metrics(metrics_path)) if metrics_path.is_file() else {"steps": 0})
        if code == 0 and row["steps"] == steps:
            row["status"] = "ok"
        else:
            row["status"] = f"failed (exit {code})"
            row["error"] = _last_error(run_dir / "bench.log")
            print(f"[bench] {stage} failed: {row['error']} (log: {run_dir / 'bench.log'})", flush=True)
        results.append(row)

    meta = {"config": str(Path(config).absolute()), "steps": steps, "nproc": nproc, "overrides": overrides,
            "precision": cfg.train.precision, "micro_batch_size": cfg.train.micro_batch_size,
            "trainable_params": shape.trainable, "total_params": shape.total}
    (out_dir / "bench.json").write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")
    table = format_table(results)
    (out_dir / "bench.md").write_text(
        f"# zerovl bench\n\n{meta['config']}: {steps} steps on {nproc} rank(s), {cfg.train.precision}, micro batch "
        f"{cfg.train.micro_batch_size}; samples/s and tokens/s are medians over steps 2..{steps}, "
        "memory is the peak per rank (GPU: allocated; CPU: process RSS).\n\n" + table + "\n")
    print(table)
    try:
        print(f"[bench] wrote {plot(results, out_dir / 'bench.png')}")
    except ZeroVLError as e:  # the numbers are the point; the chart is optional
        print(f"[bench] no chart: {e}")
    print(f"[bench] wrote {out_dir / 'bench.json'} and {out_dir / 'bench.md'}")
    return results
