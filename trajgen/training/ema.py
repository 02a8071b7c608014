"""Exponential moving average (EMA) of model weights.

The EMA copy is what you sample from: it is a plain ``nn.Module`` (a deep copy of the trained
model) in eval mode with ``requires_grad=False``, updated in place after every optimizer step::

    ema_p <- d * ema_p + (1 - d) * p,        d = min(decay, (1 + step) / (10 + step))

where ``step`` is the 0-based index of the optimizer update just taken. The warm-up term keeps the
average from being dominated by the random initialisation early in training (d = 0.1 after the
first update). Buffers (e.g. normalisation statistics) are copied, not averaged.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay_at(step: int, decay: float, warmup: bool = True) -> float:
    """Decay used for the update after optimizer step ``step`` (0-based).

    Args:
        step: index of the optimizer update just taken (0 for the first update).
        decay: the asymptotic decay, e.g. 0.999.
        warmup: if True, use ``min(decay, (1 + step) / (10 + step))``; else ``decay``.
    """
    if not warmup:
        return decay
    return min(decay, (1.0 + step) / (10.0 + step))


class EMA:
    """Holds and updates an EMA copy of ``model``.

    Args:
        model: the module being trained (unwrapped, not DDP). It is deep-copied once here.
        decay: asymptotic decay in [0, 1).
        warmup: apply the ``(1 + step) / (10 + step)`` warm-up.

    Attributes:
        model: the EMA module, in eval mode, parameters with ``requires_grad=False``.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> float:
        """Move the EMA weights toward ``model``'s; returns the decay used.

        Args:
            model: the trained module (same architecture as the EMA copy, unwrapped).
            step: 0-based index of the optimizer update just taken.
        """
        d = ema_decay_at(step, self.decay, self.warmup)
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        pairs = [(e, p) for e, p in zip(ema_params, params) if e.is_floating_point()]
        if pairs:
            targets = [e for e, _ in pairs]
            torch._foreach_lerp_(targets, [p.to(e.dtype) for e, p in pairs], 1.0 - d)
        for e, p in zip(ema_params, params):
            if not e.is_floating_point():
                e.copy_(p)
        for eb, b in zip(self.model.buffers(), model.buffers()):
            eb.copy_(b)
        return d
