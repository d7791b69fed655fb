"""``zerovl chat``: answer questions about images with a trained run, on one process, no DeepSpeed."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from zerovl.config import load_config
from zerovl.data.samples import IMAGE_TAG, Sample
from zerovl.data.template import ChatTemplate
from zerovl.engine import checkpoint
from zerovl.errors import CheckpointError
from zerovl.models.builder import BuiltModel, build_model
from zerovl.recipes.evaluate import left_pad

log = logging.getLogger("zerovl.chat")


class Chatbot:
    def __init__(self, built: BuiltModel, template: ChatTemplate, max_pixels: int):
        self.built = built
        self.template = template
        self.max_pixels = max_pixels
        built.model.eval()

    @classmethod
    def from_run(cls, run_dir: str | Path, ckpt: str | Path | None = None) -> Chatbot:
        run_dir = Path(run_dir)
        if not (run_dir / "config.yaml").is_file():
            raise CheckpointError(f"{run_dir} is not a run directory (no config.yaml)")
        cfg = load_config(run_dir / "config.yaml")
        path = Path(ckpt) if ckpt else checkpoint.find_resume(run_dir)
        if path is None:
            raise CheckpointError(f"{run_dir} has no complete checkpoint to chat with")
        built = build_model(cfg.model, "fp32")
        state = checkpoint.consolidated_state_dict(path)
        missing, unexpected = built.model.load_state_dict(
            {k: v.float() for k, v in state.items()}, strict=False)
        if unexpected or [k for k in missing if not k.endswith("position_ids")]:
            raise CheckpointError(f"{path} does not fit the model in {run_dir}/config.yaml "
                                  f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        log.info("loaded %s", path)
        template = ChatTemplate(built.tokenizer, cfg.model.image_token, built.tokens_per_image,
                                cfg.data.system_prompt)
        return cls(built, template, cfg.data.max_pixels)

    @torch.no_grad()
    def answer(self, question: str, images: list[str] = (), max_new_tokens: int = 64,
               history: list[dict[str, str]] | None = None) -> str:
        from zerovl.data.images import load_image

        content = question
        if images and not history and IMAGE_TAG not in question:  # images belong to the first turn
            content = IMAGE_TAG * len(images) + question
        messages = list(history or []) + [{"role": "user", "content": content}]
        sample = Sample(messages=messages, images=list(images), source="chat")
        ids, mask = left_pad([self.template.encode_prompt(sample)], self.built.tokenizer.pad_token_id)
        pixel_values = None
        if images:
            loaded = [load_image(p, self.max_pixels, "chat") for p in images]
            pixel_values = self.built.image_processor(loaded)["pixel_values"]
        tok = self.built.tokenizer
        out = self.built.model.generate(ids, mask, pixel_values, max_new_tokens=max_new_tokens, do_sample=False,
                                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        return tok.decode(out[0], skip_special_tokens=True).strip()
