"""NAVSIM's PDM score (Dauner et al. 2024), batched over plans, plus closed-loop episode scores and mode diversity.

This re-implements ``navsim/planning/simulation/planner/pdm_planner/scoring/pdm_scorer.py``,
``pdm_scorer_utils.py`` and ``pdm_comfort_metrics.py`` (NAVSIM v1) as pure numpy functions over B simulated plans:

    PDMS = NC * DAC * (5 EP + 5 TTC + 2 C) / 12

- **NC**, no at-fault collision. At every step the ego box is tested against every valid agent box. Each contact
  is classified as nuPlan does: ego stopped (speed <= 0.05 m/s) -> not at fault; agent stopped (<= 0.05 m/s, or a
  static object) -> at fault; agent centre behind the ego (angle from the ego heading > 150 deg) -> rear-ended, not
  at fault; agent touches the ego's front bumper -> at fault; otherwise a lateral contact, at fault only while the
  ego straddles lanes or leaves the drivable area. After a not-at-fault contact the agent is ignored for the rest of
  the plan. An at-fault contact scores 0 with a vehicle and 0.5 with a static object.
- **DAC**, drivable-area compliance: 0 if any ego corner is off the drivable area at any step.
- **TTC**: at every step with the ego moving (>= 5e-3 m/s) the ego box is pushed forward at its current speed along
  its heading by 0, 0.3, 0.6, 0.9 s and tested against the agents at that future time; a contact with an agent
  ahead (< 30 deg), or with any agent not behind while the ego straddles lanes, is off-road or is in an
  intersection, gives TTC = 0. Other contacts mark that agent as ignored, as in NAVSIM.
- **EP**, ego progress: the ego centre's progress along the route centre line (clipped at 0) divided by
  max(ego, reference) progress, where the ego's progress counts only if NC * DAC > 0; if that maximum is at most
  5 m every plan gets EP = 1 (0 where NC * DAC = 0).
- **C**, comfort: nuPlan's bounds on longitudinal / lateral acceleration, jerk, longitudinal jerk, yaw rate and yaw
  acceleration, all strictly inside for the whole horizon (see :class:`ComfortLimits` for the filters).

Deviations from NAVSIM, all forced by having poses instead of a full nuPlan ego state: speeds and accelerations
are derived from the 10 Hz rear-axle poses by central finite differences (``np.gradient``, second order at the
ends) unless the caller passes them; agents needed beyond the last frame by the TTC look-ahead are extrapolated at
constant velocity; the route projection extends the route's end segments instead of clamping; boxes that only
touch do not collide. Driving-direction compliance has weight 0 in NAVSIM v1's PDMS and is not computed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import shapely
from numpy.typing import ArrayLike, NDArray
from scipy.signal import savgol_filter

from trajgen.envs.driving.geometry import box_corners, boxes_overlap, polyline_arclength, project_to_polyline

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]
IntArray = NDArray[np.int64]
PointTest = Callable[[FloatArray], ArrayLike]
"""A map query over points: ``xy [..., 2] -> [...]`` (bool for area tests, int lane ids for ``lane_of``)."""

SCORE_KEYS = ("nc", "dac", "ttc", "ep", "c", "pdms")


# ----------------------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class ComfortLimits:
    """nuPlan's comfort bounds and the Savitzky-Golay filters NAVSIM applies before testing them.

    The defaults are NAVSIM's for a 4 s plan: accelerations are smoothed with a quadratic over ``accel_window``
    frames (None = the whole horizon), jerks are the first derivative (quadratic fit over ``jerk_window`` frames,
    None = whole horizon) of the accelerations smoothed over ``jerk_accel_window`` frames, yaw rate and yaw
    acceleration are Savitzky-Golay derivatives (orders 2 and 3) of the unwrapped heading over ``yaw_window``
    frames. :data:`EPISODE_COMFORT` uses nuPlan's closed-loop windows (8 and 15 frames) for long histories.
    """

    max_lon_accel: float = 2.40
    """m/s^2."""
    min_lon_accel: float = -4.05
    """m/s^2."""
    max_abs_lat_accel: float = 4.89
    """m/s^2."""
    max_abs_yaw_accel: float = 1.93
    """rad/s^2."""
    max_abs_yaw_rate: float = 0.95
    """rad/s."""
    max_abs_lon_jerk: float = 4.13
    """m/s^3."""
    max_abs_jerk: float = 8.37
    """m/s^3, bound on the derivative of the acceleration magnitude."""
    accel_window: int | None = None
    jerk_accel_window: int = 8
    jerk_window: int | None = None
    yaw_window: int = 5


EPISODE_COMFORT = ComfortLimits(accel_window=8, jerk_window=15)
"""nuPlan's closed-loop comfort filters (acceleration window 8, jerk window 15), for whole-episode histories."""


