"""Multi-node on one machine: two one-process torchrun "nodes" meeting at a rendezvous on 127.0.0.1
train, checkpoint and resume exactly like one node with two processes; ranks that cannot meet say so
in one line within train.dist_timeout_s instead of hanging."""

import os
import subprocess
import sys
import time

import pytest

from tests.conftest import tiny_config, write_config
from tests.distributed.helpers import REPO, check, free_port, metrics, run, run_nodes

pytestmark = pytest.mark.distributed

TIMEOUT_S = 4


def _config(path, scenes):
    path.mkdir()
    cfg = tiny_config(scenes, path / "run", train={"max_steps": 6, "save_every": 3, "gradient_accumulation_steps": 2})
    return write_config(cfg, path / "cfg.yaml")


def test_two_nodes_train_checkpoint_and_resume_like_one_node(tmp_path, scenes):
    """Bitwise: the same two ranks, batches and gloo all-reduce of two operands, only the launcher differs."""
    one = _config(tmp_path / "one", scenes)
    check(run(["train", str(one)]))
    two = _config(tmp_path / "two", scenes)
    check(run_nodes(["train", str(two), "train.stop_after_steps=3"]))
    out = check(run_nodes(["train", str(two)]))
    assert "resumed from" in out and "world 2" in out
    reference, _ = metrics(tmp_path / "one" / "run")
    nodes, _ = metrics(tmp_path / "two" / "run")
    assert [r["step"] for r in nodes] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in nodes] == [r["loss"] for r in reference]
    assert [r["consumed"] for r in nodes] == [r["consumed"] for r in reference]


def _start_rank(cfg, rank: int, addr: str, port: int) -> subprocess.Popen:
    """One rank of a world of two started directly, as `deepspeed --no_ssh` or a per-task srun does:
    zerovl itself then meets the others at MASTER_ADDR:MASTER_PORT."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "RANK": str(rank), "LOCAL_RANK": "0",
           "WORLD_SIZE": "2", "MASTER_ADDR": addr, "MASTER_PORT": str(port)}
    return subprocess.Popen([sys.executable, "-m", "zerovl", "train", str(cfg), f"train.dist_timeout_s={TIMEOUT_S}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)


def test_ranks_that_cannot_meet_say_so_in_one_line(tmp_path, scenes):
    """Rank 0 alone waits for rank 1; a rank 1 finds nobody at the port; another finds no such host.
    Started together: each waits out the same short train.dist_timeout_s."""
    cfg = _config(tmp_path / "cfg", scenes)
    cases = {"a node missing": (0, "127.0.0.1"), "wrong port": (1, "127.0.0.1"),
             "wrong address": (1, "no-such-node.invalid")}
    deadline = time.monotonic() + TIMEOUT_S + 90  # start-up (imports) plus the timeout, not 30 minutes
    procs = {case: _start_rank(cfg, rank, addr, free_port()) for case, (rank, addr) in cases.items()}
    try:
        outputs = {case: proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0]
                   for case, proc in procs.items()}
    finally:  # a rank still waiting (the timeout not applied) must not outlive the test
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    for case, proc in procs.items():
        rank, addr = cases[case]
        out = outputs[case]
        assert proc.returncode == 1, (case, out[-3000:])
        errors = [line for line in out.splitlines() if "error" in line.lower() or "frame #" in line]
        assert len(errors) == 1 and "Traceback" not in out, (case, out[-3000:])  # no C++ stack per retry
        assert errors[0].startswith(f"zerovl: error: [rank {rank}] could not reach "), (case, errors)
        assert f"at {addr}:" in errors[0] and f"within {TIMEOUT_S} s (train.dist_timeout_s)" in errors[0]
        assert "check MASTER_ADDR/MASTER_PORT and that every node started" in errors[0]
