"""UniPC (Zhao et al. 2023): unified predictor (UniP) and corrector (UniC), data prediction, B(h) = bh1 | bh2.

Step i evaluates the network at the predicted state x^p_i, corrects it with UniC (reusing that evaluation,
so the corrector is free), then predicts x^p_{i+1} with UniP from the corrected state. The corrected
state lives in register ``S``; the last step is not corrected (it would need one more call).
"""

from __future__ import annotations

import math

import numpy as np

from trajgen.solvers.dpm_solver import multistep_order
from trajgen.solvers.plan import Lin, PlanBuilder, Point, S, X
from trajgen.solvers.registry import register


def unipc_coefficients(h: float, rks: list[float], order: int, variant: str) -> tuple[float, float, np.ndarray, np.ndarray]:
    """(h_phi_1, B_h, R, b) of UniPC for data prediction: R[i-1] = rks^(i-1), b[i-1] = i! phi_{i+1}(-h)/B(h)."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1.0
    B_h = hh if variant == "bh1" else math.expm1(hh)
    R, b, factorial = [], [], 1.0
    r = np.array(rks + [1.0])
    for i in range(1, order + 1):
        R.append(r ** (i - 1))
        b.append(h_phi_k * factorial / B_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return h_phi_1, B_h, np.array(R), np.array(b)


def _differences(P: list[Point], D: list[Lin], anchor: int, order: int, h: float) -> tuple[list[float], list[Lin]]:
    """rk = (lambda_{anchor-k} - lambda_anchor) / h and D1_k = (D_{anchor-k} - D_anchor) / rk, k = 1..order-1."""
    rks, D1s = [], []
    for k in range(1, order):
        rk = (P[anchor - k].lam - P[anchor].lam) / h
        rks.append(rk)
        D1s.append((D[anchor - k] - D[anchor]) / rk)
    return rks, D1s


def uni_p(base: Lin, P: list[Point], D: list[Lin], i: int, order: int, variant: str) -> Lin:
    """UniP-order: predict x at P[i+1] from ``base`` (the state at P[i]) and outputs D[..i]."""
    s, t = P[i], P[i + 1]
    h = t.lam - s.lam
    rks, D1s = _differences(P, D, i, order, h)
    h_phi_1, B_h, R, b = unipc_coefficients(h, rks, order, variant)
    x_t = (t.sigma / s.sigma) * base - (t.alpha * h_phi_1) * D[i]
    if D1s:
        rhos = np.array([0.5]) if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
        for rho, D1 in zip(rhos, D1s):
            x_t = x_t - (t.alpha * B_h * float(rho)) * D1
    return x_t


def uni_c(base: Lin, P: list[Point], D: list[Lin], i: int, order: int, variant: str) -> Lin:
    """UniC-order: correct the state at P[i] from ``base`` (the corrected state at P[i-1]), D[..i]."""
    s, t = P[i - 1], P[i]
    h = t.lam - s.lam
    rks, D1s = _differences(P, D, i - 1, order, h)
    h_phi_1, B_h, R, b = unipc_coefficients(h, rks, order, variant)
    rhos = np.array([0.5]) if order == 1 else np.linalg.solve(R, b)
    x_t = (t.sigma / s.sigma) * base - (t.alpha * h_phi_1) * D[i - 1]
    for rho, D1 in zip(rhos[:-1], D1s):
        x_t = x_t - (t.alpha * B_h * float(rho)) * D1
    return x_t - (t.alpha * B_h * float(rhos[-1])) * (D[i] - D[i - 1])


@register("unipc", orders=(1, 2, 3), default_order=2, variant="bh2", corrector=True, lower_order_final=True)
def unipc(b: PlanBuilder, order: int, variant: str, corrector: bool, lower_order_final: bool) -> None:
    """UniPC multistep (UniP + UniC), data prediction; ``variant`` 'bh1' or 'bh2'."""
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"unipc variant={variant!r}; expected 'bh1' or 'bh2'")
    P = b.points
    D: list[Lin] = []
    previous_order = 1
    for i in range(b.num_steps):
        D.append(b.evaluate(P[i], X, "x0"))
        correctable = i > 0 and corrector and math.isfinite(P[i].lam - P[i - 1].lam)
        corrected = uni_c(S, P, D, i, previous_order, variant) if correctable else X
        k = multistep_order(b, i, order, lower_order_final)
        b.step(uni_p(S, P, D, i, k, variant), P[i + 1].t, save=corrected)
        previous_order = k
