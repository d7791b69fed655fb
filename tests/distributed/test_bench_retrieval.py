"""``zerovl bench`` on a retrieval model (model.retrieval, BLIP-2 stage 1) on 2 CPU ranks: both stages train,
and the planner's per-rank figures, from the config alone, match what each rank held."""

import json
import subprocess
import sys

import pytest

from tests.conftest import write_config
from tests.distributed.helpers import REPO
from tests.distributed.test_retrieval import TINY  # the tiny model the retrieval tests train

pytestmark = pytest.mark.distributed


def test_bench_retrieval_zero0_and_zero3(tmp_path):
    from zerovl.data.demo_scenes import generate_pairs

    pairs = generate_pairs(tmp_path / "pairs", num_train_images=40, num_val_images=8, image_size=32)
    cfg = {"model": {"retrieval": {"config": TINY, "max_text_length": 16}, "vision": {"mode": "full"},
                     "tokenizer": str(pairs["tokenizer"])},
           "data": {"train": str(pairs["train"]), "val": str(pairs["val"]), "num_workers": 0},
           "train": {"output_dir": str(tmp_path / "unused"), "micro_batch_size": 4, "lr": 1e-3, "precision": "fp32"},
           "deepspeed": "zero2"}
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "zerovl", "bench", str(write_config(cfg, tmp_path / "cfg.yaml")),
                           "--stages", "zero0,zero3", "--steps", "2", "--nproc", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    bench = json.loads((out / "bench.json").read_text())
    rows = {r["stage"]: r for r in bench["results"]}
    assert list(rows) == ["zero0", "zero3"]
    for stage, row in rows.items():
        assert row["status"] == "ok", (stage, row.get("error"))
        assert row["steps"] == 2 and row["samples_per_s"] > 0 and row["final_loss"] > 0
        assert len(row["peak_mem_bytes"]) == 2 and min(row["peak_mem_bytes"]) > 0
        # the planner (meta-device retrieval model) predicted what each rank held
        for held in row["param_bytes"]:
            assert held == pytest.approx(row["planned"]["params"], rel=0.05), stage
        for held in row["optimizer_state_bytes"]:
            assert held == pytest.approx(row["planned"]["optimizer_state"], rel=0.05), stage
    assert rows["zero3"]["planned"]["params"] == pytest.approx(rows["zero0"]["planned"]["params"] / 2, rel=0.01)
    assert bench["trainable_params"] == bench["total_params"] > 0  # vision full, connector full
    assert (out / "bench.md").read_text().count("| ok |") == 2
