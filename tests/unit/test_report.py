"""``zerovl report``: curves from a metrics.jsonl written here (no training), and the bench table."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from PIL import Image

from zerovl.cli import main
from zerovl.errors import ZeroVLError
from zerovl.recipes.bench import format_table, stage_option, summarize, train_command
from zerovl.recipes.report import load_run, report


def _train(step, loss, **extra):
    return {"time": 1.0 + step, "split": "train", "step": step, "epoch": 0, "consumed": 4 * step, "loss": loss,
            "lr": 1e-3 * min(1, step / 3), "grad_norm": 1.0, "samples_per_s": 10.0 + step,
            "tokens_per_s": 500.0 + step, "skipped_samples": 0, **extra}


def _telemetry(step):
    return {"peak_mem_bytes": [2**30 + step * 2**20, 2**30 + 2 * step * 2**20],
            "optimizer_state_bytes": [4096, 4096], "time_data": 0.01, "time_forward": 0.1,
            "time_backward": 0.2, "time_step": 0.05, "time_total": 0.37, "data_wait_frac": 0.03}


def _write(path, records):
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _is_real_plot(path):
    image = np.asarray(Image.open(path).convert("L"), dtype=float)
    return image.shape[0] > 200 and image.shape[1] > 300 and image.std() > 5  # not blank


@pytest.fixture
def run_dir(tmp_path):
    records = [_train(s, 3.0 - 0.2 * s, **_telemetry(s)) for s in range(1, 7)]
    records.insert(4, {"time": 4.5, "event": "checkpoint", "step": 4, "bytes": 12345, "trainable_only": False})
    records.insert(4, {"time": 4.2, "split": "val", "step": 4, "loss": 2.5, "exact_match": 0.4})
    # a resume from step 4 logs steps 5 and 6 again: those lines win
    records += [_train(s, 1.0 - 0.1 * s, **_telemetry(s)) for s in (5, 6)]
    records.append({"time": 9.0, "split": "val", "step": 6, "loss": 1.9, "exact_match": 0.6})
    return _write(tmp_path / "run", records)


def test_load_run_keeps_the_latest_line_per_step(run_dir):
    train, val = load_run(run_dir)
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert train[4]["loss"] == pytest.approx(0.5) and train[5]["loss"] == pytest.approx(0.4)
    assert [(r["step"], r["loss"]) for r in val] == [(4, 2.5), (6, 1.9)]


def test_report_writes_every_curve(run_dir, tmp_path, capsys):
    assert main(["report", str(run_dir)]) == 0
    names = {"loss.png", "lr.png", "throughput.png", "memory.png", "time.png"}
    assert {p.name for p in run_dir.glob("*.png")} == names
    assert all(_is_real_plot(run_dir / n) for n in names)
    assert capsys.readouterr().out.count("wrote ") == len(names)
    out = report(run_dir, tmp_path / "elsewhere")  # --out
    assert sorted(p.name for p in out) == sorted(names) and all(p.parent == tmp_path / "elsewhere" for p in out)


def test_report_without_telemetry_or_val_skips_those_plots(tmp_path):
    run = _write(tmp_path / "old", [_train(s, 2.0 / s) for s in range(1, 4)])
    assert {p.name for p in report(run)} == {"loss.png", "lr.png", "throughput.png"}


def test_report_errors_are_one_line(tmp_path, monkeypatch, run_dir):
    with pytest.raises(ZeroVLError, match="metrics.jsonl not found; give a run directory"):
        report(tmp_path / "nothing")
    only_events = _write(tmp_path / "empty", [{"event": "checkpoint", "step": 1, "bytes": 1}])
    with pytest.raises(ZeroVLError, match="no train records yet"):
        report(only_events)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(ZeroVLError, match=r"pip install zerovl\[plot\]"):
        report(run_dir)


def test_bench_summary_and_table():
    records = [_train(s, 1.0, **_telemetry(s)) for s in range(1, 5)]
    records[0]["samples_per_s"] = 0.5  # warm-up step: left out of the medians
    summary = summarize(records)
    assert summary["steps"] == 4 and summary["samples_per_s"] == pytest.approx(13.0)
    assert summary["peak_mem_bytes"] == [2**30 + 4 * 2**20, 2**30 + 8 * 2**20]
    assert summary["optimizer_state_bytes"] == [4096, 4096] and summary["time_backward"] == pytest.approx(0.2)
    table = format_table([{"stage": "zero2", "status": "ok", **summary, "planned_optimizer_state_bytes": 4000},
                          {"stage": "zero3", "status": "failed (exit 1)", "steps": 0}])
    assert "| zero2 | ok | 13.00 | 503 |" in table and "4.0 KiB / 4.0 KiB" in table
    assert "| zero3 | failed (exit 1) | n/a |" in table


def test_bench_command_selects_the_option_last():
    cmd = train_command("cfg.yaml", "zero3_offload_opt", 3, 2, "/tmp/out/x", ["deepspeed=zero0", "train.lr=1"])
    assert cmd[cmd.index("train") + 1:cmd.index("train") + 4] == ["cfg.yaml", "deepspeed=zero0", "train.lr=1"]
    ds = next(a for a in cmd if a.startswith("deepspeed={"))
    assert cmd.index(ds) > cmd.index("deepspeed=zero0")  # bench's choice wins over the user's
    from zerovl.config import parse_override

    assert parse_override(ds)[1] == {"zero_optimization": {"stage": 3, "offload_optimizer": {
        "device": "cpu", "pin_memory": True}}}
    assert "train.resume=none" in cmd and "train.save_every=0" in cmd and "train.max_steps=3" in cmd
    with pytest.raises(ZeroVLError, match="did you mean zero2"):
        stage_option("zer2")
