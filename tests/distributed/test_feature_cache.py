"""Real 2-rank runs with and without data.feature_cache give the same losses, on ZeRO-3 for a
MiniGPT4Qwen-shaped model (frozen vision + frozen Q-Former, projection trained, LLM LoRA) and on ZeRO-2 for a
frozen-vision MLP model, on batches where one rank is text-only while the other has images."""

import pytest

from tests.conftest import tiny_config, write_config
from tests.distributed.helpers import check, metrics, run

pytestmark = pytest.mark.distributed

CONNECTORS = {
    "minigpt4qwen": {"type": "qformer", "mode": "projection", "num_query_tokens": 4,
                     "qformer": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                 "intermediate_size": 64}},
    "mlp": {"type": "mlp", "mode": "full"},
}


# ZeRO-3 with every parameter partitioned (tiny ones too): the frozen weights' hash and the Q-Former's
# query tokens must be gathered, and the frozen modules fetched through DeepSpeed's hooks
PRESETS = {"zero2": "zero2", "zero3": {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}}


def _config(tmp_path, scenes, mixed_data, preset, connector, feature_cache=None):
    preset = PRESETS[preset]
    cfg = tiny_config(scenes, tmp_path / "run", deepspeed=preset, train={"max_steps": 4, "save_every": 0},
                      data={"train": str(mixed_data), "shuffle": False, "feature_cache": feature_cache})
    cfg["model"]["vision"]["mode"] = "frozen"
    cfg["model"]["connector"] = dict(CONNECTORS[connector])
    cfg["model"]["llm"]["mode"] = "lora" if connector == "minigpt4qwen" else "full"
    return write_config(cfg, tmp_path / "cfg.yaml")


# two of the four pairs, each connector once and each stage once (the suite's time budget): the Q-Former
# pair under ZeRO-3 is the hard one (gathered hashes and queries), the MLP pair under ZeRO-2 the common one
@pytest.mark.parametrize("connector, preset", [("minigpt4qwen", "zero3"), ("mlp", "zero2")])
def test_same_losses_with_and_without_the_feature_cache(tmp_path, scenes, mixed_data, preset, connector):
    (tmp_path / "pixels").mkdir()
    (tmp_path / "cached").mkdir()
    plain = _config(tmp_path / "pixels", scenes, mixed_data, preset, connector)
    check(run(["train", str(plain)], timeout=300))
    cache = tmp_path / "features"
    cached = _config(tmp_path / "cached", scenes, mixed_data, preset, connector, str(cache))
    out = check(run(["train", str(cached)], timeout=300))
    assert "computing 1 of 1 shards of frozen features" in out
    reference, _ = metrics(tmp_path / "pixels" / "run")
    got, _ = metrics(tmp_path / "cached" / "run")
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for ref, row in zip(reference, got):  # fp32; measured: identical
        assert row["loss"] == pytest.approx(ref["loss"], rel=1e-6, abs=0)
        assert row["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
    # a second run finds the cache complete and computes nothing
    out = check(run(["train", str(cached), "train.resume=none", f"train.output_dir={tmp_path / 'again'}"], timeout=300))
    assert "shards of frozen features" not in out
    again, _ = metrics(tmp_path / "again")
    assert [r["loss"] for r in again] == [r["loss"] for r in got]


def test_cache_from_data_prepare_is_used_by_training_as_it_is(tmp_path, scenes, mixed_data):
    (tmp_path / "pixels").mkdir()
    (tmp_path / "cached").mkdir()
    check(run(["train", str(_config(tmp_path / "pixels", scenes, mixed_data, "zero2", "minigpt4qwen"))], timeout=300))
    cached = _config(tmp_path / "cached", scenes, mixed_data, "zero2", "minigpt4qwen", str(tmp_path / "features"))
    out = check(run(["data", "prepare", str(cached)], nproc=1, timeout=300))  # one process, no DeepSpeed engine
    assert "prepared frozen features of" in out and "(0 already complete)" in out
    out = check(run(["train", str(cached)], timeout=300))  # same fingerprint: nothing is computed again
    assert "shards of frozen features" not in out
    reference, _ = metrics(tmp_path / "pixels" / "run")
    got, _ = metrics(tmp_path / "cached" / "run")
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in reference], rel=1e-6, abs=0)
