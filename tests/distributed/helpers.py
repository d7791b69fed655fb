"""Launch real multi-rank zerovl runs with torchrun (CPU, gloo) from tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
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


def check(proc: subprocess.CompletedProcess) -> str:
    if proc.returncode != 0:
        errors = [line for line in proc.stdout.splitlines() if "Error" in line and "rank" in line]
        raise AssertionError(f"exit {proc.returncode}; errors: {errors[:4]}\n{proc.stdout[-5000:]}")
    return proc.stdout


def metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return [r for r in rows if r.get("split") == "train"], [r for r in rows if r.get("split") == "val"]
