"""How an optimizer step's loss is weighted over its micro-batches and ranks.

DeepSpeed averages gradients equally over accumulation micro-batches (``1/accum``) and ranks
(``1/world``). With each micro-batch's loss being the mean over *its own* supervised tokens, a micro-batch
of 3 answer tokens then weighs as much as one of 300, and the gradient depends on how the same samples
were split into micro-batches and ranks. With ``train.loss_normalization: tokens`` each micro-batch
contributes the *sum* of its per-token losses scaled by ``world x accum / T``, where ``T`` is the step's
supervised tokens over every micro-batch and rank (counted before the step's first forward, one
all-reduce): after DeepSpeed's averaging the gradient is exactly that of the step's global token mean,
the same for 1 x 4, 4 x 1 or 2 ranks x 2 (HF Trainer's ``num_items_in_batch``, torchtune's step count).
"""

from __future__ import annotations

import torch

from zerovl.models.loss import supervised_count


def step_token_count(micro_batches: list[dict[str, torch.Tensor]], device: torch.device) -> torch.Tensor:
    """The step's supervised tokens over all micro-batches and ranks (one all-reduce), on ``device``."""
    import deepspeed.comm as dist

    # the tokens the model's loss sums over (shifted labels != -100); host tensors: no device sync
    local = sum(int(supervised_count(b["labels"])) for b in micro_batches)
    total = torch.tensor(float(local), dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    return total


def backward_scale(total_tokens: torch.Tensor, world_size: int, accum: int) -> torch.Tensor:
    """Factor for a micro-batch's *summed* loss so that DeepSpeed's 1/accum and 1/world averaging leave
    the gradient of (sum over the step) / total_tokens. A step with no supervised token scales by 0."""
    return (world_size * accum) / total_tokens.clamp(min=1.0)
