"""Gradient (value / classifier) guidance: shift the noise prediction along grad of a value of x0_hat."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from trajgen.diffusion.predictions import check_prediction, convert
from trajgen.diffusion.schedules import Schedule

Model = Callable[..., Tensor]


class GradientGuidance:
    """Diffuser-style value guidance as a model wrapper: ``guided(x_t, t, **cond)`` -> the model's prediction.

    At each call: x0_hat = convert(model(x_t, t), -> x0); g = d value_fn(x0_hat).sum() / d x_t (autograd
    through the network); then in eps space (classifier guidance, Dhariwal & Nichol 2021)
    ``eps_guided = eps - scale * sigma(t) * g``, i.e. the score gains ``scale * g``; the result is converted
    back to the model's own prediction type. Each call runs the network forward and backward once.

    Autograd is switched on inside the call, so sampling may run under ``torch.no_grad()``, but NOT under
    ``torch.inference_mode()`` (it blocks autograd; calls there raise RuntimeError).

    Args:
        model: ``model(x_t [B, ...], t [B], **cond) -> [B, ...]`` predicting ``prediction``.
        value_fn: ``value_fn(x0_hat [B, ...]) -> [B]`` (or a scalar), differentiable; larger = better
            (e.g. a log-likelihood or a return estimate).
        scale: guidance strength (0 = unguided).
        schedule: the model's schedule (gives sigma(t) and the conversions).
        prediction: what the model outputs: 'eps', 'x0', 'v' or 'flow'.
    """

    def __init__(self, model: Model, value_fn: Callable[[Tensor], Tensor], scale: float, schedule: Schedule,
                 prediction: str) -> None:
        if not callable(model):
            raise TypeError(f"model must be callable as model(x_t, t, **cond), got {type(model).__name__}")
        if not callable(value_fn):
            raise TypeError(f"value_fn must be callable as value_fn(x0_hat) -> [B], got {type(value_fn).__name__}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a float, got {scale!r}")
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a trajgen.diffusion.Schedule, got {type(schedule).__name__}")
        self.model, self.value_fn, self.scale = model, value_fn, float(scale)
        self.schedule, self.prediction = schedule, check_prediction(prediction)

    def __repr__(self) -> str:
        return f"GradientGuidance(scale={self.scale:g}, prediction={self.prediction!r}, schedule={self.schedule!r})"

    def __call__(self, x_t: Tensor, t: Tensor, **cond: Any) -> Tensor:
        """x_t [B, ...], t [B] -> guided prediction [B, ...] of kind ``prediction`` (detached)."""
        if torch.is_inference_mode_enabled():
            raise RuntimeError("GradientGuidance needs autograd, which torch.inference_mode() disables: sample "
                               "under torch.no_grad() (or with grad enabled) instead of torch.inference_mode()")
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            out = self.model(x, t, **cond)
            x0_hat = convert(out, x, t, self.schedule, self.prediction, "x0")
            value = self.value_fn(x0_hat)
            if not isinstance(value, Tensor) or value.ndim > 1:
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"value_fn must return a tensor [B] or a scalar, got {got}")
            (grad,) = torch.autograd.grad(value.sum(), x)
        out = out.detach()
        if self.scale == 0.0:
            return out
        eps = convert(out, x_t, t, self.schedule, self.prediction, "eps")
        sigma = self.schedule.sigma(t.to(torch.float64)).to(dtype=x_t.dtype, device=x_t.device)
        sigma = sigma.view((-1,) + (1,) * (x_t.ndim - 1)) if sigma.ndim == 1 else sigma
        eps_guided = eps - self.scale * sigma * grad
        return convert(eps_guided, x_t, t, self.schedule, "eps", self.prediction)
