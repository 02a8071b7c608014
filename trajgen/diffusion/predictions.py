"""What a denoiser predicts, and the conversions between predictions (the only place they live).

With x_t = alpha x0 + sigma eps, every prediction type is a linear function of (x0, eps):

========  =================================  ====================================
kind      definition                         basis (a, b): pred = a x0 + b eps
========  =================================  ====================================
``eps``   the noise                          (0, 1)
``x0``    the clean sample                   (1, 0)
``v``     alpha eps - sigma x0 (Salimans)    (-sigma, alpha)
``flow``  d x_t / dt = alpha' x0 + sigma' eps (alpha', sigma')
========  =================================  ====================================

so converting a prediction P = (a, b) into Q = (c, d) given x_t is again linear,
``Q = k_x x_t + k_p P`` with ``k_x = (c b - d a) / det`` and ``k_p = (d alpha - c sigma) / det``,
``det = alpha b - sigma a``. Solvers precompute (k_x, k_p) once per step.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from trajgen.diffusion.schedules import Schedule, _as_tensor

Prediction = Literal["eps", "x0", "v", "flow"]
PREDICTIONS: tuple[str, ...] = ("eps", "x0", "v", "flow")


def check_prediction(prediction: str, argument: str = "prediction") -> str:
    """Return ``prediction`` if it names a prediction type, else raise a ValueError naming ``argument``."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"{argument}={prediction!r} is not a prediction type; expected one of {PREDICTIONS}")
    return prediction


def prediction_basis(prediction: str, schedule: Schedule, t: Tensor | float) -> tuple[Tensor, Tensor]:
    """(a, b) with prediction = a x0 + b eps at time t (tensors shaped like t)."""
    check_prediction(prediction)
    t = _as_tensor(t)
    if prediction == "eps":
        return torch.zeros_like(t), torch.ones_like(t)
    if prediction == "x0":
        return torch.ones_like(t), torch.zeros_like(t)
    if prediction == "v":
        return -schedule.sigma(t), schedule.alpha(t)
    return schedule.d_alpha(t), schedule.d_sigma(t)


def conversion_coefficients(src: str, dst: str, schedule: Schedule,
                            t: Tensor | float) -> tuple[Tensor, Tensor]:
    """(k_x, k_p) such that ``dst_prediction = k_x * x_t + k_p * src_prediction`` at time t.

    Raises ValueError where the conversion is singular (e.g. eps -> x0 where alpha(t) = 0).
    """
    t = _as_tensor(t)
    a, b = prediction_basis(check_prediction(src, "src"), schedule, t)
    c, d = prediction_basis(check_prediction(dst, "dst"), schedule, t)
    if src == dst:
        return torch.zeros_like(t), torch.ones_like(t)
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    det = alpha * b - sigma * a
    if bool((det == 0).any()):
        bad = t.reshape(-1)[(det == 0).reshape(-1)][0].item()
        raise ValueError(f"cannot convert a {src!r} prediction to {dst!r} at t={bad:g} on {schedule!r}: "
                         f"x_t carries no information to separate them there (alpha={float(alpha.reshape(-1)[0]):g}, "
                         f"sigma={float(sigma.reshape(-1)[0]):g}); start/end sampling away from that time or "
                         f"use a solver that works in the {src!r} parameterisation")
    return (c * b - d * a) / det, (d * alpha - c * sigma) / det


def convert(output: Tensor, x_t: Tensor, t: Tensor, schedule: Schedule, src: str, dst: str) -> Tensor:
    """Convert a model output of kind ``src`` into kind ``dst``.

    Args:
        output: the model's prediction, [B, ...].
        x_t: the noisy input, [B, ...].
        t: times, [B] (or a scalar tensor).
    Returns:
        The ``dst`` prediction, [B, ...], in output's dtype.
    """
    k_x, k_p = conversion_coefficients(src, dst, schedule, _as_tensor(t).to(torch.float64))
    if k_x.ndim == 1:
        view = (-1,) + (1,) * (x_t.ndim - 1)
        k_x, k_p = k_x.view(view), k_p.view(view)
    k_x, k_p = k_x.to(device=x_t.device, dtype=x_t.dtype), k_p.to(device=x_t.device, dtype=x_t.dtype)
    return k_x * x_t + k_p * output


def target(prediction: str, schedule: Schedule, t: Tensor, x0: Tensor, eps: Tensor) -> Tensor:
    """The regression target of kind ``prediction`` for x_t = alpha(t) x0 + sigma(t) eps.

    x0, eps: [B, ...]; t: [B]. Returns [B, ...].
    """
    a, b = prediction_basis(prediction, schedule, t.to(torch.float64))
    view = (-1,) + (1,) * (x0.ndim - 1)
    a, b = a.view(view).to(x0), b.view(view).to(x0)
    return a * x0 + b * eps
