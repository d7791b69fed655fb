"""Seconds per step of the demo model on 2 ranks: one node with 2 processes vs two 1-process nodes on loopback.

    python benchmarks/multinode_loopback.py [--steps 40] [--warmup 5] [--rounds 3] [--smoke] [overrides ...]

Each round runs ``configs/demo.yaml`` (ZeRO-2, fp32) under every setting below, in alternating
order, and reads the per-step times from ``metrics.jsonl``:

- ``1 node x 2``: ``torchrun --standalone --nproc_per_node 2`` (torchrun sets OMP_NUM_THREADS=1);
- ``2 nodes x 1 (2 threads each)``: two ``torchrun --nnodes 2 --node_rank R --nproc_per_node 1`` on a
  static rendezvous at 127.0.0.1, OMP_NUM_THREADS=2 — what zerovl chose for each rank before it
  counted the ranks per host (cores // LOCAL_WORLD_SIZE, and LOCAL_WORLD_SIZE is 1 per "node");
- ``2 nodes x 1``: the same with OMP_NUM_THREADS unset, zerovl's default now;
- ``2 nodes x 1 (GLOO_SOCKET_IFNAME=lo)`` and ``(=eth0)``: the interface gloo uses, chosen explicitly.

``--settings`` picks some of them, comma-separated (default: all); ``--smoke`` runs the first and
third only, a few steps, one round. On a machine other jobs load, the figures mean little: extra
threads then win CPU share from the other jobs instead of fighting each other (see RESULTS.md).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

REPO = _common.REPO
SETTINGS = {  # name -> (nodes, extra environment)
    "1 node x 2": (1, {}),
    "2 nodes x 1 (2 threads each)": (2, {"OMP_NUM_THREADS": "2"}),
    "2 nodes x 1": (2, {}),
    "2 nodes x 1 (GLOO_SOCKET_IFNAME=lo)": (2, {"GLOO_SOCKET_IFNAME": "lo"}),
    "2 nodes x 1 (GLOO_SOCKET_IFNAME=eth0)": (2, {"GLOO_SOCKET_IFNAME": "eth0"}),
}
SMOKE_SETTINGS = ("1 node x 2", "2 nodes x 1")


def _train_args(work: Path, run_dir: Path, steps: int, overrides: list[str]) -> list[str]:
    data = work / "data"
    return ["-m", "zerovl", "train", str(_common.DEMO_CONFIG), f"data.train={data / 'train.jsonl'}", "data.val=null",
            f"model.tokenizer={data / 'tokenizer'}", f"train.output_dir={run_dir}", f"train.max_steps={steps}",
            "train.save_every=0", "train.save_final=false", "train.eval_every=0", "train.resume=none",
            "train.log_every=1", "train.warmup_steps=0", "eval.exact_match=false", *overrides]


def _launch(nodes: int, target: list[str], log: Path, env: dict[str, str]) -> None:
    """One torchrun with 2 processes, or ``nodes`` one-process torchruns meeting on 127.0.0.1."""
    from zerovl.engine.launch import run_ranks, torchrun

    if nodes == 1:
        launches = [run_ranks(torchrun(2, *target), log, env=env)]
    else:
        port = str(_free_port())
        results: dict[int, object] = {}

        def node(rank: int) -> None:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--node_rank={rank}",
                   "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}", *target]
            results[rank] = run_ranks(cmd, log.with_suffix(f".node{rank}.log"), env=env, timeout=1800)

        threads = [threading.Thread(target=node, args=(r,)) for r in range(nodes)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        launches = [results[r] for r in range(nodes)]
    failed = next((launch for launch in launches if not launch.ok), None)
    if failed is not None:
        raise _common.fail(f"multinode_loopback: {failed.reason} (full log: {failed.log_path})")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step_times(run_dir: Path, warmup: int) -> tuple[float, float, list[float]]:
    """(median s/step, slowest step, losses) from rank 0's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    rows = [r for r in rows if r.get("split") == "train"]
    stamps = [(r["step"], r["time"]) for r in rows]
    slowest = max(t1 - t0 for (s0, t0), (s1, t1) in zip(stamps, stamps[1:]) if s0 >= warmup)
    return _common.per_step(stamps, warmup), slowest, [r["loss"] for r in rows]


def main() -> None:
    args = _common.arguments(__doc__.splitlines()[0], lambda p: p.add_argument(
        "--settings", default=",".join(SETTINGS), help="comma-separated names from the list above"))
    from zerovl.data.demo_scenes import generate

    os.environ.pop("OMP_NUM_THREADS", None)  # the thread count is what is measured: each setting sets its own
    work = Path(args.work).absolute()
    if not (work / "data" / "train.jsonl").is_file():
        generate(work / "data", num_train_images=args.images, num_val_images=8)
    names = list(SMOKE_SETTINGS) if args.smoke else [n.strip() for n in args.settings.split(",")]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown or names[0] != "1 node x 2" or "2 nodes x 1" not in names:
        raise SystemExit(f"--settings: {unknown or names} — known: {', '.join(SETTINGS)}; the first must be "
                         "'1 node x 2' and '2 nodes x 1' must be among them")
    medians: dict[str, list[float]] = {n: [] for n in names}
    slowest: dict[str, float] = {n: 0.0 for n in names}
    losses: dict[str, list[float]] = {}
    env_base = {"PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for round_ in range(args.rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            nodes, env = SETTINGS[name]
            run_dir = work / "runs" / f"{re.sub(r'[^A-Za-z0-9]+', '_', name).strip('_')}_{round_}"
            shutil.rmtree(run_dir, ignore_errors=True)
            _launch(nodes, _train_args(work, run_dir, args.steps, args.overrides), run_dir.with_suffix(".log"),
                    {**env_base, **env})
            median, worst, losses[name] = _step_times(run_dir, args.warmup)
            medians[name].append(median)
            slowest[name] = max(slowest[name], worst)
            print(f"[round {round_}] {name}: {median * 1000:.1f} ms/step (slowest {worst * 1000:.0f} ms)", flush=True)
    base = statistics.median(medians[names[0]])
    print(f"\n{'setting':<40} {'median ms/step':>15} {'slowest step ms':>16} {'vs 1 node':>10}")
    for name in names:
        m = statistics.median(medians[name])
        print(f"{name:<40} {m * 1000:15.1f} {slowest[name] * 1000:16.0f} {m / base:10.3f}")
    same = all(losses[n] == losses[names[0]] for n in names)
    print(f"losses identical to {names[0]} in every setting: {same}")
    print(f"2 nodes / 1 node (ratio of medians): {statistics.median(medians['2 nodes x 1']) / base:.3f}")
    if args.smoke:
        print(_common.SMOKE_NOTE)


if __name__ == "__main__":
    main()
