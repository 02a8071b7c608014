"""Time and condition embeddings, and FiLM conditioning.

Time is continuous, t in [0, 1] (t = 0 data, t = 1 noise). The sinusoidal embedding scales it by 1000
so its frequencies match networks trained on discrete steps k in {0, ..., 999}.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from ._checks import check_cond, check_mask, check_time

Activation = Literal["mish", "silu"]


def make_activation(name: Activation) -> nn.Module:
    """Return a fresh activation module by name ("mish" or "silu")."""
    if name == "mish":
        return nn.Mish()
    if name == "silu":
        return nn.SiLU()
    raise ValueError(f"activation must be 'mish' or 'silu', got {name!r}")


class SinusoidalEmbedding(nn.Module):
    """Sinusoidal features of a continuous time: t [B] -> [B, dim].

    Args:
        dim: output size (even, >= 2); half sines, half cosines.
        scale: t is multiplied by this first (1000 matches discrete-step models).
        max_period: longest period, in units of scaled time.
    """

    def __init__(self, dim: int, scale: float = 1000.0, max_period: float = 10000.0) -> None:
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"dim must be even and >= 2, got {dim}")
        self.dim, self.scale, self.max_period = dim, scale, max_period

    def forward(self, t: Tensor) -> Tensor:
        """t [B] float -> [B, dim], computed in at least float32."""
        dtype = torch.promote_types(t.dtype, torch.float32)
        half = self.dim // 2
        exponent = torch.arange(half, device=t.device, dtype=dtype) / half
        freqs = torch.exp(-math.log(self.max_period) * exponent)
        args = (t.to(dtype) * self.scale)[:, None] * freqs[None, :]
        return torch.cat([args.sin(), args.cos()], dim=-1)


class TimeEmbedding(nn.Module):
    """Sinusoidal time features followed by an MLP: t [B] in [0, 1] -> [B, dim].

    Args:
        dim: embedding size (even).
        hidden_dim: MLP hidden size (default 4 * dim).
        activation: "mish" (Diffuser) or "silu" (DiT).
        scale: time scaling of the sinusoid (1000, see module docstring).
    """

    def __init__(
        self, dim: int, hidden_dim: int | None = None, activation: Activation = "mish", scale: float = 1000.0
    ) -> None:
        super().__init__()
        hidden_dim = hidden_dim or 4 * dim
        self.sinusoidal = SinusoidalEmbedding(dim, scale=scale)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden_dim), make_activation(activation), nn.Linear(hidden_dim, dim)
        )

    def forward(self, t: Tensor) -> Tensor:
        """t [B] float -> [B, dim] in the dtype of the MLP weights."""
        weight_dtype = self.mlp[0].weight.dtype
        # A float64 model gets float64 sinusoids even when t arrives as float32.
        features = self.sinusoidal(t.to(torch.promote_types(t.dtype, weight_dtype)))
        return self.mlp(features.to(weight_dtype))


class ConditionEmbedding(nn.Module):
    """Embed a condition vector, with a learned null embedding for classifier-free guidance.

    `forward(cond [B, C] | None, batch_size, cond_mask [B] bool | None) -> [B, dim]`: rows with no
    condition (cond is None, or cond_mask False) get the learned null embedding. Randomly dropping
    the condition during training is the caller's job (it builds cond_mask).

    Args:
        cond_dim: size C of the condition vector.
        dim: embedding size.
        activation: "mish" or "silu".
    """

    def __init__(self, cond_dim: int, dim: int, activation: Activation = "mish") -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(cond_dim, dim), make_activation(activation), nn.Linear(dim, dim))
        self.null = nn.Parameter(torch.randn(dim) * 0.02)

    def forward(self, cond: Tensor | None, batch_size: int, cond_mask: Tensor | None = None) -> Tensor:
        """cond [B, C] | None, cond_mask [B] bool (True = use cond) | None -> [B, dim]."""
        null = self.null.expand(batch_size, -1)
        if cond is None:
            return null
        emb = self.mlp(cond)
        if cond_mask is None:
            return emb
        return torch.where(cond_mask[:, None], emb, null.to(emb.dtype))


class FiLM(nn.Module):
    """Feature-wise linear modulation `h * (1 + scale) + shift`, scale and shift predicted from an embedding.

    `forward(h [B, C, *], emb [B, E]) -> [B, C, *]`: channels on dim 1, any trailing dims (a conv
    feature map [B, C, H] or a plain vector [B, C]).

    Args:
        emb_dim: size E of the embedding.
        channels: number C of modulated channels.
        activation: applied to the embedding before the projection.
    """

    def __init__(self, emb_dim: int, channels: int, activation: Activation = "mish") -> None:
        super().__init__()
        self.proj = nn.Sequential(make_activation(activation), nn.Linear(emb_dim, 2 * channels))

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        """h [B, C, *], emb [B, E] -> [B, C, *]."""
        scale, shift = self.proj(emb).chunk(2, dim=-1)
        shape = scale.shape + (1,) * (h.ndim - 2)
        return h * (1 + scale.view(shape)) + shift.view(shape)


def time_and_condition(time_emb: TimeEmbedding, cond_emb: ConditionEmbedding | None, cond_dim: int | None,
                       t: Tensor, cond: Tensor | None, cond_mask: Tensor | None, batch: int) -> Tensor:
    """Validate t [B], cond [B, C] | None and cond_mask [B] | None; return the time embedding plus the
    condition embedding (when the model has one), [B, E]."""
    emb = time_emb(check_time(t, batch))
    check_cond(cond, cond_dim=cond_dim, batch=batch)
    check_mask(cond_mask, shape=(batch,), name="cond_mask")
    if cond_emb is not None:
        emb = emb + cond_emb(cond, batch, cond_mask)
    return emb
