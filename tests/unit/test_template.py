import pytest
from transformers import AutoTokenizer

from zerovl.data.samples import Sample
from zerovl.data.template import CHATML_TEMPLATE, IGNORE_INDEX, ChatTemplate, TooLong
from zerovl.errors import DataError


@pytest.fixture
def tokenizer(scenes):
    return AutoTokenizer.from_pretrained(scenes["tokenizer"])


def supervised(tok, enc):
    return tok.convert_ids_to_tokens([t for t in enc.labels if t != IGNORE_INDEX])


def sample(*turns, images=(), system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    for i, text in enumerate(turns):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return Sample(messages=msgs, images=list(images), source="t.jsonl:1")


def test_only_assistant_replies_and_end_tokens_are_supervised(tokenizer):
    tpl = ChatTemplate(tokenizer, "<image>", tokens_per_image=3)
    enc = tpl.encode(sample("<image>how many shapes are there ?", "two",
                            "what colour is the circle ?", "red", images=["a.png"], system="you are helpful"))
    assert supervised(tokenizer, enc) == ["two", "<|im_end|>", "red", "<|im_end|>"]
    tokens = tokenizer.convert_ids_to_tokens(enc.input_ids)
    assert tokens.count("<image>") == 3
    assert tokens[:4] == ["<|im_start|>", "system", "you", "are"]
    # every label is either ignored or equals the input id at that position
    assert all(lab in (IGNORE_INDEX, tid) for lab, tid in zip(enc.labels, enc.input_ids))


def test_chatml_fallback_when_tokenizer_has_no_template(tokenizer):
    tokenizer.chat_template = None
    tpl = ChatTemplate(tokenizer, "<image>", tokens_per_image=2)
    assert tpl.chat_template == CHATML_TEMPLATE
    enc = tpl.encode(sample("how many sides does a square have ?", "four"))
    assert supervised(tokenizer, enc) == ["four", "<|im_end|>"]


def test_system_prompt_from_config_is_prepended(tokenizer):
    tpl = ChatTemplate(tokenizer, "<image>", 1, system_prompt="you are helpful")
    enc = tpl.encode(sample("what shape is the red object ?", "circle"))
    assert tokenizer.convert_ids_to_tokens(enc.input_ids)[1:4] == ["system", "you", "are"]


def test_prompt_for_generation_ends_with_assistant_header(tokenizer):
    tpl = ChatTemplate(tokenizer, "<image>", 2)
    ids = tpl.encode_prompt(sample("<image>how many shapes are there ?", "two", images=["a.png"]))
    assert tokenizer.convert_ids_to_tokens(ids)[-2:] == ["<|im_start|>", "assistant"]
    assert "two" not in tokenizer.convert_ids_to_tokens(ids)


def test_truncation_never_cuts_image_tokens(tokenizer):
    tpl = ChatTemplate(tokenizer, "<image>", tokens_per_image=8)
    long_text = "what colour is the circle ? " * 4
    s = sample(long_text + "<image>", "red", images=["a.png"])
    full = len(tpl.encode(s).input_ids)
    with pytest.raises(TooLong) as err:
        tpl.encode(s, max_length=full - 6)  # the cut would land inside the image tokens
    assert err.value.reason == "image_tokens_cut"


def test_truncating_text_only_tail_is_allowed_but_needs_a_label(tokenizer):
    tpl = ChatTemplate(tokenizer, "<image>", tokens_per_image=2)
    s = sample("<image>how many shapes are there ?", "two", "describe the image .", "a red circle then a blue square",
               images=["a.png"])
    full = tpl.encode(s)
    cut = tpl.encode(s, max_length=len(full.input_ids) - 3)
    assert len(cut.input_ids) == len(full.input_ids) - 3
    assert "two" in supervised(tokenizer, cut)
    with pytest.raises(TooLong) as err:
        tpl.encode(s, max_length=8)  # only the prompt survives: nothing left to learn
    assert err.value.reason in ("no_supervised_tokens", "image_tokens_cut")


def test_image_tag_count_must_match_images(tokenizer):
    tpl = ChatTemplate(tokenizer, "<image>", 2)
    with pytest.raises(DataError, match="t.jsonl:1"):
        tpl.encode(sample("<image><image>what ?", "red", images=["a.png"]))
