"""Every sample file in ../shared/realworld/datasets, as its owners wrote it: ``data.format: auto`` tells
its format, and it trains — or it is refused in one line that says why (videos, image URLs, evaluation
files, registries, images that were never copied).

The training files are read and encoded with the real Qwen2.5 tokenizer and chat template and every
image they name is decoded; then one single-process ``zerovl train`` run takes all of them as one
``data.datasets`` mixture (text and image files together, a tiny composed VLM at the real vocabulary
size) for a few steps. One run instead of one per file keeps the file under two minutes.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.realworld.conftest import DATASETS, TOKENIZERS
from zerovl.config import DataSettings
from zerovl.data.detect import detect_format
from zerovl.data.images import load_image
from zerovl.data.readers import ReadReport, read_dataset
from zerovl.errors import DataError

REPO = Path(__file__).resolve().parents[2]
QWEN = TOKENIZERS / "qwen2.5-7b-instruct"
LF, MS = "llamafactory", "msswift/tests_llm_data"
TEXT = {  # file (relative to DATASETS; "#" names LLaMA-Factory entries) -> the format auto must find
    f"{LF}/alpaca_en_demo.json": "alpaca",
    f"{LF}/identity.json": "alpaca",
    f"{LF}/glaive_toolcall_en_demo.json": "sharegpt",
    f"{LF}/v1_sft_demo.jsonl": "messages",
    f"{LF}/dataset_info.json#identity,alpaca_en_demo,glaive_toolcall_en_demo": "dataset_info",
    f"{MS}/alpaca.csv": "alpaca",
    f"{MS}/alpaca.jsonl": "alpaca",
    f"{MS}/alpaca2.csv": "alpaca",
    f"{MS}/chatml.jsonl": "messages",
    f"{MS}/conversations.jsonl": "sharegpt",
    f"{MS}/sharegpt.jsonl": "sharegpt",
    f"{MS}/swift_multi.json": "swift",
    f"{MS}/swift_multi.jsonl": "swift",
    f"{MS}/swift_pre.csv": "swift",
    f"{MS}/swift_pre.jsonl": "swift",
    f"{MS}/swift_single.csv": "swift",
    f"{MS}/swift_single.jsonl": "swift",
}
IMAGES = {
    f"{LF}/mllm_demo.json": "messages",
    f"{LF}/v1_multimodal_demo.jsonl": "messages",  # content parts; paths written from LLaMA-Factory's repo root
    f"{LF}/dataset_info.json#mllm_demo": "dataset_info",
    "minigpt4qwen/image2prompt/anno.json": "captions",  # paths written from MiniGPT4Qwen's root
    "coco-mini/annotations/captions_val2017.json": "coco",  # images in the COCO layout: ../val2017
}
# file -> (format auto finds, or None when detection itself refuses; the one-line refusal)
REFUSED = {
    f"{LF}/dataset_info.json": (None, "name the datasets to train after '#'"),
    f"{LF}/mllm_video_demo.json": ("messages", "mllm_video_demo.json:2: the record has videos; zerovl trains on "
                                               "images and text only"),
    f"{LF}/dataset_info.json#mllm_video_demo": ("dataset_info", "the record has videos"),
    f"{MS}/multi_modal_1.jsonl": ("swift", "multi_modal_1.jsonl:1: image https://qianwen-res.oss-cn-beijing."
                                           "aliyuncs.com/Qwen-VL/assets/demo.jpeg is a URL; zerovl reads local files"),
    f"{MS}/multi_modal_2.jsonl": ("swift", "is a URL; zerovl reads local files only and never downloads"),
    f"{MS}/multi_modal_3.jsonl": ("swift", "is a URL; zerovl reads local files only and never downloads"),
    "msswift/dataset_info.json": (None, "ms-swift's registry of hub datasets"),
    "llava/qa90_questions.jsonl": (None, "evaluation questions (question_id / question, no answer)"),
    "dsvisualchat/eval_single.json": (None, "evaluation prompts without answers"),
    "coco-caption/captions_val2014_fakecap_results.json": (None, "caption results (image_id + caption, no image"),
    # readable, but their images were never copied here: training stops at the first one, naming it
    "llava/caps_boxes_coco2014_val_80.jsonl": ("captions", "image /"),
    "coco-mini/annotations/captions_train2017.json": ("coco", "image /"),
}


def spec_of(name: str):
    return DataSettings(train=str(DATASETS / name)).train_datasets()[0]


def test_the_tables_cover_every_data_file_there():
    """A file added to the folder must be classified here (trains, or refused with its reason)."""
    on_disk = {str(p.relative_to(DATASETS)) for ext in ("json", "jsonl", "csv", "tsv")
               for p in DATASETS.rglob(f"*.{ext}")}
    listed = {n.split("#")[0] for n in (*TEXT, *IMAGES, *REFUSED)}
    assert on_disk == listed


@pytest.mark.parametrize("name", [*TEXT, *IMAGES, *[n for n, (f, _) in REFUSED.items() if f]])
def test_auto_detects_the_format(name):
    expected = TEXT.get(name) or IMAGES.get(name) or REFUSED[name][0]
    assert detect_format(str(DATASETS / name)).format == expected


@pytest.fixture(scope="module")
def template():
    from transformers import AutoTokenizer

    from zerovl.data.template import ChatTemplate

    tokenizer = AutoTokenizer.from_pretrained(QWEN)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    return ChatTemplate(tokenizer, "<image>", 4)


def _first_image_problem(samples) -> str | None:
    seen = set()
    for sample in samples:
        for path in sample.images:
            if path not in seen:
                seen.add(path)
                try:
                    load_image(path, 64 * 64, sample.source)
                except DataError as e:
                    return str(e)
    return None


@pytest.mark.parametrize("name", [*TEXT, *IMAGES])
def test_each_training_file_reads_encodes_and_loads_its_images(name, template):
    from zerovl.data.dataset import encode_samples

    samples = read_dataset(spec_of(name), ReadReport(key="data.train"))
    kept, encoded = encode_samples(samples, template, 512)
    assert kept and all(any(lab != -100 for lab in e.labels) for e in encoded)
    assert bool(any(s.images for s in samples)) == (name in IMAGES)
    assert _first_image_problem(samples) is None


@pytest.mark.parametrize("name", list(REFUSED))
def test_each_refused_file_says_why_in_one_line(name):
    with pytest.raises(DataError) as err:
        samples = read_dataset(spec_of(name), ReadReport(key="data.train"))
        problem = _first_image_problem(samples)  # what training meets first
        if problem:
            raise DataError(problem)
    message = str(err.value)
    assert REFUSED[name][1] in message and "\n" not in message
    if message.startswith("image /") or " image /" in message:
        assert "not found" in message


def test_the_training_files_train_in_one_run(tmp_path):
    """One ``zerovl train`` process: every training file a member of one mixture; each is read, encoded and
    sampled from, and three optimizer steps run with a finite loss."""
    names = {name: name.replace("/", "_") for name in (*TEXT, *IMAGES)}
    cfg = {
        "model": {
            "vision": {"config": {"model_type": "siglip_vision_model", "image_size": 32, "patch_size": 16,
                                  "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                  "num_attention_heads": 2}, "mode": "full"},
            "connector": {"type": "mlp"},
            # the real tokenizer's 151665 tokens + <image>: a 16-wide, 1-layer Qwen2 keeps that small
            "llm": {"config": {"model_type": "qwen2", "vocab_size": 151666, "hidden_size": 16, "intermediate_size": 32,
                               "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                               "max_position_embeddings": 512, "tie_word_embeddings": True}, "mode": "full"},
            "tokenizer": str(QWEN),
        },
        "data": {"datasets": [{"path": str(DATASETS / n), "name": label} for n, label in names.items()],
                 "max_length": 256, "max_pixels": 64 * 64, "num_workers": 0},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 3, "micro_batch_size": 2, "lr": 1e-3,
                  "precision": "fp32", "log_every": 1, "save_every": 1000},
        "deepspeed": "zero2",
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "zerovl", "train", str(tmp_path / "cfg.yaml")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    mixture = next(line for line in out.splitlines() if "data mixture:" in line)
    for name, label in names.items():
        found = re.search(rf"{re.escape(label)}: (\d+) samples, weight 1 -> (\d+) per epoch", mixture)
        assert found and int(found.group(1)) > 0 and int(found.group(2)) > 0, (name, mixture)
        assert f"format {TEXT.get(name) or IMAGES[name]} (" in out  # the choice is logged
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if r]
    losses = [r["loss"] for r in rows if r.get("split") == "train"]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
