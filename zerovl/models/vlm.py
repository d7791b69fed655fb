"""The composed vision-language model: vision tower -> connector -> causal LM.

Image features replace the image-token rows of the LLM's input embeddings; the LLM does the rest.
The vision path runs on *every* forward — on a zero dummy image, weighted by 0, when a batch has no
images — so all ranks call the same modules in the same order and ZeRO-3 never hangs on mixed
text-only / image batches.

With the frozen-feature cache (``data.feature_cache``) a batch carries ``image_features`` — the output
of the frozen prefix, read from disk — instead of pixels, and only the trainable rest of the connector
runs (on a zero dummy feature, weighted by 0, for a batch without images), so the frozen modules are
never called in training on any rank. Frozen parts always run in eval mode (no dropout, as LAVIS and
MiniGPT4Qwen keep their frozen ViT and Q-Former), which is what makes their output cacheable.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from zerovl.errors import DataError
from zerovl.models.loss import DEFAULT_CHUNK_TOKENS, language_model_loss


class ComposedVLM(nn.Module):
    def __init__(self, llm: nn.Module, image_token_id: int, vision: nn.Module | None = None,
                 connector: nn.Module | None = None, vision_trainable: bool = False,
                 connector_trainable: bool = True, loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                 connector_projection_only: bool = False):
        super().__init__()
        self.vision = vision
        self.connector = connector
        self.llm = llm
        self.image_token_id = image_token_id
        self.vision_trainable = vision_trainable
        self.connector_trainable = connector_trainable
        self.loss_chunk_tokens = loss_chunk_tokens  # rows per chunk of the LM loss (models/loss.py); 0 = plain
        self.connector_projection_only = connector_projection_only  # connector mode projection: the rest frozen
        self.reads_features = False  # set when training reads image_features from the frozen-feature cache

    def train(self, mode: bool = True) -> ComposedVLM:
        """Frozen parts stay in eval mode: their output is a pure function of the image."""
        super().train(mode)
        if self.vision is not None and not self.vision_trainable:
            self.vision.eval()
            if not self.connector_trainable or self.connector_projection_only:
                self.connector.eval()
        return self

    @property
    def feature_stage(self) -> str:
        """Where the frozen prefix ends: after the ``vision`` tower (the connector trains), ``projection``
        (everything but the connector's final projection is frozen) or the whole ``connector`` (frozen)."""
        if not self.connector_trainable:
            return "connector"
        return "projection" if self.connector_projection_only else "vision"

    def feature_shape(self) -> tuple[int, int]:
        """(tokens, width) of one image's frozen-prefix output."""
        from zerovl.models.connectors import projection

        if self.feature_stage == "vision":
            return self.vision.num_tokens, self.vision.hidden_size
        proj = projection(self.connector)
        width = proj.in_features if self.feature_stage == "projection" else proj.out_features
        return self.connector.tokens_per_image, width

    @torch.no_grad()
    def frozen_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """What the frozen-feature cache stores per image: the frozen prefix's output."""
        features = self.vision(pixel_values)
        if self.feature_stage == "vision":
            return features
        if self.feature_stage == "projection":
            return self.connector.before_projection(features)
        return self.connector(features)

    def encode_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """The trainable rest after the frozen prefix: cached features -> LLM embeddings."""
        if self.feature_stage == "vision":
            return self.connector(image_features)
        if self.feature_stage == "projection":
            return self.connector.project(image_features)
        return image_features

    @property
    def tokens_per_image(self) -> int:
        return self.connector.tokens_per_image if self.connector is not None else 0

    def vision_token_count(self, batch: dict[str, torch.Tensor]) -> int:
        """Tokens the vision tower processes in a batch (for FLOP counting)."""
        pixels = batch.get("pixel_values")
        return int(pixels.shape[0]) * self.vision.num_tokens if pixels is not None and self.vision is not None else 0

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, tokens_per_image, llm_hidden). A frozen tower keeps no activations."""
        with contextlib.nullcontext() if self.vision_trainable else torch.no_grad():
            features = self.vision(pixel_values)
        with contextlib.nullcontext() if self.vision_trainable or self.connector_trainable else torch.no_grad():
            return self.connector(features)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_features: torch.Tensor | None = None) -> torch.Tensor:
        embeds = self.llm.get_input_embeddings()(input_ids)
        if self.vision is None:
            return embeds
        image_mask = input_ids == self.image_token_id
        cached = image_features is not None or (self.reads_features and self.training)
        images = image_features if cached else pixel_values
        if images is None or images.shape[0] == 0:
            if image_mask.any():
                raise DataError("batch has image tokens but no pixel_values")
            if cached:  # every rank in training reads features: the same trainable modules run
                dummy = torch.zeros(1, *self.feature_shape(), device=embeds.device, dtype=embeds.dtype)
                return embeds + 0.0 * self.encode_features(dummy).sum().to(embeds.dtype)
            size = self.vision.image_size
            dummy = torch.zeros(1, 3, size, size, device=embeds.device)
            return embeds + 0.0 * self.encode_images(dummy).sum().to(embeds.dtype)
        features = self.encode_features(images) if cached else self.encode_images(pixel_values)
        expected = int(image_mask.sum())
        if features.shape[0] * features.shape[1] != expected:
            raise DataError(
                f"{features.shape[0]} image(s) x {features.shape[1]} tokens do not match the "
                f"{expected} image tokens in the text"
            )
        features = features.reshape(-1, features.shape[-1]).to(embeds.dtype)
        return embeds.masked_scatter(image_mask.unsqueeze(-1), features)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, loss_reduction: str = "mean",
                image_features: torch.Tensor | None = None):
        """With labels: the LM loss over supervised tokens as a 0-dim fp32 tensor — their ``mean``, or
        their ``sum`` for a caller that divides by a global token count — computed in chunks through
        the output projection (models/loss.py). Without labels: the logits."""
        embeds = self.embed(input_ids, pixel_values, image_features)
        if position_ids is not None:
            # packed rows (data.packing): transformers builds block-diagonal causal attention from position
            # ids that restart at 0 per sample, but only without a 2D mask; row-end padding is one more
            # block with no labels, so it changes nothing
            attention_mask = None
        inputs = {"inputs_embeds": embeds, "attention_mask": attention_mask, "position_ids": position_ids,
                  "use_cache": False}
        if labels is None:
            return self.llm(**inputs).logits
        return language_model_loss(self.llm, labels, loss_reduction, self.loss_chunk_tokens, **inputs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 pixel_values: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Greedy/sampled continuation of left-padded prompts; returns only the new token ids."""
        embeds = self.embed(input_ids, pixel_values)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
