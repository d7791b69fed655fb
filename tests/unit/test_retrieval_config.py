"""model.retrieval in the config schema: what it combines with, and what it refuses in one line."""

from __future__ import annotations

import pytest

from zerovl.config import from_dict
from zerovl.errors import ConfigError

TINY = {"vision_config": {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "intermediate_size": 64}, "num_query_tokens": 4}


def raw(**model) -> dict:
    return {"model": {"retrieval": {"config": TINY}, "tokenizer": "/tok", **model},
            "data": {"train": "/data/train.json"}}


def test_retrieval_trains_with_per_sample_means_and_frozen_vision_by_default():
    cfg = from_dict(raw())
    assert cfg.train.loss_normalization == "samples"
    assert cfg.model.vision is None and cfg.model.has_vision
    assert cfg.model.tokenizer_path == "/tok"


@pytest.mark.parametrize("change, message", [
    ({"llm": {"config": {"model_type": "qwen2"}}}, "a retrieval model has no LLM"),
    ({"vision": {"config": {"model_type": "siglip_vision_model"}}}, "only sets mode, lr and lora"),
    ({"connector": {"mode": "projection"}}, r"only mode \(frozen, full, lora\)"),
])
def test_parts_of_other_model_kinds_are_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(raw(**change))


def test_token_normalization_and_chat_data_options_are_refused():
    with pytest.raises(ConfigError, match="no supervised tokens; use samples"):
        from_dict({**raw(), "train": {"loss_normalization": "tokens"}})
    with pytest.raises(ConfigError, match="data.packing: not used by model.retrieval"):
        from_dict({**raw(), "data": {"train": "/data/train.json", "packing": True}})


def test_connector_lora_belongs_to_retrieval_and_all_zero_weights_are_refused():
    assert from_dict(raw(connector={"mode": "lora"})).model.connector.mode == "lora"
    composed = {"model": {"llm": {"config": {"model_type": "qwen2"}}, "tokenizer": "/tok",
                          "connector": {"mode": "lora"}}, "data": {"train": "/d.json"}}
    with pytest.raises(ConfigError, match="applies to model.retrieval"):
        from_dict(composed)
    with pytest.raises(ConfigError, match="nothing to train"):
        from_dict({**raw(), "model": {"retrieval": {"config": TINY, "itc_weight": 0, "itm_weight": 0},
                                      "tokenizer": "/tok"}})


def test_unknown_retrieval_key_names_the_nearest():
    with pytest.raises(ConfigError, match="did you mean model.retrieval.itm_weight"):
        from_dict({**raw(), "model": {"retrieval": {"config": TINY, "itm_weigth": 1.0}, "tokenizer": "/tok"}})


def test_the_gpu_recipe_validates():
    from pathlib import Path

    from zerovl.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "blip2_retrieval.yaml", environ={})
    assert cfg.model.retrieval.max_text_length == 32 and cfg.model.vision.mode == "full"
    assert cfg.data.format == "karpathy" and cfg.data.split == "train"
    assert [(t.task, t.split, t.rerank_k) for t in cfg.eval.tasks] == [("retrieval", "test", 128)]
