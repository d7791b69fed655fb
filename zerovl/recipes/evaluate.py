"""Evaluation, after and during training: ``zerovl eval`` and ``eval.tasks`` run this same code.

Every rank reads the task file, plans the same batches (prompts of similar length together, longest
first) and generates for its own share; predictions are gathered by item index, so padding the last
batches (ZeRO-3 needs the same number of generate calls on every rank) never yields a second prediction.
Rank 0 scores (``zerovl.eval``) and writes ``metrics.json`` and ``predictions.jsonl``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from zerovl.config import DataSettings, EvalTaskSettings
from zerovl.data.collate import META_KEYS, pad_collate
from zerovl.data.dataset import ChatDataset, build_dataset
from zerovl.data.images import image_problem, load_image, load_image_bytes
from zerovl.data.sampler import ResumableBatchSampler
from zerovl.data.samples import Sample
from zerovl.data.template import ChatTemplate
from zerovl.engine.distributed import DistInfo, all_gather_objects, all_reduce_sum
from zerovl.errors import ConfigError, DataError
from zerovl.eval.items import EvalItem, TaskData
from zerovl.eval.tasks import task_for

log = logging.getLogger("zerovl.eval")


@dataclass
class Evaluator:
    """What generation needs, whether the model came from a run, an export or the training engine."""

    model: Any  # called for the loss task (a DeepSpeed engine or the module itself)
    module: torch.nn.Module  # .generate
    template: ChatTemplate
    image_processor: Any
    max_pixels: int
    data: DataSettings  # how the loss task reads training-format files
    dist: DistInfo
    synced: bool  # ZeRO-3 on several ranks: generate in lockstep (transformers' synced_gpus)
    tokenizer: Any = None  # retrieval models have no chat template: captions are tokenized directly
    text_length: int = 32  # retrieval: caption tokens (model.retrieval.max_text_length)


@dataclass
class TaskResult:
    metrics: dict[str, Any]
    rows: list[dict[str, Any]]  # one per item, in the file's order (rank 0 only; empty elsewhere)


# ---- batching --------------------------------------------------------------------------------------


def plan_batches(lengths: list[int], batch_size: int, rank: int, world: int, equal: bool) -> list[list[int]]:
    """This rank's batches: items sorted by prompt length (longest first, so the slowest batches start
    early and padding stays small), cut into batches, dealt round-robin. ``equal`` repeats this rank's
    last batch until every rank has as many (their predictions are dropped by index when gathered)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    mine = batches[rank::world]
    if equal and batches:
        per_rank = math.ceil(len(batches) / world)
        mine += [mine[-1] if mine else batches[0]] * (per_rank - len(mine))
    return mine


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


def sample_vision(sample: Sample, image_processor, max_pixels: int) -> dict[str, torch.Tensor]:
    """One sample's image tensors, from its paths or from the bytes it carries (``meta["image_bytes"]``:
    base64 MCQ images, tar-shard members, images sent to the server)."""
    held = sample.meta.get("image_bytes")
    images = ([load_image_bytes(d, max_pixels, sample.source, n) for d, n in zip(held, sample.images)] if held
              else [load_image(p, max_pixels, sample.source) for p in sample.images])
    return image_processor(images) if images else {}


def _unreadable(item: EvalItem) -> bool:
    held = item.sample.meta.get("image_bytes")
    if held:
        return any(image_problem(data=d) for d in held)
    return any(image_problem(path=p) for p in item.sample.images)


@torch.no_grad()
def generate(ev: Evaluator, items: list[EvalItem], prompts: list[list[int]], max_new_tokens: int,
             num_beams: int) -> list[str]:
    tok = ev.template.tokenizer
    ids, mask = left_pad(prompts, tok.pad_token_id)
    vision = stack_vision([sample_vision(it.sample, ev.image_processor, ev.max_pixels) for it in items], ev.dist.device)
    out = ev.module.generate(ids.to(ev.dist.device), mask.to(ev.dist.device), **vision,
                             max_new_tokens=max_new_tokens, do_sample=False, num_beams=num_beams,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, synced_gpus=ev.synced)
    return [tok.decode(row, skip_special_tokens=True).strip() for row in out]


