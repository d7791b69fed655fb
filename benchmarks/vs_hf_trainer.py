"""zerovl against Hugging Face Trainer + DeepSpeed: same model, same DeepSpeed config, same batches.

    python benchmarks/vs_hf_trainer.py [--steps 40 --rounds 3 --nproc 2] [--smoke] [overrides]

Both train the demo model (configs/demo.yaml) built by ``zerovl.models.builder.build_model``. HF
Trainer gets the DeepSpeed config zerovl resolves (``build_ds_config``: same ZeRO stage, optimizer,
precision, clipping, batch sizes), matching TrainingArguments, a constant LR, no logging or saving,
and zerovl's dataset and batch sampler (so both see the same batches in the same order). Its
per-step time comes from a callback at the end of each optimizer step; zerovl's from its
metrics.jsonl timestamps. Goal: zerovl faster (ratio < 1).
"""

from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402


def hf_trainer(cfg, steps: int, run_dir: Path) -> tuple[list[tuple[int, float]], float | None]:
    """Train with transformers.Trainer + DeepSpeed; (per-step timestamps, step-1 loss) on rank 0."""
    import torch
    from torch.utils.data import DataLoader
    from transformers import Trainer, TrainerCallback

    from zerovl.data.collate import META_KEYS, pad_collate
    from zerovl.data.pipeline import build_train_data
    from zerovl.data.template import ChatTemplate
    from zerovl.engine.distributed import init_distributed
    from zerovl.engine.ds_config import build_ds_config
    from zerovl.models.builder import build_model
    from zerovl.recipes.train import set_seed

    dist = init_distributed()
    set_seed(cfg.train.seed)
    built = build_model(cfg.model, cfg.train.precision)
    template = ChatTemplate(built.tokenizer, cfg.model.image_token, built.tokens_per_image, cfg.data.system_prompt)
    pad = partial(pad_collate, pad_token_id=built.tokenizer.pad_token_id)

    def collate(items):
        return {k: v for k, v in pad(items).items() if k not in META_KEYS}

    data = build_train_data(cfg.data, template, built.image_processor, pad, cfg.train.micro_batch_size,
                            cfg.train.gradient_accumulation_steps, dist.rank, dist.world_size, cfg.train.seed,
                            tokenizer_dir=cfg.model.tokenizer or cfg.model.llm.path)
    resolved = cfg.model_copy(deep=True)
    ds_config = build_ds_config(resolved, dist.world_size, dist.on_cpu)
    t = resolved.train

    class SameBatches(Trainer):
        def get_train_dataloader(self):  # zerovl's sampler already shards by rank
            if hasattr(data.sampler, "set_position"):
                data.sampler.set_position(0, 0)
            return DataLoader(data.dataset, batch_sampler=data.sampler, collate_fn=collate,
                              num_workers=cfg.data.num_workers, prefetch_factor=4 if cfg.data.num_workers else None)

    stamps: list[tuple[int, float]] = []
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append((state.global_step, time.perf_counter()))

    class FirstLoss(SameBatches):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if len(losses) < t.gradient_accumulation_steps:
                losses.append((out[0] if return_outputs else out).detach().float().item())
            return out

    args = _common.trainer_arguments(resolved, ds_config, dist.on_cpu, run_dir, max_steps=steps)
    trainer = FirstLoss(model=_common.trainer_model(built.model), args=args, train_dataset=data.dataset,
                        callbacks=[Clock()])
    trainer.train()
    from zerovl.engine.distributed import all_reduce_sum

    first = all_reduce_sum([sum(losses)], dist.device)[0] / (len(losses) * dist.world_size) if losses else None
    del trainer
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return stamps, first


def main() -> None:
    args = _common.arguments(__doc__.splitlines()[0])
    if not _common.is_rank():
        result = _common.relaunch(__file__, args)
        if "error" in result:
            print(f"HF Trainer + DeepSpeed could not run: {result['error']}")
            raise SystemExit(1)
        times = result["seconds_per_step"]
        for name in ("hf_trainer", "zerovl"):
            print(f"{name:>10}: " + ", ".join(f"{t * 1000:.1f}" for t in times[name]) + " ms/step")
        hf_loss, zerovl_loss = result["first_losses"]["hf_trainer"][0], result["first_losses"]["zerovl"][0]
        if hf_loss is not None and zerovl_loss is not None:
            print(f"step-1 loss (mean over ranks): HF Trainer {hf_loss:.6f}, zerovl {zerovl_loss:.6f}")
        print(f"zerovl / HF Trainer per-round ratios: {', '.join(f'{r:.3f}' for r in result['ratios'])}")
        print(f"zerovl / HF Trainer (ratio of medians): {result['ratio_of_medians']:.3f} "
              f"({'zerovl faster' if result['ratio_of_medians'] < 1 else 'zerovl slower'}; goal < 1)")
        if args.smoke:
            print(_common.SMOKE_NOTE)
        return

    import traceback

    from zerovl.engine.distributed import init_distributed

    def hf_or_reason(cfg, run_dir: Path):
        try:
            return hf_trainer(cfg, args.steps, run_dir)
        except Exception as e:  # record why HF Trainer cannot run here, exactly
            if init_distributed().is_main:
                traceback.print_exc()
                _common.write_result(Path(args.work), {"error": f"{type(e).__name__}: {e}"})
            raise _common.ContenderFailed from e

    _common.alternate_rounds(args, "hf_trainer", hf_or_reason)

if __name__ == "__main__":
    main()
