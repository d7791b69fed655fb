import pytest
import torch
from transformers import (
    AutoConfig,
    AutoTokenizer,
    Blip2VisionConfig,
    Blip2VisionModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from tests.conftest import TINY_LLM, TINY_VISION
from zerovl.config import ConnectorSettings, ModelSettings
from zerovl.errors import ConfigError, DataError
from zerovl.models.builder import build_model
from zerovl.models.connectors import build_connector

VISION_DIRS = {
    "siglip": (SiglipVisionModel, SiglipVisionConfig, 0),
    "clip": (CLIPVisionModel, CLIPVisionConfig, 1),
    "blip2": (Blip2VisionModel, Blip2VisionConfig, 1),
}
SMALL = dict(image_size=32, patch_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
             num_attention_heads=2)


@pytest.mark.parametrize("kind, expected_tokens", [("linear", 4), ("mlp", 4), ("qformer", 5)])
def test_connectors_map_features_to_llm_width(kind, expected_tokens):
    settings = ConnectorSettings(type=kind, num_query_tokens=5,
                                 qformer={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                                          "intermediate_size": 64})
    conn = build_connector(settings, vision_dim=24, llm_dim=40, vision_tokens=4)
    out = conn(torch.randn(3, 4, 24))
    assert out.shape == (3, expected_tokens, 40)
    assert conn.tokens_per_image == expected_tokens
    out.sum().backward()
    assert all(p.grad is not None for p in conn.parameters() if p.requires_grad)


def _settings(scenes, vision, connector="mlp", **llm):
    return ModelSettings.model_validate({
        "vision": vision, "connector": {"type": connector, "num_query_tokens": 3,
                                        "qformer": {"hidden_size": 32, "num_hidden_layers": 1,
                                                    "num_attention_heads": 2, "intermediate_size": 64}},
        "llm": {"config": dict(TINY_LLM), **llm}, "tokenizer": str(scenes["tokenizer"])})


@pytest.mark.parametrize("kind", sorted(VISION_DIRS))
@pytest.mark.parametrize("connector", ["linear", "mlp", "qformer"])
def test_vision_towers_load_from_directory(tmp_path, scenes, kind, connector):
    model_cls, config_cls, has_cls = VISION_DIRS[kind]
    torch.manual_seed(0)
    tower = model_cls(config_cls(**SMALL))
    tower.save_pretrained(tmp_path / kind)
    built = build_model(_settings(scenes, {"path": str(tmp_path / kind)}, connector))
    loaded = built.model.vision.encoder.state_dict()
    for name, p in tower.state_dict().items():
        if name.startswith("head."):  # SigLIP's pooling head is never used by a VLM and is removed
            assert name not in loaded
            continue
        assert torch.equal(p, loaded[name]), name
    patches = (32 // 16) ** 2
    expected = 3 if connector == "qformer" else patches  # LLaVA drops CLS before linear/MLP
    assert built.tokens_per_image == expected
    features = built.model.vision(torch.zeros(2, 3, 32, 32))
    assert features.shape[1] == patches + (has_cls if connector == "qformer" else 0)
    from PIL import Image

    pixels = built.image_processor([Image.new("RGB", (50, 40))])["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)  # resized (and cropped) to the tower's own input size


def test_blip2_vision_loads_from_full_blip2_directory(tmp_path, scenes):
    from transformers import Blip2Config, Blip2Model

    cfg = Blip2Config(vision_config=SMALL, qformer_config={"hidden_size": 32, "num_hidden_layers": 1,
                                                           "num_attention_heads": 2, "intermediate_size": 64},
                      text_config=dict(TINY_LLM, model_type="qwen2"), num_query_tokens=3)
    torch.manual_seed(0)
    Blip2Model(cfg).save_pretrained(tmp_path / "blip2")
    reference = Blip2Model.from_pretrained(tmp_path / "blip2").vision_model
    built = build_model(_settings(scenes, {"path": str(tmp_path / "blip2")}, "qformer"))
    for name, p in reference.state_dict().items():
        assert torch.equal(p, built.model.vision.encoder.state_dict()[name]), name


def _batch(built, with_image=True):
    tok = built.tokenizer
    n = built.tokens_per_image
    ids = tok.convert_tokens_to_ids(["<|im_start|>", "user"] + ["<image>"] * n * with_image + ["red", "<|im_end|>"])
    ids = torch.tensor([ids, ids])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    if with_image:
        batch["pixel_values"] = torch.randn(2, 3, 32, 32)
    return batch


def test_composed_forward_uses_image_features(scenes):
    torch.manual_seed(0)
    built = build_model(_settings(scenes, {"config": dict(TINY_VISION), "mode": "full"}))
    batch = _batch(built)
    loss = built.model(**batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert built.model.vision.encoder.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    other = dict(batch, pixel_values=torch.randn(2, 3, 32, 32))
    assert not torch.allclose(built.model(**other), loss)  # the image changes the prediction


def test_text_only_batch_still_runs_vision_with_zero_weight(scenes):
    torch.manual_seed(0)
    built = build_model(_settings(scenes, {"config": dict(TINY_VISION), "mode": "full"}))
    calls = []
    built.model.vision.register_forward_hook(lambda *a: calls.append(1))
    loss = built.model(**_batch(built, with_image=False))
    loss.backward()
    assert calls == [1]  # same modules on every rank: ZeRO-3 cannot hang on mixed batches
    grad = built.model.connector.mlp[0].weight.grad
    assert grad is not None and grad.abs().sum() == 0


def test_image_token_count_mismatch_is_an_error(scenes):
    built = build_model(_settings(scenes, {"config": dict(TINY_VISION)}))
    batch = _batch(built)
    batch["pixel_values"] = batch["pixel_values"][:1]
    with pytest.raises(DataError, match="do not match"):
        built.model(**batch)


def test_freeze_and_lora_switches(scenes):
    built = build_model(_settings(scenes, {"config": dict(TINY_VISION), "mode": "frozen"}, mode="lora"))
    model = built.model
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert all(p.requires_grad for p in model.connector.parameters())
    trainable_llm = [n for n, p in model.llm.named_parameters() if p.requires_grad]
    assert trainable_llm and all("lora_" in n for n in trainable_llm)
    loss = model(**_batch(built))
    loss.backward()
    assert model.vision.encoder.embeddings.patch_embedding.weight.grad is None  # frozen: no autograd


def test_all_frozen_is_rejected(scenes):
    settings = _settings(scenes, {"config": dict(TINY_VISION), "mode": "frozen"}, mode="frozen")
    settings.connector.mode = "frozen"
    with pytest.raises(ConfigError, match="every part is frozen"):
        build_model(settings)


def test_llm_and_tokenizer_from_directories(tmp_path, scenes):
    from transformers import AutoModelForCausalLM

    llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_LLM))
    llm.save_pretrained(tmp_path / "llm")
    AutoTokenizer.from_pretrained(scenes["tokenizer"]).save_pretrained(tmp_path / "llm")
    settings = ModelSettings.model_validate({"vision": {"config": dict(TINY_VISION)},
                                             "llm": {"path": str(tmp_path / "llm")}})
    built = build_model(settings)
    assert torch.equal(built.model.llm.lm_head.weight, llm.lm_head.weight)
    assert built.tokenizer.convert_tokens_to_ids("<image>") == built.model.image_token_id


def test_unsupported_vision_type_is_a_config_error(scenes):
    with pytest.raises(ConfigError, match="unsupported vision model_type 'vit'"):
        build_model(_settings(scenes, {"config": {"model_type": "vit"}}))


@pytest.mark.parametrize("name", ["demo", "minigpt4qwen", "llava", "qwen2vl", "text_sft", "minigpt4qwen_qwen1",
                                  "chatglm3_lora"])
def test_shipped_configs_validate(name):
    from tests.conftest import REPO
    from zerovl.config import load_config

    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert cfg.model.has_vision == (name not in ("text_sft", "chatglm3_lora"))


def test_model_summary_matches_the_built_model(scenes, tmp_path):
    from tests.conftest import tiny_config
    from zerovl.config import from_dict
    from zerovl.models.builder import named_parts
    from zerovl.recipes.summary import model_summary, part_counts

    raw = tiny_config(scenes, tmp_path)
    raw["model"]["vision"]["mode"] = "frozen"
    raw["model"]["llm"]["mode"] = "lora"
    cfg = from_dict(raw)
    counts = part_counts(cfg)
    built = build_model(cfg.model)
    for part, named in named_parts(built.model).items():
        params = {id(p): p for _, p in named}.values()
        assert counts[part][1] == sum(p.numel() for p in params if p.requires_grad), part
    assert counts["vision"][1] == 0 and 0 < counts["llm"][1] < counts["llm"][0]
    assert "lora" in model_summary(cfg) and "trainable" in model_summary(cfg)


def test_native_qwen2vl_builds_and_runs_text_and_image_batches(scenes):
    """Inline (random-init) Qwen2-VL: the tokenizer gains the vision tokens, the config takes their ids,
    image token counts follow the image size, and text-only batches still run the vision tower."""
    from PIL import Image

    from zerovl.data.samples import Sample

    settings = ModelSettings.model_validate({
        "native": {"config": {"model_type": "qwen2_vl",
                              "text_config": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                  num_attention_heads=2, num_key_value_heads=1, vocab_size=80,
                                                  rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
                              "vision_config": dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2)},
                   "min_pixels": 28 * 28, "max_pixels": 56 * 56},
        "llm": {"mode": "full"}, "tokenizer": str(scenes["tokenizer"])})
    torch.manual_seed(0)
    built = build_model(settings)
    template = built.template()
    image = str(next((scenes["train"].parent / "images").glob("*.png")))  # 32x32 -> 28x28 -> 1 token
    sample = Sample([{"role": "user", "content": "<image>how many shapes are there ?"},
                     {"role": "assistant", "content": "one"}], [image], "t:1")
    enc = template.encode(sample)
    assert enc.image_tokens == 1
    vision = built.image_processor([Image.open(image).convert("RGB")])
    ids = torch.tensor([enc.input_ids])
    calls = []
    built.model.visual.register_forward_hook(lambda *a: calls.append(1))
    loss = built.model(ids, torch.ones_like(ids), labels=torch.tensor([enc.labels]), **vision)
    text_ids = ids[ids != built.model.image_token_id].unsqueeze(0)
    text_loss = built.model(text_ids, torch.ones_like(text_ids), labels=text_ids)
    assert torch.isfinite(loss) and torch.isfinite(text_loss) and calls == [1, 1]
