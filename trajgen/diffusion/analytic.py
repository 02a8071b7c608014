"""A Gaussian mixture with its exact denoiser: ground truth for solvers, tests and benchmarks.

For p(x0) = sum_k w_k N(mu_k, C_k) and x_t = alpha x0 + sigma eps, x_t | k ~ N(alpha mu_k, alpha^2 C_k +
sigma^2 I), so the posterior mean E[x0 | x_t] is closed form. The probability-flow ODE therefore has a
ground truth that :meth:`GaussianMixture.ode_reference` integrates with scipy's DOP853 to ~1e-10.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from trajgen.diffusion.predictions import check_prediction, convert
from trajgen.diffusion.schedules import Flow, Schedule


class GaussianMixture:
    """A D-dimensional Gaussian mixture.

    Args:
        means: [K, D]; covs: [K, D, D] (symmetric positive definite); weights: [K] (normalised here).
    """

    def __init__(self, means: Tensor, covs: Tensor, weights: Tensor | None = None) -> None:
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.covs = torch.as_tensor(covs, dtype=torch.float64)
        K, D = self.means.shape
        if self.covs.shape != (K, D, D):
            raise ValueError(f"covs must be [K, D, D] = [{K}, {D}, {D}], got {tuple(self.covs.shape)}")
        w = torch.ones(K, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.weights = w / w.sum()
        self.dim = D

    @classmethod
    def random(cls, components: int = 3, dim: int = 2, *, scale: float = 1.0, std: float = 0.4,
               seed: int = 0) -> GaussianMixture:
        """A random, well-separated, anisotropic mixture (seeded)."""
        g = torch.Generator().manual_seed(seed)
        means = scale * torch.randn(components, dim, generator=g, dtype=torch.float64)
        A = torch.randn(components, dim, dim, generator=g, dtype=torch.float64) * std * 0.5
        covs = A @ A.transpose(1, 2) + (std**2) * torch.eye(dim, dtype=torch.float64)
        weights = 0.5 + torch.rand(components, generator=g, dtype=torch.float64)
        return cls(means, covs, weights)

    @property
    def mean(self) -> Tensor:
        """Mixture mean [D]."""
        return self.weights @ self.means

    @property
    def covariance(self) -> Tensor:
        """Mixture covariance [D, D]."""
        centred = self.means - self.mean
        return (self.weights[:, None, None] * (self.covs + centred[:, :, None] * centred[:, None, :])).sum(0)

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """n samples [n, D] (float64)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        chol = torch.linalg.cholesky(self.covs)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + (chol[k] @ z[:, :, None])[:, :, 0]

    def posterior_mean(self, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """E[x0 | x_t] for x_t [B, D] with alpha, sigma [B] (or scalars); returns [B, D] in x_t's dtype."""
        x = x_t.to(torch.float64)
        B, D = x.shape
        alpha = torch.as_tensor(alpha, dtype=torch.float64, device=x.device).expand(B)[:, None, None, None]
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).expand(B)[:, None, None, None]
        means, covs = self.means.to(x.device), self.covs.to(x.device)
        eye = torch.eye(D, dtype=torch.float64, device=x.device)
        marg_cov = alpha**2 * covs[None] + sigma**2 * eye  # [B, K, D, D]
        chol = torch.linalg.cholesky(marg_cov)
        resid = x[:, None, :] - alpha[..., 0] * means[None]  # [B, K, D]
        solved = torch.cholesky_solve(resid[..., None], chol)  # [B, K, D, 1]
        logdet = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        log_lik = -0.5 * (resid[..., None] * solved).sum((-1, -2)) - 0.5 * logdet
        resp = torch.softmax(log_lik + torch.log(self.weights.to(x.device)), dim=1)  # [B, K]
        cond_mean = means[None] + alpha[..., 0] * (covs[None] @ solved)[..., 0]  # [B, K, D]
        return (resp[..., None] * cond_mean).sum(1).to(x_t.dtype)

    def denoiser(self, schedule: Schedule, prediction: str = "eps") -> Callable[[Tensor, Tensor], Tensor]:
        """The exact model ``model(x_t [B, D], t [B]) -> prediction`` for data from this mixture."""
        check_prediction(prediction)

        def model(x_t: Tensor, t: Tensor) -> Tensor:
            t64 = t.to(torch.float64)
            x0 = self.posterior_mean(x_t, schedule.alpha(t64), schedule.sigma(t64))
            return x0 if prediction == "x0" else convert(x0, x_t, t64, schedule, "x0", prediction)

        return model

    def ode_reference(self, schedule: Schedule, x_start: Tensor, t_start: float, t_end: float,
                      rtol: float = 1e-11, atol: float = 1e-13) -> Tensor:
        """Solve the probability-flow ODE exactly (DOP853) from x_start [B, D] at t_start to t_end.

        Integrates d(x / sigma) / d lambda = e^lambda E[x0 | x] in lambda = log(alpha / sigma) where both
        ends are finite, and dx/dt = alpha' x0_hat + sigma' eps_hat in t otherwise (flow from t = 1).
        """
        from scipy.integrate import solve_ivp

        x0 = x_start.detach().to("cpu", torch.float64)
        shape = x0.shape
        lam_start = 0.5 * float(schedule.logsnr(t_start))
        lam_end = 0.5 * float(schedule.logsnr(t_end))
        if math.isfinite(lam_start) and math.isfinite(lam_end) and not isinstance(schedule, Flow):
            def alpha_sigma(lam: float) -> tuple[Tensor, Tensor, Tensor]:
                t = schedule.t_of_logsnr(torch.tensor(2.0 * lam, dtype=torch.float64))
                return t, schedule.alpha(t), schedule.sigma(t)

            _, _, sigma_start = alpha_sigma(lam_start)

            def rhs(lam: float, y: np.ndarray) -> np.ndarray:
                _, alpha, sigma = alpha_sigma(lam)
                x = torch.from_numpy(y).reshape(shape) * sigma
                x0_hat = self.posterior_mean(x, alpha, sigma)
                return (math.exp(lam) * x0_hat).reshape(-1).numpy()

            sol = solve_ivp(rhs, (lam_start, lam_end), (x0 / sigma_start).reshape(-1).numpy(), method="DOP853",
                            rtol=rtol, atol=atol)
            _, _, sigma_end = alpha_sigma(lam_end)
            result = torch.from_numpy(sol.y[:, -1]).reshape(shape) * sigma_end
        else:
            def rhs_t(t: float, y: np.ndarray) -> np.ndarray:
                tt = torch.tensor(t, dtype=torch.float64)
                alpha, sigma = schedule.alpha(tt), schedule.sigma(tt)
                x = torch.from_numpy(y).reshape(shape)
                x0_hat = self.posterior_mean(x, alpha, sigma)
                eps_hat = (x - alpha * x0_hat) / sigma
                return (schedule.d_alpha(tt) * x0_hat + schedule.d_sigma(tt) * eps_hat).reshape(-1).numpy()

            sol = solve_ivp(rhs_t, (t_start, t_end), x0.reshape(-1).numpy(), method="DOP853", rtol=rtol, atol=atol)
            result = torch.from_numpy(sol.y[:, -1]).reshape(shape)
        if not sol.success:
            raise RuntimeError(f"reference ODE solve failed: {sol.message}")
        return result.to(x_start.dtype)
