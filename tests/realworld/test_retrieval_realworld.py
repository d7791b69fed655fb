"""BLIP-2 retrieval on the real COCO subset (coco-mini: COCO's own captions_val2017.json layout, real
JPEGs), from a model directory laid out as the Hub's Salesforce/blip2-itm-vit-g is (config.json of a
Blip2ForImageTextRetrieval, model.safetensors, preprocessor_config.json, tokenizer files): trained on
2 ranks under ZeRO-3 and then evaluated with `zerovl eval --task retrieval`.

../shared holds no BERT tokenizer (BLIP-2's), so the directory carries the real CLIP tokenizer and
CLIP's real preprocessor_config.json; the Q-Former is shaped by the real bert-base-uncased config.json
(layer-norm eps, positions, pad id; width and depth shrunk) with its vocabulary widened to CLIP's."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import write_config
from tests.distributed.helpers import check, run
from tests.realworld.conftest import DATASETS, MODEL_CONFIGS, TOKENIZERS

pytestmark = pytest.mark.distributed
CAPTIONS = DATASETS / "coco-mini" / "annotations" / "captions_val2017.json"


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory):
    import torch
    from transformers import AutoTokenizer, Blip2Config, Blip2ForImageTextRetrieval

    out = tmp_path_factory.mktemp("blip2-itm-tiny")
    clip = TOKENIZERS / "clip-vit-large-patch14"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                 "preprocessor_config.json"):
        shutil.copy(clip / name, out / name)
    bert = json.loads((MODEL_CONFIGS / "bert-base-uncased.resaved-4.48.config.json").read_text())
    qformer = {k: bert[k] for k in ("layer_norm_eps", "max_position_embeddings", "pad_token_id",
                                    "hidden_act", "initializer_range") if k in bert}
    image_size = json.loads((clip / "preprocessor_config.json").read_text())["crop_size"]
    image_size = image_size["height"] if isinstance(image_size, dict) else image_size
    qformer.update(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                   encoder_hidden_size=32, cross_attention_frequency=2, use_qformer_text_input=True,
                   vocab_size=len(AutoTokenizer.from_pretrained(out)))
    config = Blip2Config(vision_config={"image_size": image_size, "patch_size": 32, "hidden_size": 32,
                                        "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
                         qformer_config=qformer, num_query_tokens=8, image_text_hidden_size=16)
    torch.manual_seed(0)
    model = Blip2ForImageTextRetrieval(config)
    torch.nn.init.trunc_normal_(model.query_tokens, std=0.02)
    model.save_pretrained(out)
    return out


def test_coco_mini_trains_and_evaluates_end_to_end(blip2_dir, tmp_path):
    coco = json.loads(CAPTIONS.read_text())
    cfg = {"model": {"retrieval": {"path": str(blip2_dir)}, "connector": {"mode": "full"}},
           "data": {"train": str(CAPTIONS), "num_workers": 0},
           "train": {"output_dir": str(tmp_path / "run"), "max_steps": 6, "micro_batch_size": 4, "lr": 1e-4,
                     "precision": "fp32", "log_every": 1},
           "deepspeed": "zero3"}
    proc = run(["train", str(write_config(cfg, tmp_path / "cfg.yaml"))], timeout=600)
    check(proc)
    assert "format coco" in proc.stdout and "images from" in proc.stdout  # COCO's layout: val2017/ beside annotations/
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("split") == "train"]
    assert len(train) == 6 and all(r["loss_itc"] > 0 and r["loss_itm"] > 0 for r in train)

    out = tmp_path / "eval"
    check(run(["eval", str(tmp_path / "run"), "--task", "retrieval", "--data", str(CAPTIONS), "--out", str(out),
               "--rerank-k", "16"], timeout=600))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] == len(coco["images"]) and metrics["n_texts"] == len(coco["annotations"])
    assert metrics["rerank_k"] == 16
    for key in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10"):
        assert 0.0 <= metrics[key] <= 100.0
    assert metrics["txt_r1"] <= metrics["txt_r5"] <= metrics["txt_r10"]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == len(coco["images"]) + len(coco["annotations"])
    by_file = {im["id"]: im["file_name"] for im in coco["images"]}
    first = next(r for r in rows if r["query"] == "text")
    assert first["caption"] == coco["annotations"][0]["caption"].strip()
    assert first["references"][0].endswith(by_file[coco["annotations"][0]["image_id"]])
