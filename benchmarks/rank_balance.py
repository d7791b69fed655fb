"""Per-step load of the heaviest rank relative to the mean rank, with and without `data.balance`.

Load = text tokens + image tokens of the samples a rank gets in one optimizer step (micro-batch x
accumulation). Costs follow a multimodal mix: a quarter text-only chats (log-normal text length), the
rest with 1, 2 or 4 images of 256 tokens each, capped at max_length 2048. Batches come from the real
sampler, for every rank, over one epoch.

    .venv/bin/python benchmarks/rank_balance.py [--samples 32768] [--micro-batch 4] [--accumulation 2] [--smoke]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from zerovl.data.plan import EpochPlan
from zerovl.data.sampler import ResumableBatchSampler

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402


def multimodal_costs(n: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    text = np.clip(rng.lognormal(4.5, 0.8, n), 16, 1024).astype(int)
    images = rng.choice([0, 1, 2, 4], size=n, p=[0.25, 0.6, 0.1, 0.05]) * 256
    return np.minimum(text + images, 2048).tolist()


def step_ratios(costs: list[int], world: int, micro: int, accumulation: int, balance: bool) -> np.ndarray:
    plan = EpochPlan([len(costs)], seed=0, lengths=costs)
    loads = []
    for rank in range(world):
        sampler = ResumableBatchSampler(len(costs), micro, rank, world, seed=0, plan=plan,
                                        balance_steps=accumulation if balance else 0)
        loads.append([sum(costs[i] for i in batch) for batch in sampler])
    per_micro = np.array(loads)  # ranks x micro-steps
    steps = per_micro.shape[1] // accumulation
    per_step = per_micro[:, : steps * accumulation].reshape(world, steps, accumulation).sum(-1)
    return per_step.max(0) / per_step.mean(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32768)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help=_common.SMOKE_HELP)
    args = parser.parse_args()
    if args.smoke:
        args.samples = 1024
    costs = multimodal_costs(args.samples)
    print(f"{args.samples} samples, cost per sample: mean {np.mean(costs):.0f}, p5 {np.percentile(costs, 5):.0f}, "
          f"p95 {np.percentile(costs, 95):.0f}; micro-batch {args.micro_batch} x accumulation {args.accumulation}")
    print("heaviest rank / mean rank, per optimizer step (mean | p95 | worst)")
    for world in (2, 8, 32):
        cells = []
        for balance in (False, True):
            r = step_ratios(costs, world, args.micro_batch, args.accumulation, balance)
            cells.append(f"{'balanced' if balance else 'interleaved'} {r.mean():.3f} | {np.percentile(r, 95):.3f} | "
                         f"{r.max():.3f}")
        print(f"world {world:>2}:  " + "   ".join(cells))
    if args.smoke:
        print(_common.SMOKE_NOTE)


if __name__ == "__main__":
    main()
