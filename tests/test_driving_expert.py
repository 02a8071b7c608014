"""The rule-based driving expert (closed loop, both scenarios) and the HDF5 data collection."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from trajgen.envs.driving.collect import collect_driving, split_of_seed
from trajgen.envs.driving.env import DrivingVectorEnv
from trajgen.envs.driving.expert import RuleExpert
from trajgen.envs.driving.geometry import poses_to_ego_frame
from trajgen.envs.driving.observation import build_observation


def _run_episodes(scenario: str, n: int, seed: int) -> dict[str, np.ndarray]:
    """Run n scenes to their first episode end with the expert; returns per-scene outcome flags."""
    env = DrivingVectorEnv(num_envs=n, scenario=scenario)
    env.reset(seed=seed)
    expert = RuleExpert(env.sim)
    ended = np.zeros(n, dtype=bool)
    out = {k: np.zeros(n, dtype=bool) for k in ("collision", "off_road", "route_completed", "infeasible")}
    for _ in range(100):
        _, _, terminated, truncated, info = env.step(expert.plan())
        final = info.get("final_info", info)
        out["infeasible"] |= info["infeasible"] & ~ended
        for k in ("collision", "off_road", "route_completed"):
            out[k] |= final[k] & (terminated | truncated) & ~ended
        ended |= terminated | truncated
        if ended.all():
            break
    assert ended.all()
    return out


@pytest.mark.parametrize("scenario", ["intersection", "merge"])
def test_expert_drives_safely_to_the_goal(scenario: str) -> None:
    out = _run_episodes(scenario, 24, seed=123)
    assert not out["collision"].any() and not out["off_road"].any()
    assert out["route_completed"].mean() >= 0.8
    assert out["infeasible"].mean() <= 0.1  # the expert's own plans respect the vehicle's limits


def test_expert_plans_follow_the_route_and_differ_between_episodes() -> None:
    env = DrivingVectorEnv(num_envs=64, scenario="merge")
    env.reset(seed=7)
    sim = env.sim
    plans = RuleExpert(sim).plan()
    assert plans.shape == (64, 8, 3) and np.all(np.isfinite(plans))
    # moving forward along the lane: x grows, small lateral offsets and headings on a straight road section
    main = sim.route != 0  # routes starting on the main road (not the curved ramp)
    assert np.all(np.diff(plans[main][:, :, 0], axis=1) >= -1e-9)
    assert np.all(np.abs(plans[main][:, :, 1]) < 4.0) and np.all(np.abs(plans[main][:, :, 2]) < 0.3)
    # randomised drivers: the 4 s travel distance varies well beyond what the start speeds explain alone
    speed = sim.ego.speed
    extra = plans[main][:, -1, 0] - 4.0 * speed[main]
    assert extra.std() > 1.0


def test_collect_writes_a_consistent_split_file(tmp_path: Path) -> None:
    out = tmp_path / "drive.h5"
    stats = collect_driving(out, scenario="both", n_samples=300, seed=2, quick=True, test_fraction=0.3)
    assert out.exists() and not list(tmp_path.glob("*.tmp*"))
    assert stats["rows"] == 300
    with h5py.File(out) as f:
        assert f.attrs["version"] == 2 and f.attrs["future_frame"] == "world"
        n = f["trajectory"].shape[0]
        assert n == 300 and f["agents"].shape == (n, 16, 8) and f["lanes"].shape == (n, 24, 20, 2)
        assert f["future_agents"].shape == (n, 40, 16, 5) and f["future_agents_valid"].shape == (n, 40, 16)
        assert f["route"].shape == (n, 128, 2) and set(np.unique(f["scenario"][:])) == {0, 1}
        seeds, split = f["seed"][:], f["split"][:]
        np.testing.assert_array_equal(split, split_of_seed(seeds, 0.3))
        assert not set(seeds[split == 0]) & set(seeds[split == 1])
        # future_poses is the ego's actual motion: its first pose (0.5 s) is where the next row's ego is
        ep, tick, pose, traj = f["episode"][:], f["tick"][:], f["ego_pose"][:], f["future_poses"][:]
        nxt = np.flatnonzero((ep[1:] == ep[:-1]) & (tick[1:] == tick[:-1] + 1))
        assert nxt.size > 100
        want = poses_to_ego_frame(pose[nxt + 1], pose[nxt])
        np.testing.assert_allclose(traj[nxt, 0], want, atol=1e-4)
        # the 4 s progress along the route is about the length of the driven trajectory
        driven = np.linalg.norm(traj[:, 0, :2], axis=-1) + np.linalg.norm(np.diff(traj[:, :, :2], axis=1),
                                                                           axis=-1).sum(1)
        np.testing.assert_allclose(f["expert_progress"][:], driven, rtol=0.1, atol=1.0)


def test_noise_injection_moves_the_ego_off_the_plan_but_not_the_label(tmp_path: Path) -> None:
    clean, noisy = tmp_path / "clean.h5", tmp_path / "noisy.h5"
    collect_driving(clean, scenario="merge", n_samples=256, seed=4, quick=True, perturb=0.0)
    collect_driving(noisy, scenario="merge", n_samples=256, seed=4, quick=True, perturb=1.0)

    def gap(path: Path) -> np.ndarray:
        with h5py.File(path) as f:
            assert f.attrs["perturb"] in (0.0, 1.0)
            return np.linalg.norm(f["trajectory"][:, 1, :2] - f["future_poses"][:, 1, :2], axis=-1)

    # without noise the ego executes the label: only tracking error separates them at 1 s
    assert np.median(gap(clean)) < 0.1
    # with noise on every tick the executed motion leaves the label (rotation ~0.025 rad, stretch ~8%)
    assert np.median(gap(noisy)) > 3 * np.median(gap(clean)) + 0.1


def _creeping_plans(obs: dict[str, np.ndarray]) -> np.ndarray:
    """A stand-in learned policy that only creeps: 0.5 m over 4 s, straight ahead."""
    plans = np.zeros((obs["ego"].shape[0], 8, 3), dtype=np.float32)
    plans[..., 0] = np.linspace(0.0625, 0.5, 8)
    return plans


def test_on_policy_rows_follow_the_driver_and_keep_the_expert_label(tmp_path: Path) -> None:
    out = tmp_path / "dagger.h5"
    stats = collect_driving(out, scenario="merge", n_samples=200, seed=6, quick=True, test_fraction=0.3,
                            drivers={"creep": _creeping_plans})
    with h5py.File(out) as f:
        assert f.attrs["drivers"] == "creep" and f.attrs["perturb"] == 0.0
        seeds, split = f["seed"][:], f["split"][:]
        label, actual, ego_speed = f["trajectory"][:], f["future_poses"][:], f["ego_speed"][:]
    # only train-split scenes are written (the episodes of test seeds are driven, then dropped)
    assert (split == 0).all() and (split_of_seed(seeds, 0.3) == 0).all()
    assert stats["merge"]["skipped_test_episodes"] > 0
    # the ego went where the driver planned (slowing to a creep), while the label is the expert's plan at that state
    slow = ego_speed < 1.0
    assert slow.mean() > 0.5
    assert np.median(np.linalg.norm(actual[slow, -1, :2], axis=-1)) < 1.0
    assert np.median(np.linalg.norm(label[slow, -1, :2], axis=-1)) > 5.0


def test_collection_stops_with_an_error_when_no_episode_can_be_written(tmp_path: Path) -> None:
    # drivers write train-split scenes only: with (almost) every seed in the test split nothing is ever written
    message = r"no usable episode in the first 8 \(\d+ ended in a collision or off the road, \d+ had test seeds\)"
    with pytest.raises(RuntimeError, match=message):
        collect_driving(tmp_path / "x.h5", scenario="merge", n_samples=10, seed=1, n_envs=2, test_fraction=0.9999,
                        drivers={"creep": _creeping_plans})
    assert not list(tmp_path.iterdir())  # no partial file left


def test_drivers_share_the_scenes_round_robin_and_must_return_plans() -> None:
    from trajgen.envs.driving.collect import driven_plans

    obs = {"ego": np.zeros((5, 4))}
    plans = driven_plans({"a": lambda o: np.full((len(o["ego"]), 8, 3), 1.0),
                          "b": lambda o: np.full((len(o["ego"]), 8, 3), 2.0)}, obs, 5)
    np.testing.assert_array_equal(plans[:, 0, 0], [1.0, 2.0, 1.0, 2.0, 1.0])
    with pytest.raises(ValueError, match="driver 'short' must return plans of shape \\[5, 8, 3\\]"):
        driven_plans({"short": lambda o: np.zeros((len(o["ego"]), 4, 3))}, obs, 5)


def test_perturb_plans_rotates_and_stretches_about_the_ego() -> None:
    from trajgen.envs.driving.collect import perturb_plans

    plans = np.zeros((200, 8, 3))
    plans[..., 0] = 5.0 * np.arange(1, 9)
    out = perturb_plans(plans, np.random.default_rng(0), 0.5)
    moved = np.abs(out - plans).max(axis=(1, 2)) > 0
    assert 0.35 < moved.mean() < 0.65
    # a rotation plus a uniform stretch keeps every plan a straight ray from the ego with its heading on it
    np.testing.assert_allclose(np.arctan2(out[..., 1], out[..., 0]), out[..., 2], atol=1e-12)
    ratio = np.linalg.norm(out[..., :2], axis=-1) / np.linalg.norm(plans[..., :2], axis=-1)
    np.testing.assert_allclose(ratio, ratio[:, :1] * np.ones((1, 8)), rtol=1e-12)


def test_collect_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="scenario must be one of"):
        collect_driving(tmp_path / "x.h5", scenario="parking", n_samples=10, quick=True)
    with pytest.raises(ValueError, match="n_samples"):
        collect_driving(tmp_path / "x.h5", n_samples=0, quick=True)


def test_observation_rows_match_a_fresh_build() -> None:
    env = DrivingVectorEnv(num_envs=3, scenario="intersection")
    obs, _ = env.reset(seed=11)
    again = build_observation(env.sim)
    for k in obs:
        np.testing.assert_array_equal(obs[k], again[k])
