"""``zerovl bench`` on 2 CPU ranks: real DeepSpeed runs per ZeRO stage, and ZeRO's promise checked
from the runs' own telemetry — each rank of ZeRO-1/2/3 holds half of ZeRO-0's optimizer state."""

import json
import subprocess
import sys

import pytest

from tests.conftest import tiny_config, write_config
from tests.distributed.helpers import REPO

pytestmark = pytest.mark.distributed


def test_bench_zero_stages_split_optimizer_state(tmp_path, scenes):
    cfg = write_config(tiny_config(scenes, tmp_path / "unused"), tmp_path / "cfg.yaml")
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "zerovl", "bench", str(cfg), "--stages", "zero0,zero1,zero2,zero3",
                           "--steps", "2", "--nproc", "2", "--out", str(out), "train.micro_batch_size=2"],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    bench = json.loads((out / "bench.json").read_text())
    rows = {r["stage"]: r for r in bench["results"]}
    assert list(rows) == ["zero0", "zero1", "zero2", "zero3"]
    for stage, row in rows.items():
        assert row["status"] == "ok", (stage, row.get("error"))
        assert row["steps"] == 2 and row["samples_per_s"] > 0 and row["tokens_per_s"] > row["samples_per_s"]
        assert "optimizer_state_bytes" in row and row["optimizer_state_bytes"] is not None, \
            "train.py's metrics lack optimizer_state_bytes"
        assert len(row["peak_mem_bytes"]) == 2 and min(row["peak_mem_bytes"]) > 0
        assert not (out / stage / "checkpoints").exists()  # bench removes the final checkpoint
    zero0 = rows["zero0"]["optimizer_state_bytes"]
    assert zero0[0] == zero0[1] > 0  # replicated
    # the planner predicted ZeRO-0's figure from the config alone (Adam: 8 B per trainable parameter)
    assert zero0[0] == pytest.approx(rows["zero0"]["planned_optimizer_state_bytes"], rel=0.01)
    for stage in ("zero1", "zero2", "zero3"):
        for rank, held in enumerate(rows[stage]["optimizer_state_bytes"]):
            assert held == pytest.approx(zero0[rank] / 2, rel=0.05), (stage, rank, held, zero0)
    for stage, row in rows.items():  # the planner's per-rank parameters match what each rank held
        assert row["param_bytes"][0] == pytest.approx(row["planned"]["params"], rel=0.05), stage
    assert (out / "bench.md").read_text().count("| ok |") == 4
    assert (out / "bench.png").stat().st_size > 10_000


def test_bench_whose_stages_all_fail_says_why_and_writes_no_results(tmp_path, scenes):
    cfg = write_config(tiny_config(scenes, tmp_path / "unused", data={"train": str(tmp_path / "gone.jsonl")}),
                       tmp_path / "cfg.yaml")
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "zerovl", "bench", str(cfg), "--stages", "zero0", "--steps", "2",
                           "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    stage_line = next(line for line in proc.stdout.splitlines() if line.startswith("[bench] zero0 failed: "))
    assert stage_line.startswith("[bench] zero0 failed: zerovl: error: ") and "gone.jsonl" in stage_line
    assert "To enable traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("zerovl: error: bench: every stage failed (zero0)")
    assert not any(out.glob("bench.*"))
