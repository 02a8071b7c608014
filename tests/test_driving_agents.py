"""Open-loop scoring of plans against logs, closed-loop rollouts, and the real-time loop."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

from trajgen.agents.driving import (
    DrivingAgent,
    closed_loop_scores,
    expert_decider,
    rollout,
    run_realtime,
    shift_plan,
)
from trajgen.envs.driving.collect import collect_driving
from trajgen.envs.driving.env import DrivingEnv
from trajgen.envs.driving.open_loop import LOG_KEYS, logged_agents, open_loop_scores, track_plans
from trajgen.policies.driving import DrivingPlan, DrivingPolicy, DrivingPolicyConfig


@pytest.fixture(scope="module")
def log_rows(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    path = tmp_path_factory.mktemp("drive") / "quick.h5"
    collect_driving(Path(path), n_samples=256, seed=3, quick=True)
    with h5py.File(path, "r") as f:
        return {k: f[k][:] for k in LOG_KEYS}


def test_tracking_a_straight_constant_speed_plan_is_exact() -> None:
    v = 8.0
    plan = np.zeros((2, 8, 3))
    plan[..., 0] = v * 0.5 * np.arange(1, 9)
    pose = np.array([[0.0, 0.0, 0.0], [10.0, -5.0, 0.7]])
    poses, speeds = track_plans(plan, pose, np.full(2, v), np.zeros(2), np.zeros(2))
    t = 0.1 * np.arange(41)
    np.testing.assert_allclose(speeds, v, atol=1e-9)
    np.testing.assert_allclose(poses[0, :, 0], v * t, atol=1e-6)
    np.testing.assert_allclose(poses[1, :, 0], 10.0 + v * t * np.cos(0.7), atol=1e-6)
    np.testing.assert_allclose(poses[1, :, 1], -5.0 + v * t * np.sin(0.7), atol=1e-6)


def test_logged_agents_extrapolates_frame_zero_at_constant_velocity() -> None:
    t = 0.1 * np.arange(1, 41)
    boxes = np.zeros((1, 40, 1, 5))
    boxes[0, :, 0, 0] = 3.0 + 5.0 * t
    boxes[0, :, 0, 3:] = (4.5, 1.9)
    full, valid, velocity = logged_agents(boxes, np.ones((1, 40, 1), dtype=bool))
    assert full.shape == (1, 41, 1, 5) and valid.all()
    np.testing.assert_allclose(full[0, 0, 0, 0], 3.0, atol=1e-12)
    np.testing.assert_allclose(velocity[0, :, 0], np.tile([5.0, 0.0], (41, 1)), atol=1e-9)


def test_open_loop_ranks_the_expert_above_degenerate_plans(log_rows: dict[str, np.ndarray]) -> None:
    expert = open_loop_scores(log_rows["trajectory"], log_rows)
    stop = open_loop_scores(np.zeros_like(log_rows["trajectory"]), log_rows)
    # the expert's own future is collision-free and on the road; its progress is the reference
    assert expert["nc"].mean() == 1.0
    assert expert["pdms"].mean() > 0.95
    np.testing.assert_allclose(np.median(expert["ep"]), 1.0, atol=0.03)
    assert stop["ep"].mean() < 0.5 < expert["ep"].mean()
    assert stop["pdms"].mean() < expert["pdms"].mean() - 0.2


def test_open_loop_refuses_incomplete_logs(log_rows: dict[str, np.ndarray]) -> None:
    rows = {k: v for k, v in log_rows.items() if k != "future_agents"}
    with pytest.raises(ValueError, match="future_agents"):
        open_loop_scores(log_rows["trajectory"], rows)


def test_shift_plan_of_a_straight_plan_is_the_same_plan_after_moving() -> None:
    v = 6.0
    plan = np.zeros((8, 3))
    plan[:, 0] = v * 0.5 * np.arange(1, 9)
    start = np.array([2.0, 1.0, 0.3])
    moved = start + np.array([v * 0.5 * np.cos(0.3), v * 0.5 * np.sin(0.3), 0.0])
    np.testing.assert_allclose(shift_plan(plan, start, moved, 0.5), plan, atol=1e-9)


def test_expert_rollout_scores_itself_perfectly_on_progress() -> None:
    seeds = np.arange(100, 106)
    run = rollout(expert_decider, "intersection", seeds, n_envs=6)
    assert run.poses.shape[0] == 6 and (run.n_frames > 10).all()
    scores = closed_loop_scores(run, run)
    assert scores["env_collision"].sum() == 0
    np.testing.assert_allclose(scores["ep"], 1.0, atol=1e-3)  # sim and scorer project the route separately
    assert scores["nc"].min() == 1.0


class _FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_realtime_loop_counts_missed_deadlines_and_keeps_driving() -> None:
    clock = _FakeClock()
    env = DrivingEnv(scenario="merge")
    calls = {"n": 0}

    def slow_every_third(obs: dict[str, np.ndarray]) -> np.ndarray:
        calls["n"] += 1
        clock.now += 0.8 if calls["n"] % 3 == 0 else 0.01
        plan = np.zeros((8, 3), dtype=np.float32)
        plan[:, 0] = float(obs["ego"][0]) * 0.5 * np.arange(1, 9)
        return plan

    report = run_realtime(slow_every_third, env, decisions=9, rate_hz=2.0, clock=clock, sleep=clock.sleep)
    assert report.decisions == 9 and report.missed == 3
    assert report.p99_ms == pytest.approx(800.0, rel=1e-6)


def test_realtime_rate_must_match_the_env() -> None:
    with pytest.raises(ValueError, match="replanning period"):
        run_realtime(lambda obs: np.zeros((8, 3)), DrivingEnv(), decisions=1, rate_hz=10.0)


class ArcPolicy(DrivingPolicy):
    """Plans along a 30 m circle at 10 m/s (two modes: the arc and its mirror) with headings 0.2 rad off."""

    algorithm = "arc-test"

    def __init__(self) -> None:
        super().__init__(DrivingPolicyConfig(d_model=16, heads=2, encoder_layers=1))

    def _plan(self, obs: Mapping[str, Any], generator: torch.Generator | None, **kwargs: Any) -> DrivingPlan:
        batch = obs["ego"].shape[0]
        angle = 10.0 * 0.5 * np.arange(1, 9) / 30.0
        arc = np.stack([30.0 * np.sin(angle), 30.0 * (1 - np.cos(angle)), angle + 0.2], axis=-1)
        modes = torch.as_tensor(np.stack([arc, arc * [1.0, -1.0, -1.0]]), dtype=torch.float32).expand(batch, -1, -1, -1)
        return DrivingPlan(modes[:, 0], modes, torch.tensor([0.7, 0.3]).expand(batch, -1))


def test_agent_executes_its_plans_path_headings() -> None:
    obs = DrivingEnv("merge").reset(seed=5)[0]
    as_given = DrivingAgent(ArcPolicy()).plan(obs)
    along_path = DrivingAgent(ArcPolicy(), plan_heading="path").plan(obs)
    np.testing.assert_array_equal(along_path.modes[..., :2], as_given.modes[..., :2])
    np.testing.assert_allclose(as_given.trajectory[0, :7, 2] - 0.2, along_path.trajectory[0, :7, 2], atol=1e-6)
    np.testing.assert_allclose(along_path.modes[0, 1, :7, 2], -along_path.modes[0, 0, :7, 2], atol=1e-6)
    assert along_path.trajectory.dtype == as_given.trajectory.dtype == np.float32
    np.testing.assert_array_equal(along_path.scores, as_given.scores)
    with pytest.raises(ValueError, match="plan_heading must be one of"):
        DrivingAgent(ArcPolicy(), plan_heading="tangent")
