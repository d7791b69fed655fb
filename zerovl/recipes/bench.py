"""``zerovl bench``: train the real model a few steps under each ZeRO option and compare them.

Each option is a separate ``torchrun ... zerovl train`` run (a fresh process group, as a real launch
would be) into ``OUT/<option>/``; the runs' own ``metrics.jsonl`` telemetry is summarised into
``OUT/bench.json``, ``OUT/bench.md`` and a bar chart ``OUT/bench.png``: throughput, and per rank the
peak memory, parameter bytes and optimizer-state bytes, each beside the planner's prediction, so the
plan and the measurement can be compared at a glance.

A failed stage is never a result: it is marked failed in the table and the chart with its rank's own
error line, and the command exits non-zero; when every stage failed nothing that looks like a result
(``bench.json``/``.md``/``.png``) is written at all.
"""

from __future__ import annotations

import difflib
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from zerovl.config import load_config
from zerovl.engine import planner
from zerovl.engine.launch import run_ranks, torchrun
from zerovl.engine.metrics import read_metrics
from zerovl.errors import ConfigError, ZeroVLError
from zerovl.recipes.demo import require_demo_data
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
    return torchrun(nproc, "-m", "zerovl", "train", str(config), *overrides, stage_option(stage).override,
                    f"train.max_steps={steps}", "train.stop_after_steps=null", f"train.output_dir={run_dir}",
                    "train.resume=none", "train.save_every=0", "train.save_final=false", "train.log_every=1",
                    "train.eval_every=0", "data.val=null")


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
    loaded = [r for r in records if r.get("event") == "model_loaded" and r.get("param_bytes_per_rank")]
    out["param_bytes"] = loaded[-1]["param_bytes_per_rank"] if loaded else None
    return out


