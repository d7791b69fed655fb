"""Several conversations generated as one batch, each with its own sampling, limits and stop strings.

One ``model.generate`` call (the same call ``zerovl eval`` makes: left-padded prompts, image tensors
stacked) serves every row; what differs per row rides on two transformers hooks:

- ``RowSampling`` (a logits processor) draws the next token of each sampled row with that row's
  temperature, top-p and seeded generator, and leaves a single finite logit so the greedy argmax that
  follows picks it. Greedy rows are untouched, so they decode exactly as ``eval`` and ``chat`` do.
- ``RowTracker`` (a stopping criterion) sees every new token, decodes each row's text, stops a row at
  its end-of-sequence token, its first stop string or its own ``max_tokens``, and hands the newly
  visible text to the row's callback (server-sent events, the web chat).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from zerovl.data.samples import Sample
from zerovl.recipes.chat import Chatbot
from zerovl.recipes.evaluate import left_pad, sample_vision, stack_vision


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Row:
    """One conversation in a batch: its prompt, image tensors, settings, and what it has produced."""

    prompt: list[int]
    vision: dict[str, torch.Tensor]
    sampling: Sampling
    on_text: Callable[[str], None] | None = None  # called with each newly visible piece of text
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of ``text`` already handed to on_text
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    cancelled: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        self.generator = None
        if self.sampling.seed is not None:
            self.generator = torch.Generator().manual_seed(self.sampling.seed)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def take(self, token: int, eos_id: int | None, decode: Callable[[list[int]], str]) -> None:
        """Account for one generated token."""
        if self.cancelled.is_set():
            self.finish_reason = "cancelled"
            return
        if token == eos_id:
            self.finish_reason = "stop"
        else:
            self.tokens.append(token)
            self.text = decode(self.tokens)
            cut = min((i for i in (self.text.find(s) for s in self.sampling.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.text = self.text[:cut]
                self.finish_reason = "stop"
            elif len(self.tokens) >= self.sampling.max_tokens:
                self.finish_reason = "length"
        self._emit()

    def _emit(self) -> None:
        visible = self.text
        if not self.done:
            # hold back what could still become a stop string, and a half-decoded character
            hold = max((len(s) - 1 for s in self.sampling.stop), default=0)
            visible = visible[:len(visible) - hold] if hold else visible
            visible = visible.rstrip("\ufffd")
        if len(visible) > self.emitted and self.on_text is not None:
            self.on_text(visible[self.emitted:])
        self.emitted = max(self.emitted, len(visible))


class RowSampling(LogitsProcessor):
    def __init__(self, rows: list[Row]):
        self.rows = rows

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for i, row in enumerate(self.rows):
            s = row.sampling
            if s.temperature <= 0 or row.done:
                continue
            logits = scores[i].float().cpu() / s.temperature
            if s.top_p < 1.0:
                sorted_logits, order = logits.sort(descending=True)
                cumulative = sorted_logits.softmax(-1).cumsum(-1)
                drop = cumulative - sorted_logits.softmax(-1) >= s.top_p  # keep the smallest set reaching top_p
                logits[order[drop]] = float("-inf")
            token = torch.multinomial(logits.softmax(-1), 1, generator=row.generator).item()
            scores[i] = float("-inf")
            scores[i, token] = 0.0
        return scores


class RowTracker(StoppingCriteria):
    def __init__(self, rows: list[Row], eos_id: int | None, decode: Callable[[list[int]], str]):
        self.rows, self.eos_id, self.decode = rows, eos_id, decode

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        for row, token in zip(self.rows, input_ids[:, -1].tolist()):
            if not row.done:
                row.take(token, self.eos_id, self.decode)
        return torch.tensor([row.done for row in self.rows], dtype=torch.bool, device=input_ids.device)


def encode(bot: Chatbot, messages: list[dict[str, str]], images: list[str] | list[bytes], source: str = "request"
           ) -> tuple[list[int], dict[str, torch.Tensor]]:
    """Prompt ids and image tensors of a conversation; images are paths or, from a request, bytes (the
    messages carry one ``<image>`` tag per image, in order). Raises DataError on an unreadable image."""
    if images and isinstance(images[0], bytes):
        names = [f"image {i + 1}" for i in range(len(images))]
        sample = Sample(messages=messages, images=names, source=source, meta={"image_bytes": list(images)})
    else:
        sample = Sample(messages=messages, images=list(images), source=source)
    prompt = bot.template.encode_prompt(sample)
    vision = sample_vision(sample, bot.built.image_processor, bot.max_pixels) if images else {}
    return prompt, vision


@torch.no_grad()
def generate_rows(bot: Chatbot, rows: list[Row]) -> None:
    """Generate every row to completion in one batch; each row's ``finish_reason`` is set on return."""
    tok = bot.built.tokenizer
    device = next(bot.built.model.parameters()).device
    ids, mask = left_pad([r.prompt for r in rows], tok.pad_token_id)
    vision = stack_vision([r.vision for r in rows], device)
    decode = lambda tokens: tok.decode(tokens, skip_special_tokens=True).strip()  # noqa: E731 (as eval decodes)
    bot.built.model.generate(ids.to(device), mask.to(device), **vision,
                             max_new_tokens=max(r.sampling.max_tokens for r in rows), do_sample=False, num_beams=1,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                             logits_processor=LogitsProcessorList([RowSampling(rows)]),
                             stopping_criteria=StoppingCriteriaList([RowTracker(rows, tok.eos_token_id, decode)]))
    for row in rows:  # generate's own limits (the model's max length) ended it
        if not row.done:
            row.finish_reason = "length"
            row._emit()
