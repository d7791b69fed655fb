"""The real-artifacts tier: files other projects wrote (tokenizers, processors, chat templates, config.json
files, DeepSpeed configs, datasets, images), read from ``../shared/realworld`` beside the repository.

Every test here skips, reported as one line, when that folder is absent, so a bare clone still passes.
The files are never copied into the repository; model directories are laid out under pytest's tmp dirs,
the way a user's local download looks: a tiny random-init model shaped by a real config.json (width and depth shrunk;
vocab size, rope settings, special-token ids and tie settings kept), its config.json in the real file's own
layout, and the real tokenizer / processor / chat-template files beside it.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REALWORLD = HERE.parents[1].parent / "shared" / "realworld"

TOKENIZERS = REALWORLD / "tokenizers"
MODEL_CONFIGS = REALWORLD / "model-configs"
DATASETS = REALWORLD / "datasets"
COCO_IMAGES = DATASETS / "coco-mini" / "val2017"

# The tiny shapes every real config is shrunk to: head_dim 16 everywhere.
TINY_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2}
TINY_VISION_WIDTH, TINY_VISION_HEADS, TINY_VISION_DEPTH = 32, 2, 2

QWEN_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "generation_config.json")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Without ../shared/realworld every test here skips, before any fixture runs, from this one place:
    pytest's summary shows one line. (Test modules must therefore not read ../shared at import time.)"""
    if not REALWORLD.is_dir() and HERE in item.path.parents:
        pytest.skip(f"../shared/realworld is absent ({REALWORLD}): real-artifact tests skipped")


@pytest.fixture(scope="session")
def realworld() -> Path:
    """The ``../shared/realworld`` folder."""
    return REALWORLD


# -- shrinking a real config.json ------------------------------------------------------------------

