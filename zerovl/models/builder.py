"""Build the model a config describes: load or random-init each part, then apply the per-part
training mode (frozen / full / LoRA) and gradient checkpointing — in one place, not in the modules."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from zerovl.config import LoraSettings, ModelSettings
from zerovl.errors import ConfigError
from zerovl.models.connectors import build_connector, projection
from zerovl.models.vision import ImageProcessor, build_vision
from zerovl.models.vlm import ComposedVLM
from zerovl.models.weights import to_dtype

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class BuiltModel:
    model: ComposedVLM
    tokenizer: object
    image_processor: ImageProcessor | None
    tokens_per_image: int


def _declared_generic(path: str) -> bool:
    """True when tokenizer_config.json asks for the generic fast tokenizer. AutoTokenizer would
    otherwise pick the model type's class (e.g. Qwen2Tokenizer) when a config.json sits beside it,
    replacing a custom tokenizer's pre-tokenizer and decoder."""
    config = os.path.join(path, "tokenizer_config.json")
    if not os.path.isfile(config):
        return False
    with open(config) as f:
        return json.load(f).get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(settings: ModelSettings):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = settings.tokenizer or settings.llm.path
    try:
        loader = PreTrainedTokenizerFast if _declared_generic(path) else AutoTokenizer
        tokenizer = loader.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.tokenizer: cannot load a tokenizer from {path} ({e.__class__.__name__})") from None
    image_id = tokenizer.convert_tokens_to_ids(settings.image_token)
    if image_id is None or image_id == tokenizer.unk_token_id:
        tokenizer.add_tokens([settings.image_token], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def import_model_classes(settings: ModelSettings) -> None:
    """Import the modeling modules a config needs. deepspeed.zero.Init patches tensor construction,
    and importing a transformers modeling module inside it fails; so ZeRO-3 builds call this first."""
    from transformers import AutoConfig, Blip2QFormerModel  # noqa: F401
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    llm = settings.llm
    if llm.path is not None:
        config = AutoConfig.from_pretrained(llm.path)
    else:
        inline = dict(llm.config)
        config = AutoConfig.for_model(inline.pop("model_type"), **inline)
    MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    if settings.vision is not None:
        from zerovl.models.vision import tower_classes, vision_config_from

        tower_classes(vision_config_from(settings.vision.path, settings.vision.config).model_type)


def build_llm(settings, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    if settings.path is not None:
        try:
            return AutoModelForCausalLM.from_pretrained(settings.path, dtype=dtype)
        except OSError as e:
            raise ConfigError(f"model.llm.path: cannot load {settings.path} ({e})") from None
    inline = dict(settings.config)
    model_type = inline.pop("model_type", None)
    if model_type is None:
        raise ConfigError("model.llm.config needs a model_type, e.g. qwen2")
    cfg = AutoConfig.for_model(model_type, **inline)
    return to_dtype(AutoModelForCausalLM.from_config(cfg, dtype=dtype), dtype)


def build_model(settings: ModelSettings, precision: str = "fp32") -> BuiltModel:
    dtype = DTYPES[precision]
    tokenizer = load_tokenizer(settings)
    llm = build_llm(settings.llm, dtype)
    if len(tokenizer) > llm.get_input_embeddings().num_embeddings:
        llm.resize_token_embeddings(len(tokenizer))
    vision = connector = processor = None
    if settings.vision is not None:
        vision, processor = build_vision(settings.vision, settings.connector.type, dtype)
        connector = to_dtype(build_connector(
            settings.connector, vision.hidden_size, llm.get_input_embeddings().embedding_dim, vision.num_tokens
        ), dtype)
    model = ComposedVLM(
        llm=llm,
        image_token_id=tokenizer.convert_tokens_to_ids(settings.image_token),
        vision=vision,
        connector=connector,
        vision_trainable=settings.vision is not None and settings.vision.mode != "frozen",
        connector_trainable=settings.connector.mode != "frozen",
    )
    apply_training_modes(model, settings)
    return BuiltModel(model, tokenizer, processor, model.tokens_per_image)


def _lora(module: nn.Module, lora: LoraSettings, causal_lm: bool) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        task_type="CAUSAL_LM" if causal_lm else None,
    )
    return get_peft_model(module, config)


def _enable_checkpointing(module: nn.Module, name: str) -> None:
    if not getattr(module, "supports_gradient_checkpointing", False):
        raise ConfigError(f"model.{name}.gradient_checkpointing: this model does not support it")
    # non-reentrant: works when inputs come from frozen modules (reentrant raises "does not require grad")
    module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def apply_training_modes(model: ComposedVLM, settings: ModelSettings) -> None:
    """frozen: no gradients; full: everything trains; lora: base frozen, peft adapters train."""
    llm = settings.llm
    if llm.gradient_checkpointing:
        _enable_checkpointing(model.llm, "llm")
    model.llm.requires_grad_(llm.mode == "full")
    if llm.mode == "lora":
        model.llm = _lora(model.llm, llm.lora, causal_lm=True)
    if model.vision is not None:
        vision = settings.vision
        if vision.gradient_checkpointing:
            _enable_checkpointing(model.vision.encoder, "vision")
        model.vision.requires_grad_(vision.mode == "full")
        if vision.mode == "lora":
            model.vision.encoder = _lora(model.vision.encoder, vision.lora, causal_lm=False)
        model.connector.requires_grad_(settings.connector.mode == "full")
        if settings.connector.mode == "projection":
            projection(model.connector).requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("every part is frozen: set model.<part>.mode to full or lora for something to train")


def model_parts(model: ComposedVLM) -> dict[str, nn.Module]:
    parts = {"vision": model.vision, "connector": model.connector, "llm": model.llm}
    return {k: v for k, v in parts.items() if v is not None}
