"""DDIM (Song et al. 2021) and DDPM ancestral sampling (Ho et al. 2020) as DDIM with eta = 1."""

from __future__ import annotations

import math

from trajgen.solvers.plan import PlanBuilder, X, Z
from trajgen.solvers.registry import register


def _ddim_steps(b: PlanBuilder, eta: float) -> None:
    """x_t = alpha_t x0 + sqrt(sigma_t^2 - c^2) eps_hat + c z, c^2 = eta^2 sigma_t^2 (1 - e^{-2h})."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    for s, t in zip(b.points[:-1], b.points[1:]):
        D = b.evaluate(s, X, "x0")
        h = t.lam - s.lam
        c = eta * t.sigma * math.sqrt(-math.expm1(-2.0 * h)) if t.sigma > 0 else 0.0
        if c > t.sigma:
            raise ValueError(f"ddim: eta={eta} asks for more noise than sigma_t allows; use eta <= 1")
        noise_keep = math.sqrt(max(t.sigma**2 - c**2, 0.0))
        eps_hat = (X - s.alpha * D) / s.sigma
        b.step(t.alpha * D + noise_keep * eps_hat + c * Z, t.t)


@register("ddim", orders=(1,), eta=0.0)
def ddim(b: PlanBuilder, order: int, eta: float) -> None:
    """DDIM; eta = 0 is the deterministic probability-flow discretisation, eta = 1 is DDPM."""
    _ddim_steps(b, eta)


@register("ddpm", orders=(1,), stochastic=True)
def ddpm(b: PlanBuilder, order: int) -> None:
    """DDPM ancestral sampling: draw x_t from the posterior q(x_t | x_s, x0_hat)."""
    _ddim_steps(b, 1.0)