# ---- one task --------------------------------------------------------------------------------------


def _first_groups(items: list[EvalItem], n: int | None) -> list[EvalItem]:
    """The first ``n`` questions (all rotations of a circular one count as one)."""
    if n is None:
        return items
    groups: list[str] = []
    for it in items:
        group = it.meta.get("group", it.id)
        if group not in groups:
            groups.append(group)
    keep = set(groups[:n])
    return [it for it in items if it.meta.get("group", it.id) in keep]


def run_task(ev: Evaluator, settings: EvalTaskSettings, batch_size: int, max_new_tokens: int, num_beams: int,
             max_samples: int | None = None, progress: bool = True) -> TaskResult:
    task = task_for(settings)
    max_samples = settings.max_samples or max_samples
    if settings.task == "loss":
        return run_loss(ev, settings, batch_size, max_samples)
    if settings.task == "retrieval":
        from zerovl.recipes.retrieval_eval import run_retrieval

        return run_retrieval(ev, settings, batch_size, max_samples, progress)
    if ev.template is None:
        raise ConfigError(f"eval task {settings.label}: {settings.task} generates text; a retrieval model "
                          "(model.retrieval) is scored with task: retrieval")
    return run_items(ev, settings, task.read(settings), batch_size, max_new_tokens, num_beams, max_samples,
                     progress)


def run_items(ev: Evaluator, settings: EvalTaskSettings, data: TaskData, batch_size: int, max_new_tokens: int,
              num_beams: int, max_samples: int | None, progress: bool) -> TaskResult:
    """Generate for this rank's share of ``data``, gather one prediction per item, score on rank 0."""
    task = task_for(settings)
    items = _first_groups(data.items, max_samples)
    if not items:
        raise DataError(f"{settings.data}: no item to evaluate ({dict(data.problems) or 'the file is empty'})")
    prompts = [ev.template.encode_prompt(it.sample) for it in items]
    dist = ev.dist
    batches = plan_batches([len(p) for p in prompts], batch_size, dist.rank, dist.world_size, ev.synced)
    unreadable = {i for b in batches for i in b if _unreadable(items[i])}
    new_tokens = settings.max_new_tokens or max_new_tokens or task.max_new_tokens
    beams = settings.num_beams or num_beams
    predictions: list[tuple[int, str]] = []
    bar = tqdm(total=len(items), disable=not (progress and dist.is_main), desc=f"eval {settings.label}",
               unit="sample", dynamic_ncols=True, mininterval=1.0)
    started, done, last = time.perf_counter(), set(), None
    for batch in batches:
        good = [i for i in batch if i not in unreadable] or last  # an all-unreadable batch still joins in
        if good is None:
            raise DataError(f"{items[batch[0]].sample.source}: no readable image among this rank's items")
        answers = generate(ev, [items[i] for i in good], [prompts[i] for i in good], new_tokens, beams)
        last = good
        fresh = [(i, a) for i, a in zip(good, answers) if i not in done and i in batch]
        predictions.extend(fresh)
        done.update(i for i, _ in fresh)
        bar.update(min(len(fresh) * dist.world_size, len(items) - bar.n))  # the other ranks advance alike
        bar.set_postfix(sps=f"{len(done) * dist.world_size / (time.perf_counter() - started):.1f}", refresh=False)
    bar.close()
    gathered = all_gather_objects((predictions, sorted(unreadable)))
    by_index = {i: a for part, _ in gathered for i, a in part}
    failed = {i for _, bad in gathered for i in bad}
    result = None
    if dist.is_main:
        result = _score(task, settings, items, by_index, failed, data)
    return _from_main(result, dist)


