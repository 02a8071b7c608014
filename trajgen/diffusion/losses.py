"""Training losses: draw t, noise x0 to x_t, regress the network's prediction (EDM ``training/loss.py`` style).

``DiffusionLoss(...)(net, x0, **cond)`` returns the unreduced per-sample loss [B]; the trainer averages.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from trajgen.diffusion.predictions import check_prediction, convert, target
from trajgen.diffusion.schedules import Schedule, VPDiscrete

TimeDistribution = Literal["uniform", "logit-normal", "edm-lognormal"]
Weighting = Literal["none", "min-snr", "edm"]


def sample_times(schedule: Schedule, batch: int, *, t_max: float = 1.0, t_min: float | None = None,
                 distribution: TimeDistribution = "uniform", generator: torch.Generator | None = None,
                 device: torch.device | str | None = None, logit_mean: float = 0.0, logit_std: float = 1.0,
                 p_mean: float = -1.2, p_std: float = 1.2) -> Tensor:
    """Training times t [batch] (float32) in [t_min, t_max].

    On a :class:`VPDiscrete` schedule the times are its training steps, t = (n + 1) / N with n uniform in
    [0, round(t_max N)) — so ``t_max=50/1000`` trains only on the first 50 of 1000 steps (DiffusionDrive).
    Continuous schedules draw t uniformly, from a logit-normal (SD3 / flow matching), or from EDM's
    log-normal over sigma (P_mean, P_std), truncated to [t_min, t_max].
    """
    t_min = schedule.t_end_default if t_min is None else t_min
    if not 0.0 <= t_min < t_max <= 1.0:
        raise ValueError(f"sample_times needs 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
    if isinstance(schedule, VPDiscrete) and distribution == "uniform":
        n_lo = max(0, math.ceil(t_min * schedule.num_steps - 1 - 1e-9))
        n_hi = max(n_lo + 1, round(t_max * schedule.num_steps))
        n = torch.randint(n_lo, n_hi, (batch,), generator=generator, device=device)
        return schedule.time_of_step(n).float()
    if distribution == "uniform":
        u = torch.rand(batch, generator=generator, device=device, dtype=torch.float64)
        return (t_min + (t_max - t_min) * u).float()
    z = torch.randn(batch, generator=generator, device=device, dtype=torch.float64)
    if distribution == "logit-normal":
        t = torch.sigmoid(logit_mean + logit_std * z)
        return (t_min + (t_max - t_min) * t).float()
    if distribution == "edm-lognormal":
        log_sigma = p_mean + p_std * z  # sigma here is sigma / alpha, EDM's noise level
        t = schedule.t_of_logsnr(-2.0 * log_sigma)
        return t.clamp(t_min, t_max).float()
    raise ValueError(f"distribution={distribution!r}; expected 'uniform', 'logit-normal' or 'edm-lognormal'")


class DiffusionLoss:
    """Denoising regression loss for a network predicting ``prediction``.

    loss_i = w(t_i) * mean || S(net(x_t, t)) - S_target ||^2 over the non-batch dims, where S is
    ``loss_space`` (the network's own prediction type unless a weighting fixes it):

    - ``weighting='none'``: plain MSE in ``loss_space`` (eps MSE, x0 MSE, v MSE, flow matching).
    - ``'min-snr'``: Min-SNR-gamma (Hang et al. 2023), x0 space, w = min(SNR, gamma).
    - ``'edm'``: EDM (Karras et al. 2022), x0 space, w = (s^2 + sd^2) / (s sd)^2, s = sigma / alpha.

    Args:
        schedule: the noise schedule.
        prediction: what the network outputs ('eps', 'x0', 'v', 'flow').
        t_max, t_min, time_distribution: passed to :func:`sample_times` (truncated training: t_max < 1).
        noise_fn: draws eps like x0 (default ``torch.randn_like``; GeoTDM passes zero-centre-of-mass noise).
    """

    def __init__(self, schedule: Schedule, prediction: str = "eps", *, loss_space: str | None = None,
                 weighting: Weighting = "none", t_max: float = 1.0, t_min: float | None = None,
                 time_distribution: TimeDistribution = "uniform", min_snr_gamma: float = 5.0,
                 sigma_data: float = 0.5, noise_fn: Callable[[Tensor], Tensor] | None = None) -> None:
        self.schedule = schedule
        self.prediction = check_prediction(prediction)
        if weighting not in ("none", "min-snr", "edm"):
            raise ValueError(f"weighting={weighting!r}; expected 'none', 'min-snr' or 'edm'")
        if weighting != "none" and loss_space not in (None, "x0"):
            raise ValueError(f"weighting={weighting!r} is defined in x0 space; got loss_space={loss_space!r}")
        default_space = "x0" if weighting != "none" else self.prediction
        self.loss_space = check_prediction(loss_space or default_space, "loss_space")
        self.weighting = weighting
        self.t_max, self.t_min, self.time_distribution = t_max, t_min, time_distribution
        self.min_snr_gamma, self.sigma_data = min_snr_gamma, sigma_data
        self.noise_fn = noise_fn or torch.randn_like

    def weight(self, t: Tensor) -> Tensor:
        """Per-sample weight w(t) [B] (float64)."""
        t = t.to(torch.float64)
        if self.weighting == "none":
            return torch.ones_like(t)
        snr = torch.exp(self.schedule.logsnr(t))
        if self.weighting == "min-snr":
            return torch.clamp(snr, max=self.min_snr_gamma)
        s2, sd2 = 1.0 / snr, self.sigma_data**2
        return (s2 + sd2) / (s2 * sd2)

    def __call__(self, net: Callable[..., Tensor], x0: Tensor, *, mask: Tensor | None = None,
                 generator: torch.Generator | None = None, **cond) -> Tensor:
        """Per-sample loss [B] for clean samples x0 [B, ...]; ``mask`` (broadcastable to x0) selects the
        entries that count; ``cond`` is passed to ``net(x_t, t, **cond)``."""
        if not torch.isfinite(x0).all():
            raise ValueError("x0 contains NaN or inf")
        t = sample_times(self.schedule, x0.shape[0], t_max=self.t_max, t_min=self.t_min,
                         distribution=self.time_distribution, generator=generator, device=x0.device)
        eps = self.noise_fn(x0)
        x_t = self.schedule.add_noise(x0, t, eps)
        output = net(x_t, t.to(x0.dtype), **cond)
        if output.shape != x0.shape:
            raise ValueError(f"net output has shape {tuple(output.shape)}, expected {tuple(x0.shape)} (like x0)")
        prediction = output if self.loss_space == self.prediction else convert(
            output, x_t, t, self.schedule, self.prediction, self.loss_space)
        error = (prediction - target(self.loss_space, self.schedule, t, x0, eps)) ** 2
        if mask is not None:
            mask = mask.to(error.dtype).expand_as(error)
            per_sample = (error * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1.0)
        else:
            per_sample = error.flatten(1).mean(1)
        return self.weight(t).to(per_sample.dtype) * per_sample