@dataclass(frozen=True)
class EgoShape:
    """Ego footprint. Poses are at the rear axle; the box centre is ``rear_axle_to_center`` ahead of it."""

    length: float = 4.8
    width: float = 2.0
    rear_axle_to_center: float = 1.35
    """m; half the default wheelbase (2.7 m) of :class:`~trajgen.envs.driving.vehicles.BicycleLimits`."""

    def __post_init__(self) -> None:
        if not (self.length > 0 and self.width > 0 and math.isfinite(self.rear_axle_to_center)):
            raise ValueError(f"EgoShape needs length > 0, width > 0 and a finite rear_axle_to_center, got {self}")


@dataclass(frozen=True)
class PDMConfig:
    """Thresholds and weights of the PDM score (NAVSIM v1 defaults)."""

    dt: float = 0.1
    """s between frames."""
    progress_weight: float = 5.0
    ttc_weight: float = 5.0
    comfort_weight: float = 2.0
    progress_distance_threshold: float = 5.0
    """m; below this best progress every plan gets EP = 1."""
    ttc_stopped_speed: float = 5e-3
    """m/s; no TTC check while the ego is slower."""
    collision_stopped_speed: float = 5e-2
    """m/s; an ego or agent this slow counts as stopped when a collision is classified."""
    ttc_future_steps: tuple[int, ...] = (0, 3, 6, 9)
    """Frames ahead (at dt) that the TTC test pushes the ego box forward."""
    ahead_angle_deg: float = 30.0
    behind_angle_deg: float = 150.0
    static_collision_score: float = 0.5
    """NC after an at-fault collision with a static object (0 for vehicles)."""
    comfort: ComfortLimits = field(default_factory=ComfortLimits)


# ----------------------------------------------------------------------------------------------------------
# inputs


@dataclass
class _Scenes:
    """Checked inputs: ego poses [B, F, 3], agents [B, F, N, 5] / [B, F, N] / [B, F, N, 2], static [B, N]."""

    poses: FloatArray
    boxes: FloatArray
    valid: BoolArray
    velocity: FloatArray
    static: BoolArray


def _finite(name: str, value: ArrayLike, shape: tuple[int | None, ...]) -> FloatArray:
    """``value`` as float64 with ``shape`` (None = any size); raise ValueError naming ``name`` otherwise."""
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != len(shape) or any(want is not None and got != want for got, want in zip(arr.shape, shape)):
        want = "[" + ", ".join("?" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} must have shape {want}, got shape {arr.shape}")
    return arr


def _check_scenes(
    ego_poses: ArrayLike,
    agent_boxes: ArrayLike,
    agent_valid: ArrayLike,
    agent_velocity: ArrayLike,
    agent_static: ArrayLike | None,
    min_frames: int = 5,
) -> _Scenes:
    poses = _finite("ego_poses", ego_poses, (None, None, 3))
    if not np.all(np.isfinite(poses)):
        raise ValueError("ego_poses has NaN or infinite entries")
    b, f = poses.shape[:2]
    if f < min_frames:
        raise ValueError(f"ego_poses needs at least {min_frames} frames (axis 1), got {f}")
    boxes = _finite("agent_boxes", agent_boxes, (b, f, None, 5))
    n = boxes.shape[2]
    valid = np.asarray(agent_valid)
    if valid.shape != (b, f, n):
        raise ValueError(f"agent_valid must have shape [{b}, {f}, {n}], got shape {valid.shape}")
    valid = valid.astype(bool)
    velocity = _finite("agent_velocity", agent_velocity, (b, f, n, 2))
    for name, arr in (("agent_boxes", boxes), ("agent_velocity", velocity)):
        if not np.all(np.isfinite(arr[valid])):
            raise ValueError(f"{name} has NaN or infinite entries where agent_valid is set")
    if np.any(boxes[valid][:, 3:] <= 0.0):
        raise ValueError("agent_boxes must have positive length and width (fields 3, 4) where agent_valid is set")
    static = np.zeros((b, n), dtype=bool) if agent_static is None else np.asarray(agent_static).astype(bool)
    if static.shape != (b, n):
        raise ValueError(f"agent_static must have shape [{b}, {n}], got shape {static.shape}")
    filler = np.array([0.0, 0.0, 0.0, 1.0, 1.0])  # harmless stand-in for invalid rows (their results are masked)
    boxes = np.where(valid[..., None], boxes, filler)
    velocity = np.where(valid[..., None], velocity, 0.0)
    return _Scenes(poses, boxes, valid, velocity, static)


