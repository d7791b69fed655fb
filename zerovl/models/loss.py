"""The causal-LM loss through the output projection, in chunks of tokens, without a logits blow-up.

Why: the plain path (``model(labels=...)`` in transformers) materialises ``[tokens x vocab]`` logits,
their fp32 copy, the fp32 log-probs cross-entropy keeps for backward and two more V-wide gradients
in backward — at 8K tokens and Qwen2.5's 152K vocabulary about 15 GB, most of a step's activations.
Here instead:

1. Only supervised positions (shifted label != -100) go through the head. In SFT most tokens are
   prompt tokens, so this alone removes most of the work and memory.
2. Those rows go through the head ``chunk_tokens`` at a time. Each chunk's gradient with respect to
   its hidden rows and to the head's weight (and bias) is computed right there in the forward, and
   the chunk's logits are freed before the next chunk: what is kept for backward is an fp32
   ``[supervised tokens x hidden]`` gradient and, only when the head trains, an fp32 ``[vocab x
   hidden]`` gradient. Backward only scales those. The head's three matrix products run once each,
   as in the plain path (nothing is recomputed), so the saving costs no extra FLOPs.
3. Under ZeRO-3 the whole chunk loop runs as one call of the head module (its forward swapped for the
   loop), so DeepSpeed gathers the head's weight once in the forward and once in the backward, on
   every rank whatever its number of supervised tokens (zero included) — ranks never disagree on
   collectives — and the weight's gradient meets the gathered parameter as it does for any layer.
4. On CUDA with ``liger-kernel`` installed (``pip install 'zerovl[liger]'``), Liger's fused linear
   cross-entropy does step 2 in Triton kernels instead.

Loss and gradients equal the plain path's up to summation order (tests/unit/test_loss.py states the
tolerances). The one deliberate difference: a micro-batch with no supervised token has mean loss 0
with zero gradients, where transformers returns NaN.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn
from torch.nn import functional as F

IGNORE_INDEX = -100
# rows per chunk: at Qwen2.5's 152K vocabulary one chunk's fp32 logits are 0.6 GB; a small vocabulary
# (< 1024 x 152K elements in all) is one chunk
DEFAULT_CHUNK_TOKENS = 1024
VOCAB_SLICE = 16384  # rows of the 16-bit head-gradient product made at once (then added in fp32)
# causal LMs whose logits are exactly lm_head(body(...).last_hidden_state): no logit soft-capping or
# scaling (Gemma 2/3, Cohere, Granite) and no router auxiliary loss folded into the loss (MoE). Others
# take transformers' plain path, which is correct but keeps the full logits.
CHUNKED_MODEL_TYPES = frozenset({"qwen2", "qwen3", "llama", "mistral", "gpt2", "phi3", "qwen2_vl", "qwen2_5_vl"})
REDUCTIONS = ("mean", "sum")
log = logging.getLogger(__name__)
_said_plain: set[str] = set()


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Flat targets as transformers' ForCausalLMLoss shifts them: position t predicts labels[t + 1]; the
    last position of every row predicts nothing. Packed rows shift the same way."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)


def supervised_count(labels: torch.Tensor) -> torch.Tensor:
    """Number of tokens the loss covers (a 0-dim tensor: no host sync)."""
    return (labels[..., 1:] != IGNORE_INDEX).sum()


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over rows of CE(hidden @ weight.T + bias, target), one chunk of rows at a time, with the
    gradients computed in the forward (see the module docstring). Backward may run once."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, chunk_tokens):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        rows, width = hidden.shape
        fp32 = torch.float32
        grad_h = hidden.new_empty(rows, width, dtype=fp32) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=fp32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=fp32, device=weight.device) if need_b else None
        total = hidden.new_zeros((), dtype=torch.float64)
        x_all = hidden.to(weight.dtype)
        for start in range(0, rows, chunk_tokens):
            x, y = x_all[start:start + chunk_tokens], target[start:start + chunk_tokens]
            logits = F.linear(x, weight, bias)
            z = logits.float()  # a copy for 16-bit weights, the same tensor for fp32
            del logits
            picked = z.gather(1, y.unsqueeze(1)).squeeze(1)
            top = z.amax(dim=1, keepdim=True)
            z.sub_(top).exp_()  # in place: one [chunk x vocab] fp32 tensor is all this chunk holds
            norm = z.sum(dim=1, keepdim=True)
            lse = top.squeeze(1) + norm.squeeze(1).log()
            total += (lse - picked).sum(dtype=torch.float64)
            if not (need_h or need_w or need_b):
                continue
            z.div_(norm)  # softmax; d(sum of CE)/d(logits) = softmax - one_hot(target)
            z[torch.arange(z.shape[0], device=z.device), y] -= 1.0
            if need_b:
                grad_b += z.sum(dim=0)
            g = z.to(weight.dtype)
            del z
            if need_h:
                grad_h[start:start + chunk_tokens] = g @ weight
            if need_w:
                if g.dtype == fp32:
                    grad_w.addmm_(g.t(), x)
                else:  # 16-bit products (as the plain path), summed over chunks in fp32, a vocabulary
                    # slice at a time so the 16-bit temporary stays small
                    for v in range(0, g.shape[1], VOCAB_SLICE):
                        grad_w[v:v + VOCAB_SLICE] += g[:, v:v + VOCAB_SLICE].t() @ x
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.spent = False
        return total.to(torch.float32)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        if ctx.spent:
            raise RuntimeError("the chunked LM loss supports one backward per forward (no retain_graph)")
        ctx.spent = True
        scale = grad_out.to(torch.float32)
        grads = []
        for saved, dtype in zip(ctx.saved_tensors, ctx.dtypes):
            grads.append(None if saved is None else saved.mul_(scale).to(dtype))  # in place: no second copy
        return grads[0], grads[1], grads[2], None, None


def _as_forward_of(module: nn.Module, fn, *args):
    """Call ``fn(*args)`` as if it were ``module``'s forward, hooks included. Under ZeRO-3 this is what
    gathers the module's partitioned parameters for the forward and again for the backward (where the
    gradient must meet the gathered parameter), exactly when it gathers them for the module itself, on
    every rank in the same order."""
    module.forward = fn  # an instance attribute shadows the class's forward
    try:
        return module(*args)
    finally:
        del module.forward


@functools.cache
def _liger():
    """Liger's fused linear cross-entropy when installed (used on CUDA only), else None."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    return liger_fused_linear_cross_entropy


