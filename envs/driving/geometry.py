"""Planar geometry for the driving simulator and its scoring: angles, polylines, oriented boxes, ego frames.

Everything is vectorised numpy float64 (no Python loop over elements). Units are metres and radians; the world
frame has x east, y north and headings counter-clockwise from +x. The ego frame has its origin at the ego pose
(rear axle) and +x along the ego heading.

- Angles: :func:`wrap_angle`.
- Polylines ``[P, 2]`` (lane centre lines, routes): :func:`polyline_arclength`, :func:`resample_polyline`,
  :func:`interpolate_polyline` (arc length -> point and heading), :func:`project_to_polyline` (point -> arc
  length and signed lateral offset, positive to the left). Past either end a polyline continues as the straight
  extension of its end segment, so positions behind the start have s < 0 and positions beyond the end have s > L.
- Oriented boxes ``(x, y, heading, length, width)`` centred on (x, y): :func:`box_corners`,
  :func:`boxes_overlap` (separating-axis test).
- Frames: :func:`to_ego_frame`, :func:`from_ego_frame`, :func:`poses_to_ego_frame`, :func:`poses_from_ego_frame`.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]


# ----------------------------------------------------------------------------------------------------------
# input checks


def _array(name: str, value: ArrayLike, last: int | None = None, min_ndim: int = 0) -> FloatArray:
    """``value`` as float64; raise ValueError naming ``name`` for a wrong last axis, too few axes or NaN/inf."""
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim < min_ndim or (last is not None and (arr.ndim == 0 or arr.shape[-1] != last)):
        want = f"[..., {last}]" if last is not None else f"at least {min_ndim} axes"
        raise ValueError(f"{name} must have shape {want}, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} has NaN or infinite entries")
    return arr


def _polyline(name: str, points: ArrayLike) -> FloatArray:
    """A polyline ``[P, 2]`` with consecutive duplicate points removed; needs >= 2 distinct points."""
    pts = _array(name, points, last=2)
    if pts.ndim != 2:
        raise ValueError(f"{name} must have shape [P, 2], got shape {pts.shape}")
    keep = np.ones(pts.shape[0], dtype=bool)
    keep[1:] = np.any(pts[1:] != pts[:-1], axis=-1)
    pts = pts[keep]
    if pts.shape[0] < 2:
        raise ValueError(f"{name} must have at least 2 distinct points, got {pts.shape[0]}")
    return pts


# ----------------------------------------------------------------------------------------------------------
# angles


def wrap_angle(angle: ArrayLike) -> FloatArray:
    """Wrap angles to [-pi, pi), elementwise. ``[...] -> [...]``."""
    return (np.asarray(angle, dtype=np.float64) + np.pi) % (2.0 * np.pi) - np.pi


# ----------------------------------------------------------------------------------------------------------
# polylines


def polyline_arclength(points: ArrayLike) -> FloatArray:
    """Cumulative arc length at each vertex, starting at 0. ``points [..., P, 2] -> [..., P]``."""
    pts = _array("points", points, last=2, min_ndim=2)
    segment = np.linalg.norm(np.diff(pts, axis=-2), axis=-1)
    return np.concatenate([np.zeros(segment.shape[:-1] + (1,)), np.cumsum(segment, axis=-1)], axis=-1)


def resample_polyline(points: ArrayLike, n: int) -> FloatArray:
    """``n`` points spaced uniformly in arc length from the first to the last vertex. ``[P, 2] -> [n, 2]``."""
    if int(n) != n or n < 2:
        raise ValueError(f"n must be an integer >= 2, got {n}")
    pts = _polyline("points", points)
    s = np.linspace(0.0, polyline_arclength(pts)[-1], int(n))
    xy, _ = interpolate_polyline(pts, s)
    return xy


def _segments(pts: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Cumulative arc length ``[P]``, segment lengths ``[P-1]`` and unit directions ``[P-1, 2]``."""
    delta = np.diff(pts, axis=0)
    length = np.linalg.norm(delta, axis=-1)
    return np.concatenate([[0.0], np.cumsum(length)]), length, delta / length[:, None]


