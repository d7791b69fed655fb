"""A model directory that ships its own code, as Qwen-7B-Chat's does: ``configuration_qwen.py``,
``modeling_qwen.py`` and ``tokenization_qwen.py`` beside the weights, wired through ``auto_map`` in
``config.json`` and ``tokenizer_config.json``, loadable only with ``trust_remote_code=True``.

The code is authored here (Qwen's own files are not in ../shared): Qwen-1's module names
(``transformer.h.N.attn.c_attn`` / ``c_proj``, ``mlp.w1`` / ``w2`` / ``c_proj``, ``ln_1``, ``lm_head``), and a
slow tokenizer that, like ``QWenTokenizer``, reads a ``qwen.tiktoken`` file (base64 token, rank), has no
chat template, no offsets, no eos token, and refuses ``add_tokens`` for anything but its own special
tokens (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ``<|extra_0|>``...). Its vocabulary is whole
words (split on spaces and punctuation) rather than Qwen's byte-level BPE.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

CONFIGURATION = '''
from transformers import PretrainedConfig


class QWenConfig(PretrainedConfig):
    model_type = "qwen"

    def __init__(self, vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64, layer_norm_epsilon=1e-6, initializer_range=0.02, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
'''

MODELING = '''
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

from .configuration_qwen import QWenConfig


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class QWenAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.heads = config.num_attention_heads
        self.c_attn = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.c_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x, mask):
        b, t, d = x.shape
        q, k, v = (y.view(b, t, self.heads, d // self.heads).transpose(1, 2) for y in self.c_attn(x).split(d, -1))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.c_proj(out.transpose(1, 2).reshape(b, t, d))


class QWenMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        half = config.intermediate_size // 2
        self.w1 = nn.Linear(config.hidden_size, half, bias=False)
        self.w2 = nn.Linear(config.hidden_size, half, bias=False)
        self.c_proj = nn.Linear(half, config.hidden_size, bias=False)

    def forward(self, x):
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


class QWenBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.attn = QWenAttention(config)
        self.ln_2 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mlp = QWenMLP(config)

    def forward(self, x, mask):
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class QWenPreTrainedModel(PreTrainedModel):
    config_class = QWenConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["QWenBlock"]

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()


class QWenModel(QWenPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.pos = nn.Embedding(512, config.hidden_size)
        self.h = nn.ModuleList(QWenBlock(config) for _ in range(config.num_hidden_layers))
        self.ln_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        b, t, _ = x.shape
        if position_ids is None:
            position_ids = torch.arange(t, device=x.device).expand(b, t)
        x = x + self.pos(position_ids)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        mask = mask.expand(b, 1, t, t)
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, None, :]
        mask = mask | torch.eye(t, dtype=torch.bool, device=x.device)  # a padded query attends to itself
        for block in self.h:
            x = block(x, mask)
        return BaseModelOutput(last_hidden_state=self.ln_f(x))


class QWenLMHeadModel(QWenPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.transformer = QWenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                **kwargs):
        hidden = self.transformer(input_ids, attention_mask, position_ids, inputs_embeds).last_hidden_state
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)
'''

TOKENIZATION = '''
import base64
import os
import re

from transformers import PreTrainedTokenizer

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(4)]
DEFAULTS = {}
WORDS = re.compile(r"\\n|[A-Za-z0-9']+|[^\\sA-Za-z0-9']")


class QWenTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "qwen.tiktoken"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, errors="replace", **kwargs):
        kwargs.update(DEFAULTS)
        with open(vocab_file, "rb") as f:
            ranks = {base64.b64decode(tok).decode(): int(rank) for tok, rank in (line.split() for line in f if line.strip())}
        self.vocab_file = vocab_file
        self.encoder = {**ranks, **{t: len(ranks) + i for i, t in enumerate(SPECIAL_TOKENS)}}
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.special = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")
        super().__init__(errors=errors, **kwargs)

    def _add_tokens(self, new_tokens, special_tokens=False):  # as QWenTokenizer: a fixed vocabulary
        if not special_tokens and new_tokens:
            raise ValueError("Adding regular tokens is not supported")
        for token in new_tokens:
            if str(token) not in SPECIAL_TOKENS:
                raise ValueError("Adding unknown special tokens is not supported")
        return 0

    @property
    def vocab_size(self):
        return len(self.encoder)

    def __len__(self):
        return len(self.encoder)

    def get_vocab(self):
        return dict(self.encoder)

    def tokenize(self, text, **kwargs):
        tokens = []
        for piece in self.special.split(text):
            if piece in self.encoder and piece in SPECIAL_TOKENS:
                tokens.append(piece)
            elif piece:
                tokens += [w if w in self.encoder else "<unk>" for w in WORDS.findall(piece.lower())]
        return tokens

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self.encoder.get(tokens)
        return [self.encoder.get(t) for t in tokens]

    def _convert_token_to_id(self, token):
        return self.encoder.get(token, self.encoder["<unk>"])

    def _convert_id_to_token(self, index):
        return self.decoder[index]

    def convert_tokens_to_string(self, tokens):
        return " ".join(tokens).replace(" \\n ", "\\n")

    def _decode(self, token_ids, skip_special_tokens=False, **kwargs):
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        tokens = [self.decoder[i] for i in token_ids]
        if skip_special_tokens:
            tokens = [t for t in tokens if t not in SPECIAL_TOKENS]
        return self.convert_tokens_to_string(tokens)

    def save_vocabulary(self, save_directory, filename_prefix=None):
        path = os.path.join(save_directory, (filename_prefix or "") + "qwen.tiktoken")
        with open(path, "w") as f:
            for token, rank in sorted(self.encoder.items(), key=lambda kv: kv[1]):
                if token not in SPECIAL_TOKENS:
                    f.write(base64.b64encode(token.encode()).decode() + " " + str(rank) + "\\n")
        return (path,)
'''

WORDS = re.compile(r"\n|[A-Za-z0-9']+|[^\sA-Za-z0-9']")
BASE_WORDS = ["<unk>", "\n", "system", "user", "assistant", "you", "are", "a", "helpful", "."]


def vocabulary(texts: list[str]) -> list[str]:
    words = list(BASE_WORDS)
    for text in texts:
        for w in WORDS.findall(text.lower()):
            if w not in words:
                words.append(w)
    return words


def write_qwen1_dir(path: Path, texts: list[str], hidden: int = 32, layers: int = 2) -> Path:
    """A Qwen-1-style remote-code directory at ``path``: code, configs, vocabulary over ``texts``'
    words, and random-init weights (saved by the directory's own code)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "configuration_qwen.py").write_text(CONFIGURATION)
    (path / "modeling_qwen.py").write_text(MODELING)
    (path / "tokenization_qwen.py").write_text(TOKENIZATION)
    words = vocabulary(texts)
    (path / "qwen.tiktoken").write_text("".join(f"{base64.b64encode(w.encode()).decode()} {i}\n"
                                                for i, w in enumerate(words)))
    (path / "tokenizer_config.json").write_text(json.dumps({  # the real file's keys (../shared qwen-7b-chat)
        "model_max_length": 8192, "tokenizer_class": "QWenTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}}, indent=2))
    (path / "config.json").write_text(json.dumps({
        "architectures": ["QWenLMHeadModel"], "model_type": "qwen",
        "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                     "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
        "vocab_size": len(words) + 7, "hidden_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": 2, "intermediate_size": 2 * hidden}, indent=2))
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    model.save_pretrained(path, safe_serialization=True)
    return path


# ChatGLM3's special tokens (its tokenization_chatglm.py registers these; eos </s>, no <image> can be added)
CHATGLM_SPECIALS = ["</s>", "[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>",
                    "<|observation|>"]


def write_chatglm3_tokenizer_dir(path: Path, texts: list[str], tokenizer_config: dict) -> Path:
    """A ChatGLM3-style slow tokenizer directory: the same word tokenizer under ChatGLM3's class name,
    special tokens and eos, with ``tokenizer_config`` (the real file's, chat template included) beside it."""
    path.mkdir(parents=True, exist_ok=True)
    code = TOKENIZATION.replace("class QWenTokenizer(", "class ChatGLMTokenizer(").replace(
        'SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(4)]',
        f"SPECIAL_TOKENS = {CHATGLM_SPECIALS!r}").replace("DEFAULTS = {}", 'DEFAULTS = {"eos_token": "</s>"}')
    code = code.replace('"qwen.tiktoken"', '"tokenizer.model"')
    (path / "tokenization_chatglm.py").write_text(code)
    words = vocabulary(texts)
    (path / "tokenizer.model").write_text("".join(f"{base64.b64encode(w.encode()).decode()} {i}\n"
                                                  for i, w in enumerate(words)))
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return path
