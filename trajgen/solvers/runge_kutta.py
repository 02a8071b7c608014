"""Explicit Runge-Kutta solvers on the probability-flow ODE: EDM's Euler / Heun (with churn), midpoint, RK4.

The ODE is integrated in the variables natural to the schedule:

- flow schedules: x against t, slope = the flow velocity d x / dt (rectified-flow samplers);
- every other schedule: EDM's y = x / alpha against s = sigma / alpha, slope d y / d s = eps
  (Karras et al. 2022, eq. 4 with their s(t), sigma(t)); Euler here is exactly DDIM.

``churn`` (EDM's S_churn, with s_tmin, s_tmax, s_noise) first raises the noise level of each step from s to
s_hat = s (1 + gamma), gamma = min(churn / N, sqrt(2) - 1), by adding fresh noise, then integrates from s_hat.
A step ending at sigma = 0 where the slope cannot be evaluated falls back to Euler, as EDM's sampler does.
"""

from __future__ import annotations

import math

import torch

from trajgen.diffusion.predictions import conversion_coefficients
from trajgen.diffusion.schedules import Flow
from trajgen.solvers.plan import Lin, PlanBuilder, Point, X, Z
from trajgen.solvers.registry import register

# Butcher tableaux (c, A, b).
TABLEAUX: dict[str, tuple[tuple[float, ...], tuple[tuple[float, ...], ...], tuple[float, ...]]] = {
    "euler": ((0.0,), ((),), (1.0,)),
    "heun": ((0.0, 1.0), ((), (1.0,)), (0.5, 0.5)),
    "midpoint": ((0.0, 0.5), ((), (0.5,)), (0.0, 1.0)),
    "rk4": ((0.0, 0.5, 0.5, 1.0), ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), (1 / 6, 1 / 3, 1 / 3, 1 / 6)),
}


class _OdeVariables:
    """Maps between schedule time and the integration variable (x, t) or (x / alpha, sigma / alpha)."""

    def __init__(self, b: PlanBuilder) -> None:
        self.b = b
        self.flow = isinstance(b.schedule, Flow)
        self.basis = "flow" if self.flow else "eps"

    def var(self, p: Point) -> float:
        return p.t if self.flow else p.noise_level

    def point(self, v: float) -> Point:
        if self.flow:
            return self.b.point(v)
        return self.b.point_at_noise_level(v) if v > 0 else self.b.point(0.0)

    def scale(self, p: Point) -> float:
        """x = scale * y."""
        return 1.0 if self.flow else p.alpha


def _can_evaluate_at(b: PlanBuilder, p: Point, basis: str) -> bool:
    """False where the network cannot be asked for ``basis`` at p: at sigma = 0 an eps prediction is
    undefined (EDM skips the second-order correction there), and singular conversions."""
    if p.sigma == 0.0 and "eps" in (basis, b.prediction):
        return False
    try:
        k_x, k_p = conversion_coefficients(b.prediction, basis, b.schedule, torch.tensor(p.t, dtype=torch.float64))
    except ValueError:
        return False
    return math.isfinite(float(k_x)) and math.isfinite(float(k_p))


def _rk_steps(b: PlanBuilder, method: str, churn: float, s_tmin: float, s_tmax: float, s_noise: float) -> None:
    ode = _OdeVariables(b)
    if ode.flow and churn > 0:
        raise ValueError("churn is defined on the noise level sigma / alpha; flow schedules take churn=0")
    gamma_max = min(churn / b.num_steps, math.sqrt(2.0) - 1.0) if churn > 0 else 0.0
    top_level = b.point(1.0).noise_level
    for s, t in zip(b.points[:-1], b.points[1:]):
        x_start = X
        if gamma_max > 0 and s_tmin <= s.noise_level <= s_tmax:
            level_hat = min(s.noise_level * (1.0 + gamma_max), top_level)
            s_hat = b.point_at_noise_level(level_hat)
            # x_hat = (alpha_hat / alpha) x + sqrt(sigma_hat^2 - (alpha_hat sigma / alpha)^2) z
            ratio = s_hat.alpha / s.alpha
            extra = math.sqrt(max(s_hat.sigma**2 - (ratio * s.sigma) ** 2, 0.0))
            x_start, s = ratio * X + (s_noise * extra) * Z, s_hat
        c, A, weights = TABLEAUX[method]
        if c[-1] == 1.0 and not _can_evaluate_at(b, t, ode.basis):
            c, A, weights = TABLEAUX["euler"]
        v_s, v_t = ode.var(s), ode.var(t)
        dv = v_t - v_s
        slopes: list[Lin] = []
        for c_k, a_k in zip(c, A):
            stage = ode.point(v_s + c_k * dv) if c_k else s
            y_k = x_start / ode.scale(s)
            for a, slope in zip(a_k, slopes):
                y_k = y_k + (dv * a) * slope
            slopes.append(b.evaluate(stage, ode.scale(stage) * y_k, ode.basis))
        y_t = x_start / ode.scale(s)
        for w, slope in zip(weights, slopes):
            y_t = y_t + (dv * w) * slope
        b.step(ode.scale(t) * y_t, t.t)


@register("euler", orders=(1,), churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0)
def euler(b: PlanBuilder, order: int, churn: float, s_tmin: float, s_tmax: float, s_noise: float) -> None:
    """Euler (EDM Algorithm 2 with Euler steps when churn > 0); on flow schedules, Euler in t."""
    _rk_steps(b, "euler", churn, s_tmin, s_tmax, s_noise)


@register("heun", orders=(2,), churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0)
def heun(b: PlanBuilder, order: int, churn: float, s_tmin: float, s_tmax: float, s_noise: float) -> None:
    """EDM's Heun sampler (Algorithms 1/2); 2 calls per step."""
    _rk_steps(b, "heun", churn, s_tmin, s_tmax, s_noise)


@register("midpoint", orders=(2,))
def midpoint(b: PlanBuilder, order: int) -> None:
    """Explicit midpoint rule (RK2); 2 calls per step."""
    _rk_steps(b, "midpoint", 0.0, 0.0, math.inf, 1.0)


@register("rk4", orders=(4,))
def rk4(b: PlanBuilder, order: int) -> None:
    """Classical fourth-order Runge-Kutta; 4 calls per step."""
    _rk_steps(b, "rk4", 0.0, 0.0, math.inf, 1.0)
