"""Real architectures through the same from_pretrained paths users use: tiny random-init BLIP-2, CLIP,
SigLIP and Qwen2 checkpoints saved to temporary directories, loaded by zerovl and trained on 2 ranks.
Mixed modality under ZeRO-3 (one rank text-only, the other with images) must complete."""

import json

import pytest
import torch

from tests.conftest import TINY_LLM, write_config
from tests.distributed.helpers import check, metrics, run
from zerovl.engine.checkpoint import consolidated_state_dict, find_resume

pytestmark = pytest.mark.distributed

VISION = dict(image_size=32, patch_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=2)
QFORMER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, scenes):
    """Local HF directories, as a user would have them on disk."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        Blip2Config,
        Blip2ForConditionalGeneration,
        CLIPVisionConfig,
        CLIPVisionModel,
    )

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_LLM))
    llm.save_pretrained(root / "qwen2")
    AutoTokenizer.from_pretrained(scenes["tokenizer"]).save_pretrained(root / "qwen2")
    CLIPVisionModel(CLIPVisionConfig(**VISION)).save_pretrained(root / "clip")
    blip2 = Blip2Config(vision_config=VISION, qformer_config=QFORMER, num_query_tokens=4,
                        text_config={"model_type": "opt", "vocab_size": 64, "hidden_size": 16,
                                     "num_hidden_layers": 1, "num_attention_heads": 2, "ffn_dim": 32,
                                     "word_embed_proj_dim": 16})
    Blip2ForConditionalGeneration(blip2).save_pretrained(root / "blip2")
    return root


def _config(tmp_path, scenes, data, model, preset="zero3", **train):
    cfg = {
        "model": {**model, "llm": {"path": str(data["hf"] / "qwen2"), "mode": "full", **model.get("llm", {})}},
        "data": {"train": str(data["train"]), "max_length": 64, "num_workers": 0, "shuffle": False},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 4, "micro_batch_size": 2, "lr": 1e-3,
                  "precision": "fp32", "save_every": 0, **train},
        "deepspeed": preset,
    }
    return write_config(cfg, tmp_path / "cfg.yaml")


def test_minigpt4qwen_blip2_qformer_projection_only(tmp_path, scenes, mixed_data, checkpoints):
    """BLIP-2 ViT + Q-Former + queries from a Blip2ForConditionalGeneration directory, a linear projection
    into Qwen2; only the projection trains. ZeRO-3, rank 0 text-only and rank 1 images at first."""
    blip2 = str(checkpoints / "blip2")
    model = {"vision": {"path": blip2, "mode": "frozen"},
             "connector": {"type": "qformer", "path": blip2, "mode": "projection"},
             "llm": {"mode": "frozen"}}
    cfg = _config(tmp_path, scenes, {"hf": checkpoints, "train": mixed_data}, model)
    out = check(run(["train", str(cfg)], timeout=400))
    assert "0.00M trainable" in out or "trainable parameters only" in out
    steps, _ = metrics(tmp_path / "run")
    assert len(steps) == 4 and all(r["loss"] > 0 for r in steps)
    weights = consolidated_state_dict(find_resume(tmp_path / "run"))
    assert sorted(weights) == ["connector.proj.bias", "connector.proj.weight"]  # trainable-only checkpoint


def test_llava_clip_penultimate_layer(tmp_path, scenes, mixed_data, checkpoints):
    model = {"vision": {"path": str(checkpoints / "clip"), "feature_layer": -2, "mode": "full"},
             "connector": {"type": "mlp"}}
    cfg = _config(tmp_path, scenes, {"hf": checkpoints, "train": mixed_data}, model)
    check(run(["train", str(cfg)], timeout=400))
    weights = consolidated_state_dict(find_resume(tmp_path / "run"))
    layers = {k.split(".layers.")[1].split(".")[0] for k in weights if "vision" in k and ".layers." in k}
    assert layers == {"0"}  # the 2-layer tower was cut after layer 1: feature_layer -2


def test_zero3_builds_partitioned_model(tmp_path, scenes, mixed_data, checkpoints):
    """Right after load, each of 2 ranks holds about half of the parameter bytes."""
    model = {"vision": {"path": str(checkpoints / "clip"), "mode": "frozen"}, "connector": {"type": "mlp"}}
    cfg = _config(tmp_path, scenes, {"hf": checkpoints, "train": mixed_data}, model, max_steps=1)
    check(run(["train", str(cfg)], timeout=300))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    loaded = next(r for r in rows if r.get("event") == "model_loaded")
    half = loaded["param_bytes_total"] / 2
    for per_rank in loaded["param_bytes_per_rank"]:
        assert abs(per_rank - half) <= 0.05 * half, loaded


def test_text_only_llm_on_8k_token_samples(tmp_path, scenes, checkpoints):
    """The LoRA-on-long-instructions case: no vision tower, 8,192-token samples, gradient checkpointing."""
    words = ["what", "colour", "is", "the", "circle", "?", "red", "blue", "square"]
    lines = []
    for i in range(4):
        text = " ".join(words[(i + k) % len(words)] for k in range(8150))
        lines.append(json.dumps({"messages": [{"role": "user", "content": text},
                                              {"role": "assistant", "content": "red"}]}))
    (tmp_path / "long.jsonl").write_text("\n".join(lines) + "\n")
    llm = dict(TINY_LLM, max_position_embeddings=8192)
    cfg = {
        "model": {"llm": {"config": llm, "mode": "lora", "gradient_checkpointing": True,
                          "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
                  "tokenizer": str(scenes["tokenizer"])},
        "data": {"train": str(tmp_path / "long.jsonl"), "max_length": 8192, "num_workers": 0},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "micro_batch_size": 1,
                  "precision": "fp32", "save_every": 0},
        "deepspeed": "zero2",
    }
    check(run(["train", str(write_config(cfg, tmp_path / "cfg.yaml"))], timeout=400))
    steps, _ = metrics(tmp_path / "run")
    assert len(steps) == 2
    assert all(r["tokens_per_s"] * r["time_total"] >= 2 * 8000 for r in steps)  # 2 ranks x ~8,160 tokens


@pytest.fixture(scope="module")
def qwen2vl_dir(tmp_path_factory, scenes):
    """A tiny random-init Qwen2-VL saved as a local directory with its tokenizer, as downloaded ones are."""
    from transformers import AutoConfig, AutoModelForImageTextToText, PreTrainedTokenizerFast

    from zerovl.models.native import IMAGE_PAD, VISION_END, VISION_START

    tokenizer = PreTrainedTokenizerFast.from_pretrained(scenes["tokenizer"])
    tokenizer.add_tokens([VISION_START, IMAGE_PAD, VISION_END], special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids([VISION_START, IMAGE_PAD, VISION_END])
    config = AutoConfig.for_model(
        "qwen2_vl", text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                     rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, patch_size=14),
        vision_start_token_id=ids[0], image_token_id=ids[1], vision_end_token_id=ids[2], video_token_id=0)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf") / "qwen2vl"
    AutoModelForImageTextToText.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("preset", ["zero3", "zero2"])
def test_native_qwen2vl_mixed_batches(tmp_path, scenes, mixed_data, qwen2vl_dir, preset):
    """Qwen2-VL from a local directory through AutoModelForImageTextToText, dynamic resolution, LoRA on the
    language model, merger trained, vision frozen; rank 0 text-only and rank 1 images at first."""
    cfg = {
        "model": {"native": {"path": str(qwen2vl_dir), "min_pixels": 28 * 28 * 4, "max_pixels": 56 * 56},
                  "vision": {"mode": "frozen"}, "connector": {"mode": "full"},
                  "llm": {"mode": "lora", "lora": {"r": 4, "alpha": 8}}},
        "data": {"train": str(mixed_data), "val": str(mixed_data), "max_length": 96, "num_workers": 0,
                 "shuffle": False},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 4, "micro_batch_size": 2, "lr": 1e-3,
                  "precision": "fp32", "save_every": 0},
        # generation on the same mixed layout: rank 0 text-only, rank 1 images in the first eval batch
        "eval": {"exact_match": True, "batch_size": 2, "max_samples": 8, "max_new_tokens": 3},
        "deepspeed": preset,
    }
    check(run(["train", str(write_config(cfg, tmp_path / "cfg.yaml"))], timeout=400))
    steps, evals = metrics(tmp_path / "run")
    assert len(steps) == 4 and all(r["loss"] > 0 for r in steps)
    assert evals[-1]["exact_match_n"] == 8 and 0 <= evals[-1]["exact_match"] <= 1
    weights = consolidated_state_dict(find_resume(tmp_path / "run"))
    assert any("lora_" in k for k in weights) and any(".merger." in k for k in weights)
    assert not any(".visual.blocks." in k for k in weights)  # frozen vision blocks: trainable-only checkpoint
