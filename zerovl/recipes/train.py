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
from tqdm.contrib.logging import logging_redirect_tqdm

from zerovl import __version__
from zerovl.config import Config, save_config
from zerovl.data.collate import META_KEYS, pad_collate
from zerovl.data.dataset import build_dataset
from zerovl.data.pairs import build_pair_data, pair_collate
from zerovl.data.pipeline import build_train_data
from zerovl.engine import checkpoint
from zerovl.engine.distributed import DistInfo, all_gather_floats, init_distributed, shutdown
from zerovl.engine.ds_config import build_ds_config, zero_stage
from zerovl.engine.loss_weighting import backward_scale, step_token_count
from zerovl.engine.metrics import MetricsLog, progress_bar
from zerovl.engine.optim import param_groups
from zerovl.engine.preemption import GracefulStop
from zerovl.engine.schedule import lr_factor, set_lr
from zerovl.engine.telemetry import (
    FlopCounter,
    StepTimer,
    full_numel,
    optimizer_state_bytes,
    peak_memory_bytes,
    replicated_grad_norm,
)
from zerovl.engine.zero3 import zero3_construction
from zerovl.models.builder import build_model, import_model_classes, named_parts
from zerovl.recipes.demo import require_demo_data
from zerovl.recipes.evaluate import eval_tasks, evaluate
from zerovl.recipes.features import check_cacheable, use_feature_cache

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


