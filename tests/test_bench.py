"""Solver benchmark (trajgen.bench.solvers): JSON shape, trajgen == diffusers DPM-Solver++(2M), convergence.

One quick benchmark run is shared by the module (about 10 s on 2 cores). No assertion looks at wall time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from trajgen.bench.solvers import (
    diffusers_available,
    dpmsolver_pp2_pair,
    make_problem,
    rel_rmse,
    run_solver_benchmark,
    trajgen_variants,
)
from trajgen.solvers import Sampler

TOP_KEYS = {"accuracy", "overhead", "end_to_end", "problem", "machine"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Small batched linear algebra: one thread is as fast, and immune to OpenMP contention on busy hosts."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    """(returned result, JSON read back from --out) of one quick run."""
    out: Path = tmp_path_factory.mktemp("bench") / "solvers.json"
    returned = run_solver_benchmark(quick=True, out=str(out))
    return returned, json.loads(out.read_text())


def _positive(value: Any) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return number and math.isfinite(value) and value > 0


def test_json_file_is_the_returned_result(bench: tuple[dict, dict]) -> None:
    returned, written = bench
    assert written == json.loads(json.dumps(returned))
    assert TOP_KEYS <= set(written)


def test_accuracy_rows_have_the_documented_shape(bench: tuple[dict, dict]) -> None:
    rows = bench[1]["accuracy"]
    assert rows
    for row in rows:
        assert row["library"] in ("trajgen", "diffusers")
        assert isinstance(row["solver"], str) and row["solver"]
        assert isinstance(row["nfe"], int) and 1 <= row["nfe"] <= row["budget"]
        assert _positive(row["rel_rmse"]), row
    libraries = {row["library"] for row in rows}
    assert libraries == ({"trajgen", "diffusers"} if diffusers_available() else {"trajgen"})


def test_every_deterministic_trajgen_solver_and_order_is_scored(bench: tuple[dict, dict]) -> None:
    rows = bench[1]["accuracy"]
    variants, skipped = trajgen_variants()
    scored = {(r["solver"], r["budget"]) for r in rows if r["library"] == "trajgen"}
    for variant in variants:
        assert (variant.label, 10) in scored and (variant.label, 20) in scored, variant.label
    assert "dpmsolver++-3" in {v.label for v in variants}
    assert set(skipped) == set(bench[1]["problem"]["trajgen_skipped"])


def test_overhead_and_end_to_end_are_finite_positive(bench: tuple[dict, dict]) -> None:
    overhead, e2e = bench[1]["overhead"], bench[1]["end_to_end"]
    assert _positive(overhead["trajgen_us_per_step"])
    if diffusers_available():
        assert _positive(overhead["diffusers_us_per_step"]) and _positive(overhead["ratio"])
    assert isinstance(e2e["device"], str) and e2e["device"]
    for key in ("network_ms", "sample_ms", "ratio_to_network"):
        assert _positive(e2e[key]), key
    assert 1_000_000 <= e2e["parameters"] <= 2_000_000


def test_problem_machine_and_targets_are_described(bench: tuple[dict, dict]) -> None:
    result = bench[1]
    assert result["problem"]["batch"] >= 1 and "reference" in result["problem"]
    assert result["machine"]["torch"] == torch.__version__
    assert result["machine"]["threads_used"] >= 1 and result["end_to_end"]["threads"] >= 1
    for key in ("accuracy", "overhead", "end_to_end"):
        assert isinstance(result["targets"][key]["met"], bool)


def test_high_order_trajgen_solvers_converge_from_nfe_5_to_20(bench: tuple[dict, dict]) -> None:
    rows = [r for r in bench[1]["accuracy"] if r["library"] == "trajgen" and r["order"] >= 2]
    errors: dict[str, dict[int, float]] = {}
    for row in rows:
        errors.setdefault(row["solver"], {})[row["budget"]] = row["rel_rmse"]
    assert len(errors) >= 10
    for solver, by_budget in errors.items():
        assert by_budget[20] < by_budget[10], (solver, by_budget)
        if 5 in by_budget:
            assert by_budget[20] < 0.5 * by_budget[5], (solver, by_budget)


def test_reference_is_reached_by_a_fine_grid() -> None:
    """The DOP853 + posterior-mean reference is the limit trajgen's solvers converge to."""
    problem = make_problem(batch=8)
    sampler = Sampler(problem.schedule, "unipc", 400, "eps", order=3, t_end=0.0, grid="time-quadratic")
    x = sampler(problem.mixture.denoiser(problem.schedule, "eps"), problem.x_T.clone())
    assert rel_rmse(x, problem.x_ref) < 1e-4


@pytest.mark.parametrize("steps", [5, 10, 20])
def test_dpmsolver_pp2_matches_diffusers_on_the_same_timesteps(steps: int) -> None:
    pytest.importorskip("diffusers")
    problem = make_problem(batch=16)
    x_trajgen, x_diffusers = dpmsolver_pp2_pair(problem, steps)
    # diffusers computes its coefficients and the state in float32; trajgen in float64.
    assert rel_rmse(x_trajgen, x_diffusers) < 2e-6
    # a real discretisation error, so the match means something
    assert rel_rmse(x_trajgen, problem.x_ref) > 1e-3


def test_order_benchmark_covers_every_deterministic_solver(tmp_path):
    import json

    from trajgen.bench.orders import run_order_benchmark
    from trajgen.solvers import SOLVERS

    result = run_order_benchmark(str(tmp_path / "orders.json"))
    assert json.loads((tmp_path / "orders.json").read_text()) == result
    covered = {(row["solver"], row["order"]) for row in result["orders"]}
    assert covered == {(name, o) for name, spec in SOLVERS.items() if not spec.stochastic for o in spec.orders}
    assert all(row["rel_rmse"][1] < row["rel_rmse"][0] for row in result["orders"])
