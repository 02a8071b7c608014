"""DPM-Solver (Lu et al. 2022) and DPM-Solver++ (Lu et al. 2022b), written against lambda = log(alpha/sigma).

h = lambda_t - lambda_s; ``phi_1 = expm1(-h)`` for data prediction, ``expm1(h)`` for noise prediction, as
in DPM-Solver's reference code. A step that touches lambda = +-inf (flow schedules at t = 1 or t = 0, or
sampling to sigma = 0) is taken at first order, its exact limit there.
"""

from __future__ import annotations

import math

from trajgen.solvers.plan import Lin, PlanBuilder, Point, X, Z
from trajgen.solvers.registry import register


def require_alpha(b: PlanBuilder, s: Point) -> None:
    """Noise-prediction solvers cannot leave a state with alpha = 0 (eps there says nothing about x0)."""
    if s.alpha <= 0:
        raise ValueError(f"solver {b.solver!r} works in noise prediction and cannot start where alpha = 0 "
                         f"(t={s.t:g} on {b.schedule!r}): pass t_start < 1 or use dpmsolver++ / unipc / euler")


def noise_first_order_step(s: Point, t: Point, x: Lin, eps: Lin) -> Lin:
    """DDIM in noise prediction, x_t = (alpha_t / alpha_s) x - (alpha_t sigma_s / alpha_s - sigma_t) eps,
    which is DPM-Solver-1 (= alpha_t/alpha_s x - sigma_t expm1(h) eps) written to stay finite at sigma_t = 0."""
    return (t.alpha / s.alpha) * x - (t.alpha * s.sigma / s.alpha - t.sigma) * eps


def multistep_order(b: PlanBuilder, i: int, order: int, lower_order_final: bool) -> int:
    """Order of multistep step i: warm up from 1, lower at the end (``lower_order_final``, as DPM-Solver's
    reference code does by default: the last steps of a coarse grid are long and extrapolation over
    them is unstable), 1 when h is infinite."""
    k = min(order, i + 1)
    if lower_order_final:
        k = min(k, b.num_steps - i)
    s, t = b.points[i], b.points[i + 1]
    if not math.isfinite(t.lam - s.lam):
        return 1
    while k > 1 and not math.isfinite(b.points[i - k + 1].lam):  # history must have finite log-SNR
        k -= 1
    return k


@register("dpmsolver", orders=(1, 2, 3), default_order=3)
def dpm_solver_singlestep(b: PlanBuilder, order: int) -> None:
    """DPM-Solver-1/2/3, singlestep, noise prediction (r1 = 1/2 for order 2; r1, r2 = 1/3, 2/3 for 3)."""
    for s, t in zip(b.points[:-1], b.points[1:]):
        require_alpha(b, s)
        eps_s = b.evaluate(s, X, "eps")
        h = t.lam - s.lam
        if order == 1 or not math.isfinite(h):  # a step to sigma = 0 is taken in its first-order limit
            b.step(noise_first_order_step(s, t, X, eps_s), t.t)
            continue
        x_t = (t.alpha / s.alpha) * X - (t.sigma * math.expm1(h)) * eps_s
        if order == 2:
            r1 = 0.5
            s1 = b.point_at_lambda(s.lam + r1 * h)
            u1 = (s1.alpha / s.alpha) * X - (s1.sigma * math.expm1(r1 * h)) * eps_s
            eps_s1 = b.evaluate(s1, u1, "eps")
            x_t = x_t - (0.5 / r1) * (t.sigma * math.expm1(h)) * (eps_s1 - eps_s)
        else:
            r1, r2 = 1.0 / 3.0, 2.0 / 3.0
            s1, s2 = b.point_at_lambda(s.lam + r1 * h), b.point_at_lambda(s.lam + r2 * h)
            phi_11, phi_12 = math.expm1(r1 * h), math.expm1(r2 * h)
            phi_22 = math.expm1(r2 * h) / (r2 * h) - 1.0
            phi_1 = math.expm1(h)
            phi_2 = phi_1 / h - 1.0
            u1 = (s1.alpha / s.alpha) * X - (s1.sigma * phi_11) * eps_s
            eps_s1 = b.evaluate(s1, u1, "eps")
            u2 = ((s2.alpha / s.alpha) * X - (s2.sigma * phi_12) * eps_s
                  - (r2 / r1) * (s2.sigma * phi_22) * (eps_s1 - eps_s))
            eps_s2 = b.evaluate(s2, u2, "eps")
            x_t = (t.alpha / s.alpha) * X - (t.sigma * phi_1) * eps_s - (1.0 / r2) * (t.sigma * phi_2) * (eps_s2 - eps_s)
        b.step(x_t, t.t)


