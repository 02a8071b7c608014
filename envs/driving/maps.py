"""Road maps of the driving simulator: lanes, paths, conflict zones, lane-change relations, drivable area.

A :class:`RoadMap` holds

- **lanes**: centre-line polylines (what the observation shows), with left/right boundaries and successors;
- **paths**: what traffic drives, entry to exit, each a chain of lanes resampled uniformly every
  :data:`PATH_DS` metres and padded by straight extension, so a point at arc length ``s`` on path ``k`` is
  found by one index computation for any batch (:meth:`RoadMap.path_pose`);
- **relations between paths** ``[K, K]`` tables, all in arc length:
  *shared* stretches (the same lane driven by both paths, e.g. a common approach lane): a vehicle on path
  ``b`` at ``s_b`` within ``[shared_lo[a, b], shared_hi[a, b]]`` sits on path ``a`` at ``s_b + shared_offset[a, b]``;
  *conflict zones* (paths that cross or merge inside the intersection): path ``a`` is within reach of path
  ``b`` for ``s_a`` in ``[conflict_in[a, b], conflict_out[a, b]]`` (NaN where they never meet);
  *lane-change neighbours* (parallel lanes of the merge road): ``change_target[a, side]`` (side 0 left,
  1 right; -1 none) with ``s_target = s_a + change_offset[a, side]`` allowed for s_a in
  ``[change_lo, change_hi]``;
- **stop lines** ``stop_s[K]`` (where a path enters the intersection; inf on the merge road) and **path-end
  obstacles** ``end_obstacle_s[K]`` (the on-ramp's end, a stopped virtual obstacle; inf elsewhere);
- the **drivable area** as a shapely polygon plus a 0.1 m raster for fast, vectorised look-ups;
- **ego routes**: per route a command (``left``/``straight``/``right``), the path it starts on, the path it
  must end on, and a reference polyline (uniform, same spacing) along which progress is measured.

Builders: :func:`four_way_intersection`, :func:`merge_road`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import shapely
from numpy.typing import ArrayLike, NDArray
from shapely.geometry import LineString, Polygon
from shapely.ops import unary_union

from trajgen.envs.driving.geometry import interpolate_polyline, polyline_arclength, wrap_angle

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
BoolArray = NDArray[np.bool_]

PATH_DS = 0.5
"""Spacing of path and route samples, m."""
RASTER_RES = 0.1
"""Cell size of the drivable-area raster, m."""
CONFLICT_DISTANCE = 3.0
"""Two paths conflict where their centre lines come closer than this, m (a car is ~2 m wide)."""
SHARED_MARGIN = 6.0
"""Shared stretches are extended by this much past a divergence (a leaving car's rear still overlaps), m."""


@dataclass(frozen=True)
class EgoRoute:
    """One way the ego can be asked to drive: command, start path, final path, reference polyline ``[R, 2]``."""

    command: str
    start_path: int
    end_path: int
    polyline: FloatArray
    start_s: tuple[float, float]
    """Range of arc lengths on ``start_path`` where the ego may start, m."""


@dataclass
class RoadMap:
    """A road network; see the module docstring for the meaning of each table."""

    name: str
    lane_width: float
    lanes: list[FloatArray]
    lane_successors: list[list[int]]
    path_names: list[str]
    path_lanes: list[list[int]]
    path_xy: FloatArray  # [K, P, 2], uniform every PATH_DS, padded by straight extension
    path_length: FloatArray  # [K]
    shared_offset: FloatArray  # [K, K]
    shared_lo: FloatArray  # [K, K]
    shared_hi: FloatArray  # [K, K]
    conflict_in: FloatArray  # [K, K]
    conflict_out: FloatArray  # [K, K]
    change_target: IntArray  # [K, 2]
    change_offset: FloatArray  # [K, 2]
    change_lo: FloatArray  # [K, 2]
    change_hi: FloatArray  # [K, 2]
    stop_s: FloatArray  # [K]
    end_obstacle_s: FloatArray  # [K]
    spawn_paths: IntArray  # [E] paths on which new traffic enters (repeats weight the draw)
    drivable: Polygon
    routes: list[EgoRoute]
    speed_limit: float
    lane_boundaries: list[tuple[FloatArray, FloatArray]] = field(default_factory=list)
    path_heading: FloatArray = field(init=False)  # [K, P]
    path_curvature_speed: FloatArray = field(init=False)  # [K, P] lookahead-min of sqrt(a_lat / |kappa|)
    route_xy: FloatArray = field(init=False)  # [Rn, R, 2]
    route_length: FloatArray = field(init=False)  # [Rn]
    route_heading: FloatArray = field(init=False)  # [Rn, R]
    lane_xy: FloatArray = field(init=False)  # [L, P, 2] lanes resampled every PATH_DS, padded
    lane_length: FloatArray = field(init=False)  # [L]
    lane_heading: FloatArray = field(init=False)  # [L, P]
    _raster: BoolArray = field(init=False, repr=False)
    _raster_origin: FloatArray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.path_heading = _headings(self.path_xy)
        self.path_curvature_speed = _curvature_speed(self.path_heading)
        self.route_xy, self.route_length = _pad_uniform([r.polyline for r in self.routes])
        self.route_heading = _headings(self.route_xy)
        self.lane_xy, self.lane_length = _pad_uniform(self.lanes)
        self.lane_heading = _headings(self.lane_xy)
        if not self.lane_boundaries:
            self.lane_boundaries = [_offset_polyline(lane, self.lane_width / 2) for lane in self.lanes]
        self._build_raster()

    # ------------------------------------------------------------------------------------------ paths
    @property
    def n_paths(self) -> int:
        """Number of paths K."""
        return self.path_xy.shape[0]

    def path_pose(self, path: ArrayLike, s: ArrayLike) -> tuple[FloatArray, FloatArray]:
        """Point and heading at arc length ``s`` on path ``path`` (linear extrapolation past both ends).

        ``path [...]`` int, ``s [...]`` -> ``(xy [..., 2], heading [...])``.
        """
        return _uniform_pose(self.path_xy, self.path_heading, np.asarray(path), np.asarray(s, dtype=np.float64))

    def route_pose(self, route: ArrayLike, s: ArrayLike) -> tuple[FloatArray, FloatArray]:
        """Point and heading at arc length ``s`` on ego route ``route``. ``[...]`` -> ``([..., 2], [...])``."""
        return _uniform_pose(self.route_xy, self.route_heading, np.asarray(route), np.asarray(s, dtype=np.float64))

    def lane_points(self, lane: ArrayLike, s: ArrayLike) -> FloatArray:
        """Points at arc length ``s`` on lanes ``lane`` (extrapolated straight past the ends). ``[...] -> [..., 2]``."""
        return _uniform_pose(self.lane_xy, self.lane_heading, np.asarray(lane), np.asarray(s, dtype=np.float64))[0]

    def speed_cap(self, path: ArrayLike, s: ArrayLike) -> FloatArray:
        """Curvature speed limit (lateral acceleration 2.5 m/s^2) over the next 25 m of ``path``. ``[...]``."""
        idx = np.clip(np.round(np.asarray(s) / PATH_DS).astype(np.int64), 0, self.path_xy.shape[1] - 1)
        return self.path_curvature_speed[np.asarray(path), idx]

    # ------------------------------------------------------------------------------------------ area
    def is_drivable(self, xy: ArrayLike) -> BoolArray:
        """Whether points lie on the drivable area (raster look-up, cell 0.1 m). ``[..., 2] -> bool [...]``."""
        xy = np.asarray(xy, dtype=np.float64)
        if xy.ndim == 0 or xy.shape[-1] != 2:
            raise ValueError(f"xy must have shape [..., 2], got {xy.shape}")
        ij = np.floor((xy - self._raster_origin) / RASTER_RES).astype(np.int64)
        h, w = self._raster.shape
        inside = (ij[..., 0] >= 0) & (ij[..., 0] < w) & (ij[..., 1] >= 0) & (ij[..., 1] < h)
        out = np.zeros(xy.shape[:-1], dtype=bool)
        out[inside] = self._raster[ij[..., 1][inside], ij[..., 0][inside]]
        return out

    def is_drivable_exact(self, xy: ArrayLike) -> BoolArray:
        """Whether points lie in the drivable polygon (shapely, exact). ``[..., 2] -> bool [...]``."""
        xy = np.asarray(xy, dtype=np.float64)
        return shapely.contains_xy(self.drivable, xy[..., 0], xy[..., 1])

    def _build_raster(self) -> None:
        shapely.prepare(self.drivable)
        x0, y0, x1, y1 = self.drivable.bounds
        self._raster_origin = np.array([x0 - 1.0, y0 - 1.0])
        w = math.ceil((x1 - x0 + 2.0) / RASTER_RES)
        h = math.ceil((y1 - y0 + 2.0) / RASTER_RES)
        cx = self._raster_origin[0] + (np.arange(w) + 0.5) * RASTER_RES
        cy = self._raster_origin[1] + (np.arange(h) + 0.5) * RASTER_RES
        self._raster = shapely.contains_xy(self.drivable, cx[None, :], cy[:, None])


# ------------------------------------------------------------------------------------------------ helpers


def _headings(xy: FloatArray) -> FloatArray:
    """Direction of each sample's outgoing segment (the last repeats), ``[K, P, 2] -> [K, P]``."""
    d = np.diff(xy, axis=1)
    heading = np.arctan2(d[..., 1], d[..., 0])
    return np.concatenate([heading, heading[:, -1:]], axis=1)


def _uniform_pose(xy: FloatArray, heading: FloatArray, idx: IntArray, s: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Pose on uniformly sampled polylines ``xy [K, P, 2]`` at ``(idx [...], s [...])``."""
    u = s / PATH_DS
    i = np.clip(np.floor(u).astype(np.int64), 0, xy.shape[1] - 2)
    frac = (u - i)[..., None]
    p0 = xy[idx, i]
    point = p0 + frac * (xy[idx, i + 1] - p0)
    h = heading[idx, np.clip(np.round(u).astype(np.int64), 0, xy.shape[1] - 1)]
    return point, h


def project_to_uniform(xy_table: FloatArray, idx: IntArray, xy: FloatArray, s_guess: FloatArray,
                       window: float = 12.0) -> tuple[FloatArray, FloatArray]:
    """Batched projection of points onto per-element uniform polylines, searching near a guess.

    Each query ``xy[b]`` is projected onto polyline ``xy_table[idx[b]]`` among the samples within
    ``+-window`` metres of ``s_guess[b]``, refined on the two adjacent segments. The geometry module projects
    onto one polyline; here every batch element has its own, which is what traffic and routes need.

    Args:
        xy_table: ``[K, P, 2]`` polylines sampled every PATH_DS m.
        idx: ``[B]`` polyline per query.  xy: ``[B, 2]``.  s_guess: ``[B]`` m.

    Returns:
        ``(s [B], lateral [B])`` (lateral positive to the left).
    """
    half = round(window / PATH_DS)
    centre = np.round(s_guess / PATH_DS).astype(np.int64)
    cand = np.clip(centre[:, None] + np.arange(-half, half + 1), 0, xy_table.shape[1] - 2)  # [B, W]
    a = xy_table[idx[:, None], cand]  # [B, W, 2]
    b = xy_table[idx[:, None], cand + 1]
    seg = b - a
    seg_len2 = np.maximum(np.sum(seg**2, axis=-1), 1e-12)
    t = np.sum((xy[:, None, :] - a) * seg, axis=-1) / seg_len2
    lo = np.where(cand == 0, -np.inf, 0.0)
    hi = np.where(cand == xy_table.shape[1] - 2, np.inf, 1.0)
    t = np.clip(t, lo, hi)
    foot = a + t[..., None] * seg
    d2 = np.sum((xy[:, None, :] - foot) ** 2, axis=-1)
    k = np.argmin(d2, axis=1)
    rows = np.arange(xy.shape[0])
    s = (cand[rows, k] + t[rows, k]) * PATH_DS
    off = xy - foot[rows, k]
    direction = seg[rows, k]
    cross = direction[:, 0] * off[:, 1] - direction[:, 1] * off[:, 0]
    lateral = np.sign(cross) * np.sqrt(d2[rows, k])
    return s, lateral


def _resample_uniform(points: FloatArray) -> FloatArray:
    """A polyline resampled every PATH_DS m (the last sample is the end point's straight extension)."""
    length = polyline_arclength(points)[-1]
    s = np.arange(0.0, length + PATH_DS, PATH_DS)
    xy, _ = interpolate_polyline(points, s)
    return xy


def _pad_uniform(polylines: list[FloatArray], extra: float = 30.0) -> tuple[FloatArray, FloatArray]:
    """Resample each polyline uniformly, pad to a common count by straight extension. ``-> [K, P, 2], [K]``."""
    lengths = np.array([polyline_arclength(p)[-1] for p in polylines])
    n = math.ceil((lengths.max() + extra) / PATH_DS) + 1
    s = np.arange(n) * PATH_DS
    out = np.stack([interpolate_polyline(p, s)[0] for p in polylines])
    return out, lengths


def _curvature_speed(heading: FloatArray, a_lat: float = 2.5, lookahead: float = 25.0) -> FloatArray:
    """min over the next ``lookahead`` metres of sqrt(a_lat / |kappa|), kappa = dheading / ds. ``[K, P]``."""
    kappa = np.abs(wrap_angle(np.diff(heading, axis=1))) / PATH_DS
    kappa = np.concatenate([kappa, kappa[:, -1:]], axis=1)
    vmax = np.sqrt(a_lat / np.maximum(kappa, 1e-6))
    n = int(lookahead / PATH_DS)
    padded = np.concatenate([vmax, np.repeat(vmax[:, -1:], n, axis=1)], axis=1)
    windows = np.lib.stride_tricks.sliding_window_view(padded, n + 1, axis=1)[:, : vmax.shape[1]]
    return windows.min(axis=-1)


def _offset_polyline(points: FloatArray, offset: float) -> tuple[FloatArray, FloatArray]:
    """Left and right boundaries of a lane: the centre line shifted by +-offset along its normal."""
    d = np.gradient(points, axis=0)
    n = np.stack([-d[:, 1], d[:, 0]], axis=1) / np.linalg.norm(d, axis=1, keepdims=True)
    return points + offset * n, points - offset * n


def _line(a: ArrayLike, b: ArrayLike, step: float = 0.25) -> FloatArray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    n = max(2, math.ceil(np.linalg.norm(b - a) / step) + 1)
    return a + np.linspace(0.0, 1.0, n)[:, None] * (b - a)


def _arc(centre: ArrayLike, radius: float, start: float, end: float, step: float = 0.25) -> FloatArray:
    n = max(2, math.ceil(abs(end - start) * radius / step) + 1)
    ang = np.linspace(start, end, n)
    return np.asarray(centre) + radius * np.stack([np.cos(ang), np.sin(ang)], axis=1)


def _rotate(points: FloatArray, angle: float) -> FloatArray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _chain(parts: list[FloatArray]) -> FloatArray:
    return np.concatenate([parts[0]] + [p[1:] for p in parts[1:]])


def _conflict_zone(a: FloatArray, b: FloatArray, a_from: float, a_to: float) -> tuple[float, float]:
    """Arc-length interval of path ``a`` (uniform samples) within CONFLICT_DISTANCE of ``b``'s part, or NaNs."""
    s = np.arange(a.shape[0]) * PATH_DS
    sel = (s >= a_from) & (s <= a_to)
    d = shapely.distance(shapely.points(a[sel]), LineString(b))
    near = s[sel][d < CONFLICT_DISTANCE]
    if near.size == 0:
        return math.nan, math.nan
    return float(near.min()), float(near.max())


# ------------------------------------------------------------------------------------------------ builders


def four_way_intersection(
    lane_width: float = 3.5, box_half: float = 10.0, arm_length: float = 70.0, speed_limit: float = 13.9
) -> RoadMap:
    """A 4-way unsignalised intersection: each arm one lane in and one lane out (right-hand traffic).

    The box spans [-box_half, box_half]^2; arm k points along angle k * 90 deg (east, north, west, south).
    The incoming lane of the south arm runs north at x = +w/2 and ends at y = -box_half; connectors are a
    straight line (straight on), a quarter circle of radius box_half - w/2 centred at (box_half, -box_half)
    (right turn) and one of radius box_half + w/2 centred at (-box_half, -box_half) (left turn); the other
    arms are the same rotated. 12 paths = 4 entries x (left, straight, right), named ``"<entry>_<turn>"``.
    """
    w, b, L = lane_width, box_half, arm_length
    arm_names = ["east", "north", "west", "south"]
    # canonical south arm, then rotate by (k - 3) * 90 deg for arm k
    south_in = _line([w / 2, -b - L], [w / 2, -b])
    south_out = _line([-w / 2, -b], [-w / 2, -b - L])
    conn = {
        "straight": _line([w / 2, -b], [w / 2, b]),
        "right": _arc([b, -b], b - w / 2, math.pi, math.pi / 2),
        "left": _arc([-b, -b], b + w / 2, 0.0, math.pi / 2),
    }
    exit_arm = {"straight": 1, "right": 0, "left": 2}  # relative to south = 3: north, east, west
    lanes: list[FloatArray] = []
    lane_in, lane_out = [], []
    for k in range(4):
        rot = (k - 3) * math.pi / 2
        lane_in.append(len(lanes))
        lanes.append(_rotate(south_in, rot))
        lane_out.append(len(lanes))
        lanes.append(_rotate(south_out, rot))
    successors: list[list[int]] = [[] for _ in lanes]
    path_names, path_lanes, path_polys, path_entry, path_exit, conn_span = [], [], [], [], [], []
    for k in range(4):
        rot = (k - 3) * math.pi / 2
        for turn in ("left", "straight", "right"):
            exit_k = (exit_arm[turn] + k - 3) % 4
            c = len(lanes)
            lanes.append(_rotate(conn[turn], rot))
            successors.append([lane_out[exit_k]])
            successors[lane_in[k]].append(c)
            path_names.append(f"{arm_names[k]}_{turn}")
            path_lanes.append([lane_in[k], c, lane_out[exit_k]])
            path_polys.append(_chain([lanes[lane_in[k]], lanes[c], lanes[lane_out[exit_k]]]))
            conn_len = polyline_arclength(lanes[c])[-1]
            conn_span.append((L, L + conn_len))
            path_entry.append(k)
            path_exit.append(exit_k)
    path_xy, path_length = _pad_uniform(path_polys)
    K = len(path_polys)
    shared_offset = np.zeros((K, K))
    shared_lo = np.full((K, K), np.inf)
    shared_hi = np.full((K, K), -np.inf)
    conflict_in = np.full((K, K), np.nan)
    conflict_out = np.full((K, K), np.nan)
    for a in range(K):
        for c in range(K):
            if a == c:
                shared_lo[a, c], shared_hi[a, c] = -np.inf, np.inf
            elif path_entry[a] == path_entry[c]:  # common approach lane
                shared_lo[a, c], shared_hi[a, c] = -np.inf, L + SHARED_MARGIN
            elif path_exit[a] == path_exit[c]:  # common exit lane
                shared_offset[a, c] = conn_span[a][1] - conn_span[c][1]
                shared_lo[a, c], shared_hi[a, c] = conn_span[c][1] - SHARED_MARGIN, np.inf
            if path_entry[a] != path_entry[c]:
                a_pts = path_xy[a]
                c_conn = lanes[path_lanes[c][1]]
                lo, hi = _conflict_zone(a_pts, c_conn, conn_span[a][0] - 2.0, conn_span[a][1] + 2.0)
                if path_exit[a] == path_exit[c] and not math.isnan(lo):
                    hi = max(hi, conn_span[a][1])
                conflict_in[a, c], conflict_out[a, c] = lo, hi
    # a pair conflicts in both directions or not at all
    both = ~np.isnan(conflict_in) & ~np.isnan(conflict_in.T)
    conflict_in[~both], conflict_out[~both] = np.nan, np.nan
    outer = b + L
    road = unary_union([
        shapely.box(-outer, -w, outer, w), shapely.box(-w, -outer, w, outer), shapely.box(-b, -b, b, b),
    ])
    routes = []
    for k in range(K):
        turn = path_names[k].split("_")[1]
        routes.append(EgoRoute(command=turn, start_path=k, end_path=k, polyline=path_polys[k],
                               start_s=(20.0, 35.0)))
    return RoadMap(
        name="intersection", lane_width=w, lanes=lanes, lane_successors=successors, path_names=path_names,
        path_lanes=path_lanes, path_xy=path_xy, path_length=path_length, shared_offset=shared_offset,
        shared_lo=shared_lo, shared_hi=shared_hi, conflict_in=conflict_in, conflict_out=conflict_out,
        change_target=np.full((K, 2), -1, dtype=np.int64), change_offset=np.zeros((K, 2)),
        change_lo=np.full((K, 2), np.inf), change_hi=np.full((K, 2), -np.inf),
        stop_s=np.array([L - 1.0] * K), end_obstacle_s=np.full(K, np.inf),
        spawn_paths=np.arange(K, dtype=np.int64), drivable=road, routes=routes, speed_limit=speed_limit,
    )


def merge_road(
    lane_width: float = 3.5, road_length: float = 500.0, ramp_join: float = 150.0, accel_lane: float = 110.0,
    speed_limit: float = 25.0,
) -> RoadMap:
    """A two-lane road running east (right lane y = 0, left lane y = w) with an on-ramp from the south-west.

    The ramp is an S-curve from (ramp_join - 100, -w - 25) to (ramp_join, -w), then an acceleration lane
    at y = -w parallel to the right lane until ``ramp_join + accel_lane``, where it ends (a stopped virtual
    obstacle): ramp vehicles must change into the right lane before that. Paths: ``main_left``,
    ``main_right``, ``ramp``. Lane changes: left <-> right anywhere, ramp -> right on the acceleration lane.
    Ego routes (the command says which lane change): ramp + left (merge), right + straight/left,
    left + straight/right.
    """
    w = lane_width
    left = _line([0.0, w], [road_length, w])
    right = _line([0.0, 0.0], [road_length, 0.0])
    xs = np.linspace(ramp_join - 100.0, ramp_join, 401)
    u = (xs - xs[0]) / 100.0
    curve = np.stack([xs, -w - 25.0 * (1.0 - (3 * u**2 - 2 * u**3))], axis=1)
    ramp_end = ramp_join + accel_lane
    ramp = _chain([curve, _line([ramp_join, -w], [ramp_end, -w])])
    curve_len = float(polyline_arclength(curve)[-1])
    lanes = [left, right, ramp]
    successors: list[list[int]] = [[], [], [1]]
    path_xy, path_length = _pad_uniform(lanes)
    K = 3
    shared_offset = np.zeros((K, K))
    shared_lo = np.full((K, K), np.inf)
    shared_hi = np.full((K, K), -np.inf)
    np.fill_diagonal(shared_lo, -np.inf)
    np.fill_diagonal(shared_hi, np.inf)
    change_target = np.array([[-1, 1], [0, -1], [1, -1]], dtype=np.int64)  # ramp's left neighbour is the right lane
    ramp_to_right = ramp_join - curve_len  # s_right = s_ramp + offset on the acceleration lane
    change_offset = np.array([[0.0, 0.0], [0.0, 0.0], [ramp_to_right, 0.0]])
    change_lo = np.array([[np.inf, 0.0], [0.0, np.inf], [curve_len, np.inf]])
    change_hi = np.array([[-np.inf, road_length], [road_length, -np.inf], [curve_len + accel_lane, -np.inf]])
    road = unary_union([
        shapely.box(0.0, -w / 2, road_length, 1.5 * w),
        LineString(ramp).buffer(w / 2, cap_style="flat"),
        shapely.box(ramp_join, -1.5 * w, ramp_end, 0.0),
        Polygon([(ramp_end, -1.5 * w), (ramp_end + 40.0, -0.5 * w), (ramp_end, -0.5 * w)]),  # end taper
    ])
    routes = [
        EgoRoute("left", 2, 1, _lane_change_route(ramp, right, curve_len + 20.0, 60.0), (5.0, 30.0)),
        EgoRoute("straight", 1, 1, right, (40.0, 120.0)),
        EgoRoute("left", 1, 0, _lane_change_route(right, left, 200.0, 60.0), (40.0, 120.0)),
        EgoRoute("straight", 0, 0, left, (40.0, 120.0)),
        EgoRoute("right", 0, 1, _lane_change_route(left, right, 200.0, 60.0), (40.0, 120.0)),
    ]
    return RoadMap(
        name="merge", lane_width=w, lanes=lanes, lane_successors=successors, path_names=["main_left",
        "main_right", "ramp"], path_lanes=[[0], [1], [2]], path_xy=path_xy, path_length=path_length,
        shared_offset=shared_offset, shared_lo=shared_lo, shared_hi=shared_hi,
        conflict_in=np.full((K, K), np.nan), conflict_out=np.full((K, K), np.nan), change_target=change_target,
        change_offset=change_offset, change_lo=change_lo, change_hi=change_hi, stop_s=np.full(K, np.inf),
        end_obstacle_s=np.array([np.inf, np.inf, curve_len + accel_lane]),
        spawn_paths=np.array([0, 0, 1, 1, 2], dtype=np.int64), drivable=road, routes=routes, speed_limit=speed_limit,
    )


def _lane_change_route(start: FloatArray, target: FloatArray, s_change: float, length: float) -> FloatArray:
    """Follow ``start`` until arc length ``s_change``, blend (smoothstep) onto ``target`` over ``length`` m.

    Both lanes must end parallel over the blend: the point of ``target`` paired with ``start``'s point at
    arc length s is its projection in x (the merge road's lanes run along +x there).
    """
    s = np.arange(0.0, polyline_arclength(target)[-1] - target[0, 0] + start[0, 0], PATH_DS)
    p_start, _ = interpolate_polyline(start, s)
    p_target = np.stack([p_start[:, 0], np.interp(p_start[:, 0], target[:, 0], target[:, 1])], axis=1)
    u = np.clip((s - s_change) / length, 0.0, 1.0)
    lam = (3 * u**2 - 2 * u**3)[:, None]
    route = (1 - lam) * p_start + lam * p_target
    keep = route[:, 0] <= target[-1, 0]
    return route[keep]