def _scaled_sections(sections: list[int], total: int) -> list[int]:
    """M-RoPE sections rescaled to a new ``head_dim // 2``, keeping their proportions (16/24/24 -> 2/3/3)."""
    old = sum(sections)
    out = [s * total // old for s in sections]
    out[-1] += total - sum(out)
    assert sum(out) == total and all(s > 0 for s in out), (sections, total, out)
    return out


def _shrink_text(cfg: dict) -> None:
    """An LLM config (top level of Qwen2 / Qwen2-VL's original layout, or a ``text_config``): width and depth
    only. vocab_size, rope_theta, rope_scaling type, token ids and tie_word_embeddings stay as they are."""
    cfg.update(TINY_TEXT)
    head_dim = TINY_TEXT["hidden_size"] // TINY_TEXT["num_attention_heads"]
    if "head_dim" in cfg:
        cfg["head_dim"] = head_dim
    for rope_key in ("rope_scaling", "rope_parameters"):
        rope = cfg.get(rope_key)
        if isinstance(rope, dict) and "mrope_section" in rope:
            rope["mrope_section"] = _scaled_sections(rope["mrope_section"], head_dim // 2)


def shrink_config(raw: dict) -> dict:
    """A copy of a real config.json with width and depth shrunk, in the same layout and key order."""
    cfg = copy.deepcopy(raw)
    model_type = cfg["model_type"]
    if model_type == "qwen2":
        _shrink_text(cfg)
    elif model_type in ("qwen2_vl", "qwen2_5_vl"):
        _shrink_text(cfg.get("text_config", cfg))
        llm_width = TINY_TEXT["hidden_size"]
        vision = cfg["vision_config"]
        vision.update(depth=TINY_VISION_DEPTH, num_heads=TINY_VISION_HEADS)
        if model_type == "qwen2_vl":  # original layout: embed_dim is the ViT width, hidden_size the merger output
            vision.update(embed_dim=TINY_VISION_WIDTH, hidden_size=llm_width)
        else:  # Qwen2.5-VL: hidden_size is the ViT width, out_hidden_size the merger output
            vision.update(hidden_size=TINY_VISION_WIDTH, intermediate_size=2 * TINY_VISION_WIDTH,
                          out_hidden_size=llm_width)
            if "fullatt_block_indexes" in vision:  # keep windowed and full-attention blocks both
                vision["fullatt_block_indexes"] = [TINY_VISION_DEPTH - 1]
    elif model_type == "gpt2":
        cfg.update(n_embd=TINY_TEXT["hidden_size"], n_layer=TINY_TEXT["num_hidden_layers"],
                   n_head=TINY_TEXT["num_attention_heads"])
    elif model_type == "clip":
        for key in ("text_config", "text_config_dict", "vision_config", "vision_config_dict"):
            if isinstance(cfg.get(key), dict):  # the legacy *_dict copies are shrunk alike
                cfg[key].update(hidden_size=TINY_VISION_WIDTH, intermediate_size=2 * TINY_VISION_WIDTH,
                                num_hidden_layers=TINY_VISION_DEPTH, num_attention_heads=TINY_VISION_HEADS,
                                projection_dim=TINY_VISION_WIDTH)
        cfg["projection_dim"] = TINY_VISION_WIDTH
    else:
        raise ValueError(f"no shrink rule for model_type {model_type}")
    return cfg


def _model_class(model_type: str):
    import transformers

    if model_type in ("qwen2", "gpt2"):
        return transformers.AutoModelForCausalLM
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        return transformers.AutoModelForImageTextToText
    return transformers.CLIPModel


def build_tiny_model_dir(dest: Path, config_json: Path, files: dict[str, Path]) -> Path:
    """Write ``dest`` as a user's local model directory: random-init weights of the shrunk real config
    (saved in the config's torch_dtype), the shrunk config.json in the real file's layout, and ``files``
    (name in the directory -> real file) copied beside them, replacing anything save_pretrained wrote."""
    import torch
    from transformers import AutoConfig

    raw = json.loads(config_json.read_text())
    tiny = shrink_config(raw)
    dest.mkdir(parents=True)
    (dest / "config.json").write_text(json.dumps(tiny, indent=2))
    config = AutoConfig.from_pretrained(dest)
    torch.manual_seed(0)
    cls = _model_class(tiny["model_type"])
    model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(raw.get("torch_dtype"), torch.float32)
    model.to(dtype).save_pretrained(dest)
    (dest / "config.json").write_text(json.dumps(tiny, indent=2))  # the real layout, not the re-saved one
    for name, src in files.items():
        assert src.is_file(), src
        shutil.copyfile(src, dest / name)
    return dest


def _qwen_tokenizer(name: str, borrow_vocab_from: str | None = None) -> dict[str, Path]:
    src = TOKENIZERS / name
    files = {f: src / f for f in QWEN_TOKENIZER_FILES if (src / f).is_file()}
    if borrow_vocab_from:
        donor = TOKENIZERS / borrow_vocab_from
        files.update({f: donor / f for f in ("vocab.json", "merges.txt") if f not in files})
    return files


# -- the directories the tier trains ----------------------------------------------------------------

# name -> (real config.json, files laid beside it)
MODEL_DIRS = {
    # Qwen2.5-7B-Instruct: LLM of the composed models and a text-SFT model, with its real tokenizer
    "qwen2.5-7b-instruct": (MODEL_CONFIGS / "qwen2.5-7b-instruct.config.json",
                            lambda: _qwen_tokenizer("qwen2.5-7b-instruct")),
    # Qwen2-7B-Instruct: only tokenizer_config.json was saved; SOURCES.md: vocab.json is the same blob in
    # every Qwen2-family directory and the merges are the same 151387, so vocab/merges come from Qwen2.5
    "qwen2-7b-instruct": (MODEL_CONFIGS / "qwen2-7b-instruct.config.json",
                          lambda: _qwen_tokenizer("qwen2-7b-instruct", borrow_vocab_from="qwen2.5-7b-instruct")),
    # GPT-2 Large (the unmodified copy) with the real GPT-2 BPE files (vocab.json pretty-printed with tabs);
    # no chat template: zerovl falls back to ChatML rendered as plain text
    "gpt2-large": (MODEL_CONFIGS / "gpt2-large.config.json",
                   lambda: {f: TOKENIZERS / "gpt2" / f for f in ("vocab.json", "merges.txt")}),
    # CLIP ViT-L/14 (CLIPModel, legacy *_config_dict layout) with its tokenizer and CLIPFeatureExtractor config
    "clip-vit-large-patch14": (MODEL_CONFIGS / "clip-vit-large-patch14.config.json",
                               lambda: {p.name: p for p in (TOKENIZERS / "clip-vit-large-patch14").iterdir()}),
    # Qwen2-VL-2B-Instruct: tokenizer, chat_template.json and the re-saved preprocessor_config.json
    # (size dict + top-level min/max_pixels 3136/1003520)
    "qwen2-vl-2b-instruct": (MODEL_CONFIGS / "qwen2-vl-2b-instruct.sophgo-edited.config.json",
                             lambda: {**_qwen_tokenizer("qwen2-vl-2b-instruct"),
                                      "chat_template.json": TOKENIZERS / "qwen2-vl-2b-instruct/chat_template.json",
                                      "preprocessor_config.json":
                                          TOKENIZERS / "qwen2-vl-2b-instruct/preprocessor_config.json"}),
    # the same model with the original-form preprocessor_config.json (top-level min/max_pixels, 12845056)
    "qwen2-vl-2b-instruct-older": (MODEL_CONFIGS / "qwen2-vl-2b-instruct.sophgo-edited.config.json",
                                   lambda: {**_qwen_tokenizer("qwen2-vl-2b-instruct"),
                                            "chat_template.json":
                                                TOKENIZERS / "qwen2-vl-2b-instruct/chat_template.json",
                                            "preprocessor_config.json":
                                                TOKENIZERS / "qwen2-vl-2b-instruct/older-copy/preprocessor_config.json"}),
    # Qwen2.5-VL-3B-Instruct: tokenizers/qwen2.5-vl has no vocab.json/merges.txt; SOURCES.md: the Qwen2.5
    # vocab.json is the same blob in every Qwen2-family directory (and Qwen2.5's merges.txt is the
    # header-less form of the same merges), so they are borrowed from qwen2.5-7b-instruct
    "qwen2.5-vl-3b-instruct": (MODEL_CONFIGS / "qwen2.5-vl-3b-instruct.sophgo-edited.config.json",
                               lambda: {**_qwen_tokenizer("qwen2.5-vl", borrow_vocab_from="qwen2.5-7b-instruct"),
                                        "chat_template.json": TOKENIZERS / "qwen2.5-vl/chat_template.json",
                                        "preprocessor_config.json": TOKENIZERS / "qwen2.5-vl/preprocessor_config.json"}),
}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``tiny_model(name) -> Path``: the directory ``name`` of MODEL_DIRS, built once per session."""
    root = tmp_path_factory.mktemp("realworld-models")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            config_json, files = MODEL_DIRS[name]
            built[name] = build_tiny_model_dir(root / name, config_json, files())
        return built[name]

    return get


# -- images and data --------------------------------------------------------------------------------

def coco_images(n: int) -> list[Path]:
    return sorted(COCO_IMAGES.glob("*.jpg"))[:n]


def coco_captions() -> dict[str, str]:
    """COCO file name -> its first real caption (COCO-MINI captions_val2017.json)."""
    ann = json.loads((DATASETS / "coco-mini/annotations/captions_val2017.json").read_text())
    names = {im["id"]: im["file_name"] for im in ann["images"]}
    out: dict[str, str] = {}
    for a in ann["annotations"]:
        out.setdefault(names[a["image_id"]], a["caption"].strip())
    return out


@pytest.fixture(scope="session")
def odd_images(tmp_path_factory) -> dict[str, Path]:
    """Generated images of awkward sizes (the real ones are all ordinary photos)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("odd-images")
    out = {}
    for w, h, colour in ((37, 301, (200, 30, 30)), (1000, 61, (30, 200, 30)), (1, 1, (30, 30, 200)),
                         (29, 29, (120, 120, 0))):
        path = root / f"odd_{w}x{h}.png"
        Image.new("RGB", (w, h), colour).save(path)
        out[f"{w}x{h}"] = path
    return out


def image_sample(images: list[Path], question: str, answer: str, tag: str = "<image>") -> dict:
    return {"messages": [{"role": "user", "content": tag * len(images) + question},
                         {"role": "assistant", "content": answer}], "images": [str(p) for p in images]}


TEXT_PAIRS = [
    ("What is the capital of France?", "Paris."),
    ("Translate 'thank you' into German.", "Danke."),
    ("How many legs does a spider have?", "Eight."),
    ("Name a primary colour.", "Red."),
]


def text_sample(i: int) -> dict:
    q, a = TEXT_PAIRS[i % len(TEXT_PAIRS)]
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def mixed_jsonl(path: Path, image_samples: list[dict]) -> Path:
    """Lines 2k go to rank 0 and 2k+1 to rank 1 (unshuffled, 2 ranks, micro batch 2): the first step gives
    rank 0 only text-only samples and rank 1 only image samples, later steps one of each on every rank
    (blocks text, text, image, image), until the image samples run out."""
    images = list(image_samples)
    lines = [text_sample(0), images.pop(0), text_sample(1), images.pop(0)]
    t = 2
    while images:
        block = [text_sample(t), text_sample(t + 1), images.pop(0)]
        block.append(images.pop(0) if images else text_sample(t + 2))
        lines += block
        t += 3
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path
