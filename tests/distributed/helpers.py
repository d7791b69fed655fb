"""Launch real multi-rank zerovl runs with torchrun (CPU, gloo) from tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(args: list[str], nproc: int = 2, timeout: int = 300, launcher: str = "torchrun",
        env: dict | None = None, script: str | None = None) -> subprocess.CompletedProcess:
    """Run ``zerovl <args>`` (or ``script <args>``) on ``nproc`` ranks; a hang becomes a test failure
    after ``timeout`` s."""
    target = [script] if script is not None else ["-m", "zerovl"]
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               *target, *args]
    else:
        cmd = [str(Path(sys.executable).with_name("deepspeed")), f"--num_gpus={nproc}",
               f"--master_port={29500 + os.getpid() % 1000}", "--module", "zerovl", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env,
                            cwd=REPO, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{' '.join(target + args)} hung for {timeout}s:\n{out[-4000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_nodes(args: list[str], nodes: int = 2, timeout: int = 300, env: dict | None = None
              ) -> subprocess.CompletedProcess:
    """Run ``zerovl <args>`` as ``nodes`` one-process torchrun "nodes" meeting at a static rendezvous on
    127.0.0.1 (what SLURM's srun + torchrun does across machines); node 0 hosts it. The result's output
    is every node's output in node order; its return code is the first non-zero one."""
    port = free_port()
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    procs = []
    for rank in range(nodes):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--node_rank={rank}",
               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
               f"--rdzv_conf=timeout={timeout}", "-m", "zerovl", *args]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=full_env, cwd=REPO, start_new_session=True))
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        out = "".join(proc.communicate()[0] or "" for proc in procs[len(outputs):])
        raise AssertionError(f"{' '.join(args)} on {nodes} nodes hung for {timeout}s:\n{out[-4000:]}") from None
    code = next((proc.returncode for proc in procs if proc.returncode != 0), 0)
    return subprocess.CompletedProcess(procs[0].args, code, "".join(outputs), "")


def check(proc: subprocess.CompletedProcess) -> str:
    if proc.returncode != 0:
        errors = [line for line in proc.stdout.splitlines() if "Error" in line and "rank" in line]
        raise AssertionError(f"exit {proc.returncode}; errors: {errors[:4]}\n{proc.stdout[-5000:]}")
    return proc.stdout


def metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return [r for r in rows if r.get("split") == "train"], [r for r in rows if r.get("split") == "val"]


def exit_without_teardown(code: int = 0) -> None:
    """End a torchrun'd test script as zerovl's own entry point does after a multi-rank run (process group
    destroyed, files written): skip interpreter teardown, where gloo's "terminate called without an active
    exception" abort hits a few percent of exits (pytorch #190489) and fails a finished run."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
