"""The composed vision-language model: vision tower -> connector -> causal LM.

Image features replace the image-token rows of the LLM's input embeddings; the LLM does the rest.
The vision path runs on *every* forward — on a zero dummy image, weighted by 0, when a batch has no
images — so all ranks call the same modules in the same order and ZeRO-3 never hangs on mixed
text-only / image batches.
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
                 connector_trainable: bool = True, loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
        super().__init__()
        self.vision = vision
        self.connector = connector
        self.llm = llm
        self.image_token_id = image_token_id
        self.vision_trainable = vision_trainable
        self.connector_trainable = connector_trainable
        self.loss_chunk_tokens = loss_chunk_tokens  # rows per chunk of the LM loss (models/loss.py); 0 = plain

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

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        embeds = self.llm.get_input_embeddings()(input_ids)
        if self.vision is None:
            return embeds
        image_mask = input_ids == self.image_token_id
        if pixel_values is None or pixel_values.shape[0] == 0:
            if image_mask.any():
                raise DataError("batch has image tokens but no pixel_values")
            size = self.vision.image_size
            dummy = torch.zeros(1, 3, size, size, device=embeds.device)
            return embeds + 0.0 * self.encode_images(dummy).sum().to(embeds.dtype)
        features = self.encode_images(pixel_values)
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
                position_ids: torch.Tensor | None = None, loss_reduction: str = "mean"):
        """With labels: the LM loss over supervised tokens as a 0-dim fp32 tensor — their ``mean``, or
        their ``sum`` for a caller that divides by a global token count — computed in chunks through
        the output projection (models/loss.py). Without labels: the logits."""
        embeds = self.embed(input_ids, pixel_values)
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
