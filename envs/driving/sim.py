"""The batched driving simulator core: S scenes of one scenario stepped together at dt = 0.1 s.

Each scene has an ego (a :class:`~trajgen.envs.driving.vehicles.KinematicBicycle` driven by (accel, steer)
commands), up to N other vehicles (:class:`~trajgen.envs.driving.traffic.Traffic`) and an ego route with a
command (left / straight / right). Every :meth:`DrivingSim.step` advances all scenes, then checks

- collision: the ego's box against every valid agent box (separating-axis test, ``geometry.boxes_overlap``);
- off-road: any of the ego box's corners outside the drivable area (``RoadMap.is_drivable``);
- route progress: the gain in arc length of the ego's projection on its route; completion when it reaches the
  scene's goal; a time limit.

Scenes never reset themselves; the environments decide when (:meth:`DrivingSim.reset` takes any subset).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from trajgen.envs.driving.geometry import box_corners, boxes_overlap
from trajgen.envs.driving.maps import RoadMap, four_way_intersection, merge_road, project_to_uniform
from trajgen.envs.driving.traffic import EGO_LENGTH, EGO_REAR_TO_CENTRE, EGO_WIDTH, Traffic
from trajgen.envs.driving.vehicles import BicycleLimits, KinematicBicycle

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
BoolArray = NDArray[np.bool_]

SCENARIOS = ("intersection", "merge")
COMMANDS = ("left", "straight", "right")
DT = 0.1
EGO_FRONT = EGO_REAR_TO_CENTRE + EGO_LENGTH / 2
"""Rear axle to front bumper, m."""
SHADOW_LATERAL = 2.6
"""An agent centred on a lane overlaps the ego sideways once the ego is within ~1.95 m of that lane's centre;
from 2.6 m on, the ego also counts as a vehicle on that lane (m)."""


@dataclass(frozen=True)
class ScenarioSpec:
    """Per-scenario episode settings."""

    time_limit: float
    """Episode length limit, s."""
    goal_distance: float
    """Route arc length past the start at which the route counts as completed, m."""
    ego_speed: tuple[float, float]
    """Initial ego speed range, m/s."""


SPECS = {
    "intersection": ScenarioSpec(time_limit=35.0, goal_distance=105.0, ego_speed=(4.0, 9.0)),
    "merge": ScenarioSpec(time_limit=30.0, goal_distance=230.0, ego_speed=(10.0, 18.0)),
}


def make_map(scenario: str) -> RoadMap:
    """The map of a scenario name (``"intersection"`` or ``"merge"``)."""
    if scenario == "intersection":
        return four_way_intersection()
    if scenario == "merge":
        return merge_road()
    raise ValueError(f"scenario must be one of {SCENARIOS}, got {scenario!r}")


@dataclass
class StepOutcome:
    """What one :meth:`DrivingSim.step` found, each ``[S]``."""

    progress: FloatArray
    collision: BoolArray
    off_road: BoolArray
    completed: BoolArray
    timeout: BoolArray


class DrivingSim:
    """S scenes of one scenario (see the module docstring).

    Args:
        scenario: ``"intersection"`` or ``"merge"``.
        n_scenes: S.
        n_agents: other vehicles per scene (N, default 16).
        limits: the ego bicycle's limits.
    """

    def __init__(self, scenario: str, n_scenes: int, n_agents: int = 16, limits: BicycleLimits | None = None) -> None:
        if int(n_scenes) != n_scenes or n_scenes < 1:
            raise ValueError(f"n_scenes must be a positive integer, got {n_scenes}")
        self.scenario = scenario
        self.road = make_map(scenario)
        self.spec = SPECS[scenario]
        self.S, self.N = int(n_scenes), int(n_agents)
        self.limits = limits or BicycleLimits()
        self.traffic = Traffic(self.road, self.S, self.N)
        S = self.S
        self.ego = KinematicBicycle(x=np.zeros(S), y=np.zeros(S), heading=np.zeros(S), speed=np.zeros(S),
                                    limits=self.limits)
        self.route = np.zeros(S, dtype=np.int64)
        self.command = np.zeros(S, dtype=np.int64)
        self.route_s = np.zeros(S)
        self.start_s = np.zeros(S)
        self.goal_s = np.zeros(S)
        self.path_s = np.zeros((S, self.road.n_paths))  # ego rear axle on every path (merge lane choice)
        self.ego_path = np.zeros(S, dtype=np.int64)
        self.steps = np.zeros(S, dtype=np.int64)
        self.seeds = np.zeros(S, dtype=np.int64)
        self.episode = np.zeros(S, dtype=np.int64)
        self.ever_reset = False

    # ------------------------------------------------------------------------------------------ reset
    def reset(self, seeds: ArrayLike, scenes: ArrayLike | None = None) -> None:
        """Start new episodes in ``scenes [R]`` (default all) from integer ``seeds [R]``.

        A scene's initial state depends on its seed only: route and command, ego start (pose on the start
        path with small noise, speed), traffic density, drivers and their positions.
        """
        scenes = np.arange(self.S) if scenes is None else np.asarray(scenes, dtype=np.int64).reshape(-1)
        seeds = np.asarray(seeds).reshape(-1)
        if seeds.shape != scenes.shape or not np.issubdtype(seeds.dtype, np.integer):
            raise ValueError(f"seeds must be {scenes.size} integers (one per reset scene), got {seeds.dtype} "
                             f"shape {seeds.shape}")
        if scenes.size == 0:
            return
        if not self.ever_reset and scenes.size != self.S:
            raise ValueError("the first reset must cover every scene")
        road = self.road
        R = scenes.size
        route = np.zeros(R, dtype=np.int64)
        start = np.zeros(R)
        speed = np.zeros(R)
        lateral = np.zeros(R)
        dheading = np.zeros(R)
        for k, seed in enumerate(seeds):
            rng = np.random.default_rng([int(seed), 7])
            route[k] = rng.integers(len(road.routes))
            r = road.routes[route[k]]
            start[k] = rng.uniform(*r.start_s)
            speed[k] = rng.uniform(*self.spec.ego_speed)
            lateral[k] = rng.uniform(-0.3, 0.3)
            dheading[k] = rng.uniform(-0.03, 0.03)
        start_path = np.array([road.routes[r].start_path for r in route])
        xy, heading = road.path_pose(start_path, start)
        normal = np.stack([-np.sin(heading), np.cos(heading)], axis=1)
        xy = xy + lateral[:, None] * normal
        speed = np.minimum(speed, road.speed_cap(start_path, start))
        ego = self.ego
        ego.x[scenes], ego.y[scenes] = xy[:, 0], xy[:, 1]
        ego.heading[scenes] = heading + dheading
        ego.speed[scenes], ego.accel[scenes], ego.steer[scenes] = speed, 0.0, 0.0
        self.route[scenes] = route
        self.command[scenes] = [COMMANDS.index(road.routes[r].command) for r in route]
        route_s, _ = project_to_uniform(road.route_xy, route, xy, np.full(R, 300.0), window=400.0)
        self.route_s[scenes] = route_s
        self.start_s[scenes] = route_s
        self.goal_s[scenes] = np.minimum(road.route_length[route] - 5.0, route_s + self.spec.goal_distance)
        for k in range(road.n_paths):
            s_k, _ = project_to_uniform(road.path_xy, np.full(R, k), xy, np.full(R, 300.0), window=400.0)
            self.path_s[scenes, k] = s_k
        self.steps[scenes] = 0
        self.seeds[scenes] = seeds
        self.episode[scenes] += 1
        self.ever_reset = True
        self.traffic.reset_scenes(scenes, seeds, start_path, start + EGO_FRONT, np.full(R, road.speed_limit),
                                  np.full(R, 2.0))
        self._sync_ego()

    # ------------------------------------------------------------------------------------------ state
    def ego_pose(self) -> FloatArray:
        """Rear-axle pose (x, y, heading) ``[S, 3]``, world frame."""
        return np.stack([self.ego.x, self.ego.y, self.ego.heading], axis=1)

    def ego_box(self) -> FloatArray:
        """The ego's box (x, y, heading, length, width) ``[S, 5]``, centred ahead of the rear axle."""
        h = self.ego.heading
        cx = self.ego.x + EGO_REAR_TO_CENTRE * np.cos(h)
        cy = self.ego.y + EGO_REAR_TO_CENTRE * np.sin(h)
        return np.stack([cx, cy, h, np.full(self.S, EGO_LENGTH), np.full(self.S, EGO_WIDTH)], axis=1)

    def agent_boxes(self) -> FloatArray:
        """Boxes of the N other vehicles ``[S, N, 5]`` (rows where :meth:`agent_valid` is False are stale)."""
        return self.traffic.boxes()[:, : self.N]

    def agent_valid(self) -> BoolArray:
        """Which agent rows hold a vehicle, ``[S, N]``."""
        return self.traffic.valid[:, : self.N].copy()

    def agent_velocities(self) -> FloatArray:
        """Agent velocities, world frame, ``[S, N, 2]``."""
        return self.traffic.velocities()[:, : self.N]

    def route_polylines(self) -> FloatArray:
        """Each scene's route, uniformly sampled ``[S, R, 2]`` (padded by straight extension)."""
        return self.road.route_xy[self.route]

    def clone(self) -> DrivingSim:
        """An independent copy of every scene's state (the map is shared): for rollouts from the current state."""
        return copy.deepcopy(self, memo={id(self.road): self.road})

    def snapshot(self) -> dict[str, np.ndarray]:
        """Copies of what a log records at this instant: ego pose/speed, agent boxes, validity, velocities."""
        return {"ego_pose": self.ego_pose(), "ego_speed": self.ego.speed.copy(), "agent_boxes": self.agent_boxes(),
                "agent_valid": self.agent_valid(), "agent_velocities": self.agent_velocities(),
                "route_s": self.route_s.copy()}

    # ------------------------------------------------------------------------------------------ step
    def _sync_ego(self) -> None:
        """Tell the traffic where the ego is (its path, front arc length, speed and box)."""
        road = self.road
        if road.name == "merge":
            R = self.S
            lat = np.zeros((R, road.n_paths))
            for k in range(road.n_paths):
                self.path_s[:, k], lat[:, k] = project_to_uniform(road.path_xy, np.full(R, k),
                                                                   self.ego_pose()[:, :2], self.path_s[:, k])
            inside = (self.path_s >= 0.0) & (self.path_s <= road.path_length)
            dist = np.where(inside, np.abs(lat), np.inf)
            rows = np.arange(self.S)
            self.ego_path = np.argmin(dist, axis=1)
            s = self.path_s[rows, self.ego_path]
            # the ego's box reaches into a second lane when it is within SHADOW_LATERAL of that lane's centre
            dist[rows, self.ego_path] = np.inf
            second = np.argmin(dist, axis=1)
            shadow = np.where(dist[rows, second] < SHADOW_LATERAL, second, -1)
            shadow_s = self.path_s[rows, second] + EGO_FRONT
        else:
            self.ego_path = np.array([r.start_path for r in road.routes])[self.route]
            s = self.route_s
            shadow, shadow_s = None, None
        box = self.ego_box()
        self.traffic.set_ego(self.ego_path, s + EGO_FRONT, self.ego.speed.copy(), box[:, :2], box[:, 2], shadow,
                             shadow_s)

    def collisions(self) -> BoolArray:
        """Whether the ego's box overlaps any valid agent box, ``[S]``."""
        hit = boxes_overlap(self.ego_box()[:, None, :], self.agent_boxes()) & self.agent_valid()
        return hit.any(axis=1)

    def off_road(self) -> BoolArray:
        """Whether any corner of the ego's box is off the drivable area, ``[S]``."""
        return ~self.road.is_drivable(box_corners(self.ego_box())).all(axis=1)

    def step(self, accel: ArrayLike, steer: ArrayLike) -> StepOutcome:
        """Advance every scene by 0.1 s under ego commands ``accel [S]`` (m/s^2) and ``steer [S]`` (rad)."""
        if not self.ever_reset:
            raise RuntimeError("DrivingSim.step called before reset")
        self.traffic.step(DT)
        self.ego.step(accel, steer, DT)
        before = self.route_s.copy()
        self.route_s, _ = project_to_uniform(self.road.route_xy, self.route, self.ego_pose()[:, :2], before)
        self._sync_ego()
        self.steps += 1
        return StepOutcome(
            progress=self.route_s - before,
            collision=self.collisions(),
            off_road=self.off_road(),
            completed=self.route_s >= self.goal_s,
            timeout=self.steps * DT >= self.spec.time_limit - 1e-9,
        )