def _routes(route: ArrayLike | Sequence[ArrayLike], b: int) -> list[FloatArray]:
    """One route polyline [P, 2] shared by all B scenes, a stacked [B, P, 2], or a sequence of B polylines."""
    try:
        stacked = np.asarray(route, dtype=np.float64)
    except ValueError:  # polylines of different lengths
        stacked = None
    if stacked is not None and stacked.ndim == 2:
        return [stacked] * b
    routes = list(stacked) if stacked is not None and stacked.ndim == 3 else [np.asarray(r, np.float64) for r in route]
    if len(routes) != b or any(r.ndim != 2 or r.shape[-1] != 2 for r in routes):
        raise ValueError(f"route must be one polyline [P, 2] or {b} polylines [P_b, 2] (one per scene)")
    return routes


def _map_query(name: str, fn: PointTest, xy: FloatArray, dtype: type) -> NDArray:
    out = np.asarray(fn(xy))
    if out.shape != xy.shape[:-1]:
        raise ValueError(f"{name}(xy) must return shape {xy.shape[:-1]} for xy of shape {xy.shape}, got {out.shape}")
    return out.astype(dtype)


# ----------------------------------------------------------------------------------------------------------
# ego state from poses


def ego_center_boxes(poses: ArrayLike, shape: EgoShape = EgoShape()) -> FloatArray:
    """Ego boxes (x, y, heading, length, width) centred on the vehicle from rear-axle poses. ``[..., 3] -> [..., 5]``."""
    poses = np.asarray(poses, dtype=np.float64)
    heading = poses[..., 2]
    cx = poses[..., 0] + shape.rear_axle_to_center * np.cos(heading)
    cy = poses[..., 1] + shape.rear_axle_to_center * np.sin(heading)
    size = np.broadcast_to([shape.length, shape.width], heading.shape + (2,))
    return np.concatenate([np.stack([cx, cy, heading], axis=-1), size], axis=-1)


def ego_velocity_and_acceleration(poses: ArrayLike, dt: float = 0.1) -> tuple[FloatArray, FloatArray]:
    """Rear-axle speed ``[B, F]`` and body-frame (longitudinal, lateral) acceleration ``[B, F, 2]`` from poses.

    Central finite differences at ``dt`` (second-order one-sided at the ends) of the world-frame positions,
    the acceleration rotated into the ego heading. ``poses [B, F, 3]``, F >= 3.
    """
    poses = np.asarray(poses, dtype=np.float64)
    velocity = np.gradient(poses[..., :2], dt, axis=-2, edge_order=2)
    accel = np.gradient(velocity, dt, axis=-2, edge_order=2)
    cos, sin = np.cos(poses[..., 2]), np.sin(poses[..., 2])
    lon = accel[..., 0] * cos + accel[..., 1] * sin
    lat = -accel[..., 0] * sin + accel[..., 1] * cos
    return np.linalg.norm(velocity, axis=-1), np.stack([lon, lat], axis=-1)


@lru_cache(maxsize=64)
def _savgol_matrix(n: int, window: int, poly: int, deriv: int, dt: float) -> FloatArray:
    """The linear map ``[n, n]`` of scipy's Savitzky-Golay filter (mode "interp") on length-n signals."""
    return savgol_filter(np.eye(n), window, poly, deriv=deriv, delta=dt, axis=0)


def _smooth(values: FloatArray, window: int | None, deriv: int = 0, poly: int = 2, dt: float = 1.0) -> FloatArray:
    """Savitzky-Golay filter along the last axis with ``window`` clipped to the length (None = whole length),
    rounded to 8 decimals as NAVSIM does. Applied as a cached matrix: identical to ``savgol_filter``, but one
    matrix product for the whole batch."""
    n = values.shape[-1]
    window = n if window is None else min(window, n)
    return np.round(values @ _savgol_matrix(n, window, poly, deriv, float(dt)).T, 8)


