"""Connectors map vision features (N, T_v, D_v) to LLM embeddings (N, T, D_llm).

Each one fixes ``tokens_per_image`` — how many image tokens the text must reserve per image — and is
``project(before_projection(features))``: the split the frozen-feature cache stores at when only the
final projection trains (MiniGPT4Qwen).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from zerovl.errors import ConfigError


class LinearConnector(nn.Module):
    """One projection per patch (MiniGPT-4 / LLaVA-1.0)."""

    def __init__(self, vision_dim: int, llm_dim: int, vision_tokens: int):
        super().__init__()
        self.proj = nn.Linear(vision_dim, llm_dim)
        self.tokens_per_image = vision_tokens

    def before_projection(self, features: torch.Tensor) -> torch.Tensor:
        return features

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features)


class MLPConnector(nn.Module):
    """LLaVA-1.5's ``mlp2x_gelu``: Linear, then (GELU, Linear) x (depth - 1)."""

    def __init__(self, vision_dim: int, llm_dim: int, vision_tokens: int, depth: int = 2):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(vision_dim, llm_dim)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(llm_dim, llm_dim)]
        self.mlp = nn.Sequential(*layers)
        self.tokens_per_image = vision_tokens

    def before_projection(self, features: torch.Tensor) -> torch.Tensor:
        for layer in self.mlp[:-1]:
            features = layer(features)
        return features

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.mlp[-1](hidden)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features)


class QFormerConnector(nn.Module):
    """BLIP-2: learned query tokens cross-attend to the image through a Q-Former, then a linear
    projection into the LLM. Always ``num_query_tokens`` tokens per image, whatever the resolution."""

    def __init__(self, vision_dim: int, llm_dim: int, num_query_tokens: int, qformer: dict[str, Any],
                 path: str | None = None):
        super().__init__()
        from transformers import Blip2QFormerConfig, Blip2QFormerModel

        if path is not None:  # BLIP-2's own Q-Former configuration and query count
            from transformers import Blip2Config

            try:
                blip2 = Blip2Config.from_pretrained(path)
            except OSError as e:
                raise ConfigError(f"model.connector.path: cannot read a BLIP-2 config.json in {path} ({e})") from None
            cfg, num_query_tokens = blip2.qformer_config, blip2.num_query_tokens
            if cfg.encoder_hidden_size != vision_dim:
                raise ConfigError(f"model.connector.path {path}: its Q-Former expects {cfg.encoder_hidden_size}-d "
                                  f"vision features but the vision tower gives {vision_dim}-d")
        else:
            cfg = Blip2QFormerConfig(**{"encoder_hidden_size": vision_dim, **qformer})
        self.qformer = Blip2QFormerModel(cfg)
        self.query_tokens = nn.Parameter(torch.zeros(1, num_query_tokens, cfg.hidden_size))
        nn.init.trunc_normal_(self.query_tokens, std=cfg.initializer_range)
        self.proj = nn.Linear(cfg.hidden_size, llm_dim)
        self.tokens_per_image = num_query_tokens
        if path is not None:
            self._load_blip2(path)

    def _load_blip2(self, path: str) -> None:
        """Q-Former and query tokens from a Blip2ForConditionalGeneration directory; its language model and
        language_projection (sized for OPT/T5) are not read — ``proj`` maps into *this* LLM."""
        from zerovl.models.weights import load_into, load_prefixed_state_dict

        load_into(self.qformer, load_prefixed_state_dict(path, "qformer."), f"{path} (qformer.*)")
        queries = load_prefixed_state_dict(path, "query_tokens")[""]
        load_into(self, {"query_tokens": queries}, f"{path} (query_tokens)", partial=True)

    def before_projection(self, features: torch.Tensor) -> torch.Tensor:
        queries = self.query_tokens.expand(features.shape[0], -1, -1)
        return self.qformer(query_embeds=queries, encoder_hidden_states=features).last_hidden_state

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(self.before_projection(features))


def build_connector(settings, vision_dim: int, llm_dim: int, vision_tokens: int) -> nn.Module:
    if settings.type == "linear":
        return LinearConnector(vision_dim, llm_dim, vision_tokens)
    if settings.type == "mlp":
        return MLPConnector(vision_dim, llm_dim, vision_tokens, settings.mlp_depth)
    return QFormerConnector(vision_dim, llm_dim, settings.num_query_tokens, settings.qformer, settings.path)


def projection(connector: nn.Module) -> nn.Module:
    """The final layer into the LLM — what MiniGPT4Qwen trains while everything else stays frozen."""
    if isinstance(connector, MLPConnector):
        return connector.mlp[-1]
    return connector.proj
