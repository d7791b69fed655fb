"""zerovl's training step against a minimal hand-written DeepSpeed loop: same model, same batches.

    python benchmarks/overhead_vs_plain_deepspeed.py [--steps 40 --rounds 3 --nproc 2] [--smoke] [overrides]

The model is the demo's (configs/demo.yaml: SigLIP-style tower + MLP + tiny Qwen2), built by
``zerovl.models.builder.build_model`` for both; the DeepSpeed config is ``build_ds_config``'s for
both; the batches come from the same dataset and sampler in the same order. The plain loop is what a
user would write by hand — DataLoader, ``engine(**batch)``, ``engine.backward``, ``engine.step`` —
with no LR schedule, metrics, telemetry, preemption handling or progress bar; zerovl's is
``zerovl.recipes.train.train`` unchanged, timed from the per-step timestamps of its metrics.jsonl
(so everything it does per step counts: LR, timers, the per-step all-reduce and memory gather,
metrics writes, the progress bar). Goal: zerovl at most 3 % slower.
"""

from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402


def plain_deepspeed(cfg, steps: int, groups: str) -> tuple[list[tuple[int, float]], float]:
    """The hand-written loop: (wall-clock time at the end of each optimizer step, step-1 loss averaged
    over ranks). ``groups="zerovl"`` hands DeepSpeed zerovl's parameter groups (per-part LR, no weight
    decay on norms/biases: the same optimizer maths), ``"single"`` all trainable parameters in one."""
    import deepspeed
    from torch.utils.data import DataLoader

    from zerovl.data.collate import META_KEYS, pad_collate
    from zerovl.data.pipeline import build_train_data
    from zerovl.data.template import ChatTemplate
    from zerovl.engine.distributed import all_reduce_sum, init_distributed
    from zerovl.engine.ds_config import build_ds_config
    from zerovl.engine.optim import param_groups
    from zerovl.models.builder import build_model, named_parts
    from zerovl.recipes.train import part_learning_rates, set_seed

    dist = init_distributed()  # already initialised: returns the same world
    set_seed(cfg.train.seed)
    built = build_model(cfg.model, cfg.train.precision)
    template = ChatTemplate(built.tokenizer, cfg.model.image_token, built.tokens_per_image, cfg.data.system_prompt)
    collate = partial(pad_collate, pad_token_id=built.tokenizer.pad_token_id)
    data = build_train_data(cfg.data, template, built.image_processor, collate, cfg.train.micro_batch_size,
                            cfg.train.gradient_accumulation_steps, dist.rank, dist.world_size, cfg.train.seed,
                            tokenizer_dir=cfg.model.tokenizer or cfg.model.llm.path)
    ds_config = build_ds_config(cfg.model_copy(deep=True), dist.world_size, dist.on_cpu)
    if groups == "zerovl":
        params = param_groups(named_parts(built.model), part_learning_rates(cfg), cfg.train.weight_decay)
    else:
        params = [p for p in built.model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=built.model, model_parameters=params, config=ds_config)
    engine.train()

    def batches():
        epoch = 0
        while True:
            if hasattr(data.sampler, "set_position"):
                data.sampler.set_position(epoch, 0)
            loader = DataLoader(data.dataset, batch_sampler=data.sampler, collate_fn=collate,
                                num_workers=cfg.data.num_workers, prefetch_factor=4 if cfg.data.num_workers else None)
            yield from loader
            epoch += 1

    stream = batches()
    stamps, losses = [], []
    for step in range(1, steps + 1):
        for _ in range(cfg.train.gradient_accumulation_steps):
            batch = {k: v.to(dist.device) for k, v in next(stream).items() if k not in META_KEYS}
            loss = engine(**batch)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())  # what any loop logs
        stamps.append((step, time.perf_counter()))
    engine.destroy()
    accum = cfg.train.gradient_accumulation_steps
    first_loss = all_reduce_sum([sum(losses[:accum])], dist.device)[0] / (accum * dist.world_size)
    return stamps, first_loss


def main() -> None:
    args = _common.arguments(__doc__.splitlines()[0], extra=lambda p: p.add_argument(
        "--plain-groups", choices=("zerovl", "single"), default="zerovl",
        help="parameter groups of the plain loop: zerovl's (same optimizer maths, default) or one group"))
    if not _common.is_rank():
        result = _common.relaunch(__file__, args)
        times = result["seconds_per_step"]
        for name in ("plain", "zerovl"):
            print(f"{name:>7}: " + ", ".join(f"{t * 1000:.1f}" for t in times[name]) + " ms/step")
        plain_loss, zerovl_loss = result["first_losses"]["plain"][0], result["first_losses"]["zerovl"][0]
        if zerovl_loss is not None:
            same = "identical: same init and batches" if plain_loss == zerovl_loss else "DIFFERENT"
            print(f"step-1 loss (mean over ranks): plain {plain_loss:.6f}, zerovl {zerovl_loss:.6f} ({same})")
        print(f"zerovl / plain DeepSpeed per-round ratios: {', '.join(f'{r:.3f}' for r in result['ratios'])}")
        print(f"zerovl / plain DeepSpeed (ratio of medians): {result['ratio_of_medians']:.3f} "
              f"({(result['ratio_of_medians'] - 1) * 100:+.1f} %; goal <= +3 %)")
        if args.smoke:
            print(_common.SMOKE_NOTE)
        return

    _common.alternate_rounds(args, "plain", lambda cfg, _: plain_deepspeed(cfg, args.steps, args.plain_groups))

if __name__ == "__main__":
    main()
