"""What a step costs: time breakdown, memory of every rank, optimizer-state bytes, model FLOPs.

Used by the training loop to fill metrics.jsonl, so that the questions "which rank runs out of
memory?", "is the loader the bottleneck?" and "how far from peak is this GPU?" have answers in the
run directory instead of in guesswork.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

# dense bf16/fp16 tensor-core peak, TFLOP/s, by device-name substring (vendor datasheets, SXM parts)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0,
               "3090": 71.0, "V100": 125.0}


def full_numel(p: torch.nn.Parameter) -> int:
    """Elements of a parameter, also when ZeRO-3 has left only an empty placeholder on this rank."""
    return p.ds_numel if hasattr(p, "ds_numel") else p.numel()


class StepTimer:
    """Accumulates seconds per phase (data, forward, backward, step) over one optimizer step.
    On GPU each phase is synchronised so the split is real, at a small cost."""

    PHASES = ("data", "forward", "backward", "step")

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.reset()

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.PHASES, 0.0)

    @contextmanager
    def phase(self, name: str):
        self.sync()
        start = time.perf_counter()
        yield
        self.sync()
        self.seconds[name] += time.perf_counter() - start


def base_optimizer(engine) -> torch.optim.Optimizer | None:
    """The torch optimizer inside DeepSpeed's wrappers (ZeRO, fp16/bf16)."""
    opt = engine.optimizer
    for _ in range(4):
        if isinstance(opt, torch.optim.Optimizer):
            return opt
        opt = getattr(opt, "optimizer", None)
    return opt if isinstance(opt, torch.optim.Optimizer) else None


def optimizer_state_bytes(engine) -> int:
    """Bytes of optimizer state (e.g. Adam moments) held by this rank — ZeRO-1/2/3 divide it."""
    opt = base_optimizer(engine)
    if opt is None:
        return 0
    return sum(t.numel() * t.element_size() for state in opt.state.values() for t in state.values()
               if torch.is_tensor(t) and t.dim() > 0)


def replicated_grad_norm(module: torch.nn.Module) -> float:
    """L2 norm of the already all-reduced gradients, for ZeRO-0 fp32 where DeepSpeed computes the
    norm inside gradient clipping but does not keep it (``get_global_grad_norm()`` is None)."""
    return float(torch.nn.utils.get_total_norm([p.grad for p in module.parameters() if p.grad is not None]))


def peak_memory_bytes() -> int:
    """Peak accelerator memory of this process (GPU), or peak resident memory (CPU)."""
    from deepspeed.accelerator import get_accelerator

    return int(get_accelerator().max_memory_allocated())


def part_flops_per_token(params: int, trainable: int, needs_input_grad: bool) -> float:
    """First-order FLOPs per token of one part: 2N forward, 2N more for gradients w.r.t. its inputs
    when anything at or before it trains, and 2 per trainable weight for weight gradients
    (attention's T^2 term is not counted)."""
    return 2.0 * params * (1 + int(needs_input_grad)) + 2.0 * trainable


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


class FlopCounter:
    """Model FLOPs per step from the parameter counts of the vision tower, connector and LLM and the
    step's token counts (vision-tower tokens and text tokens); MFU = achieved / device peak (GPU only,
    or train.peak_tflops)."""

    def __init__(self, parts: dict[str, list[tuple[str, torch.nn.Parameter]]], peak_tflops: float | None,
                 device: torch.device, world_size: int = 1):
        def counts(part: str) -> tuple[int, int]:
            params = [p for _, p in parts.get(part, [])]
            return sum(full_numel(p) for p in params), sum(full_numel(p) for p in params if p.requires_grad)

        vision, vision_trainable = counts("vision")
        connector, connector_trainable = counts("connector")
        llm, llm_trainable = counts("llm")
        vision_grad = vision_trainable > 0
        connector_grad = vision_grad or connector_trainable > 0
        llm_grad = connector_grad or llm_trainable > 0
        self.per_vision_token = (part_flops_per_token(vision, vision_trainable, vision_grad)
                                 + part_flops_per_token(connector, connector_trainable, connector_grad))
        self.per_text_token = part_flops_per_token(llm, llm_trainable, llm_grad)
        self.peak = peak_tflops * 1e12 if peak_tflops else peak_flops(device)
        self.world_size = world_size

    def figures(self, text_tokens: float, vision_tokens: float, seconds: float) -> dict[str, float]:
        """Token counts summed over all ranks for one step of ``seconds``."""
        achieved = (text_tokens * self.per_text_token + vision_tokens * self.per_vision_token) / max(seconds, 1e-9)
        out = {"model_tflops_per_s": achieved / 1e12}
        if self.peak:
            out["mfu"] = achieved / (self.peak * self.world_size)
        return out
