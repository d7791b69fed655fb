"""``torchrun --nproc_per_node 2 loss_zero3_probe.py OUT {tied|untied}``: the chunked LM loss under ZeRO-3.

Every parameter is partitioned (persistence threshold 0), so the head's weight exists only while it is
gathered. Each rank has a different number of supervised tokens — rank 1 none at all in the first
micro-batch — so ranks run different numbers of loss chunks. The gradients DeepSpeed reduces must
equal the mean over ranks of transformers' plain-path gradients of the summed loss, computed here on
an unpartitioned copy of the same model. Rank 0 writes the comparison to OUT as JSON."""

from __future__ import annotations

import copy
import json
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tests.distributed.helpers import exit_without_teardown
from zerovl.engine.distributed import init_distributed, shutdown
from zerovl.models.loss import plain_loss
from zerovl.models.vlm import ComposedVLM

VOCAB, SEQ = 96, 17


def batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, labels) per micro-batch for this rank; lengths and supervised counts differ by rank."""
    g = torch.Generator().manual_seed(100 + rank)
    out = []
    for step in range(2):
        rows, seq = (2, SEQ) if rank == 0 else (3, SEQ - 4)
        ids = torch.randint(0, VOCAB, (rows, seq), generator=g)
        labels = ids.clone()
        labels[:, : 3 + step + rank] = -100
        if rank == 1 and step == 0:
            labels[:] = -100  # no supervised token on this rank: it must still gather and reduce
        out.append((ids, labels))
    return out


def main(out: str, tie: str) -> None:
    dist = init_distributed()
    import deepspeed  # after init_distributed, which picks DeepSpeed's accelerator

    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen2", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                  max_position_embeddings=64, tie_word_embeddings=tie == "tied")
    llm = AutoModelForCausalLM.from_config(config)
    reference = copy.deepcopy(llm)
    model = ComposedVLM(llm, image_token_id=-1, loss_chunk_tokens=5)
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                 "optimizer": {"type": "AdamW", "params": {"lr": 0.0, "weight_decay": 0.0, "torch_adam": True}},
                 "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    head = llm.get_output_embeddings().weight
    report = {"partitioned": int(head.numel() == 0), "steps": []}
    names = [n for n, _ in reference.named_parameters()]
    for step in range(2):
        ids, labels = batches(dist.rank)[step]
        loss = engine(ids, torch.ones_like(ids), labels=labels, loss_reduction="sum")
        engine.backward(loss)
        got = {n: deepspeed.utils.safe_get_full_grad(p).clone() for n, p in engine.module.llm.named_parameters()}
        engine.step()  # lr 0: the weights stay those of the reference
        # nothing became an "external parameter" (which ZeRO-3 would keep gathered the whole step)
        external = sum(len(getattr(m, "_external_params", {})) for m in engine.module.modules())
        expected = {n: torch.zeros_like(p) for n, p in reference.named_parameters()}
        losses = []
        for rank in range(dist.world_size):
            r_ids, r_labels = batches(rank)[step]
            reference.zero_grad(set_to_none=True)
            r_loss = plain_loss(reference(input_ids=r_ids, attention_mask=torch.ones_like(r_ids)).logits, r_labels, "sum")
            r_loss.backward()
            losses.append(r_loss.item())
            for n, p in reference.named_parameters():
                expected[n] += p.grad / dist.world_size
        errors = {n: ((got[n] - expected[n]).abs().max() / expected[n].abs().max().clamp(min=1e-12)).item()
                  for n in names}
        report["steps"].append({"loss": loss.item(), "reference_loss": losses[dist.rank], "errors": errors,
                                "max_error": max(errors.values()), "external_params": external})
    gathered = [None] * dist.world_size
    torch.distributed.all_gather_object(gathered, report)
    if dist.rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f, indent=1)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    exit_without_teardown()
