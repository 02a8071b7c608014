"""Timestep grids: decreasing times t_start = t[0] > ... > t[N] = t_end as float64 tensors [N + 1]."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from trajgen.diffusion.schedules import Schedule, VPDiscrete

GRIDS: tuple[str, ...] = ("time", "logsnr", "time-quadratic", "karras", "discrete")


def time_uniform(t_start: float, t_end: float, steps: int) -> Tensor:
    """Uniform in t."""
    return torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64)


def time_quadratic(t_start: float, t_end: float, steps: int) -> Tensor:
    """Uniform in sqrt(t) (DPM-Solver's 'time_quadratic'): denser near the data end."""
    return torch.linspace(math.sqrt(t_start), math.sqrt(t_end), steps + 1, dtype=torch.float64) ** 2


def logsnr_uniform(schedule: Schedule, t_start: float, t_end: float, steps: int) -> Tensor:
    """Uniform in log-SNR (DPM-Solver's 'logSNR'); needs a finite log-SNR at both ends."""
    lo, hi = float(schedule.logsnr(t_start)), float(schedule.logsnr(t_end))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"grid='logsnr' needs a finite log-SNR at t_start={t_start} and t_end={t_end} on "
                         f"{schedule!r} (got {lo}, {hi}); move t_start/t_end inside (0, 1) or use grid='time'")
    grid = schedule.t_of_logsnr(torch.linspace(lo, hi, steps + 1, dtype=torch.float64))
    grid[0], grid[-1] = t_start, t_end  # exact ends despite round-off in t_of_logsnr
    return grid


def karras(schedule: Schedule, t_start: float, t_end: float, steps: int, rho: float = 7.0) -> Tensor:
    """EDM's rho-grid (Karras et al. 2022) in the noise level s = sigma / alpha, mapped back to t.

    s_i = (s_max^(1/rho) + i/N (s_min^(1/rho) - s_max^(1/rho)))^rho.
    """
    s_max = math.exp(-0.5 * float(schedule.logsnr(t_start)))
    s_min = math.exp(-0.5 * float(schedule.logsnr(t_end)))
    if not math.isfinite(s_max):
        raise ValueError(f"grid='karras' needs alpha(t_start) > 0; t_start={t_start} on {schedule!r} has "
                         "infinite noise level: use t_start < 1 or grid='time'")
    ramp = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    s = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    grid = schedule.t_of_logsnr(-2.0 * torch.log(s))
    grid[0], grid[-1] = t_start, t_end
    return grid


def discrete_steps(schedule: Schedule, t_start: float, t_end: float, steps: int) -> Tensor:
    """Times of a discrete schedule's own training steps, evenly spaced ('trailing' spacing).

    Interior points are rounded to training steps; the ends stay exactly t_start and t_end (a truncated
    start between two steps is not moved).
    """
    if not isinstance(schedule, VPDiscrete):
        raise TypeError(f"grid='discrete' needs a VPDiscrete schedule, got {schedule!r}")
    n_start = float(schedule.step_of_time(t_start))
    n_end = float(schedule.step_of_time(t_end))
    n = torch.round(torch.linspace(n_start, n_end, steps + 1, dtype=torch.float64))
    if len(torch.unique(n)) != steps + 1:
        raise ValueError(f"grid='discrete': {steps} steps do not fit between training steps {n_start:g} and "
                         f"{n_end:g}; use fewer steps")
    grid = schedule.time_of_step(n)
    grid[0], grid[-1] = t_start, t_end
    return grid


def check_timesteps(timesteps: Tensor) -> Tensor:
    """An explicit grid as float64 [N + 1], checked: strictly decreasing, inside [0, 1]."""
    times = timesteps.detach().to("cpu", torch.float64).reshape(-1)
    if len(times) < 2 or not bool((times[1:] < times[:-1]).all()):
        raise ValueError("timesteps must be a strictly decreasing 1-D tensor of >= 2 times")
    if not (0.0 <= float(times[-1]) and float(times[0]) <= 1.0):
        raise ValueError(f"timesteps must lie in [0, 1], got [{float(times[-1])}, {float(times[0])}]")
    return times


def make_grid(schedule: Schedule, grid: str | Tensor, steps: int, t_start: float, t_end: float,
              rho: float = 7.0) -> Tensor:
    """Build the grid named ``grid`` (one of ``GRIDS``) or validate an explicit tensor of times."""
    if isinstance(grid, Tensor):
        return check_timesteps(grid)
    builders = {
        "time": lambda: time_uniform(t_start, t_end, steps),
        "time-quadratic": lambda: time_quadratic(t_start, t_end, steps),
        "logsnr": lambda: logsnr_uniform(schedule, t_start, t_end, steps),
        "karras": lambda: karras(schedule, t_start, t_end, steps, rho),
        "discrete": lambda: discrete_steps(schedule, t_start, t_end, steps),
    }
    if grid not in builders:
        raise ValueError(f"grid={grid!r} is not a timestep grid; expected one of {GRIDS} or a tensor of times")
    return builders[grid]()
