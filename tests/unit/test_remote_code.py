"""Models that ship their own code (Qwen-7B-Chat's layout, tests/remote_code.py), through zerovl's loading:
the opt-in switch, the slow tokenizer's labels without offsets, Qwen-1's prompt format, the reserved
image token, and LoRA targets by Qwen-1's layer names."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import TINY_VISION
from zerovl.config import ModelSettings
from zerovl.data.samples import Sample
from zerovl.data.template import IGNORE_INDEX
from zerovl.errors import ConfigError
from zerovl.models.builder import build_llm, build_model, image_token, load_tokenizer


def _settings(qwen1_dir, **llm) -> ModelSettings:
    return ModelSettings.model_validate({"llm": {"path": str(qwen1_dir), **llm}})


def test_running_the_directory_code_is_opt_in(qwen1_dir):
    with pytest.raises(ConfigError) as e:
        load_tokenizer(_settings(qwen1_dir))
    assert str(e.value).startswith(f"model.tokenizer: {qwen1_dir} ships its own Python code (")
    assert "tokenization_qwen.py" in str(e.value) and "set model.llm.trust_remote_code=true" in str(e.value)
    with pytest.raises(ConfigError, match=r"^model\.llm: .* set model\.llm\.trust_remote_code=true"):
        build_llm(_settings(qwen1_dir).llm, torch.float32)
    other = ModelSettings.model_validate({"llm": {"config": {"model_type": "qwen2"}}, "tokenizer": str(qwen1_dir)})
    with pytest.raises(ConfigError, match="set model.tokenizer_trust_remote_code=true"):
        load_tokenizer(other)
    assert load_tokenizer(other.model_copy(update={"tokenizer_trust_remote_code": True})).is_fast is False


def test_a_tiktoken_style_tokenizer_lends_a_reserved_token_and_pads_with_endoftext(qwen1_dir):
    settings = _settings(qwen1_dir, trust_remote_code=True)
    tok = load_tokenizer(settings)
    assert type(tok).__name__ == "QWenTokenizer" and not tok.is_fast
    with pytest.raises(ValueError):  # what makes the reserved token necessary
        tok.add_tokens(["<image>"], special_tokens=True)
    assert image_token(tok, settings) == "<|extra_0|>"  # MiniGPT4Qwen's choice too
    assert (tok.pad_token, tok.eos_token) == ("<|endoftext|>", "<|im_end|>")


def _make_context(tok, system: str, turns: list[tuple[str, str]], query: str) -> list[int]:
    """Qwen-7B-Chat's own prompt builder (qwen_generation_utils.make_context, chat_format chatml),
    transcribed: every part tokenized alone and joined with im_start / im_end / newline ids."""
    ids = lambda text: tok.convert_tokens_to_ids(tok.tokenize(text))  # noqa: E731
    start, end, nl = ids("<|im_start|>"), ids("<|im_end|>"), ids("\n")
    part = lambda role, content: start + ids(role) + nl + ids(content) + end  # noqa: E731
    out = part("system", system)
    for q, a in turns:
        out += nl + part("user", q) + nl + part("assistant", a)
    return out + nl + part("user", query) + nl + start + ids("assistant") + nl


def test_the_prompt_is_qwen_7b_chat_own_format(qwen1_dir):
    built = build_model(_settings(qwen1_dir, trust_remote_code=True))
    template, tok = built.template(), built.tokenizer
    assert template.pieces and template.system_prompt == "You are a helpful assistant."
    history = [("what colour is the shape ?", "red"), ("how many shapes are there ?", "two")]
    messages = [m for q, a in history for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    sample = Sample(messages=messages + [{"role": "user", "content": "is the red shape on the left ?"}], images=[],
                    source="t")
    assert template.encode_prompt(sample) == _make_context(tok, "You are a helpful assistant.", history,
                                                           "is the red shape on the left ?")


def test_labels_token_by_token_with_the_reserved_image_token(qwen1_dir):
    settings = ModelSettings.model_validate({"vision": {"config": dict(TINY_VISION)}, "connector": {"type": "mlp"},
                                             "llm": {"path": str(qwen1_dir), "trust_remote_code": True}})
    built = build_model(settings)
    tok, template = built.tokenizer, built.template()
    messages = [{"role": "user", "content": "<image>what colour is the shape ?"}, {"role": "assistant", "content": "red"},
                {"role": "user", "content": "how many shapes are there ?"}, {"role": "assistant", "content": "two"}]
    enc = template.encode(Sample(messages=messages, images=["a.png"], source="t"))
    tokens = tok.convert_ids_to_tokens(enc.input_ids)
    extra = tok.convert_tokens_to_ids("<|extra_0|>")
    assert built.model.image_token_id == extra and enc.input_ids.count(extra) == built.tokens_per_image == 4
    supervised = [t for t, lab in zip(tokens, enc.labels) if lab != IGNORE_INDEX]
    assert supervised == ["red", "<|im_end|>", "two", "<|im_end|>"]
    assert all(lab in (IGNORE_INDEX, i) for lab, i in zip(enc.labels, enc.input_ids))
    for word in ("red", "two"):  # each right after the assistant header
        at = tokens.index(word)
        assert tokens[at - 3:at] == ["<|im_start|>", "assistant", "\n"] and enc.labels[at] != IGNORE_INDEX
    assert enc.labels[-1] == IGNORE_INDEX and tokens[-1] == "\n"  # the newline after <|im_end|> is not learnt


@pytest.mark.parametrize("targets, wanted", [
    ("all-linear", {"c_attn", "c_proj", "w1", "w2"}),
    (["c_attn", "w1", "w2"], {"c_attn", "w1", "w2"}),
])
def test_lora_targets_by_qwen1_layer_names(qwen1_dir, targets, wanted):
    settings = _settings(qwen1_dir, trust_remote_code=True, mode="lora", lora={"r": 4, "target_modules": targets})
    model = build_model(settings).model
    wrapped = {name.rsplit(".", 1)[-1] for name, module in model.llm.named_modules() if hasattr(module, "lora_A")}
    assert wrapped == wanted
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("lm_head" in n for n in trainable)
