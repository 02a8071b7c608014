"""Driving Gymnasium environments: registration, check_env, action validation, autoreset, observation contract."""

from __future__ import annotations

import math
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from trajgen.envs import driving
from trajgen.envs.driving.env import DrivingEnv, DrivingVectorEnv
from trajgen.envs.driving.observation import (
    AGENT_FEATURES,
    LANE_POINTS,
    N_AGENTS,
    N_LANES,
    build_observation,
    observation_space,
)
from trajgen.envs.driving.sim import DrivingSim


def _straight_plan(v: float, n: int = 1) -> np.ndarray:
    t = np.arange(1, 9) * 0.5
    return np.repeat(np.stack([v * t, 0 * t, 0 * t], -1)[None], n, axis=0).astype(np.float32)


@pytest.mark.parametrize("scenario", ["intersection", "merge"])
def test_check_env_passes(scenario: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_env(DrivingEnv(scenario=scenario))
        check_env(DrivingEnv(scenario=scenario, action_mode="control", bev=True))


def test_registered_ids_make_single_and_vector_envs() -> None:
    env = gym.make("trajgen/Merge-v0")
    assert isinstance(env.unwrapped, DrivingEnv) and env.unwrapped.scenario == "merge"
    venv = gym.make_vec("trajgen/Intersection-v0", num_envs=3)
    assert isinstance(venv, DrivingVectorEnv) and venv.num_envs == 3 and venv.scenario == "intersection"
    obs, info = venv.reset(seed=1)
    assert obs["agents"].shape == (3, N_AGENTS, AGENT_FEATURES) and info["seed"].shape == (3,)
    assert venv.observation_space.contains(obs)
    assert set(driving.ENV_IDS.values()) <= set(gym.registry)


def test_actions_are_validated() -> None:
    venv = DrivingVectorEnv(num_envs=2)
    venv.reset(seed=0)
    with pytest.raises(ValueError, match=r"action must be a plan of shape \[2, 8, 3\]"):
        venv.step(np.zeros((2, 7, 3)))
    bad = _straight_plan(5.0, 2)
    bad[1, 3, 0] = np.nan
    with pytest.raises(ValueError, match="action.*NaN"):
        venv.step(bad)
    env = DrivingEnv(action_mode="control")
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"action must have shape \[2\]"):
        env.step(np.zeros(3))
    with pytest.raises(ValueError, match="scenario must be one of"):
        DrivingEnv(scenario="roundabout")


def test_infeasible_plan_is_reported_not_fatal() -> None:
    venv = DrivingVectorEnv(num_envs=2)
    venv.reset(seed=0)
    plan = _straight_plan(float(venv.sim.ego.speed[0]), 2)
    plan[1, :, 1] = 60.0  # jump 60 m sideways
    before = venv.sim.ego_pose().copy()
    _, _, _, _, info = venv.step(plan)
    np.testing.assert_array_equal(info["infeasible"], [False, True])
    lim = venv.sim.limits
    assert np.all(np.abs(venv.sim.ego.steer) <= lim.max_steer + 1e-12)  # clipped by the limits
    assert np.all(np.isfinite(venv.sim.ego_pose())) and not np.allclose(venv.sim.ego_pose(), before)


def test_same_step_autoreset_and_reward() -> None:
    venv = DrivingVectorEnv(num_envs=4, scenario="merge", action_mode="control", collision_penalty=1.0)
    venv.reset(seed=5)
    sim = venv.sim
    sim.ego.y[1] = 40.0  # scene 1 is placed off the road: it must end and restart in this step
    seeds_before = sim.seeds.copy()
    route_before = sim.route_s.copy()
    _obs, reward, terminated, _truncated, info = venv.step(np.zeros((4, 2), dtype=np.float32))
    assert terminated[1] and info["_final_obs"][1] and info["final_info"]["off_road"][1]
    assert sim.steps[1] == 0 and sim.seeds[1] != seeds_before[1]  # reset inside step
    assert info["final_obs"]["ego"].shape == (4, 4)
    live = np.array([0, 2, 3])
    assert not terminated[live].any()
    np.testing.assert_allclose(reward[live], 0.1 * (sim.route_s[live] - route_before[live]), atol=1e-9)
    assert reward[1] == pytest.approx(0.1 * info["final_info"]["progress"][1] - 1.0)


def test_single_env_episode_runs_to_an_end_with_the_expert() -> None:
    env = DrivingEnv(scenario="intersection")
    obs, info = env.reset(seed=3)
    expert = driving.RuleExpert(env.sim)
    for _ in range(200):
        obs, _reward, terminated, truncated, info = env.step(expert.plan()[0].astype(np.float32))
        assert env.observation_space.contains(obs)
        if terminated or truncated:
            break
    assert terminated and info["route_completed"] and not info["collision"]


