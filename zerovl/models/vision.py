"""Vision towers: any HF vision encoder, loaded from a local directory or built from an inline config,
plus the matching image processor (PIL backend: no torchvision needed)."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from zerovl.errors import ConfigError
from zerovl.models.weights import to_dtype

# vision config model_type -> (transformers model class, PIL image processor class)
_TOWERS = {
    "siglip_vision_model": ("SiglipVisionModel", "SiglipImageProcessorPil"),
    "clip_vision_model": ("CLIPVisionModel", "CLIPImageProcessorPil"),
    "blip_2_vision_model": ("Blip2VisionModel", "BlipImageProcessorPil"),
}


def tower_classes(model_type: str) -> tuple[type, type]:
    import transformers

    if model_type not in _TOWERS:
        raise ConfigError(
            f"model.vision: unsupported vision model_type '{model_type}' (supported: {', '.join(_TOWERS)})"
        )
    model_cls, proc_cls = _TOWERS[model_type]
    return getattr(transformers, model_cls), getattr(transformers, proc_cls)


def vision_config_from(path: str | None, inline: dict[str, Any] | None):
    """The vision sub-config of a tower directory (composite SigLIP/CLIP/BLIP-2 too) or inline dict."""
    from transformers import AutoConfig

    if inline is not None:
        inline = dict(inline)
        model_type = inline.pop("model_type", None)
        if model_type is None:
            raise ConfigError("model.vision.config needs a model_type, e.g. siglip_vision_model")
        tower_classes(model_type)
        return AutoConfig.for_model(model_type, **inline)
    if not os.path.isdir(path):
        raise ConfigError(f"model.vision.path {path} is not a directory")
    cfg = AutoConfig.from_pretrained(path)
    return getattr(cfg, "vision_config", cfg)


def _encoder_layers(encoder: nn.Module) -> nn.ModuleList:
    for name, module in encoder.named_modules():
        if name.endswith("encoder.layers") or name == "encoder.layers":
            return module
    raise ConfigError(f"cannot find the transformer layers of {encoder.__class__.__name__}")


class VisionTower(nn.Module):
    """Wraps an HF vision encoder and returns the feature map the connector consumes.

    ``feature_layer`` = -1 takes the last hidden state (with the tower's final norm where it has one);
    -2 is LLaVA's penultimate layer, and so on. Layers after the chosen one are removed at build time,
    so they cost neither compute nor memory, and parameters they held can never sit without gradients
    in a trained tower. SigLIP's attention-pooling head is removed for the same reason.
    """

    def __init__(self, encoder: nn.Module, feature_layer: int = -1, drop_cls: bool = False):
        super().__init__()
        self.encoder = encoder
        self.feature_layer = feature_layer
        self.drop_cls = drop_cls
        cfg = encoder.config
        if feature_layer != -1:
            layers = _encoder_layers(encoder)
            keep = feature_layer if feature_layer >= 0 else len(layers) + 1 + feature_layer
            if not 0 <= keep <= len(layers):
                raise ConfigError(f"model.vision.feature_layer={feature_layer} is outside 0..{len(layers)} "
                                  f"(or -1..-{len(layers) + 1}) for this {len(layers)}-layer tower")
            del layers[keep:]
            cfg.num_hidden_layers = keep
        for tower in (encoder, getattr(encoder, "vision_model", None)):  # flat (transformers 5) or nested
            if getattr(tower, "use_head", False):
                tower.use_head, tower.head, cfg.vision_use_head = False, None, False
        self.hidden_size = cfg.hidden_size
        self.image_size = cfg.image_size
        self.has_cls = hasattr(getattr(encoder, "embeddings", None), "class_embedding") or hasattr(
            getattr(getattr(encoder, "vision_model", None), "embeddings", None), "class_embedding"
        )
        if drop_cls and not self.has_cls:
            raise ConfigError("model.vision.drop_cls=true but this vision tower has no CLS token")
        self.num_tokens = (cfg.image_size // cfg.patch_size) ** 2 + int(self.has_cls and not drop_cls)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.encoder.parameters()).dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = pixel_values.to(self.dtype)
        if self.feature_layer == -1:
            features = self.encoder(pixel_values=pixel_values).last_hidden_state
        else:  # the tower was cut after the chosen layer: its output, before any final norm
            features = self.encoder(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-1]
        return features[:, 1:] if self.drop_cls else features


def resolve_drop_cls(drop_cls: str | bool, connector_type: str, vcfg) -> bool:
    """``auto``: LLaVA drops the CLS token before a linear/MLP projector; a Q-Former attends to it,
    and SigLIP has none."""
    if drop_cls != "auto":
        return bool(drop_cls)
    return connector_type != "qformer" and vcfg.model_type != "siglip_vision_model"


class ImageProcessor:
    """Picklable callable (DataLoader workers): list of PIL images -> {"pixel_values": Tensor}."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, images: list) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.processor(images=images, return_tensors="pt")["pixel_values"]}


def build_vision(settings, connector_type: str, dtype: torch.dtype) -> tuple[VisionTower, ImageProcessor]:
    vcfg = vision_config_from(settings.path, settings.config)
    model_cls, proc_cls = tower_classes(vcfg.model_type)
    if settings.path is not None:
        encoder = _load_encoder(model_cls, settings.path, vcfg, dtype)
        from transformers import AutoImageProcessor

        try:
            processor = AutoImageProcessor.from_pretrained(settings.path, backend="pil")
        except OSError:
            processor = proc_cls(**_default_processor_kwargs(proc_cls, vcfg, settings.image_processor))
    else:
        encoder = to_dtype(model_cls._from_config(vcfg, dtype=dtype), dtype)
        processor = proc_cls(**_default_processor_kwargs(proc_cls, vcfg, settings.image_processor))
    tower = VisionTower(encoder, settings.feature_layer, resolve_drop_cls(settings.drop_cls, connector_type, vcfg))
    return tower, ImageProcessor(processor)


def _default_processor_kwargs(proc_cls: type, vcfg, overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Resize (and, for CLIP/BLIP, centre-crop) to the tower's own input size."""
    square = {"height": vcfg.image_size, "width": vcfg.image_size}
    kwargs: dict[str, Any] = {"size": square}
    if getattr(proc_cls, "crop_size", None) is not None or getattr(proc_cls, "do_center_crop", False):
        kwargs["crop_size"] = square
    kwargs.update(overrides or {})
    return kwargs


def _load_encoder(model_cls: type, path: str, vcfg, dtype: torch.dtype) -> nn.Module:
    """Load the tower's weights; BLIP-2 keeps them under ``vision_model.`` inside the full model."""
    from transformers import AutoConfig

    top = AutoConfig.from_pretrained(path)
    if top.model_type == "blip-2":
        return _load_prefixed(model_cls, path, vcfg, "vision_model.", dtype)
    return model_cls.from_pretrained(path, dtype=dtype)


def _load_prefixed(model_cls: type, path: str, cfg, prefix: str, dtype: torch.dtype) -> nn.Module:
    from zerovl.models.weights import load_into, load_prefixed_state_dict

    module = to_dtype(model_cls._from_config(cfg, dtype=dtype), dtype)
    load_into(module, load_prefixed_state_dict(path, prefix), f"{path} ({prefix}*)")
    return module
