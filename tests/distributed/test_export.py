"""Exports load anywhere and compute what the trained model computes.

A 2-rank ZeRO-3 run with LoRA on the LLM is exported twice (merged; adapter) and compared with the
trained model rebuilt from its shards: full-model logits on an image question, and the LLM alone
through plain ``AutoModelForCausalLM`` / ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, tiny_config, write_config
from tests.distributed.helpers import check, run

TOL = 1e-4


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, scenes):
    root = tmp_path_factory.mktemp("export")
    lora = {"mode": "lora", "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}}
    cfg = tiny_config(scenes, root / "run", deepspeed="zero3", train={"max_steps": 3, "lr": 5e-3},
                      model={"llm": {"config": tiny_config(scenes, root)["model"]["llm"]["config"], **lora}})
    check(run(["train", str(write_config(cfg, root / "cfg.yaml"))]))
    return root


def _image_batch(built, scenes):
    from zerovl.data.images import load_image
    from zerovl.data.samples import read_messages_jsonl
    from zerovl.data.template import ChatTemplate

    sample = next(s for s in read_messages_jsonl(scenes["val"]) if s.images)
    template = ChatTemplate(built.tokenizer, "<image>", built.tokens_per_image)
    ids = torch.tensor([template.encode_prompt(sample)])
    pixels = built.image_processor([load_image(p, 10**6) for p in sample.images])["pixel_values"]
    return ids, pixels


def _vlm_logits(built, ids, pixels):
    with torch.no_grad():
        return built.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels)


def test_export_merged_matches_trained_model(lora_run, scenes):
    from transformers import AutoModelForCausalLM

    from zerovl.engine.restore import load_export, load_trained
    from zerovl.recipes.export import export

    _, trained, _ = load_trained(lora_run / "run")
    out = lora_run / "merged"
    export(lora_run / "run", out)
    assert json.loads((out / "zerovl_model.json").read_text())["model"]["llm"]["path"] == "llm"
    _, exported, _ = load_export(out)
    ids, pixels = _image_batch(trained, scenes)
    want = _vlm_logits(trained, ids, pixels)
    got = _vlm_logits(exported, ids, pixels)
    assert want.shape == got.shape and torch.isfinite(want).all()
    assert (got - want).abs().max().item() < TOL

    # the LLM directory is a plain HF model: same text-only logits as the trained (LoRA) LLM
    plain = AutoModelForCausalLM.from_pretrained(out / "llm").eval()
    text = torch.tensor([trained.tokenizer("how many sides does a square have ?")["input_ids"]])
    with torch.no_grad():
        ref = trained.model.llm(input_ids=text).logits
        assert (plain(input_ids=text).logits - ref).abs().max().item() < TOL
    # LoRA changed the model: the merged weights differ from the untouched base
    assert not any("lora" in k for k in plain.state_dict())


def test_export_adapter_loads_with_peft_and_chat_answers(lora_run, scenes):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from zerovl.engine.restore import load_trained
    from zerovl.recipes.export import export

    _, trained, _ = load_trained(lora_run / "run")
    out = lora_run / "adapter"
    export(lora_run / "run", out, adapter=True)
    base = AutoModelForCausalLM.from_pretrained(out / "llm")
    peft_model = PeftModel.from_pretrained(base, out / "llm_adapter").eval()
    text = torch.tensor([trained.tokenizer("what shape is on the left ?")["input_ids"]])
    with torch.no_grad():
        ref = trained.model.llm(input_ids=text).logits
        got = peft_model(input_ids=text).logits
        base_logits = peft_model.get_base_model()(input_ids=text).logits  # adapter still active here
        with peft_model.disable_adapter():
            without = peft_model(input_ids=text).logits
    assert (got - ref).abs().max().item() < TOL
    assert (base_logits - ref).abs().max().item() < TOL
    assert (without - ref).abs().max().item() > TOL  # the adapter carries the training

    image = next(p for p in (scenes["val"].parent / "images").glob("val_*.png"))
    proc = subprocess.run([sys.executable, "-m", "zerovl", "chat", "--model", str(out), "--image", str(image),
                           "--max-new-tokens", "3", "how many shapes are there ?"],
                          capture_output=True, text=True, timeout=180, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    vocab = set(trained.tokenizer.get_vocab())
    assert proc.stdout.split() and all(w in vocab for w in proc.stdout.split())
