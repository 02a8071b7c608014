"""Solver benchmark: accuracy against an exact ODE solution, per-step overhead, end-to-end cost.

Three measurements, one JSON document (see :func:`run_solver_benchmark`):

1. **accuracy** -- one fixed problem with a known answer: data from a seeded Gaussian mixture (4 components,
   D = 8), DDPM's 1000-step linear table (:meth:`VPDiscrete.linear`), the exact eps-prediction denoiser,
   x_T = prior noise at t = 1 (diffusers: timestep 999) integrated to clean data (t = 0, sigma = 0).
   Ground truth: DOP853 on the probability-flow ODE down to sigma = 1e-6, then one exact posterior-mean step
   to sigma = 0 (its error is O(sigma^2) = 1e-12). Every deterministic trajgen solver and order, and
   diffusers' DDIM, DPM-Solver++ (2M/3M), UniPC, DEIS, Euler and Heun schedulers, at NFE budgets 5/10/20,
   on the same 'trailing' grid (t_i = (n_i + 1) / 1000, n_i = 999, 999 - 1000/N, ..., then t = 0), score
   rel_rmse = ||x - x_ref|| / ||x_ref|| over the batch. trajgen solvers that cannot step to sigma = 0
   (noise prediction: dpmsolver, deis, pndm; heun/rk4, whose last stage calls the model at t = 0) run
   the time-uniform grid to t = 1/1000 instead and end with ``final_denoise=True`` (one more call).
2. **overhead** -- batch 1 on one CPU thread with a trivial model: microseconds per step of a trajgen
   ``Sampler`` call vs a diffusers ``DPMSolverMultistepScheduler`` loop, timed side by side.
3. **end_to_end** -- a 1.8M-parameter ``TemporalUnet1d`` at batch 1: a 10-step ``dpmsolver++`` sampling call
   against 10 bare network calls (CUDA graphs for both on ``device='cuda'``).
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from trajgen.bench.threads import torch_threads
from trajgen.diffusion.analytic import GaussianMixture
from trajgen.diffusion.schedules import VPDiscrete
from trajgen.nets import TemporalUnet1d, count_parameters
from trajgen.solvers import SOLVERS, Sampler

NFES: tuple[int, ...] = (5, 10, 20)
SIGMA_REF = 1e-6  # the reference ODE solve stops here; one exact posterior-mean step then reaches sigma = 0
TARGET_OVERHEAD_RATIO = 10.0
TARGET_END_TO_END_RATIO = 1.05
TIE_RTOL = 1e-5  # accuracy rows closer than this are the same algorithm up to diffusers' float32 round-off


@dataclass(frozen=True)
class Settings:
    """Sizes and repeat counts of one benchmark run."""

    batch: int
    """Accuracy problem: samples integrated at once (rel_rmse is taken over all of them)."""
    overhead_repeats: int
    """Overhead: interleaved (trajgen, diffusers) timing pairs; the median is reported."""
    e2e_repeats: int
    """End-to-end: interleaved (10 forwards, one sampling call) timing pairs."""
    warmup: int = 3
    """Untimed calls before each timing loop."""
    nfes: tuple[int, ...] = NFES
    """NFE budgets of the accuracy table."""


QUICK = Settings(batch=32, overhead_repeats=40, e2e_repeats=8, warmup=2)
FULL = Settings(batch=256, overhead_repeats=1000, e2e_repeats=150, warmup=5)


# --------------------------------------------------------------------------------------------------------
# The accuracy problem
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """A mixture, DDPM's schedule, start noise x_T [B, D] at t = 1 and the exact ODE end point x_ref [B, D].

    Holds the reference time ``t_ref`` (sigma = SIGMA_REF) and a JSON-ready ``config``.
    """

    mixture: GaussianMixture
    schedule: VPDiscrete
    x_T: Tensor
    x_ref: Tensor
    t_ref: float
    config: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """JSON-ready description of the problem and of the reference solution."""
        sigma_ref = float(self.schedule.sigma(torch.tensor(self.t_ref, dtype=torch.float64)))
        return {
            **self.config,
            "batch": self.x_T.shape[0],
            "schedule": "VPDiscrete.linear() (DDPM: 1000 steps, betas 1e-4 -> 0.02); "
                        "step n at t = (n+1)/1000",
            "prediction": "eps (exact: GaussianMixture.posterior_mean converted to eps)",
            "start": "x_T = schedule.prior_noise at t = 1 (diffusers: timestep 999), float64",
            "end": "t = 0 (alpha = 1, sigma = 0: clean data)",
            "grid": "trailing: t_i = (n_i + 1) / 1000 with n_i = 999, 999 - 1000/N, ..., then t = 0 "
                    "(trajgen: the schedule's default grid='discrete', t_end=0; diffusers timestep_spacing='trailing'); "
                    "trajgen rows with end='final_denoise' use grid='discrete' from step 999 to step 0 "
                    "(t = 1/1000) plus one x0 call there",
            "reference": f"DOP853 (rtol 1e-11, atol 1e-13) on the probability-flow ODE from t = 1 to "
                         f"t = {self.t_ref:.3g} (sigma = {sigma_ref:.3g}), then one exact posterior-mean "
                         "step to sigma = 0 (error O(sigma^2) ~ 1e-12)",
            "metric": "rel_rmse = ||x - x_ref|| / ||x_ref|| (Frobenius over the batch)",
        }


def make_problem(batch: int, seed: int = 0, components: int = 4, dim: int = 8) -> Problem:
    """Build the fixed problem: x_T [batch, dim] and its exact end point x_ref [batch, dim] (float64)."""
    schedule = VPDiscrete.linear()
    mixture = GaussianMixture.random(components, dim, scale=1.0, std=0.4, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    x_T = schedule.prior_noise((batch, dim), generator=generator, dtype=torch.float64)
    t_ref = float(schedule.t_of_logsnr(torch.tensor(-2.0 * math.log(SIGMA_REF), dtype=torch.float64)))
    x_small = mixture.ode_reference(schedule, x_T, 1.0, t_ref)
    tt = torch.tensor(t_ref, dtype=torch.float64)
    x_ref = mixture.posterior_mean(x_small, schedule.alpha(tt), schedule.sigma(tt))
    config = {"mixture": f"GaussianMixture.random(components={components}, dim={dim}, scale=1.0, std=0.4, "
                         f"seed={seed})", "noise_seed": seed + 1}
    return Problem(mixture, schedule, x_T, x_ref, t_ref, config)


def rel_rmse(x: Tensor, ref: Tensor) -> float:
    """||x - ref|| / ||ref|| over all entries (x, ref [B, ...])."""
    return float((x.double() - ref.double()).norm() / ref.double().norm())


# --------------------------------------------------------------------------------------------------------
# trajgen accuracy
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One trajgen configuration of the accuracy table."""

    label: str
    solver: str
    order: int
    options: dict[str, Any] = field(default_factory=dict)