def comfort_metrics(
    poses: ArrayLike, dt: float = 0.1, limits: ComfortLimits = ComfortLimits(), ego_accel: ArrayLike | None = None
) -> dict[str, BoolArray]:
    """nuPlan's six comfort tests over each plan, as NAVSIM's ``ego_is_comfortable``.

    Args:
        poses: rear-axle poses ``[B, F, 3]`` at ``dt`` (F >= 5).
        dt: s between frames.
        limits: bounds and filter windows.
        ego_accel: optional body-frame (lon, lat) accelerations ``[B, F, 2]``; derived from the poses if None.

    Returns:
        bool ``[B]`` for "lon_accel", "lat_accel", "jerk", "lon_jerk", "yaw_accel", "yaw_rate" and
        "comfortable" (all six).
    """
    poses = _finite("poses", poses, (None, None, 3))
    if poses.shape[1] < 5 or not np.all(np.isfinite(poses)):
        raise ValueError(f"poses must be finite with at least 5 frames (axis 1), got shape {poses.shape}")
    if ego_accel is None:
        _, accel = ego_velocity_and_acceleration(poses, dt)
    else:
        accel = _finite("ego_accel", ego_accel, poses.shape[:2] + (2,))
    lon, lat = accel[..., 0], accel[..., 1]
    magnitude = np.hypot(lon, lat)
    heading = np.unwrap(poses[..., 2], axis=-1)

    def jerk(a: FloatArray) -> FloatArray:
        return _smooth(_smooth(a, limits.jerk_accel_window), limits.jerk_window, deriv=1, dt=dt)

    def within(x: FloatArray, lo: float, hi: float) -> BoolArray:
        return np.all((x > lo) & (x < hi), axis=-1)

    result = {
        "lon_accel": within(_smooth(lon, limits.accel_window), limits.min_lon_accel, limits.max_lon_accel),
        "lat_accel": within(_smooth(lat, limits.accel_window), -limits.max_abs_lat_accel, limits.max_abs_lat_accel),
        "jerk": within(jerk(magnitude), -limits.max_abs_jerk, limits.max_abs_jerk),
        "lon_jerk": within(jerk(lon), -limits.max_abs_lon_jerk, limits.max_abs_lon_jerk),
        "yaw_accel": within(_smooth(heading, limits.yaw_window, deriv=2, poly=3, dt=dt),
                            -limits.max_abs_yaw_accel, limits.max_abs_yaw_accel),
        "yaw_rate": within(_smooth(heading, limits.yaw_window, deriv=1, dt=dt),
                           -limits.max_abs_yaw_rate, limits.max_abs_yaw_rate),
    }
    result["comfortable"] = np.all(np.stack(list(result.values())), axis=0)
    return result


# ----------------------------------------------------------------------------------------------------------
# collisions


def _relative_angle(poses: FloatArray, centres: FloatArray) -> FloatArray:
    """Angle (rad, [0, pi]) between the ego heading and the ego->agent-centre direction, nuPlan's
    ``get_agent_relative_angle``; 0 where the centre sits on the ego. ``poses [B, F, 3], centres [B, F, N, 2]``."""
    offset = centres - poses[:, :, None, :2]
    dist = np.linalg.norm(offset, axis=-1)
    heading = poses[:, :, None, 2]
    along = offset[..., 0] * np.cos(heading) + offset[..., 1] * np.sin(heading)
    cos = np.where(dist > 1e-9, along / np.maximum(dist, 1e-9), 1.0)
    return np.arccos(np.clip(cos, -1.0, 1.0))


def _first_counted(events: BoolArray, at_fault: BoolArray) -> BoolArray:
    """At-fault events that come before the first not-at-fault event with the same agent.

    ``events``/``at_fault`` are ``[B, E, N]`` over events E in time order; NAVSIM ignores an agent for the rest of
    the plan once it had a not-at-fault contact. Returns the counted at-fault events ``[B, E, N]``.
    """
    ignored_from = np.cumsum(events & ~at_fault, axis=1) > 0
    ignored_before = np.concatenate([np.zeros_like(ignored_from[:, :1]), ignored_from[:, :-1]], axis=1)
    return events & at_fault & ~ignored_before


def _ego_areas(
    corners: FloatArray,
    rear_axle: FloatArray,
    is_drivable: PointTest,
    lane_of: PointTest | None,
    in_intersection: PointTest | None,
) -> tuple[BoolArray, BoolArray, BoolArray]:
    """Per frame ``[B, F]``: off the drivable area (any corner), straddling lanes, rear axle in an intersection.

    Straddling (NAVSIM's "multiple lanes"): the corners lie in more than one lane and no lane holds all four;
    with ``lane_of`` giving one lane id per point (-1 = none) that is two corners with different valid ids.
    """
    off_road = ~np.all(_map_query("is_drivable", is_drivable, corners, bool), axis=-1)
    if lane_of is None:
        multiple_lanes = np.zeros_like(off_road)
    else:
        lane = _map_query("lane_of", lane_of, corners, np.int64)  # [B, F, 4]
        differ = (lane[..., :, None] != lane[..., None, :]) & (lane[..., :, None] >= 0) & (lane[..., None, :] >= 0)
        multiple_lanes = np.any(differ, axis=(-1, -2))
    if in_intersection is None:
        intersection = np.zeros_like(off_road)
    else:
        intersection = _map_query("in_intersection", in_intersection, rear_axle, bool)
    return off_road, multiple_lanes, intersection


