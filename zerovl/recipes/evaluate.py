"""Validation: token-weighted loss on the val split and, optionally, exact-match accuracy of
generated answers (the demo's metric). Every rank evaluates its share; results are combined."""

from __future__ import annotations

import re
from typing import Any

import torch

from zerovl.data.collate import META_KEYS
from zerovl.data.dataset import ChatDataset
from zerovl.data.sampler import ResumableBatchSampler
from zerovl.data.template import ChatTemplate
from zerovl.engine.distributed import DistInfo, all_gather_objects, all_reduce_sum


def normalize_answer(text: str) -> str:
    text = text.strip().lower()
    text = re.sub(r"\s+([?.!,])", r"\1", text)
    return re.sub(r"\s+", " ", text).strip(" .!")


def _rank_indices(n: int, dist: DistInfo, batch_size: int) -> list[list[int]]:
    sampler = ResumableBatchSampler(n, batch_size, dist.rank, dist.world_size, shuffle=False)
    return list(sampler)  # equal number of batches on every rank (ZeRO-3 needs that)


@torch.no_grad()
def val_loss(engine, dataset: ChatDataset, collate, dist: DistInfo, batch_size: int) -> float:
    """Mean loss per supervised token over the val set (padding duplicates count twice; negligible)."""
    total = count = 0.0
    for indices in _rank_indices(len(dataset), dist, batch_size):
        batch = collate([dataset[i] for i in indices])
        batch = {k: v.to(dist.device) for k, v in batch.items() if k not in META_KEYS}
        n = float((batch["labels"][:, 1:] != -100).sum())
        total += float(engine(**batch)) * n
        count += n
    total, count = all_reduce_sum([total, count], dist.device)
    return total / max(count, 1.0)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p)
        mask[i, longest - len(p):] = 1
    return ids, mask


def stack_vision(per_sample: list[dict[str, torch.Tensor]], device: torch.device) -> dict[str, torch.Tensor]:
    """Concatenate each sample's image tensors (pixel_values, and image_grid_thw for native models)."""
    keys = sorted({k for d in per_sample for k in d})
    return {k: torch.cat([d[k] for d in per_sample if k in d]).to(device) for k in keys}


@torch.no_grad()
def generate_answers(model, dataset: ChatDataset, template: ChatTemplate, indices: list[int],
                     max_new_tokens: int, device: torch.device, synced_gpus: bool = False) -> list[str]:
    tokenizer = template.tokenizer
    samples = [dataset.samples[i] for i in indices]
    ids, mask = left_pad([template.encode_prompt(s) for s in samples], tokenizer.pad_token_id)
    vision = stack_vision([dataset.load_images(s) for s in samples], device)
    out = model.generate(ids.to(device), mask.to(device), **vision, max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, synced_gpus=synced_gpus)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in out]


def exact_match(engine, dataset: ChatDataset, template: ChatTemplate, dist: DistInfo, batch_size: int,
                max_new_tokens: int, max_samples: int | None, synced_gpus: bool) -> dict[str, Any]:
    """Share of val samples whose generated reply equals the reference last assistant reply."""
    n = min(len(dataset), max_samples or len(dataset))
    results = []
    for indices in _rank_indices(n, dist, batch_size):
        answers = generate_answers(engine.module, dataset, template, indices, max_new_tokens, dist.device,
                                   synced_gpus)
        for i, answer in zip(indices, answers):
            sample = dataset.samples[i]
            ok = normalize_answer(answer) == normalize_answer(sample.messages[-1]["content"])
            results.append((i, str(sample.meta.get("type", "all")), ok))
    merged = {i: (kind, ok) for part in all_gather_objects(results) for i, kind, ok in part}  # drops padding
    by_type: dict[str, list[bool]] = {}
    for kind, ok in merged.values():
        by_type.setdefault(kind, []).append(ok)
    correct = sum(ok for _, ok in merged.values())
    return {"exact_match": correct / len(merged), "exact_match_n": len(merged),
            "exact_match_by_type": {k: sum(v) / len(v) for k, v in sorted(by_type.items())}}


def evaluate(engine, dataset: ChatDataset, template: ChatTemplate, cfg, dist: DistInfo, collate) -> dict[str, Any]:
    engine.eval()
    result: dict[str, Any] = {"loss": val_loss(engine, dataset, collate, dist, cfg.eval.batch_size)}
    if cfg.eval.exact_match:
        synced = engine.zero_optimization_stage() == 3 and dist.world_size > 1
        result.update(exact_match(engine, dataset, template, dist, cfg.eval.batch_size, cfg.eval.max_new_tokens,
                                  cfg.eval.max_samples, synced))
    return result

