"""Every script under benchmarks/ still runs: its ``--smoke`` mode (a few steps, one round, small data)
completes and prints its ratio line, so a rename can never rot a benchmark unnoticed. The figures
are not results: only the shape of the output is checked, and everything goes to a scratch dir."""

import os
import re
import subprocess
import sys

import pytest

from tests.distributed.helpers import REPO

# script -> (the line that carries its figure, its scratch-directory option, launches torchrun ranks)
SCRIPTS = {
    "overhead_vs_plain_deepspeed.py": (r"zerovl / plain DeepSpeed \(ratio of medians\): \d+\.\d{3}", "--work", True),
    "vs_hf_trainer.py": (r"zerovl / HF Trainer \(ratio of medians\): \d+\.\d{3}", "--work", True),
    "checkpoint_size.py": (r"ratio projection-only / full: 0\.\d{4}", "--work", True),
    "packing_efficiency.py": (r"non-padding share packing / padding: \d+\.\d\dx", "--out", False),
    "prepare_throughput.py": (r"generated 400 .* samples/s", "--out", False),
    "rank_balance.py": (r"world 32: +interleaved \d\.\d{3} .* balanced \d\.\d{3}", None, False),
    "logits_memory.py": (r"peak memory plain / zerovl: \d+\.\dx, step time zerovl / plain: \d+\.\d{3}", None, False),
    "feature_cache.py": (r"feature cache / pixels \(ratio of medians\): \d+\.\d{3}", "--work", True),
    "multinode_loopback.py": (r"2 nodes / 1 node \(ratio of medians\): \d+\.\d{3}", "--work", True),
    "skewed_vs_hf_trainer.py": (r"zerovl vs the better Trainer setting \(hf_\w+\): \d+\.\d\dx faster per epoch",
                                "--work", True),
    "eval_throughput.py": (r"batched / one-at-a-time samples/s \(ratio of medians\): \d+\.\d\dx", "--work", True),
    "serve_concurrency.py": (r"16 clients / 1 client requests/s \(ratio of medians\): \d+\.\d\dx", "--work", True),
}
# four fresh torchrun launches (one per contender, each rank's peak memory its own) take about 2 min here
TIMEOUT_S = {"skewed_vs_hf_trainer.py": 600}


def test_every_benchmark_script_has_a_smoke_test():
    scripts = {p.name for p in (REPO / "benchmarks").glob("*.py") if not p.name.startswith("_")}
    assert scripts == set(SCRIPTS)


@pytest.mark.parametrize("script", [
    pytest.param(name, marks=[pytest.mark.distributed] if ranks else []) for name, (*_, ranks) in SCRIPTS.items()])
def test_benchmark_smoke(script, tmp_path):
    ratio, option, _ = SCRIPTS[script]
    scratch = [option, str(tmp_path)] if option else []
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--smoke", *scratch],
                          capture_output=True, text=True, timeout=TIMEOUT_S.get(script, 300), cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert any(re.search(ratio, line) for line in output.splitlines()), output[-4000:]
    assert "the figures are not results" in proc.stdout
