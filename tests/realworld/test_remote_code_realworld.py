"""The seeds' own tokenizer files (../shared/realworld/tokenizers/qwen-7b-chat, chatglm3-6b) through zerovl:
their real tokenizer_config.json beside a word-level stand-in for the tokenizer code they would ship
(tests/remote_code.py; the real tokenization_*.py files are not in ../shared)."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.realworld.conftest import TOKENIZERS
from tests.remote_code import TOKENIZATION, vocabulary, write_chatglm3_tokenizer_dir
from zerovl.config import ModelSettings
from zerovl.data.samples import Sample
from zerovl.data.template import IGNORE_INDEX
from zerovl.errors import ConfigError
from zerovl.models.builder import BuiltModel, image_token, load_tokenizer

CHAT = [{"role": "user", "content": "what colour is the shape ?"}, {"role": "assistant", "content": "red"},
        {"role": "user", "content": "how many shapes are there ?"}, {"role": "assistant", "content": "two"}]
TEXTS = [m["content"] for m in CHAT]


def _settings(directory, trust=True) -> ModelSettings:
    return ModelSettings.model_validate({"llm": {"config": {"model_type": "qwen2"}}, "tokenizer": str(directory),
                                         "tokenizer_trust_remote_code": trust})


def test_chatglm3_renders_its_role_tokens_and_ends_the_conversation_with_eos(tmp_path):
    real = json.loads((TOKENIZERS / "chatglm3-6b" / "tokenizer_config.json").read_text())
    directory = write_chatglm3_tokenizer_dir(tmp_path / "chatglm3-6b", TEXTS, real)
    with pytest.raises(ConfigError, match="set model.tokenizer_trust_remote_code=true"):
        load_tokenizer(_settings(directory, trust=False))
    tok = load_tokenizer(_settings(directory))
    assert type(tok).__name__ == "ChatGLMTokenizer" and not tok.is_fast and tok.eos_token == "</s>"
    template = BuiltModel(None, tok, None, 0, "<image>").template()
    assert template.pieces and template.closing_eos and template.system_prompt is None
    enc = template.encode(Sample(messages=CHAT, images=[], source="t:1"))
    tokens = tok.convert_ids_to_tokens(enc.input_ids)
    assert tokens[:3] == ["[gMASK]", "sop", "<|user|>"]  # the real template's prefix and role tokens
    assert tokens.count("<|assistant|>") == 2 and tokens.count("<|user|>") == 2
    supervised = [t for t, lab in zip(tokens, enc.labels) if lab != IGNORE_INDEX]
    # the newline the template writes after <|assistant|> is the reply's first token (the prompt ends at
    # <|assistant|>), as ChatGLM3's finetune_hf.py supervises it; eos is appended once, at the end, as there
    assert supervised == ["\n", "red", "\n", "two", "</s>"]
    prompt = tok.convert_ids_to_tokens(template.encode_prompt(Sample(messages=CHAT[:3], images=[], source="t:2")))
    assert prompt[-1] == "<|assistant|>" and "</s>" not in prompt


def test_the_real_qwen_7b_chat_tokenizer_config_with_its_code_stand_in(tmp_path):
    """The real tokenizer_config.json (auto_map to tokenization_qwen.QWenTokenizer, no chat_template, no
    special-token keys): ChatML with Qwen's default system prompt, <|endoftext|> pad, <|extra_0|> images."""
    directory = tmp_path / "qwen-7b-chat"
    directory.mkdir()
    shutil.copyfile(TOKENIZERS / "qwen-7b-chat" / "tokenizer_config.json", directory / "tokenizer_config.json")
    (directory / "tokenization_qwen.py").write_text(TOKENIZATION)
    words = vocabulary(TEXTS)
    import base64

    (directory / "qwen.tiktoken").write_text("".join(f"{base64.b64encode(w.encode()).decode()} {i}\n"
                                                     for i, w in enumerate(words)))
    settings = _settings(directory)
    tok = load_tokenizer(settings)
    assert (tok.pad_token, tok.eos_token, image_token(tok, settings)) == ("<|endoftext|>", "<|im_end|>", "<|extra_0|>")
    template = BuiltModel(None, tok, None, 0, "<image>").template()
    text = tok.decode(template.encode(Sample(messages=CHAT, images=[], source="t:1")).input_ids)
    assert text.startswith("<|im_start|> system\nyou are a helpful assistant . <|im_end|>")


def test_the_planner_counts_qwen_7b_chat_from_its_real_config(tmp_path):
    """The real Qwen-7B-Chat config.json (auto_map, model_type qwen) with the stand-in code beside it: the
    planner builds it on the meta device through trust_remote_code and counts Qwen-1's 7.72B (its
    c_attn / c_proj / w1 / w2 shapes are Qwen-1's; the stand-in adds a 512 x 4096 position table)."""
    from tests.realworld.conftest import MODEL_CONFIGS
    from tests.remote_code import CONFIGURATION, MODELING
    from zerovl.engine.planner import count_model

    directory = tmp_path / "Qwen-7B-Chat"
    directory.mkdir()
    shutil.copyfile(MODEL_CONFIGS / "qwen-7b-chat.config.json", directory / "config.json")
    (directory / "configuration_qwen.py").write_text(CONFIGURATION)
    (directory / "modeling_qwen.py").write_text(MODELING)
    settings = ModelSettings.model_validate({"llm": {"path": str(directory), "trust_remote_code": True,
                                                     "mode": "lora", "lora": {"target_modules": ["c_attn"]}}})
    llm = count_model(settings).parts["llm"]
    assert 7.70e9 < llm.frozen < 7.74e9
    assert llm.trainable == 32 * 8 * (4096 + 3 * 4096)  # LoRA r 8 on each layer's c_attn
    with pytest.raises(ConfigError, match="set model.llm.trust_remote_code=true"):
        count_model(settings.model_copy(update={"llm": settings.llm.model_copy(update={"trust_remote_code": False})}))