def interpolate_polyline(points: ArrayLike, s: ArrayLike) -> tuple[FloatArray, FloatArray]:
    """Point and heading at arc length ``s`` along a polyline.

    Within the polyline the point is linear along its segment and the heading is that segment's direction
    (the exact tangent of the piecewise-linear path). For s < 0 or s > length the end segments are extended as
    straight lines.

    Args:
        points: vertices ``[P, 2]`` (consecutive duplicates are ignored).
        s: arc lengths, m, any shape ``[...]``.

    Returns:
        ``(xy [..., 2], heading [...])``.
    """
    pts = _polyline("points", points)
    s = _array("s", s)
    cum, _, direction = _segments(pts)
    seg = np.clip(np.searchsorted(cum, s, side="right") - 1, 0, pts.shape[0] - 2)
    along = (s - cum[seg])[..., None]
    xy = pts[seg] + along * direction[seg]
    heading = np.arctan2(direction[seg, 1], direction[seg, 0])
    return xy, heading


def project_to_polyline(points: ArrayLike, xy: ArrayLike) -> tuple[FloatArray, FloatArray]:
    """Arc length of the nearest point of a polyline and the signed lateral offset from it.

    The nearest segment is found by true point-to-segment distance. On an interior segment the foot point is
    clamped to the segment; on the first (last) segment a point before the start (after the end) projects onto
    the straight extension, giving s < 0 (s > length), which keeps s continuous for a vehicle leaving the ends.
    ``lateral`` is the distance to the foot point, positive when ``xy`` lies to the left of the segment's
    direction of travel.

    Args:
        points: vertices ``[P, 2]``.
        xy: query points ``[..., 2]``.

    Returns:
        ``(s [...], lateral [...])``.
    """
    pts = _polyline("points", points)
    xy = _array("xy", xy, last=2)
    cum, length, direction = _segments(pts)
    rel = xy[..., None, :] - pts[:-1]  # [..., P-1, 2]
    along = np.einsum("...kd,kd->...k", rel, direction)
    clamped = np.clip(along, 0.0, length)
    foot = pts[:-1] + clamped[..., None] * direction
    dist2 = np.sum((xy[..., None, :] - foot) ** 2, axis=-1)
    seg = np.argmin(dist2, axis=-1)  # [...]
    along_seg = np.take_along_axis(along, seg[..., None], axis=-1)[..., 0]
    last = pts.shape[0] - 2
    low = np.where(seg == 0, -np.inf, 0.0)
    high = np.where(seg == last, np.inf, length[seg])
    along_seg = np.clip(along_seg, low, high)
    foot_seg = pts[seg] + along_seg[..., None] * direction[seg]
    offset = xy - foot_seg
    cross = direction[seg, 0] * offset[..., 1] - direction[seg, 1] * offset[..., 0]
    lateral = np.where(cross >= 0.0, 1.0, -1.0) * np.linalg.norm(offset, axis=-1)
    return cum[seg] + along_seg, lateral


# ----------------------------------------------------------------------------------------------------------
# oriented boxes


def _box_fields(name: str, boxes: ArrayLike) -> tuple[FloatArray, ...]:
    """Split ``[..., 5]`` boxes into x, y, heading, half length, half width (each ``[...]``)."""
    arr = _array(name, boxes, last=5)
    if np.any(arr[..., 3:] < 0.0):
        raise ValueError(f"{name} must have non-negative length and width (fields 3 and 4)")
    return arr[..., 0], arr[..., 1], arr[..., 2], 0.5 * arr[..., 3], 0.5 * arr[..., 4]


def box_corners(boxes: ArrayLike) -> FloatArray:
    """Corners of oriented boxes ``(x, y, heading, length, width)`` centred on (x, y).

    Order (counter-clockwise): front-left, rear-left, rear-right, front-right. ``[..., 5] -> [..., 4, 2]``.
    """
    x, y, heading, half_l, half_w = _box_fields("boxes", boxes)
    local = np.array([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]])  # (along, across) signs
    along = local[:, 0] * half_l[..., None]  # [..., 4]
    across = local[:, 1] * half_w[..., None]
    cos, sin = np.cos(heading)[..., None], np.sin(heading)[..., None]
    return np.stack([x[..., None] + cos * along - sin * across, y[..., None] + sin * along + cos * across], axis=-1)


