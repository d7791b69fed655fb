"""``zerovl chat``: answer questions about images with a trained run or an export, on one process."""

from __future__ import annotations

from pathlib import Path

import torch

from zerovl.data.images import load_image
from zerovl.data.samples import IMAGE_TAG, Sample
from zerovl.data.template import ChatTemplate
from zerovl.engine.restore import load_export, load_trained
from zerovl.models.builder import BuiltModel
from zerovl.recipes.evaluate import left_pad


class Chatbot:
    def __init__(self, built: BuiltModel, template: ChatTemplate, max_pixels: int):
        self.built = built
        self.template = template
        self.max_pixels = max_pixels
        built.model.eval()

    @classmethod
    def from_run(cls, run_or_ckpt: str | Path) -> Chatbot:
        cfg, built, _ = load_trained(run_or_ckpt)
        return cls(built, built.template(cfg.data.system_prompt), cfg.data.max_pixels)

    @classmethod
    def from_export(cls, export_dir: str | Path, max_pixels: int = 1024 * 1024) -> Chatbot:
        _, built, _ = load_export(export_dir)
        return cls(built, built.template(), max_pixels)

    @torch.no_grad()
    def answer(self, question: str, images: list[str] = (), max_new_tokens: int = 64,
               history: list[dict[str, str]] | None = None) -> str:
        content = question
        if images and not history and IMAGE_TAG not in question:  # images belong to the first turn
            content = IMAGE_TAG * len(images) + question
        messages = list(history or []) + [{"role": "user", "content": content}]
        sample = Sample(messages=messages, images=list(images), source="chat")
        ids, mask = left_pad([self.template.encode_prompt(sample)], self.built.tokenizer.pad_token_id)
        vision = {}
        if images:
            vision = self.built.image_processor([load_image(p, self.max_pixels, "chat") for p in images])
        tok = self.built.tokenizer
        out = self.built.model.generate(ids, mask, **vision, max_new_tokens=max_new_tokens, do_sample=False,
                                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        return tok.decode(out[0], skip_special_tokens=True).strip()
