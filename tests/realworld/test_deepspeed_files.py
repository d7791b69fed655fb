"""Peers' DeepSpeed files as they are: every file of ../shared/realworld/deepspeed-configs is passed as
``deepspeed=FILE`` to a 2-step, 2-rank CPU run whose train section leaves batch, LR and precision unset.
Each file trains, or stops with one zerovl line naming the key — never a traceback. The training configs of
the peers the issue names (ms-swift, LLaMA-Factory, LLaVA, MiniGPT4Qwen, DeepKE) must train, except where a
file asks for something CPU or zerovl cannot do, which the line must then name.

All files run inside one torchrun launch (tests/realworld/ds_walk.py) to keep the walk to a few minutes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.conftest import TINY_LLM, TINY_VISION
from tests.distributed.helpers import run

REPO = Path(__file__).resolve().parents[2]
FOLDER = REPO.parent / "shared" / "realworld" / "deepspeed-configs"  # absent: conftest.py skips, one line

pytestmark = pytest.mark.distributed

PEERS = ("msswift_zero", "llamafactory_ds_z", "llava_zero", "minigpt4qwen_ds_config_zero", "deepke_")
# peer files that ask for what zerovl cannot do, and the key their one line must name
PEER_REFUSALS = {"llamafactory_ds_z2_autotp_config.json": "tensor_parallel.autotp_size"}


def _table(results: dict) -> str:
    rows = []
    for name, r in results.items():
        if r["outcome"] == "trains":
            what = (f"trains: micro {r['micro_batch_size']} x accum {r['gradient_accumulation_steps']}, "
                    f"{r['precision']}, ZeRO-{r['zero_stage']}, lr {r['lr']:g} {r['schedule']}, {r['seconds']} s")
        else:
            what = f"{r['outcome']}: {r['message']}"
        rows.append(f"{name} -> {what}")
    return "\n".join(rows)


@pytest.fixture(scope="module")
def walk(scenes, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ds-walk")
    files = sorted(str(p) for p in FOLDER.iterdir() if p.is_file())
    spec = {
        "files": files, "runs": str(root / "runs"), "out": str(root / "results.json"),
        "config": {  # train leaves batch, LR and precision to the file
            "model": {"vision": {"config": dict(TINY_VISION), "mode": "full"}, "connector": {"type": "mlp"},
                      "llm": {"config": dict(TINY_LLM), "mode": "full"}, "tokenizer": str(scenes["tokenizer"])},
            "data": {"train": str(scenes["train"]), "max_length": 64, "num_workers": 0},
            "train": {"max_steps": 2, "save_final": False, "log_every": 1},
        },
    }
    (root / "spec.json").write_text(json.dumps(spec))
    proc = run([str(root / "spec.json")], timeout=900, script=str(REPO / "tests" / "realworld" / "ds_walk.py"),
               env={"DS_ACCELERATOR": "cpu"})
    results_path = root / "results.json"
    assert results_path.is_file(), f"exit {proc.returncode}, no results:\n{proc.stdout[-5000:]}"
    results = json.loads(results_path.read_text())
    assert sorted(results) == sorted(Path(f).name for f in files)
    return results


def test_every_file_trains_or_stops_with_one_line(walk):
    table = _table(walk)
    trains = [n for n, r in walk.items() if r["outcome"] == "trains"]
    json_files = [n for n in walk if n.endswith(".json")]
    summary = (f"{len(trains)} of {len(walk)} files train as-is "
               f"({len([n for n in trains if n.endswith('.json')])} of {len(json_files)} JSON files)")
    print(f"\n{table}\n{summary}")
    crashes = {n: r for n, r in walk.items() if r["outcome"] == "crash"}
    assert not crashes, "\n".join(f"{n}: {r['message']}\n{r['traceback']}" for n, r in crashes.items())
    for name, r in walk.items():
        if r["outcome"] == "trains":
            assert r["steps"] == 2 and len(r["losses"]) == 2 and all(map(math.isfinite, r["losses"])), (name, r)
        else:
            assert "\n" not in r["message"] and r["message"], (name, r["message"])


def test_named_peers_training_configs_all_train(walk):
    peers = {n: r for n, r in walk.items() if n.startswith(PEERS)}
    assert len(peers) >= 20, sorted(peers)  # ms-swift 6, LLaMA-Factory 7, LLaVA 3, MiniGPT4Qwen 4, DeepKE 3
    for name, r in peers.items():
        data = json.loads((FOLDER / name).read_text())
        if data.get("fp16", {}).get("enabled") is True:  # hard-coded fp16: impossible on a CPU
            assert r["outcome"] == "error" and "fp16.enabled" in r["message"], (name, r)
        elif name in PEER_REFUSALS:
            assert r["outcome"] == "error" and PEER_REFUSALS[name] in r["message"], (name, r)
        else:
            assert r["outcome"] == "trains", (name, r)


def test_scheduler_blocks_became_zerovl_schedules(walk):
    """DeepKE's WarmupDecayLR and LLaVA's WarmupLR ("auto" everywhere) map onto train.schedule."""
    assert walk["deepke_instructkgc_ds_config_bf16_stage2.json"]["schedule"] == "linear"
    assert walk["deepke_mt5_ds_mt5_z3_config_bf16.json"]["schedule"] == "constant"
    assert walk["llava_zero3_offload.json"]["schedule"] == "constant"
    # MiniGPT4Qwen's numbers are adopted into train: micro batch, LR
    mg = walk["minigpt4qwen_ds_config_zero3.json"]
    assert (mg["micro_batch_size"], mg["lr"], mg["precision"]) == (32, 1e-4, "bf16")
