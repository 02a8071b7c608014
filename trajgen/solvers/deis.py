"""DEIS (Zhang & Chen 2023), rho-space Adams-Bashforth with Lagrange extrapolation in log rho.

With y = x / alpha and rho = sigma / alpha the probability-flow ODE is d y / d rho = eps(y, rho), so
y_t = y_s + sum_j c_j eps_j with c_j = int_{rho_s}^{rho_t} L_j(log rho) d rho, L_j the Lagrange basis on the
last ``order`` log-rho nodes (diffusers' 'logrho' variant). The integrals are taken once per plan with
Gauss-Legendre quadrature in u = log rho (integrand L_j(u) e^u, smooth), exact to round-off.
"""

from __future__ import annotations

import math

import numpy as np

from trajgen.solvers.dpm_solver import multistep_order, noise_first_order_step, require_alpha
from trajgen.solvers.plan import Lin, PlanBuilder, X
from trajgen.solvers.registry import register

_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(24)


def lagrange_rho_integrals(u_nodes: list[float], u_s: float, u_t: float) -> list[float]:
    """c_j = int_{u_s}^{u_t} L_j(u) e^u du for the Lagrange basis L_j on ``u_nodes`` (u = log rho)."""
    u = 0.5 * (u_t - u_s) * _GL_NODES + 0.5 * (u_t + u_s)
    w = 0.5 * (u_t - u_s) * _GL_WEIGHTS * np.exp(u)
    coeffs = []
    for j, u_j in enumerate(u_nodes):
        basis = np.ones_like(u)
        for m, u_m in enumerate(u_nodes):
            if m != j:
                basis *= (u - u_m) / (u_j - u_m)
        coeffs.append(float(np.sum(w * basis)))
    return coeffs


@register("deis", orders=(1, 2, 3), default_order=3, lower_order_final=True)
def deis(b: PlanBuilder, order: int, lower_order_final: bool) -> None:
    """DEIS-1/2/3 multistep (log-rho Adams-Bashforth), noise prediction."""
    P = b.points
    eps: list[Lin] = []
    for i in range(b.num_steps):
        s, t = P[i], P[i + 1]
        require_alpha(b, s)
        eps.append(b.evaluate(s, X, "eps"))
        if not math.isfinite(t.lam):  # a step to sigma = 0 is taken in its first-order limit
            b.step(noise_first_order_step(s, t, X, eps[-1]), t.t)
            continue
        k = multistep_order(b, i, order, lower_order_final)
        u_nodes = [-P[i - j].lam for j in range(k)]  # log rho = -lambda
        coeffs = lagrange_rho_integrals(u_nodes, -s.lam, -t.lam)
        y_t = X / s.alpha
        for j, c in enumerate(coeffs):
            y_t = y_t + c * eps[-1 - j]
        b.step(t.alpha * y_t, t.t)
