"""Batched vehicle models: the ego's kinematic bicycle and IDM lane followers.

Everything here is numpy float64 over a batch of ``N`` vehicles (or scenes): one call steps all of them,
with no Python loop over vehicles. Shapes are written ``[N]``.

- :class:`KinematicBicycle` — rear-axle kinematic bicycle with jerk, acceleration, steering-rate and
  steering limits, integrated exactly for inputs held constant over a step.
- :func:`idm_acceleration`, :func:`idm_equilibrium_gap` — the Intelligent Driver Model (Treiber, Hennecke
  & Helbing 2000) as pure functions; :class:`IDMParams` and :func:`sample_idm_params` for heterogeneous
  traffic.
- :class:`LaneFollowers` — vehicles moving along 1-D lane arc-length coordinates with IDM speed control
  against the nearest leader on their lane, stepped with the ballistic update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
BoolArray = NDArray[np.bool_]

# ----------------------------------------------------------------------------------------------------------
# input checks


def _check_dt(dt: float) -> float:
    """Return ``dt`` as a float; raise ValueError naming ``dt`` unless it is finite and > 0."""
    dt = float(dt)
    if not math.isfinite(dt) or dt <= 0.0:
        raise ValueError(f"dt must be a finite positive number of seconds, got {dt}")
    return dt


def _vector(name: str, value: ArrayLike, n: int | None = None, *, allow_inf: bool = False) -> FloatArray:
    """``value`` as a float64 array ``[n]`` (a scalar is broadcast when ``n`` is given).

    Raises ValueError naming ``name`` for a wrong shape or a NaN (and an infinity unless ``allow_inf``).
    """
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0 and n is not None:
        arr = np.full(n, float(arr))
    if arr.ndim != 1 or (n is not None and arr.shape[0] != n):
        want = f"[{n}]" if n is not None else "[N]"
        raise ValueError(f"{name} must have shape {want} (or be a scalar), got shape {arr.shape}")
    bad = np.isnan(arr) if allow_inf else ~np.isfinite(arr)
    if bad.any():
        kind = "NaN" if allow_inf else "NaN or infinite"
        raise ValueError(f"{name} has {kind} entries at indices {np.flatnonzero(bad)[:5].tolist()}")
    return arr.copy()


def _require(name: str, arr: FloatArray, ok: BoolArray, rule: str) -> None:
    """Raise ValueError naming ``name`` where ``ok`` is False."""
    if not np.all(ok):
        idx = np.flatnonzero(~ok)[:5].tolist()
        raise ValueError(f"{name} must be {rule}; bad entries at indices {idx}: {arr[idx].tolist()}")


# ----------------------------------------------------------------------------------------------------------
# kinematic bicycle


@dataclass(frozen=True)
class BicycleLimits:
    """Actuation limits of the ego's kinematic bicycle (defaults: a mid-size passenger car)."""

    wheelbase: float = 2.7
    """L, metres between the axles; the turning radius is L / tan(steer)."""
    max_accel: float = 3.0
    """Largest forward acceleration, m/s^2."""
    max_decel: float = 8.0
    """Largest braking deceleration (a positive number), m/s^2."""
    max_jerk: float = 10.0
    """Largest change of acceleration, m/s^3: the acceleration moves at most max_jerk * dt per step."""
    max_steer: float = 0.6
    """Largest front-wheel angle, rad."""
    max_steer_rate: float = 0.8
    """Largest steering rate, rad/s: the steering angle moves at most max_steer_rate * dt per step."""
    max_speed: float = 30.0
    """Speed is clipped to [0, max_speed], m/s (no reversing)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not math.isfinite(value) or value <= 0.0:
                raise ValueError(f"BicycleLimits.{f.name} must be finite and > 0, got {value}")
        if self.max_steer >= math.pi / 2:
            raise ValueError(f"BicycleLimits.max_steer must be < pi/2 rad, got {self.max_steer}")


@dataclass
class BicycleState:
    """A snapshot of N bicycles: x, y (rear axle, m), heading (rad, in [-pi, pi)), speed (m/s),
    accel (m/s^2, the actuator's current value), steer (rad). Every field is ``[N]`` float64."""

    x: FloatArray
    y: FloatArray
    heading: FloatArray
    speed: FloatArray
    accel: FloatArray
    steer: FloatArray


def _rate_limit(current: FloatArray, command: FloatArray, max_step: float, lo: float, hi: float) -> FloatArray:
    """Move ``current`` towards ``command`` by at most ``max_step``, then clip to [lo, hi]. ``[N]``."""
    return np.clip(current + np.clip(command - current, -max_step, max_step), lo, hi)


def _travelled(speed: FloatArray, accel: FloatArray, dt: float, max_speed: float) -> tuple[FloatArray, FloatArray]:
    """Exact distance and end speed under constant ``accel`` with speed clipped to [0, max_speed].

    The speed moves linearly until it hits a bound (time ``tau``), then stays there. Returns
    ``(distance [N], new_speed [N])``.
    """
    new_speed = np.clip(speed + accel * dt, 0.0, max_speed)
    with np.errstate(divide="ignore", invalid="ignore"):
        tau = np.where(accel != 0.0, (new_speed - speed) / accel, dt)
    tau = np.clip(tau, 0.0, dt)
    distance = speed * tau + 0.5 * accel * tau**2 + new_speed * (dt - tau)
    return np.maximum(distance, 0.0), new_speed


def _arc_step(
    x: FloatArray, y: FloatArray, heading: FloatArray, distance: FloatArray, curvature: FloatArray
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Move along an arc of constant ``curvature`` (1/m) for arc length ``distance``. All ``[N]``.

    The chord of an arc with heading change dh has length distance * sin(dh/2)/(dh/2) and points along
    heading + dh/2; with numpy's sinc this is one exact expression that is the straight line at dh = 0.
    """
    dh = curvature * distance
    chord = distance * np.sinc(dh / (2.0 * np.pi))
    mid = heading + 0.5 * dh
    return x + chord * np.cos(mid), y + chord * np.sin(mid), heading + dh


def _wrap_angle(angle: FloatArray) -> FloatArray:
    """Wrap to [-pi, pi). ``[N]``."""
    return (angle + np.pi) % (2.0 * np.pi) - np.pi


class KinematicBicycle:
    """N rear-axle kinematic bicycles stepped together (the ego vehicle of N scenes).

    Dynamics: x' = v cos(h), y' = v sin(h), h' = v tan(steer) / L, v' = a, with v in [0, max_speed].
    Each :meth:`step` first rate-limits the commands (jerk, steering rate), then clips them (acceleration,
    steering angle), holds them over the step and integrates exactly: with steer and accel constant the
    path has constant curvature tan(steer)/L, so the rear axle moves along an arc (a straight line when
    the curvature is zero) whose length is the exact distance under the clipped speed profile. Constant
    speed and steer therefore trace a circle of radius L / tan(steer) to rounding error.

    Args:
        x, y: rear-axle position, m, ``[N]``.
        heading: yaw, rad, ``[N]``.
        speed: m/s, ``[N]``, within [0, limits.max_speed].
        accel: current actuator acceleration, m/s^2, ``[N]`` or scalar (default 0).
        steer: current steering angle, rad, ``[N]`` or scalar (default 0).
        limits: shared :class:`BicycleLimits`.
    """

    def __init__(
        self,
        x: ArrayLike,
        y: ArrayLike,
        heading: ArrayLike,
        speed: ArrayLike,
        accel: ArrayLike = 0.0,
        steer: ArrayLike = 0.0,
        limits: BicycleLimits | None = None,
    ) -> None:
        self.limits = limits or BicycleLimits()
        self.x = _vector("x", x)
        n = self.x.shape[0]
        self.y = _vector("y", y, n)
        self.heading = _wrap_angle(_vector("heading", heading, n))
        self.speed = _vector("speed", speed, n)
        self.accel = _vector("accel", accel, n)
        self.steer = _vector("steer", steer, n)
        lim = self.limits
        _require("speed", self.speed, (self.speed >= 0) & (self.speed <= lim.max_speed), f"in [0, {lim.max_speed}]")
        _require("accel", self.accel, (self.accel >= -lim.max_decel) & (self.accel <= lim.max_accel),
                 f"in [-{lim.max_decel}, {lim.max_accel}]")
        _require("steer", self.steer, np.abs(self.steer) <= lim.max_steer, f"within +-{lim.max_steer}")

    @property
    def n(self) -> int:
        """Number of vehicles N."""
        return self.x.shape[0]

    @property
    def state(self) -> BicycleState:
        """A copy of the current state (each field ``[N]``)."""
        return BicycleState(*(a.copy() for a in (self.x, self.y, self.heading, self.speed, self.accel, self.steer)))

    def step(self, accel_cmd: ArrayLike, steer_cmd: ArrayLike, dt: float = 0.1) -> BicycleState:
        """Advance all N vehicles by ``dt`` seconds under the commands and return the new state.

        Args:
            accel_cmd: desired acceleration, m/s^2, ``[N]`` or scalar.
            steer_cmd: desired steering angle, rad, ``[N]`` or scalar.
            dt: step length, s (> 0).
        """
        dt = _check_dt(dt)
        accel_cmd = _vector("accel_cmd", accel_cmd, self.n)
        steer_cmd = _vector("steer_cmd", steer_cmd, self.n)
        lim = self.limits
        self.accel = _rate_limit(self.accel, accel_cmd, lim.max_jerk * dt, -lim.max_decel, lim.max_accel)
        self.steer = _rate_limit(self.steer, steer_cmd, lim.max_steer_rate * dt, -lim.max_steer, lim.max_steer)
        distance, self.speed = _travelled(self.speed, self.accel, dt, lim.max_speed)
        curvature = np.tan(self.steer) / lim.wheelbase
        self.x, self.y, heading = _arc_step(self.x, self.y, self.heading, distance, curvature)
        self.heading = _wrap_angle(heading)
        return self.state


# ----------------------------------------------------------------------------------------------------------
# Intelligent Driver Model


def idm_acceleration(
    v: ArrayLike,
    v0: ArrayLike,
    gap: ArrayLike,
    dv: ArrayLike,
    *,
    a_max: ArrayLike,
    b: ArrayLike,
    s0: ArrayLike,
    T: ArrayLike,
    delta: ArrayLike = 4.0,
) -> FloatArray:
    """IDM acceleration (Treiber, Hennecke & Helbing 2000), ``[N]``.

    a = a_max [1 - (v/v0)^delta - (s*/gap)^2],  s* = s0 + max(0, v T + v dv / (2 sqrt(a_max b))).

    Args:
        v: own speed, m/s, ``[N]`` (>= 0).
        v0: desired speed, m/s, ``[N]`` or scalar (> 0).
        gap: bumper-to-bumper distance to the leader, m, ``[N]`` or scalar; ``inf`` means free road.
            A gap <= 0 (overlap) is treated as 1e-6 m, i.e. a huge but finite braking demand.
        dv: approach rate v - v_leader, m/s, ``[N]`` or scalar (ignored where gap is inf).
        a_max, b: maximum acceleration and comfortable deceleration, m/s^2 (> 0).
        s0: jam distance, m (>= 0).  T: time headway, s (>= 0).  delta: acceleration exponent (> 0).
    """
    v = _vector("v", v)
    n = v.shape[0]
    _require("v", v, v >= 0, ">= 0")
    v0, a_max, b, s0, T, delta = _idm_params(n, v0=v0, a_max=a_max, b=b, s0=s0, T=T, delta=delta)
    gap = _vector("gap", gap, n, allow_inf=True)
    dv = _vector("dv", dv, n)
    free = np.isinf(gap) & (gap > 0)
    s_star = s0 + np.maximum(0.0, v * T + v * dv / (2.0 * np.sqrt(a_max * b)))
    interaction = np.where(free, 0.0, (s_star / np.where(free, 1.0, np.maximum(gap, 1e-6))) ** 2)
    return a_max * (1.0 - (v / v0) ** delta - interaction)


def idm_equilibrium_gap(
    v: ArrayLike, v0: ArrayLike, s0: ArrayLike, T: ArrayLike, delta: ArrayLike = 4.0
) -> FloatArray:
    """The gap at which IDM keeps speed ``v`` behind a leader at the same speed, m, ``[N]``.

    s_e(v) = (s0 + v T) / sqrt(1 - (v/v0)^delta); ``inf`` where v >= v0 (no finite gap holds that speed).
    Arguments as in :func:`idm_acceleration` (``v`` is ``[N]``, the rest ``[N]`` or scalars).
    """
    v = _vector("v", v)
    _require("v", v, v >= 0, ">= 0")
    v0, _, _, s0, T, delta = _idm_params(v.shape[0], v0=v0, a_max=1.0, b=1.0, s0=s0, T=T, delta=delta)
    free_term = 1.0 - (v / v0) ** delta
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(free_term > 0, (s0 + v * T) / np.sqrt(np.maximum(free_term, 0.0)), np.inf)


def _idm_params(n: int, **params: ArrayLike) -> tuple[FloatArray, ...]:
    """Check IDM parameters (v0, a_max, b, s0, T, delta) and broadcast each to ``[n]``."""
    out = []
    for name in ("v0", "a_max", "b", "s0", "T", "delta"):
        arr = _vector(name, params[name], n)
        positive = name in ("v0", "a_max", "b", "delta")
        _require(name, arr, arr > 0 if positive else arr >= 0, "> 0" if positive else ">= 0")
        out.append(arr)
    return tuple(out)


@dataclass
class IDMParams:
    """Per-vehicle IDM parameters, each ``[N]`` float64 (see :func:`idm_acceleration` for the meaning)."""

    v0: FloatArray
    """Desired speed, m/s."""
    T: FloatArray
    """Safe time headway, s."""
    s0: FloatArray
    """Jam (standstill) distance, m."""
    a_max: FloatArray
    """Maximum acceleration, m/s^2."""
    b: FloatArray
    """Comfortable deceleration, m/s^2."""
    delta: FloatArray | float = 4.0
    """Acceleration exponent (4 in the original paper); a scalar is broadcast to ``[N]``."""

    def __post_init__(self) -> None:
        self.v0 = _vector("v0", self.v0)
        checked = _idm_params(self.v0.shape[0], v0=self.v0, a_max=self.a_max, b=self.b, s0=self.s0, T=self.T,
                              delta=self.delta)
        self.v0, self.a_max, self.b, self.s0, self.T, self.delta = checked

    @property
    def n(self) -> int:
        """Number of vehicles N."""
        return self.v0.shape[0]

    def as_kwargs(self) -> dict[str, FloatArray | float]:
        """The keyword arguments of :func:`idm_acceleration` (everything but v0)."""
        return {"a_max": self.a_max, "b": self.b, "s0": self.s0, "T": self.T, "delta": self.delta}


HIGHWAY_V0_RANGE = (28.0, 36.0)
"""Desired speeds around Treiber & Kesting's highway value 120 km/h = 33.3 m/s."""
URBAN_V0_RANGE = (11.0, 17.0)
"""Desired speeds around the city value 50-54 km/h = 14-15 m/s."""


def sample_idm_params(
    n: int,
    rng: np.random.Generator,
    *,
    v0_range: tuple[float, float] = HIGHWAY_V0_RANGE,
    T_range: tuple[float, float] = (1.0, 2.0),
    a_max_range: tuple[float, float] = (1.0, 1.5),
    b_range: tuple[float, float] = (1.5, 2.0),
    s0_range: tuple[float, float] = (2.0, 2.0),
    delta: float = 4.0,
    aggressiveness_range: tuple[float, float] = (0.0, 1.0),
) -> IDMParams:
    """Draw heterogeneous IDM drivers for ``n`` vehicles; every field of the result is ``[n]``.

    Each vehicle draws an aggressiveness u ~ U(aggressiveness_range) (a sub-interval of [0, 1]) and a
    second independent u' ~ U(0, 1). Aggressive drivers (u -> 1) want higher speed, keep shorter
    headways and accelerate harder: v0 = lerp(v0_range, u), T = lerp(T_range, 1 - u),
    a_max = lerp(a_max_range, u); b and s0 use u'. Narrowing ``aggressiveness_range`` gives more
    homogeneous traffic. (Traffic density is the spawner's job, not a driver parameter.)

    Default ranges, from the literature:
      - Treiber, Hennecke & Helbing (2000), Phys. Rev. E 62, 1805: v0 = 120 km/h (33.3 m/s), T = 1.6 s,
        s0 = 2 m, a = 0.73 m/s^2, b = 1.67 m/s^2, delta = 4.
      - Treiber & Kesting (2013), Traffic Flow Dynamics, ch. 11: highway v0 = 120 km/h, city
        v0 = 54 km/h (15 m/s, see URBAN_V0_RANGE); T typically 0.8-2 s (1.5 s a common default);
        s0 = 2 m; a ~ 1 m/s^2 for cars (1-1.5); b ~ 1.5-2 m/s^2; delta = 4.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    ranges = {"v0_range": v0_range, "T_range": T_range, "a_max_range": a_max_range, "b_range": b_range,
              "s0_range": s0_range, "aggressiveness_range": aggressiveness_range}
    for name, (lo, hi) in ranges.items():
        if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 <= lo <= hi):
            raise ValueError(f"{name} must be finite with 0 <= low <= high, got {(lo, hi)}")
    if aggressiveness_range[1] > 1.0:
        raise ValueError(f"aggressiveness_range must lie within [0, 1], got {aggressiveness_range}")
    u = rng.uniform(*aggressiveness_range, size=n)
    u2 = rng.uniform(0.0, 1.0, size=n)

    def lerp(r: tuple[float, float], t: FloatArray) -> FloatArray:
        return r[0] + (r[1] - r[0]) * t

    return IDMParams(v0=lerp(v0_range, u), T=lerp(T_range, 1.0 - u), s0=lerp(s0_range, u2),
                     a_max=lerp(a_max_range, u), b=lerp(b_range, u2), delta=np.full(n, float(delta)))


# ----------------------------------------------------------------------------------------------------------
# lane followers


def find_leaders(lane: ArrayLike, s: ArrayLike) -> IntArray:
    """Index of each vehicle's nearest leader on the same lane, or -1, ``[N]`` int64.

    Vectorised: one lexsort by (lane, s), then each vehicle's leader is the next one in sorted order if it
    shares the lane. Lanes are open (no wrap-around): the front-most vehicle of each lane has no leader
    (-1) and therefore sees free road. Among vehicles at exactly the same s, the one later in sort order
    (higher index, lexsort is stable) counts as ahead.
    """
    s = _vector("s", s)
    lane = LaneFollowers._lane_ids(lane, s.shape[0])
    order = np.lexsort((np.arange(s.shape[0]), s, lane))
    same_lane_next = lane[order[1:]] == lane[order[:-1]]
    leaders = np.full(s.shape[0], -1, dtype=np.int64)
    leaders[order[:-1][same_lane_next]] = order[1:][same_lane_next]
    return leaders


@dataclass
class LaneFollowerState:
    """A snapshot of N lane followers: lane (int64), s (m, front bumper), v (m/s), accel (m/s^2), each
    ``[N]``; leader ``[N]`` int64 (-1 = free road) and gap ``[N]`` (m, inf = free road) used for accel."""

    lane: IntArray
    s: FloatArray
    v: FloatArray
    accel: FloatArray
    leader: IntArray
    gap: FloatArray


class LaneFollowers:
    """N vehicles driving along lane centre-lines in 1-D arc length, with IDM speed control.

    Each vehicle follows the nearest vehicle ahead on its own lane (:func:`find_leaders`); the gap is
    bumper to bumper, ``s_leader - length_leader - s`` (``s`` is the front bumper). Lanes are open: the
    front-most vehicle on a lane sees free road; what happens past a lane's end (despawn, hand-over to a
    successor lane) is the map's business. Vehicles marked ``fixed`` hold position at zero speed (parked
    cars, virtual stop lines) but still act as leaders. Vehicles keep their lane; lane changes come later.

    Behind a stopped leader IDM settles at a gap near s0: from above when a T^2 >= 2 s0 (the linearised
    gap error e'' + (2aT/s0) e' + (2a/s0) e = 0 is overdamped), otherwise with a small undershoot that is
    IDM's own (about 2% of s0 for a = 1, T = 1.5, s0 = 2), not an integration error.

    Args:
        lane: lane id per vehicle, ``[N]`` integers.
        s: front-bumper arc length along the lane, m, ``[N]``.
        v: speed, m/s, ``[N]`` (>= 0).
        params: per-vehicle :class:`IDMParams` with N entries.
        length: vehicle length, m, ``[N]`` or scalar (default 4.5).
        fixed: ``[N]`` bool or None (none fixed).
    """

    def __init__(
        self,
        lane: ArrayLike,
        s: ArrayLike,
        v: ArrayLike,
        params: IDMParams,
        length: ArrayLike = 4.5,
        fixed: ArrayLike | None = None,
    ) -> None:
        self.s = _vector("s", s)
        n = self.s.shape[0]
        self.lane = self._lane_ids(lane, n)
        self.v = _vector("v", v, n)
        _require("v", self.v, self.v >= 0, ">= 0")
        if params.n != n:
            raise ValueError(f"params must describe {n} vehicles (one per entry of s), got {params.n}")
        self.params = params
        self.length = _vector("length", length, n)
        _require("length", self.length, self.length > 0, "> 0")
        self.fixed = np.zeros(n, dtype=bool) if fixed is None else self._mask("fixed", fixed, n)
        self.v[self.fixed] = 0.0
        self.accel = np.zeros(n)

    @staticmethod
    def _lane_ids(lane: ArrayLike, n: int) -> IntArray:
        arr = np.asarray(lane)
        if arr.shape != (n,) or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"lane must be an integer array of shape [{n}], got {arr.dtype} shape {arr.shape}")
        return arr.astype(np.int64)

    @staticmethod
    def _mask(name: str, mask: ArrayLike, n: int) -> BoolArray:
        arr = np.asarray(mask)
        if arr.shape != (n,) or arr.dtype != np.bool_:
            raise ValueError(f"{name} must be a bool array of shape [{n}], got {arr.dtype} shape {arr.shape}")
        return arr.copy()

    @property
    def n(self) -> int:
        """Number of vehicles N."""
        return self.s.shape[0]

    def leaders(self) -> tuple[IntArray, FloatArray, FloatArray]:
        """Current ``(leader [N] int64, gap [N] m, dv [N] m/s)``; gap = inf and dv = 0 on free road."""
        leader = find_leaders(self.lane, self.s)
        has = leader >= 0
        gap = np.full(self.n, np.inf)
        dv = np.zeros(self.n)
        gap[has] = self.s[leader[has]] - self.length[leader[has]] - self.s[has]
        dv[has] = self.v[has] - self.v[leader[has]]
        return leader, gap, dv

    def step(self, dt: float = 0.1) -> LaneFollowerState:
        """Advance all N vehicles by ``dt`` seconds with IDM and the ballistic update; return the new state.

        Ballistic update (Treiber & Kanagaraj 2015, the scheme recommended for IDM): with a = IDM(t),
        v' = max(v + a dt, 0) and s' = s + (v + v') dt / 2, except that a vehicle that would stop within
        the step stops exactly: s' = s - v^2 / (2 a). Speeds are never negative.
        """
        dt = _check_dt(dt)
        leader, gap, dv = self.leaders()
        accel = idm_acceleration(self.v, self.params.v0, gap, dv, **self.params.as_kwargs())
        accel[self.fixed] = 0.0
        new_v = self.v + accel * dt
        stops = new_v < 0.0
        with np.errstate(divide="ignore", invalid="ignore"):
            ds = np.where(stops, -self.v**2 / (2.0 * accel), 0.5 * (self.v + new_v) * dt)
        self.s = self.s + ds
        self.v = np.maximum(new_v, 0.0)
        self.accel = accel
        return LaneFollowerState(self.lane.copy(), self.s.copy(), self.v.copy(), accel.copy(), leader, gap)
