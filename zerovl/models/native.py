"""Native HF vision-language models (Qwen2-VL, Qwen2.5-VL) behind the same contract as ComposedVLM.

The HF model does its own image merging and multimodal RoPE; this wrapper adds what training needs:
the per-part view (vision blocks / merger / language model) that freezing, LoRA and per-part learning
rates use, dynamic-resolution image token counts for the chat template, and the same ZeRO-3 safety
as the composed model — a text-only batch still runs the vision tower on a tiny dummy image weighted
by 0, so every rank calls the same modules.
"""

from __future__ import annotations

import json
import logging
import os

import torch
from torch import nn

from zerovl.errors import ConfigError, DataError
from zerovl.models.loss import DEFAULT_CHUNK_TOKENS, causal_lm_loss, plain_loss

VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"
SUPPORTED = ("qwen2_vl", "qwen2_5_vl")
log = logging.getLogger(__name__)


class NativeVLM(nn.Module):
    def __init__(self, hf_model: nn.Module, image_token_id: int, loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
        super().__init__()
        self.hf = hf_model
        self.image_token_id = image_token_id
        self.loss_chunk_tokens = loss_chunk_tokens  # rows per chunk of the LM loss (models/loss.py); 0 = plain
        vcfg = hf_model.config.vision_config
        self.merge = vcfg.spatial_merge_size
        self.patch_elements = vcfg.in_channels * vcfg.temporal_patch_size * vcfg.patch_size**2

    # -- the parts that per-part modes, LoRA and learning rates address -------------------------
    @property
    def base(self) -> nn.Module:
        """The HF model itself, also when peft wraps it for LoRA."""
        return self.hf.get_base_model() if hasattr(self.hf, "get_base_model") else self.hf

    @property
    def visual(self) -> nn.Module:
        return self.base.model.visual

    def parts(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """vision = the vision transformer without its merger, connector = the merger, llm = the rest."""
        out: dict[str, list] = {"vision": [], "connector": [], "llm": []}
        for name, param in self.named_parameters():
            if ".visual.merger." in f".{name}":
                out["connector"].append((name, param))
            elif ".visual." in f".{name}":
                out["vision"].append((name, param))
            else:
                out["llm"].append((name, param))
        return out

    def part_modules(self, part: str) -> list[str]:
        """Names of the nn.Linear modules of a part (LoRA targets)."""
        names = []
        for name, module in self.hf.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            in_visual, in_merger = ".visual." in f".{name}.", ".merger." in f".{name}."
            if (part == "vision" and in_visual and not in_merger) or (part == "llm" and not in_visual
                                                                        and not name.endswith("lm_head")):
                names.append(name)
        return names

    def vision_token_count(self, batch: dict[str, torch.Tensor]) -> int:
        """Tokens the vision tower processes in a batch (patches before merging)."""
        pixels = batch.get("pixel_values")
        return int(pixels.shape[0]) if pixels is not None else 0

    # -- forward / generate ----------------------------------------------------------------------
    def _dummy_vision(self, device: torch.device) -> torch.Tensor:
        grid = torch.tensor([[1, self.merge, self.merge]], device=device)
        pixels = torch.zeros(self.merge * self.merge, self.patch_elements, device=device,
                             dtype=self.visual.dtype)
        return self.visual(pixels, grid_thw=grid).pooler_output

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, loss_reduction: str = "mean"):
        """Embeddings, then the vision tower (real or dummy), then the language model — the same module
        order for image and text-only batches, which ZeRO-3's parameter fetching requires. With labels:
        the LM loss (``mean`` or ``sum`` over supervised tokens, as ComposedVLM.forward), computed in
        chunks through ``lm_head`` from the decoder's hidden states; without: the logits."""
        if position_ids is not None:
            raise ConfigError("data.packing is not supported for native models (their M-RoPE positions are 3-D)")
        inner = self.base.model
        embeds = inner.get_input_embeddings()(input_ids)
        image_mask = input_ids == self.image_token_id
        grid = None
        if pixel_values is None or pixel_values.shape[0] == 0:
            embeds = embeds + 0.0 * self._dummy_vision(input_ids.device).sum().to(embeds.dtype)
        else:
            features = self.visual(pixel_values.to(self.visual.dtype), grid_thw=image_grid_thw).pooler_output
            if features.shape[0] != int(image_mask.sum()):
                raise DataError(f"{features.shape[0]} image features for {int(image_mask.sum())} image tokens")
            embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), features.to(embeds.dtype))
            grid = image_grid_thw
        positions, _ = inner.get_rope_index(input_ids, image_grid_thw=grid, video_grid_thw=None,
                                            attention_mask=attention_mask, mm_token_type_ids=image_mask.int())
        inputs = {"inputs_embeds": embeds, "attention_mask": attention_mask, "position_ids": positions,
                  "use_cache": False}
        if labels is None:
            return self.hf(**inputs).logits
        if not self.loss_chunk_tokens:  # the plain path, for comparison
            if loss_reduction == "mean":
                return self.hf(**inputs, labels=labels).loss
            return plain_loss(self.hf(**inputs).logits, labels, loss_reduction)
        hidden = inner(**inputs).last_hidden_state  # what the HF model's own forward feeds its lm_head
        return causal_lm_loss(hidden, self.base.lm_head, labels, loss_reduction, self.loss_chunk_tokens)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 image_grid_thw: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Continuation of left-padded prompts; returns only the new token ids."""
        vision = {}
        if pixel_values is not None and pixel_values.shape[0]:
            vision = {"pixel_values": pixel_values.to(self.visual.dtype), "image_grid_thw": image_grid_thw,
                      "mm_token_type_ids": (input_ids == self.image_token_id).int()}
        lockstep = None
        if not vision and hasattr(next(self.visual.parameters()), "ds_id"):
            # ZeRO-3: a rank generating for images runs the vision tower once per generate call; a
            # text-only rank must fetch the same modules in the same order, or both hang. transformers
            # 5 computes image features before decoding; older versions inside the prefill forward.
            if hasattr(self.hf, "_prepare_multimodal_encoder_kwargs_for_generation"):
                self._dummy_vision(input_ids.device)
            else:
                def dummy_vision_once(module, args, kwargs):
                    lockstep.remove()
                    self._dummy_vision(input_ids.device)

                lockstep = self.base.model.language_model.register_forward_pre_hook(dummy_vision_once,
                                                                                    with_kwargs=True)
        try:
            out = self.hf.generate(input_ids=input_ids, attention_mask=attention_mask, **vision, **kwargs)
        finally:
            if lockstep is not None:
                lockstep.remove()
        return out[:, input_ids.shape[1]:]


DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS = 56 * 56, 28 * 28 * 1280  # transformers' Qwen2-VL processor defaults
MAX_ASPECT = 200  # smart_resize refuses more extreme images


def directory_pixel_range(path: str | None) -> tuple[int | None, int | None]:
    """(min_pixels, max_pixels) as a model directory's preprocessor_config.json states them, in any of the
    forms in the wild: top-level ``min_pixels``/``max_pixels`` (the original Qwen2-VL release), a ``size``
    dict with ``min_pixels``/``max_pixels`` or ``shortest_edge``/``longest_edge`` (re-saved by newer
    transformers), or nothing. Top-level keys win, as transformers' own constructor lets them."""
    file = os.path.join(path, "preprocessor_config.json") if path else None
    if file is None or not os.path.isfile(file):
        return None, None
    try:
        with open(file, encoding="utf-8-sig") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file} is not valid JSON ({e}); fix or remove it") from None
    size = raw.get("size") if isinstance(raw.get("size"), dict) else {}
    low = raw.get("min_pixels", size.get("min_pixels", size.get("shortest_edge")))
    high = raw.get("max_pixels", size.get("max_pixels", size.get("longest_edge")))
    return (int(low) if low is not None else None), (int(high) if high is not None else None)