def _from_main(result: TaskResult | None, dist: DistInfo) -> TaskResult:
    """Every rank returns the metrics (training compares them for keep_best on rank 0 only, but the loop
    stays symmetric); only rank 0 keeps the rows."""
    metrics = all_gather_objects(result.metrics if result is not None else None)[0]
    return TaskResult(metrics, result.rows if result is not None else [])


def _score(task, settings: EvalTaskSettings, items: list[EvalItem], by_index: dict[int, str], failed: set[int],
           data: TaskData) -> TaskResult:
    kept = [i for i in range(len(items)) if i in by_index]
    assert len(kept) + len(failed) == len(items), "every item is predicted once or counted as unreadable"
    scored_items = [items[i] for i in kept]
    texts = [by_index[i] for i in kept]
    scores, metrics = task.score(scored_items, texts, settings)
    problems = dict(data.problems)
    if failed:
        problems["unreadable_image"] = len(failed)
    metrics = {**metrics, "empty_predictions": sum(1 for t in texts if not t), "left_out": problems}
    rows = []
    for item, text, score in zip(scored_items, texts, scores):
        row = {"id": item.id, "prompt": item.sample.messages[-1]["content"], "prediction": text,
               "references": item.references, "score": score}
        row.update({k: item.meta[k] for k in ("answer_type", "category", "extracted") if item.meta.get(k)})
        rows.append(row)
    return TaskResult(metrics, rows)


@torch.no_grad()
def run_loss(ev: Evaluator, settings: EvalTaskSettings, batch_size: int, max_samples: int | None) -> TaskResult:
    """Mean loss per supervised token (and its perplexity) on any training-format file."""
    dataset = build_dataset(settings.data, ev.data, ev.template, ev.image_processor, settings.label)
    total, count = dataset_loss(ev.model, dataset, partial(pad_collate, pad_token_id=ev.template.tokenizer.pad_token_id),
                                ev.dist, batch_size, max_samples)
    loss = total / max(count, 1.0)
    return TaskResult({"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(count),
                       "n": min(len(dataset), max_samples or len(dataset))}, [])


def dataset_loss(model, dataset: ChatDataset, collate, dist: DistInfo, batch_size: int,
                 max_samples: int | None = None) -> tuple[float, float]:
    """(summed per-token loss, supervised tokens) over the dataset, each sample counted once."""
    n = min(len(dataset), max_samples or len(dataset))
    sampler = ResumableBatchSampler(n, batch_size, dist.rank, dist.world_size, shuffle=False)
    seen: set[int] = set()
    total = count = 0.0
    for indices in sampler:  # every rank as many batches (ZeRO-3); repeats of padding weigh zero
        batch = collate([dataset[i] for i in indices])
        weight = torch.tensor([0.0 if i in seen else 1.0 for i in indices])
        seen.update(indices)
        batch = {k: v.to(dist.device) for k, v in batch.items() if k not in META_KEYS}
        if weight.all():
            n_tok = float((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch, loss_reduction="sum").detach())
            count += n_tok
        else:  # the last batch repeats samples to fill: only the new ones count
            fresh = weight.bool().to(dist.device)
            labels = batch["labels"].clone()
            labels[~fresh] = -100
            loss = model(**{**batch, "labels": labels}, loss_reduction="sum")
            total += float(loss.detach())
            count += float((labels[:, 1:] != -100).sum())
    total, count = all_reduce_sum([total, count], dist.device)
    return total, count


# ---- outputs ---------------------------------------------------------------------------------------


def flat_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"by_type": {"yes/no": 0.9}}`` -> ``{"by_type/yes/no": 0.9}``: numbers only, for logs."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_metrics(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value
    return out


def write_outputs(result: TaskResult, out: Path, settings: EvalTaskSettings) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = {"task": settings.task, "name": settings.label, "data": settings.data}
    (out / "metrics.json").write_text(json.dumps({**meta, **result.metrics}, indent=1) + "\n")
    with open(out / "predictions.jsonl", "w") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in result.rows)


