"""Driving geometry against closed forms and shapely: angles, polylines, oriented boxes, ego frames."""

from __future__ import annotations

import math

import numpy as np
import pytest
import shapely

from trajgen.envs.driving.geometry import (
    box_corners,
    boxes_overlap,
    from_ego_frame,
    interpolate_polyline,
    polyline_arclength,
    poses_from_ego_frame,
    poses_to_ego_frame,
    project_to_polyline,
    resample_polyline,
    to_ego_frame,
    wrap_angle,
)

L_SHAPE = np.array([[0.0, 0.0], [10.0, 0.0], [10.0, 5.0]])  # east 10 m, then north 5 m


def _arc(radius: float, n: int) -> np.ndarray:
    """Quarter circle of ``radius`` centred at the origin, counter-clockwise from (radius, 0)."""
    t = np.linspace(0.0, math.pi / 2, n)
    return radius * np.stack([np.cos(t), np.sin(t)], axis=-1)


def test_wrap_angle_range_and_equivalence() -> None:
    a = np.linspace(-20.0, 20.0, 1001)
    w = wrap_angle(a)
    assert np.all(w >= -math.pi) and np.all(w < math.pi)
    np.testing.assert_allclose(np.cos(w), np.cos(a), atol=1e-12)
    np.testing.assert_allclose(np.sin(w), np.sin(a), atol=1e-12)
    assert wrap_angle(math.pi) == pytest.approx(-math.pi)


def test_arclength_of_batched_polylines() -> None:
    square = np.array([[0.0, 0.0], [3.0, 4.0], [3.0, 10.0]])
    batch = np.stack([square, 2.0 * square])
    np.testing.assert_allclose(polyline_arclength(batch), [[0.0, 5.0, 11.0], [0.0, 10.0, 22.0]])
    arc = _arc(7.0, 2001)
    assert polyline_arclength(arc)[-1] == pytest.approx(7.0 * math.pi / 2, rel=1e-6)


def test_resample_is_uniform_in_arclength_and_keeps_ends() -> None:
    out = resample_polyline(L_SHAPE, 7)
    np.testing.assert_allclose(np.diff(polyline_arclength(out)), 2.5, atol=1e-12)  # corner is a vertex at s = 10
    np.testing.assert_allclose(out[0], L_SHAPE[0])
    np.testing.assert_allclose(out[-1], L_SHAPE[-1])
    np.testing.assert_allclose(out[4], [10.0, 0.0])
    with_duplicates = np.array([[0.0, 0.0], [0.0, 0.0], [10.0, 0.0], [10.0, 0.0], [10.0, 5.0]])
    np.testing.assert_allclose(resample_polyline(with_duplicates, 7), out)


def test_interpolate_inside_and_extrapolates_past_the_ends() -> None:
    s = np.array([[-2.0, 0.0, 4.0], [10.0, 12.5, 20.0]])
    xy, heading = interpolate_polyline(L_SHAPE, s)
    assert xy.shape == (2, 3, 2) and heading.shape == (2, 3)
    np.testing.assert_allclose(xy, [[[-2.0, 0.0], [0.0, 0.0], [4.0, 0.0]], [[10.0, 0.0], [10.0, 2.5], [10.0, 10.0]]])
    np.testing.assert_allclose(heading, [[0.0, 0.0, 0.0], [math.pi / 2] * 3])


def test_interpolate_on_a_fine_arc_matches_the_circle() -> None:
    r = 20.0
    s = np.linspace(0.0, r * math.pi / 2, 37)
    xy, heading = interpolate_polyline(_arc(r, 4001), s)
    np.testing.assert_allclose(xy, r * np.stack([np.cos(s / r), np.sin(s / r)], -1), atol=1e-3)
    np.testing.assert_allclose(heading, s / r + math.pi / 2, atol=1e-3)


def test_project_matches_shapely_and_round_trips() -> None:
    rng = np.random.default_rng(0)
    line = _arc(15.0, 40) + np.array([3.0, -2.0])
    queries = rng.uniform(-5.0, 25.0, size=(200, 2))
    s, lateral = project_to_polyline(line, queries)
    ref = shapely.LineString(line)
    ref_dist = np.array([ref.distance(shapely.Point(q)) for q in queries])
    ref_s = np.array([ref.project(shapely.Point(q)) for q in queries])
    inside = (s > 1e-9) & (s < ref.length - 1e-9)  # shapely clamps at the ends; we extend the end segments
    np.testing.assert_allclose(np.abs(lateral[inside]), ref_dist[inside], atol=1e-9)
    np.testing.assert_allclose(s[inside], ref_s[inside], atol=1e-9)
    # left of a counter-clockwise arc is towards its centre
    towards_centre = np.linalg.norm(queries - [3.0, -2.0], axis=-1) < 15.0
    assert np.all((lateral[inside] > 0) == towards_centre[inside])
    # offsetting an interpolated point along the left normal projects back to (s, lateral)
    s0 = np.linspace(0.5, ref.length - 0.5, 25)
    xy, heading = interpolate_polyline(line, s0)
    normal = np.stack([-np.sin(heading), np.cos(heading)], -1)
    s1, lat1 = project_to_polyline(line, xy + 0.3 * normal)
    np.testing.assert_allclose(s1, s0, atol=1e-9)
    np.testing.assert_allclose(lat1, 0.3, atol=1e-9)


def test_project_extends_the_end_segments() -> None:
    s, lateral = project_to_polyline(L_SHAPE, np.array([[-3.0, 1.0], [9.0, 8.0], [11.0, 8.0], [5.0, -2.0]]))
    np.testing.assert_allclose(s, [-3.0, 18.0, 18.0, 5.0])
    np.testing.assert_allclose(lateral, [1.0, 1.0, -1.0, -2.0])


