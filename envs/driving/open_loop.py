"""Open-loop PDM scoring of planned trajectories against logged scenes, as NAVSIM scores a planner.

A plan ``[8, 3]`` (ego frame, 0.5 ... 4.0 s) made at a logged tick is tracked by the same controller the
environment uses (:class:`~trajgen.envs.driving.tracking.PlanTracker` on a
:class:`~trajgen.envs.driving.vehicles.KinematicBicycle`) for 4 s at 10 Hz, starting from the logged ego state;
the other vehicles replay their logged futures (non-reactive, as in NAVSIM). The simulated ego poses are then
scored with :func:`~trajgen.envs.driving.scoring.pdm_scores`. The reference for EP is the expert's own plan at
that tick (the row's ``trajectory``) tracked and simulated the same way, as NAVSIM measures EP against its
PDM-Closed planner simulated in the same scene.

The log (``trajgen collect driving``) holds the agents at the 40 steps *after* the tick; frame 0 (the tick) is
extrapolated backwards at each agent's first logged velocity, so every frame of the ego has its agents.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from numpy.typing import ArrayLike, NDArray

from trajgen.envs.driving.maps import RoadMap
from trajgen.envs.driving.scoring import EgoShape, pdm_scores
from trajgen.envs.driving.sim import DT, SCENARIOS, make_map
from trajgen.envs.driving.tracking import PlanTracker, check_plan
from trajgen.envs.driving.traffic import EGO_LENGTH, EGO_REAR_TO_CENTRE, EGO_WIDTH
from trajgen.envs.driving.vehicles import BicycleLimits, KinematicBicycle

FloatArray = NDArray[np.float64]

HORIZON_STEPS = 40
"""Sim steps (10 Hz) a plan is tracked for: 4 s, the plan's horizon."""
LOG_KEYS = ("ego_pose", "ego", "future_agents", "future_agents_valid", "route", "trajectory", "scenario")
"""What a logged row must hold for open-loop scoring (see :mod:`trajgen.envs.driving.collect`)."""

EGO_SHAPE = EgoShape(length=EGO_LENGTH, width=EGO_WIDTH, rear_axle_to_center=EGO_REAR_TO_CENTRE)


def track_plans(plans: ArrayLike, ego_pose: ArrayLike, speed: ArrayLike, accel: ArrayLike, steer: ArrayLike,
                limits: BicycleLimits | None = None, steps: int = HORIZON_STEPS) -> tuple[FloatArray, FloatArray]:
    """Simulate B egos tracking their plans.

    Args:
        plans: ego-frame plans ``[B, 8, 3]``.
        ego_pose: world rear-axle poses ``[B, 3]`` at the tick.
        speed, accel, steer: the ego's state at the tick ``[B]`` (m/s, m/s^2, rad).
        limits: the bicycle's limits (default :class:`BicycleLimits`).
        steps: 0.1 s steps to simulate.

    Returns:
        (poses ``[B, steps + 1, 3]`` world frame with frame 0 = the tick, speeds ``[B, steps + 1]``).
    """
    limits = limits or BicycleLimits()
    pose = np.asarray(ego_pose, dtype=np.float64)
    plan = check_plan(plans, pose.shape[0])
    lim = limits
    ego = KinematicBicycle(pose[:, 0], pose[:, 1], pose[:, 2], np.clip(speed, 0.0, lim.max_speed),
                           np.clip(accel, -lim.max_decel, lim.max_accel), np.clip(steer, -lim.max_steer, lim.max_steer),
                           limits=lim)
    tracker = PlanTracker(lim)
    tracker.set_plan(plan, pose)
    poses = [pose.copy()]
    speeds = [ego.speed.copy()]
    for k in range(steps):
        current = np.stack([ego.x, ego.y, ego.heading], axis=1)
        a, s = tracker.control(current, ego.speed, np.full(pose.shape[0], k * DT))
        ego.step(a, s, DT)
        poses.append(np.stack([ego.x, ego.y, ego.heading], axis=1))
        speeds.append(ego.speed.copy())
    return np.stack(poses, axis=1), np.stack(speeds, axis=1)