def trajgen_variants() -> tuple[list[Variant], list[str]]:
    """Every deterministic registered solver at every order (plus 3M with the 2S warm-up); skipped names."""
    variants, skipped = [], []
    for name, spec in SOLVERS.items():
        if spec.stochastic:
            skipped.append(name)
            continue
        for order in spec.orders:
            variants.append(Variant(name if len(spec.orders) == 1 else f"{name}-{order}", name, order))
    if "dpmsolver++" in SOLVERS:
        variants.append(Variant("dpmsolver++-3 (2S warm-up)", "dpmsolver++", 3, {"warmup": "singlestep"}))
    return variants, skipped


# How a run reaches t = 0: straight there, or (noise-prediction solvers, which cannot step to sigma = 0)
# to the schedule's default t_end = 1/1000 and then one extra call returning the x0 prediction.
ENDINGS: dict[str, dict[str, Any]] = {
    "t_end=0": {"t_end": 0.0},
    "final_denoise": {"final_denoise": True},
}


def sampler_within_budget(problem: Problem, variant: Variant, budget: int, ending: str) -> Sampler | None:
    """The Sampler with the most steps whose NFE fits ``budget`` (None if even one step does not)."""
    for steps in range(budget, 0, -1):
        sampler = Sampler(problem.schedule, variant.solver, steps, "eps", order=variant.order,
                          **ENDINGS[ending], **variant.options)
        if sampler.nfe <= budget:
            return sampler
    return None


def run_trajgen_variant(problem: Problem, variant: Variant, budget: int,
                        notes: dict[str, str]) -> dict | None:
    """One accuracy row (or None when the budget is too small); records a fallback's reason in ``notes``."""
    model = problem.mixture.denoiser(problem.schedule, "eps")
    for ending in ENDINGS:
        stage = "building the plan"
        try:
            sampler = sampler_within_budget(problem, variant, budget, ending)
            if sampler is None:
                return None
            stage = "calling the model"
            x = sampler(model, problem.x_T.clone())
        except ValueError as error:
            notes.setdefault(variant.label, f"{ending}: {stage}: {str(error).splitlines()[0]}")
            continue
        end = ending if ending == "t_end=0" else f"final_denoise (t_end={sampler.t_end:g})"
        return {"library": "trajgen", "solver": variant.label, "order": variant.order, "nfe": sampler.nfe,
                "budget": budget, "steps": sampler.steps, "end": end, "rel_rmse": rel_rmse(x, problem.x_ref)}
    return None


