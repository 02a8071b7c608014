"""Ego-frame observations of the driving simulator (the contract shared with scoring and the policies).

Keys (per scene; :func:`build_observation` returns them batched with a leading S):

- ``"ego"`` ``[4]``: speed (m/s), longitudinal acceleration (m/s^2), steering angle (rad), yaw rate (rad/s);
- ``"command"`` ``[3]``: one-hot over :data:`COMMANDS`;
- ``"agents"`` ``[16, 8]``: (x, y, cos heading, sin heading, vx, vy, length, width) of the nearest other
  vehicles in the ego frame (rear axle origin, +x forward), zeros where ``"agents_mask"`` ``[16]`` is 0;
- ``"lanes"`` ``[24, 20, 2]``: the nearest lane centre lines, each from its point nearest the ego 60 m ahead
  along the lane (stopping at the lane's end), 20 points, ego frame; ``"lanes_mask"`` ``[24]``;
- ``"bev"`` (only with ``bev=True``) ``[3, 64, 64]``: drivable area, lane centre lines, agents; 0.75 m per
  pixel, ego-centred; row r is x = (31.5 - r) 0.75 m (forward is up), column c is y = (31.5 - c) 0.75 m
  (left is left).

Everything is float32 except the masks (int8).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from numpy.typing import NDArray

from trajgen.envs.driving.geometry import to_ego_frame
from trajgen.envs.driving.maps import PATH_DS
from trajgen.envs.driving.sim import COMMANDS, DrivingSim

N_AGENTS = 16
AGENT_FEATURES = 8
N_LANES = 24
LANE_POINTS = 20
EGO_FEATURES = 4
HORIZON_POSES = 8
POSE_DT = 0.5
LANE_AHEAD = 60.0
"""Metres of lane ahead of its nearest point."""
AGENT_RADIUS = 80.0
"""Agents farther than this from the ego are masked out, m."""
LANE_RADIUS = 50.0
"""Lanes whose nearest point is farther than this are masked out, m."""
BEV_SIZE = 64
BEV_RES = 0.75

FloatArray = NDArray[np.float64]


def observation_space(bev: bool = False) -> gym.spaces.Dict:
    """The Gymnasium space of one scene's observation."""
    f32, i8, big = np.float32, np.int8, 1e3  # every feature is a few hundred metres or m/s at most
    spaces = {
        "ego": gym.spaces.Box(-big, big, (EGO_FEATURES,), f32),
        "command": gym.spaces.Box(0.0, 1.0, (len(COMMANDS),), f32),
        "agents": gym.spaces.Box(-big, big, (N_AGENTS, AGENT_FEATURES), f32),
        "agents_mask": gym.spaces.Box(0, 1, (N_AGENTS,), i8),
        "lanes": gym.spaces.Box(-big, big, (N_LANES, LANE_POINTS, 2), f32),
        "lanes_mask": gym.spaces.Box(0, 1, (N_LANES,), i8),
    }
    if bev:
        spaces["bev"] = gym.spaces.Box(0.0, 1.0, (3, BEV_SIZE, BEV_SIZE), f32)
    return gym.spaces.Dict(spaces)


def ego_features(sim: DrivingSim) -> FloatArray:
    """(speed, acceleration, steering angle, yaw rate = v tan(steer) / L) ``[S, 4]``."""
    e = sim.ego
    yaw_rate = e.speed * np.tan(e.steer) / sim.limits.wheelbase
    return np.stack([e.speed, e.accel, e.steer, yaw_rate], axis=1)


def agent_tokens(sim: DrivingSim) -> tuple[FloatArray, NDArray[np.int8]]:
    """The N_AGENTS nearest valid agents as ego-frame tokens ``[S, 16, 8]`` and their mask ``[S, 16]``."""
    pose = sim.ego_pose()
    boxes = sim.agent_boxes()
    vel = sim.agent_velocities()
    valid = sim.agent_valid()
    xy = to_ego_frame(boxes[..., :2], pose[:, None, :])
    dist = np.where(valid, np.linalg.norm(xy, axis=-1), np.inf)
    order = np.argsort(dist, axis=1)[:, :N_AGENTS]
    take = lambda a: np.take_along_axis(a, order[..., None] if a.ndim == 3 else order, axis=1)
    xy, boxes, vel, dist = take(xy), take(boxes), take(vel), take(dist)
    rel = boxes[..., 2] - pose[:, None, 2]
    c, s = np.cos(-pose[:, 2])[:, None], np.sin(-pose[:, 2])[:, None]
    v_ego = np.stack([c * vel[..., 0] - s * vel[..., 1], s * vel[..., 0] + c * vel[..., 1]], axis=-1)
    tokens = np.concatenate([xy, np.cos(rel)[..., None], np.sin(rel)[..., None], v_ego, boxes[..., 3:5]], axis=-1)
    mask = dist < AGENT_RADIUS
    tokens = np.where(mask[..., None], tokens, 0.0)
    out = np.zeros((sim.S, N_AGENTS, AGENT_FEATURES))
    out_mask = np.zeros((sim.S, N_AGENTS), dtype=np.int8)
    n = tokens.shape[1]
    out[:, :n], out_mask[:, :n] = tokens, mask
    return out, out_mask


