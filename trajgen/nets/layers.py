"""Transformer building blocks shared by DiT1d and CausalGPT."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Attention(nn.Module):
    """Multi-head attention over `torch.nn.functional.scaled_dot_product_attention`.

    Self-attention when `context` is None, else cross-attention from x to the context tokens.
    `forward(x [B, L, W], context [B, N, C] | None, key_mask [B, N] bool | None, causal) -> [B, L, W]`.
    `key_mask` True marks keys that may be attended to; a row whose keys are all masked attends to
    nothing and gets a zero output (instead of the NaN a fully masked softmax gives).

    Args:
        width: model width W (divisible by heads).
        heads: number of attention heads.
        context_dim: size C of the context tokens (default W, i.e. self-attention).
        dropout: attention-probability dropout, active in training mode only.
    """

    def __init__(self, width: int, heads: int, context_dim: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width={width} must be divisible by heads={heads}")
        self.heads, self.dropout = heads, dropout
        self.to_q = nn.Linear(width, width)
        self.to_kv = nn.Linear(context_dim or width, 2 * width)
        self.to_out = nn.Linear(width, width)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        key_mask: Tensor | None = None,
        causal: bool = False,
    ) -> Tensor:
        """x [B, L, W], context [B, N, C] | None, key_mask [B, N] | None -> [B, L, W]."""
        source = x if context is None else context
        q = self._split(self.to_q(x))
        k, v = (self._split(part) for part in self.to_kv(source).chunk(2, dim=-1))
        attn_mask, has_keys = _padding_mask(key_mask)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0, is_causal=causal
        )
        y = self.to_out(y.transpose(1, 2).flatten(2))
        return y if has_keys is None else y * has_keys[:, None, None].to(y.dtype)

    def _split(self, h: Tensor) -> Tensor:
        """[B, L, W] -> [B, heads, L, W / heads]."""
        return h.unflatten(-1, (self.heads, -1)).transpose(1, 2)


def _padding_mask(key_mask: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """Key mask [B, N] -> (SDPA bool mask [B, 1, 1, N], rows-with-any-key [B]), NaN-safe."""
    if key_mask is None:
        return None, None
    has_keys = key_mask.any(dim=-1)
    # Fully masked rows attend everywhere (finite result), then get zeroed by has_keys.
    safe = key_mask | ~has_keys[:, None]
    return safe[:, None, None, :], has_keys


class FeedForward(nn.Module):
    """Transformer MLP: Linear -> GELU(tanh) -> Dropout -> Linear. x [B, L, W] -> [B, L, W]."""

    def __init__(self, width: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.net = nn.Sequential(
            nn.Linear(width, hidden),
            nn.GELU(approximate="tanh"),
            nn.Dropout(dropout),
            nn.Linear(hidden, width),
        )

    def forward(self, x: Tensor) -> Tensor:
        """x [B, L, W] -> [B, L, W]."""
        return self.net(x)


def init_position_embedding(max_len: int, width: int) -> nn.Parameter:
    """A learned position table [1, max_len, width], initialised N(0, 0.02^2)."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    return nn.Parameter(torch.randn(1, max_len, width) * 0.02)