def trajgen_accuracy(problem: Problem, nfes: tuple[int, ...]) -> tuple[list[dict], dict[str, str]]:
    """Accuracy rows of every trajgen variant at every budget, and notes on the endings that failed."""
    variants, _ = trajgen_variants()
    rows, notes = [], {}
    for variant in variants:
        for budget in nfes:
            row = run_trajgen_variant(problem, variant, budget, notes)
            if row is not None:
                rows.append(row)
    return rows, notes


# --------------------------------------------------------------------------------------------------------
# diffusers accuracy
# --------------------------------------------------------------------------------------------------------

DIFFUSERS_BASE: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
    "prediction_type": "epsilon", "timestep_spacing": "trailing",
}
DIFFUSERS_SOLVERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {"set_alpha_to_one": True, "clip_sample": False}),
    "dpmsolver++-2": ("DPMSolverMultistepScheduler",
                      {"solver_order": 2, "algorithm_type": "dpmsolver++", "final_sigmas_type": "zero"}),
    "dpmsolver++-3": ("DPMSolverMultistepScheduler",
                      {"solver_order": 3, "algorithm_type": "dpmsolver++", "final_sigmas_type": "zero"}),
    "unipc-2": ("UniPCMultistepScheduler",
                {"solver_order": 2, "solver_type": "bh2", "final_sigmas_type": "zero"}),
    "unipc-3": ("UniPCMultistepScheduler",
                {"solver_order": 3, "solver_type": "bh2", "final_sigmas_type": "zero"}),
    "deis-2": ("DEISMultistepScheduler", {"solver_order": 2}),
    "deis-3": ("DEISMultistepScheduler", {"solver_order": 3}),
    "euler": ("EulerDiscreteScheduler", {"final_sigmas_type": "zero"}),
    "heun": ("HeunDiscreteScheduler", {}),
}
# Schedulers in EDM's sigma = sqrt((1 - a_bar) / a_bar) variables: the state is x / alpha and the model
# input is scaled back by scale_model_input; the timesteps they pass may be fractional.
SIGMA_SCHEDULERS = frozenset({"EulerDiscreteScheduler", "HeunDiscreteScheduler"})
DIFFUSERS_NOTES = {
    "deis-2": "DEISMultistepScheduler has no final_sigmas_type: it ends at training step 0 "
              "(sigma = sqrt(1 - a_bar[0]) = 0.01), not at sigma = 0",
    "deis-3": "as deis-2",
    "heun": "HeunDiscreteScheduler: N steps = 2N - 1 calls (the last step, to sigma = 0, is Euler)",
}


def diffusers_available() -> bool:
    """Whether ``diffusers`` can be imported."""
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return False
    return True


def make_scheduler(label: str) -> Any:
    """A fresh diffusers scheduler for ``label`` (a key of ``DIFFUSERS_SOLVERS``)."""
    import diffusers

    cls_name, extra = DIFFUSERS_SOLVERS[label]
    return getattr(diffusers, cls_name)(**DIFFUSERS_BASE, **extra)


def diffusers_model(mixture: GaussianMixture, scheduler: Any) -> Callable[[Tensor, Tensor], Tensor]:
    """The exact eps model for ``scheduler``'s current state: ``model(x [B, D], timestep) -> eps [B, D]``.

    VP schedulers pass integer timesteps n and the unscaled x_t: alpha^2 = a_bar[n] from the scheduler's
    own table. Euler/Heun keep x / alpha and scale the input back with ``scale_model_input``; there alpha
    comes from the scheduler's current sigma (alpha = 1 / sqrt(1 + sigma^2), sigma_vp = sigma * alpha).
    """
    sigma_space = type(scheduler).__name__ in SIGMA_SCHEDULERS

    def model(x: Tensor, timestep: Tensor) -> Tensor:
        x_in = scheduler.scale_model_input(x, timestep)
        if sigma_space:
            level = float(scheduler.sigmas[scheduler.step_index])
            alpha = 1.0 / math.sqrt(1.0 + level**2)
            sigma = level * alpha
        else:
            a_bar = float(scheduler.alphas_cumprod[int(timestep)])
            alpha, sigma = math.sqrt(a_bar), math.sqrt(1.0 - a_bar)
        x0 = mixture.posterior_mean(x_in, torch.tensor(alpha), torch.tensor(sigma))
        return (x_in - alpha * x0) / sigma

    return model


def steps_within_budget(label: str, budget: int) -> tuple[Any, int] | None:
    """(scheduler after set_timesteps, steps) with the most steps whose model calls fit ``budget``."""
    scheduler = make_scheduler(label)
    for steps in range(budget, 0, -1):
        scheduler.set_timesteps(steps)
        if len(scheduler.timesteps) <= budget:
            return scheduler, steps
    return None


