"""The one sampling entry point: integrate from (x, t_start) to t_end with a registered solver."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from trajgen.diffusion.predictions import check_prediction, convert
from trajgen.diffusion.schedules import Schedule
from trajgen.solvers.executor import NOISE_ROW, Workspace, compile_plan
from trajgen.solvers.grids import check_timesteps, make_grid
from trajgen.solvers.plan import PlanBuilder, Step, X
from trajgen.solvers.registry import build_plan, get_solver

Model = Callable[..., Tensor]
NoiseFn = Callable[[Tensor], Tensor]
Constraint = Callable[[Tensor, Tensor], Tensor]


class Sampler:
    """A solver compiled for one schedule, grid and prediction type; call it as ``sampler(model, x)``.

    Every per-step coefficient is computed once here (float64) and each update runs as one fused op over
    preallocated buffers (``trajgen.solvers.executor``), so a call costs the network evaluations plus
    about two small ops per step. ``sampler.nfe`` is the number of network calls. A Sampler reuses its
    buffers across calls: use one per thread, and do not keep the ``x_t`` tensor the model receives
    beyond the call (it is a view of a buffer the next step overwrites).

    Args:
        schedule: the noise schedule the model was trained with.
        solver: a name in ``trajgen.solvers.SOLVERS`` (``'dpmsolver++'``, ``'unipc'``, ``'ddim'``, ...).
        steps: number of grid intervals (>= 1). Singlestep solvers use ``order`` calls per interval.
        prediction: what the model outputs: 'eps', 'x0', 'v' or 'flow'.
        t_start: time of the state passed in (1.0 = pure noise; < 1 for truncated sampling).
        t_end: where to stop (default ``schedule.t_end_default``).
        order: solver order (default: the solver's recommended order).
        grid: 'time', 'logsnr', 'time-quadratic', 'karras', 'discrete' (default ``schedule.default_grid``).
        timesteps: an explicit decreasing tensor of times (overrides grid, steps, t_start, t_end).
        rho: the Karras grid's rho.
        final_denoise: after reaching t_end, return the model's x0 prediction there (one more call).
        clip_x0: clamp the model's x0 prediction to ``(low, high)`` (or ``(-c, c)`` for a number c) at every
            call before the solver uses it, as diffusers' ``clip_sample`` and Diffuser's ``clip_denoised`` do
            for data normalised to a known range. Costs a conversion to x0 and back per call (none for x0 models).
        **options: solver options (``eta`` for ddim, ``churn`` for euler/heun, ``variant`` for unipc, ...).
    """

    def __init__(self, schedule: Schedule, solver: str = "dpmsolver++", steps: int = 10, prediction: str = "eps",
                 *, t_start: float = 1.0, t_end: float | None = None, order: int | None = None,
                 grid: str | None = None, timesteps: Tensor | None = None, rho: float = 7.0,
                 final_denoise: bool = False, clip_x0: float | tuple[float, float] | None = None,
                 **options: Any) -> None:
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a trajgen.diffusion.Schedule, got {type(schedule).__name__}")
        spec = get_solver(solver)
        self.prediction = check_prediction(prediction)
        self.clip_x0 = _check_clip_range(clip_x0)
        if timesteps is not None:
            times = check_timesteps(timesteps)
        else:
            t_end = schedule.t_end_default if t_end is None else float(t_end)
            t_start = float(t_start)
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
            if not 0.0 <= t_end < t_start <= 1.0:
                raise ValueError(f"need 0 <= t_end < t_start <= 1, got t_start={t_start}, t_end={t_end}")
            times = make_grid(schedule, grid or schedule.default_grid, steps, t_start, t_end, rho)
        builder = PlanBuilder(schedule, self.prediction, times, solver)
        self.order = build_plan(spec, builder, order, options)
        if final_denoise:
            builder.step(builder.evaluate(builder.points[-1], X, "x0"), builder.times[-1])
        self.schedule, self.solver, self.options = schedule, solver, options
        self.times = times
        self.t_start, self.t_end = float(times[0]), float(times[-1])
        self.steps = len(times) - 1
        self.nfe = builder.nfe
        self.stochastic = any(step.needs_noise for step in builder.steps)
        self.plan: tuple[Step, ...] = tuple(builder.steps)
        self._compiled, self._rows = compile_plan(self.plan)
        self._workspaces: dict[tuple, Workspace] = {}

    def __repr__(self) -> str:
        return (f"Sampler(solver={self.solver!r}, order={self.order}, steps={self.steps}, nfe={self.nfe}, "
                f"t_start={self.t_start:g}, t_end={self.t_end:g}, prediction={self.prediction!r}, "
                f"schedule={self.schedule!r})")

    def __call__(self, model: Model, x: Tensor, *, noise: NoiseFn | None = None,
                 constraint: Constraint | None = None, generator: torch.Generator | None = None,
                 return_trajectory: bool = False, validate: bool = True, **cond: Any) -> Tensor | tuple[Tensor, Tensor]:
        """Integrate ``x`` [B, ...] from t_start to t_end.

        Args:
            model: ``model(x_t, t, **cond) -> Tensor`` shaped like x_t; t is a float tensor [B].
            x: the state at t_start, [B, ...] (float32 or float64; for t_start = 1 use
               ``schedule.prior_noise(shape)``).
            noise: draws fresh noise shaped like its argument (stochastic solvers); default Gaussian.
            constraint: ``constraint(x, t) -> x`` applied after every step (inpainting, projections).
            generator: random generator for the default noise.
            return_trajectory: also return the states after every step, [steps + 1, B, ...].
            validate: check the model output's shape and finiteness at every call.
        Returns:
            the state at t_end [B, ...] (and the trajectory when asked).
        """
        self._check_input(x, validate)
        model = self._clipped(model)
        noise_fn = noise or _gaussian(generator)
        trajectory = [x] if return_trajectory else None
        with torch.no_grad():  # sampling builds no graph (gradient guidance enables autograd inside its call)
            out = self._run(model, x, noise_fn, constraint, cond, validate, trajectory)
        if trajectory is not None:
            return out, torch.stack(trajectory)
        return out

    def _run(self, model: Model, x: Tensor, noise_fn: NoiseFn, constraint: Constraint | None,
             cond: dict[str, Any], validate: bool, trajectory: list[Tensor] | None) -> Tensor:
        ws = self._workspace(x)
        eval_times, step_times = ws.eval_times, ws.step_times
        shape = x.shape
        regs_t, coef, rows = ws.regs_t, ws.coef, ws.row_views
        state, state_view = x.reshape(-1), x  # read-only: the first update writes into the workspace
        saved: Tensor | None = None
        k = 0
        for i, step in enumerate(self._compiled):
            if step.needs_noise:
                rows[NOISE_ROW].copy_(noise_fn(state_view))
            for ev in step.evaluations:
                if ev.inputs is None:
                    u_view = state_view
                else:
                    ws.combine(ev.inputs, state, saved, ws.stage)
                    u_view = ws.stage_view
                out = model(u_view, eval_times[k], **cond)
                if validate and (not isinstance(out, Tensor) or out.shape != shape):
                    _raise_bad_shape(out, shape, ev.t)
                if ev.add_input:
                    torch.add(u_view, out, alpha=ev.out_scale, out=rows[ev.slot])
                else:
                    torch.mul(out, ev.out_scale, out=rows[ev.slot])
                k += 1
            if step.save is not None:
                saved = ws.combine(step.save, state, saved, ws.saved[1] if saved is ws.saved[0] else ws.saved[0])
            j = 1 if state is ws.states[0] else 0
            combo = step.out
            if combo.coef is not None and combo.c_s == 0.0:  # the common case, inlined: one fused op
                state = torch.addmv(state, regs_t, coef[combo.coef], beta=combo.c_x, out=ws.states[j])
            else:
                state = ws.combine(combo, state, saved, ws.states[j])
            state_view = ws.state_views[j]
            if constraint is not None:
                projected = constraint(state_view, step_times[i])
                if projected.data_ptr() != state.data_ptr():
                    state.copy_(projected.reshape(-1))
            if trajectory is not None:
                trajectory.append(state_view.clone())
        if validate and not _all_finite(state):
            raise ValueError("sampling produced NaN or inf: the model output contains NaN or inf (or the "
                             "state overflowed); check the model on these inputs and times")
        return state_view.clone()

    def _clipped(self, model: Model) -> Model:
        """``model`` with its x0 prediction clamped to ``clip_x0`` (``model`` itself when clipping is off)."""
        if self.clip_x0 is None:
            return model
        low, high = self.clip_x0
        schedule, prediction = self.schedule, self.prediction
        if prediction == "x0":
            return lambda x_t, t, **cond: model(x_t, t, **cond).clamp(low, high)

        def clipped(x_t: Tensor, t: Tensor, **cond: Any) -> Tensor:
            x0 = convert(model(x_t, t, **cond), x_t, t, schedule, prediction, "x0").clamp_(low, high)
            return convert(x0, x_t, t, schedule, "x0", prediction)
        return clipped

    def _workspace(self, x: Tensor) -> Workspace:
        key = (x.shape, x.dtype, x.device, torch.is_inference_mode_enabled())
        if key not in self._workspaces:
            self._workspaces[key] = Workspace(self._compiled, self._rows, x.shape, x.dtype, x.device)
        return self._workspaces[key]

    @staticmethod
    def _check_input(x: Tensor, validate: bool) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor [B, ...], got {type(x).__name__}")
        if not x.is_floating_point() or x.ndim < 1:
            raise ValueError(f"x must be a floating-point tensor [B, ...], got dtype={x.dtype}, shape={tuple(x.shape)}")
        if validate and not _all_finite(x):
            raise ValueError("x contains NaN or inf")

    def cuda_graph(self, model: Model, x: Tensor, *, noise: NoiseFn | None = None,
                   constraint: Constraint | None = None, warmup: int = 2, **cond: Any) -> GraphedSampler:
        """Capture the whole sampling loop, network included, in a CUDA graph for inputs shaped like ``x``.

        The returned callable copies new inputs into static buffers and replays the graph: one launch per
        call. Stochastic solvers draw noise from the default CUDA generator (graph-safe); a custom
        ``noise`` callable is captured as it is. ``cond`` tensors are static inputs too.
        """
        return GraphedSampler(self, model, x, noise=noise, constraint=constraint, warmup=warmup, **cond)


class GraphedSampler:
    """A :class:`Sampler` loop captured in a CUDA graph; call ``graphed(x, **cond)`` with same-shaped tensors."""

    def __init__(self, sampler: Sampler, model: Model, x: Tensor, *, noise: NoiseFn | None,
                 constraint: Constraint | None, warmup: int, **cond: Any) -> None:
        if x.device.type != "cuda":
            raise ValueError(f"cuda_graph needs x on a CUDA device, got {x.device}")
        sampler._check_input(x, True)
        self.static_x = x.clone()
        self.static_cond = {k: v.clone() if isinstance(v, Tensor) else v for k, v in cond.items()}
        noise_fn = noise or _gaussian(None)
        model = sampler._clipped(model)

        def run() -> Tensor:
            with torch.no_grad():
                return sampler._run(model, self.static_x, noise_fn, constraint, self.static_cond, False, None)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = run()

    def __call__(self, x: Tensor, **cond: Any) -> Tensor:
        """Replay on new inputs (same shapes/dtypes as at capture); returns a fresh tensor [B, ...]."""
        if x.shape != self.static_x.shape:
            raise ValueError(f"x has shape {tuple(x.shape)}, the graph was captured for {tuple(self.static_x.shape)}")
        self.static_x.copy_(x)
        for key, value in cond.items():
            if key not in self.static_cond:
                raise ValueError(f"condition {key!r} was not given at capture time")
            if isinstance(value, Tensor):
                self.static_cond[key].copy_(value)
        self.graph.replay()
        return self.static_out.clone()


def sample(model: Model, x: Tensor, *, schedule: Schedule, solver: str = "dpmsolver++", steps: int = 10,
           prediction: str = "eps", t_start: float = 1.0, t_end: float | None = None, order: int | None = None,
           grid: str | None = None, timesteps: Tensor | None = None, noise: NoiseFn | None = None,
           constraint: Constraint | None = None, generator: torch.Generator | None = None,
           return_trajectory: bool = False, final_denoise: bool = False, validate: bool = True,
           clip_x0: float | tuple[float, float] | None = None, solver_options: dict[str, Any] | None = None,
           **cond: Any) -> Tensor | tuple[Tensor, Tensor]:
    """Integrate ``x`` [B, ...] from ``t_start`` to ``t_end`` with ``solver``; returns the state at t_end.

    A one-shot form of :class:`Sampler` (see it for every argument); ``solver_options`` holds the solver's
    own options (e.g. ``{'eta': 1.0}``) and extra keywords go to the model as conditions. Build a
    :class:`Sampler` once instead when sampling repeatedly (control loops).
    """
    sampler = Sampler(schedule, solver, steps, prediction, t_start=t_start, t_end=t_end, order=order, grid=grid,
                      timesteps=timesteps, final_denoise=final_denoise, clip_x0=clip_x0, **(solver_options or {}))
    return sampler(model, x, noise=noise, constraint=constraint, generator=generator,
                   return_trajectory=return_trajectory, validate=validate, **cond)


def _check_clip_range(clip_x0: float | tuple[float, float] | None) -> tuple[float, float] | None:
    if clip_x0 is None:
        return None
    if isinstance(clip_x0, (int, float)) and not isinstance(clip_x0, bool):
        low, high = -float(clip_x0), float(clip_x0)
    elif isinstance(clip_x0, (tuple, list)) and len(clip_x0) == 2:
        low, high = float(clip_x0[0]), float(clip_x0[1])
    else:
        raise ValueError(f"clip_x0 must be None, a number c (for (-c, c)) or a pair (low, high), got {clip_x0!r}")
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"clip_x0 must give finite bounds with low < high, got {clip_x0!r}")
    return low, high


def _gaussian(generator: torch.Generator | None) -> NoiseFn:
    return lambda ref: torch.randn(ref.shape, generator=generator, dtype=ref.dtype, device=ref.device)


def _all_finite(x: Tensor) -> bool:
    """Whether every entry is finite: one reduction and one sync on the fast path."""
    return math.isfinite(float(x.sum())) or bool(torch.isfinite(x).all())


def _raise_bad_shape(out: Any, shape: torch.Size, t: float) -> None:
    got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
    raise ValueError(f"model output has shape {got} at t={t:g}; expected {tuple(shape)} (the shape of x)")
