"""The driving benchmark pipeline (quick sizes), its statistics and the simulator throughput probe."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trajgen.bench.driving import (
    DrivingBenchConfig,
    _pool,
    check_targets,
    ensure_data,
    held_out_scene_seeds,
    mean_se,
    remeasure_latency,
    run_driving_benchmark,
    split_seeds,
    train_policy,
)
from trajgen.bench.driving_speed import trajgen_throughput
from trajgen.envs.driving.collect import split_of_seed
from trajgen.policies.driving import DrivingSamples, RegressionPolicy


def test_pooled_mean_and_se_equal_those_of_the_concatenation() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.2, 1.0, 40), rng.normal(0.9, 0.5, 40)
    pooled = _pool([mean_se(a), mean_se(b)])
    direct = mean_se(np.concatenate([a, b]))
    assert pooled["n"] == 80
    np.testing.assert_allclose(pooled["mean"], direct["mean"], rtol=1e-12)
    np.testing.assert_allclose(pooled["se"], direct["se"], rtol=1e-12)


def test_held_out_scene_seeds_are_test_split_and_outside_collection_seeds() -> None:
    seeds = held_out_scene_seeds(50, seed=0)
    assert seeds.size == 50 and np.unique(seeds).size == 50
    assert (split_of_seed(seeds, 0.1) == 1).all()
    assert (seeds >= 2**31).all()  # collections draw scene seeds below 2**31


def _result(pdms_open: float, pdms_closed: float, latency: float, diversity: float) -> dict:
    return {"open_loop": {"all": {"pdms": {"mean": pdms_open}}}, "closed_loop": {"all": {"pdms": {"mean": pdms_closed}}},
            "latency_batch1": {"median_ms": latency}, "mode_diversity": {"mean": diversity}}


def test_targets_compare_the_right_numbers() -> None:
    results = {"anchored": _result(0.9, 0.8, 10.0, 0.5), "vanilla": _result(0.85, 0.82, 90.0, 0.2),
               "regression": _result(0.88, 0.7, 1.0, 0.0)}
    t = check_targets(results)
    assert t["anchored_pdms_ge_vanilla_open_loop"]["met"]
    assert not t["anchored_pdms_ge_vanilla_closed_loop"]["met"]
    assert t["latency_ratio_vanilla_over_anchored"]["ratio"] == pytest.approx(9.0)
    assert t["latency_ratio_vanilla_over_anchored"]["met"]
    assert t["anchored_more_diverse"]["met"]
    assert t["anchored_pdms_gt_regression_open_loop"]["met"]


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``trajgen demo --quick`` run once, as a user would: its output directory."""
    out = tmp_path_factory.mktemp("demo") / "d"
    result = subprocess.run([sys.executable, "-m", "trajgen.cli", "demo", "--quick", "--out-dir", str(out)],
                            check=False, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "anchored" in result.stdout
    return out


@pytest.mark.timeout(900)
def test_quick_pipeline_end_to_end(quick_demo: Path) -> None:
    config = DrivingBenchConfig.quick(str(quick_demo))
    saved = json.loads((quick_demo / "results.json").read_text())
    assert set(saved["policies"]) == {"anchored", "vanilla", "regression"}
    for name, result in saved["policies"].items():
        for mode in ("open_loop", "closed_loop"):
            pdms = result[mode]["all"]["pdms"]
            assert 0.0 <= pdms["mean"] <= 1.0, (name, mode)
        assert result["closed_loop"]["all"]["pdms"]["n"] == 2 * config.closed_loop_episodes
    assert saved["policies"]["anchored"]["nfe"] == 2 and saved["policies"]["vanilla"]["nfe"] == 20
    # the expert drives its own reference scenes: progress is its own, so EP is 1 and nothing collides
    for scenario in saved["expert_closed_loop"].values():
        assert scenario["ep"]["mean"] == pytest.approx(1.0, abs=1e-3)
        assert scenario["collision"]["mean"] == 0.0
    table = (quick_demo / "results.md").read_text()
    for name, result in saved["policies"].items():
        assert f"| {name} | {result['nfe']} | {result['open_loop']['all']['pdms']['mean']:.3f}" in table
    assert saved["simulator_throughput"]["runs"]
    for picture in saved["pictures"].values():
        assert Path(picture).stat().st_size > 1000


def test_rerun_reloads_instead_of_training(quick_demo: Path) -> None:
    config = DrivingBenchConfig.quick(str(quick_demo))
    path = ensure_data(config)
    train_seeds, _ = split_seeds(path)
    dataset = DrivingSamples(path, seeds=train_seeds)
    saved = json.loads((quick_demo / "regression" / "train_summary.json").read_text())
    policy, summary = train_policy("regression", config, dataset, dataset.arrays["trajectory"])
    assert summary == saved
    assert isinstance(policy, RegressionPolicy)


def test_latency_can_be_remeasured_on_a_finished_run(quick_demo: Path) -> None:
    before = json.loads((quick_demo / "results.json").read_text())
    after = remeasure_latency(DrivingBenchConfig.quick(str(quick_demo)))
    for name, result in after["policies"].items():
        assert result["latency_batch1"]["repeats"] == 3 and result["latency_batch1"]["median_ms"] > 0
        assert result["open_loop"] == before["policies"][name]["open_loop"]  # only the timing changes
    assert json.loads((quick_demo / "results.json").read_text())["policies"] == after["policies"]


def test_trajgen_throughput_counts_every_vehicle_step() -> None:
    run = trajgen_throughput("merge", n_scenes=4, seconds=0.2)
    assert run.scenes == 4 and run.vehicles_per_scene >= 1.0
    # each env.step tracks one 0.5 s replanning period: 5 sim steps per vehicle
    assert run.vehicle_steps % 5 == 0
    assert run.vehicle_seconds_per_s == pytest.approx(run.vehicle_steps * 0.1 / run.wall_s)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_full_demo_meets_its_claim(tmp_path: Path) -> None:
    """The README's first command: within its budget the anchored policy beats regression on PDMS."""
    document = run_driving_benchmark(DrivingBenchConfig.demo(str(tmp_path / "demo")))
    assert document["targets"]["anchored_pdms_gt_regression_closed_loop"]["met"]
    assert (tmp_path / "demo" / "anchored_closed_loop.gif").exists()