def run_diffusers_loop(mixture: GaussianMixture, scheduler: Any, x_T: Tensor) -> tuple[Tensor, int]:
    """The standard pipeline loop from x_T [B, D] (VP state at t = 1); returns (x at the end, NFE)."""
    model = diffusers_model(mixture, scheduler)
    # EDM-style schedulers hold x / alpha: scale by 1 / alpha(999) = sqrt(1 + sigma_max^2).
    sigma_space = type(scheduler).__name__ in SIGMA_SCHEDULERS
    scale = math.sqrt(1.0 + float(scheduler.sigmas[0]) ** 2) if sigma_space else 1.0
    x, nfe = x_T.clone() * scale, 0
    for timestep in scheduler.timesteps:
        x = scheduler.step(model(x, timestep), timestep, x).prev_sample
        nfe += 1
    return x, nfe


def diffusers_accuracy(problem: Problem, nfes: tuple[int, ...]) -> list[dict]:
    """Accuracy rows of every diffusers scheduler in ``DIFFUSERS_SOLVERS`` at every budget."""
    rows = []
    for label in DIFFUSERS_SOLVERS:
        for budget in nfes:
            found = steps_within_budget(label, budget)
            if found is None:
                continue
            scheduler, steps = found
            x, nfe = run_diffusers_loop(problem.mixture, scheduler, problem.x_T)
            rows.append({"library": "diffusers", "solver": label, "nfe": nfe, "budget": budget,
                         "steps": steps, "rel_rmse": rel_rmse(x, problem.x_ref)})
    return rows


def diffusers_configs() -> dict[str, dict[str, Any]]:
    """The scheduler configs used (JSON-ready)."""
    return {label: {"class": cls_name, **DIFFUSERS_BASE, **extra, **({"note": DIFFUSERS_NOTES[label]}
                    if label in DIFFUSERS_NOTES else {})}
            for label, (cls_name, extra) in DIFFUSERS_SOLVERS.items()}


def same_grid_pair(problem: Problem, label: str, solver: str, order: int, steps: int,
                   **options: Any) -> tuple[Tensor, Tensor]:
    """trajgen ``solver`` and diffusers scheduler ``label`` on identical timesteps: ([B, D], [B, D]).

    diffusers' integer steps n map to trajgen times (n + 1) / 1000, followed by t = 0.
    """
    scheduler = make_scheduler(label)
    scheduler.set_timesteps(steps)
    times = torch.cat([(scheduler.timesteps.double() + 1.0) / 1000.0, torch.zeros(1, dtype=torch.float64)])
    sampler = Sampler(problem.schedule, solver, steps, "eps", order=order, timesteps=times, **options)
    x_trajgen = sampler(problem.mixture.denoiser(problem.schedule, "eps"), problem.x_T.clone())
    x_diffusers, _ = run_diffusers_loop(problem.mixture, scheduler, problem.x_T)
    return x_trajgen, x_diffusers


def dpmsolver_pp2_pair(problem: Problem, steps: int) -> tuple[Tensor, Tensor]:
    """trajgen ``dpmsolver++`` order 2 and diffusers DPM-Solver++(2M) on the same timesteps.

    Returns (x_trajgen [B, D], x_diffusers [B, D]).
    """
    return same_grid_pair(problem, "dpmsolver++-2", "dpmsolver++", 2, steps)


# (diffusers label, trajgen solver, order, steps, trajgen options, what to expect)
SAME_GRID_CHECKS: tuple[tuple[str, str, int, int, dict[str, Any], str], ...] = (
    ("dpmsolver++-2", "dpmsolver++", 2, 10, {}, "agree (float32 round-off in diffusers)"),
    ("unipc-2", "unipc", 2, 10, {}, "agree"),
    ("dpmsolver++-3", "dpmsolver++", 3, 10, {},
     ("differ: trajgen's 3M uses 2 * phi_3 * D2 (Taylor-consistent, third order); diffusers and the "
     "DPM-Solver reference code use phi_3 * D2")),
    ("unipc-3", "unipc", 3, 20, {}, "agree (both lower the order of the final steps by default)"),
    ("unipc-3", "unipc", 3, 20, {"lower_order_final": False},
     "differ: trajgen with lower_order_final=False keeps order 3 to the end"),
)


# --------------------------------------------------------------------------------------------------------
# Timing helpers
# --------------------------------------------------------------------------------------------------------


def _elapsed(fn: Callable[[], Any], sync: Callable[[], None] | None = None) -> float:
    """Wall seconds of one ``fn()`` (bracketed by ``sync`` when given, e.g. torch.cuda.synchronize)."""
    if sync:
        sync()
    start = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - start


