"""``zerovl train``: the whole training loop, top to bottom.

setup (distributed, config, model, data, DeepSpeed engine, resume) -> loop over optimizer steps
(LR from the step, micro-batches through ``engine.backward``/``engine.step``, metrics) -> periodic and
final checkpoints and evaluation. Everything DeepSpeed-specific lives in ``zerovl.engine``.
"""

from __future__ import annotations

import logging
import math
import random
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zerovl import __version__
from zerovl.config import Config, save_config
from zerovl.data.collate import META_KEYS, pad_collate
from zerovl.data.dataset import build_dataset
from zerovl.data.loader import BatchStream
from zerovl.data.sampler import ResumableBatchSampler
from zerovl.data.template import ChatTemplate
from zerovl.engine import checkpoint
from zerovl.engine.distributed import DistInfo, all_reduce_sum, init_distributed, shutdown
from zerovl.engine.ds_config import build_ds_config, zero_stage
from zerovl.engine.metrics import MetricsLog, progress_bar
from zerovl.engine.optim import param_groups
from zerovl.engine.preemption import GracefulStop
from zerovl.engine.schedule import lr_factor, set_lr
from zerovl.models.builder import build_model, model_parts
from zerovl.recipes.evaluate import evaluate

log = logging.getLogger("zerovl.train")


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def library_versions() -> dict[str, str]:
    import deepspeed
    import transformers

    return {"zerovl": __version__, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__}


def part_learning_rates(cfg: Config) -> dict[str, float]:
    m = cfg.model
    lrs = {"llm": m.llm.lr or cfg.train.lr, "connector": m.connector.lr or cfg.train.lr}
    if m.vision is not None:
        lrs["vision"] = m.vision.lr or cfg.train.lr
    return lrs


