"""Shared fixtures: a small generated scene dataset with its offline tokenizer, and tiny configs.

Models are real HF architectures with random init (no downloads); data is generated on the fly.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
REPO = Path(__file__).resolve().parents[1]

TINY_VISION = {"model_type": "siglip_vision_model", "image_size": 32, "patch_size": 16, "hidden_size": 32,
               "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
TINY_LLM = {"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            "max_position_embeddings": 128, "tie_word_embeddings": True}


@pytest.fixture(scope="session")
def scenes(tmp_path_factory) -> dict[str, Path]:
    from zerovl.data.demo_scenes import generate

    return generate(tmp_path_factory.mktemp("scenes"), num_train_images=60, num_val_images=8, image_size=32)


def tiny_config(scenes: dict[str, Path], output_dir: Path, **sections) -> dict:
    cfg = {
        "model": {
            "vision": {"config": dict(TINY_VISION), "mode": "full"},
            "connector": {"type": "mlp"},
            "llm": {"config": dict(TINY_LLM), "mode": "full"},
            "tokenizer": str(scenes["tokenizer"]),
        },
        "data": {"train": str(scenes["train"]), "val": str(scenes["val"]), "max_length": 64, "num_workers": 0},
        "train": {"output_dir": str(output_dir), "max_steps": 3, "micro_batch_size": 2, "lr": 1e-3,
                  "precision": "fp32", "log_every": 1},
        "deepspeed": "zero2",
    }
    for name, values in sections.items():
        cfg.setdefault(name, {})
        if isinstance(values, dict) and isinstance(cfg[name], dict):
            cfg[name].update(values)
        else:
            cfg[name] = values
    return cfg


def write_config(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def python() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def qwen1_dir(scenes, tmp_path_factory) -> Path:
    """A tiny Qwen-7B-Chat-style directory with its own model and tokenizer code (tests/remote_code.py),
    its vocabulary covering the scenes' words."""
    import json

    from tests.remote_code import write_qwen1_dir

    texts = [m["content"] for split in ("train", "val") for line in scenes[split].read_text().splitlines()
             for m in json.loads(line)["messages"]]
    return write_qwen1_dir(tmp_path_factory.mktemp("qwen1") / "Qwen-7B-Chat", texts)