def _sum_over_rows(hidden: torch.Tensor, head: nn.Linear, target: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    # named_parameters, not head.weight: under ZeRO-3 attribute access inside the engine's forward
    # registers the weight as an "external parameter" of the running module (here the whole model),
    # which then keeps it gathered for the whole forward and backward
    params = dict(head.named_parameters(recurse=False))
    weight, bias = params["weight"], params.get("bias")

    def summed(rows: torch.Tensor, rows_target: torch.Tensor) -> torch.Tensor:
        fused = _liger() if rows.is_cuda and rows.shape[0] > 0 else None
        if fused is not None:  # not exercised on CPU (CI): the kernels are Triton
            out = fused(rows.to(weight.dtype), weight, rows_target, bias=bias, ignore_index=IGNORE_INDEX,
                        reduction="sum")
            out = out[0] if isinstance(out, tuple) else getattr(out, "loss", out)
            return out.float()
        return _ChunkedLinearCrossEntropy.apply(rows, weight, bias, rows_target, chunk_tokens)

    if hasattr(weight, "ds_id") and "forward" not in vars(head):  # ZeRO-3 partitioned
        return _as_forward_of(head, summed, hidden, target)
    return summed(hidden, target)


def causal_lm_loss(hidden_states: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor, reduction: str = "mean",
                   chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """Next-token cross-entropy of ``lm_head(hidden_states)`` against ``labels`` (``[batch, seq]``,
    -100 = not supervised), as a 0-dim fp32 tensor: ``mean`` over supervised tokens (0 when there are
    none) or their ``sum``. ``lm_head`` is an ``nn.Linear``; any other head module (a LoRA-wrapped
    head, say) is called once on the supervised rows and its logits go through plain cross-entropy."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"loss_reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    targets = shifted_targets(labels).to(hidden_states.device)
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # the one host sync: the number of rows
    rows = hidden_states.reshape(-1, hidden_states.shape[-1]).index_select(0, keep)
    target = targets.index_select(0, keep)
    if isinstance(lm_head, nn.Linear):
        total = _sum_over_rows(rows, lm_head, target, chunk_tokens)
    else:
        total = F.cross_entropy(lm_head(rows).float(), target, reduction="sum")
    return total if reduction == "sum" else total / max(int(keep.numel()), 1)


def plain_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The same loss from full logits (transformers' way): for models the chunked path does not cover."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"loss_reduction must be one of {REDUCTIONS}, got {reduction!r}")
    targets = shifted_targets(labels).to(logits.device)
    total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets, ignore_index=IGNORE_INDEX,
                            reduction="sum")
    return total if reduction == "sum" else total / (targets != IGNORE_INDEX).sum().clamp(min=1)


def base_model(module: nn.Module) -> nn.Module:
    """The transformers model itself, also when peft wraps it."""
    return module.get_base_model() if hasattr(module, "get_base_model") else module


def decoder_and_head(causal_lm: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder body, output projection) of a causal LM whose logits are exactly
    ``head(body(...).last_hidden_state)`` — Qwen2/3, Llama, Mistral, GPT-2, Phi-3, peft-wrapped or not —
    or None for any other model."""
    base = base_model(causal_lm)
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if model_type not in CHUNKED_MODEL_TYPES or head is None or not hasattr(base, "get_decoder"):
        if model_type not in _said_plain:
            _said_plain.add(model_type)
            log.info("LM loss: model type %s takes transformers' plain path (full logits)", model_type)
        return None
    body = base.get_decoder()
    return (body, head) if body is not base else None


def language_model_loss(causal_lm: nn.Module, labels: torch.Tensor, reduction: str = "mean",
                        chunk_tokens: int = DEFAULT_CHUNK_TOKENS, **inputs) -> torch.Tensor:
    """The LM loss of a causal LM on ``inputs`` (``inputs_embeds``, ``attention_mask``, ...): through
    its decoder body and :func:`causal_lm_loss` where the model allows, else transformers' own path.
    ``chunk_tokens=0`` forces the plain path (full logits), for comparison or as an escape hatch."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"loss_reduction must be one of {REDUCTIONS}, got {reduction!r}")
    parts = decoder_and_head(causal_lm) if chunk_tokens else None
    if parts is None:
        if reduction == "mean":  # exactly what transformers computes (router auxiliary losses included)
            return causal_lm(**inputs, labels=labels).loss
        return plain_loss(causal_lm(**inputs).logits, labels, "sum")
    body, head = parts
    hidden = body(**inputs).last_hidden_state
    return causal_lm_loss(hidden, head, labels, reduction, chunk_tokens)