# ---------------------------------------------------------------------------------------------- observation


def test_observation_contract_on_a_hand_built_scene() -> None:
    sim = DrivingSim("merge", 1)
    sim.reset(np.array([0]))
    tr = sim.traffic
    tr.valid[:, : sim.N] = False
    # ego on the right lane (y = 0) at x = 100 heading east at 12 m/s; one agent 20 m ahead on the left lane
    sim.ego.x[:], sim.ego.y[:], sim.ego.heading[:], sim.ego.speed[:], sim.ego.steer[:] = 100.0, 0.0, 0.0, 12.0, 0.1
    sim.ego.accel[:] = 0.5
    tr.valid[0, 0], tr.path[0, 0], tr.s[0, 0], tr.v[0, 0], tr.lat[0, 0] = True, 0, 125.0, 9.0, 0.0
    tr.length[0, 0], tr.width[0, 0] = 5.0, 2.0
    sim._sync_ego()
    obs = build_observation(sim)
    assert observation_space().contains({k: v[0] for k, v in obs.items()})
    np.testing.assert_allclose(obs["ego"][0], [12.0, 0.5, 0.1, 12.0 * math.tan(0.1) / 2.7], rtol=1e-6)
    assert obs["agents_mask"][0].tolist() == [1] + [0] * (N_AGENTS - 1)
    # box centre = front (125) - length / 2 = 122.5 m; the left lane is y = 3.5
    np.testing.assert_allclose(obs["agents"][0, 0], [22.5, 3.5, 1.0, 0.0, 9.0, 0.0, 5.0, 2.0], atol=1e-5)
    assert np.all(obs["agents"][0, 1:] == 0)
    # lanes: the nearest is the ego's own lane, 20 points from x = 100 to 160 along y = 0
    assert obs["lanes"].shape == (1, N_LANES, LANE_POINTS, 2) and obs["lanes_mask"][0, :3].all()
    own = obs["lanes"][0, 0]
    np.testing.assert_allclose(own[:, 0], np.linspace(0.0, 60.0, LANE_POINTS), atol=1.0)
    np.testing.assert_allclose(own[:, 1], 0.0, atol=1e-4)
    assert obs["command"][0].sum() == 1.0


def test_agent_tokens_map_back_to_agent_boxes() -> None:
    """Two copies of one scene give the same tokens, and each token, taken back to the world, is an agent box."""
    sim = DrivingSim("intersection", 2)
    sim.reset(np.array([4, 4]))
    for _ in range(10):
        sim.step(np.zeros(2), np.zeros(2))
    obs = build_observation(sim)
    np.testing.assert_allclose(obs["agents"][0], obs["agents"][1], atol=1e-5)
    pose = sim.ego_pose()[0]
    agents = obs["agents"][0][obs["agents_mask"][0] == 1]
    boxes = sim.agent_boxes()[0][sim.agent_valid()[0]]
    c, s = math.cos(pose[2]), math.sin(pose[2])
    world = pose[:2] + agents[:, :2] @ np.array([[c, s], [-s, c]])
    dist = np.linalg.norm(boxes[:, None, :2] - world[None], axis=-1)
    assert np.all(dist.min(axis=0) < 1e-4)  # each token maps back onto a real agent box


def test_bev_raster_marks_ego_lane_and_agents() -> None:
    sim = DrivingSim("merge", 1)
    sim.reset(np.array([0]))
    tr = sim.traffic
    tr.valid[:, : sim.N] = False
    sim.ego.x[:], sim.ego.y[:], sim.ego.heading[:] = 100.0, 0.0, 0.0
    tr.valid[0, 0], tr.path[0, 0], tr.s[0, 0] = True, 1, 117.25  # box centre 15 m ahead on the ego lane
    tr.length[0, 0] = 4.5
    sim._sync_ego()
    bev = build_observation(sim, bev=True)["bev"][0]
    assert bev.shape == (3, 64, 64)
    centre = 31.5
    # ego lane centre line under the ego: column ~31.5 (y = 0); the road spans y in [-1.75, 5.25]
    assert bev[0, 31, 31] == 1 and bev[0, 31, 25] == 1 and bev[0, 31, 50] == 0
    assert bev[1, 31, 31:33].max() == 1
    row = round(centre - 15.0 / 0.75)
    assert bev[2, row, 31:33].max() == 1 and bev[2].sum() > 5 and bev[2, 40:].sum() == 0