def logged_agents(future_boxes: ArrayLike, future_valid: ArrayLike) -> tuple[FloatArray, NDArray[np.bool_], FloatArray]:
    """Agent boxes, validity and velocities over frames 0 ... T from a log of frames 1 ... T.

    Args:
        future_boxes: ``[B, T, N, 5]`` boxes at the T steps after the tick (world frame).
        future_valid: ``[B, T, N]``.

    Returns:
        boxes ``[B, T+1, N, 5]``, valid ``[B, T+1, N]``, velocities ``[B, T+1, N, 2]`` (central differences;
        frame 0 is extrapolated back at the first logged velocity, invalid rows get zero velocity).
    """
    boxes = np.asarray(future_boxes, dtype=np.float64)
    valid = np.asarray(future_valid, dtype=bool)
    first = boxes[:, :1].copy()
    first[..., :2] -= boxes[:, 1:2, :, :2] - boxes[:, :1, :, :2]
    boxes = np.concatenate([first, boxes], axis=1)
    valid = np.concatenate([valid[:, :1], valid], axis=1)
    velocity = np.where(valid[..., None], np.gradient(boxes[..., :2], DT, axis=1), 0.0)
    return boxes, valid, velocity


def check_log(rows: Mapping[str, ArrayLike]) -> int:
    """Validate the keys and leading sizes of a batch of logged rows; return B."""
    missing = [key for key in LOG_KEYS if key not in rows]
    if missing:
        raise ValueError(f"logged rows lack {missing}; open-loop scoring needs {list(LOG_KEYS)} "
                         "(written by `trajgen collect driving`)")
    n = np.asarray(rows["ego_pose"]).shape[0]
    for key in LOG_KEYS:
        if np.asarray(rows[key]).shape[:1] != (n,):
            raise ValueError(f"rows[{key!r}] has {np.asarray(rows[key]).shape[:1]} rows, expected {n}")
    return n


def open_loop_scores(plans: ArrayLike, rows: Mapping[str, ArrayLike],
                     roads: Mapping[str, RoadMap] | None = None) -> dict[str, FloatArray]:
    """NAVSIM-style PDM sub-scores of B plans made at B logged ticks.

    Args:
        plans: ego-frame plans ``[B, 8, 3]``.
        rows: the logged rows' ``LOG_KEYS`` (numpy, batch-first), e.g. a slice of a collected file; its
            ``trajectory`` (the expert's plan) is simulated too and its progress is EP's reference.
        roads: scenario name -> map (built from the scenario when not given).

    Returns:
        ``[B]`` arrays "nc", "dac", "ttc", "ep", "c", "pdms", "progress", "collision" (see
        :func:`~trajgen.envs.driving.scoring.pdm_scores`).
    """
    n = check_log(rows)
    plans = check_plan(plans, n)
    ego = np.asarray(rows["ego"], dtype=np.float64)
    poses, speeds = track_plans(plans, rows["ego_pose"], ego[:, 0], ego[:, 1], ego[:, 2])
    expert_poses, expert_speeds = track_plans(check_plan(rows["trajectory"], n), rows["ego_pose"], ego[:, 0],
                                              ego[:, 1], ego[:, 2])
    boxes, valid, velocity = logged_agents(rows["future_agents"], rows["future_agents_valid"])
    scenario = np.asarray(rows["scenario"]).astype(np.int64)
    route = np.asarray(rows["route"], dtype=np.float64)
    out: dict[str, FloatArray] = {}
    for index in np.unique(scenario):
        if not 0 <= index < len(SCENARIOS):
            raise ValueError(f"rows['scenario'] must index {SCENARIOS}, got {index}")
        name = SCENARIOS[index]
        road = (roads or {}).get(name) or make_map(name)
        sel = np.flatnonzero(scenario == index)
        routes = list(route[sel])
        expert = pdm_scores(expert_poses[sel], boxes[sel], valid[sel], velocity[sel], road.is_drivable, routes,
                            np.ones(sel.size), shape=EGO_SHAPE, ego_speed=expert_speeds[sel])
        scores = pdm_scores(poses[sel], boxes[sel], valid[sel], velocity[sel], road.is_drivable, routes,
                            expert["progress"], shape=EGO_SHAPE, ego_speed=speeds[sel])
        for key in ("nc", "dac", "ttc", "ep", "c", "pdms", "progress", "collision"):
            out.setdefault(key, np.zeros(n))[sel] = scores[key]
    return out