def train(cfg: Config) -> dict[str, Any]:
    # ---- setup -------------------------------------------------------------------------------
    dist: DistInfo = init_distributed()
    import deepspeed

    out = Path(cfg.train.output_dir)
    ds_config = build_ds_config(cfg, dist.world_size, dist.on_cpu)  # may adopt values from DeepSpeed's config
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    set_seed(cfg.train.seed)

    built = build_model(cfg.model, cfg.train.precision)
    template = ChatTemplate(built.tokenizer, cfg.model.image_token, built.tokens_per_image, cfg.data.system_prompt)
    train_set = build_dataset(cfg.data.train, cfg.data, template, built.image_processor, "data.train")
    val_set = (build_dataset(cfg.data.val, cfg.data, template, built.image_processor, "data.val")
               if cfg.data.val else None)
    collate = partial(pad_collate, pad_token_id=built.tokenizer.pad_token_id)
    sampler = ResumableBatchSampler(len(train_set), cfg.train.micro_batch_size, dist.rank, dist.world_size,
                                    cfg.data.shuffle, cfg.train.seed)
    stream = BatchStream(train_set, sampler, collate, cfg.data.num_workers)

    accum = cfg.train.gradient_accumulation_steps
    steps_per_epoch = max(1, math.ceil(stream.batches_per_epoch / accum))
    total_steps = cfg.train.max_steps or math.ceil(cfg.train.epochs * steps_per_epoch)
    min_ratio = cfg.train.min_lr / cfg.train.lr

    groups = param_groups(model_parts(built.model), part_learning_rates(cfg), cfg.train.weight_decay)
    trainable = sum(p.numel() for g in groups for p in g["params"])
    total = sum(p.numel() for p in built.model.parameters())
    engine, optimizer, _, _ = deepspeed.initialize(model=built.model, model_parameters=groups, config=ds_config)
    if dist.is_main:
        log.info("model: %.2fM parameters, %.2fM trainable; %d train samples (%d per epoch per rank in %d "
                 "micro-batches); %d optimizer steps; ZeRO-%d, %s, world %d", total / 1e6, trainable / 1e6,
                 len(train_set), sampler.per_rank, stream.batches_per_epoch, total_steps, zero_stage(ds_config),
                 cfg.train.precision, dist.world_size)

    step = 0
    resume_from = checkpoint.resolve_resume(cfg.train.resume, out)
    if resume_from is not None:
        saved = checkpoint.read_state(resume_from)
        changed = checkpoint.check_compatible(saved["config"], cfg.model_dump(mode="json"), resume_from)
        if changed and dist.is_main:
            log.warning("resuming with changed settings: %s", ", ".join(changed))
        state = checkpoint.load(engine, resume_from, dist)
        step = state["step"]
        stream.load_state_dict(state["data"])
        if dist.is_main:
            log.info("resumed from %s at step %d (epoch %d, %d samples of it consumed)", resume_from, step,
                     stream.epoch, stream.consumed)

    def save(at_step: int) -> None:
        state = {"step": at_step, "data": stream.state_dict(), "world_size": dist.world_size,
                 "zero_stage": zero_stage(ds_config),
                 "schedule": {"type": cfg.train.schedule, "warmup_steps": cfg.train.warmup_steps,
                              "total_steps": total_steps, "min_ratio": min_ratio},
                 "config": cfg.model_dump(mode="json"), "versions": library_versions()}
        ckpt = checkpoint.save(engine, out, at_step, state, dist, cfg.train.keep_last,
                               trainable_only=trainable < total)
        if dist.is_main:
            size = checkpoint.directory_bytes(ckpt)
            metrics.write({"event": "checkpoint", "step": at_step, "bytes": size, "trainable_only": trainable < total})
            log.info("saved checkpoint %s (%.1f MB%s)", ckpt, size / 2**20,
                     ", trainable parameters only" if trainable < total else "")

    def run_eval(at_step: int) -> dict[str, Any]:
        result = evaluate(engine, val_set, template, cfg, dist, collate)
        metrics.write({"split": "val", "step": at_step, **result})
        engine.train()
        return result

    # ---- loop --------------------------------------------------------------------------------
    metrics = MetricsLog(out, dist.is_main)
    bar = progress_bar(total_steps, step, dist.is_main)
    engine.train()
    skipped = 0
    last_saved = step if resume_from is not None else -1
    stop_at = min(total_steps, cfg.train.stop_after_steps or total_steps)
    stop_signal = GracefulStop().install()
    while step < stop_at:
        lr = set_lr(optimizer, lr_factor(step, total_steps, cfg.train.warmup_steps, cfg.train.schedule, min_ratio))
        started = time.perf_counter()
        loss_sum = samples = tokens = 0.0
        for _ in range(accum):  # DeepSpeed applies the optimizer at the accumulation boundary
            batch = stream.next()
            skipped += int(batch.pop("num_skipped"))
            batch = {k: v.to(dist.device) for k, v in batch.items() if k not in META_KEYS}
            loss = engine(**batch)
            engine.backward(loss)
            engine.step()
            loss_sum += loss.item()
            samples += batch["input_ids"].shape[0]
            tokens += batch["attention_mask"].sum().item()
        step += 1
        loss_sum, samples, tokens = all_reduce_sum([loss_sum, samples, tokens], dist.device)
        elapsed = time.perf_counter() - started
        grad_norm = engine.get_global_grad_norm()
        record = {"split": "train", "step": step, "epoch": stream.epoch, "consumed": stream.consumed, "loss": loss_sum / (accum * dist.world_size), "lr": lr,
                  "grad_norm": float(grad_norm) if grad_norm is not None else None,
                  "samples_per_s": samples / elapsed, "tokens_per_s": tokens / elapsed, "skipped_samples": skipped}
        if step % cfg.train.log_every == 0 or step == total_steps:
            metrics.write(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", sps=f"{record['samples_per_s']:.1f}",
                        refresh=False)
        if cfg.train.save_every and step % cfg.train.save_every == 0:
            save(step)
            last_saved = step
        if stop_signal.requested(dist.device):
            break
        if cfg.train.eval_every and val_set is not None and step % cfg.train.eval_every == 0 and step < total_steps:
            run_eval(step)
    stop_signal.restore()
    bar.close()

    # ---- finish ------------------------------------------------------------------------------
    if last_saved != step:
        save(step)
    result: dict[str, Any] = {"step": step}
    if stop_signal.received:
        if dist.is_main:
            log.warning("received %s: stopped after step %d/%d with a checkpoint; run the same command again "
                        "to resume (train.resume=auto)", stop_signal.received, step, total_steps)
    elif val_set is not None and step == total_steps:
        result.update(run_eval(step))
    if dist.is_main:
        log.info("done: %s", {k: v for k, v in result.items() if not isinstance(v, dict)})
    metrics.close()
    shutdown()
    return result
