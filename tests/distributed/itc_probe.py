"""``torchrun --nproc_per_node N itc_probe.py TOKENIZER OUT``: the ITC loss and its gradients under each
ZeRO stage, on one fixed global batch of 8 pairs split evenly over the N ranks (rank r takes rows
r*8/N ...). Captions 0-1 and 4-5 show the same image, so the same-image targets are exercised.

For each stage the model is built from one seed (under ZeRO-3 inside ``deepspeed.zero.Init``, then given
rank 0's plain weights), one forward and backward run through the DeepSpeed engine, and rank 0 saves the
global loss (the mean of the ranks' losses) and every parameter's full gradient
(``safe_get_full_grad``: after DeepSpeed's reduction) to OUT. Run once with N=1 and once with N=2, the
two files must agree."""

from __future__ import annotations

import sys

import torch

from tests.distributed.helpers import exit_without_teardown
from zerovl.config import ModelSettings
from zerovl.engine.distributed import init_distributed
from zerovl.engine.zero3 import load_partitioned, zero3_construction
from zerovl.models.builder import build_model

TINY = {"vision_config": {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 1, "num_attention_heads": 2, "initializer_range": 0.1},
        "qformer_config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                           "intermediate_size": 64, "vocab_size": 64, "encoder_hidden_size": 32,
                           "cross_attention_frequency": 1, "max_position_embeddings": 64,
                           "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.1},
        "num_query_tokens": 4, "image_text_hidden_size": 16}
GLOBAL = 8


def settings(tokenizer: str) -> ModelSettings:
    return ModelSettings.model_validate({"retrieval": {"config": TINY, "itm_weight": 0.0}, "tokenizer": tokenizer,
                                         "vision": {"mode": "full"}})


def global_batch(tokenizer) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    captions = ["a red circle", "a red circle on the left", "a blue square", "a green triangle then a red circle",
                "a yellow square", "a yellow square in the middle", "a purple circle", "a orange triangle"]
    enc = tokenizer(captions, padding="max_length", truncation=True, max_length=12, return_tensors="pt")
    return {"pixel_values": torch.randn(GLOBAL, 3, 32, 32, generator=g), "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"], "image_ids": torch.tensor([0, 0, 1, 2, 3, 3, 4, 5])}


def ds_config(stage: int) -> dict:
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
            "optimizer": {"type": "AdamW", "params": {"lr": 0.0, "weight_decay": 0.0, "torch_adam": True}},
            "zero_allow_untested_optimizer": True}


def main(tokenizer_dir: str, out: str) -> None:
    dist = init_distributed()
    import deepspeed

    model_settings = settings(tokenizer_dir)
    torch.manual_seed(0)
    reference = build_model(model_settings, "fp32").model.state_dict()
    report = {}
    for stage in (0, 1, 2, 3):
        config = ds_config(stage)
        with zero3_construction(config):
            built = build_model(model_settings, "fp32")
        model = built.model
        if stage == 3:
            load_partitioned(model, reference if dist.is_main else None)
        else:
            model.load_state_dict(reference)
        batch = global_batch(built.tokenizer)
        rows = GLOBAL // dist.world_size
        mine = {k: v[dist.rank * rows:(dist.rank + 1) * rows] for k, v in batch.items()}
        engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()],
                                          config=config)
        loss = engine(**mine)
        engine.backward(loss)
        grads = {n: deepspeed.utils.safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
        total = loss.detach().clone()
        torch.distributed.all_reduce(total)
        report[stage] = {"loss": (total / dist.world_size).item(), "grads": grads,
                         "partitioned": int(any(p.numel() == 0 for p in engine.module.parameters()))}
        engine.step()
        engine.destroy()
    if dist.is_main:
        torch.save(report, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    exit_without_teardown()