def pixel_range(native) -> tuple[int, int, str]:
    """The [min, max] pixels in force: model.native.min_pixels/max_pixels when given, else the model
    directory's preprocessor values, else transformers' defaults — and where each came from."""
    file_low, file_high = directory_pixel_range(native.path)
    origin_file = os.path.join(native.path, "preprocessor_config.json") if native.path else None

    def pick(ours, theirs, default, key):
        if ours is not None:
            return ours, f"model.native.{key}"
        if theirs is not None:
            return theirs, origin_file
        return default, "default"

    low, low_from = pick(native.min_pixels, file_low, DEFAULT_MIN_PIXELS, "min_pixels")
    high, high_from = pick(native.max_pixels, file_high, DEFAULT_MAX_PIXELS, "max_pixels")
    if low > high:
        raise ConfigError(f"min_pixels={low} (from {low_from}) exceeds max_pixels={high} (from {high_from}); "
                          "set model.native.min_pixels/max_pixels so that min <= max")
    return low, high, f"min_pixels={low} ({low_from}), max_pixels={high} ({high_from})"


class DynamicResolution:
    """Qwen2-VL's dynamic resolution in one place: the size an image is resized to, and so its patch grid
    and its number of image-pad tokens. The chat template counts tokens with it from the image header
    (the text is tokenized before any pixel is decoded) and the image processor resizes with it, so the
    token count in the text and the features the vision tower makes cannot disagree."""

    def __init__(self, patch: int, merge: int, min_pixels: int, max_pixels: int, data_max_pixels: int):
        self.patch, self.merge = patch, merge
        self.min_pixels, self.max_pixels, self.data_max_pixels = min_pixels, max_pixels, data_max_pixels

    def resized(self, width: int, height: int, name: str = "image") -> tuple[int, int]:
        """(width, height) the vision tower sees: bounded by data.max_pixels, then smart_resize into
        [min_pixels, max_pixels] with sides a multiple of patch x merge."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        from zerovl.data.images import fit_max_pixels

        if max(width, height) > MAX_ASPECT * min(width, height):
            raise DataError(f"image {name} is {width}x{height}, beyond Qwen2-VL's {MAX_ASPECT}:1 aspect-ratio "
                            "limit; crop or pad it, or set data.skip_bad_samples=true to skip such samples")
        width, height = fit_max_pixels(width, height, self.data_max_pixels)
        h, w = smart_resize(height, width, factor=self.patch * self.merge, min_pixels=self.min_pixels,
                            max_pixels=self.max_pixels)
        return w, h

    def grid(self, width: int, height: int, name: str = "image") -> tuple[int, int, int]:
        w, h = self.resized(width, height, name)
        return 1, h // self.patch, w // self.patch

    def tokens(self, width: int, height: int, name: str = "image") -> int:
        _, gh, gw = self.grid(width, height, name)
        return gh * gw // self.merge**2

    def __call__(self, path: str, data: bytes | None = None) -> int:
        """Image-pad tokens for an image file (or its bytes, for shard members), from its header only."""
        from zerovl.data.images import image_size

        width, height = image_size(path, data=data)
        return self.tokens(width, height, path)

    def describe(self) -> str:
        return f"dynamic(patch={self.patch},merge={self.merge},pixels={self.min_pixels}..{self.max_pixels})"


def image_text(count: int) -> str:
    return VISION_START + IMAGE_PAD * count + VISION_END


class NativeImageProcessor:
    """Picklable: PIL images -> {"pixel_values": (patches, C*T*P*P), "image_grid_thw": (images, 3)}.

    Images are resized here by :class:`DynamicResolution` and handed to the HF processor with
    ``do_resize=False``: the HF processor only normalises and patchifies, so its own pixel limits (from
    whichever form of preprocessor_config.json) can never produce a grid the text did not count."""

    def __init__(self, processor, resolution: DynamicResolution):
        self.processor = processor
        self.resolution = resolution

    def __call__(self, images: list) -> dict[str, torch.Tensor]:
        from PIL import Image

        sized, expected = [], []
        for image in images:
            w, h = self.resolution.resized(image.width, image.height)
            sized.append(image if image.size == (w, h) else image.resize((w, h), Image.Resampling.BICUBIC))
            expected.append([1, h // self.resolution.patch, w // self.resolution.patch])
        out = self.processor(images=sized, do_resize=False, return_tensors="pt")
        if out["image_grid_thw"].tolist() != expected:
            raise DataError(f"the image processor made grids {out['image_grid_thw'].tolist()} where "
                            f"{expected} were counted; its patch_size/merge_size differ from the model's")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}


def native_resolution(native, vcfg, data_max_pixels: int) -> tuple[DynamicResolution, str]:
    low, high, origin = pixel_range(native)
    return DynamicResolution(vcfg.patch_size, vcfg.spatial_merge_size, low, high, data_max_pixels), origin


def build_native(settings, tokenizer, dtype: torch.dtype, data_max_pixels: int):
    """(NativeVLM, NativeImageProcessor, DynamicResolution) for model.native."""
    from transformers import AutoModelForImageTextToText

    from zerovl.models.pretrained import part_config
    from zerovl.models.weights import to_dtype

    native = settings.native
    if native.path is not None and not os.path.isdir(native.path):
        raise ConfigError(f"model.native.path {native.path} is not a directory")
    config = part_config(native, "model.native", "qwen2_vl")
    if config.model_type not in SUPPORTED:
        raise ConfigError(f"model.native: model_type '{config.model_type}' is not supported ({', '.join(SUPPORTED)})")
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in
           (("vision_start_token_id", VISION_START), ("image_token_id", IMAGE_PAD), ("vision_end_token_id", VISION_END))}
    if native.path is None:  # a random-init model takes the tokenizer's ids
        for name, token_id in ids.items():
            setattr(config, name, token_id)
    elif any(getattr(config, name) != token_id for name, token_id in ids.items()):
        raise ConfigError(f"model.native: the tokenizer's vision token ids {ids} differ from {native.path}'s config")
    if native.path is not None:
        model = AutoModelForImageTextToText.from_pretrained(native.path, dtype=dtype)
    else:
        model = to_dtype(AutoModelForImageTextToText.from_config(config, dtype=dtype), dtype)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    resolution, origin = native_resolution(native, config.vision_config, data_max_pixels)
    log.info("native image processor: %s", origin)
    processor = native_image_processor(native.path, config.vision_config, resolution)
    return NativeVLM(model, ids["image_token_id"]), processor, resolution


def native_image_processor(path: str | None, vcfg, resolution: DynamicResolution) -> NativeImageProcessor:
    """The directory's own processor (its mean/std) when it has one, else transformers' defaults; the
    limits in force are written into it, so an export's preprocessor_config.json states what training used."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    sizes = {"min_pixels": resolution.min_pixels, "max_pixels": resolution.max_pixels}
    if path is not None and os.path.isfile(os.path.join(path, "preprocessor_config.json")):
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(path, backend="pil", **sizes)
        theirs = (processor.patch_size, processor.merge_size)
        if theirs != (vcfg.patch_size, vcfg.spatial_merge_size):
            raise ConfigError(f"{path}/preprocessor_config.json: patch_size/merge_size {theirs} differ from "
                              f"config.json's vision_config ({vcfg.patch_size}, {vcfg.spatial_merge_size})")
    else:
        processor = Qwen2VLImageProcessorPil(**sizes, patch_size=vcfg.patch_size, merge_size=vcfg.spatial_merge_size,
                                             temporal_patch_size=vcfg.temporal_patch_size)
    return NativeImageProcessor(processor, resolution)
