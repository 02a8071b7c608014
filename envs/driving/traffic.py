"""Batched traffic: S scenes x V vehicles following map paths with IDM, yielding and MOBIL lane changes.

Vehicle ``V - 1`` of every scene is the ego: the simulator writes its path, arc length, speed and pose
(:meth:`Traffic.set_ego`) and the traffic never moves it, but every other vehicle sees it as a leader, a
conflicting vehicle at the intersection and a neighbour for lane changes. Vehicle ``V - 2`` is the ego's
"shadow": the same car on a second lane its box reaches into during a lane change. Agents are ``0 .. V - 3``. All per-vehicle state is ``[S, V]``
numpy float64; every rule is evaluated for all scenes and vehicles at once as ``[S, V, V]`` pair tables (no
Python loop over vehicles).

Rules, each a standard model:

- **Car following**: IDM (vehicles.idm_acceleration) against the nearest vehicle ahead on the same or a
  shared path (``RoadMap.shared_*``), the desired speed capped by the path's curvature speed.
- **Yielding** (intersection): for each pair of paths with a conflict zone, vehicles are ordered first come,
  first served: committed vehicles (past their stop line) first, then by estimated arrival time at the stop
  line (accelerating at a_max up to v0), ties by index. A vehicle yields to one ordered before it unless that one
  clears the zone at least ``t_crit`` seconds before it would arrive (gap acceptance; ``t_crit`` is 1-3 s,
  shorter for aggressive drivers). The order is total, so two vehicles never wait for each other. A yielding
  vehicle sees a stopped virtual leader at its stop line (before the zone once committed).
- **Lane changes** (merge road): MOBIL (Kesting, Treiber & Helbing 2007) with politeness p, threshold
  a_th and safe deceleration b_safe; ramp vehicles get a bias to leave the ramp, whose end is a stopped
  virtual obstacle. The change is drawn as a lateral offset decaying linearly over LANE_CHANGE_TIME.
- **Spawning**: reset fills per-scene slots with a random density; during the episode a vehicle that leaves
  its path is removed and new ones enter at path starts when the entry is clear.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from trajgen.envs.driving.maps import RoadMap
from trajgen.envs.driving.vehicles import HIGHWAY_V0_RANGE, URBAN_V0_RANGE, sample_idm_params

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
BoolArray = NDArray[np.bool_]

MAX_BRAKE = 9.0
"""Hardest deceleration any vehicle applies, m/s^2 (IDM's braking is otherwise unbounded)."""
LANE_CHANGE_TIME = 3.0
"""Seconds a lane change takes (the lateral offset decays linearly)."""
SPAWN_GAP = 25.0
"""Free distance a path's start needs before a new vehicle enters, m."""
YIELD_HORIZON = 12.0
"""Vehicles arriving at a conflict zone later than this (s) are ignored."""
MOBIL_THRESHOLD = 0.2
"""MOBIL's switching threshold a_th, m/s^2."""
MOBIL_B_SAFE = 3.0
"""MOBIL's safe deceleration of the new follower, m/s^2."""
RAMP_BIAS = 1.5
"""Extra incentive (m/s^2) for leaving a lane that ends."""
CAR_LENGTH_RANGE = (4.2, 5.2)
CAR_WIDTH_RANGE = (1.8, 2.0)
EGO_LENGTH, EGO_WIDTH = 4.8, 1.9
EGO_REAR_TO_CENTRE = 1.35
"""The ego's pose is its rear axle; its box centre lies this far ahead, m (half the wheelbase)."""


@dataclass
class TrafficConfig:
    """Randomisation of a scenario's traffic (each scene draws its own values)."""

    v0_range: tuple[float, float]
    """Desired speeds of the agents, m/s."""
    spacing_range: tuple[float, float] = (14.0, 35.0)
    """Slot spacing along each lane, m: the scene's density is drawn from this range."""
    occupancy_range: tuple[float, float] = (0.4, 0.9)
    """Probability that a slot holds a vehicle."""
    spawn_rate_range: tuple[float, float] = (0.1, 0.5)
    """New vehicles per second per scene (attempts; an attempt fails when the entry is not clear)."""
    aggressiveness_range: tuple[float, float] = (0.0, 1.0)


def intersection_traffic() -> TrafficConfig:
    """Urban speeds, dense slots."""
    return TrafficConfig(v0_range=URBAN_V0_RANGE, spacing_range=(14.0, 30.0), spawn_rate_range=(0.1, 0.4))


def merge_traffic() -> TrafficConfig:
    """Arterial speeds between the urban and the highway ranges."""
    lo = 0.5 * (URBAN_V0_RANGE[0] + HIGHWAY_V0_RANGE[0])
    return TrafficConfig(v0_range=(lo, HIGHWAY_V0_RANGE[0]), spacing_range=(18.0, 40.0),
                         spawn_rate_range=(0.2, 0.8))


def arrival_time(d: FloatArray, v: FloatArray, a: FloatArray, v0: FloatArray) -> FloatArray:
    """Time to cover ``d >= 0`` m from speed ``v`` accelerating at ``a`` up to ``v0``, then cruising. ``[...]``.

    With d_acc = (v0^2 - v^2) / (2a): t = (sqrt(v^2 + 2ad) - v) / a when d <= d_acc, otherwise
    (v0 - v) / a + (d - d_acc) / v0 (a vehicle already at or above v0 cruises at v).
    """
    d = np.maximum(d, 0.0)
    cruise = np.maximum(v0, v)
    d_acc = np.maximum(cruise**2 - v**2, 0.0) / (2.0 * a)
    t_acc = (np.sqrt(v**2 + 2.0 * a * np.minimum(d, d_acc)) - v) / a
    return t_acc + np.maximum(d - d_acc, 0.0) / np.maximum(cruise, 1e-3)


def _idm(v: FloatArray, v0: FloatArray, gap: FloatArray, dv: FloatArray, p: dict[str, FloatArray]) -> FloatArray:
    """IDM acceleration for arrays of any matching shape (inf gap = free road). Same formula as
    vehicles.idm_acceleration, without its 1-D input checks so it runs on ``[S, V]`` tables."""
    s_star = p["s0"] + np.maximum(0.0, v * p["T"] + v * dv / (2.0 * np.sqrt(p["a_max"] * p["b"])))
    with np.errstate(divide="ignore", invalid="ignore"):
        inter = np.where(np.isinf(gap), 0.0, (s_star / np.maximum(gap, 1e-3)) ** 2)
    return p["a_max"] * (1.0 - (v / v0) ** 4 - inter)


def hash_uniform(seed: IntArray, counter: IntArray, stream: int, n: int) -> FloatArray:
    """Counter-based uniform numbers in [0, 1): splitmix64 of (scene seed, counter, stream, k). ``[S, n]``.

    A scene's random draws depend only on its own seed and step, not on the batch it runs in.
    """
    with np.errstate(over="ignore"):
        x = (seed.astype(np.uint64)[:, None] * np.uint64(0x9E3779B97F4A7C15)
             + counter.astype(np.uint64)[:, None] * np.uint64(0xBF58476D1CE4E5B9)
             + np.uint64(stream * 1000003) + np.arange(n, dtype=np.uint64)[None, :])
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class Traffic:
    """S scenes x V vehicles (the last is the ego) on the paths of one :class:`RoadMap`.

    Args:
        road: the map.
        n_scenes: S.
        n_agents: other vehicles per scene, V - 1.
        config: randomisation ranges (default by map name).
    """

    def __init__(self, road: RoadMap, n_scenes: int, n_agents: int, config: TrafficConfig | None = None) -> None:
        if n_scenes < 1 or n_agents < 1:
            raise ValueError(f"n_scenes and n_agents must be >= 1, got {n_scenes} and {n_agents}")
        self.road = road
        self.config = config or (intersection_traffic() if road.name == "intersection" else merge_traffic())
        self.S, self.V = n_scenes, n_agents + 2
        self.n_agents = n_agents
        self.ego = self.V - 1
        self.shadow = self.V - 2  # the ego again, on a second lane it reaches into (merge road); else invalid
        self._others = ~np.eye(self.V, dtype=bool)  # pairs of different vehicles (the ego and its shadow are one)
        self._others[self.ego, self.shadow] = self._others[self.shadow, self.ego] = False
        shape = (self.S, self.V)
        self.path = np.zeros(shape, dtype=np.int64)
        self.s = np.zeros(shape)
        self.v = np.zeros(shape)
        self.accel = np.zeros(shape)
        self.lat = np.zeros(shape)
        self.lat_rate = np.zeros(shape)
        self.valid = np.zeros(shape, dtype=bool)
        self.length = np.full(shape, 4.5)
        self.width = np.full(shape, 1.9)
        self.params = {k: np.ones(shape) for k in ("v0", "T", "s0", "a_max", "b")}
        self.t_crit = np.full(shape, 2.0)
        self.politeness = np.full(shape, 0.25)
        self.cooldown = np.zeros(shape)
        self.from_path = np.zeros(shape, dtype=np.int64)  # lane left by a lane change in progress
        self.from_offset = np.zeros(shape)  # s on the new path = s on from_path + from_offset
        self.spawn_rate = np.zeros(self.S)
        self.seed = np.zeros(self.S, dtype=np.int64)
        self.step_count = np.zeros(self.S, dtype=np.int64)
        self.ego_xy = np.zeros((self.S, 2))
        self.ego_heading = np.zeros(self.S)
        self._shared_lo, self._shared_hi = road.shared_lo.ravel(), road.shared_hi.ravel()
        self._shared_offset = road.shared_offset.ravel()
        self.has_conflicts = bool(np.any(~np.isnan(road.conflict_in)))
        self.has_lane_changes = bool(np.any(road.change_target >= 0))

    # ---------------------------------------------------------------------------------------- reset
    def reset_scenes(self, scenes: IntArray, seeds: IntArray, ego_path: IntArray, ego_s: FloatArray,
                     ego_v0: FloatArray, ego_t_crit: FloatArray) -> None:
        """Draw new traffic for ``scenes [R]`` from ``seeds [R]``, keeping clear of the ego's start.

        A loop over the reset scenes (each draws from its own seeded generator, so a scene is reproducible
        from its seed alone); the per-step work is fully vectorised.
        """
        for scene, seed, p_ego, s_ego, v0_ego, tc_ego in zip(scenes, seeds, ego_path, ego_s, ego_v0, ego_t_crit,
                                                             strict=True):
            self._reset_one(int(scene), int(seed), int(p_ego), float(s_ego))
            e, sh = self.ego, self.shadow
            self.path[scene, e], self.s[scene, e], self.valid[scene, e] = p_ego, s_ego, True
            self.valid[scene, sh] = False
            self.length[scene, [e, sh]], self.width[scene, [e, sh]] = EGO_LENGTH, EGO_WIDTH
            for k, val in (("v0", v0_ego), ("T", 1.5), ("s0", 2.0), ("a_max", 2.0), ("b", 2.0)):
                self.params[k][scene, [e, sh]] = val
            self.t_crit[scene, [e, sh]] = tc_ego

    def _slots(self, rng: np.random.Generator, spacing: float) -> tuple[IntArray, FloatArray]:
        """Candidate (path, s) positions every ~spacing m on every lane; paths sharing a lane pick at random."""
        road, paths, ss = self.road, [], []
        if road.name == "intersection":
            approach = road.stop_s[0] - 8.0
            for entry in range(4):
                s = np.arange(5.0, approach, spacing) + rng.uniform(0, spacing * 0.3)
                s = s[s < approach]
                paths.append(entry * 3 + rng.integers(0, 3, s.size))
                ss.append(s)
                exits = np.flatnonzero(road.shared_hi[entry * 3 + 1] == np.inf)  # paths sharing the exit lane
                s_exit = np.arange(8.0, 60.0, spacing) + rng.uniform(0, spacing * 0.3)
                p = rng.choice(exits, s_exit.size)
                conn_end = road.path_length[p] - (road.stop_s[0] + 1.0)  # exit lanes are as long as arms
                paths.append(p)
                ss.append(conn_end + s_exit)
        else:
            for k in range(road.n_paths):
                end = min(road.path_length[k], road.end_obstacle_s[k]) - 10.0
                gap = spacing * (2.5 if np.isfinite(road.end_obstacle_s[k]) else 1.0)  # a lane that ends: sparser
                s = np.arange(5.0, end, gap) + rng.uniform(0, gap * 0.3)
                s = s[s < end]
                paths.append(np.full(s.size, k))
                ss.append(s)
        return np.concatenate(paths).astype(np.int64), np.concatenate(ss)

    def _reset_one(self, scene: int, seed: int, ego_path: int, ego_s: float) -> None:
        cfg, road, n = self.config, self.road, self.n_agents
        rng = np.random.default_rng(seed)
        spacing = rng.uniform(*cfg.spacing_range)
        occupancy = rng.uniform(*cfg.occupancy_range)
        path, s = self._slots(rng, spacing)
        # keep the ego's start free: no car on a lane the ego uses within [-15, +20] m of it
        shared = (s >= road.shared_lo[ego_path, path]) & (s <= road.shared_hi[ego_path, path])
        rel = s + road.shared_offset[ego_path, path] - ego_s
        near_ego = shared & (rel > -15.0) & (rel < 20.0)
        keep = (~near_ego) & (rng.uniform(size=s.size) < occupancy)
        idx = np.flatnonzero(keep)
        idx = idx[np.argsort(np.abs(rel[idx]) + 1e3 * ~shared[idx])][:n]  # the nearest to the ego first
        k = idx.size
        params = sample_idm_params(n, rng, v0_range=cfg.v0_range, aggressiveness_range=cfg.aggressiveness_range)
        u = 1.0 - (params.T - 1.0)  # the aggressiveness drawn inside sample_idm_params (T = lerp(2, 1, u))
        row = slice(0, n)
        self.valid[scene, row] = np.arange(n) < k
        self.path[scene, row] = 0
        self.s[scene, row] = 0.0
        self.path[scene, :k] = path[idx]
        self.s[scene, :k] = s[idx]
        for name in self.params:
            self.params[name][scene, row] = getattr(params, name)
        cap = road.speed_cap(self.path[scene, row], self.s[scene, row])
        stop_gap = np.maximum(road.stop_s[self.path[scene, row]] - self.s[scene, row], 0.0)
        v = params.v0 * rng.uniform(0.5, 0.9, n)
        self.v[scene, row] = np.minimum(np.minimum(v, cap), np.sqrt(2.0 * 2.0 * stop_gap) + 1.0)
        self.accel[scene, row] = 0.0
        self.lat[scene, row] = 0.0
        self.lat_rate[scene, row] = 0.0
        self.cooldown[scene, row] = 0.0
        self.length[scene, row] = rng.uniform(*CAR_LENGTH_RANGE, n)
        self.width[scene, row] = rng.uniform(*CAR_WIDTH_RANGE, n)
        self.t_crit[scene, row] = 3.0 - 2.0 * u
        self.politeness[scene, row] = 0.5 * (1.0 - u)
        self.spawn_rate[scene] = rng.uniform(*cfg.spawn_rate_range)
        self.seed[scene] = seed
        self.step_count[scene] = 0

    # ---------------------------------------------------------------------------------------- ego
    def set_ego(self, path: IntArray, s: FloatArray, v: FloatArray, xy: FloatArray, heading: FloatArray,
                shadow_path: IntArray | None = None, shadow_s: FloatArray | None = None) -> None:
        """Write the ego's path ``[S]``, front-bumper arc length ``[S]``, speed ``[S]`` and box pose.

        ``shadow_path [S]`` (-1: none) and ``shadow_s [S]``: a second lane the ego's box reaches into (mid lane
        change) and its front arc length there, so vehicles on that lane see the ego too.
        """
        e, sh = self.ego, self.shadow
        self.path[:, e], self.s[:, e], self.v[:, e] = path, s, v
        self.ego_xy, self.ego_heading = xy, heading
        if shadow_path is None or shadow_s is None:
            self.valid[:, sh] = False
            return
        has = shadow_path >= 0
        self.valid[:, sh] = has
        self.path[:, sh] = np.where(has, shadow_path, path)
        self.s[:, sh], self.v[:, sh] = np.where(has, shadow_s, s), v

    # ---------------------------------------------------------------------------------------- geometry
    def poses(self) -> tuple[FloatArray, FloatArray]:
        """Box centres ``[S, V, 2]`` and headings ``[S, V]`` (the ego's from :meth:`set_ego`)."""
        centre_s = self.s - 0.5 * self.length
        xy, heading = self.road.path_pose(self.path, centre_s)
        normal = np.stack([-np.sin(heading), np.cos(heading)], axis=-1)
        xy = xy + self.lat[..., None] * normal
        heading = heading + np.clip(np.arctan2(self.lat_rate, np.maximum(self.v, 1e-3)), -0.3, 0.3)
        xy[:, [self.ego, self.shadow]] = self.ego_xy[:, None]
        heading[:, [self.ego, self.shadow]] = self.ego_heading[:, None]
        return xy, heading

    def boxes(self) -> FloatArray:
        """Vehicle boxes (x, y, heading, length, width) ``[S, V, 5]`` (invalid rows hold stale values)."""
        xy, heading = self.poses()
        return np.concatenate([xy, heading[..., None], self.length[..., None], self.width[..., None]], axis=-1)

    def velocities(self) -> FloatArray:
        """World-frame velocities ``[S, V, 2]``."""
        _, heading = self.poses()
        return self.v[..., None] * np.stack([np.cos(heading), np.sin(heading)], axis=-1)

    # ---------------------------------------------------------------------------------------- rules
    def _mapped(self, onto: IntArray) -> tuple[FloatArray, BoolArray]:
        """Every vehicle's front arc length on path ``onto [S, V]`` (row i's path): ``[S, V(i), V(j)]``.

        Also whether j is on a stretch shared with that path (its front or rear within the shared interval).
        A vehicle in the middle of a lane change (more than 30% of a lane width from its new lane's centre)
        is on its old lane too.
        """
        front, on = self._mapped_from(onto, self.path, self.s)
        changing = np.abs(self.lat) > 0.3 * self.road.lane_width
        if changing.any():
            front_old, on_old = self._mapped_from(onto, self.from_path, self.s - self.from_offset)
            on_old &= changing[:, None, :]
            front = np.where(on, front, front_old)
            on = on | on_old
        return front, on

    def _mapped_from(self, onto: IntArray, path: IntArray, s: FloatArray) -> tuple[FloatArray, BoolArray]:
        """:meth:`_mapped` for vehicles placed at ``(path [S, V], s [S, V])``."""
        pair = onto[:, :, None] * self.road.n_paths + path[:, None, :]  # flat index into the [K, K] tables
        lo, hi = np.take(self._shared_lo, pair), np.take(self._shared_hi, pair)
        front = s[:, None, :]
        rear = front - self.length[:, None, :]
        # front or rear inside [lo, hi]: the car's extent [rear, front] meets the interval
        on = (front >= lo) & (rear <= hi) & ((front <= hi) | (rear >= lo))
        on &= self.valid[:, None, :]
        return front + np.take(self._shared_offset, pair), on

    def leaders(self, onto: IntArray | None = None, s: FloatArray | None = None,
                exclude_self: bool = True) -> tuple[IntArray, FloatArray, FloatArray]:
        """Nearest vehicle ahead of each (path, s) on shared stretches: ``(index, gap, speed)``, each ``[S, V]``.

        By default the vehicles' own paths and positions; the gap is bumper to bumper (inf, speed 0: none).
        """
        onto = self.path if onto is None else onto
        s = self.s if s is None else s
        front, on = self._mapped(onto)
        gap = front - self.length[:, None, :] - s[:, :, None]
        ahead = on & (front > s[:, :, None])
        if exclude_self:
            ahead &= self._others[None]
        gap = np.where(ahead, gap, np.inf)
        leader = np.argmin(gap, axis=2)
        g = np.take_along_axis(gap, leader[..., None], axis=2)[..., 0]
        leader = np.where(np.isinf(g), -1, leader)
        speed = np.where(leader >= 0, np.take_along_axis(self.v, np.maximum(leader, 0), axis=1), 0.0)
        return leader, g, speed

    def yield_obstacle(self) -> FloatArray:
        """Arc length of each vehicle's virtual stopped leader from yielding, ``[S, V]`` (inf: go)."""
        if not self.has_conflicts:
            return np.full((self.S, self.V), np.inf)
        road, p = self.road, self.path
        a, b = p[:, :, None], p[:, None, :]
        c_in = road.conflict_in[a, b]  # zone entry on i's path w.r.t. j's
        cj_in, cj_out = road.conflict_in[b, a], road.conflict_out[b, a]  # on j's path w.r.t. i's
        s_i, s_j = self.s[:, :, None], self.s[:, None, :]
        pr = self.params
        eta_i = arrival_time(c_in - s_i, self.v[:, :, None], pr["a_max"][:, :, None], pr["v0"][:, :, None])
        vj, aj, v0j = self.v[:, None, :], pr["a_max"][:, None, :], pr["v0"][:, None, :]
        eta_j = arrival_time(cj_in - s_j, vj, aj, v0j)
        clear_j = arrival_time(cj_out + self.length[:, None, :] - s_j, vj, aj, v0j)
        # one priority key per vehicle (not per pair, which could order A < B < C < A and deadlock): committed
        # vehicles first, the deepest in the box first; then by arrival time at the stop line; then by index
        stop = road.stop_s[p]
        committed = self.s >= stop
        key = np.where(committed, -1e3 - (self.s - stop),
                       arrival_time(stop - self.s, self.v, pr["a_max"], pr["v0"]))
        ki, kj = key[:, :, None], key[:, None, :]
        idx = np.arange(self.V)
        j_first = (kj < ki) | ((kj == ki) & (idx[None, None, :] < idx[None, :, None]))
        ci = committed[:, :, None]
        with np.errstate(invalid="ignore"):
            relevant = (self.valid[:, :, None] & self.valid[:, None, :] & ~np.isnan(c_in) & (s_i < c_in)
                        & (s_j - self.length[:, None, :] < cj_out) & (eta_j < YIELD_HORIZON) & (c_in - s_i < 60.0))
        must_yield = relevant & j_first & (clear_j > eta_i - self.t_crit[:, :, None])
        stop_at = np.where(ci, c_in - 1.0, road.stop_s[p][:, :, None])
        return np.where(must_yield, stop_at, np.inf).min(axis=2)

    def desired_speed(self) -> FloatArray:
        """IDM's v0 capped by the curvature speed of the path ahead, ``[S, V]``."""
        return np.maximum(np.minimum(self.params["v0"], self.road.speed_cap(self.path, self.s)), 0.5)

    def idm_accelerations(self) -> FloatArray:
        """Acceleration ``[S, V]``: the min of IDM behind the leader, before the yield obstacle and the path end."""
        _, gap, lead_v = self.leaders()
        v0 = self.desired_speed()
        acc = _idm(self.v, v0, gap, self.v - lead_v, self.params)
        for obstacle in (self.yield_obstacle(), self.road.end_obstacle_s[self.path]):
            acc = np.minimum(acc, _idm(self.v, v0, obstacle - self.s, self.v, self.params))
        changing = np.abs(self.lat) > 0.3 * self.road.lane_width
        if changing.any():  # still partly in the old lane: keep following its leader too
            _, gap2, lead_v2 = self.leaders(onto=self.from_path, s=self.s - self.from_offset)
            acc = np.where(changing, np.minimum(acc, _idm(self.v, v0, gap2, self.v - lead_v2, self.params)), acc)
        return np.clip(acc, -MAX_BRAKE, self.params["a_max"])

    def _lane_changes(self, acc: FloatArray) -> None:
        """MOBIL for every agent and both sides; executes the better admissible change in place."""
        road, S, V = self.road, self.S, self.V
        p = self.params
        agent = np.zeros((S, V), dtype=bool)
        agent[:, : self.n_agents] = True
        ready = agent & self.valid & (self.cooldown <= 0.0) & (np.abs(self.lat) < 1e-9)
        lead, gap_old, _ = self.leaders()
        best_gain = np.full((S, V), -np.inf)
        best_side = np.full((S, V), -1)
        for side in (0, 1):
            target = road.change_target[self.path, side]
            ok = ready & (target >= 0) & (self.s >= road.change_lo[self.path, side]) & (
                self.s <= road.change_hi[self.path, side])
            if not ok.any():
                continue
            tgt = np.where(target >= 0, target, self.path)
            s_t = self.s + road.change_offset[self.path, side]
            front, on = self._mapped(tgt)  # everyone on the target lane, in target coordinates
            on &= self._others[None]
            rel = front - s_t[:, :, None]
            gap_ahead = np.where(on & (rel > 0), rel - self.length[:, None, :], np.inf)
            gap_behind = np.where(on & (rel <= 0), -rel - self.length[:, :, None], np.inf)
            nl = np.argmin(gap_ahead, axis=2)
            g_new = np.take_along_axis(gap_ahead, nl[..., None], 2)[..., 0]
            nf = np.argmin(gap_behind, axis=2)
            g_f = np.take_along_axis(gap_behind, nf[..., None], 2)[..., 0]
            v_nl = np.where(np.isinf(g_new), 0.0, np.take_along_axis(self.v, nl, 1))
            has_f = ~np.isinf(g_f)
            take = {k: np.take_along_axis(val, nf, 1) for k, val in p.items()}
            v_f = np.take_along_axis(self.v, nf, 1)
            v0 = self.desired_speed()
            a_new = _idm(self.v, v0, g_new, self.v - v_nl, p)
            end = road.end_obstacle_s[tgt] - s_t
            a_new = np.minimum(a_new, _idm(self.v, v0, end, self.v, p))
            a_f_new = np.where(has_f, _idm(v_f, take["v0"], g_f, v_f - self.v, take), 0.0)
            g_f_old = np.where(has_f & ~np.isinf(g_new), g_f + self.length + g_new, np.inf)
            a_f_old = np.where(has_f, _idm(v_f, take["v0"], g_f_old, v_f - v_nl, take), 0.0)
            # old follower o: the vehicle whose leader is i
            is_follower = (lead[:, None, :] == np.arange(V)[None, :, None])  # [S, i, o]
            has_o = is_follower.any(axis=2)
            o = np.argmax(is_follower, axis=2)
            v_o = np.take_along_axis(self.v, o, 1)
            take_o = {k: np.take_along_axis(val, o, 1) for k, val in p.items()}
            g_o = np.take_along_axis(gap_old, o, 1)
            lead_i_v = np.where(lead >= 0, np.take_along_axis(self.v, np.maximum(lead, 0), 1), 0.0)
            g_o_new = np.where(np.isinf(gap_old), np.inf, g_o + self.length + gap_old)
            a_o_old = np.where(has_o, _idm(v_o, take_o["v0"], g_o, v_o - self.v, take_o), 0.0)
            a_o_new = np.where(has_o, _idm(v_o, take_o["v0"], g_o_new, v_o - lead_i_v, take_o), 0.0)
            bias = np.where(np.isfinite(road.end_obstacle_s[self.path]), RAMP_BIAS, 0.0)
            gain = a_new - acc + self.politeness * (a_f_new - a_f_old + a_o_new - a_o_old) + bias
            safe = (g_new > 1.0) & (g_f > 1.0) & (a_f_new >= -MOBIL_B_SAFE) & (a_new >= -MOBIL_B_SAFE)
            admissible = ok & safe & (gain > MOBIL_THRESHOLD) & (gain > best_gain)
            best_gain = np.where(admissible, gain, best_gain)
            best_side = np.where(admissible, side, best_side)
        change = best_side >= 0
        if not change.any():
            return
        side = np.maximum(best_side, 0)
        w = road.lane_width
        new_path = road.change_target[self.path, side]
        self.from_path = np.where(change, self.path, self.from_path)
        self.from_offset = np.where(change, road.change_offset[self.path, side], self.from_offset)
        self.s = np.where(change, self.s + road.change_offset[self.path, side], self.s)
        self.path = np.where(change, new_path, self.path)
        self.lat = np.where(change, np.where(side == 0, -w, w), self.lat)  # still where the old lane was
        self.cooldown = np.where(change, LANE_CHANGE_TIME + 2.0, self.cooldown)

    def _spawn(self) -> None:
        """One entry attempt per scene per step (Poisson rate): first free slot, random entry path, if clear."""
        road = self.road
        dt_rate = self.spawn_rate * 0.1
        u = hash_uniform(self.seed, self.step_count, 1, 2)
        free = ~self.valid[:, : self.n_agents]
        attempt = (u[:, 0] < dt_rate) & free.any(axis=1)
        if not attempt.any():
            return
        slot = np.argmax(free, axis=1)
        path = road.spawn_paths[np.minimum((u[:, 1] * road.spawn_paths.size).astype(np.int64),
                                           road.spawn_paths.size - 1)]
        front, on = self._mapped(np.repeat(path[:, None], self.V, axis=1))
        front, on = front[:, 0], on[:, 0]  # everyone's position on the entry path, [S, V]
        rear = front - self.length
        clear = np.all(~on | (rear > SPAWN_GAP) | (front < -5.0), axis=1)
        go = attempt & clear
        rows = np.flatnonzero(go)
        cols = slot[rows]
        self.valid[rows, cols] = True
        self.path[rows, cols] = path[rows]
        self.s[rows, cols] = 0.0
        first_v = np.min(np.where(on, self.v, np.inf), axis=1)[rows]
        self.v[rows, cols] = np.minimum(0.8 * self.params["v0"][rows, cols], first_v)
        self.lat[rows, cols] = 0.0
        self.lat_rate[rows, cols] = 0.0
        self.cooldown[rows, cols] = 0.0

    def step(self, dt: float = 0.1) -> None:
        """Advance every agent (not the ego) by ``dt`` s: IDM + yielding, MOBIL, ballistic update, despawn, spawn."""
        acc = self.idm_accelerations()
        if self.has_lane_changes:
            self._lane_changes(acc)
            acc = self.idm_accelerations()
        agent = self.valid.copy()
        agent[:, self.n_agents :] = False
        new_v = self.v + acc * dt
        stops = new_v < 0.0
        with np.errstate(divide="ignore", invalid="ignore"):
            ds = np.where(stops, -self.v**2 / (2.0 * np.where(acc < 0, acc, -1.0)), 0.5 * (self.v + new_v) * dt)
        self.s = np.where(agent, self.s + ds, self.s)
        self.v = np.where(agent, np.maximum(new_v, 0.0), self.v)
        self.accel = np.where(agent, acc, self.accel)
        # a lane change moves sideways at lane_width / LANE_CHANGE_TIME, slower at low speed (0.25 v, >= 0.3 m/s)
        rate = np.minimum(self.road.lane_width / LANE_CHANGE_TIME, np.maximum(0.25 * self.v, 0.3))
        moving = np.abs(self.lat) > 0
        new_lat = np.sign(self.lat) * np.maximum(np.abs(self.lat) - rate * dt, 0.0)
        self.lat_rate = np.where(moving, (new_lat - self.lat) / dt, 0.0)
        self.lat = new_lat
        self.cooldown = np.maximum(self.cooldown - dt, 0.0)
        gone = agent & (self.s - self.length > self.road.path_length[self.path])
        self.valid &= ~gone
        self.step_count += 1
        self._spawn()