def test_box_corners_order_and_rotation() -> None:
    corners = box_corners(np.array([1.0, 2.0, math.pi / 2, 4.0, 2.0]))
    np.testing.assert_allclose(corners, [[0.0, 4.0], [0.0, 0.0], [2.0, 0.0], [2.0, 4.0]], atol=1e-12)
    batch = box_corners(np.zeros((3, 2, 5)) + [0.0, 0.0, 0.0, 2.0, 1.0])
    assert batch.shape == (3, 2, 4, 2)
    area = shapely.Polygon(box_corners(np.array([5.0, -1.0, 0.7, 4.5, 1.8]))).area
    assert area == pytest.approx(4.5 * 1.8)


def test_boxes_overlap_matches_shapely_polygons() -> None:
    rng = np.random.default_rng(1)
    n = 2000
    a = np.column_stack([rng.uniform(-4, 4, n), rng.uniform(-4, 4, n), rng.uniform(-4, 4, n),
                         rng.uniform(1, 6, n), rng.uniform(0.5, 3, n)])
    b = np.column_stack([rng.uniform(-4, 4, n), rng.uniform(-4, 4, n), rng.uniform(-4, 4, n),
                         rng.uniform(1, 6, n), rng.uniform(0.5, 3, n)])
    ours = boxes_overlap(a, b)
    ca, cb = box_corners(a), box_corners(b)
    ref = np.array([shapely.Polygon(ca[i]).intersection(shapely.Polygon(cb[i])).area > 1e-9 for i in range(n)])
    assert 0.2 < ref.mean() < 0.8  # both outcomes well represented
    np.testing.assert_array_equal(ours, ref)


def test_boxes_overlap_hand_cases_and_broadcasting() -> None:
    car = np.array([0.0, 0.0, 0.0, 4.0, 2.0])
    # a diamond whose corner would reach the car's axis-aligned bounding box but not the car (corner case of SAT)
    diamond = np.array([3.3, 1.9, math.pi / 4, 2.0, 2.0])
    assert not boxes_overlap(car, diamond)
    assert boxes_overlap(car, [2.9, 1.5, math.pi / 4, 2.0, 2.0])  # the car's corner (2, 1) pokes in
    assert not boxes_overlap(car, [4.0, 0.0, 0.0, 4.0, 2.0])  # touching end to end
    others = np.array([[3.9, 0.0, 0.0, 4.0, 2.0], [0.0, 2.5, 0.0, 4.0, 2.0], [0.0, 0.0, 1.0, 1.0, 1.0]])
    np.testing.assert_array_equal(boxes_overlap(car, others), [True, False, True])
    grid = boxes_overlap(others[:, None, :], others[None, :, :])
    assert grid.shape == (3, 3) and np.all(np.diag(grid)) and np.array_equal(grid, grid.T)


def test_ego_frame_round_trips_and_known_values() -> None:
    ego = np.array([10.0, 5.0, math.pi / 2])
    np.testing.assert_allclose(to_ego_frame(np.array([10.0, 8.0]), ego), [3.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(to_ego_frame(np.array([8.0, 5.0]), ego), [0.0, 2.0], atol=1e-12)  # west = left
    pose = poses_to_ego_frame(np.array([10.0, 8.0, -math.pi]), ego)
    np.testing.assert_allclose(pose, [3.0, 0.0, math.pi / 2], atol=1e-12)
    rng = np.random.default_rng(2)
    egos = np.column_stack([rng.normal(0, 50, (6, 2)), rng.uniform(-4, 4, 6)])[:, None, :]  # [6, 1, 3]
    poses = np.column_stack([rng.normal(0, 50, (6 * 5, 2)), rng.uniform(-4, 4, 30)]).reshape(6, 5, 3)
    local = poses_to_ego_frame(poses, egos)
    back = poses_from_ego_frame(local, egos)
    np.testing.assert_allclose(back[..., :2], poses[..., :2], atol=1e-9)
    np.testing.assert_allclose(wrap_angle(back[..., 2] - poses[..., 2]), 0.0, atol=1e-12)
    np.testing.assert_allclose(local[..., :2], to_ego_frame(poses[..., :2], egos))
    np.testing.assert_allclose(from_ego_frame(local[..., :2], egos), poses[..., :2], atol=1e-9)
    # distances are preserved
    np.testing.assert_allclose(np.linalg.norm(local[..., :2], axis=-1),
                               np.linalg.norm(poses[..., :2] - egos[..., :2], axis=-1), atol=1e-9)


def test_bad_inputs_raise_naming_the_argument() -> None:
    with pytest.raises(ValueError, match="points"):
        polyline_arclength(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="points"):
        resample_polyline(np.zeros((3, 2)), 5)  # no two distinct points
    with pytest.raises(ValueError, match="n must"):
        resample_polyline(L_SHAPE, 1)
    with pytest.raises(ValueError, match="s has NaN"):
        interpolate_polyline(L_SHAPE, np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="xy"):
        project_to_polyline(L_SHAPE, np.zeros((3, 3)))
    with pytest.raises(ValueError, match="boxes"):
        box_corners(np.zeros(4))
    with pytest.raises(ValueError, match="b must have non-negative"):
        boxes_overlap(np.ones(5), -np.ones(5))
    with pytest.raises(ValueError, match="ego_pose"):
        to_ego_frame(np.zeros(2), np.zeros(2))
