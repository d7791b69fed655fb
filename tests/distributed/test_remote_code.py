"""A model that ships its own code (Qwen-7B-Chat's layout, tests/remote_code.py) trained as users train
the seeds' models: text SFT on 2 ranks (ZeRO-2, stopped and resumed), and a composed VLM with LoRA on
the LLM by Qwen-1's layer names under ZeRO-3; both exported, and the exports reloaded with plain
transformers and ``trust_remote_code=True`` compute what the trained models compute."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, TINY_VISION, write_config
from tests.distributed.helpers import check, run

pytestmark = pytest.mark.distributed
CODE_FILES = {"configuration_qwen.py", "modeling_qwen.py", "tokenization_qwen.py"}


def _config(scenes, qwen1_dir, out, **model) -> dict:
    return {"model": {"llm": {"path": str(qwen1_dir), "trust_remote_code": True}, **model},
            "data": {"train": str(scenes["train"]), "max_length": 128, "num_workers": 0},
            "train": {"output_dir": str(out), "max_steps": 4, "micro_batch_size": 2, "lr": 1e-3,
                      "precision": "fp32", "log_every": 1, "save_every": 2},
            "deepspeed": "zero2"}


def _text_only(scenes, path):
    """The scenes' conversations without their images: text SFT data."""
    lines = []
    for line in scenes["train"].read_text().splitlines():
        messages = json.loads(line)["messages"]
        lines.append(json.dumps({"messages": [dict(m, content=m["content"].replace("<image>", "").strip())
                                              for m in messages]}))
    path.write_text("\n".join(lines) + "\n")
    return path


def _steps(run_dir) -> list[int]:
    return [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r and r.get("split", "train") == "train"]


def test_text_sft_stops_resumes_exports_and_reloads_with_plain_transformers(scenes, qwen1_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zerovl.engine.restore import load_trained
    from zerovl.recipes.export import export

    cfg = _config(scenes, qwen1_dir, tmp_path / "run")
    cfg["data"]["train"] = str(_text_only(scenes, tmp_path / "text.jsonl"))
    untrusted = write_config({**cfg, "model": {"llm": {"path": str(qwen1_dir)}}}, tmp_path / "untrusted.yaml")
    refused = subprocess.run([sys.executable, "-m", "zerovl", "train", str(untrusted)], capture_output=True,
                             text=True, cwd=REPO, timeout=120)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "set model.llm.trust_remote_code=true" in refused.stderr.strip().splitlines()[-1]
    path = write_config(cfg, tmp_path / "cfg.yaml")
    check(run(["train", str(path), "train.stop_after_steps=2"]))
    assert (tmp_path / "run" / "checkpoints" / "step_00000002" / "COMPLETE").exists()
    out = check(run(["train", str(path)]))
    assert "resum" in out.lower()
    steps = _steps(tmp_path / "run")
    assert sorted(set(steps)) == [1, 2, 3, 4]

    _, trained, _ = load_trained(tmp_path / "run")
    export(tmp_path / "run", tmp_path / "export")
    llm_dir = tmp_path / "export" / "llm"
    assert CODE_FILES <= {p.name for p in llm_dir.iterdir()} and (llm_dir / "qwen.tiktoken").exists()
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(llm_dir)
    plain = AutoModelForCausalLM.from_pretrained(llm_dir, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(llm_dir, trust_remote_code=True)
    assert type(plain).__name__ == "QWenLMHeadModel" and type(tokenizer).__name__ == "QWenTokenizer"
    ids = trained.template().encode_prompt(
        __import__("zerovl.data.samples", fromlist=["Sample"]).Sample(
            messages=[{"role": "user", "content": "how many shapes are there ?"}], images=[], source="t"))
    assert tokenizer(trained.tokenizer.decode(ids), add_special_tokens=False)["input_ids"] == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        ours = trained.model(input_ids=x, attention_mask=torch.ones_like(x))
        theirs = plain(input_ids=x, attention_mask=torch.ones_like(x)).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_composed_vlm_with_lora_by_qwen1_names_under_zero3(scenes, qwen1_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from zerovl.data.images import load_image
    from zerovl.data.samples import read_messages_jsonl
    from zerovl.engine.restore import load_export, load_trained
    from zerovl.recipes.export import export

    lora = {"mode": "lora", "lora": {"r": 4, "alpha": 8, "target_modules": ["c_attn", "w1", "w2"]}}
    cfg = _config(scenes, qwen1_dir, tmp_path / "run", vision={"config": dict(TINY_VISION), "mode": "full"},
                  connector={"type": "mlp"})
    cfg["model"]["llm"].update(lora)
    cfg.update(deepspeed="zero3")
    cfg["train"].update(max_steps=2, save_every=2, lr=5e-3)
    check(run(["train", str(write_config(cfg, tmp_path / "cfg.yaml"))]))

    _, trained, _ = load_trained(tmp_path / "run")
    assert trained.image_token == "<|extra_0|>"
    export(tmp_path / "run", tmp_path / "export")
    _, exported, _ = load_export(tmp_path / "export")
    sample = next(s for s in read_messages_jsonl(scenes["val"]) if s.images)
    ids = torch.tensor([trained.template().encode_prompt(sample)])
    pixels = trained.image_processor([load_image(p, 10**6) for p in sample.images])["pixel_values"]
    assert (ids == trained.model.image_token_id).sum() == trained.tokens_per_image
    with torch.no_grad():
        a = trained.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels)
        b = exported.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "llm", trust_remote_code=True)
    assert not any("lora" in n for n, _ in plain.named_parameters())  # merged