def parameter_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of parameters held by this rank, bytes of the whole model)."""
    local = total = 0
    for p in model.parameters():
        local += (p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()) * p.element_size()
        total += full_numel(p) * p.element_size()
    return local, total


def part_learning_rates(cfg: Config) -> dict[str, float]:
    m = cfg.model
    return {"llm": m.llm.lr or cfg.train.lr, "connector": m.connector.lr or cfg.train.lr,
            "vision": (m.vision.lr if m.vision is not None else None) or cfg.train.lr}


def train(cfg: Config) -> dict[str, Any]:
    # ---- setup -------------------------------------------------------------------------------
    require_demo_data(cfg)  # configs/demo.yaml before `zerovl demo`: say so, not "cannot load a tokenizer"
    check_cacheable(cfg)  # data.feature_cache needs a frozen vision tower: say so before building anything
    dist: DistInfo = init_distributed(cfg.train.dist_timeout_s)
    import deepspeed

    out = Path(cfg.train.output_dir)
    checkpoint.ensure_writable(out, dist.rank)  # every rank, before any collective: all stop together
    ds_config = build_ds_config(cfg, dist.world_size, dist.on_cpu)  # may adopt values from DeepSpeed's config
    if dist.is_main:
        save_config(cfg, out / "config.yaml")
    set_seed(cfg.train.seed)

    import_model_classes(cfg.model)
    with zero3_construction(ds_config):  # ZeRO-3: no rank ever holds the whole model
        built = build_model(cfg.model, cfg.train.precision, cfg.data.max_pixels)
    built.model.loss_chunk_tokens = cfg.train.loss_chunk_tokens  # the LM loss in chunks (models/loss.py)
    param_bytes = parameter_bytes(built.model)
    template = built.template(cfg.data.system_prompt)
    if cfg.model.retrieval is not None:  # image-caption pairs, no chat; data.val is scored as retrieval
        val_set, collate = None, pair_collate
        train_data = build_pair_data(cfg.data, built.tokenizer, built.image_processor,
                                     cfg.model.retrieval.max_text_length, cfg.train.micro_batch_size,
                                     cfg.train.gradient_accumulation_steps, dist.rank, dist.world_size, cfg.train.seed)
    else:
        val_set = (build_dataset(cfg.data.val, cfg.data, template, built.image_processor, "data.val")
                   if cfg.data.val else None)
        collate = partial(pad_collate, pad_token_id=built.tokenizer.pad_token_id)
        train_data = build_train_data(cfg.data, template, built.image_processor, collate,
                                      cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps, dist.rank,
                                      dist.world_size, cfg.train.seed, tokenizer_dir=cfg.model.tokenizer_path)
    train_set, sampler, stream = train_data.dataset, train_data.sampler, train_data.stream

    accum = cfg.train.gradient_accumulation_steps
    steps_per_epoch = max(1, math.ceil(stream.batches_per_epoch / accum))
    total_steps = cfg.train.max_steps or math.ceil(cfg.train.epochs * steps_per_epoch)
    min_ratio = cfg.train.min_lr / cfg.train.lr

    groups = param_groups(named_parts(built.model), part_learning_rates(cfg), cfg.train.weight_decay)
    trainable = sum(full_numel(p) for g in groups for p in g["params"])
    total = sum(full_numel(p) for p in built.model.parameters())
    engine, optimizer, _, _ = deepspeed.initialize(model=built.model, model_parameters=groups, config=ds_config)
    loaded = all_gather_floats([float(param_bytes[0])], dist.device)
    if cfg.data.feature_cache:  # frozen prefix computed once (built here if missing); batches carry its output
        use_feature_cache(cfg, engine.module, built.image_processor, train_set, dist)
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
        nonlocal last_saved
        ckpt = checkpoint.save(engine, out, at_step, state, dist, cfg.train.keep_last,
                               trainable_only=trainable < total)
        last_saved = at_step
        if dist.is_main:
            size = checkpoint.directory_bytes(ckpt)
            metrics.write({"event": "checkpoint", "step": at_step, "bytes": size, "trainable_only": trainable < total})
            log.info("saved checkpoint %s (%.1f MB%s)", ckpt, size / 2**20,
                     ", trainable parameters only" if trainable < total else "")

    best = checkpoint.Best.load(out, cfg.train.keep_best)

    def run_eval(at_step: int) -> dict[str, Any]:
        result = evaluate(engine, val_set, template, cfg, dist, collate, built.image_processor, out, at_step,
                          tokenizer=built.tokenizer)
        metrics.write({"split": "val", "step": at_step, **result})
        if best.improved_by(result):  # the same figures on every rank: all save together
            if last_saved != at_step:
                save(at_step)
            best.mark(at_step, dist.is_main)
        engine.train()
        return result

    # ---- loop --------------------------------------------------------------------------------
    metrics = MetricsLog(out, dist.is_main, tensorboard=cfg.train.tensorboard)
    metrics.write({"event": "model_loaded", "step": step, "param_bytes_total": param_bytes[1],
                   "param_bytes_per_rank": [int(x[0]) for x in loaded]})
    bar = progress_bar(total_steps, step, dist.is_main)
    timer = StepTimer(dist.device)
    flops = FlopCounter(named_parts(built.model), cfg.train.peak_tflops, dist.device, dist.world_size)
    engine.train()
    skipped = 0
    memory_warned = False
    state_bytes = 0
    last_saved = step if resume_from is not None else -1
    stop_at = min(total_steps, cfg.train.stop_after_steps or total_steps)
    stop_signal = GracefulStop().install()
    # ZeRO-0 with fp32 computes the norm only to clip it and then drops it: take it ourselves
    keep_norm = engine.zero_optimization_stage() == 0 and not (engine.fp16_enabled() or engine.bfloat16_enabled())
    own_norm = None
    by_tokens = cfg.train.loss_normalization == "tokens"
    evaluates = val_set is not None or bool(eval_tasks(cfg))
    # log lines above the bar; the root logger holds the console handler (redirecting "zerovl" alone
    # printed each line twice: once through tqdm, once propagated to root)
    with logging_redirect_tqdm(loggers=[logging.getLogger()]):
        while step < stop_at:
            lr = set_lr(optimizer, lr_factor(step, total_steps, cfg.train.warmup_steps, cfg.train.schedule, min_ratio))
            started = time.perf_counter()
            timer.reset()
            samples = tokens = vision_tokens = 0
            with timer.phase("data"):  # the whole step's micro-batches first: its token count weights each
                micro_batches = [stream.next() for _ in range(accum)]
            for batch in micro_batches:  # host-side figures from the CPU batches: no device sync
                skipped += int(batch["num_skipped"])
                samples += int(batch["num_samples"])
                tokens += int(batch["attention_mask"].sum())
                vision_tokens += built.model.vision_token_count(batch)
            if by_tokens:
                total_tokens = step_token_count(micro_batches, dist.device)  # one all-reduce per step
                scale = backward_scale(total_tokens, dist.world_size, accum)
            loss_sum = torch.zeros((), dtype=torch.float64, device=dist.device)  # summed on the device
            part_sums: dict[str, torch.Tensor] = {}  # a model with several objectives logs each (loss_parts)
            for batch in micro_batches:  # DeepSpeed applies the optimizer at the accumulation boundary
                batch = {k: v.to(dist.device) for k, v in batch.items() if k not in META_KEYS}
                with timer.phase("forward"):
                    loss = engine(**batch, loss_reduction="sum" if by_tokens else "mean")
                with timer.phase("backward"):
                    engine.backward(loss * scale if by_tokens else loss)
                with timer.phase("step"):
                    if keep_norm and engine.is_gradient_accumulation_boundary():
                        own_norm = replicated_grad_norm(engine.module)
                    engine.step()
                loss_sum += loss.detach()
                for name, value in getattr(engine.module, "loss_parts", {}).items():
                    part_sums[name] = part_sums.get(name, 0.0) + value
            step += 1
            state_bytes = state_bytes or optimizer_state_bytes(engine)  # Adam creates its state at step 1
            # one collective per step: every rank's figures, memory and stop signal (a rank's SIGTERM
            # thereby reaches all ranks at the same step)
            per_rank = all_gather_floats([loss_sum.item(), samples, tokens, vision_tokens, stop_signal.flag,
                                          skipped, peak_memory_bytes(), state_bytes,
                                          *(float(v) for v in part_sums.values())], dist.device)
            loss_sum, samples, tokens, vision_tokens, stop, skipped_all = (sum(r[i] for r in per_rank)
                                                                           for i in range(6))
            elapsed = time.perf_counter() - started
            grad_norm = engine.get_global_grad_norm()
            grad_norm = own_norm if grad_norm is None else grad_norm
            peaks = [int(r[6]) for r in per_rank]
            record = {"split": "train", "step": step, "epoch": stream.epoch, "consumed": stream.consumed,
                      # the step's global token mean (tokens), or the mean of micro-batch means (samples)
                      "loss": loss_sum / (float(total_tokens) if by_tokens else accum * dist.world_size), "lr": lr,
                      "grad_norm": float(grad_norm) if grad_norm is not None else None,
                      "samples_per_s": samples / elapsed, "tokens_per_s": tokens / elapsed, "skipped_samples": int(skipped_all),
                      "data_wait_frac": timer.seconds["data"] / elapsed,
                      **{f"time_{k}": v for k, v in timer.seconds.items()}, "time_total": elapsed,
                      **flops.figures(tokens, vision_tokens, elapsed),
                      "peak_mem_bytes": peaks, "optimizer_state_bytes": [int(r[7]) for r in per_rank],
                      **{f"loss_{name}": sum(r[8 + i] for r in per_rank) / (accum * dist.world_size)
                         for i, name in enumerate(part_sums)}}
            if dist.is_main and not memory_warned and min(peaks) > 0 and max(peaks) > 1.3 * min(peaks):
                memory_warned = True
                log.warning("uneven memory: rank %d peaks at %.1f GiB, rank %d at %.1f GiB (>30%% apart)",
                            peaks.index(max(peaks)), max(peaks) / 2**30, peaks.index(min(peaks)), min(peaks) / 2**30)
            if step % cfg.train.log_every == 0 or step == stop_at:
                metrics.write(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", sps=f"{record['samples_per_s']:.1f}",
                            refresh=False)
            if cfg.train.save_every and step % cfg.train.save_every == 0:
                save(step)
            if stop:
                stop_signal.received = stop_signal.received or "a stop signal on another rank"
                break
            if cfg.train.eval_every and evaluates and step % cfg.train.eval_every == 0 and step < total_steps:
                run_eval(step)
    stop_signal.restore()
    bar.close()

    # ---- finish ------------------------------------------------------------------------------
    if last_saved != step and (cfg.train.save_final or stop_signal.received or step < total_steps):
        save(step)
    result: dict[str, Any] = {"step": step}
    if stop_signal.received:
        if dist.is_main:
            log.warning("received %s: stopped after step %d/%d with a checkpoint; run the same command again "
                        "to resume (train.resume=auto)", stop_signal.received, step, total_steps)
    elif evaluates and step == total_steps:
        result.update(run_eval(step))
    if dist.is_main:
        log.info("done: %s", {k: v for k, v in result.items() if not isinstance(v, dict)})
    metrics.close()
    shutdown()
    return result
