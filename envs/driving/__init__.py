"""Driving (issue 4): batched vehicles, maps, traffic, the simulator, observations, Gymnasium envs and the expert.

Importing this package registers ``trajgen/Intersection-v0`` and ``trajgen/Merge-v0`` with Gymnasium, each with a
vector entry point: ``gymnasium.make("trajgen/Merge-v0")`` gives a :class:`DrivingEnv`,
``gymnasium.make_vec("trajgen/Merge-v0", num_envs=256)`` a :class:`DrivingVectorEnv` (one batched state).
"""

import gymnasium as gym

from trajgen.envs.driving.collect import collect_driving
from trajgen.envs.driving.env import DrivingEnv, DrivingVectorEnv
from trajgen.envs.driving.expert import RuleExpert
from trajgen.envs.driving.maps import EgoRoute, RoadMap, four_way_intersection, merge_road
from trajgen.envs.driving.observation import (
    AGENT_FEATURES,
    EGO_FEATURES,
    HORIZON_POSES,
    LANE_POINTS,
    N_AGENTS,
    N_LANES,
    POSE_DT,
    build_observation,
    observation_space,
)
from trajgen.envs.driving.open_loop import open_loop_scores, track_plans
from trajgen.envs.driving.scoring import EgoShape, PDMConfig, aggregate, episode_scores, mode_diversity, pdm_scores
from trajgen.envs.driving.sim import COMMANDS, SCENARIOS, DrivingSim, StepOutcome, make_map
from trajgen.envs.driving.tracking import PlanTracker, plan_infeasible
from trajgen.envs.driving.traffic import Traffic, TrafficConfig
from trajgen.envs.driving.vehicles import (
    BicycleLimits,
    BicycleState,
    IDMParams,
    KinematicBicycle,
    LaneFollowers,
    LaneFollowerState,
    find_leaders,
    idm_acceleration,
    idm_equilibrium_gap,
    sample_idm_params,
)

ENV_IDS = {"intersection": "trajgen/Intersection-v0", "merge": "trajgen/Merge-v0"}

for _scenario, _env_id in ENV_IDS.items():
    if _env_id not in gym.registry:
        gym.register(
            id=_env_id,
            entry_point="trajgen.envs.driving.env:DrivingEnv",
            vector_entry_point="trajgen.envs.driving.env:DrivingVectorEnv",
            kwargs={"scenario": _scenario},
        )

__all__ = [
    "AGENT_FEATURES",
    "COMMANDS",
    "EGO_FEATURES",
    "ENV_IDS",
    "HORIZON_POSES",
    "LANE_POINTS",
    "N_AGENTS",
    "N_LANES",
    "POSE_DT",
    "SCENARIOS",
    "BicycleLimits",
    "BicycleState",
    "DrivingEnv",
    "DrivingSim",
    "DrivingVectorEnv",
    "EgoRoute",
    "EgoShape",
    "IDMParams",
    "KinematicBicycle",
    "LaneFollowerState",
    "LaneFollowers",
    "PDMConfig",
    "PlanTracker",
    "RoadMap",
    "RuleExpert",
    "StepOutcome",
    "Traffic",
    "TrafficConfig",
    "aggregate",
    "build_observation",
    "collect_driving",
    "episode_scores",
    "find_leaders",
    "four_way_intersection",
    "idm_acceleration",
    "idm_equilibrium_gap",
    "make_map",
    "merge_road",
    "mode_diversity",
    "observation_space",
    "open_loop_scores",
    "pdm_scores",
    "plan_infeasible",
    "sample_idm_params",
    "track_plans",
]