def planned_bytes(shape: planner.ModelShape, stage: str, world: int, precision: str,
                  state_bytes: int = 8) -> dict[str, int]:
    """The planner's per-rank prediction for this option, in the terms bench measures: ``params``
    (what each rank holds, as ``param_bytes_per_rank``), ``optimizer_state`` (the moments, as
    ``optimizer_state_bytes``) and ``model_states`` (params + grads + fp32 copies + moments, the part
    of peak memory the planner models; wherever offload puts them, since a CPU run has one memory)."""
    option = stage_option(stage)
    gpu, cpu = planner.model_state_bytes(shape, option, planner.Hardware(gpus_per_node=world, gpu_mem=0),
                                         precision, state_bytes)
    per_rank = {k: gpu[k] + cpu.get(k, 0) // world for k in gpu}
    return {"params": per_rank["params_trainable"] + per_rank["params_frozen"],
            "optimizer_state": per_rank["moments"], "model_states": sum(per_rank.values())}


def format_table(results: list[dict[str, Any]]) -> str:
    """Markdown table of the runs, measured beside planned; failed runs keep their row (marked) and
    their error line is listed under the table."""
    def per_rank(values):
        return " / ".join(fmt_bytes(v) for v in values) if values else "n/a"

    def num(value, spec=".2f"):
        return format(value, spec) if value is not None else "n/a"

    def plan(r, key):
        value = (r.get("planned") or {}).get(key)
        return fmt_bytes(value) if value is not None else "n/a"

    lines = ["| option | status | samples/s | tokens/s | step s | peak memory per rank | planned model states | "
             "params per rank | planned params | optimizer state per rank | planned optimizer state |",
             "|---|---|---:|---:|---:|---|---:|---|---:|---|---:|"]
    for r in results:
        lines.append(f"| {r['stage']} | {r['status']} | {num(r.get('samples_per_s'))} | "
                     f"{num(r.get('tokens_per_s'), '.0f')} | {num(r.get('step_time_s'), '.3f')} | "
                     f"{per_rank(r.get('peak_mem_bytes'))} | {plan(r, 'model_states')} | "
                     f"{per_rank(r.get('param_bytes'))} | {plan(r, 'params')} | "
                     f"{per_rank(r.get('optimizer_state_bytes'))} | {plan(r, 'optimizer_state')} |")
    failed = [r for r in results if r["status"] != "ok"]
    if failed:
        lines += ["", "Failed (not measurements):", *(f"- {r['stage']}: {r.get('error') or 'no error line'}" for r in failed)]
    return "\n".join(lines)


_PANELS = (("peak_mem_bytes", "model_states", "peak memory per rank", "planned model states"),
           ("param_bytes", "params", "parameters per rank", "planned"),
           ("optimizer_state_bytes", "optimizer_state", "optimizer state per rank", "planned"))


def plot(results: list[dict[str, Any]], path: Path) -> Path:
    """Bar chart by option: throughput; peak memory, parameters and optimizer state per rank, each
    rank's measured bar beside the planner's (hatched). Failed options keep their place, marked."""
    from zerovl.recipes.report import byte_unit, pyplot

    plt = pyplot()
    names = [r["stage"] if r["status"] == "ok" else f"{r['stage']}\n(failed)" for r in results]
    xs = range(len(results))
    fig, axes = plt.subplots(1, 1 + len(_PANELS), figsize=(5 * (1 + len(_PANELS)), 4.8))
    axes[0].bar(xs, [r.get("samples_per_s") or 0 for r in results], color="tab:blue")
    axes[0].set_title("throughput (samples/s)")
    for ax, (key, plan_key, title, plan_label) in zip(axes[1:], _PANELS):
        planned = [(r.get("planned") or {}).get(plan_key) if r["status"] == "ok" else None for r in results]
        largest = max([v for r in results for v in (r.get(key) or [])] + [p or 0 for p in planned], default=0)
        unit, scale = byte_unit(largest)
        ranks = max((len(r.get(key) or []) for r in results), default=0)
        width = 0.8 / (ranks + 1)
        for rank in range(ranks):
            ys = [((r.get(key) or [])[rank] if rank < len(r.get(key) or []) else 0) / scale for r in results]
            ax.bar([i + (rank - ranks / 2) * width for i in xs], ys, width, label=f"rank {rank}")
        bars = ax.bar([i + ranks / 2 * width for i in xs], [(p or 0) / scale for p in planned], width,
                      label=plan_label, color="none", edgecolor="black", hatch="//")
        # the plan's figure over its bar: readable even where it is tiny beside a CPU run's RSS
        ax.bar_label(bars, [fmt_bytes(p) if p is not None else "" for p in planned], fontsize=7, rotation=90,
                     padding=2)
        ax.set_ylim(0, largest / scale * 1.35 or 1)  # headroom for the legend and the labels
        ax.set_title(f"{title} ({unit})")
        ax.legend(fontsize=8, loc="upper right")
    for ax in axes:
        ax.set_xticks(list(xs), names)
        ax.tick_params(axis="x", rotation=30)
        for i, r in enumerate(results):
            if r["status"] != "ok":
                ax.text(i, 0, "failed", color="tab:red", ha="center", va="bottom", fontweight="bold")
                ax.get_xticklabels()[i].set_color("tab:red")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_bench(config: str, stages: list[str], steps: int = 5, nproc: int = 2, out: str | None = None,
              overrides: list[str] | None = None, timeout: int = 1800) -> list[dict[str, Any]]:
    """Run every stage, print the table, write bench.json / bench.md / bench.png; returns the rows.
    Raises ZeroVLError (after writing what was measured) when any stage failed."""
    overrides = list(overrides or [])
    cfg = load_config(config, [*overrides, "data.val=null"])  # a bad config fails before anything launches
    require_demo_data(cfg)
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
        cmd = train_command(config, stage, steps, nproc, run_dir, overrides)
        print(f"[bench] {stage}: {' '.join(cmd)}", flush=True)
        launch = run_ranks(cmd, run_dir / "bench.log", timeout=timeout)
        metrics_path = run_dir / "metrics.jsonl"
        row: dict[str, Any] = {"stage": stage, "deepspeed": stage_option(stage).deepspeed, "command": cmd,
                               "exit_code": launch.exit_code, "wall_s": round(launch.wall_s, 1),
                               "planned": planned_bytes(shape, stage, nproc, cfg.train.precision)}
        row["planned_optimizer_state_bytes"] = row["planned"]["optimizer_state"]
        row.update(summarize(read_metrics(metrics_path)) if metrics_path.is_file() else {"steps": 0})
        if launch.ok and row["steps"] == steps:
            row["status"] = "ok"
        else:
            code = launch.rank_exit_code if launch.rank_exit_code is not None else launch.exit_code
            row["status"] = "timed out" if launch.timed_out else f"failed (exit {code})"
            row["error"] = launch.error or f"{row['steps']} of {steps} steps logged"
            print(f"[bench] {stage} failed: {row['error']}\n[bench]   its log: {launch.log_path}", flush=True)
        results.append(row)

    failed = [r["stage"] for r in results if r["status"] != "ok"]
    if len(failed) == len(results):
        raise ZeroVLError(f"bench: every stage failed ({', '.join(failed)}), so nothing was measured and no "
                          f"results were written; each stage's error is above, its log in {out_dir}/<stage>/bench.log")
    meta = {"config": str(Path(config).absolute()), "steps": steps, "nproc": nproc, "overrides": overrides,
            "precision": cfg.train.precision, "micro_batch_size": cfg.train.micro_batch_size,
            "trainable_params": shape.trainable, "total_params": shape.total, "failed": failed}
    (out_dir / "bench.json").write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")
    table = format_table(results)
    (out_dir / "bench.md").write_text(
        f"# zerovl bench\n\n{meta['config']}: {steps} steps on {nproc} rank(s), {cfg.train.precision}, micro batch "
        f"{cfg.train.micro_batch_size}; samples/s and tokens/s are medians over steps 2..{steps}, "
        "memory is the peak per rank (GPU: allocated; CPU: process RSS); planned columns are `zerovl plan`'s "
        "model for the same option and world size (model states only: no activations, buffers or runtime).\n\n"
        + table + "\n")
    print(table)
    try:
        print(f"[bench] wrote {plot(results, out_dir / 'bench.png')}")
    except ZeroVLError as e:  # the numbers are the point; the chart is optional
        print(f"[bench] no chart: {e}")
    print(f"[bench] wrote {out_dir / 'bench.json'} and {out_dir / 'bench.md'}")
    if failed:
        raise ZeroVLError(f"bench: {len(failed)} of {len(results)} stages failed ({', '.join(failed)}); "
                          "the table and chart mark them, and their errors are above")
    return results
