"""Empirical convergence orders of every deterministic solver against the exact probability-flow ODE.

Problem: ``GaussianMixture.random(3, 2, seed=1)``, ``VPLinear()``, eps prediction, 16 samples from prior
noise at t = 1 to t = 1e-3 on a log-SNR grid; ground truth from
:meth:`~trajgen.diffusion.analytic.GaussianMixture.ode_reference`. Multistep solvers run with
``lower_order_final=False`` so the method's own order reaches the end. The order is
log2(err(64 steps) / err(128 steps)).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch

from trajgen.diffusion import VPLinear
from trajgen.diffusion.analytic import GaussianMixture
from trajgen.solvers import SOLVERS, Sampler

T_END = 1e-3
STEPS = (64, 128)


def run_order_benchmark(out: str | None = None) -> dict[str, Any]:
    """Rows ``{"solver", "order", "options", "steps", "rel_rmse", "empirical_order"}``; JSON to ``out``."""
    schedule = VPLinear()
    mixture = GaussianMixture.random(3, 2, seed=1)
    x = schedule.prior_noise((16, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    reference = mixture.ode_reference(schedule, x, 1.0, T_END)
    model = mixture.denoiser(schedule, "eps")
    rows = []
    for name, spec in sorted(SOLVERS.items()):
        if spec.stochastic:
            continue
        options = {"lower_order_final": False} if "lower_order_final" in spec.options else {}
        for order in spec.orders:
            errors = []
            for steps in STEPS:
                sampler = Sampler(schedule, name, steps, "eps", t_end=T_END, order=order, grid="logsnr", **options)
                out_x = sampler(model, x)
                errors.append(float((out_x - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt()))
            rows.append({"solver": name, "order": order, "options": options, "steps": list(STEPS),
                         "rel_rmse": errors, "empirical_order": math.log2(errors[0] / errors[1])})
    result = {"orders": rows, "problem": __doc__.split("\n\n")[1].replace("\n", " ")}
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
    return result


def print_order_table(result: dict[str, Any]) -> None:
    """A rich table: solver, order, errors at 64 / 128 steps, empirical order."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="empirical convergence order vs the exact ODE (64 -> 128 steps)")
    for column in ("solver", "order", "err 64", "err 128", "empirical"):
        table.add_column(column, justify="left" if column == "solver" else "right")
    for row in result["orders"]:
        table.add_row(row["solver"], str(row["order"]), f"{row['rel_rmse'][0]:.2e}", f"{row['rel_rmse'][1]:.2e}",
                      f"{row['empirical_order']:.2f}")
    Console().print(table)