def boxes_overlap(a: ArrayLike, b: ArrayLike) -> BoolArray:
    """Whether oriented boxes ``a`` and ``b`` overlap (separating-axis test; boxes that only touch do not).

    Two convex boxes are disjoint iff one of the four edge normals separates them: along axis n the boxes'
    projections are disjoint when |(c_b - c_a) . n| >= r_a(n) + r_b(n), with r(n) = hl |u . n| + hw |v . n|
    for a box with half extents (hl, hw) along its unit axes (u, v). Between the two boxes' axes every such dot
    product is +-cos or +-sin of the relative heading, which keeps the test to a few elementwise operations.

    Args:
        a, b: boxes ``[..., 5]`` = (x, y, heading, length, width); leading axes broadcast against each other.

    Returns:
        bool ``[...]`` (the broadcast leading shape).
    """
    ax, ay, ah, al, aw = _box_fields("a", a)
    bx, by, bh, bl, bw = _box_fields("b", b)
    cos_a, sin_a, cos_b, sin_b = np.cos(ah), np.sin(ah), np.cos(bh), np.sin(bh)
    cos_rel = np.abs(cos_a * cos_b + sin_a * sin_b)  # |u_a . u_b| = |v_a . v_b|
    sin_rel = np.abs(cos_a * sin_b - sin_a * cos_b)  # |u_a . v_b| = |v_a . u_b|
    dx, dy = bx - ax, by - ay
    return (
        (np.abs(dx * cos_a + dy * sin_a) < al + bl * cos_rel + bw * sin_rel)  # axis u_a
        & (np.abs(-dx * sin_a + dy * cos_a) < aw + bl * sin_rel + bw * cos_rel)  # axis v_a
        & (np.abs(dx * cos_b + dy * sin_b) < bl + al * cos_rel + aw * sin_rel)  # axis u_b
        & (np.abs(-dx * sin_b + dy * cos_b) < bw + al * sin_rel + aw * cos_rel)  # axis v_b
    )


# ----------------------------------------------------------------------------------------------------------
# ego frame


def _rotate(xy: FloatArray, angle: FloatArray) -> FloatArray:
    """Rotate points ``[..., 2]`` counter-clockwise by ``angle [...]`` (broadcasting)."""
    cos, sin = np.cos(angle), np.sin(angle)
    return np.stack([cos * xy[..., 0] - sin * xy[..., 1], sin * xy[..., 0] + cos * xy[..., 1]], axis=-1)


def to_ego_frame(xy: ArrayLike, ego_pose: ArrayLike) -> FloatArray:
    """World points into the ego frame of ``ego_pose = (x, y, heading)``.

    Leading axes broadcast with numpy rules (e.g. ``xy [B, N, 2]`` with ``ego_pose [B, 1, 3]``).
    ``xy [..., 2], ego_pose [..., 3] -> [..., 2]``.
    """
    xy = _array("xy", xy, last=2)
    pose = _array("ego_pose", ego_pose, last=3)
    return _rotate(xy - pose[..., :2], -pose[..., 2])


def from_ego_frame(xy: ArrayLike, ego_pose: ArrayLike) -> FloatArray:
    """Ego-frame points back into the world frame (inverse of :func:`to_ego_frame`). ``[..., 2] -> [..., 2]``."""
    xy = _array("xy", xy, last=2)
    pose = _array("ego_pose", ego_pose, last=3)
    return _rotate(xy, pose[..., 2]) + pose[..., :2]


def poses_to_ego_frame(poses: ArrayLike, ego_pose: ArrayLike) -> FloatArray:
    """World poses (x, y, heading) into the ego frame; headings wrapped to [-pi, pi).

    ``poses [..., 3], ego_pose [..., 3] -> [..., 3]`` (leading axes broadcast).
    """
    poses = _array("poses", poses, last=3)
    pose = _array("ego_pose", ego_pose, last=3)
    xy = _rotate(poses[..., :2] - pose[..., :2], -pose[..., 2])
    return np.concatenate([xy, wrap_angle(poses[..., 2] - pose[..., 2])[..., None]], axis=-1)


def poses_from_ego_frame(poses: ArrayLike, ego_pose: ArrayLike) -> FloatArray:
    """Ego-frame poses back into the world frame (inverse of :func:`poses_to_ego_frame`); headings wrapped.

    ``poses [..., 3], ego_pose [..., 3] -> [..., 3]`` (leading axes broadcast).
    """
    poses = _array("poses", poses, last=3)
    pose = _array("ego_pose", ego_pose, last=3)
    xy = _rotate(poses[..., :2], pose[..., 2]) + pose[..., :2]
    return np.concatenate([xy, wrap_angle(poses[..., 2] + pose[..., 2])[..., None]], axis=-1)
