"""Connectors map vision features (N, T_v, D_v) to LLM embeddings (N, T, D_llm).

Each one fixes ``tokens_per_image`` — how many image tokens the text must reserve per image.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class LinearConnector(nn.Module):
    """One projection per patch (MiniGPT-4 / LLaVA-1.0)."""

    def __init__(self, vision_dim: int, llm_dim: int, vision_tokens: int):
        super().__init__()
        self.proj = nn.Linear(vision_dim, llm_dim)
        self.tokens_per_image = vision_tokens

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

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features)


class QFormerConnector(nn.Module):
    """BLIP-2: learned query tokens cross-attend to the image through a Q-Former, then a linear
    projection into the LLM. Always ``num_query_tokens`` tokens per image, whatever the resolution."""

    def __init__(self, vision_dim: int, llm_dim: int, num_query_tokens: int, qformer: dict[str, Any]):
        super().__init__()
        from transformers import Blip2QFormerConfig, Blip2QFormerModel

        cfg = Blip2QFormerConfig(**{"encoder_hidden_size": vision_dim, **qformer})
        self.qformer = Blip2QFormerModel(cfg)
        self.query_tokens = nn.Parameter(torch.zeros(1, num_query_tokens, cfg.hidden_size))
        nn.init.trunc_normal_(self.query_tokens, std=cfg.initializer_range)
        self.proj = nn.Linear(cfg.hidden_size, llm_dim)
        self.tokens_per_image = num_query_tokens

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        queries = self.query_tokens.expand(features.shape[0], -1, -1)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=features).last_hidden_state
        return self.proj(out)


def build_connector(settings, vision_dim: int, llm_dim: int, vision_tokens: int) -> nn.Module:
    if settings.type == "linear":
        return LinearConnector(vision_dim, llm_dim, vision_tokens)
    if settings.type == "mlp":
        return MLPConnector(vision_dim, llm_dim, vision_tokens, settings.mlp_depth)
    return QFormerConnector(vision_dim, llm_dim, settings.num_query_tokens, settings.qformer)
