"""Inpainting constraints for ``Sampler(..., constraint=...)``: pin known entries of x after every step."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from trajgen.diffusion.schedules import Schedule


class Inpainting:
    """``constraint(x, t) -> x``: where ``mask`` is True, overwrite x with the known value.

    ``mode="clean"`` writes ``known`` itself (Diffuser's ``apply_conditioning``, e.g. the current state at
    horizon index 0). ``mode="noised"`` writes ``alpha(t) * known + sigma(t) * noise`` (RePaint-style),
    where ``noise`` (shaped like x) is drawn once, with ``generator``, at the first call and reused at
    every step after it (``self.noise``); ``reset()`` draws a fresh one at the next call. The sampler
    applies the constraint after each step only, so also apply it to the start state yourself when that
    matters: ``x_T = inpaint(x_T, t_start)``.

    Args:
        known: floating tensor broadcastable to x [B, ...] (entries outside the mask are ignored).
        mask: bool tensor broadcastable to x; True = pinned.
        schedule: the diffusion schedule (required for ``mode="noised"``).
        mode: ``"clean"`` or ``"noised"``.
        generator: random generator for the fixed noise of ``mode="noised"``.
    """

    def __init__(self, known: Tensor, mask: Tensor, *, schedule: Schedule | None = None,
                 mode: Literal["clean", "noised"] = "clean", generator: torch.Generator | None = None) -> None:
        if not isinstance(known, Tensor) or not known.is_floating_point():
            got = known.dtype if isinstance(known, Tensor) else type(known).__name__
            raise ValueError(f"known must be a floating-point tensor broadcastable to x, got {got}")
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"mask must be a bool tensor broadcastable to x (True = pinned), got {got}")
        try:
            torch.broadcast_shapes(known.shape, mask.shape)
        except RuntimeError as err:
            raise ValueError(f"known {tuple(known.shape)} and mask {tuple(mask.shape)} are not broadcastable "
                             "to each other") from err
        if mode not in ("clean", "noised"):
            raise ValueError(f"mode={mode!r} is not one of ('clean', 'noised')")
        if mode == "noised" and not isinstance(schedule, Schedule):
            raise ValueError("mode='noised' needs schedule=<the trajgen.diffusion.Schedule used for sampling>")
        self.known, self.mask, self.schedule, self.mode, self.generator = known, mask, schedule, mode, generator
        self.noise: Tensor | None = None

    def __repr__(self) -> str:
        return (f"Inpainting(mode={self.mode!r}, known={tuple(self.known.shape)}, mask={tuple(self.mask.shape)}, "
                f"pinned={int(self.mask.sum())})")

    def reset(self) -> None:
        """Forget the fixed noise of ``mode="noised"``; the next call draws a new one."""
        self.noise = None

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        """x [B, ...] at times t [B] (or a scalar) -> x with the masked entries replaced, [B, ...]."""
        for name, value in (("known", self.known), ("mask", self.mask)):
            try:
                ok = torch.broadcast_shapes(value.shape, x.shape) == x.shape
            except RuntimeError:
                ok = False
            if not ok:
                raise ValueError(f"{name} has shape {tuple(value.shape)}, not broadcastable to x {tuple(x.shape)}")
        known = self.known.to(device=x.device, dtype=x.dtype)
        mask = self.mask.to(x.device)
        if self.mode == "noised":
            if self.noise is None or self.noise.shape != x.shape:
                self.noise = torch.randn(x.shape, generator=self.generator, dtype=x.dtype, device=x.device)
            t = torch.as_tensor(t, device=x.device)
            alpha = self.schedule.alpha(t).to(x.dtype)
            sigma = self.schedule.sigma(t).to(x.dtype)
            if alpha.ndim == 1:
                view = (-1,) + (1,) * (x.ndim - 1)
                alpha, sigma = alpha.view(view), sigma.view(view)
            known = alpha * known + sigma * self.noise.to(x)
        return torch.where(mask, known, x)


def condition_on_first_state(state: Tensor, state_dims: slice | Sequence[int], *, horizon: int, dim: int,
                             schedule: Schedule | None = None, mode: Literal["clean", "noised"] = "clean",
                             generator: torch.Generator | None = None) -> Inpainting:
    """The :class:`Inpainting` that pins ``x[:, 0, state_dims] = state`` for trajectories x [B, H, D].

    Args:
        state: the current states [B, D_s] (D_s = number of ``state_dims``).
        state_dims: which of the D features hold the state (a slice, e.g. ``slice(act_dim, None)``, or a list).
        horizon: H; dim: D (the shape of x is [B, horizon, dim]).
        schedule, mode, generator: as for :class:`Inpainting`.
    """
    if not isinstance(state, Tensor) or state.ndim != 2 or not state.is_floating_point():
        got = tuple(state.shape) if isinstance(state, Tensor) else type(state).__name__
        raise ValueError(f"state must be a floating-point tensor [B, D_s], got {got}")
    for name, value in (("horizon", horizon), ("dim", dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if isinstance(state_dims, slice) and (state_dims.step or 1) > 0:
        index: slice | list[int] = state_dims  # a slice indexes without a host-made index tensor (CUDA-graph safe)
        selected = len(range(dim)[state_dims])
    else:
        index = list(range(dim))[state_dims] if isinstance(state_dims, slice) else [int(d) for d in state_dims]
        if any(not -dim <= d < dim for d in index) or len({d % dim for d in index}) != len(index):
            raise ValueError(f"state_dims must be distinct indices in [0, {dim}), got {list(state_dims)}")
        selected = len(index)
    if selected != state.shape[1]:
        raise ValueError(f"state_dims selects {selected} features but state has D_s = {state.shape[1]}")
    known = torch.zeros(state.shape[0], horizon, dim, dtype=state.dtype, device=state.device)
    known[:, 0, index] = state
    mask = torch.zeros(1, horizon, dim, dtype=torch.bool, device=state.device)
    mask[:, 0, index] = True
    return Inpainting(known, mask, schedule=schedule, mode=mode, generator=generator)