def _no_at_fault_collision(
    scenes: _Scenes, ego_boxes: FloatArray, ego_speed: FloatArray, off_lane: BoolArray, config: PDMConfig
) -> tuple[FloatArray, BoolArray, IntArray]:
    """NC ``[B]``, any contact at all ``[B]`` and the first at-fault frame ``[B]`` (-1 if none).

    ``ego_boxes [B, F, 5]`` centred boxes, ``ego_speed [B, F]``, ``off_lane [B, F]`` = straddling lanes or off-road.
    """
    contact = boxes_overlap(ego_boxes[:, :, None], scenes.boxes) & scenes.valid  # [B, F, N]
    ego_stopped = (ego_speed <= config.collision_stopped_speed)[..., None]
    agent_stopped = (np.linalg.norm(scenes.velocity, axis=-1) <= config.collision_stopped_speed) | scenes.static[
        :, None]
    behind = _relative_angle(scenes.poses, scenes.boxes[..., :2]) > math.radians(config.behind_angle_deg)
    bumper = ego_boxes.copy()  # a zero-length box across the front edge = the front bumper segment
    bumper[..., 0] += 0.5 * ego_boxes[..., 3] * np.cos(ego_boxes[..., 2])
    bumper[..., 1] += 0.5 * ego_boxes[..., 3] * np.sin(ego_boxes[..., 2])
    bumper[..., 3] = 0.0
    front = boxes_overlap(bumper[:, :, None], scenes.boxes)
    lateral_at_fault = off_lane[..., None]
    at_fault = ~ego_stopped & (agent_stopped | (~behind & (front | lateral_at_fault)))
    counted = _first_counted(contact, at_fault)
    penalty = np.where(scenes.static, config.static_collision_score, 0.0)[:, None, :]  # [B, 1, N]
    nc = np.min(np.where(counted, penalty, 1.0), axis=(1, 2))
    any_counted = counted.any(axis=2)
    first = np.where(any_counted.any(axis=1), np.argmax(any_counted, axis=1), -1)
    return nc, contact.any(axis=(1, 2)), first


def _agents_ahead_in_time(scenes: _Scenes, steps: int, dt: float) -> tuple[FloatArray, BoolArray]:
    """Agent boxes ``[B, F + steps, N, 5]`` and validity, the frames past the end extrapolated at constant
    velocity from the last frame."""
    last, vel = scenes.boxes[:, -1:], scenes.velocity[:, -1:]
    lead = (np.arange(1, steps + 1) * dt)[None, :, None, None]
    future = np.repeat(last, steps, axis=1)
    future[..., :2] = last[..., :2] + vel * lead
    valid = np.repeat(scenes.valid[:, -1:], steps, axis=1)
    return np.concatenate([scenes.boxes, future], axis=1), np.concatenate([scenes.valid, valid], axis=1)


def _time_to_collision(
    scenes: _Scenes, ego_boxes: FloatArray, ego_speed: FloatArray, off_lane_or_junction: BoolArray,
    config: PDMConfig,
) -> tuple[FloatArray, IntArray]:
    """TTC score ``[B]`` (1 or 0) and the first frame of a TTC infraction ``[B]`` (-1 if none).

    ``off_lane_or_junction [B, F]``: the ego straddles lanes, is off-road or its rear axle is in an intersection.
    """
    steps = config.ttc_future_steps
    boxes, valid = _agents_ahead_in_time(scenes, max(steps), config.dt)
    frames = scenes.poses.shape[1]
    heading = ego_boxes[..., 2]
    moving = (ego_speed >= config.ttc_stopped_speed)[..., None]
    events, at_fault = [], []
    for k in steps:  # events are ordered (frame, k), as NAVSIM's loops visit them
        shifted = ego_boxes.copy()
        shifted[..., 0] += ego_speed * np.cos(heading) * k * config.dt
        shifted[..., 1] += ego_speed * np.sin(heading) * k * config.dt
        agents = boxes[:, k:k + frames]
        hit = boxes_overlap(shifted[:, :, None], agents) & valid[:, k:k + frames] & moving
        angle = _relative_angle(scenes.poses, agents[..., :2])
        ahead = angle < math.radians(config.ahead_angle_deg)
        behind = angle > math.radians(config.behind_angle_deg)
        events.append(hit)
        at_fault.append(ahead | (off_lane_or_junction[..., None] & ~behind))
    b, n = ego_boxes.shape[0], scenes.boxes.shape[2]
    order = (b, frames * len(steps), n)
    counted = _first_counted(np.stack(events, 2).reshape(order), np.stack(at_fault, 2).reshape(order))
    infraction = counted.any(axis=2).reshape(b, frames, len(steps)).any(axis=2)
    first = np.where(infraction.any(axis=1), np.argmax(infraction, axis=1), -1)
    return np.where(infraction.any(axis=1), 0.0, 1.0), first


# ----------------------------------------------------------------------------------------------------------
# progress


