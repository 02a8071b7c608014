"""Sampling plans: every solver is compiled once into a list of steps whose updates are fixed linear
combinations of a few registers, so a sampling loop costs the network plus a handful of fused ops.

Registers: ``X`` the state at the start of the step, ``Z`` the step's fresh noise, ``S`` a state a solver
saves between steps (UniPC's corrected sample), and one register per network evaluation, already
converted into the basis the solver works in (x0 for DPM-Solver++, eps for DDIM-type updates, the flow
velocity for flow Runge-Kutta). Solvers build plans with :class:`PlanBuilder`, writing the paper's update
formulas over :class:`Lin` combinations, e.g. ``x_t = (sigma_t / sigma_s) * X - alpha_t * phi_1 * D0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from trajgen.diffusion.predictions import conversion_coefficients
from trajgen.diffusion.schedules import Schedule

X_REG, Z_REG, S_REG, FIRST_EVAL_REG = 0, 1, 2, 3

Combo = tuple[tuple[int, float], ...]


class Lin:
    """A linear combination of registers with float64 coefficients (symbolic: no tensors)."""

    __slots__ = ("terms",)

    def __init__(self, terms: dict[int, float] | None = None) -> None:
        self.terms: dict[int, float] = dict(terms or {})

    @staticmethod
    def reg(index: int) -> Lin:
        return Lin({index: 1.0})

    def __add__(self, other: Lin) -> Lin:
        terms = dict(self.terms)
        for reg, coef in other.terms.items():
            terms[reg] = terms.get(reg, 0.0) + coef
        return Lin(terms)

    def __sub__(self, other: Lin) -> Lin:
        return self + (-1.0) * other

    def __rmul__(self, scale: float) -> Lin:
        return Lin({reg: float(scale) * coef for reg, coef in self.terms.items()})

    def __mul__(self, scale: float) -> Lin:
        return self.__rmul__(scale)

    def __truediv__(self, scale: float) -> Lin:
        return self.__rmul__(1.0 / float(scale))

    def __neg__(self) -> Lin:
        return self.__rmul__(-1.0)

    def combo(self, where: str) -> Combo:
        """Freeze into a tuple, dropping zero terms; non-finite coefficients raise."""
        for coef in self.terms.values():
            if not math.isfinite(coef):
                raise ValueError(f"{where}: a solver coefficient is not finite ({coef}); the step touches a "
                                 "time where this solver's parameterisation is singular (alpha = 0 or "
                                 "sigma = 0): move t_start/t_end inside (0, 1) or choose a data-prediction "
                                 "solver (ddim, dpmsolver++, unipc, euler)")
        terms = tuple((reg, coef) for reg, coef in sorted(self.terms.items()) if coef != 0.0)
        return terms if terms else ((X_REG, 0.0),)


X, Z, S = Lin.reg(X_REG), Lin.reg(Z_REG), Lin.reg(S_REG)


@dataclass(frozen=True)
class Evaluation:
    """One network call at time ``t`` on state ``inputs``; stored as ``k_x * input + k_p * output``."""

    t: float
    inputs: Combo
    k_x: float
    k_p: float


@dataclass(frozen=True)
class Step:
    """Network evaluations, then optionally ``S <- save``, then ``X <- out`` (the state at ``t_next``)."""

    t_next: float
    evaluations: tuple[Evaluation, ...]
    save: Combo | None
    out: Combo
    needs_noise: bool


@dataclass(frozen=True)
class Point:
    """Schedule values at one time, float64: alpha, sigma, lam = log(alpha / sigma) (half log-SNR)."""

    t: float
    alpha: float
    sigma: float
    lam: float

    @property
    def noise_level(self) -> float:
        """sigma / alpha (EDM's sigma for a VP schedule); inf where alpha = 0."""
        return self.sigma / self.alpha if self.alpha > 0 else math.inf


class PlanBuilder:
    """Collects a solver's steps. ``times`` is the decreasing grid [N + 1]; ``prediction`` what the model
    outputs (evaluations convert it into the basis each solver asks for)."""

    def __init__(self, schedule: Schedule, prediction: str, times: Tensor, solver: str) -> None:
        self.schedule, self.prediction, self.solver = schedule, prediction, solver
        self.times = [float(t) for t in times]
        self.points = [self.point(t) for t in self.times]
        self.steps: list[Step] = []
        self._pending: list[Evaluation] = []
        self._num_evals = 0

    @property
    def num_steps(self) -> int:
        return len(self.times) - 1

    def point(self, t: float) -> Point:
        """Schedule values at time t (any time in [0, 1], e.g. a singlestep solver's midpoint)."""
        tt = torch.tensor(t, dtype=torch.float64)
        alpha, sigma = float(self.schedule.alpha(tt)), float(self.schedule.sigma(tt))
        if alpha == 0.0:
            lam = -math.inf
        elif sigma == 0.0:
            lam = math.inf
        else:
            lam = 0.5 * float(self.schedule.logsnr(tt))
        return Point(t, alpha, sigma, lam)

    def point_at_lambda(self, lam: float) -> Point:
        """The point whose half log-SNR is ``lam``."""
        return self.point(float(self.schedule.t_of_logsnr(torch.tensor(2.0 * lam, dtype=torch.float64))))

    def point_at_noise_level(self, level: float) -> Point:
        """The point whose sigma / alpha equals ``level``."""
        return self.point_at_lambda(-math.log(level))

    def evaluate(self, point: Point | float, inputs: Lin, basis: str) -> Lin:
        """Call the network at ``point`` on ``inputs``; returns the register holding its ``basis`` prediction."""
        t = point.t if isinstance(point, Point) else float(point)
        k_x, k_p = conversion_coefficients(self.prediction, basis, self.schedule, torch.tensor(t, dtype=torch.float64))
        k_x, k_p = float(k_x), float(k_p)
        if not (math.isfinite(k_x) and math.isfinite(k_p)):
            raise ValueError(f"solver {self.solver!r}: cannot turn a {self.prediction!r} prediction into "
                             f"{basis!r} at t={t:g}")
        index = FIRST_EVAL_REG + self._num_evals
        self._num_evals += 1
        self._pending.append(Evaluation(t, inputs.combo(f"solver {self.solver!r} at t={t:g}"), k_x, k_p))
        return Lin.reg(index)

    def step(self, out: Lin, t_next: float, save: Lin | None = None) -> None:
        """Close the current step: optionally save ``S``, then the new state is ``out`` at ``t_next``."""
        where = f"solver {self.solver!r}, step to t={t_next:g}"
        combos = [e.inputs for e in self._pending] + [out.combo(where)] + ([save.combo(where)] if save else [])
        needs_noise = any(reg == Z_REG for combo in combos for reg, _ in combo)
        self.steps.append(Step(t_next, tuple(self._pending), save.combo(where) if save else None,
                               out.combo(where), needs_noise))
        self._pending = []

    @property
    def nfe(self) -> int:
        return self._num_evals
