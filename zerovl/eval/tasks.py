"""The evaluation tasks by name: how each reads its file, how long its answers are, how it is scored.

``score`` takes the items and one prediction per item (same order) and returns a score per item
(``None`` where the item has no reference) and the metrics. ``loss`` has no generation step; the
recipe computes it from the model's own loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from zerovl.config import EvalTaskSettings
from zerovl.errors import ConfigError
from zerovl.eval import items as readers
from zerovl.eval.items import EvalItem, TaskData

Scored = tuple[list[float | None], dict[str, Any]]


@dataclass(frozen=True)
class Task:
    read: Callable[[EvalTaskSettings], TaskData] | None
    score: Callable[[list[EvalItem], list[str], EvalTaskSettings], Scored] | None
    max_new_tokens: int  # lmms-eval's defaults: 16 for short answers, longer for captions
    metrics: tuple[str, ...]  # the valid metric options (first = default)
    headline: str  # the metric the table and ``train.keep_best`` name first


def _referenced(items: list[EvalItem]) -> list[int]:
    return [i for i, item in enumerate(items) if item.references]


def _spread(n: int, scored: list[int], values: list[float]) -> list[float | None]:
    out: list[float | None] = [None] * n
    for i, v in zip(scored, values):
        out[i] = v
    return out


def score_vqa(items: list[EvalItem], predictions: list[str], settings: EvalTaskSettings) -> Scored:
    from zerovl.eval.vqa import score_vqa as vqa_metrics

    keep = _referenced(items)
    values, metrics = vqa_metrics([predictions[i] for i in keep], [items[i].references for i in keep],
                                  [items[i].meta.get("answer_type") for i in keep], settings.metric or "vqa")
    metrics["unscored_no_answers"] = len(items) - len(keep)
    return _spread(len(items), keep, values), metrics


def score_open(items: list[EvalItem], predictions: list[str], settings: EvalTaskSettings) -> Scored:
    """Open-ended answers: exact match where references exist (LLaVA-Bench files have none: predictions only)."""
    from zerovl.eval.vqa import score_vqa as vqa_metrics

    keep = _referenced(items)
    if not keep:
        return [None] * len(items), {"n": 0, "unscored_no_answers": len(items)}
    values, metrics = vqa_metrics([predictions[i] for i in keep], [items[i].references for i in keep],
                                  [items[i].meta.get("answer_type") for i in keep], "exact")
    metrics["unscored_no_answers"] = len(items) - len(keep)
    return _spread(len(items), keep, values), metrics


def score_caption(items: list[EvalItem], predictions: list[str], settings: EvalTaskSettings) -> Scored:
    from zerovl.eval.caption import caption_scores

    keep = _referenced(items)
    metrics, per_id, tokenizer = caption_scores({items[i].id: predictions[i] for i in keep},
                                                {items[i].id: items[i].references for i in keep})
    metrics = {**metrics, "n": len(keep), "tokenizer": tokenizer, "unscored_no_references": len(items) - len(keep)}
    return _spread(len(items), keep, [per_id[items[i].id] for i in keep]), metrics


def score_mcq(items: list[EvalItem], predictions: list[str], settings: EvalTaskSettings) -> Scored:
    from zerovl.eval.mcq import score_mcq as mcq_metrics

    values, letters, metrics = mcq_metrics(predictions, [it.meta["options"] for it in items],
                                           [it.meta["answer"] for it in items],
                                           [it.meta["group"] for it in items] if settings.circular else None,
                                           [it.meta.get("category") for it in items])
    for item, letter in zip(items, letters):
        item.meta["extracted"] = letter
    return list(values), metrics


TASKS: dict[str, Task] = {
    "vqa": Task(readers.read_vqa, score_vqa, 16, ("vqa", "exact"), "accuracy"),
    "open": Task(readers.read_open, score_open, 128, ("exact",), "accuracy"),
    "caption": Task(readers.read_caption, score_caption, 32, ("coco",), "CIDEr"),
    "mcq": Task(readers.read_mcq, score_mcq, 16, ("exact",), "accuracy"),
    "loss": Task(None, None, 0, ("loss",), "loss"),
    "retrieval": Task(None, None, 0, ("recall",), "r_mean"),  # scored in recipes/retrieval_eval.py
}


def task_for(settings: EvalTaskSettings) -> Task:
    task = TASKS.get(settings.task)
    if task is None:
        raise ConfigError(f"unknown eval task '{settings.task}': use one of {', '.join(TASKS)}")
    if settings.metric is not None and settings.metric not in task.metrics:
        raise ConfigError(f"eval task {settings.label}: unknown metric '{settings.metric}' for {settings.task}; "
                          f"use {' or '.join(task.metrics)}")
    return task

