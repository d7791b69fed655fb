"""Every architecture trained from model directories laid out as users have them: tiny random-init weights
shaped by the real config.json files, beside the real tokenizer, processor and chat-template files, on
real COCO images (with their real captions) plus generated ones of awkward sizes — through the shipped
configs/*.yaml with the user's paths, a few steps each on 2 ranks:

- composed LLaVA-style (CLIP ViT-L/14-shaped tower, penultimate layer, MLP; ZeRO-3) and MiniGPT4Qwen-style
  (Q-Former, projection only) into a Qwen2.5-7B-Instruct-shaped LLM with the real Qwen2.5 tokenizer;
- native Qwen2-VL and Qwen2.5-VL under ZeRO-3 on mixed text/image batches, with the directory's own
  preprocessor_config.json (re-saved and original forms) and with model.native pixel overrides;
- text SFT (LoRA, packing) with the real Qwen2.5-Instruct and Qwen2-Instruct tokenizers.

Single-process checks come first: the directories keep what they must keep, and the native token count
agrees with the pixels and grid the processor makes (and with transformers' own processor for the
directory).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from tests.distributed.helpers import REPO, check, metrics, run
from tests.realworld.conftest import (
    DATASETS,
    MODEL_CONFIGS,
    coco_captions,
    coco_images,
    image_sample,
    mixed_jsonl,
)

NATIVE = ["qwen2-vl-2b-instruct", "qwen2-vl-2b-instruct-older", "qwen2.5-vl-3b-instruct"]
REAL_CONFIG = {"qwen2.5-7b-instruct": "qwen2.5-7b-instruct.config.json",
               "qwen2-7b-instruct": "qwen2-7b-instruct.config.json",
               "qwen2-vl-2b-instruct": "qwen2-vl-2b-instruct.sophgo-edited.config.json",
               "qwen2-vl-2b-instruct-older": "qwen2-vl-2b-instruct.sophgo-edited.config.json",
               "qwen2.5-vl-3b-instruct": "qwen2.5-vl-3b-instruct.sophgo-edited.config.json"}
# (min_pixels, max_pixels) each directory's preprocessor_config.json states
DIRECTORY_PIXELS = {"qwen2-vl-2b-instruct": (3136, 1003520), "qwen2-vl-2b-instruct-older": (3136, 12845056),
                    "qwen2.5-vl-3b-instruct": (3136, 12845056)}


# -- single process ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(REAL_CONFIG))
def test_tiny_directories_keep_vocab_rope_and_token_ids(tiny_model, name):
    """Only width and depth are shrunk: vocab size, rope theta / M-RoPE layout (sections rescaled to the
    new head size), special-token ids and tie settings are the real config's; zerovl's tokenizer loading
    agrees with the ids."""
    from transformers import AutoConfig

    from zerovl.config import ModelSettings
    from zerovl.models.builder import load_tokenizer
    from zerovl.models.native import IMAGE_PAD, VISION_END, VISION_START

    real = json.loads((MODEL_CONFIGS / REAL_CONFIG[name]).read_text())
    path = tiny_model(name)
    config = AutoConfig.from_pretrained(path)
    text = getattr(config, "text_config", config)
    assert text.vocab_size == real["vocab_size"]
    assert config.tie_word_embeddings == real["tie_word_embeddings"]
    rope = text.rope_parameters
    assert rope["rope_theta"] == real["rope_theta"]
    head_dim = text.hidden_size // text.num_attention_heads
    if "rope_scaling" in real:
        assert sum(rope["mrope_section"]) == head_dim // 2
        assert rope.get("type", rope.get("rope_type")) in (real["rope_scaling"]["type"], "default")
    assert text.hidden_size < real["hidden_size"] and text.num_hidden_layers < real["num_hidden_layers"]
    native = name in NATIVE
    settings = {"native": {"path": str(path)}} if native else {"llm": {"path": str(path)}}
    tokenizer = load_tokenizer(ModelSettings.model_validate(settings))
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == real["eos_token_id"]
    if native:
        for key, token in (("vision_start_token_id", VISION_START), ("image_token_id", IMAGE_PAD),
                           ("vision_end_token_id", VISION_END)):
            assert getattr(config, key) == real[key] == tokenizer.convert_tokens_to_ids(token)
        assert len(tokenizer) <= real["vocab_size"]  # no resize: the real vision tokens are in the vocab


def _odd_and_real_images(odd_images) -> list[Path]:
    large = DATASETS / "dsvisualchat/images/cats/british_shorthair.jpg"  # 1080x1920: above 1003520 pixels
    palette = DATASETS / "dsvisualchat/images/cats/cat.png"  # palette-mode PNG
    webp = DATASETS / "images/minigpt4qwen_tokyo-walk.webp"  # 1920x1080 WebP
    return [*coco_images(2), large, palette, webp, *odd_images.values()]


@pytest.mark.parametrize("overrides", [{}, {"max_pixels": 50176}, {"min_pixels": 12544, "max_pixels": 200704}],
                         ids=["directory", "max_override", "both_override"])
@pytest.mark.parametrize("name", NATIVE)
def test_native_token_count_matches_processor_grid(tiny_model, odd_images, name, overrides):
    """For every image the count the chat template reserves equals the features the processor's pixels
    and image_grid_thw give the vision tower; without model.native overrides the pixel range is the
    directory's preprocessor_config.json — the grid equals what transformers' own processor, loaded from
    that directory alone, makes of the same (data.max_pixels-bounded) image."""
    import torch
    from transformers import AutoImageProcessor

    from zerovl.config import ModelSettings
    from zerovl.data.images import load_image
    from zerovl.models.builder import build_model

    path = tiny_model(name)
    settings = ModelSettings.model_validate({"native": {"path": str(path), **overrides}, "vision": {"mode": "frozen"},
                                             "llm": {"mode": "full"}})
    data_max_pixels = 1024 * 1024
    built = build_model(settings, "fp32", data_max_pixels)
    merge = built.model.merge
    reference = AutoImageProcessor.from_pretrained(path) if not overrides else None
    low, high = DIRECTORY_PIXELS[name]
    low, high = overrides.get("min_pixels", low), overrides.get("max_pixels", high)
    for image_path in _odd_and_real_images(odd_images):
        count = built.tokens_per_image(str(image_path))
        image = load_image(str(image_path), data_max_pixels)
        out = built.image_processor([image])
        grid = out["image_grid_thw"]
        assert grid.shape == (1, 3) and grid[0, 0] == 1
        assert out["pixel_values"].shape[0] == int(grid.prod()), image_path.name
        assert int(grid.prod()) // merge**2 == count, (image_path.name, image.size, grid.tolist(), count)
        patch = built.model.hf.config.vision_config.patch_size
        pixels = int(grid[0, 1] * grid[0, 2]) * patch * patch
        assert low <= pixels <= high, (image_path.name, image.size, pixels, (low, high))
        if reference is not None:
            theirs = reference(images=[image], return_tensors="pt")["image_grid_thw"]
            assert torch.equal(theirs, grid), (image_path.name, image.size, theirs.tolist(), grid.tolist())
        if pixels <= 200704:  # the tower itself on the small ones (a 1-megapixel image is 5,000 patches)
            features = built.model.visual(out["pixel_values"], grid_thw=grid).pooler_output
            assert features.shape[0] == count


# -- 2 ranks, through the shipped configs/*.yaml as the README runs them ----------------------------

def _value(v) -> str:
    return v if isinstance(v, str) else json.dumps(v)  # JSON is YAML: null, true, {..} parse as such


def _shipped(name: str, tmp_path: Path, **overrides) -> list[str]:
    """``zerovl train configs/<name> key=value ...``: the shipped config with the user's directories and
    data, shrunk to a few fp32 steps on a CPU."""
    fit = {"data.num_workers": 0, "data.shuffle": False, "data.too_long": "error",
           "train.output_dir": str(tmp_path / "run"), "train.max_steps": 3, "train.micro_batch_size": 2,
           "train.gradient_accumulation_steps": 1, "train.precision": "fp32", "train.save_every": 0,
           "train.save_final": False, "train.warmup_steps": 0, "train.lr": 1e-3}
    return ["train", str(REPO / "configs" / name), *(f"{k}={_value(v)}" for k, v in {**fit, **overrides}.items())]


def _finite_steps(run_dir: Path, n: int) -> list[dict]:
    steps, _ = metrics(run_dir)
    assert len(steps) == n, steps
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in steps), [r["loss"] for r in steps]
    assert all(r["skipped_samples"] == 0 for r in steps)
    return steps


@pytest.fixture(scope="module")
def coco_data(tmp_path_factory) -> Path:
    """Mixed text-only / image samples: real COCO val2017 images with their real captions."""
    captions = coco_captions()
    samples = [image_sample([p], "\nDescribe the image briefly.", captions[p.name]) for p in coco_images(6)]
    return mixed_jsonl(tmp_path_factory.mktemp("coco") / "coco.jsonl", samples)


@pytest.mark.distributed
def test_llava_clip_mlp_qwen25_zero3(tmp_path, tiny_model, coco_data):
    """configs/llava.yaml: the CLIP ViT-L/14 directory's vision tower (CLIPModel config in its legacy
    layout, the real CLIPFeatureExtractor preprocessor config: 224 px, 256 patches after CLS is dropped) at
    the penultimate layer, a 2-layer MLP, a fully trained Qwen2.5-7B-Instruct-shaped LLM with gradient
    checkpointing and the real tokenizer, whose own <|image_pad|> is the image token; ZeRO-3 with rank 0
    text-only and rank 1 images in the first step."""
    args = _shipped("llava.yaml", tmp_path, **{
        "model.vision.path": str(tiny_model("clip-vit-large-patch14")),
        "model.llm.path": str(tiny_model("qwen2.5-7b-instruct")),
        "data.train": str(coco_data), "data.format": "messages", "data.image_root": None, "data.max_length": 512})
    out = check(run(args, timeout=400))
    steps = _finite_steps(tmp_path / "run", 3)
    assert all(r["grad_norm"] is None or math.isfinite(r["grad_norm"]) for r in steps)
    assert "ZeRO-3" in out


@pytest.mark.distributed
def test_minigpt4qwen_qformer_projection_qwen25(tmp_path, tiny_model, coco_data):
    """configs/minigpt4qwen.yaml without a BLIP-2 directory (none was found): the frozen CLIP-shaped ViT
    (all 257 tokens: the Q-Former attends to CLS too), a random-init Q-Former with 32 learned queries, only
    the projection into the frozen Qwen2.5-shaped LLM trains; images bounded by data.max_pixels first."""
    args = _shipped("minigpt4qwen.yaml", tmp_path, **{
        "model.vision.path": str(tiny_model("clip-vit-large-patch14")),
        "model.connector.path": None, "model.connector.num_query_tokens": 32,
        "model.connector.qformer": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                    "intermediate_size": 64},
        "model.llm.path": str(tiny_model("qwen2.5-7b-instruct")),
        "data.train": str(coco_data), "data.max_length": 256})
    out = check(run(args, timeout=400))
    _finite_steps(tmp_path / "run", 3)
    assert re.search(r"M parameters, 0\.00M trainable", out), out[-3000:]


def _native_data(root: Path, odd_images: dict[str, Path], real: list[Path]) -> Path:
    captions = coco_captions()
    samples = [image_sample([p], "Describe the image.", captions.get(p.name, "A photograph.")) for p in real]
    samples += [image_sample([p], f"What colour fills this {key} image?", "One flat colour.")
                for key, p in odd_images.items()]
    # two images in one sample: an odd one and a real one
    samples.append(image_sample([odd_images["37x301"], real[0]], " Which image is larger?", "The second."))
    return mixed_jsonl(root / "native.jsonl", samples)


def _pixel_log(out: str) -> str:
    lines = [line for line in out.splitlines() if "min_pixels=" in line and "max_pixels=" in line]
    assert lines, "no log line names the pixel range in force (min_pixels=... max_pixels=...)"
    return lines[0]


NATIVE_RUNS = {
    # the re-saved preprocessor_config.json's own range (3136..1003520): configs/qwen2vl.yaml's cap unset
    "qwen2-vl": ("qwen2-vl-2b-instruct", {"max_pixels": None}, (3136, 1003520)),
    # the original-form file (12845056) overridden from the config, as a user caps memory
    "qwen2-vl-older-override": ("qwen2-vl-2b-instruct-older", {"max_pixels": 50176}, (3136, 50176)),
    # Qwen2.5-VL (window attention) with its own original-form file and a min_pixels override only
    "qwen2.5-vl": ("qwen2.5-vl-3b-instruct", {"max_pixels": None, "min_pixels": 6272}, (6272, 12845056)),
}


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(NATIVE_RUNS))
def test_native_mixed_batches_zero3(tmp_path, tiny_model, odd_images, case):
    """configs/qwen2vl.yaml on a Qwen2-VL / Qwen2.5-VL directory as downloaded (sophgo-edited config.json,
    real tokenizer, chat_template.json, preprocessor_config.json): ZeRO-3, LoRA on the language model,
    merger trained, gradient checkpointing, rank 0 text-only and rank 1 images first, then mixed; real
    COCO images (and a palette PNG) plus generated 37x301 / 1000x61 / 1x1 / 29x29 ones; one case also
    generates on val (exact match). The log names the pixel range in force and where each end came from."""
    name, pixels, (low, high) = NATIVE_RUNS[case]
    if pixels.get("max_pixels") is not None:
        real = [*coco_images(2), DATASETS / "dsvisualchat/images/cats/cat.png"]
    else:  # the directory's own range: full-size photos give ~350 tokens each; keep the count down
        real = [*coco_images(1), DATASETS / "llamafactory/mllm_demo_data/1.jpg"]
    data = _native_data(tmp_path, odd_images, real)
    evaluate = {}
    if case == "qwen2-vl-older-override":  # generation too, with the directory's real generation_config.json
        evaluate = {"data.val": str(data), "eval.exact_match": True, "eval.batch_size": 2, "eval.max_samples": 8,
                    "eval.max_new_tokens": 3}
    args = _shipped("qwen2vl.yaml", tmp_path, **{
        "model.native.path": str(tiny_model(name)), **{f"model.native.{k}": v for k, v in pixels.items()},
        "model.llm.lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"},
        "data.train": str(data), "data.max_length": 1024, "train.max_steps": 4, **evaluate})
    out = check(run(args, timeout=500))
    _finite_steps(tmp_path / "run", 4)
    if evaluate:  # rank 0 text-only and rank 1 images in the first eval batch, as in training
        _, evals = metrics(tmp_path / "run")
        assert evals[-1]["exact_match_n"] == 8 and 0 <= evals[-1]["exact_match"] <= 1, evals
    line = _pixel_log(out)
    assert f"min_pixels={low}" in line and f"max_pixels={high}" in line, line
    overridden = [k for k, v in pixels.items() if v is not None]
    assert ("model.native" in line) == bool(overridden), line
    if len(overridden) < 2:  # an end not overridden comes from the directory
        assert "preprocessor_config.json" in line, line


def _alpaca_messages(path: Path, n: int) -> Path:
    """LLaMA-Factory's real alpaca demo (instruction / input / output) as messages JSONL, short ones only."""
    rows = json.loads((DATASETS / "llamafactory/alpaca_en_demo.json").read_text())
    lines = []
    for r in rows:
        prompt = r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "")
        if len(prompt) + len(r["output"]) < 400:
            lines.append({"messages": [{"role": "user", "content": prompt},
                                       {"role": "assistant", "content": r["output"]}]})
        if len(lines) == n:
            break
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["qwen2.5-7b-instruct", "qwen2-7b-instruct", "gpt2-large"])
def test_text_sft_with_real_tokenizer(tmp_path, tiny_model, name):
    """configs/text_sft.yaml: LoRA with gradient checkpointing and packing on an LLM directory with the
    real Qwen2.5-Instruct (tool-calling template), Qwen2-Instruct (ChatML) or GPT-2 (no template: the
    ChatML fallback; LoRA on its Conv1D layers) tokenizer, on real alpaca instructions, ZeRO-2."""
    args = _shipped("text_sft.yaml", tmp_path, **{
        "model.llm.path": str(tiny_model(name)),
        "data.train": str(_alpaca_messages(tmp_path / "alpaca.jsonl", 32)), "data.max_length": 256})
    check(run(args, timeout=300))
    _finite_steps(tmp_path / "run", 3)