def table(label: str, metrics: dict[str, Any]) -> str:
    """Metric | value, fractions shown as they are (CIDEr and friends exceed 1)."""
    flat = flat_metrics(metrics)
    width = max(len(k) for k in flat) if flat else 10
    lines = [f"{label}", f"{'metric':<{width}}  value", f"{'-' * width}  -------"]
    for key, value in flat.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<{width}}  {shown}")
    return "\n".join(lines)


def safe_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)


# ---- during training -------------------------------------------------------------------------------


def evaluate(engine, val_set: ChatDataset | None, template: ChatTemplate, cfg, dist: DistInfo, collate,
             image_processor, out_dir: Path | None = None, step: int | None = None, tokenizer=None) -> dict[str, Any]:
    """Val loss, the ``eval.exact_match`` shorthand and every ``eval.tasks`` entry, as ``zerovl eval``
    computes them; returns flat figures (``val/<task>/<metric>``) and writes each task's predictions."""
    from zerovl.eval.items import items_from_samples

    engine.eval()
    e = cfg.eval
    ev = Evaluator(engine, engine.module, template, image_processor, cfg.data.max_pixels, cfg.data, dist,
                   synced=engine.zero_optimization_stage() == 3 and dist.world_size > 1,
                   tokenizer=tokenizer if tokenizer is not None else getattr(template, "tokenizer", None),
                   **retrieval_text(cfg.model))
    result: dict[str, Any] = {}
    if val_set is not None:
        total, count = dataset_loss(engine, val_set, collate, dist, e.batch_size)
        result["loss"] = total / max(count, 1.0)
        if e.exact_match:  # the legacy shorthand: the val file's last replies, exact match
            exact = EvalTaskSettings(task="vqa", data=cfg.data.val, metric="exact", prompt="", name="exact_match")
            metrics = run_items(ev, exact, items_from_samples(val_set.samples), e.batch_size,
                                e.max_new_tokens or 16, e.num_beams, e.max_samples, progress=False).metrics
            result.update(exact_match=metrics["accuracy"], exact_match_n=metrics["n"],
                          exact_match_by_type=metrics.get("by_type", {}))
    for task in eval_tasks(cfg):
        done = run_task(ev, task, e.batch_size, e.max_new_tokens or 0, e.num_beams, e.max_samples, progress=False)
        if dist.is_main and out_dir is not None:
            write_outputs(done, out_dir / "eval" / f"step_{step}" / safe_name(task.label), task)
        result.update({f"val/{task.label}/{k}": v for k, v in flat_metrics(done.metrics).items()})
    return result


def eval_tasks(cfg) -> list[EvalTaskSettings]:
    """``eval.tasks``, and for a retrieval model its ``data.val`` as a retrieval task (it has no val loss)."""
    tasks = list(cfg.eval.tasks)
    if cfg.model.retrieval is not None and cfg.data.val and not any(t.data == cfg.data.val for t in tasks):
        name = "retrieval" if all(t.label != "retrieval" for t in tasks) else "val_retrieval"
        tasks.append(EvalTaskSettings(task="retrieval", data=cfg.data.val, name=name))
    return tasks


def retrieval_text(model) -> dict[str, Any]:
    """Evaluator fields a retrieval model needs (its tokenizer comes with the built model)."""
    return {"text_length": model.retrieval.max_text_length} if model.retrieval is not None else {}


# ---- `zerovl eval` ---------------------------------------------------------------------------------


def _eval_ds_config(precision: str) -> dict[str, Any]:
    """Parameters partitioned, no optimizer: DeepSpeed then only fetches each module's shards for its forward."""
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 3}, "bf16": {"enabled": precision == "bf16"},
            "fp16": {"enabled": precision == "fp16"}}


