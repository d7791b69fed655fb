"""``zerovl report RUN_DIR``: the run's curves as PNG files, from its ``metrics.jsonl`` alone.

Writes ``loss.png`` (train and val), ``lr.png``, ``throughput.png`` (samples/s, tokens/s) and, when
the run logged them, ``memory.png`` (peak memory and optimizer state per rank) and ``time.png``
(data / forward / backward / step seconds per step). No training or GPU needed: a run directory
copied off a cluster is enough.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from zerovl.engine.metrics import read_metrics
from zerovl.errors import ZeroVLError

log = logging.getLogger("zerovl.report")


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or a one-line install hint."""
    try:
        import matplotlib
    except ImportError:
        raise ZeroVLError("plots need matplotlib, which is not installed: pip install zerovl[plot]") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def load_run(run_dir: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, val) records by step. A resumed run logs the steps after its checkpoint again; the
    latest line for a step wins, as it belongs to the run that continued."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ZeroVLError(f"{path} not found; give a run directory (train.output_dir of a zerovl train run)")
    train: dict[int, dict[str, Any]] = {}
    val: dict[int, dict[str, Any]] = {}
    try:
        records = read_metrics(path)
    except ValueError as e:
        raise ZeroVLError(f"{path} is not JSON lines ({e})") from None
    for record in records:
        target = {"train": train, "val": val}.get(record.get("split"))
        if target is not None and "step" in record:
            target[int(record["step"])] = record
    if not train:
        raise ZeroVLError(f"{path} has no train records yet")
    return [train[s] for s in sorted(train)], [val[s] for s in sorted(val)]


def byte_unit(largest: float) -> tuple[str, int]:
    """The unit that keeps a byte axis readable: (name, size)."""
    for name, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if largest >= size:
            return name, size
    return "B", 1


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[Any]]:
    pairs = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _per_rank(ax, records: list[dict[str, Any]], key: str, title: str) -> None:
    steps, values = _series(records, key)
    unit, scale = byte_unit(max(max(v) for v in values))
    for rank in range(max(len(v) for v in values)):
        ax.plot(steps, [v[rank] / scale if rank < len(v) else float("nan") for v in values], label=f"rank {rank}")
    ax.set_title(f"{title} ({unit})")
    ax.set_xlabel("step")
    ax.legend()


def report(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Render the run's curves; returns the PNG paths written."""
    train, val = load_run(run_dir)
    plt = pyplot()
    out_dir = Path(out) if out else Path(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        written.append(out_dir / name)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(*_series(train, "loss"), label="train")
    if any("loss" in r for r in val):
        ax.plot(*_series(val, "loss"), "o-", label="val")
    ax.set(title="loss", xlabel="step")
    ax.legend()
    save(fig, "loss.png")

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(*_series(train, "lr"))
    ax.set(title="learning rate", xlabel="step")
    save(fig, "lr.png")

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.plot(*_series(train, "samples_per_s"))
    left.set(title="samples/s", xlabel="step")
    right.plot(*_series(train, "tokens_per_s"), color="tab:orange")
    right.set(title="tokens/s", xlabel="step")
    save(fig, "throughput.png")

    memory = [k for k in ("peak_mem_bytes", "optimizer_state_bytes") if any(r.get(k) for r in train)]
    if memory:
        fig, axes = plt.subplots(1, len(memory), figsize=(6 * len(memory), 4.5), squeeze=False)
        titles = {"peak_mem_bytes": "peak memory per rank", "optimizer_state_bytes": "optimizer state per rank"}
        for ax, key in zip(axes[0], memory):
            _per_rank(ax, train, key, titles[key])
        save(fig, "memory.png")
    else:
        log.info("no memory telemetry in this run's metrics; memory.png skipped")

    phases = [p for p in ("data", "forward", "backward", "step") if any(f"time_{p}" in r for r in train)]
    if phases:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        steps = [r["step"] for r in train]
        bottom = [0.0] * len(train)
        for phase in phases:
            values = [r.get(f"time_{phase}") or 0.0 for r in train]
            ax.bar(steps, values, bottom=bottom, label=phase, width=1.0)
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.set(title="seconds per step", xlabel="step")
        ax.legend()
        save(fig, "time.png")
    return written
