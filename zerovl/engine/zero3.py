"""ZeRO-3 construction and weight loading: a model larger than one rank's memory never exists whole
on any device."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from zerovl.engine.ds_config import zero_stage


@contextlib.contextmanager
def zero3_construction(ds_config: dict[str, Any]):
    """Under ZeRO-3, build the model inside deepspeed.zero.Init (parameters are partitioned as they are
    created) and let transformers' from_pretrained/from_config do the same via HfDeepSpeedConfig, so a
    model larger than one rank's memory never exists whole on any rank."""
    if zero_stage(ds_config) != 3:
        yield
        return
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    hf_ds_config = HfDeepSpeedConfig(ds_config)  # transformers keeps only a weak reference: hold it
    # no dtype=: the config's bf16/fp16 switch decides it (in 0.19.8 an explicit dtype is ignored on a
    # CPU accelerator, `dtype or half if fp16_supported else bf16`, and fp32 runs would get bf16 weights)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        yield
    del hf_ds_config


@torch.no_grad()
def load_partitioned(model: torch.nn.Module, full_state: dict[str, torch.Tensor] | None) -> None:
    """Copy weights that only rank 0 holds (``full_state``; None elsewhere) into a ZeRO-3-partitioned
    model, one tensor at a time: each is gathered, filled on rank 0 and re-partitioned to every rank."""
    import deepspeed

    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if full_state is not None and name in full_state:
                param.data.copy_(full_state[name].to(param.dtype))
    for name, buffer in model.named_buffers():  # buffers are whole on every rank: rank 0's values for all
        if full_state is not None and name in full_state:
            buffer.copy_(full_state[name].to(buffer.dtype))
        torch.distributed.broadcast(buffer, 0)