def load_evaluator(source: str | Path, dist: DistInfo, zero: str = "auto") -> Evaluator:
    """A run directory, one of its checkpoints, or an export, as an :class:`Evaluator` on this rank.

    ZeRO-3 (``zero="3"``, or ``auto`` for a run trained under ZeRO-3, on several ranks): the model is built
    partitioned; rank 0 rebuilds the full weights on the CPU and hands them over one tensor at a time, so
    no device ever holds the whole model. Otherwise every rank holds a full copy (data parallel)."""
    from zerovl.config import load_config
    from zerovl.engine import checkpoint
    from zerovl.engine.restore import (
        export_settings,
        is_export,
        load_export,
        load_trained,
        split_run_and_checkpoint,
    )

    export = is_export(source)
    if export:
        settings, cfg, trained_stage = export_settings(Path(source))[0], None, 0
    else:
        run_dir, ckpt = split_run_and_checkpoint(source)
        cfg = load_config(run_dir / "config.yaml", environ={})
        settings, trained_stage = cfg.model, int(checkpoint.read_state(ckpt).get("zero_stage", 0))
    # an export has no data section: the reader defaults (its training files are not needed, so unvalidated)
    data = cfg.data if cfg is not None else DataSettings.model_construct()
    precision = "fp32" if dist.on_cpu else (cfg.train.precision if cfg is not None else "bf16")
    shard = dist.world_size > 1 and (zero == "3" or (zero == "auto" and trained_stage == 3))

    system = cfg.data.system_prompt if cfg is not None else None

    def full_model():
        return load_export(source, precision)[1] if export else load_trained(source, precision)[1]

    if not shard:
        built = full_model()
        built.model.to(dist.device)
        return Evaluator(built.model, built.model, built.template(system), built.image_processor, data.max_pixels,
                         data, dist, synced=False, tokenizer=built.tokenizer, **retrieval_text(settings))
    import deepspeed

    from zerovl.engine.zero3 import load_partitioned, zero3_construction
    from zerovl.models.builder import build_model, import_model_classes

    full = full_model().model.state_dict() if dist.is_main else None
    ds_config = _eval_ds_config(precision)
    import_model_classes(settings)
    with zero3_construction(ds_config):
        built = build_model(settings, precision, data.max_pixels)
    load_partitioned(built.model, full)
    del full
    engine, *_ = deepspeed.initialize(model=built.model, config=ds_config)
    engine.eval()
    return Evaluator(engine, engine.module, built.template(system), built.image_processor, data.max_pixels, data,
                     dist, synced=True, tokenizer=built.tokenizer, **retrieval_text(settings))


def default_out(source: str | Path, label: str) -> Path:
    """``RUN/eval/<task>``, ``RUN/eval/step_N/<task>`` for a checkpoint, ``EXPORT/eval/<task>``."""
    from zerovl.engine.restore import is_export

    source = Path(source)
    if (source / "config.yaml").is_file() or is_export(source):
        return source / "eval" / safe_name(label)
    return source.parent.parent / "eval" / source.name / safe_name(label)


def eval_command(source: str, settings: EvalTaskSettings, out: str | None = None, batch_size: int = 16,
                 max_new_tokens: int | None = None, num_beams: int = 1, max_samples: int | None = None,
                 zero: str = "auto") -> dict[str, Any]:
    from zerovl.engine.distributed import init_distributed, shutdown

    task_for(settings)  # an unknown metric stops before any model is loaded
    dist = init_distributed()
    try:
        ev = load_evaluator(source, dist, zero)
        result = run_task(ev, settings, batch_size, max_new_tokens or 0, num_beams, max_samples)
        if dist.is_main:
            where = Path(out) if out else default_out(source, settings.label)
            write_outputs(result, where, settings)
            print(table(f"{settings.label} on {settings.data} ({len(result.rows) or result.metrics.get('n')} "
                        f"samples, {dist.world_size} rank(s){', ZeRO-3' if ev.synced else ''})", result.metrics))
            print(f"wrote {where / 'metrics.json'} and {where / 'predictions.jsonl'}")
        return result.metrics
    finally:
        shutdown()
