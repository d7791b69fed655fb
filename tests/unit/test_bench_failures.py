"""``zerovl bench`` never reports a failure as a result (the launches are faked: no torchrun here),
and configs pointing at demo data that was never generated say to run ``zerovl demo`` first."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, tiny_config, write_config
from zerovl.config import load_config
from zerovl.engine.launch import Launch
from zerovl.errors import ConfigError, ZeroVLError
from zerovl.recipes import bench
from zerovl.recipes.demo import require_demo_data


@pytest.fixture
def cfg_path(tmp_path, scenes):
    return write_config(tiny_config(scenes, tmp_path / "unused"), tmp_path / "cfg.yaml")


def fake_launcher(failing: set[str], steps: int = 2):
    """run_ranks stand-in: a stage in ``failing`` dies with a rank's error line; the others write
    the telemetry a real 2-rank run writes."""
    def run_ranks(cmd, log_path, timeout=None, **_):
        run_dir = log_path.parent
        run_dir.mkdir(parents=True, exist_ok=True)
        stage = run_dir.name
        log_path.write_text("torchrun boilerplate\n")
        if stage in failing:
            return Launch(1, 0.5, log_path, error=f"zerovl: error: [rank 1] {stage} broke", rank_exit_code=1)
        records = [{"event": "model_loaded", "step": 0, "param_bytes_per_rank": [4000, 4000]}]
        records += [{"split": "train", "step": s, "loss": 1.0, "samples_per_s": 10.0, "tokens_per_s": 500.0,
                     "time_total": 0.1, "peak_mem_bytes": [2**20, 2**20], "optimizer_state_bytes": [800, 800]}
                    for s in range(1, steps + 1)]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return Launch(0, 0.5, log_path)
    return run_ranks


def test_some_stages_failed_are_marked_and_the_run_fails(cfg_path, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "run_ranks", fake_launcher({"zero3"}))
    out = tmp_path / "bench"
    with pytest.raises(ZeroVLError, match=r"1 of 2 stages failed \(zero3\)"):
        bench.run_bench(str(cfg_path), ["zero0", "zero3"], steps=2, out=str(out))
    printed = capsys.readouterr().out
    assert "[bench] zero3 failed: zerovl: error: [rank 1] zero3 broke" in printed
    rows = {r["stage"]: r for r in json.loads((out / "bench.json").read_text())["results"]}
    assert rows["zero0"]["status"] == "ok" and rows["zero3"]["status"] == "failed (exit 1)"
    assert rows["zero3"]["error"] == "zerovl: error: [rank 1] zero3 broke"
    planned = rows["zero0"]["planned"]
    assert planned["optimizer_state"] == rows["zero0"]["planned_optimizer_state_bytes"] > 0
    assert planned["model_states"] > planned["params"] > 0
    assert rows["zero3"]["planned"]["params"] < planned["params"]  # ZeRO-3 splits the parameters
    md = (out / "bench.md").read_text()
    assert "| zero3 | failed (exit 1) |" in md and "- zero3: zerovl: error: [rank 1] zero3 broke" in md
    assert (out / "bench.png").stat().st_size > 10_000


def test_every_stage_failed_writes_no_results(cfg_path, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "run_ranks", fake_launcher({"zero0", "zero2"}))
    out = tmp_path / "bench"
    with pytest.raises(ZeroVLError, match="every stage failed"):
        bench.run_bench(str(cfg_path), ["zero0", "zero2"], steps=2, out=str(out))
    assert not any(out.glob("bench.*"))


def test_a_stage_short_of_its_steps_is_not_a_result(cfg_path, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "run_ranks", fake_launcher(set(), steps=1))
    with pytest.raises(ZeroVLError, match="every stage failed"):
        bench.run_bench(str(cfg_path), ["zero1"], steps=2, out=str(tmp_path / "bench"))


def test_demo_config_before_the_demo_says_run_zerovl_demo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # configs/demo.yaml's paths are relative: runs/demo/data/...
    cfg = load_config(REPO / "configs" / "demo.yaml")
    with pytest.raises(ConfigError) as err:
        require_demo_data(cfg)
    message = str(err.value)
    assert message.startswith("model.tokenizer, data.train and data.val point at the demo's generated data in "
                              f"{tmp_path}/runs/demo/data, which does not exist yet: run `zerovl demo` first")
    assert "model.tokenizer=... data.train=... data.val=null" in message
    require_demo_data(load_config(REPO / "configs" / "demo.yaml", ["model.tokenizer=/own/tok", "data.train=/own/t.jsonl",
                                                                   "data.val=null"]))  # not demo data: no opinion


def test_train_and_bench_stop_early_on_missing_demo_data(tmp_path):
    for command in (["train"], ["bench", "--stages", "zero0,zero1"]):
        proc = subprocess.run([sys.executable, "-m", "zerovl", *command, str(REPO / "configs" / "demo.yaml")],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("zerovl: error: model.tokenizer")
        assert "run `zerovl demo` first" in proc.stderr
        assert not (tmp_path / "runs").exists()  # nothing launched, nothing written
