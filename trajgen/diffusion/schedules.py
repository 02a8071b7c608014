"""Noise schedules on continuous time t in [0, 1]: x_t = alpha(t) x0 + sigma(t) eps.

t = 0 is data, t = 1 is noise. Every schedule exposes ``alpha``, ``sigma``, ``logsnr`` (log(alpha^2 /
sigma^2)), its inverse ``t_of_logsnr`` and the time derivatives ``d_alpha`` / ``d_sigma`` (needed by the
flow-velocity prediction). Methods take and return tensors of any shape; solvers call them in float64.

Families (DPM-Solver's ``NoiseScheduleVP`` and EDM's sigma parameterisation, written against one API):

- :class:`VPLinear`   continuous VP with beta(t) linear from 0.1 to 20 (Song et al. 2021).
- :class:`VPCosine`   alpha = cos(u), sigma = sin(u), u linear in t (Nichol & Dhariwal 2021), log-SNR clipped
  at ``logsnr_min`` so t = 1 stays finite.
- :class:`VPDiscrete` a DDPM betas table; log(alpha) interpolated piecewise-linearly in t so that the model
  trained on step n is evaluated at t = (n + 1) / N with exactly its own alpha_bar (as DPM-Solver does).
- :class:`EDM`        alpha = 1, sigma(t) = (s_min^(1/rho) + t (s_max^(1/rho) - s_min^(1/rho)))^rho, so a
  time-uniform grid is the Karras et al. (2022) rho-grid.
- :class:`VE`         alpha = 1, sigma geometric from sigma_min to sigma_max (Song et al. 2021).
- :class:`Flow`       rectified flow / flow matching: alpha = 1 - t, sigma = t.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor


def _as_tensor(t: Tensor | float) -> Tensor:
    if isinstance(t, Tensor):
        return t if t.is_floating_point() else t.double()
    return torch.as_tensor(t, dtype=torch.float64)


class Schedule(ABC):
    """A diffusion path x_t = alpha(t) x0 + sigma(t) eps on t in [0, 1].

    Attributes:
        t_end_default: where sampling ends by default (the smallest t the schedule is meant to be
            sampled at; e.g. 1/N for a discrete schedule, 1e-3 for continuous VP).
        default_grid: the timestep grid solvers use unless told otherwise.
    """

    t_end_default: float = 0.0
    default_grid: str = "time"

    @abstractmethod
    def alpha(self, t: Tensor | float) -> Tensor:
        """Signal coefficient alpha(t), same shape as t."""

    @abstractmethod
    def sigma(self, t: Tensor | float) -> Tensor:
        """Noise coefficient sigma(t), same shape as t."""

    def logsnr(self, t: Tensor | float) -> Tensor:
        """log(alpha(t)^2 / sigma(t)^2); +inf where sigma = 0, -inf where alpha = 0."""
        t = _as_tensor(t)
        return 2.0 * (torch.log(self.alpha(t)) - torch.log(self.sigma(t)))

    @abstractmethod
    def t_of_logsnr(self, logsnr: Tensor | float) -> Tensor:
        """Inverse of :meth:`logsnr`: the time at which the log-SNR equals ``logsnr``."""

    def d_alpha(self, t: Tensor | float) -> Tensor:
        """d alpha / dt (autograd on float64 unless a subclass has the closed form)."""
        return self._derivative(self.alpha, t)

    def d_sigma(self, t: Tensor | float) -> Tensor:
        """d sigma / dt (autograd on float64 unless a subclass has the closed form)."""
        return self._derivative(self.sigma, t)

    @staticmethod
    def _derivative(fn, t: Tensor | float) -> Tensor:
        t = _as_tensor(t)
        with torch.enable_grad():
            tt = t.detach().double().requires_grad_(True)
            (grad,) = torch.autograd.grad(fn(tt).sum(), tt)
        return grad.to(t.dtype)

    @property
    def is_variance_exploding(self) -> bool:
        """True when alpha = 1 everywhere (EDM, VE): the prior is N(0, sigma(1)^2)."""
        return False

    def prior_noise(self, shape: tuple[int, ...] | torch.Size, *, generator: torch.Generator | None = None,
                    dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
        """A draw of x_1 ~ N(0, sigma(1)^2 I) (the alpha(1) x0 part is dropped), shape ``shape``."""
        scale = float(self.sigma(1.0))
        return scale * torch.randn(tuple(shape), generator=generator, dtype=dtype, device=device)

    def coefficients(self, t: float, dtype: torch.dtype = torch.float32) -> tuple[float, float]:
        """(alpha(t), sigma(t)) at one fixed time as Python floats, rounded as :meth:`add_noise` rounds them for
        ``dtype`` data at a ``dtype`` time: ``alpha * x0 + sigma * noise`` then equals ``add_noise`` exactly and
        reads no schedule table on the device (CUDA-graph safe)."""
        time = torch.tensor(float(t), dtype=dtype)
        return float(self.alpha(time).to(dtype)), float(self.sigma(time).to(dtype))

    def add_noise(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = alpha(t) x0 + sigma(t) noise.  x0, noise: [B, ...]; t: [B] (or scalar)."""
        t = _as_tensor(t).to(x0.device)
        alpha = self.alpha(t).to(x0.dtype)
        sigma = self.sigma(t).to(x0.dtype)
        if alpha.ndim == 1:
            view = (-1,) + (1,) * (x0.ndim - 1)
            alpha, sigma = alpha.view(view), sigma.view(view)
        return alpha * x0 + sigma * noise

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"{type(self).__name__}({fields})"

    def _config(self) -> dict:
        return {}