@register("dpmsolver++", orders=(1, 2, 3), default_order=2, lower_order_final=True, warmup="lower-order")
def dpm_solver_pp_multistep(b: PlanBuilder, order: int, lower_order_final: bool, warmup: str) -> None:
    """DPM-Solver++(1M/2M/3M): multistep, data prediction.

    ``warmup='lower-order'`` (the reference code's choice, NFE = steps) starts 3M with a first-order step
    whose O(h^2) local error caps the asymptotic order at 2 (its constant is small at high noise, so the
    effect is rarely visible); ``warmup='singlestep'`` takes that step with DPM-Solver++(2S) instead (one
    more call) so 3M keeps order 3.

    3M: with D(lambda) ~ D0 + D' u + D'' u^2 / 2 the exact step adds -alpha_t h^2 phi_3 D'', and the
    divided differences give D2 = h^2 D'' / 2, so the D2 term carries a factor 2. The reference code
    (and diffusers, k-diffusion) omit it, which leaves their 3M second order; see
    tests/test_solvers.py::test_dpmsolver_pp_3m_is_third_order_on_quadratic_x0.
    """
    if warmup not in ("lower-order", "singlestep"):
        raise ValueError(f"warmup={warmup!r}; expected 'lower-order' or 'singlestep'")
    P = b.points
    D: list[Lin] = []
    for i in range(b.num_steps):
        s, t = P[i], P[i + 1]
        D.append(b.evaluate(s, X, "x0"))
        k = multistep_order(b, i, order, lower_order_final)
        if i == 0 and order == 3 and warmup == "singlestep" and math.isfinite(t.lam - s.lam):
            b.step(_dpm_solver_pp_2s_step(b, s, t, D[-1]), t.t)
            continue
        h = t.lam - s.lam
        phi_1 = math.expm1(-h)
        x_t = (t.sigma / s.sigma) * X - (t.alpha * phi_1) * D[-1]
        if k >= 2:
            r0 = (s.lam - P[i - 1].lam) / h
            D1_0 = (D[-1] - D[-2]) / r0
            if k == 2:
                x_t = x_t - 0.5 * (t.alpha * phi_1) * D1_0
            else:
                r1 = (P[i - 1].lam - P[i - 2].lam) / h
                D1_1 = (D[-2] - D[-3]) / r1
                D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
                D2 = (D1_0 - D1_1) / (r0 + r1)
                phi_2 = phi_1 / h + 1.0
                phi_3 = phi_2 / h - 0.5
                x_t = x_t + (t.alpha * phi_2) * D1 - (2.0 * t.alpha * phi_3) * D2
        b.step(x_t, t.t)


def _dpm_solver_pp_2s_step(b: PlanBuilder, s: Point, t: Point, D_s: Lin, r1: float = 0.5) -> Lin:
    """One DPM-Solver++(2S) step from s to t given D_s = x0_hat(x_s): one more call at lambda_s + r1 h."""
    h = t.lam - s.lam
    phi_1 = math.expm1(-h)
    s1 = b.point_at_lambda(s.lam + r1 * h)
    u1 = (s1.sigma / s.sigma) * X - (s1.alpha * math.expm1(-r1 * h)) * D_s
    D_s1 = b.evaluate(s1, u1, "x0")
    return (t.sigma / s.sigma) * X - (t.alpha * phi_1) * D_s - (0.5 / r1) * (t.alpha * phi_1) * (D_s1 - D_s)


@register("dpmsolver++-2s", orders=(1, 2), default_order=2)
def dpm_solver_pp_2s(b: PlanBuilder, order: int) -> None:
    """DPM-Solver++(2S): singlestep second order, data prediction, r1 = 1/2."""
    for s, t in zip(b.points[:-1], b.points[1:]):
        D_s = b.evaluate(s, X, "x0")
        if order == 2 and math.isfinite(t.lam - s.lam):
            b.step(_dpm_solver_pp_2s_step(b, s, t, D_s), t.t)
        else:
            b.step((t.sigma / s.sigma) * X - (t.alpha * math.expm1(s.lam - t.lam)) * D_s, t.t)


@register("sde-dpmsolver++", orders=(1, 2), default_order=2, stochastic=True, lower_order_final=True)
def sde_dpm_solver_pp(b: PlanBuilder, order: int, lower_order_final: bool) -> None:
    """SDE-DPM-Solver++(1M/2M) (midpoint form, as diffusers): data prediction with fresh noise each step."""
    P = b.points
    D: list[Lin] = []
    for i in range(b.num_steps):
        s, t = P[i], P[i + 1]
        D.append(b.evaluate(s, X, "x0"))
        k = multistep_order(b, i, order, lower_order_final)
        h = t.lam - s.lam
        keep = -math.expm1(-2.0 * h)  # 1 - e^{-2h}
        x_t = (t.sigma / s.sigma * math.exp(-h)) * X + (t.alpha * keep) * D[-1] + (t.sigma * math.sqrt(keep)) * Z
        if k == 2:
            r0 = (s.lam - P[i - 1].lam) / h
            x_t = x_t + 0.5 * (t.alpha * keep) * ((D[-1] - D[-2]) / r0)
        b.step(x_t, t.t)
