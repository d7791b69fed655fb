"""The planner on retrieval models (model.retrieval, BLIP-2 stage 1): parameter counts from the config
alone (meta device) against the built model, the activation estimate against what autograd keeps, its
response to micro batch, vision mode, ITG and world size, `zerovl plan` on a retrieval config, and the GPU
recipe's recorded recommendation against the planner."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from zerovl.config import ModelSettings, from_dict, load_config
from zerovl.data.demo_scenes import build_wordpiece_tokenizer
from zerovl.engine import planner
from zerovl.engine.ds_config import model_hidden_size
from zerovl.engine.planner import OPTIONS_BY_NAME, Hardware, parse_size
from zerovl.errors import ConfigError
from zerovl.models.builder import build_model, named_parts
from zerovl.recipes.plan import format_plan, plan_config, recommendation

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "blip2_retrieval.yaml"
TINY = {"vision_config": {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 1, "num_attention_heads": 2},
        "qformer_config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                           "intermediate_size": 64, "vocab_size": 64, "encoder_hidden_size": 32,
                           "cross_attention_frequency": 1, "max_position_embeddings": 64},
        "num_query_tokens": 4, "image_text_hidden_size": 16}
# wider, two cross-attention layers out of four, dropout off: activations big enough to weigh
WIDER = {"vision_config": {"image_size": 64, "patch_size": 8, "hidden_size": 64, "intermediate_size": 256,
                           "num_hidden_layers": 2, "num_attention_heads": 2},
         "qformer_config": {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 2,
                            "intermediate_size": 256, "vocab_size": 512, "encoder_hidden_size": 64,
                            "cross_attention_frequency": 2, "max_position_embeddings": 64,
                            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
         "num_query_tokens": 8, "image_text_hidden_size": 32}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    words = ["a", "red", "blue", "circle", "square", "on", "the", "left"]
    return build_wordpiece_tokenizer(tmp_path_factory.mktemp("bert") / "tokenizer", words)


def _settings(tokenizer, config=TINY, retrieval=None, **parts) -> ModelSettings:
    return ModelSettings.model_validate({"retrieval": {"config": config, **(retrieval or {})},
                                         "tokenizer": str(tokenizer), **parts})


def _real_counts(model) -> dict[str, tuple[int, int]]:
    return {name: (sum(p.numel() for _, p in named if p.requires_grad),
                   sum(p.numel() for _, p in named if not p.requires_grad))
            for name, named in named_parts(model).items()}


def _counts(shape) -> dict[str, tuple[int, int]]:
    return {k: (v.trainable, v.frozen) for k, v in shape.parts.items()}


# ---- counting ---------------------------------------------------------------------------------

@pytest.mark.parametrize("parts, retrieval", [
    ({}, None),  # no model.vision: the tower is frozen (BLIP-2 stage 1)
    ({"vision": {"mode": "full"}}, None),
    ({"vision": {"mode": "lora"}, "connector": {"mode": "frozen"}}, None),
    ({"connector": {"mode": "lora"}}, None),
    ({"vision": {"mode": "full"}}, {"itg_weight": 1.0}),  # the ITG head is part of the connector
])
def test_meta_counts_match_the_built_model(tokenizer, parts, retrieval):
    settings = _settings(tokenizer, retrieval=retrieval, **parts)
    shape = planner.count_model(settings)
    built = build_model(settings, "fp32").model
    assert _counts(shape) == _real_counts(built)
    assert shape.total == sum(p.numel() for p in built.parameters())
    assert shape.largest_layer == planner.largest_layer_params(built)
    assert shape.retrieval is not None and shape.llm.hidden == 32 and shape.vocab == 64
    assert shape.vision_tokens == (32 // 8) ** 2 + 1 and shape.tokens_per_image == 4


def test_vision_mode_moves_the_tower_between_frozen_and_trainable(tokenizer):
    absent = planner.count_model(_settings(tokenizer))
    frozen = planner.count_model(_settings(tokenizer, vision={"mode": "frozen"}))
    full = planner.count_model(_settings(tokenizer, vision={"mode": "full"}))
    tower = sum(p.numel() for p in build_model(_settings(tokenizer), "fp32").model.hf.vision_model.parameters())
    assert _counts(absent) == _counts(frozen)
    assert frozen.parts["vision"] == planner.PartParams(0, tower) and full.parts["vision"] == planner.PartParams(tower, 0)
    assert frozen.parts["connector"] == full.parts["connector"] and frozen.parts["connector"].frozen == 0
    assert full.trainable - frozen.trainable == tower and full.total == frozen.total
    assert not frozen.vision_trainable and full.vision_trainable


def test_a_tokenizer_larger_than_the_qformer_vocabulary_is_refused_as_training_would(tokenizer):
    small = {**TINY, "qformer_config": {**TINY["qformer_config"], "vocab_size": 8}}
    with pytest.raises(ConfigError, match="Q-Former's vocabulary has 8"):
        planner.count_model(_settings(tokenizer, config=small))


# ---- activations ------------------------------------------------------------------------------

@pytest.mark.parametrize("precision, vision, itg", [("fp32", "frozen", 0.0), ("bf16", "full", 0.0),
                                                    ("bf16", "frozen", 1.0), ("fp32", "full", 1.0)])
def test_activation_estimate_matches_what_autograd_saves(tokenizer, precision, vision, itg):
    """Sum the bytes of every tensor autograd saves for backward in one training forward (ITC, ITM and,
    when on, ITG; one process, so no gathered copies) and compare with the first-order estimate, without
    what exists only at the start of backward (ITG's V-wide gradients)."""
    settings = _settings(tokenizer, config=WIDER, retrieval={"itg_weight": itg}, vision={"mode": vision})
    shape = planner.count_model(settings)
    model = build_model(settings, precision).model.train()
    batch, text = 4, 24
    ids = torch.randint(5, 12, (batch, text))
    ids[:, 0] = 2  # [CLS]
    params = {p.data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        if t.data_ptr() not in params:
            storage = t.untyped_storage()
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(pixel_values=torch.randn(batch, 3, 64, 64), input_ids=ids, attention_mask=torch.ones_like(ids),
              image_ids=torch.arange(batch))
    estimate = planner.activation_breakdown(shape, text, precision)
    assert (estimate["vision"] > 0) == (vision == "full") and (estimate["qformer_itg"] > 0) == (itg > 0)
    expected = batch * (sum(estimate.values()) - estimate["loss_backward"])
    measured = sum(saved.values())
    print(f"retrieval activations {precision} vision={vision} itg={itg}: measured {measured} estimated "
          f"{expected} ratio {expected / measured:.3f}")
    assert measured == pytest.approx(expected, rel=0.10), (measured, expected, estimate)


def test_activations_grow_with_micro_batch_and_with_the_vision_tower_training(tokenizer):
    frozen = planner.count_model(_settings(tokenizer, config=WIDER))
    full = planner.count_model(_settings(tokenizer, config=WIDER, vision={"mode": "full"}))
    ckpt = planner.count_model(_settings(tokenizer, config=WIDER, vision={"mode": "full",
                                                                          "gradient_checkpointing": True}))
    itg = planner.count_model(_settings(tokenizer, config=WIDER, retrieval={"itg_weight": 1.0}))
    hw = Hardware(2, parse_size("80GB"))

    def activations(shape, micro_batch):
        est = planner.estimate(shape, OPTIONS_BY_NAME["zero2"], hw, "bf16", micro_batch, 16)
        assert est.activation_fixed == 0  # no LM loss workspace: there is no LM
        return est.gpu["activations"]

    for shape in (frozen, full, ckpt, itg):
        one = activations(shape, 1)
        assert one > 0 and activations(shape, 2) == 2 * one and activations(shape, 8) == 8 * one
    tower = planner.activation_breakdown(full, 16, "bf16")["vision"]
    assert tower > 0 and planner.activation_breakdown(frozen, 16, "bf16")["vision"] == 0
    assert activations(full, 4) - activations(frozen, 4) == 4 * tower
    assert 0 < planner.activation_breakdown(ckpt, 16, "bf16")["vision"] < tower
    # ITG: one more Q-Former pass and a vocabulary-wide head; nothing of it when off
    on, off = planner.activation_breakdown(itg, 16, "bf16"), planner.activation_breakdown(frozen, 16, "bf16")
    assert off["qformer_itg"] == off["itg_head"] == off["loss_backward"] == 0
    assert on["itg_head"] >= 15 * 4 * 512 and on["loss_backward"] == 15 * 8 * 512
    # longer captions cost more; ITM's gathered features grow with the world size
    assert sum(planner.activation_breakdown(frozen, 32, "bf16").values()) > sum(off.values())
    features = frozen.vision_tokens * 64 * 2
    eight = planner.activation_breakdown(frozen, 16, "bf16", world=8)["image_features"]
    assert eight - off["image_features"] == 8 * features


# ---- the plan ---------------------------------------------------------------------------------

def _config(tokenizer, tmp_path, **model):
    return from_dict({"model": {"retrieval": {"config": TINY, "max_text_length": 12}, "tokenizer": str(tokenizer),
                                **model},
                      "data": {"train": str(tmp_path / "train.json"), "max_length": 2048},
                      "train": {"precision": "bf16", "micro_batch_size": 8}, "deepspeed": "zero2"})


def test_plan_of_a_retrieval_config_reads_the_caption_length(tokenizer, tmp_path):
    cfg = _config(tokenizer, tmp_path, vision={"mode": "full"})
    result = plan_config(cfg, Hardware(8, parse_size("80GB")))
    assert result.seq_len == 12  # model.retrieval.max_text_length, not data.max_length
    assert list(result.shape.parts) == ["vision", "connector"]
    assert result.recommended is not None and result.recommended.option.name == "zero0"
    text = format_plan(result)
    assert "micro batch 8 image-caption pairs, captions of 12 tokens (T), 17 vision tokens and 4 queries" in text
    assert "Q-Former (2 layers, 2 cross-attending, hidden 32) passes per pair: image (Q), text (T), ITM 3 x (Q+T), " \
           "no ITG" in text
    assert re.search(r"^activations per sample: .*qformer itm", text, re.M)
    assert "LM loss" not in text  # no chunked-loss workspace line
    assert model_hidden_size(cfg.model) == 32  # DeepSpeed's "auto" widths follow the Q-Former


def test_the_gpu_recipe_validates_and_records_the_planners_recommendation(tmp_path):
    """configs/blip2_retrieval.yaml validates (its model directory need not exist), and the plan its comments
    record — the same sizes as an inline config, 8 x 80 GB — is what the planner says today."""
    cfg = load_config(RECIPE, environ={})
    assert cfg.model.retrieval.path is not None and cfg.model.vision.mode == "full"
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.schedule, cfg.train.micro_batch_size,
            cfg.train.epochs, cfg.train.precision) == (1e-5, 0.05, "cosine", 16, 5, "bf16")
    assert [(t.task, t.split, t.rerank_k) for t in cfg.eval.tasks] == [("retrieval", "test", 128)]
    text = RECIPE.read_text()
    inline = re.search(r"'model\.retrieval\.config=(\{.*?\})'", text, re.S).group(1)
    inline = json.loads(" ".join(line.lstrip("# ") for line in inline.splitlines()))
    recorded = re.search(r"^#\s+recommendation: (.*)$", text, re.M).group(1)
    tokenizer = build_wordpiece_tokenizer(tmp_path / "bert", ["a", "photo"])
    sized = load_config(RECIPE, ["model.retrieval.path=null", f"model.retrieval.config={json.dumps(inline)}",
                                 f"model.tokenizer={tokenizer}"], environ={})
    result = plan_config(sized, Hardware(8, parse_size("80GB")))
    assert recommendation(result, sized.train.gradient_accumulation_steps) == recorded
    assert cfg.deepspeed == result.recommended.option.name
    shape = result.shape
    assert shape.vision_tokens == 677 and result.seq_len == 32
    assert round(shape.parts["vision"].trainable / 1e6) == 987 and round(shape.total / 1e7) == 117  # 1.17B
