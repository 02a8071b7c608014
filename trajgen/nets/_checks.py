"""Input validation shared by the backbones: shape-only checks, so they never sync a GPU."""

from __future__ import annotations

import torch
from torch import Tensor


def check_features(x: Tensor, *, ndim: int, in_dim: int, layout: str, name: str = "x") -> None:
    """Require `x` to have `ndim` dims, a non-empty batch/horizon and `in_dim` features last."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor shaped {layout}, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have shape {layout} ({ndim} dims), got shape {tuple(x.shape)}")
    if x.shape[-1] != in_dim:
        raise ValueError(
            f"{name} has {x.shape[-1]} features in its last dim, but the model was built with in_dim={in_dim}"
        )
    if 0 in x.shape[1:-1]:
        raise ValueError(f"{name} has an empty horizon: shape {tuple(x.shape)}")


def check_time(t: Tensor | None, batch: int) -> Tensor:
    """Require `t` to be a float tensor shaped [B] (continuous time in [0, 1])."""
    if t is None:
        raise ValueError(f"t is required: pass a float tensor of times in [0, 1] shaped [B] = [{batch}]")
    if not isinstance(t, Tensor):
        raise TypeError(f"t must be a torch.Tensor shaped [B] = [{batch}], got {type(t).__name__}")
    if tuple(t.shape) != (batch,):
        raise ValueError(
            f"t must have shape [B] = [{batch}], got {tuple(t.shape)}; "
            f"expand a shared time with t.expand({batch})"
        )
    if not t.is_floating_point():
        raise ValueError(
            f"t must be a float tensor of continuous times in [0, 1], got dtype {t.dtype}; "
            "convert a discrete step k of N with t = k / N"
        )
    return t


def check_cond(cond: Tensor | None, *, cond_dim: int | None, batch: int) -> None:
    """Require `cond` to be None or [B, cond_dim], and only when the model was built with a cond_dim."""
    if cond is None:
        return
    if cond_dim is None:
        raise ValueError(
            "cond was given, but the model was built with cond_dim=None; build it with cond_dim=C"
        )
    if not isinstance(cond, Tensor) or tuple(cond.shape) != (batch, cond_dim):
        got = tuple(cond.shape) if isinstance(cond, Tensor) else type(cond).__name__
        raise ValueError(f"cond must have shape [B, C] = [{batch}, {cond_dim}], got {got}")


def check_mask(mask: Tensor | None, *, shape: tuple[int, ...], name: str) -> None:
    """Require a boolean mask of exactly `shape` (or None)."""
    if mask is None:
        return
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor shaped {list(shape)}")
    if tuple(mask.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {tuple(mask.shape)}")
