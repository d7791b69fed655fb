"""Build the model a config describes: load or random-init each part, then apply the per-part
training mode (frozen / full / LoRA) and gradient checkpointing — in one place, not in the modules."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from zerovl.config import LoraSettings, ModelSettings
from zerovl.errors import ConfigError
from zerovl.models.connectors import build_connector, projection
from zerovl.models.native import IMAGE_PAD, VISION_END, VISION_START, NativeVLM, build_native, image_text
from zerovl.models.pretrained import causal_lm_class, from_pretrained, part_config
from zerovl.models.vision import build_vision
from zerovl.models.vlm import ComposedVLM
from zerovl.models.weights import to_dtype

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class BuiltModel:
    model: ComposedVLM | NativeVLM
    tokenizer: object
    image_processor: Callable[[list], dict[str, torch.Tensor]] | None
    tokens_per_image: int | Callable[[str], int]  # fixed by the connector, or per image (dynamic resolution)
    image_token: str
    image_text: Callable[[int], str] | None = None  # the text one image becomes (default: the token repeated)

    def template(self, system_prompt: str | None = None):
        """The chat template; None for a retrieval model (captions, no chat)."""
        from zerovl.data.template import ChatTemplate

        if getattr(self.model, "kind", None) == "retrieval":
            return None

        return ChatTemplate(self.tokenizer, self.image_token, self.tokens_per_image, system_prompt, self.image_text)


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

    path = settings.tokenizer_path
    try:
        loader = PreTrainedTokenizerFast if _declared_generic(path) else AutoTokenizer
        inherited = settings.tokenizer_trust_remote_code is None and settings.tokenizer is None
        switch = "model.llm.trust_remote_code" if inherited else "model.tokenizer_trust_remote_code"
        tokenizer = from_pretrained(loader, path, "model.tokenizer", settings.tokenizer_trusts_code, switch=switch)
    except (OSError, ValueError, ImportError, AttributeError) as e:  # AttributeError: an auto_map to missing code
        raise ConfigError(f"model.tokenizer: cannot load a tokenizer from {path} ({e.__class__.__name__})") from None
    needed = [VISION_START, IMAGE_PAD, VISION_END] if settings.native is not None else [settings.image_token]
    if settings.retrieval is not None:
        needed = []  # captions only: the Q-Former's vocabulary stays as trained
    missing = [t for t in needed if not _known(tokenizer, t)]
    if missing:
        try:
            tokenizer.add_tokens(missing, special_tokens=True)
        except (ValueError, NotImplementedError):  # tiktoken-based (QWenTokenizer): a fixed vocabulary
            if settings.native is not None:
                raise ConfigError(f"model.tokenizer: {path} cannot add the tokens {missing} the native model "
                                  "needs") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None and _known(tokenizer, "<|endoftext|>"):  # Qwen-7B-Chat declares none
            tokenizer.pad_token = "<|endoftext|>"
            if _known(tokenizer, "<|im_end|>"):
                tokenizer.eos_token = "<|im_end|>"  # its chat turns end there; generation stops there
        else:
            tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _known(tokenizer, token: str) -> bool:
    try:
        return tokenizer.convert_tokens_to_ids(token) not in (None, tokenizer.unk_token_id)
    except KeyError:
        return False


RESERVED = [f"<|extra_{i}|>" for i in range(205)] + [f"<|reserved_special_token_{i}|>" for i in range(256)]


def image_token(tokenizer, settings: ModelSettings) -> str:
    """The token images stand in for: ``model.image_token`` when the tokenizer has it (``load_tokenizer``
    adds it where it can), else the first reserved special token the vocabulary already has (Qwen-7B-Chat's
    ``<|extra_0|>``, as MiniGPT4Qwen uses). Its embedding row is never read: every occurrence is replaced
    by image features before the LLM sees it."""
    if settings.native is not None:
        return IMAGE_PAD
    if _known(tokenizer, settings.image_token):
        return settings.image_token
    template = str(getattr(tokenizer, "chat_template", None) or "")
    for token in RESERVED:
        if _known(tokenizer, token) and token not in template:
            log.info("model.image_token %s cannot be added to this tokenizer; images use its reserved %s",
                     settings.image_token, token)
            return token
    raise ConfigError(f"model.image_token: {settings.image_token!r} is not a token of {settings.tokenizer_path} and "
                      "it cannot add tokens; set model.image_token to an unused special token it has")


def import_model_classes(settings: ModelSettings) -> None:
    """Import the modeling modules a config needs. deepspeed.zero.Init patches tensor construction,
    and importing a transformers modeling module inside it fails; so ZeRO-3 builds call this first."""
    from transformers import Blip2QFormerModel  # noqa: F401

    if settings.retrieval is not None:
        return  # Blip2ForImageTextRetrieval lives beside Blip2QFormerModel, imported above
    if settings.native is not None:
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(part_config(settings.native, "model.native", "qwen2_vl"))]
        return
    llm = settings.llm
    causal_lm_class(part_config(llm, "model.llm"), llm.path, llm.trust_remote_code)
    if settings.vision is not None:
        from zerovl.models.vision import tower_classes, vision_config_from

        tower_classes(vision_config_from(settings.vision.path, settings.vision.config).model_type)


def build_llm(settings, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    if settings.path is not None:
        try:
            return from_pretrained(AutoModelForCausalLM, settings.path, "model.llm", settings.trust_remote_code,
                                   dtype=dtype)
        except OSError as e:
            raise ConfigError(f"model.llm.path: cannot load {settings.path} ({e})") from None
    cfg = part_config(settings, "model.llm")
    return to_dtype(AutoModelForCausalLM.from_config(cfg, dtype=dtype), dtype)


def build_model(settings: ModelSettings, precision: str = "fp32", data_max_pixels: int = 1024 * 1024) -> BuiltModel:
    dtype = DTYPES[precision]
    tokenizer = load_tokenizer(settings)
    if settings.retrieval is not None:
        from zerovl.models.retrieval import build_retrieval

        model, processor = build_retrieval(settings, tokenizer, dtype)
        apply_retrieval_training_modes(model, settings)
        return BuiltModel(model, tokenizer, processor, model.tokens_per_image, "")
    if settings.native is not None:
        model, processor, tokens = build_native(settings, tokenizer, dtype, data_max_pixels)
        apply_native_training_modes(model, settings)
        return BuiltModel(model, tokenizer, processor, tokens, IMAGE_PAD, image_text)
    llm = build_llm(settings.llm, dtype)
    if len(tokenizer) > llm.get_input_embeddings().num_embeddings:
        llm.resize_token_embeddings(len(tokenizer))
    vision = connector = processor = None
    if settings.vision is not None:
        vision, processor = build_vision(settings.vision, settings.connector.type, dtype)
        connector = to_dtype(build_connector(
            settings.connector, vision.hidden_size, llm.get_input_embeddings().embedding_dim, vision.num_tokens
        ), dtype)
    token = image_token(tokenizer, settings)
    model = ComposedVLM(
        llm=llm,
        image_token_id=tokenizer.convert_tokens_to_ids(token),
        vision=vision,
        connector=connector,
        vision_trainable=settings.vision is not None and settings.vision.mode != "frozen",
        connector_trainable=settings.connector.mode != "frozen",
        connector_projection_only=settings.connector.mode == "projection",
    )
    apply_training_modes(model, settings)
    return BuiltModel(model, tokenizer, processor, model.tokens_per_image, token)


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


def apply_retrieval_training_modes(model, settings: ModelSettings) -> None:
    """vision = the tower (frozen unless model.vision says otherwise, as BLIP-2 stage 1); connector = the
    Q-Former and its heads: full, frozen, or lora (adapters on the Q-Former, queries/projections/ITM head/
    temperature fully trained, text embeddings frozen)."""
    hf = model.hf
    vision = settings.vision
    vision_mode = vision.mode if vision is not None else "frozen"
    if vision is not None and vision.gradient_checkpointing:
        _enable_checkpointing(hf.vision_model, "vision")
    hf.vision_model.requires_grad_(vision_mode == "full")
    if vision_mode == "lora":
        hf.vision_model = _lora(hf.vision_model, vision.lora, causal_lm=False)
    mode = settings.connector.mode
    for name, p in model.named_parameters():
        if not name.startswith("hf.vision_model."):
            p.requires_grad_(mode == "full")
    if mode == "lora":
        hf.qformer = _lora(hf.qformer, settings.connector.lora, causal_lm=False)
        heads = [hf.query_tokens, model.temp, *hf.vision_projection.parameters(), *hf.text_projection.parameters(),
                 *hf.itm_head.parameters(), *(model.itg_head.parameters() if model.itg_head is not None else [])]
        for p in heads:
            p.requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("every part is frozen: set model.<part>.mode to full or lora for something to train")


def apply_native_training_modes(model: NativeVLM, settings: ModelSettings) -> None:
    """The same per-part switches on a native model: vision = its vision blocks, connector = its
    merger, llm = its language model and head. LoRA goes through one peft wrapper with per-part ranks."""
    modes = {"vision": settings.vision.mode if settings.vision else "frozen",
             "connector": settings.connector.mode, "llm": settings.llm.mode}
    if modes["connector"] == "projection":
        raise ConfigError("model.connector.mode=projection applies to composed models; use full or frozen")
    visual, language = model.base.model.visual, model.base.model.language_model
    if settings.vision is not None and settings.vision.gradient_checkpointing:
        _enable_checkpointing(visual, "vision")
    if settings.llm.gradient_checkpointing:
        _enable_checkpointing(language, "llm")
    lora_parts = {part: (settings.vision if part == "vision" else settings.llm).lora
                  for part in ("vision", "llm") if modes[part] == "lora"}
    if lora_parts:
        from peft import LoraConfig, get_peft_model

        targets, ranks, alphas = [], {}, {}
        for part, lora in lora_parts.items():
            names = model.part_modules(part)
            if lora.target_modules != "all-linear":
                wanted = [lora.target_modules] if isinstance(lora.target_modules, str) else lora.target_modules
                names = [n for n in names if n.rsplit(".", 1)[-1] in wanted]
            targets += names
            ranks.update({n: lora.r for n in names})
            alphas.update({n: lora.alpha for n in names})
        first = next(iter(lora_parts.values()))
        config = LoraConfig(r=first.r, lora_alpha=first.alpha, lora_dropout=first.dropout, target_modules=targets,
                            rank_pattern=ranks, alpha_pattern=alphas)
        model.hf = get_peft_model(model.hf, config)
    for part, params in model.parts().items():  # after peft, which freezes everything but its adapters
        for name, p in params:
            p.requires_grad_(modes[part] == "full" or (modes[part] == "lora" and "lora_" in name))
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("every part is frozen: set model.<part>.mode to full or lora for something to train")


def text_side(settings: ModelSettings, data_max_pixels: int = 1024 * 1024):
    """(tokenizer, tokens_per_image, image_token, image_text) from configs alone — what the chat template
    needs — without loading weights (composed towers are built on the meta device)."""
    tokenizer = load_tokenizer(settings)
    if settings.native is not None:
        from zerovl.models.native import native_resolution

        native = settings.native
        vcfg = part_config(native, "model.native", "qwen2_vl").vision_config
        tokens, origin = native_resolution(native, vcfg, data_max_pixels)
        log.info("native image processor: %s", origin)
        return tokenizer, tokens, IMAGE_PAD, image_text
    if settings.vision is None:
        return tokenizer, 0, image_token(tokenizer, settings), None
    if settings.connector.type == "qformer":
        count = settings.connector.num_query_tokens
        if settings.connector.path is not None:
            from transformers import Blip2Config

            count = Blip2Config.from_pretrained(settings.connector.path).num_query_tokens
        return tokenizer, count, image_token(tokenizer, settings), None
    from zerovl.models.vision import VisionTower, resolve_drop_cls, tower_classes, vision_config_from

    vcfg = vision_config_from(settings.vision.path, settings.vision.config)
    with torch.device("meta"):
        encoder = tower_classes(vcfg.model_type)[0](vcfg)
    tower = VisionTower(encoder, settings.vision.feature_layer, resolve_drop_cls(settings.vision.drop_cls,
                                                                                 settings.connector.type, vcfg))
    return tokenizer, tower.num_tokens, image_token(tokenizer, settings), None


def named_parts(model: ComposedVLM | NativeVLM) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Parameters by part (vision, connector, llm) — what per-part learning rates and reports address."""
    if isinstance(model, NativeVLM):
        return model.parts()
    if getattr(model, "kind", None) == "retrieval":
        from zerovl.models.retrieval import retrieval_parts

        return retrieval_parts(model)
    parts = {"vision": model.vision, "connector": model.connector, "llm": model.llm}
    return {k: list(v.named_parameters()) for k, v in parts.items() if v is not None}
