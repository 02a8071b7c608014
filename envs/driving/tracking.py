"""Tracking a planned trajectory with the ego's kinematic bicycle: pure pursuit + a time-indexed speed law.

A plan is ``[S, 8, 3]`` ego-frame poses (x, y, heading) at t = 0.5, 1.0, ..., 4.0 s after the replanning tick.
:class:`PlanTracker` stores it in the world frame with the tick's pose prepended (t = 0), then, every sim step:

- **steering, pure pursuit** (Coulter 1992): project the rear axle onto the plan polyline, take the point a
  lookahead distance ``Ld = max(min_lookahead, lookahead_time * v)`` further along (past the last pose, straight
  on along the plan's final heading), and steer onto the circle through it: curvature ``kappa = 2 y / (x^2 + y^2)``
  in the ego frame, steer = atan(L kappa). The final heading, not the direction of the last segment, continues the
  path because a plan that slows to a stop has last segments a few centimetres long, whose direction a centimetre
  of lateral noise turns by tens of degrees; the pursuit point 3 m out would turn with it;
- **speed**: the plan is timed, so the reference arc length is ``s_ref(t)`` (piecewise linear in t through the
  knots). The law applies the constant acceleration that reaches ``s_ref(t + T)`` in ``T`` seconds:
  ``a = 2 (s_ref(t + T) - s - v T) / T^2`` (a PD law on the along-track error with damping ratio 0.71);
  past 4 s the plan's last speed continues.

The bicycle then applies its own jerk, acceleration and steering limits.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from trajgen.envs.driving.geometry import poses_from_ego_frame, to_ego_frame
from trajgen.envs.driving.vehicles import BicycleLimits

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]

POSE_DT = 0.5
"""Seconds between plan poses."""
N_POSES = 8
"""Poses in a plan."""


def check_plan(plan: np.ndarray, n_scenes: int) -> FloatArray:
    """``plan`` as float64 ``[S, 8, 3]``; ValueError naming ``action`` for a wrong shape or NaN/inf."""
    arr = np.asarray(plan, dtype=np.float64)
    if arr.shape != (n_scenes, N_POSES, 3):
        raise ValueError(f"action must be a plan of shape [{n_scenes}, {N_POSES}, 3] (x, y, heading in the ego frame "
                         f"at t = 0.5 ... 4.0 s), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("action (plan) has NaN or infinite entries")
    return arr


PATH_HEADING_MIN_CHORD = 0.5
"""m: the shortest chord whose direction :func:`headings_from_path` trusts (1 m/s over the 1 s between the poses
around it); over a shorter one, centimetres of lateral jitter would turn the direction by degrees"""


def headings_from_path(plan: np.ndarray, min_chord: float = PATH_HEADING_MIN_CHORD) -> FloatArray:
    """The plan with each pose's heading replaced by the direction its (x, y) path takes there, ``[S, 8, 3]``.

    The ego's kinematic bicycle moves along its rear axle's heading, so a feasible plan's headings are the tangents
    of its path (the rule expert's plans match them to 0.004 rad on average). The tangent at pose i is the direction
    of the chord from pose i - 1 to pose i + 1 (the ego at the origin before the first pose; the last pose uses its
    last segment). Where that chord is shorter than ``min_chord`` metres (the plan stops) the plan's own heading is
    kept.

    Args:
        plan: ``[S, 8, 3]`` ego-frame poses (x, y, heading), as :func:`check_plan` accepts them.
        min_chord: shortest chord, m, whose direction replaces a heading.
    """
    arr = check_plan(plan, len(plan) if np.ndim(plan) == 3 else 1)
    points = np.concatenate([np.zeros_like(arr[:, :1, :2]), arr[..., :2]], axis=1)  # [S, 9, 2], the ego first
    chord = np.concatenate([points[:, 2:], points[:, -1:]], axis=1) - points[:, :-1]  # [S, 8, 2]
    long_enough = np.hypot(chord[..., 0], chord[..., 1]) >= min_chord
    out = arr.copy()
    out[..., 2] = np.where(long_enough, np.arctan2(chord[..., 1], chord[..., 0]), arr[..., 2])
    return out


def plan_infeasible(plan: FloatArray, speed: FloatArray, limits: BicycleLimits) -> BoolArray:
    """Whether a plan needs more than the bicycle can do, ``[S]`` bool (reported, then tracked anyway).

    Checks, with margins for the piecewise-linear approximation: the first pose beyond the distance reachable
    in 0.5 s from the current speed (+-1 m), speed over max_speed + 1 m/s, acceleration
    between knots outside [-(max_decel + 1), max_accel + 1] m/s^2, curvature (turn per metre between
    segments longer than 0.5 m) over 1.25 tan(max_steer) / L, and driving backwards (a segment pointing more
    than 100 deg away from the previous direction).

    Args:
        plan: ``[S, 8, 3]`` ego-frame poses.  speed: ``[S]`` current speed, m/s.
    """
    pts = np.concatenate([np.zeros((plan.shape[0], 1, 2)), plan[..., :2]], axis=1)  # [S, 9, 2]
    seg = np.diff(pts, axis=1)
    length = np.linalg.norm(seg, axis=-1)
    v = np.concatenate([speed[:, None], length / POSE_DT], axis=1)
    # the first knot's speed is the mean over the first interval, so compare half-interval accelerations there
    acc = np.diff(v, axis=1) / POSE_DT
    acc[:, 0] *= 0.5
    direction = np.arctan2(seg[..., 1], seg[..., 0])
    direction = np.concatenate([np.zeros((plan.shape[0], 1)), direction], axis=1)
    turn = np.abs((np.diff(direction, axis=1) + np.pi) % (2 * np.pi) - np.pi)
    moving = length > 0.5
    prev_moving = np.concatenate([np.ones((plan.shape[0], 1), dtype=bool), moving[:, :-1]], axis=1)
    kappa_max = 1.25 * np.tan(limits.max_steer) / limits.wheelbase
    too_curved = moving & prev_moving & (turn / np.maximum(length, 1e-6) > kappa_max)
    backwards = moving & prev_moving & (turn > np.deg2rad(100.0))
    # the first knot from the current speed: the reachable distance in 0.5 s under full braking / throttle
    d_min = np.where(speed > limits.max_decel * POSE_DT, speed * POSE_DT - 0.5 * limits.max_decel * POSE_DT**2,
                     speed**2 / (2.0 * limits.max_decel))
    d_max = speed * POSE_DT + 0.5 * limits.max_accel * POSE_DT**2
    first_out = (length[:, 0] < d_min - 1.0) | (length[:, 0] > d_max + 1.0)
    return (first_out | np.any(v[:, 1:] > limits.max_speed + 1.0, axis=1)
            | np.any((acc > limits.max_accel + 1.0) | (acc < -(limits.max_decel + 1.0)), axis=1)
            | np.any(too_curved | backwards, axis=1))


class PlanTracker:
    """Pure pursuit + time-indexed speed control of S ego bicycles along their plans.

    Args:
        limits: the bicycle's limits (wheelbase, steering and acceleration bounds).
        lookahead_time: pure-pursuit lookahead per m/s of speed, s.
        min_lookahead: smallest lookahead distance, m.
        speed_horizon: T of the speed law, s.
    """

    def __init__(self, limits: BicycleLimits, lookahead_time: float = 0.6, min_lookahead: float = 3.0,
                 speed_horizon: float = 1.0) -> None:
        self.limits = limits
        self.lookahead_time = lookahead_time
        self.min_lookahead = min_lookahead
        self.speed_horizon = speed_horizon
        self.plan_world: FloatArray | None = None  # [S, 9, 3], knot 0 = pose at the tick
        self.knot_s: FloatArray | None = None  # [S, 9] arc length at each knot

    def set_plan(self, plan: FloatArray, ego_pose: FloatArray, mask: BoolArray | None = None) -> None:
        """Store ego-frame plans ``[S, 8, 3]`` taken at ``ego_pose [S, 3]`` (only rows where ``mask [S]``)."""
        world = np.concatenate([ego_pose[:, None, :], poses_from_ego_frame(plan, ego_pose[:, None, :])], axis=1)
        knot_s = np.concatenate([np.zeros((plan.shape[0], 1)),
                                 np.cumsum(np.linalg.norm(np.diff(world[..., :2], axis=1), axis=-1), axis=1)], axis=1)
        if self.plan_world is None or mask is None:
            self.plan_world, self.knot_s = world, knot_s
        else:
            self.plan_world = np.where(mask[:, None, None], world, self.plan_world)
            self.knot_s = np.where(mask[:, None], knot_s, self.knot_s)

    def control(self, ego_pose: FloatArray, speed: FloatArray, t: FloatArray) -> tuple[FloatArray, FloatArray]:
        """Acceleration and steering commands ``([S], [S])`` at time ``t [S]`` s after each plan's tick."""
        if self.plan_world is None or self.knot_s is None:
            raise RuntimeError("PlanTracker.control called before set_plan")
        pts = to_ego_frame(self.plan_world[..., :2], ego_pose[:, None, :])  # [S, 9, 2], current ego frame
        s_now = _project(pts, self.knot_s)
        lookahead = np.maximum(self.min_lookahead, self.lookahead_time * speed)
        end_heading = self.plan_world[:, -1, 2] - ego_pose[:, 2]  # the final pose's heading in the ego frame
        target = _point_at(pts, self.knot_s, s_now + lookahead, end_heading)
        d2 = np.maximum(np.sum(target**2, axis=-1), 1e-6)
        kappa = 2.0 * target[:, 1] / d2
        steer = np.arctan(self.limits.wheelbase * kappa)
        steer = np.where(self.knot_s[:, -1] - s_now < 0.5, 0.0, steer)  # plan (almost) over: wheels straight
        T = self.speed_horizon
        times = np.arange(N_POSES + 1) * POSE_DT
        s_ref = _interp_rows(t + T, times, self.knot_s)
        accel = 2.0 * (s_ref - s_now - speed * T) / T**2
        return accel, steer


def _project(pts: FloatArray, knot_s: FloatArray) -> FloatArray:
    """Arc length of the origin's projection onto each polyline ``pts [S, K, 2]`` (ends extended). ``[S]``."""
    a, b = pts[:, :-1], pts[:, 1:]
    seg = b - a
    len2 = np.sum(seg**2, axis=-1)
    t = np.where(len2 > 1e-12, np.sum(-a * seg, axis=-1) / np.maximum(len2, 1e-12), 0.0)
    n = seg.shape[1]
    lo = np.where(np.arange(n) == 0, -np.inf, 0.0)
    hi = np.where(np.arange(n) == n - 1, np.inf, 1.0)
    t = np.clip(t, lo, hi)
    d2 = np.sum((a + t[..., None] * seg) ** 2, axis=-1)
    d2 = np.where(len2 > 1e-12, d2, np.inf)
    k = np.argmin(d2, axis=1)
    rows = np.arange(pts.shape[0])
    seg_len = np.sqrt(len2[rows, k])
    return np.where(np.isinf(d2[rows, k]), 0.0, knot_s[rows, k] + t[rows, k] * seg_len)


def _point_at(pts: FloatArray, knot_s: FloatArray, s: FloatArray, end_heading: FloatArray) -> FloatArray:
    """Point at arc length ``s [S]`` along ``pts [S, K, 2]``; past the last point, straight on along
    ``end_heading [S]`` (radians, the frame of ``pts``). ``[S, 2]``."""
    rows = np.arange(pts.shape[0])
    beyond = s - knot_s[:, -1]
    ahead = pts[:, -1] + beyond[:, None] * np.stack([np.cos(end_heading), np.sin(end_heading)], axis=-1)
    k = np.clip(np.sum(knot_s[:, 1:-1] <= s[:, None], axis=1), 0, pts.shape[1] - 2)
    seg = pts[rows, k + 1] - pts[rows, k]
    # s lies inside segment k, which therefore has a length unless s sits exactly on its start
    direction = seg / np.maximum(np.linalg.norm(seg, axis=-1), 1e-9)[:, None]
    return np.where((beyond > 0)[:, None], ahead, pts[rows, k] + (s - knot_s[rows, k])[:, None] * direction)


def _interp_rows(x: FloatArray, xp: FloatArray, fp: FloatArray) -> FloatArray:
    """Row-wise linear interpolation, extrapolated past the last knot at the last slope (the plan's final
    speed continues). ``x [S], xp [K], fp [S, K] -> [S]``."""
    i = np.clip(np.searchsorted(xp, x, side="right") - 1, 0, xp.size - 2)
    w = np.maximum((x - xp[i]) / (xp[i + 1] - xp[i]), 0.0)
    rows = np.arange(fp.shape[0])
    return fp[rows, i] + w * (fp[rows, i + 1] - fp[rows, i])