def interleaved_times(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int,
                      setup: dict[str, Callable[[], Any]] | None = None,
                      sync: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Wall seconds [repeats] of each ``fns[name]()``, timed in turn within every repeat (so drift hits all)
    in a freshly shuffled order each repeat (so no function always runs right after the same other one,
    whose cache and branch-predictor footprint it would inherit).

    ``setup[name]()`` runs untimed before each timed call.
    """
    setup = setup or {}
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    shuffler = random.Random(0)
    for i in range(warmup + repeats):
        shuffler.shuffle(order)
        for name in order:
            fn = fns[name]
            if name in setup:
                setup[name]()
            seconds = _elapsed(fn, sync)
            if i >= warmup:
                times[name].append(seconds)
    return times


def interleaved_medians(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int,
                        setup: dict[str, Callable[[], Any]] | None = None,
                        sync: Callable[[], None] | None = None) -> dict[str, float]:
    """Median wall seconds of each ``fns[name]()`` over interleaved repeats (:func:`interleaved_times`)."""
    times = interleaved_times(fns, repeats, warmup, setup, sync)
    return {name: statistics.median(values) for name, values in times.items()}


# --------------------------------------------------------------------------------------------------------
# Overhead
# --------------------------------------------------------------------------------------------------------

OVERHEAD_STEPS = 20
OVERHEAD_SHAPE = (1, 16, 4)


def trivial_model(x: Tensor, t: Tensor) -> Tensor:
    """A model that costs almost nothing and returns a fresh tensor: x [B, ...] -> 0.5 x."""
    return x * 0.5


def measure_overhead(settings: Settings) -> dict[str, Any]:
    """Per-step microseconds of trajgen's Sampler vs diffusers' DPM-Solver++ loop (batch 1, one thread)."""
    schedule = VPDiscrete.linear()
    x = torch.randn(OVERHEAD_SHAPE, generator=torch.Generator().manual_seed(0))
    sampler = Sampler(schedule, "dpmsolver++", OVERHEAD_STEPS, "eps")
    fns: dict[str, Callable[[], Any]] = {
        "trajgen": lambda: sampler(trivial_model, x),
        "trajgen_no_validate": lambda: sampler(trivial_model, x, validate=False),
    }
    setup: dict[str, Callable[[], Any]] = {}
    if diffusers_available():
        scheduler = make_scheduler("dpmsolver++-2")
        fns["diffusers"] = lambda: _diffusers_trivial_loop(scheduler, x)
        fns["diffusers_set_timesteps"] = lambda: scheduler.set_timesteps(OVERHEAD_STEPS)
        setup["diffusers"] = lambda: scheduler.set_timesteps(OVERHEAD_STEPS)  # resets its state, untimed
    with torch_threads(1), torch.inference_mode():
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            med = interleaved_medians(fns, settings.overhead_repeats, settings.warmup, setup)
        finally:
            if gc_was_enabled:
                gc.enable()
    return _overhead_result(med)


def _diffusers_trivial_loop(scheduler: Any, x: Tensor) -> Tensor:
    """The diffusers pipeline loop with the trivial model (set_timesteps already called)."""
    for timestep in scheduler.timesteps:
        x = scheduler.step(trivial_model(x, timestep), timestep, x).prev_sample
    return x


def _overhead_result(med: dict[str, float]) -> dict[str, Any]:
    """Turn median seconds per 20-step call into the JSON's per-step microseconds."""
    per_step = {name: 1e6 * seconds / OVERHEAD_STEPS for name, seconds in med.items()}
    result: dict[str, Any] = {
        "trajgen_us_per_step": per_step["trajgen"],
        "diffusers_us_per_step": per_step.get("diffusers"),
        "ratio": per_step["diffusers"] / per_step["trajgen"] if "diffusers" in per_step else None,
        "trajgen_no_validate_us_per_step": per_step["trajgen_no_validate"],
        "diffusers_set_timesteps_us": 1e6 * med["diffusers_set_timesteps"] if "diffusers" in med else None,
        "setup": f"batch 1, x {list(OVERHEAD_SHAPE)} float32, model = lambda x, t: x * 0.5, "
                 f"{OVERHEAD_STEPS} steps, torch.set_num_threads(1), inference_mode, gc off; trajgen: "
                 f"Sampler(VPDiscrete.linear(), 'dpmsolver++', {OVERHEAD_STEPS}, 'eps') called with default "
                 "validate=True (also reported without); diffusers: DPMSolverMultistepScheduler (order 2, "
                 "trailing, final_sigmas_type='zero'), set_timesteps before each timed loop but outside "
                 "the timer (its own cost reported separately), then scheduler.step(model(x, t), t, x)"
                 ".prev_sample per step; medians over interleaved repeats",
    }
    return result


# --------------------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------------------

E2E_STEPS = 10
E2E_HORIZON = 16
E2E_IN_DIM = 4


def make_network(device: torch.device) -> TemporalUnet1d:
    """The 1.8M-parameter TemporalUnet1d (in_dim 4, base 32, mults 1-2-4) in eval mode on ``device``."""
    torch.manual_seed(0)
    return TemporalUnet1d(E2E_IN_DIM, base_dim=32, dim_mults=(1, 2, 4)).eval().to(device)


def measure_end_to_end(settings: Settings, device: str = "cpu") -> dict[str, Any]:
    """Median ms of one network forward vs one 10-step dpmsolver++ sampling call, batch 1."""
    use_cuda = device.startswith("cuda") and torch.cuda.is_available()
    dev = torch.device(device if use_cuda else "cpu")
    net = make_network(dev)
    schedule = VPDiscrete.linear()
    sampler = Sampler(schedule, "dpmsolver++", E2E_STEPS, "eps")
    with torch.inference_mode():
        generator = torch.Generator().manual_seed(0)
        x = schedule.prior_noise((1, E2E_HORIZON, E2E_IN_DIM), generator=generator).to(dev)
        t = torch.full((1,), 0.5, device=dev)
        if use_cuda:
            forward, sample, mode = _cuda_callables(net, sampler, x, t)
        else:
            forward, sample, mode = (lambda: net(x, t)), (lambda: sampler(net, x)), "eager"

        def ten_forwards() -> None:  # the same network work as one sampling call
            for _ in range(E2E_STEPS):
                forward()

        times = interleaved_times({"network": ten_forwards, "sample": sample}, settings.e2e_repeats,
                                  settings.warmup, sync=torch.cuda.synchronize if use_cuda else None)
    network_ms = 1e3 * statistics.median(times["network"]) / E2E_STEPS
    sample_ms = 1e3 * statistics.median(times["sample"])
    paired = statistics.median(s / n for s, n in zip(times["sample"], times["network"], strict=True))
    of_minimums = min(times["sample"]) / min(times["network"])
    return {
        "device": str(dev) if not use_cuda else torch.cuda.get_device_name(dev),
        "network_ms": network_ms, "sample_ms": sample_ms,
        "ratio_to_network": sample_ms / (E2E_STEPS * network_ms),
        "paired_ratio_median": paired, "ratio_of_minimums": of_minimums, "repeats": settings.e2e_repeats,
        "mode": mode, "requested_device": device, "parameters": count_parameters(net),
        "network": f"TemporalUnet1d(in_dim={E2E_IN_DIM}, base_dim=32, dim_mults=(1, 2, 4)), eval, "
                   "inference_mode",
        "input": f"batch 1, x [1, {E2E_HORIZON}, {E2E_IN_DIM}] float32",
        "sampler": f"Sampler(VPDiscrete.linear(), 'dpmsolver++', {E2E_STEPS}, 'eps') (NFE {sampler.nfe})",
        "threads": torch.get_num_threads(),
        **({"note": f"device={device!r} requested but CUDA is not available: ran on CPU"}
           if device.startswith("cuda") and not use_cuda else {}),
    }


def _cuda_callables(net: TemporalUnet1d, sampler: Sampler, x: Tensor,
                    t: Tensor) -> tuple[Callable, Callable, str]:
    """(graph-replayed forward, graphed sampler call, mode) for CUDA timing (call inside inference_mode)."""
    static_x, static_t = x.clone(), t.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            net(static_x, static_t)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        net(static_x, static_t)
    graphed = sampler.cuda_graph(net, x)
    return graph.replay, (lambda: graphed(x)), "cuda-graph (forward and sampler both captured)"


# --------------------------------------------------------------------------------------------------------
# Targets, machine, the whole run
# --------------------------------------------------------------------------------------------------------


def best_by_budget(rows: list[dict], library: str, budget: int) -> dict | None:
    """The lowest-error row of ``library`` within NFE ``budget``."""
    candidates = [r for r in rows if r["library"] == library and r["budget"] == budget]
    return min(candidates, key=lambda r: r["rel_rmse"]) if candidates else None


def evaluate_targets(result: dict[str, Any], nfes: tuple[int, ...]) -> dict[str, Any]:
    """Met / not met for each target, with the numbers behind it."""
    per_nfe = {}
    for budget in nfes:
        ours, theirs = best_by_budget(result["accuracy"], "trajgen", budget), best_by_budget(
            result["accuracy"], "diffusers", budget)
        per_nfe[str(budget)] = {
            "trajgen_best": ours and {k: ours[k] for k in ("solver", "nfe", "rel_rmse")},
            "diffusers_best": theirs and {k: theirs[k] for k in ("solver", "nfe", "rel_rmse")},
            "met": bool(ours and (theirs is None or ours["rel_rmse"] <= theirs["rel_rmse"] * (1 + TIE_RTOL))),
            "tie": bool(ours and theirs
                        and abs(ours["rel_rmse"] - theirs["rel_rmse"]) <= TIE_RTOL * theirs["rel_rmse"]),
        }
    ratio = result["overhead"]["ratio"]
    e2e = result["end_to_end"]["ratio_to_network"]
    return {
        "accuracy": {"target": f"at every NFE budget, trajgen's best rel_rmse <= diffusers' best "
                               f"(within {TIE_RTOL:g} relative: a tie)",
                     "met": all(v["met"] for v in per_nfe.values()), "per_nfe": per_nfe},
        "overhead": {"target": f"diffusers / trajgen per-step time >= {TARGET_OVERHEAD_RATIO:g}",
                     "value": ratio, "met": ratio is not None and ratio >= TARGET_OVERHEAD_RATIO},
        "end_to_end": {"target": f"sample_ms / (10 network_ms) <= {TARGET_END_TO_END_RATIO}",
                       "value": e2e, "met": e2e <= TARGET_END_TO_END_RATIO},
    }


def machine_info() -> dict[str, Any]:
    """Versions and hardware the numbers were taken on."""
    info: dict[str, Any] = {
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "torch_threads_default": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if diffusers_available():
        import diffusers

        info["diffusers"] = diffusers.__version__
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_solver_benchmark(quick: bool, out: str | None, device: str = "cpu", *,
                         threads: int = 1) -> dict[str, Any]:
    """Run accuracy, overhead and end-to-end; write JSON to ``out`` (when given) and return it.

    ``threads``: torch intra-op threads for the accuracy and CPU end-to-end parts (the overhead part always
    uses 1). The default 1 keeps batch-1 timings stable: at this size extra threads buy little, and on a
    busy machine OpenMP threads waiting on each other can make a forward pass 100x slower.

    Returns ``{"accuracy": [{library, solver, nfe, rel_rmse, budget, steps, ...}], "overhead": {...},
    "end_to_end": {...}, "problem": {...}, "machine": {...}, "checks": {...}, "targets": {...}}``.
    """
    settings = QUICK if quick else FULL
    machine = machine_info()
    with torch_threads(threads):
        result = _run(settings, device)
    result["machine"] = {**machine, "threads_used": threads}
    result["quick"] = quick
    result["targets"] = evaluate_targets(result, settings.nfes)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
    return result


def _run(settings: Settings, device: str) -> dict[str, Any]:
    """The three measurements and the same-grid checks (without targets and machine), showing the phase
    in a rich status line on stderr."""
    from rich.console import Console

    with Console(stderr=True).status("solver benchmark: ground truth (DOP853)") as status:
        problem = make_problem(settings.batch)
        status.update("solver benchmark: trajgen accuracy")
        rows, notes = trajgen_accuracy(problem, settings.nfes)
        _, skipped = trajgen_variants()
        has_diffusers = diffusers_available()
        if has_diffusers:
            status.update("solver benchmark: diffusers accuracy")
            rows += diffusers_accuracy(problem, settings.nfes)
        status.update("solver benchmark: per-step overhead")
        overhead = measure_overhead(settings)
        status.update("solver benchmark: end to end")
        end_to_end = measure_end_to_end(settings, device)
        status.update("solver benchmark: same-grid checks")
        checks = _checks(problem, has_diffusers)
    return {
        "accuracy": rows,
        "overhead": overhead,
        "end_to_end": end_to_end,
        "problem": {**problem.describe(), "nfe_budgets": list(settings.nfes),
                    "trajgen_skipped": {name: "stochastic (no ODE ground truth)" for name in skipped},
                    "trajgen_fallbacks": notes,
                    "diffusers": diffusers_configs() if has_diffusers else "not installed"},
        "checks": checks,
    }


def _checks(problem: Problem, has_diffusers: bool) -> dict[str, Any]:
    """trajgen vs diffusers on identical timesteps: relative difference of the end states."""
    if not has_diffusers:
        return {}
    checks = {}
    for label, solver, order, steps, options, expect in SAME_GRID_CHECKS:
        x_t, x_d = same_grid_pair(problem, label, solver, order, steps, **options)
        extra = "".join(f", {k}={v}" for k, v in options.items())
        checks[f"trajgen {solver} order {order}{extra} vs diffusers {label}, {steps} steps"] = {
            "rel_diff": rel_rmse(x_t, x_d), "expected": expect}
    return checks


# --------------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------------


def print_solver_tables(result: dict[str, Any], console: Any = None) -> None:
    """Print the accuracy pivots, overhead, end-to-end and target lines with rich."""
    from rich.console import Console

    console = console or (Console() if sys.stdout.isatty() else Console(width=120))  # 120 columns in logs
    budgets = result["problem"]["nfe_budgets"]
    for library in ("trajgen", "diffusers"):
        rows = [r for r in result["accuracy"] if r["library"] == library]
        if rows:
            console.print(_accuracy_table(library, rows, budgets))
    if result.get("problem", {}).get("trajgen_fallbacks"):
        console.print(_notes_table(result["problem"]["trajgen_fallbacks"]))
    if result.get("checks"):
        console.print(_checks_table(result["checks"]))
    console.print(_overhead_table(result["overhead"]))
    console.print(_e2e_table(result["end_to_end"]))
    _print_targets(console, result["targets"])


def _accuracy_table(library: str, rows: list[dict], budgets: list[int]) -> Any:
    from rich.table import Table

    table = Table(title=f"{library}: rel_rmse to the exact ODE solution "
                        "(actual NFE in brackets when below budget)")
    table.add_column("solver")
    for budget in budgets:
        table.add_column(f"NFE {budget}", justify="right")
    best = {b: min((r["rel_rmse"] for r in rows if r["budget"] == b), default=None) for b in budgets}
    for solver in dict.fromkeys(r["solver"] for r in rows):
        cells = []
        for budget in budgets:
            row = next((r for r in rows if r["solver"] == solver and r["budget"] == budget), None)
            cells.append(_accuracy_cell(row, best[budget]))
        table.add_row(solver, *cells)
    return table


def _accuracy_cell(row: dict | None, best: float | None) -> str:
    if row is None:
        return "-"
    text = f"{row['rel_rmse']:.3e}" + (f" ({row['nfe']})" if row["nfe"] != row["budget"] else "")
    return f"[bold green]{text}[/]" if row["rel_rmse"] == best else text


def _notes_table(notes: dict[str, str]) -> Any:
    from rich.table import Table

    table = Table(title="trajgen: t_end=0 raised, so these ran to t = 1/1000 with final_denoise=True")
    table.add_column("solvers")
    table.add_column("what raised with t_end=0 (first clause)")
    grouped: dict[str, list[str]] = {}
    for solver, why in notes.items():
        grouped.setdefault(why.split(";")[0], []).append(solver)
    for why, solvers in grouped.items():
        table.add_row(", ".join(solvers), why.removeprefix("t_end=0: "))
    return table


def _checks_table(checks: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title="same timesteps, trajgen vs diffusers: relative difference of the end states")
    table.add_column("pair")
    table.add_column("rel diff", justify="right")
    table.add_column("expected")
    for name, check in checks.items():
        table.add_row(name, f"{check['rel_diff']:.1e}", check["expected"])
    return table


def _overhead_table(overhead: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title="overhead per step (batch 1, trivial model, 1 thread, 20 steps)")
    table.add_column("loop")
    table.add_column("us / step", justify="right")
    table.add_row("trajgen Sampler (validate=True)", f"{overhead['trajgen_us_per_step']:.2f}")
    table.add_row("trajgen Sampler (validate=False)", f"{overhead['trajgen_no_validate_us_per_step']:.2f}")
    if overhead.get("diffusers_us_per_step") is not None:
        table.add_row("diffusers DPMSolverMultistep", f"{overhead['diffusers_us_per_step']:.2f}")
        table.add_row("diffusers set_timesteps (once, us)", f"{overhead['diffusers_set_timesteps_us']:.1f}")
        table.add_row("ratio diffusers / trajgen", f"{overhead['ratio']:.1f}x")
    return table


def _e2e_table(e2e: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title=f"end to end: {e2e['parameters'] / 1e6:.2f}M-param TemporalUnet1d, batch 1, "
                        f"{e2e['device']} ({e2e['mode']})")
    for name in ("network ms", "10-step sample ms", "ratio (medians)", "paired ratios, median",
                 "ratio of minimums"):
        table.add_column(name, justify="right")
    table.add_row(f"{e2e['network_ms']:.3f}", f"{e2e['sample_ms']:.3f}", f"{e2e['ratio_to_network']:.3f}",
                  f"{e2e['paired_ratio_median']:.3f}", f"{e2e['ratio_of_minimums']:.3f}")
    return table


def _print_targets(console: Any, targets: dict[str, Any]) -> None:
    def verdict(met: bool) -> str:
        return "[bold green]met[/]" if met else "[bold red]NOT met[/]"

    acc = targets["accuracy"]
    console.print(f"target accuracy ({acc['target']}): {verdict(acc['met'])}")
    for budget, v in acc["per_nfe"].items():
        ours, theirs = v["trajgen_best"], v["diffusers_best"]
        theirs_text = f"diffusers {theirs['solver']} {theirs['rel_rmse']:.6e}" if theirs else "diffusers -"
        tie = " (tie: the same algorithm in both)" if v["tie"] else ""
        console.print(f"  NFE {budget}: trajgen {ours['solver']} {ours['rel_rmse']:.6e} vs {theirs_text}: "
                      f"{verdict(v['met'])}{tie}")
    for key in ("overhead", "end_to_end"):
        target = targets[key]
        value = "n/a" if target["value"] is None else f"{target['value']:.3f}"
        console.print(f"target {key} ({target['target']}): {value} -> {verdict(target['met'])}")