def route_progress(ego_boxes: FloatArray, routes: list[FloatArray]) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Arc length of the ego centre on its route at the first and last frame and the route length, each ``[B]``.

    ``ego_boxes [B, F, 5]``; ``routes`` one polyline ``[P_b, 2]`` per scene.
    """
    start, end, length = (np.empty(len(routes)) for _ in range(3))
    for i, route in enumerate(routes):  # routes differ in length; one vectorised projection per scene
        s, _ = project_to_polyline(route, ego_boxes[i, [0, -1], :2])
        start[i], end[i] = s
        length[i] = polyline_arclength(route)[-1]
    return start, end, length


def ego_progress_score(
    progress: ArrayLike, reference_progress: ArrayLike, multiplier: ArrayLike, threshold: float = 5.0
) -> FloatArray:
    """NAVSIM's normalised ego progress EP ``[B]``.

    The ego's raw progress (m, clipped at 0) counts only where ``multiplier = NC * DAC`` > 0; it is divided by the
    larger of itself and the reference planner's progress. If that larger value is <= ``threshold`` (5 m) the
    scene offers no meaningful progress and EP = 1 (0 where the multiplier is 0). All arguments ``[B]``.
    """
    multiplier = np.asarray(multiplier, dtype=np.float64)
    ego = np.clip(np.asarray(progress, dtype=np.float64), 0.0, None) * multiplier
    best = np.maximum(ego, np.clip(np.asarray(reference_progress, dtype=np.float64), 0.0, None))
    normalised = ego / np.maximum(best, 1e-12)
    return np.where(best > threshold, normalised, np.where(multiplier > 0, 1.0, 0.0))


# ----------------------------------------------------------------------------------------------------------
# the PDM score


def _subscores(
    scenes: _Scenes,
    routes: list[FloatArray],
    reference_progress: FloatArray,
    is_drivable: PointTest,
    shape: EgoShape,
    config: PDMConfig,
    lane_of: PointTest | None,
    in_intersection: PointTest | None,
    ego_speed: ArrayLike | None,
    ego_accel: ArrayLike | None,
) -> dict[str, FloatArray]:
    b, f = scenes.poses.shape[:2]
    ego_boxes = ego_center_boxes(scenes.poses, shape)
    corners = box_corners(ego_boxes)
    if ego_speed is None:
        ego_speed, _ = ego_velocity_and_acceleration(scenes.poses, config.dt)
    else:
        ego_speed = _finite("ego_speed", ego_speed, (b, f))
    off_road, multiple_lanes, intersection = _ego_areas(corners, scenes.poses[..., :2], is_drivable, lane_of,
                                                        in_intersection)
    off_lane = off_road | multiple_lanes
    nc, contact, collision_frame = _no_at_fault_collision(scenes, ego_boxes, ego_speed, off_lane, config)
    dac = np.where(off_road.any(axis=1), 0.0, 1.0)
    ttc, ttc_frame = _time_to_collision(scenes, ego_boxes, ego_speed, off_lane | intersection, config)
    start, end, route_length = route_progress(ego_boxes, routes)
    progress = np.clip(end - start, 0.0, None)
    ep = ego_progress_score(progress, reference_progress, nc * dac, config.progress_distance_threshold)
    comfort = comfort_metrics(scenes.poses, config.dt, config.comfort, ego_accel)["comfortable"].astype(np.float64)
    weighted = (config.progress_weight * ep + config.ttc_weight * ttc + config.comfort_weight * comfort) / (
        config.progress_weight + config.ttc_weight + config.comfort_weight)
    return {
        "nc": nc, "dac": dac, "ttc": ttc, "ep": ep, "c": comfort, "pdms": nc * dac * weighted,
        "progress": progress, "collision": contact.astype(np.float64),
        "collision_frame": collision_frame.astype(np.float64), "ttc_frame": ttc_frame.astype(np.float64),
        "route_start": start, "route_end": end, "route_length": route_length,
    }


def pdm_scores(
    ego_poses: ArrayLike,
    agent_boxes: ArrayLike,
    agent_valid: ArrayLike,
    agent_velocity: ArrayLike,
    is_drivable: PointTest,
    route: ArrayLike | Sequence[ArrayLike],
    reference_progress: ArrayLike,
    *,
    shape: EgoShape = EgoShape(),
    config: PDMConfig = PDMConfig(),
    agent_static: ArrayLike | None = None,
    lane_of: PointTest | None = None,
    in_intersection: PointTest | None = None,
    ego_speed: ArrayLike | None = None,
    ego_accel: ArrayLike | None = None,
) -> dict[str, FloatArray]:
    """NAVSIM's PDM score of B simulated plans (see the module docstring for each sub-score's rule).

    Args:
        ego_poses: rear-axle poses (x, y, heading) ``[B, T+1, 3]`` at ``config.dt`` (the plan after tracking
            simulation, frame 0 = now; T = 40 for 4 s at 10 Hz), world frame.
        agent_boxes: other vehicles' centred boxes (x, y, heading, length, width) ``[B, T+1, N, 5]``.
        agent_valid: ``[B, T+1, N]`` bool, which agent rows exist.
        agent_velocity: world-frame (vx, vy) ``[B, T+1, N, 2]``.
        is_drivable: ``xy [..., 2] -> bool [...]``, whether points lie on the drivable area.
        route: the route centre line for progress: one polyline ``[P, 2]`` shared by all plans or one per plan.
        reference_progress: ``[B]`` m, the reference (expert) planner's progress along the route over the horizon.
        shape: ego footprint.
        config: thresholds and weights.
        agent_static: ``[B, N]`` bool, static objects (an at-fault collision scores 0.5, not 0). Default none.
        lane_of: ``xy [..., 2] -> int [...]`` lane id per point (-1 = none), for NAVSIM's "multiple lanes" test;
            without it the ego never counts as straddling lanes.
        in_intersection: ``xy [..., 2] -> bool [...]``, for the TTC rule in intersections; default never.
        ego_speed: ``[B, T+1]`` m/s, derived from the poses if None.
        ego_accel: ``[B, T+1, 2]`` body-frame (lon, lat) m/s^2, derived from the poses if None.

    Returns:
        ``[B]`` float arrays: "nc", "dac", "ttc", "ep", "c", "pdms"; plus "progress" (m), "collision" (1 if the ego
        touched any agent, at fault or not), "collision_frame" / "ttc_frame" (first infraction frame, -1 if none),
        "route_start", "route_end" (arc length of the ego centre on the route), "route_length".
    """
    scenes = _check_scenes(ego_poses, agent_boxes, agent_valid, agent_velocity, agent_static)
    b = scenes.poses.shape[0]
    reference = _finite("reference_progress", reference_progress, (b,))
    return _subscores(scenes, _routes(route, b), reference, is_drivable, shape, config, lane_of, in_intersection,
                      ego_speed, ego_accel)


def episode_scores(
    ego_poses: ArrayLike,
    agent_boxes: ArrayLike,
    agent_valid: ArrayLike,
    agent_velocity: ArrayLike,
    is_drivable: PointTest,
    route: ArrayLike | Sequence[ArrayLike],
    reference_progress: ArrayLike,
    *,
    n_frames: ArrayLike | None = None,
    shape: EgoShape = EgoShape(),
    config: PDMConfig = PDMConfig(comfort=EPISODE_COMFORT),
    agent_static: ArrayLike | None = None,
    lane_of: PointTest | None = None,
    in_intersection: PointTest | None = None,
) -> dict[str, FloatArray]:
    """Closed-loop PDM-style scores of B whole episodes, plus collision and route completion.

    The same rules as :func:`pdm_scores` applied to each episode's full history: NC = 0 after an at-fault
    collision anywhere, DAC = 0 if the ego ever left the drivable area, TTC = 0 after any TTC infraction,
    EP = the ego's route progress against ``reference_progress`` (the expert's progress on the same scene over the
    same time), C = nuPlan's closed-loop comfort (:data:`EPISODE_COMFORT` windows by default).

    Args:
        ego_poses, agent_boxes, agent_valid, agent_velocity: as in :func:`pdm_scores` over F frames
            ``[B, F, ...]``; episodes shorter than F are padded at the end and say their length in ``n_frames``.
        is_drivable, route, reference_progress, shape, config, agent_static, lane_of, in_intersection: as in
            :func:`pdm_scores`.
        n_frames: ``[B]`` int, frames of each episode (>= 5); default all F.

    Returns:
        ``[B]`` arrays: everything :func:`pdm_scores` returns, plus "route_completion" = the fraction of the route
        remaining at the start that the ego covered, in [0, 1]. Means over B give the collision rate etc.
    """
    scenes = _check_scenes(ego_poses, agent_boxes, agent_valid, agent_velocity, agent_static)
    b, f = scenes.poses.shape[:2]
    lengths = np.full(b, f) if n_frames is None else np.asarray(n_frames)
    if lengths.shape != (b,) or np.any(lengths < 5) or np.any(lengths > f):
        raise ValueError(f"n_frames must be [{b}] integers in [5, {f}], got {lengths}")
    reference = _finite("reference_progress", reference_progress, (b,))
    routes = _routes(route, b)
    rows = []
    for i in range(b):  # episodes differ in length; each is scored as a batch of one
        n = int(lengths[i])
        one = _Scenes(scenes.poses[i:i + 1, :n], scenes.boxes[i:i + 1, :n], scenes.valid[i:i + 1, :n],
                      scenes.velocity[i:i + 1, :n], scenes.static[i:i + 1])
        rows.append(_subscores(one, routes[i:i + 1], reference[i:i + 1], is_drivable, shape, config, lane_of,
                               in_intersection, None, None))
    out = {key: np.concatenate([row[key] for row in rows]) for key in rows[0]}
    remaining = np.maximum(out["route_length"] - out["route_start"], 1e-9)
    out["route_completion"] = np.clip(out["progress"] / remaining, 0.0, 1.0)
    return out


def aggregate(scores: dict[str, FloatArray]) -> dict[str, float]:
    """Means over the batch of every [B] score (the benchmark's reported numbers; "collision" -> a rate)."""
    return {key: float(np.mean(value)) for key, value in scores.items() if not key.endswith("_frame")}


# ----------------------------------------------------------------------------------------------------------
# displacement errors


PLAN_ERROR_KEYS = ("ade", "fde", "heading_error")


def plan_errors(plans: ArrayLike, expert: ArrayLike) -> dict[str, FloatArray]:
    """Displacement and heading errors of plans against the expert's (nuScenes-style L2, plus heading).

    Args:
        plans, expert: ego-frame poses (x, y, heading) ``[B, H, 3]``.

    Returns:
        ``[B]`` arrays: "ade" (mean over the poses of the xy distance, m), "fde" (the last pose's, m) and
        "heading_error" (mean over the poses of the absolute heading difference on the circle, rad).
    """
    plans = _finite("plans", plans, (None, None, 3))
    expert = _finite("expert", expert, plans.shape)
    if not (np.isfinite(plans).all() and np.isfinite(expert).all()):
        raise ValueError("plans and expert must be finite")
    distance = np.linalg.norm(plans[..., :2] - expert[..., :2], axis=-1)
    turn = np.angle(np.exp(1j * (plans[..., 2] - expert[..., 2])))
    return {"ade": distance.mean(-1), "fde": distance[:, -1], "heading_error": np.abs(turn).mean(-1)}


# ----------------------------------------------------------------------------------------------------------
# mode diversity


def mode_diversity(modes: ArrayLike, shape: EgoShape = EgoShape(), substeps: int = 2) -> FloatArray:
    """DiffusionDrive's mode diversity D = 1 - (1/K) sum_i Area(tau_i ∩ U) / Area(tau_i ∪ U), U = union_j tau_j.

    Liao et al. (2025), eq. 3. The area of a trajectory is the area its ego footprint sweeps, starting from the
    current pose (the ego-frame origin): the poses are densified by ``substeps`` - 1 linearly interpolated poses
    per interval (heading along the shortest arc) and the footprint's sweep between consecutive poses is the convex
    hull of the two boxes (exact for a translation; for a turn it over-covers by a sliver that shrinks with
    ``substeps``). Since tau_i lies inside U, each ratio is Area(tau_i) / Area(U): D = 0 when all modes coincide
    and approaches 1 - 1/K for K disjoint modes of equal area. Areas are exact polygon areas (shapely).

    Args:
        modes: ego-frame rear-axle poses (x, y, heading) ``[B, K, H, 3]``, e.g. K modes of the 8-pose plan.
        shape: ego footprint.
        substeps: pose intervals are split into this many pieces (>= 1).

    Returns:
        ``[B]`` diversity in [0, 1).
    """
    modes = _finite("modes", modes, (None, None, None, 3))
    if not np.all(np.isfinite(modes)):
        raise ValueError("modes has NaN or infinite entries")
    if int(substeps) != substeps or substeps < 1:
        raise ValueError(f"substeps must be an integer >= 1, got {substeps}")
    b, k = modes.shape[:2]
    poses = np.concatenate([np.zeros((b, k, 1, 3)), modes], axis=2)
    step = np.diff(poses, axis=2)
    step[..., 2] = (step[..., 2] + np.pi) % (2 * np.pi) - np.pi
    frac = (np.arange(substeps) / substeps)[:, None]  # [S, 1]
    dense = poses[:, :, :-1, None, :] + frac * step[:, :, :, None, :]  # [B, K, H, S, 3]
    dense = np.concatenate([dense.reshape(b, k, -1, 3), poses[:, :, -1:]], axis=2)  # [B, K, M, 3]
    corners = box_corners(ego_center_boxes(dense, shape))  # [B, K, M, 4, 2]
    pairs = np.concatenate([corners[:, :, :-1], corners[:, :, 1:]], axis=3)  # [B, K, M - 1, 8, 2]
    sweeps = shapely.convex_hull(shapely.multipoints(pairs))
    swept = shapely.union_all(sweeps, axis=-1)  # [B, K]
    union = shapely.union_all(swept, axis=-1)  # [B]
    ratio = shapely.area(swept) / shapely.area(union)[:, None]
    return 1.0 - ratio.mean(axis=-1)


__all__ = [
    "EPISODE_COMFORT",
    "SCORE_KEYS",
    "ComfortLimits",
    "EgoShape",
    "PDMConfig",
    "aggregate",
    "comfort_metrics",
    "ego_center_boxes",
    "ego_progress_score",
    "ego_velocity_and_acceleration",
    "episode_scores",
    "mode_diversity",
    "pdm_scores",
    "route_progress",
]
