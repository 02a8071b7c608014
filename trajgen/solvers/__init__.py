"""Fast samplers: one entry point (:func:`sample` / :class:`Sampler`) over every schedule and solver.

Solvers (``SOLVERS``): ddpm, ddim, dpmsolver (singlestep 1-3), dpmsolver++ (multistep 1-3),
dpmsolver++-2s, sde-dpmsolver++ (1-2M), deis (1-3), pndm (PLMS 1-4), unipc (bh1/bh2, 1-3), euler and heun
(EDM, optional churn), midpoint, rk4.
"""

from trajgen.solvers import ddim, deis, dpm_solver, pndm, runge_kutta, unipc  # noqa: F401  (register)
from trajgen.solvers.grids import GRIDS, karras, logsnr_uniform, make_grid, time_quadratic, time_uniform
from trajgen.solvers.registry import SOLVERS, SolverSpec, get_solver, register
from trajgen.solvers.sampler import GraphedSampler, Sampler, sample

__all__ = [
    "GRIDS", "SOLVERS", "GraphedSampler", "Sampler", "SolverSpec", "get_solver", "karras", "logsnr_uniform",
    "make_grid", "register", "sample", "time_quadratic", "time_uniform",
]
