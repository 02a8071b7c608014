"""Runs a compiled plan with one fused op per update.

Every update of every solver is ``x_new = c_x * X + c_s * S + sum_k c_k R_k`` over the stored network
outputs R_k (and the step's noise). The outputs live as rows of one matrix ``regs`` [slots, N], so the
whole sum is a single ``torch.addmv`` (and one ``add_`` when a saved state S is involved). Evaluations
are stored in one op as well: ``R_k = u + (k_p / k_x) * out`` with k_x folded into every coefficient
that reads R_k (or ``R_k = out`` with k_p folded when k_x = 0). Rows are reused once no later update
reads them (liveness computed at plan time), so memory is O(order) states, not O(steps).

Buffers are allocated once per (numel, dtype, device) and reused across calls: a sampler is not
thread-safe, and the tensor a model receives is only valid during that call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from trajgen.solvers.plan import FIRST_EVAL_REG, S_REG, X_REG, Z_REG, Combo, Step

NOISE_ROW = 0  # regs row holding the step's fresh noise; evaluation outputs use the rows after it


@dataclass(frozen=True)
class CompiledCombo:
    """x = c_x X + c_s S + coef @ regs (``coef`` None when no stored row is read)."""

    c_x: float
    c_s: float
    coef: tuple[float, ...] | None


@dataclass(frozen=True)
class CompiledEval:
    """Network call at ``t`` on ``inputs`` (None: the state X itself); store to row ``slot``."""

    t: float
    inputs: CompiledCombo | None
    slot: int
    out_scale: float  # row = inputs + out_scale * out   (or out_scale * out when ``add_input`` is False)
    add_input: bool


@dataclass(frozen=True)
class CompiledStep:
    t_next: float
    needs_noise: bool  # draw fresh noise into row NOISE_ROW before the evaluations
    evaluations: tuple[CompiledEval, ...]
    save: CompiledCombo | None
    out: CompiledCombo


def compile_plan(plan: tuple[Step, ...]) -> tuple[tuple[CompiledStep, ...], int]:
    """Assign rows to evaluation registers and fold the output conversions into the coefficients.

    Returns the compiled steps and the number of rows ``regs`` needs.
    """
    last_use = _last_use(plan)
    multiplier: dict[int, float] = {}
    slot_of: dict[int, int] = {}
    free: list[int] = []
    rows = NOISE_ROW + 1
    compiled: list[CompiledStep] = []
    reg = FIRST_EVAL_REG
    for i, step in enumerate(plan):
        evals = []
        for ev in step.evaluations:
            slot = free.pop() if free else rows
            rows = max(rows, slot + 1)
            slot_of[reg] = slot
            add_input = ev.k_x != 0.0
            multiplier[reg] = ev.k_x if add_input else ev.k_p
            out_scale = ev.k_p / ev.k_x if add_input else ev.k_p
            inputs = None if ev.inputs == ((X_REG, 1.0),) else _compile(ev.inputs, slot_of, multiplier, rows)
            evals.append(CompiledEval(ev.t, inputs, slot, out_scale, add_input))
            reg += 1
        save = _compile(step.save, slot_of, multiplier, rows) if step.save is not None else None
        out = _compile(step.out, slot_of, multiplier, rows)
        compiled.append(CompiledStep(step.t_next, step.needs_noise, tuple(evals), save, out))
        for r, last in last_use.items():
            if last == i and r in slot_of:
                free.append(slot_of.pop(r))
    # pad coefficient vectors to the final row count
    return tuple(_pad(step, rows) for step in compiled), rows


def _compile(combo: Combo, slot_of: dict[int, int], multiplier: dict[int, float], rows: int) -> CompiledCombo:
    c_x = c_s = 0.0
    coef: dict[int, float] = {}
    for reg, c in combo:
        if reg == X_REG:
            c_x += c
        elif reg == S_REG:
            c_s += c
        elif reg == Z_REG:
            coef[NOISE_ROW] = coef.get(NOISE_ROW, 0.0) + c
        else:
            slot = slot_of[reg]
            coef[slot] = coef.get(slot, 0.0) + c * multiplier[reg]
    if not coef:
        return CompiledCombo(c_x, c_s, None)
    vector = [0.0] * (max(coef) + 1)
    for slot, c in coef.items():
        vector[slot] = c
    return CompiledCombo(c_x, c_s, tuple(vector))


def _pad(step: CompiledStep, rows: int) -> CompiledStep:
    def pad(c: CompiledCombo | None) -> CompiledCombo | None:
        if c is None or c.coef is None:
            return c
        return CompiledCombo(c.c_x, c.c_s, c.coef + (0.0,) * (rows - len(c.coef)))

    evals = tuple(CompiledEval(e.t, pad(e.inputs), e.slot, e.out_scale, e.add_input) for e in step.evaluations)
    return CompiledStep(step.t_next, step.needs_noise, evals, pad(step.save), pad(step.out))


def _last_use(plan: tuple[Step, ...]) -> dict[int, int]:
    """Step index of the last read of every evaluation register."""
    last: dict[int, int] = {}
    reg = FIRST_EVAL_REG
    for i, step in enumerate(plan):
        for _ in step.evaluations:
            last[reg] = i
            reg += 1
        combos = [ev.inputs for ev in step.evaluations] + [step.out] + ([step.save] if step.save else [])
        for combo in combos:
            for r, _ in combo:
                if r >= FIRST_EVAL_REG:
                    last[r] = max(last[r], i)
    return last


class Workspace:
    """Preallocated buffers, coefficient tensors and time tensors for one (shape, dtype, device)."""

    def __init__(self, steps: tuple[CompiledStep, ...], rows: int, shape: torch.Size, dtype: torch.dtype,
                 device: torch.device) -> None:
        def times(t: float) -> Tensor:
            return torch.full((shape[0],), t, dtype=dtype, device=device)

        self.eval_times = [times(e.t) for step in steps for e in step.evaluations]  # model inputs t [B]
        self.step_times = [times(step.t_next) for step in steps]  # constraint inputs t [B]
        numel = shape.numel()
        self.shape = shape
        self.regs = torch.zeros(rows, numel, dtype=dtype, device=device)
        self.regs_t = self.regs.T
        self.row_views = [self.regs[r].view(shape) for r in range(rows)]
        self.states = [torch.empty(numel, dtype=dtype, device=device) for _ in range(2)]
        self.state_views = [s.view(shape) for s in self.states]
        self.saved = [torch.empty(numel, dtype=dtype, device=device) for _ in range(2)]
        self.stage = torch.empty(numel, dtype=dtype, device=device)
        self.stage_view = self.stage.view(shape)
        self.coef: dict[tuple[float, ...], Tensor] = {}  # keyed by the coefficient tuple
        for step in steps:
            for combo in [e.inputs for e in step.evaluations] + [step.save, step.out]:
                if combo is not None and combo.coef is not None and combo.coef not in self.coef:
                    self.coef[combo.coef] = torch.tensor(combo.coef, dtype=dtype, device=device)

    def combine(self, combo: CompiledCombo, x: Tensor, s: Tensor | None, out: Tensor) -> Tensor:
        """out <- c_x x + c_s s + coef @ regs (all flat [N])."""
        if combo.coef is not None:
            torch.addmv(x, self.regs_t, self.coef[combo.coef], beta=combo.c_x, out=out)
        else:
            torch.mul(x, combo.c_x, out=out)
        if combo.c_s != 0.0:
            out.add_(s, alpha=combo.c_s)
        return out
