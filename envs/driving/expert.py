"""A rule-based driving expert: route centre line, IDM speed profile, gap acceptance, lane changes.

:meth:`RuleExpert.plan` returns, for every scene of a :class:`~trajgen.envs.driving.sim.DrivingSim`, a plan of
8 ego-frame poses over 4 s. It rolls IDM out along the lane for 4 s (dt 0.1) against the current leader (held
at constant speed) and a stopped virtual obstacle where it must yield (the traffic's first-come-first-served
gap acceptance, with the expert's own critical gap) or where its lane ends, and places the poses on the lane's
centre line. On the merge road it changes to the commanded lane once past a preferred point, if the gap in the
target lane is acceptable (front gap, back gap and the new follower's braking within b_safe, as MOBIL's safety
criterion), moving sideways with a smoothstep profile.

Choices drawn per episode (seeded by the scene seed), which is what makes the demonstrations multi-modal:
desired speed, time headway, acceleration, critical gap (yield or go), where to start a lane change, how long
it takes, and how big a gap it accepts.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from trajgen.envs.driving.geometry import poses_to_ego_frame
from trajgen.envs.driving.maps import project_to_uniform
from trajgen.envs.driving.sim import DT, EGO_FRONT, DrivingSim
from trajgen.envs.driving.tracking import N_POSES, POSE_DT
from trajgen.envs.driving.traffic import _idm

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]

HORIZON_STEPS = round(N_POSES * POSE_DT / DT)


class RuleExpert:
    """The expert for one :class:`DrivingSim` (it keeps per-scene episode choices and lane-change state)."""

    def __init__(self, sim: DrivingSim) -> None:
        self.sim = sim
        S = sim.S
        self._episode = np.full(S, -1, dtype=np.int64)
        self.params = {k: np.zeros(S) for k in ("v0", "T", "s0", "a_max", "b")}
        self.t_crit = np.zeros(S)
        self.change_after = np.zeros(S)  # route arc length after which a lane change may start, m
        self.change_time = np.zeros(S)  # s
        self.gap_factor = np.zeros(S)  # accepted gaps scale with this
        self.changing = np.zeros(S, dtype=bool)
        self.change_started = np.zeros(S)  # sim time at the start, s

    def _draw(self, scenes: np.ndarray) -> None:
        sim = self.sim
        urban = sim.scenario == "intersection"
        for k in scenes:
            rng = np.random.default_rng([int(sim.seeds[k]), 11])
            u = rng.uniform()  # aggressiveness
            self.params["v0"][k] = rng.uniform(*((8.0, 13.0) if urban else (18.0, 26.0)))
            self.params["T"][k] = 2.0 - 0.8 * u
            self.params["s0"][k] = rng.uniform(2.0, 3.0)
            self.params["a_max"][k] = 1.2 + 0.8 * u
            self.params["b"][k] = 2.0
            self.t_crit[k] = 3.0 - 1.5 * u + rng.uniform(0.0, 0.5)
            r = sim.road.routes[sim.route[k]]
            lo = sim.road.change_lo[r.start_path].min()
            base = max(float(sim.start_s[k]), float(lo) if np.isfinite(lo) else 0.0)
            self.change_after[k] = base + rng.uniform(0.0, 25.0 if r.start_path == 2 else 120.0)
            self.change_time[k] = rng.uniform(3.0, 5.0)
            self.gap_factor[k] = 1.5 - u
        self.changing[scenes] = False
        self._episode[scenes] = sim.episode[scenes]
        ego = sim.traffic.ego
        sim.traffic.t_crit[scenes, ego] = self.t_crit[scenes]
        sim.traffic.params["v0"][scenes, ego] = self.params["v0"][scenes]

    def plan(self, sim: DrivingSim | None = None) -> FloatArray:
        """Plans for every scene: ``[S, 8, 3]`` ego-frame poses (x, y, heading) at t = 0.5 ... 4.0 s."""
        sim = sim or self.sim
        if sim is not self.sim:
            raise ValueError("sim must be the DrivingSim this expert was made for")
        new = np.flatnonzero(self._episode != sim.episode)
        if new.size:
            self._draw(new)
        traffic, road, S = sim.traffic, sim.road, sim.S
        ego = traffic.ego
        lane = sim.ego_path
        s_front = traffic.s[:, ego].copy()
        _, gap, lead_v = traffic.leaders()
        gap, lead_v = gap[:, ego], lead_v[:, ego]
        obstacle = np.minimum(traffic.yield_obstacle()[:, ego], road.end_obstacle_s[lane])
        target = lane.copy()
        lat_now = np.zeros(S)
        offset = np.zeros(S)
        if road.name == "merge":
            target, offset, lat_now, gap, lead_v, obstacle, span_cap = self._lane_change(
                lane, s_front, gap, lead_v, obstacle)
        s_traj = self._rollout(s_front, sim.ego.speed, gap, lead_v, obstacle, lane)  # [S, 40], on ``lane``
        s_pose = s_traj[:, HORIZON_STEPS // N_POSES - 1 :: HORIZON_STEPS // N_POSES] - EGO_FRONT + offset[:, None]
        xy, heading = road.path_pose(np.repeat(target[:, None], N_POSES, axis=1), s_pose)
        if road.name == "merge":
            # sideways by a smoothstep over a distance (not a time), so a slow car does not turn sharply
            remaining = np.maximum(self.change_time - (sim.steps * DT - self.change_started), 1.0)
            span = np.minimum(np.maximum(sim.ego.speed * remaining, 15.0), span_cap)
            travelled = s_traj[:, HORIZON_STEPS // N_POSES - 1 :: HORIZON_STEPS // N_POSES] - s_front[:, None]
            u = np.clip(travelled / span[:, None], 0.0, 1.0)
            lat = lat_now[:, None] * (1.0 - (3 * u**2 - 2 * u**3))
            slope = -lat_now[:, None] * 6.0 * u * (1.0 - u) / span[:, None]
            normal = np.stack([-np.sin(heading), np.cos(heading)], axis=-1)
            xy = xy + lat[..., None] * normal
            heading = heading + np.arctan(slope)
        poses = np.concatenate([xy, heading[..., None]], axis=-1)
        return poses_to_ego_frame(poses, sim.ego_pose()[:, None, :])

    def _rollout(self, s: FloatArray, v: FloatArray, gap: FloatArray, lead_v: FloatArray, obstacle: FloatArray,
                 lane: np.ndarray) -> FloatArray:
        """IDM along the lane for 4 s with a constant-speed leader and a fixed obstacle. ``-> s [S, 40]``."""
        p = self.params
        lim = self.sim.limits
        s, v = s.copy(), v.copy()
        lead_s = s + gap
        out = np.zeros((s.shape[0], HORIZON_STEPS))
        for k in range(HORIZON_STEPS):
            v0 = np.maximum(np.minimum(p["v0"], self.sim.road.speed_cap(lane, s)), 0.5)
            acc = np.minimum(_idm(v, v0, lead_s - s, v - lead_v, p), _idm(v, v0, obstacle - s, v, p))
            acc = np.clip(acc, -lim.max_decel, p["a_max"])
            new_v = np.maximum(v + acc * DT, 0.0)
            s = s + 0.5 * (v + new_v) * DT
            v = new_v
            lead_s = lead_s + lead_v * DT
            out[:, k] = s
        return out

    def _lane_change(self, lane: np.ndarray, s_front: FloatArray, gap: FloatArray, lead_v: FloatArray,
                     obstacle: FloatArray) -> tuple[np.ndarray, ...]:
        """Merge road: decide and continue lane changes.

        Returns the lane to place the poses on, the arc-length offset onto it, the current lateral offset from
        it, the (possibly tighter) leader gap and speed, the obstacle, and the longest sideways span (m).
        """
        sim, road, traffic = self.sim, self.sim.road, self.sim.traffic
        S, ego = sim.S, traffic.ego
        rows = np.arange(S)
        start_lane = np.array([r.start_path for r in road.routes])[sim.route]
        goal_lane = np.array([r.end_path for r in road.routes])[sim.route]
        side = np.where(road.change_target[lane, 0] == goal_lane, 0, 1)
        want = goal_lane != lane
        in_range = want & (road.change_target[lane, side] == goal_lane) & (
            sim.path_s[rows, lane] + EGO_FRONT >= road.change_lo[lane, side]) & (
            sim.path_s[rows, lane] + EGO_FRONT <= road.change_hi[lane, side] - 1.0)
        tgt = np.where(in_range, goal_lane, lane)
        off = np.where(in_range, road.change_offset[lane, side], 0.0)
        gap_ok = self._gap_ok(tgt, s_front + off)
        accept = in_range & (sim.route_s >= self.change_after) & gap_ok
        self.change_started = np.where(accept & ~self.changing, sim.steps * DT, self.change_started)
        # a change whose gap closed before the ego moved sideways much is abandoned (back to the lane centre)
        barely_out = np.abs(self._lateral(lane, rows)) < 0.5
        keep = self.changing & ((in_range & gap_ok) | ~want | ~barely_out)
        self.changing = (keep | accept) & (want | (np.abs(self._lateral(lane, rows)) > 0.2))
        active = self.changing & in_range
        target = np.where(active, tgt, lane)
        offset = np.where(active, off, 0.0)
        lat_now = self._lateral(target, rows)
        onto = traffic.path.copy()
        onto[:, ego] = target
        s_t = traffic.s.copy()
        s_t[:, ego] = s_front + offset
        _, gap_t, lead_v_t = traffic.leaders(onto=onto, s=s_t)
        gap_t, lead_v_t = gap_t[:, ego], lead_v_t[:, ego]
        lead_v = np.where(active & (gap_t < gap), lead_v_t, lead_v)
        gap = np.where(active, np.minimum(gap, gap_t), gap)
        # a lane that ends stops the ego unless it is leaving through a gap accepted right now; after the ego
        # counts as in the new lane, the old lane's end still applies until it is (almost) out of it
        obstacle = np.where(active & accept, np.inf, obstacle)
        left_behind = self.changing & (lane == goal_lane) & (start_lane != lane)
        back_side = np.where(road.change_target[start_lane, 0] == lane, 0, 1)
        old_end = road.end_obstacle_s[start_lane] + road.change_offset[start_lane, back_side]
        old_end = np.where(left_behind, old_end, np.inf)
        obstacle = np.where(left_behind & (np.abs(lat_now) > 0.7) & ~self._gap_ok(lane, s_front),
                            np.minimum(obstacle, old_end), obstacle)
        to_end = np.minimum(road.end_obstacle_s[lane], old_end) - s_front
        span_cap = np.maximum(to_end + 6.0, 8.0)
        return target, offset, lat_now, gap, lead_v, obstacle, span_cap

    def _gap_ok(self, lane: np.ndarray, s: FloatArray) -> BoolArray:
        """Whether the ego's front at ``s [S]`` on ``lane [S]`` leaves acceptable gaps: ahead, behind, and the
        follower's IDM braking within the expert's b_safe (timid drivers want more)."""
        sim, traffic = self.sim, self.sim.traffic
        S, ego = sim.S, traffic.ego
        rows = np.arange(S)
        onto = traffic.path.copy()
        onto[:, ego] = lane
        s_all = traffic.s.copy()
        s_all[:, ego] = s
        _, gap_ahead, _ = traffic.leaders(onto=onto, s=s_all)
        front, on = traffic._mapped(onto)
        behind = on[:, ego] & (front[:, ego] <= s[:, None])
        behind[:, [ego, traffic.shadow]] = False
        back_gap = np.where(behind, s[:, None] - traffic.length[:, ego, None] - front[:, ego], np.inf)
        f = np.argmin(back_gap, axis=1)
        g_back = back_gap[rows, f]
        v_f = traffic.v[rows, f]
        f_params = {k: val[rows, f] for k, val in traffic.params.items()}
        v = sim.ego.speed
        a_f = np.where(np.isinf(g_back), 0.0, _idm(v_f, f_params["v0"], g_back, v_f - v, f_params))
        gf = self.gap_factor
        b_safe = 1.0 + 2.0 * (1.5 - gf)  # the gap factor is 0.5 (bold) ... 1.5 (timid)
        return ((gap_ahead[:, ego] > 3.0 + gf * 0.6 * v)
                & (g_back > 4.0 + gf * (0.5 * v_f + 2.0 * np.maximum(v_f - v, 0.0))) & (a_f > -b_safe))

    def _lateral(self, path: np.ndarray, rows: np.ndarray) -> FloatArray:
        """The ego's signed lateral offset from ``path [S]``."""
        sim = self.sim
        _, lat = project_to_uniform(sim.road.path_xy, path, sim.ego_pose()[:, :2], sim.path_s[rows, path])
        return lat