def lane_polylines(sim: DrivingSim) -> tuple[FloatArray, NDArray[np.int8]]:
    """The N_LANES nearest lanes, 20 points over 60 m ahead, ego frame ``[S, 24, 20, 2]``, mask ``[S, 24]``."""
    road = sim.road
    pose = sim.ego_pose()
    table, lengths = road.lane_xy, road.lane_length
    coarse = table[:, ::4]  # every 2 m: enough to find the nearest stretch
    d2 = np.sum((coarse[None] - pose[:, None, None, :2]) ** 2, axis=-1)  # [S, L, P']
    k = np.argmin(d2, axis=2)
    s_near = np.minimum(k * 4 * PATH_DS, lengths[None, :])
    dist = np.sqrt(np.take_along_axis(d2, k[..., None], axis=2)[..., 0])
    order = np.argsort(dist, axis=1)[:, :N_LANES]
    s_near = np.take_along_axis(s_near, order, axis=1)
    dist = np.take_along_axis(dist, order, axis=1)
    s = np.minimum(s_near[..., None] + np.linspace(0.0, LANE_AHEAD, LANE_POINTS), lengths[order][..., None])
    xy = road.lane_points(order[..., None], s)
    xy = to_ego_frame(xy, pose[:, None, None, :])
    mask = dist < LANE_RADIUS
    out = np.zeros((sim.S, N_LANES, LANE_POINTS, 2))
    out_mask = np.zeros((sim.S, N_LANES), dtype=np.int8)
    n = order.shape[1]
    out[:, :n] = np.where(mask[..., None, None], xy, 0.0)
    out_mask[:, :n] = mask
    return out, out_mask


def bev_raster(sim: DrivingSim) -> FloatArray:
    """Bird's-eye raster ``[S, 3, 64, 64]``: drivable area, lane centre lines, agent boxes (see module doc)."""
    S, n = sim.S, BEV_SIZE
    pose = sim.ego_pose()
    half = (n - 1) / 2.0
    gx = (half - np.arange(n)) * BEV_RES  # row -> forward x
    gy = (half - np.arange(n)) * BEV_RES  # column -> left y
    local = np.stack(np.meshgrid(gx, gy, indexing="ij"), axis=-1).reshape(-1, 2)  # [n*n, 2]
    c, s = np.cos(pose[:, 2])[:, None], np.sin(pose[:, 2])[:, None]
    world = np.stack([pose[:, None, 0] + c * local[:, 0] - s * local[:, 1],
                      pose[:, None, 1] + s * local[:, 0] + c * local[:, 1]], axis=-1)
    bev = np.zeros((S, 3, n, n))
    bev[:, 0] = sim.road.is_drivable(world).reshape(S, n, n)
    lane_pts = np.concatenate([table[: int(length / PATH_DS) + 1] for table, length in
                               zip(sim.road.lane_xy, sim.road.lane_length, strict=True)])
    _splat(bev[:, 1], to_ego_frame(lane_pts[None], pose[:, None, :]), np.ones((S, lane_pts.shape[0]), dtype=bool))
    boxes = sim.agent_boxes()
    u = np.linspace(-0.5, 0.5, 9)
    w = np.linspace(-0.5, 0.5, 4)
    grid = np.stack(np.meshgrid(u, w, indexing="ij"), axis=-1).reshape(-1, 2)  # [36, 2] in box units
    along = grid[:, 0] * boxes[..., 3:4]
    across = grid[:, 1] * boxes[..., 4:5]
    ch, sh = np.cos(boxes[..., 2:3]), np.sin(boxes[..., 2:3])
    pts = np.stack([boxes[..., 0:1] + ch * along - sh * across, boxes[..., 1:2] + sh * along + ch * across], axis=-1)
    pts = to_ego_frame(pts.reshape(S, -1, 2), pose[:, None, :])
    valid = np.repeat(sim.agent_valid(), grid.shape[0], axis=1)
    _splat(bev[:, 2], pts, valid)
    return bev


def _splat(image: FloatArray, xy: FloatArray, valid: NDArray[np.bool_]) -> None:
    """Set the pixels of ``image [S, n, n]`` hit by ego-frame points ``xy [S, P, 2]`` to 1, in place."""
    n = image.shape[-1]
    half = (n - 1) / 2.0
    r = np.round(half - xy[..., 0] / BEV_RES).astype(np.int64)
    c = np.round(half - xy[..., 1] / BEV_RES).astype(np.int64)
    ok = valid & (r >= 0) & (r < n) & (c >= 0) & (c < n)
    scene = np.broadcast_to(np.arange(image.shape[0])[:, None], ok.shape)
    image[scene[ok], r[ok], c[ok]] = 1.0


def build_observation(sim: DrivingSim, bev: bool = False) -> dict[str, np.ndarray]:
    """The observation of every scene, batched ``[S, ...]`` (keys and shapes in the module docstring)."""
    agents, agents_mask = agent_tokens(sim)
    lanes, lanes_mask = lane_polylines(sim)
    command = np.zeros((sim.S, len(COMMANDS)), dtype=np.float32)
    command[np.arange(sim.S), sim.command] = 1.0
    obs = {
        "ego": ego_features(sim).astype(np.float32),
        "command": command,
        "agents": agents.astype(np.float32),
        "agents_mask": agents_mask,
        "lanes": lanes.astype(np.float32),
        "lanes_mask": lanes_mask,
    }
    if bev:
        obs["bev"] = bev_raster(sim).astype(np.float32)
    return obs