class VPFromLogAlpha(Schedule):
    """A variance-preserving schedule given by log alpha(t): sigma = sqrt(1 - alpha^2)."""

    @abstractmethod
    def log_alpha(self, t: Tensor | float) -> Tensor:
        """log alpha(t), same shape as t."""

    def alpha(self, t: Tensor | float) -> Tensor:
        return torch.exp(self.log_alpha(t))

    def sigma(self, t: Tensor | float) -> Tensor:
        return torch.sqrt(-torch.expm1(2.0 * self.log_alpha(t)))

    def logsnr(self, t: Tensor | float) -> Tensor:
        log_alpha = self.log_alpha(t)
        return 2.0 * log_alpha - torch.log(-torch.expm1(2.0 * log_alpha))


class VPLinear(VPFromLogAlpha):
    """Continuous VP-SDE with linear beta(t) = beta_min + t (beta_max - beta_min).

    log alpha(t) = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2, sigma = sqrt(1 - alpha^2).
    """

    t_end_default = 1e-3
    default_grid = "logsnr"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0) -> None:
        if not 0 < beta_min < beta_max:
            raise ValueError(f"VPLinear needs 0 < beta_min < beta_max, got beta_min={beta_min}, "
                             f"beta_max={beta_max}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def _config(self) -> dict:
        return {"beta_min": self.beta_min, "beta_max": self.beta_max}

    def log_alpha(self, t: Tensor | float) -> Tensor:
        t = _as_tensor(t)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def t_of_logsnr(self, logsnr: Tensor | float) -> Tensor:
        logsnr = _as_tensor(logsnr)
        b0, db = self.beta_min, self.beta_max - self.beta_min
        softplus = torch.logaddexp(torch.zeros_like(logsnr), -logsnr)  # = -2 log alpha
        return (torch.sqrt(b0**2 + 2.0 * db * softplus) - b0) / db

    def d_alpha(self, t: Tensor | float) -> Tensor:
        t = _as_tensor(t)
        d_log_alpha = -0.5 * t * (self.beta_max - self.beta_min) - 0.5 * self.beta_min
        return self.alpha(t) * d_log_alpha

    def d_sigma(self, t: Tensor | float) -> Tensor:
        t = _as_tensor(t)
        return -self.alpha(t) * self.d_alpha(t) / self.sigma(t)


class VPCosine(Schedule):
    """Cosine VP schedule: alpha = cos(u), sigma = sin(u), u = t * u_max.

    u_max = atan(exp(-logsnr_min / 2)) keeps alpha(1) > 0 (log-SNR(1) = logsnr_min) so every solver
    can start at t = 1; the default -15 gives alpha(1) = 5.5e-4 (DPM-Solver clips at t = 0.9946 instead).
    """

    t_end_default = 1e-3
    default_grid = "logsnr"

    def __init__(self, logsnr_min: float = -15.0) -> None:
        self.logsnr_min = float(logsnr_min)
        self.u_max = math.atan(math.exp(-0.5 * self.logsnr_min))

    def _config(self) -> dict:
        return {"logsnr_min": self.logsnr_min}

    def alpha(self, t: Tensor | float) -> Tensor:
        return torch.cos(_as_tensor(t) * self.u_max)

    def sigma(self, t: Tensor | float) -> Tensor:
        return torch.sin(_as_tensor(t) * self.u_max)

    def logsnr(self, t: Tensor | float) -> Tensor:
        return -2.0 * torch.log(torch.tan(_as_tensor(t) * self.u_max))

    def t_of_logsnr(self, logsnr: Tensor | float) -> Tensor:
        return torch.atan(torch.exp(-0.5 * _as_tensor(logsnr))) / self.u_max

    def d_alpha(self, t: Tensor | float) -> Tensor:
        return -self.u_max * self.sigma(t)

    def d_sigma(self, t: Tensor | float) -> Tensor:
        return self.u_max * self.alpha(t)


def linear_betas(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """DDPM's linear betas table (Ho et al. 2020), float64 [num_steps]."""
    return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)


def scaled_linear_betas(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """'scaled_linear' betas (linear in sqrt(beta)), as diffusers and DiffusionDrive use; [num_steps]."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2


class VPDiscrete(VPFromLogAlpha):
    """VP schedule from a discrete betas table of N steps (DDPM).

    Step n (0-based, as in training code: alpha_bar[n] = prod_{i<=n} (1 - beta_i)) sits at t = (n + 1) / N,
    and t = 0 is clean data (alpha = 1). In between, log(alpha) is interpolated linearly in t, as
    DPM-Solver does, so a model trained on integer steps is sampled exactly at its own steps whenever a
    grid point lands on one (see :meth:`time_of_step` / :meth:`step_of_time`); the default grid,
    ``'discrete'``, puts every interior point on a training step.
    """

    default_grid = "discrete"

    def __init__(self, betas: Tensor | None = None) -> None:
        betas = linear_betas() if betas is None else torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) < 2:
            raise ValueError(f"VPDiscrete: betas must be a 1-D table of >= 2 steps, got shape "
                             f"{tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("VPDiscrete: every beta must lie in (0, 1)")
        self.betas = betas
        self.num_steps = len(betas)
        self.t_end_default = 1.0 / self.num_steps
        log_alpha = 0.5 * torch.cumsum(torch.log1p(-betas), dim=0)
        self._t_table = torch.cat([torch.zeros(1, dtype=torch.float64),
                                   torch.arange(1, self.num_steps + 1, dtype=torch.float64) / self.num_steps])
        self._log_alpha_table = torch.cat([torch.zeros(1, dtype=torch.float64), log_alpha])

    def _config(self) -> dict:
        return {"num_steps": self.num_steps}

    @classmethod
    def linear(cls, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> VPDiscrete:
        """DDPM's 1000-step linear table."""
        return cls(linear_betas(num_steps, beta_start, beta_end))

    @classmethod
    def scaled_linear(cls, num_steps: int = 1000, beta_start: float = 1e-4,
                      beta_end: float = 0.02) -> VPDiscrete:
        """The 'scaled_linear' table (DiffusionDrive: 1000 steps, 1e-4 -> 0.02)."""
        return cls(scaled_linear_betas(num_steps, beta_start, beta_end))

    @property
    def alphas_cumprod(self) -> Tensor:
        """alpha_bar[n] = alpha((n+1)/N)^2, float64 [N]."""
        return torch.exp(2.0 * self._log_alpha_table[1:])

    def time_of_step(self, n: Tensor | int) -> Tensor:
        """t = (n + 1) / N for 0-based training step n."""
        return (_as_tensor(n) + 1.0) / self.num_steps

    def step_of_time(self, t: Tensor | float) -> Tensor:
        """Continuous step index n = t N - 1 (integer exactly at the training steps)."""
        return _as_tensor(t) * self.num_steps - 1.0

    def log_alpha(self, t: Tensor | float) -> Tensor:
        t = _as_tensor(t)
        return _interp(t, self._t_table.to(t.device), self._log_alpha_table.to(t.device))

    def t_of_logsnr(self, logsnr: Tensor | float) -> Tensor:
        logsnr = _as_tensor(logsnr)
        log_alpha = 0.5 * torch.nn.functional.logsigmoid(logsnr)
        return _interp(log_alpha, self._log_alpha_table.flip(0).to(logsnr.device),
                       self._t_table.flip(0).to(logsnr.device))


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation of (xp, fp) at x (xp increasing), extrapolating the end segments."""
    xp, fp = xp.to(x.dtype), fp.to(x.dtype)
    idx = torch.searchsorted(xp, x.detach().contiguous()).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    return f0 + (x - x0) * (f1 - f0) / (x1 - x0)


class VarianceExploding(Schedule):
    """alpha = 1 everywhere; subclasses give sigma(t). The prior is N(0, sigma(1)^2)."""

    @property
    def is_variance_exploding(self) -> bool:
        return True

    def alpha(self, t: Tensor | float) -> Tensor:
        return torch.ones_like(_as_tensor(t))

    def d_alpha(self, t: Tensor | float) -> Tensor:
        return torch.zeros_like(_as_tensor(t))


class EDM(VarianceExploding):
    """EDM (Karras et al. 2022): alpha = 1, sigma(t) = (s_min^(1/rho) + t (s_max^(1/rho) - s_min^(1/rho)))^rho.

    A time-uniform grid on this schedule is EDM's rho-grid; t = 0 is sigma_min (not clean data).
    """

    t_end_default = 0.0
    default_grid = "time"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> None:
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"EDM needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)
        self._lo = self.sigma_min ** (1.0 / self.rho)
        self._hi = self.sigma_max ** (1.0 / self.rho)

    def _config(self) -> dict:
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "rho": self.rho}

    def sigma(self, t: Tensor | float) -> Tensor:
        return (self._lo + _as_tensor(t) * (self._hi - self._lo)) ** self.rho

    def logsnr(self, t: Tensor | float) -> Tensor:
        return -2.0 * self.rho * torch.log(self._lo + _as_tensor(t) * (self._hi - self._lo))

    def t_of_logsnr(self, logsnr: Tensor | float) -> Tensor:
        sigma = torch.exp(-0.5 * _as_tensor(logsnr))
        return (sigma ** (1.0 / self.rho) - self._lo) / (self._hi - self._lo)

    def d_sigma(self, t: Tensor | float) -> Tensor:
        t = _as_tensor(t)
        return self.rho * (self._hi - self._lo) * (self._lo + t * (self._hi - self._lo)) ** (self.rho - 1)


class VE(VarianceExploding):
    """Variance exploding (Song et al. 2021): alpha = 1, sigma(t) = sigma_min (sigma_max / sigma_min)^t."""

    t_end_default = 0.0
    default_grid = "time"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0) -> None:
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"VE needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def _config(self) -> dict:
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max}

    def sigma(self, t: Tensor | float) -> Tensor:
        return self.sigma_min * torch.exp(_as_tensor(t) * self._log_ratio)

    def logsnr(self, t: Tensor | float) -> Tensor:
        return -2.0 * (math.log(self.sigma_min) + _as_tensor(t) * self._log_ratio)

    def t_of_logsnr(self, logsnr: Tensor | float) -> Tensor:
        return (-0.5 * _as_tensor(logsnr) - math.log(self.sigma_min)) / self._log_ratio

    def d_sigma(self, t: Tensor | float) -> Tensor:
        return self._log_ratio * self.sigma(t)


class Flow(Schedule):
    """Rectified flow / flow matching path: alpha = 1 - t, sigma = t (Liu et al. 2022, Lipman et al. 2022).

    The velocity is d x_t / dt = eps - x0. log-SNR is infinite at both ends, so solvers written in
    log-SNR treat those ends as limits (see ``trajgen.solvers``).
    """

    t_end_default = 0.0
    default_grid = "time"

    def alpha(self, t: Tensor | float) -> Tensor:
        return 1.0 - _as_tensor(t)

    def sigma(self, t: Tensor | float) -> Tensor:
        return _as_tensor(t).clone()

    def t_of_logsnr(self, logsnr: Tensor | float) -> Tensor:
        return torch.sigmoid(-0.5 * _as_tensor(logsnr))

    def d_alpha(self, t: Tensor | float) -> Tensor:
        return -torch.ones_like(_as_tensor(t))

    def d_sigma(self, t: Tensor | float) -> Tensor:
        return torch.ones_like(_as_tensor(t))


SCHEDULES: dict[str, type[Schedule]] = {
    "vp-linear": VPLinear,
    "vp-cosine": VPCosine,
    "vp-discrete": VPDiscrete,
    "edm": EDM,
    "ve": VE,
    "flow": Flow,
}


def make_schedule(name: str, **kwargs) -> Schedule:
    """Build a schedule by name: one of ``SCHEDULES`` (``'vp-discrete'`` takes ``betas=`` or
    ``table='linear'|'scaled-linear'`` with ``num_steps``)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; expected one of {sorted(SCHEDULES)}")
    if name == "vp-discrete" and "table" in kwargs:
        table = kwargs.pop("table")
        builders = {"linear": VPDiscrete.linear, "scaled-linear": VPDiscrete.scaled_linear}
        if table not in builders:
            raise ValueError(f"unknown betas table {table!r}; expected one of {sorted(builders)}")
        return builders[table](**kwargs)
    return SCHEDULES[name](**kwargs)
