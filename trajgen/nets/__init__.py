"""Backbones: temporal U-Net, DiT-1d and causal GPT transformers, residual MLP.

Denoisers (TemporalUnet1d, DiT1d, ResidualMLP with `horizon`) share one call:
`net(x [B, H, D], t [B] float in [0, 1], cond [B, C] | None = None, **extras) -> [B, H, D]`.
"""

from __future__ import annotations

from torch import nn

from .dit1d import DiT1d
from .embeddings import ConditionEmbedding, FiLM, SinusoidalEmbedding, TimeEmbedding
from .gpt import CausalGPT
from .mlp import ResidualMLP
from .unet1d import TemporalUnet1d


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters in `module` (only those with requires_grad if trainable_only)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "CausalGPT",
    "ConditionEmbedding",
    "DiT1d",
    "FiLM",
    "ResidualMLP",
    "SinusoidalEmbedding",
    "TemporalUnet1d",
    "TimeEmbedding",
    "count_parameters",
]
