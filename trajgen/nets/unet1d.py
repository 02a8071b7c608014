"""Temporal U-Net over the horizon (Diffuser, Janner et al. 2022; Decision Diffuser, Ajay et al. 2023)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_features
from .embeddings import ConditionEmbedding, FiLM, TimeEmbedding, time_and_condition


class Conv1dBlock(nn.Module):
    """Conv1d -> GroupNorm -> Mish, length-preserving. x [B, C_in, H] -> [B, C_out, H]."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, groups: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
            nn.GroupNorm(groups, out_channels),
            nn.Mish(),
        )

    def forward(self, x: Tensor) -> Tensor:
        """x [B, C_in, H] -> [B, C_out, H]."""
        return self.block(x)


class ResidualTemporalBlock(nn.Module):
    """Two conv blocks with FiLM from the embedding after the first norm, plus a residual path.

    `forward(x [B, C_in, H], emb [B, E]) -> [B, C_out, H]`.
    """

    def __init__(
        self, in_channels: int, out_channels: int, emb_dim: int, kernel_size: int, groups: int
    ) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.norm = nn.GroupNorm(groups, out_channels)
        self.film = FiLM(emb_dim, out_channels)
        self.out = Conv1dBlock(out_channels, out_channels, kernel_size, groups)
        self.skip = nn.Conv1d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x [B, C_in, H], emb [B, E] -> [B, C_out, H]."""
        h = F.mish(self.film(self.norm(self.conv(x)), emb))
        return self.out(h) + self.skip(x)


class TemporalUnet1d(nn.Module):
    """1-D U-Net denoiser over a trajectory: `forward(x [B, H, D], t [B], cond [B, C] | None) -> [B, H, D]`.

    Resolution level i has `base_dim * dim_mults[i]` channels and two residual blocks; levels are
    joined by strided-conv downsampling / transposed-conv upsampling, and every level's output is
    a skip connection into the up path. Any horizon H works: x is zero-padded on the right to a
    multiple of 2 ** (len(dim_mults) - 1) and the output cropped back to H.

    Conditioning: the time embedding (sinusoid of 1000 t, then an MLP) plus, when built with
    `cond_dim`, an MLP embedding of `cond`. Rows with `cond=None` or `cond_mask` False use a
    learned null embedding (classifier-free guidance).

    Args:
        in_dim: features D per step.
        base_dim: channels of the first level.
        dim_mults: channel multiplier of each level (its length sets the number of levels).
        cond_dim: size C of the optional condition vector (None: no condition input).
        kernel_size: odd temporal kernel size.
        groups: GroupNorm groups (must divide every level's channels).
        emb_dim: size of the time(+cond) embedding (default 4 * base_dim).
    """

    def __init__(
        self,
        in_dim: int,
        base_dim: int = 32,
        dim_mults: Sequence[int] = (1, 2, 4),
        cond_dim: int | None = None,
        *,
        kernel_size: int = 5,
        groups: int = 8,
        emb_dim: int | None = None,
    ) -> None:
        super().__init__()
        channels = [base_dim * m for m in dim_mults]
        _check_unet_config(channels, kernel_size, groups)
        self.in_dim, self.cond_dim = in_dim, cond_dim
        self.multiple = 2 ** (len(channels) - 1)
        emb_dim = emb_dim or 4 * base_dim
        self.time_emb = TimeEmbedding(emb_dim)
        self.cond_emb = ConditionEmbedding(cond_dim, emb_dim) if cond_dim is not None else None

        def block(c_in: int, c_out: int) -> ResidualTemporalBlock:
            return ResidualTemporalBlock(c_in, c_out, emb_dim, kernel_size, groups)

        self.downs = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(zip([in_dim, *channels[:-1]], channels)):
            last = i == len(channels) - 1
            down = nn.Identity() if last else nn.Conv1d(c_out, c_out, 3, stride=2, padding=1)
            self.downs.append(nn.ModuleList([block(c_in, c_out), block(c_out, c_out), down]))
        self.mid = nn.ModuleList([block(channels[-1], channels[-1]), block(channels[-1], channels[-1])])
        self.ups = nn.ModuleList()
        # Up level i takes the level below (same channels as its skip) concatenated with the skip.
        for i, (c_level, c_next) in enumerate(zip(channels[::-1], [*channels[-2::-1], channels[0]])):
            last = i == len(channels) - 1
            up = nn.Identity() if last else nn.ConvTranspose1d(c_level, c_next, 4, stride=2, padding=1)
            self.ups.append(nn.ModuleList([block(2 * c_level, c_level), block(c_level, c_level), up]))
        self.final = nn.Sequential(
            Conv1dBlock(channels[0], channels[0], kernel_size, groups), nn.Conv1d(channels[0], in_dim, 1)
        )

    def forward(
        self, x: Tensor, t: Tensor, cond: Tensor | None = None, *, cond_mask: Tensor | None = None
    ) -> Tensor:
        """x [B, H, D], t [B] float in [0, 1], cond [B, C] | None, cond_mask [B] bool | None -> [B, H, D]."""
        emb = self.embed(x, t, cond, cond_mask)
        horizon = x.shape[1]
        h = _pad_right(x.transpose(1, 2), self.multiple)
        skips = []
        for block1, block2, down in self.downs:
            h = block2(block1(h, emb), emb)
            skips.append(h)
            h = down(h)
        for block in self.mid:
            h = block(h, emb)
        for block1, block2, up in self.ups:
            h = block2(block1(torch.cat([h, skips.pop()], dim=1), emb), emb)
            h = up(h)
        return self.final(h)[..., :horizon].transpose(1, 2)

    def embed(self, x: Tensor, t: Tensor, cond: Tensor | None, cond_mask: Tensor | None) -> Tensor:
        """Validate the inputs and return the time(+cond) embedding [B, E]."""
        check_features(x, ndim=3, in_dim=self.in_dim, layout="[B, H, D]")
        return time_and_condition(self.time_emb, self.cond_emb, self.cond_dim, t, cond, cond_mask, x.shape[0])


def _check_unet_config(channels: list[int], kernel_size: int, groups: int) -> None:
    """Reject configurations that would fail (or silently misbehave) later."""
    if not channels or min(channels) < 1:
        raise ValueError(f"dim_mults must be a non-empty sequence of positive ints, got channels {channels}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and positive (length-preserving), got {kernel_size}")
    bad = [c for c in channels if c % groups]
    if bad:
        raise ValueError(
            f"groups={groups} must divide every level's channels (base_dim * dim_mults), got {bad}"
        )


def _pad_right(h: Tensor, multiple: int) -> Tensor:
    """Zero-pad the last dim of h [B, C, H] up to a multiple of `multiple`."""
    extra = -h.shape[-1] % multiple
    return F.pad(h, (0, extra)) if extra else h
