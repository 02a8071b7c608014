"""The command line: every command has --help; listing works; bad input is reported."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from trajgen.cli import app

runner = CliRunner()


@pytest.mark.parametrize("args", [[], ["demo"], ["bench"], ["bench", "solvers"], ["bench", "orders"],
                                  ["bench", "driving"], ["solvers"], ["train"], ["train", "arcs"],
                                  ["train", "offline"], ["eval"], ["eval", "offline"], ["collect"],
                                  ["collect", "mujoco"], ["collect", "driving"]])
def test_help_everywhere(args):
    result = runner.invoke(app, args + ["--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_list_solvers_names_every_solver():
    from trajgen.solvers import SOLVERS

    result = runner.invoke(app, ["solvers"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for name in SOLVERS:
        assert name in result.output


def test_train_arcs_rejects_unknown_solver(tmp_path):
    result = runner.invoke(app, ["train", "arcs", "--steps", "1", "--solver", "nope", "--out-dir", str(tmp_path)])
    assert result.exit_code != 0
    assert "nope" in str(result.exception) or "nope" in result.output


@pytest.fixture
def driving_config_seen(monkeypatch) -> dict:
    """``trajgen bench driving`` builds its config and, instead of running, stores it under "config"."""
    from trajgen import cli

    seen: dict = {}
    monkeypatch.setattr(cli, "_run_driving", lambda config, throughput_seconds: seen.update(config=config))
    return seen


def test_bench_driving_passes_the_training_seeds(driving_config_seen, tmp_path):
    seen = driving_config_seen
    result = runner.invoke(app, ["bench", "driving", "--out-dir", str(tmp_path), "--training-seed", "0",
                                 "--training-seed", "2"])
    assert result.exit_code == 0, result.output
    assert seen["config"].seeds_for_training == (0, 2)
    runner.invoke(app, ["bench", "driving", "--out-dir", str(tmp_path), "--seed", "5"])
    assert seen["config"].seeds_for_training == (5,)                  # no --training-seed: the run's seed


def test_bench_driving_passes_the_policies(driving_config_seen, tmp_path):
    seen = driving_config_seen
    result = runner.invoke(app, ["bench", "driving", "--out-dir", str(tmp_path), "--policy", "anchored",
                                 "--policy", "vanilla-unet"])
    assert result.exit_code == 0, result.output
    assert seen["config"].policies == ("anchored", "vanilla-unet")
    runner.invoke(app, ["bench", "driving", "--out-dir", str(tmp_path)])
    assert seen["config"].policies == ("anchored", "vanilla", "regression")
    result = runner.invoke(app, ["bench", "driving", "--out-dir", str(tmp_path), "--policy", "vanila"])
    assert isinstance(result.exception, ValueError) and "vanila" in str(result.exception)  # main() exits 2 on it


@pytest.mark.parametrize(("option", "field", "default", "other", "bad"), [
    ("--anchor-space", "anchor_space", "metres", "normalised", "meters"),
    ("--anchor-heading", "anchor_heading", "predicted", "diffused", "noisy"),
    ("--plan-heading", "plan_heading", "path", "policy", "tangent"),
])
def test_bench_driving_passes_the_anchor_options(driving_config_seen, tmp_path, option: str, field: str,
                                                 default: str, other: str, bad: str):
    seen = driving_config_seen
    runner.invoke(app, ["bench", "driving", "--out-dir", str(tmp_path)])
    assert getattr(seen["config"], field) == default
    result = runner.invoke(app, ["bench", "driving", "--out-dir", str(tmp_path), option, other])
    assert result.exit_code == 0, result.output
    assert getattr(seen["config"], field) == other
    result = runner.invoke(app, ["bench", "driving", "--out-dir", str(tmp_path), option, bad])
    assert isinstance(result.exception, ValueError) and field in str(result.exception)


def test_bench_driving_passes_the_waypoint_feature_switch(driving_config_seen, tmp_path):
    seen = driving_config_seen
    runner.invoke(app, ["bench", "driving", "--out-dir", str(tmp_path)])
    assert seen["config"].anchor_waypoint_features is True
    result = runner.invoke(app, ["bench", "driving", "--out-dir", str(tmp_path), "--no-anchor-waypoint-features"])
    assert result.exit_code == 0, result.output
    assert seen["config"].anchor_waypoint_features is False


def test_bench_driving_passes_the_extra_training_data(driving_config_seen, tmp_path):
    seen = driving_config_seen
    runner.invoke(app, ["bench", "driving", "--out-dir", str(tmp_path)])
    assert seen["config"].extra_train_data == ()
    result = runner.invoke(app, ["bench", "driving", "--out-dir", str(tmp_path), "--extra-train-data", "a.h5",
                                 "--extra-train-data", "b.h5"])
    assert result.exit_code == 0, result.output
    assert seen["config"].extra_train_data == ("a.h5", "b.h5")


def test_collect_driving_lets_saved_policies_drive(monkeypatch, tmp_path):
    import numpy as np

    from trajgen.envs.driving import collect
    from trajgen.envs.driving.env import DrivingVectorEnv
    from trajgen.policies.driving import RegressionConfig, RegressionPolicy

    path = RegressionPolicy(RegressionConfig(d_model=32)).save(tmp_path / "policy.safetensors")
    seen: dict = {}
    monkeypatch.setattr(collect, "collect_driving", lambda out, **kwargs: seen.update(kwargs) or {"rows": 0})
    result = runner.invoke(app, ["collect", "driving", "--out", str(tmp_path / "d.h5"), "--quick",
                                 "--driver-policy", str(path), "--driver-policy", str(path)])
    assert result.exit_code == 0, result.output
    assert seen["perturb"] is None and len(seen["drivers"]) == 2    # None: no noise injection with drivers
    obs, _ = DrivingVectorEnv(num_envs=3, scenario="merge").reset(seed=0)
    for driver in seen["drivers"].values():
        plans = driver(obs)
        assert plans.shape == (3, 8, 3) and np.isfinite(plans).all()
    result = runner.invoke(app, ["collect", "driving", "--out", str(tmp_path / "d.h5"), "--driver-policy",
                                 str(tmp_path / "missing.safetensors")])
    assert result.exit_code != 0
