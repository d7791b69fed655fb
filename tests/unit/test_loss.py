"""The chunked LM loss (zerovl/models/loss.py) against transformers' plain path: the same loss and the
same gradients, for mean and sum, chunk sizes that divide the token count or not, all-masked rows,
packed rows, tied embeddings, LoRA, gradient checkpointing and native Qwen2-VL; and no tensor the size
of the full logits is ever created.

Tolerances, relative to the largest element of the reference (loss or gradient tensor): fp32 1e-6
for the loss and 1e-5 for gradients (summation order only: ``FP32_LOSS``, ``FP32_GRAD``); bf16 1e-2
for the head alone (``BF16``: the 16-bit products round differently); through a whole bf16 model
3e-2 between the two paths and 1e-3 for the loss, with ours no farther from the fp32 gradients than
transformers' own bf16 gradients are (1.5x their error + 1e-3).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.loss.loss_utils import ForCausalLMLoss

from tests.conftest import TINY_LLM
from zerovl.models import loss as lm_loss
from zerovl.models.loss import causal_lm_loss, language_model_loss
from zerovl.models.vlm import ComposedVLM

FP32_LOSS, FP32_GRAD, BF16 = 1e-6, 1e-5, 1e-2


def close(got: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    err = (got.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert err <= rel * max(scale, 1e-12), f"max error {err:.3g} vs {rel:g} x {scale:.3g}"


def _labels(batch: int, seq: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """Random labels with prompt-like masked spans, one row fully masked (no supervised token)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[:, : seq // 3] = -100
    labels[0, seq // 2: seq // 2 + 3] = -100
    if batch > 1:
        labels[1] = -100
    return labels


# ---- the loss function on its own ---------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk", [1, 7, 12, 10_000])  # 36 supervised rows: does not divide, divides, one chunk
@pytest.mark.parametrize("bias", [False, True])
def test_loss_and_gradients_equal_transformers_fp32(reduction, chunk, bias):
    torch.manual_seed(0)
    batch, seq, width, vocab = 4, 19, 16, 50
    head = nn.Linear(width, vocab, bias=bias)
    hidden = torch.randn(batch, seq, width, requires_grad=True)
    labels = _labels(batch, seq, vocab)
    count = int((labels[:, 1:] != -100).sum())
    assert count % 12 == 0 and count % 7 != 0, count

    ref = ForCausalLMLoss(head(hidden), labels, vocab, num_items_in_batch=1 if reduction == "sum" else None)
    ref_grads = torch.autograd.grad(ref, [hidden, *head.parameters()])
    got = causal_lm_loss(hidden, head, labels, reduction, chunk_tokens=chunk)
    grads = torch.autograd.grad(got, [hidden, *head.parameters()])
    assert got.dtype == torch.float32 and got.dim() == 0
    close(got, ref, FP32_LOSS)
    for g, r in zip(grads, ref_grads):
        close(g, r, FP32_GRAD)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("vocab_slice", [16384, 64])  # the weight gradient in one product, or in slices
def test_loss_and_gradients_equal_transformers_bf16(reduction, vocab_slice, monkeypatch):
    monkeypatch.setattr(lm_loss, "VOCAB_SLICE", vocab_slice)
    torch.manual_seed(0)
    batch, seq, width, vocab = 2, 40, 32, 300
    head = nn.Linear(width, vocab, bias=False).to(torch.bfloat16)
    hidden = torch.randn(batch, seq, width, dtype=torch.bfloat16, requires_grad=True)
    labels = _labels(batch, seq, vocab)
    ref = ForCausalLMLoss(head(hidden), labels, vocab, num_items_in_batch=1 if reduction == "sum" else None)
    ref_grads = torch.autograd.grad(ref, [hidden, head.weight])
    got = causal_lm_loss(hidden, head, labels, reduction, chunk_tokens=5)
    grads = torch.autograd.grad(got, [hidden, head.weight])
    assert got.dtype == torch.float32
    close(got, ref, BF16)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.bfloat16
        close(g, r, BF16)


def test_no_supervised_token_gives_zero_loss_and_zero_gradients():
    head = nn.Linear(8, 20)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    labels = torch.full((2, 5), -100)
    for reduction in ("mean", "sum"):
        loss = causal_lm_loss(hidden, head, labels, reduction)
        assert loss.item() == 0.0
        hidden.grad = None
        head.zero_grad()
        loss.backward()  # backward still reaches every parameter (ZeRO-3 waits for every gradient)
        assert hidden.grad.abs().sum() == 0 and head.weight.grad.abs().sum() == 0


def test_a_frozen_head_gets_no_gradient_and_keeps_no_vocab_sized_tensor():
    head = nn.Linear(8, 64, bias=False).requires_grad_(False)
    hidden = torch.randn(1, 30, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = causal_lm_loss(hidden, head, torch.randint(0, 64, (1, 30)), chunk_tokens=4)
    loss.backward()
    assert head.weight.grad is None and hidden.grad.abs().sum() > 0
    assert max(saved) <= 30 * 8  # the hidden-rows gradient, no [tokens x vocab] nor [vocab x hidden]


class _Largest(TorchDispatchMode):
    """The largest tensor any operator creates."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_full_logits_and_their_gradient_never_exist():
    width, vocab, tokens, chunk = 8, 500, 256, 16
    head = nn.Linear(width, vocab, bias=False)
    hidden = torch.randn(1, tokens, width, requires_grad=True)
    labels = torch.randint(0, vocab, (1, tokens))
    with _Largest() as mode:
        causal_lm_loss(hidden, head, labels, "sum", chunk_tokens=chunk).backward()
    assert mode.largest == chunk * vocab  # one chunk's logits; the plain path makes tokens x vocab
    with _Largest() as plain:
        ForCausalLMLoss(head(hidden), labels, vocab).backward()
    assert plain.largest == tokens * vocab


def test_supervised_count_is_what_the_sum_sums():
    labels = _labels(3, 11, 20)
    head, hidden = nn.Linear(4, 20), torch.randn(3, 11, 4)
    count = lm_loss.supervised_count(labels)
    assert count.dim() == 0 and count == (lm_loss.shifted_targets(labels) != -100).sum()
    close(causal_lm_loss(hidden, head, labels, "sum") / count, causal_lm_loss(hidden, head, labels, "mean"), 1e-6)


def test_bad_reduction_and_chunk_are_refused():
    head, hidden, labels = nn.Linear(4, 6), torch.randn(1, 3, 4), torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="loss_reduction"):
        causal_lm_loss(hidden, head, labels, "token")
    with pytest.raises(ValueError, match="chunk_tokens"):
        causal_lm_loss(hidden, head, labels, "sum", chunk_tokens=0)


# ---- through real models ------------------------------------------------------------------------

SMALL = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 128}
ARCHITECTURES = {
    "qwen2": {**SMALL, "model_type": "qwen2", "tie_word_embeddings": False},
    "qwen2-tied": {**SMALL, "model_type": "qwen2", "tie_word_embeddings": True},
    "qwen3": {**SMALL, "model_type": "qwen3", "head_dim": 16},
    "llama": {**SMALL, "model_type": "llama"},
    "mistral": {**SMALL, "model_type": "mistral"},
    "phi3": {**SMALL, "model_type": "phi3", "pad_token_id": 0},
    "gpt2": {"model_type": "gpt2", "vocab_size": 96, "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 128},
}


def _llm(spec: dict, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    spec = dict(spec)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec))
    return model.to(dtype).train()  # dropout is 0 in these configs except gpt2's: switched off below


def _no_dropout(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def _batch(vocab: int, batch: int = 3, seq: int = 21):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    labels = _labels(batch, seq, vocab)
    if batch > 2:
        mask[2, -5:] = 0  # right padding
    labels[mask == 0] = -100
    return ids, mask, labels


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(model: nn.Module, ours, theirs, rel_loss=FP32_LOSS, rel_grad=FP32_GRAD) -> None:
    model.zero_grad(set_to_none=True)
    ref = theirs()
    ref.backward()
    ref_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    got = ours()
    got.backward()
    grads = _grads(model)
    close(got, ref, rel_loss)
    assert grads.keys() == ref_grads.keys() and grads
    for name in ref_grads:
        close(grads[name], ref_grads[name], rel_grad)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_composed_model_equals_transformers(arch, reduction):
    llm = _no_dropout(_llm(ARCHITECTURES[arch]))
    assert lm_loss.decoder_and_head(llm) is not None  # every listed type takes the chunked path
    vlm = ComposedVLM(llm, image_token_id=-1, loss_chunk_tokens=5)
    ids, mask, labels = _batch(llm.config.vocab_size)
    count = (labels[:, 1:] != -100).sum()
    factor = count if reduction == "sum" else 1

    def theirs():
        return llm(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss * factor

    _compare(llm, lambda: vlm(ids, mask, labels=labels, loss_reduction=reduction), theirs)
    if arch.endswith("tied") or arch == "gpt2":
        assert llm.get_output_embeddings().weight is llm.get_input_embeddings().weight


def test_composed_model_bf16_is_as_close_to_fp32_as_transformers_bf16():
    """In bf16 both paths round; each gradient of ours is as close to the fp32 truth as transformers'
    bf16 gradient is (1.5x its error + 1e-3), and the two agree within 3 x ``BF16``; losses within 1e-3."""
    llm = _llm(ARCHITECTURES["qwen2"], torch.bfloat16)
    truth = _llm(ARCHITECTURES["qwen2"])
    truth.load_state_dict({k: v.float() for k, v in llm.state_dict().items()})
    vlm = ComposedVLM(llm, image_token_id=-1, loss_chunk_tokens=4)
    ids, mask, labels = _batch(llm.config.vocab_size)
    runs = {}
    for name, model, forward in (
            ("fp32", truth, lambda: truth(input_ids=ids, attention_mask=mask, labels=labels).loss),
            ("hf", llm, lambda: llm(input_ids=ids, attention_mask=mask, labels=labels).loss),
            ("ours", llm, lambda: vlm(ids, mask, labels=labels))):
        model.zero_grad(set_to_none=True)
        loss = forward()
        loss.backward()
        runs[name] = loss.detach(), _grads(model)
    close(runs["ours"][0], runs["fp32"][0], 1e-3)
    close(runs["ours"][0], runs["hf"][0], 1e-3)
    for name, truth_grad in runs["fp32"][1].items():
        scale = truth_grad.abs().max()
        err_hf = (runs["hf"][1][name].float() - truth_grad).abs().max() / scale
        err_ours = (runs["ours"][1][name].float() - truth_grad).abs().max() / scale
        assert err_ours <= 1.5 * err_hf + 1e-3, (name, err_ours.item(), err_hf.item())
        close(runs["ours"][1][name], runs["hf"][1][name], 3 * BF16)


def test_packed_rows_equal_transformers():
    llm = _llm(ARCHITECTURES["qwen2"])
    vlm = ComposedVLM(llm, image_token_id=-1, loss_chunk_tokens=3)
    ids, _, labels = _batch(llm.config.vocab_size, batch=2, seq=24)
    positions = torch.cat([torch.arange(10), torch.arange(14)]).repeat(2, 1)  # two samples per row
    labels[:, 10] = -100  # each sample's first token is never a target
    _compare(llm, lambda: vlm(ids, torch.ones_like(ids), labels=labels, position_ids=positions, loss_reduction="sum"),
             lambda: llm(input_ids=ids, position_ids=positions, labels=labels, use_cache=False).loss
             * (labels[:, 1:] != -100).sum())


def _saved_elements(forward) -> int:
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        forward().backward()
    return sum(saved)


def _lora_vlm(checkpointing: bool):
    from peft import LoraConfig, get_peft_model

    llm = _llm(ARCHITECTURES["qwen2"])
    if checkpointing:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft = get_peft_model(llm, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    for name, p in peft.named_parameters():  # non-zero B so the adapters matter
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)
    return peft, ComposedVLM(peft, image_token_id=-1, loss_chunk_tokens=4)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_and_gradient_checkpointing_equal_transformers(checkpointing):
    ids, mask, labels = _batch(96)
    peft, vlm = _lora_vlm(checkpointing)
    _compare(peft, lambda: vlm(ids, mask, labels=labels),
             lambda: peft(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss)
    assert peft.get_base_model().lm_head.weight.grad is None  # the frozen base head takes no gradient
    other = _lora_vlm(not checkpointing)[1]
    kept = {checkpointing: _saved_elements(lambda: vlm(ids, mask, labels=labels)),
            not checkpointing: _saved_elements(lambda: other(ids, mask, labels=labels))}
    assert kept[True] < 0.5 * kept[False]  # checkpointing still takes effect through the decoder body


def test_a_lora_wrapped_head_is_called_as_a_module():
    from peft import LoraConfig, get_peft_model

    llm = _llm(ARCHITECTURES["qwen2"])
    peft = get_peft_model(llm, LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    vlm = ComposedVLM(peft, image_token_id=-1)
    ids, mask, labels = _batch(96)
    _compare(peft, lambda: vlm(ids, mask, labels=labels),
             lambda: peft(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss)


def test_other_model_types_take_the_plain_path():
    spec = {**SMALL, "model_type": "gemma2", "head_dim": 16}  # logit soft-capping: not lm_head(hidden)
    llm = _llm(spec)
    assert lm_loss.decoder_and_head(llm) is None
    ids, mask, labels = _batch(96)
    vlm = ComposedVLM(llm, image_token_id=-1)
    ref = llm(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
    close(vlm(ids, mask, labels=labels), ref.loss, FP32_LOSS)
    close(vlm(ids, mask, labels=labels, loss_reduction="sum"), ref.loss * (labels[:, 1:] != -100).sum(), FP32_LOSS)


def test_chunk_tokens_zero_is_the_plain_path_and_logits_are_unchanged():
    llm = _llm(ARCHITECTURES["qwen2"])
    ids, mask, labels = _batch(96)
    plain = ComposedVLM(llm, image_token_id=-1, loss_chunk_tokens=0)
    chunked = ComposedVLM(llm, image_token_id=-1)
    close(chunked(ids, mask, labels=labels), plain(ids, mask, labels=labels), FP32_LOSS)
    close(language_model_loss(llm, labels, "sum", 0, input_ids=ids, attention_mask=mask),
          language_model_loss(llm, labels, "sum", 7, input_ids=ids, attention_mask=mask), FP32_LOSS)
    logits = chunked(ids, mask)
    assert logits.shape == (*ids.shape, 96)
    close(logits, llm(input_ids=ids, attention_mask=mask).logits, 0.0)


def test_evaluation_under_no_grad_computes_no_gradients():
    llm = _llm(ARCHITECTURES["qwen2"])
    vlm = ComposedVLM(llm, image_token_id=-1)
    ids, mask, labels = _batch(96)
    with torch.no_grad():
        loss = vlm(ids, mask, labels=labels)
    assert not loss.requires_grad
    close(loss, llm(input_ids=ids, attention_mask=mask, labels=labels).loss, FP32_LOSS)


def test_native_qwen2vl_equals_transformers(scenes):
    from zerovl.config import ModelSettings
    from zerovl.models.builder import build_model

    settings = ModelSettings.model_validate({
        "native": {"config": {"model_type": "qwen2_vl",
                              "text_config": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                  num_attention_heads=2, num_key_value_heads=1, vocab_size=80,
                                                  rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
                              "vision_config": dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2)}},
        "llm": {"mode": "full"}, "tokenizer": str(scenes["tokenizer"])})
    torch.manual_seed(0)
    model = build_model(settings).model.train()
    ids, mask, labels = _batch(60)
    ids[ids == model.image_token_id] = 0
    for reduction in ("mean", "sum"):
        def ours(reduction=reduction):
            model.loss_chunk_tokens = 6
            return model(ids, mask, labels=labels, loss_reduction=reduction)

        def theirs(reduction=reduction):
            model.loss_chunk_tokens = 0  # HF's own forward with labels (mean), or its logits (sum)
            return model(ids, mask, labels=labels, loss_reduction=reduction)

        _compare(model, ours, theirs)


def test_tiny_llm_of_the_test_suite_is_covered():
    assert TINY_LLM["model_type"] in lm_loss.CHUNKED_MODEL_TYPES
