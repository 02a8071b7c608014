"""Driving maps, traffic rules, tracking and the simulator core against hand-built scenes and closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trajgen.envs.driving.geometry import boxes_overlap
from trajgen.envs.driving.maps import four_way_intersection, merge_road
from trajgen.envs.driving.sim import EGO_FRONT, DrivingSim
from trajgen.envs.driving.tracking import PlanTracker, headings_from_path, plan_infeasible
from trajgen.envs.driving.traffic import Traffic, arrival_time, hash_uniform
from trajgen.envs.driving.vehicles import BicycleLimits, KinematicBicycle, idm_acceleration, idm_equilibrium_gap

INTERSECTION = four_way_intersection()
MERGE = merge_road()


def _path(road, name: str) -> int:
    return road.path_names.index(name)


# ---------------------------------------------------------------------------------------------- maps


@pytest.mark.parametrize("road", [INTERSECTION, MERGE], ids=["intersection", "merge"])
def test_raster_and_polygon_agree_away_from_the_boundary(road) -> None:
    rng = np.random.default_rng(0)
    x0, y0, x1, y1 = road.drivable.bounds
    pts = rng.uniform([x0 - 5, y0 - 5], [x1 + 5, y1 + 5], size=(20000, 2))
    import shapely

    near_edge = shapely.distance(road.drivable.boundary, shapely.points(pts)) < 0.15
    fast, exact = road.is_drivable(pts), road.is_drivable_exact(pts)
    assert exact.sum() > 1000 and (~exact).sum() > 1000
    np.testing.assert_array_equal(fast[~near_edge], exact[~near_edge])


def test_intersection_geometry_closed_forms() -> None:
    road, w, b, L = INTERSECTION, 3.5, 10.0, 70.0
    s = np.array([0.0, 35.0, L, L + 10.0])
    xy, heading = road.path_pose(np.full(4, _path(road, "south_straight")), s)
    np.testing.assert_allclose(xy, np.stack([np.full(4, w / 2), -b - L + s], axis=1), atol=1e-9)
    np.testing.assert_allclose(heading, math.pi / 2, atol=1e-9)
    # right turn: quarter circle of radius b - w/2 about (b, -b); left turn: radius b + w/2 about (-b, -b)
    for name, centre, radius in (("south_right", (b, -b), b - w / 2), ("south_left", (-b, -b), b + w / 2)):
        k = _path(road, name)
        arc = radius * math.pi / 2
        xy, _ = road.path_pose(np.full(5, k), L + np.linspace(0.5, arc - 0.5, 5))
        np.testing.assert_allclose(np.hypot(xy[:, 0] - centre[0], xy[:, 1] - centre[1]), radius, atol=0.02)
        assert abs(road.path_length[k] - (2 * L + arc)) < 0.05


def test_intersection_conflicts_follow_the_rules_of_the_road() -> None:
    road = INTERSECTION
    conflict = ~np.isnan(road.conflict_in)
    np.testing.assert_array_equal(conflict, conflict.T)
    for entry in ("south", "north", "east", "west"):
        same = [_path(road, f"{entry}_{t}") for t in ("left", "straight", "right")]
        assert not conflict[np.ix_(same, same)].any()  # one approach lane: leaders, not conflicts
    p = {n: _path(road, n) for n in ("south_straight", "north_straight", "south_left", "east_straight",
                                     "south_right", "west_straight")}
    assert not conflict[p["south_straight"], p["north_straight"]]  # opposite straights pass each other
    assert conflict[p["south_left"], p["north_straight"]]  # left turn crosses oncoming traffic
    assert conflict[p["south_straight"], p["east_straight"]]  # crossing straights
    assert conflict[p["south_right"], p["west_straight"]]  # both end in the east exit lane
    assert not conflict[p["south_right"], p["east_straight"]]
    # zones lie inside the box: from the stop line to the connector's end (+ the 2 m search margin)
    conn_end = (road.path_length - 70.0)[:, None] * np.ones((1, road.n_paths))
    assert np.all(road.conflict_in[conflict] >= 69.0 - 2.0)
    assert np.all(road.conflict_out[conflict] <= conn_end[conflict] + 2.5)
    assert np.all(road.conflict_out[conflict] > road.conflict_in[conflict])


def test_merge_lane_change_offsets_keep_x() -> None:
    road = MERGE
    ramp, right, left = 2, 1, 0
    s = np.linspace(road.change_lo[ramp, 0] + 1, road.change_hi[ramp, 0] - 1, 7)
    xy_ramp, _ = road.path_pose(np.full(7, ramp), s)
    xy_right, _ = road.path_pose(np.full(7, right), s + road.change_offset[ramp, 0])
    np.testing.assert_allclose(xy_ramp[:, 0], xy_right[:, 0], atol=1e-6)
    np.testing.assert_allclose(xy_right[:, 1] - xy_ramp[:, 1], road.lane_width, atol=1e-6)
    assert road.change_target[left, 1] == right and road.change_target[right, 0] == left
    assert road.change_target[right, 1] == -1 and np.isfinite(road.end_obstacle_s[ramp])


# ---------------------------------------------------------------------------------------------- traffic


def _traffic(road, rows: list[tuple[int, float, float]], ego: tuple[int, float, float] = (0, -500.0, 0.0),
             v0: float = 15.0) -> Traffic:
    """One scene with hand-placed agents (path, front s, speed) and the ego parked far behind."""
    tr = Traffic(road, 1, len(rows))
    for i, (path, s, v) in enumerate(rows):
        tr.path[0, i], tr.s[0, i], tr.v[0, i], tr.valid[0, i] = path, s, v, True
    for k, val in (("v0", v0), ("T", 1.5), ("s0", 2.0), ("a_max", 1.0), ("b", 1.5)):
        tr.params[k][:] = val
    tr.length[:] = 4.5
    tr.t_crit[:] = 2.0
    tr.valid[0, tr.ego] = True
    xy, h = road.path_pose(np.array([ego[0]]), np.array([ego[1]]))
    tr.set_ego(np.array([ego[0]]), np.array([ego[1]]), np.array([ego[2]]), xy, h)
    return tr


def test_idm_free_road_and_equilibrium_gap_in_traffic() -> None:
    v0, v = 25.0, 18.0
    gap = float(idm_equilibrium_gap(np.array([v]), v0, 2.0, 1.5)[0])
    # vehicle 0 alone ahead on the left lane; vehicle 1 at the equilibrium gap behind vehicle 2 (at its own v0)
    tr = _traffic(MERGE, [(0, 300.0, v), (1, 200.0, v), (1, 200.0 + gap + 4.5, v)], v0=v0)
    tr.params["v0"][0, 2] = v
    acc = tr.idm_accelerations()[0]
    free = idm_acceleration(np.array([v]), v0, np.inf, 0.0, a_max=1.0, b=1.5, s0=2.0, T=1.5)[0]
    assert abs(acc[0] - free) < 1e-12 and abs(acc[0] - (1 - (v / v0) ** 4)) < 1e-12
    assert abs(acc[1]) < 1e-9 and abs(acc[2]) < 1e-12


def test_leader_on_a_shared_approach_lane() -> None:
    road = INTERSECTION
    left, straight = _path(road, "south_left"), _path(road, "south_straight")
    tr = _traffic(road, [(straight, 30.0, 8.0), (left, 45.0, 8.0), (_path(road, "north_left"), 40.0, 8.0)])
    leader, gap, _ = tr.leaders()
    assert leader[0, 0] == 1 and abs(gap[0, 0] - (45.0 - 4.5 - 30.0)) < 1e-12
    assert leader[0, 1] == -1  # nothing ahead of the front car on its lane (the north car is elsewhere)


def test_yielding_first_come_first_served_with_gap_acceptance() -> None:
    road = INTERSECTION
    a, b = _path(road, "south_straight"), _path(road, "east_straight")
    stop = road.stop_s[a]
    # b is committed (past its stop line) and about to enter the shared zone: a must stop at its line
    tr = _traffic(road, [(a, stop - 15.0, 8.0), (b, stop + 2.0, 8.0)])
    obstacle = tr.yield_obstacle()[0]
    assert obstacle[0] == stop and np.isinf(obstacle[1])
    # b is still 60 m out: it clears long after a passes, so a goes
    tr = _traffic(road, [(a, stop - 5.0, 8.0), (b, stop - 60.0, 3.0)])
    assert np.all(np.isinf(tr.yield_obstacle()[0]))
    # two symmetric uncommitted arrivals: exactly one waits (the order is total, no deadlock)
    tr = _traffic(road, [(a, stop - 12.0, 6.0), (b, stop - 12.0, 6.0)])
    waits = np.isfinite(tr.yield_obstacle()[0][:2])
    assert waits.sum() == 1


def test_arrival_time_closed_form() -> None:
    d, v, a, v0 = np.array([10.0, 100.0, 0.0]), np.array([0.0, 5.0, 3.0]), np.array([2.0, 1.0, 1.0]), 10.0
    t = arrival_time(d, v, a, np.full(3, v0))
    assert abs(t[0] - math.sqrt(2 * 10.0 / 2.0)) < 1e-12
    d_acc = (v0**2 - 25.0) / 2.0  # 37.5 m to reach 10 m/s from 5 at 1 m/s^2
    assert abs(t[1] - (5.0 + (100.0 - d_acc) / v0)) < 1e-12 and t[2] == 0.0


def test_mobil_ramp_vehicle_merges_when_the_gap_is_free_and_waits_when_not() -> None:
    road = MERGE
    s_ramp = road.change_lo[2, 0] + 20.0
    tr = _traffic(road, [(2, s_ramp, 15.0)])
    for _ in range(5):
        tr.step()
    assert tr.path[0, 0] == 1  # on the right lane, at the same x
    xy, _ = tr.poses()
    assert abs(xy[0, 0, 1] - (-road.lane_width)) < 1.0  # still drawn near the ramp: the change just began
    # a car right alongside on the right lane: unsafe, stays on the ramp
    s_right = s_ramp + road.change_offset[2, 0]
    tr = _traffic(road, [(2, s_ramp, 15.0), (1, s_right + 1.0, 15.0)])
    tr.step()
    assert tr.path[0, 0] == 2


@pytest.mark.parametrize("scenario", ["intersection", "merge"])
def test_traffic_never_collides_with_itself(scenario: str) -> None:
    sim = DrivingSim(scenario, 24)
    sim.reset(np.arange(24) + 100)
    sim.ego.y[:] += 1e4  # park the ego far away so only agent-agent interactions remain
    sim.traffic.valid[:, sim.traffic.n_agents :] = False  # neither the ego nor its shadow
    tr = sim.traffic
    moved = 0.0
    for _ in range(250):
        s_before = tr.s.copy()
        tr.step()
        moved += np.sum(np.where(tr.valid, tr.s - s_before, 0.0))
        b = tr.boxes()
        pair = tr.valid[:, :, None] & tr.valid[:, None, :] & tr._others
        assert not (boxes_overlap(b[:, :, None], b[:, None, :]) & pair).any()
    assert moved > 24 * 4 * 50.0  # traffic really flows (on average > 4 cars x 50 m per scene)


def test_hash_uniform_depends_only_on_seed_and_counter() -> None:
    u1 = hash_uniform(np.array([5, 6, 7]), np.array([10, 10, 10]), 1, 3)
    u2 = hash_uniform(np.array([7]), np.array([10]), 1, 3)
    np.testing.assert_array_equal(u1[2], u2[0])
    big = hash_uniform(np.arange(20000), np.zeros(20000, dtype=np.int64), 0, 1)
    assert abs(big.mean() - 0.5) < 0.01 and big.min() >= 0 and big.max() < 1


# ---------------------------------------------------------------------------------------------- tracking


@pytest.mark.parametrize(("v", "radius"), [(10.0, 30.0), (5.0, 12.0), (12.0, math.inf)])
def test_tracking_follows_constant_curvature_plans(v: float, radius: float) -> None:
    lim = BicycleLimits()
    t = np.arange(1, 9) * 0.5
    if math.isinf(radius):
        plan = np.stack([v * t, 0 * t, 0 * t], axis=-1)
        steer0 = 0.0
    else:
        ang = v * t / radius
        plan = np.stack([radius * np.sin(ang), radius * (1 - np.cos(ang)), ang], axis=-1)
        steer0 = math.atan(lim.wheelbase / radius)
    car = KinematicBicycle(x=[0.0], y=[0.0], heading=[0.0], speed=[v], steer=[steer0], limits=lim)
    tracker = PlanTracker(lim)
    tracker.set_plan(plan[None], np.zeros((1, 3)))
    assert not plan_infeasible(plan[None], np.array([v]), lim)[0]
    for k in range(40):
        a, d = tracker.control(np.stack([car.x, car.y, car.heading], 1), car.speed, np.full(1, k * 0.1))
        st = car.step(a, d)
        along = v * (k + 1) * 0.1
        if math.isinf(radius):
            want = np.array([along, 0.0])
        else:
            th = along / radius
            want = np.array([radius * math.sin(th), radius * (1 - math.cos(th))])
        # pure pursuit cuts a curve by about Ld^2 / (2R) at most; along-track the speed law holds the timing
        assert np.hypot(st.x[0] - want[0], st.y[0] - want[1]) < (0.2 if math.isinf(radius) else 0.15)
    assert abs(st.speed[0] - v) < 0.05


def test_tracking_corrects_a_lateral_offset() -> None:
    lim = BicycleLimits()
    t = np.arange(1, 9) * 0.5
    plan = np.stack([8.0 * t, 0 * t, 0 * t], axis=-1)[None]
    car = KinematicBicycle(x=[0.0], y=[1.0], heading=[0.0], speed=[8.0], limits=lim)
    tracker = PlanTracker(lim)
    tracker.set_plan(plan, np.zeros((1, 3)))
    for k in range(40):
        a, d = tracker.control(np.stack([car.x, car.y, car.heading], 1), car.speed, np.full(1, k * 0.1))
        car.step(a, d)
    assert abs(car.y[0]) < 0.1 and abs(car.heading[0]) < 0.05


def test_tracking_continues_a_stopping_plan_along_its_final_heading() -> None:
    """Past its last pose a plan continues along its final heading, not along its last segment: a plan that stops
    1.085 m ahead, last segment 5 mm long with 2 cm of lateral noise (a 76 deg direction), heading 0 throughout."""
    lim = BicycleLimits()
    x = np.array([0.45, 0.75, 0.93, 1.02, 1.06, 1.075, 1.08, 1.085])
    y = np.array([0, 0, 0, 0, 0, 0, 0, 0.02])
    plan = np.stack([x, y, np.zeros(8)], axis=-1)[None]
    tracker = PlanTracker(lim)
    tracker.set_plan(plan, np.zeros((1, 3)))
    _, steer = tracker.control(np.zeros((1, 3)), np.array([1.0]), np.zeros(1))
    # pure pursuit by hand: the rear axle projects to s = 0, the pursuit point lies min_lookahead (3 m) further on
    end_s = np.hypot(np.diff(x, prepend=0.0), np.diff(y, prepend=0.0)).sum()
    target = np.array([x[-1] + 3.0 - end_s, y[-1]])
    expected = math.atan(lim.wheelbase * 2 * target[1] / (target @ target))
    assert steer[0] == pytest.approx(expected, rel=1e-9)
    assert abs(steer[0]) < 0.02  # along the last segment the point would sit 1.8 m to the left: a 60 deg steer


def arc_plan(speed: float, radius: float, rotation: float = 0.0) -> np.ndarray:
    """An ego-frame plan [8, 3] along a circle of ``radius`` through the origin (tangent rotated by ``rotation``),
    with its exact headings."""
    angle = speed * 0.5 * np.arange(1, 9) / radius
    x, y = radius * np.sin(angle), radius * (1 - np.cos(angle))
    c, s = math.cos(rotation), math.sin(rotation)
    return np.stack([c * x - s * y, s * x + c * y, angle + rotation], axis=-1)


def test_headings_from_path_are_the_tangents_of_an_arc() -> None:
    """On a circle the chord from pose i - 1 to pose i + 1 is parallel to the tangent at pose i (equal spacing,
    the ego at the origin counting as pose -1); the last pose gets its last segment's direction, the tangent half
    a step back."""
    for speed, radius, rotation in [(10.0, 30.0, 0.0), (6.0, -15.0, 0.4), (12.0, 400.0, -1.0)]:
        plan = arc_plan(speed, radius, rotation)
        noisy = plan + np.array([0.0, 0.0, 0.3]) * np.sin(np.arange(8))[:, None]  # wrong headings, same path
        derived = headings_from_path(noisy[None])[0]
        np.testing.assert_allclose(derived[:, :2], plan[:, :2])
        np.testing.assert_allclose(derived[:7, 2], plan[:7, 2], atol=1e-9)
        half_step_back = plan[7, 2] - speed * 0.25 / radius
        assert derived[7, 2] == pytest.approx(half_step_back, abs=1e-9)


def test_headings_from_path_keep_the_plans_heading_where_it_stops() -> None:
    """Chords under 0.5 m (a plan stopping 1.1 m ahead) keep the plan's headings; a rotated plan's derived
    headings rotate with it (equivariance)."""
    x = np.array([0.45, 0.75, 0.93, 1.02, 1.06, 1.075, 1.08, 1.085])
    plan = np.stack([x, np.array([0, 0, 0, 0, 0, 0, 0, 0.02]), np.full(8, 0.05)], axis=-1)
    derived = headings_from_path(plan[None])[0]
    # chords: 0.75 m (origin to pose 1), then 0.48 m and shorter; the 5 mm last segment points 76 deg away
    np.testing.assert_array_equal(derived[:, 2], [0.0, *[0.05] * 7])
    turning = arc_plan(9.0, 20.0)
    rotated = arc_plan(9.0, 20.0, rotation=0.7)
    np.testing.assert_allclose(headings_from_path(rotated[None])[0, :, 2],
                               headings_from_path(turning[None])[0, :, 2] + 0.7, atol=1e-9)
    with pytest.raises(ValueError, match="action must be a plan of shape"):
        headings_from_path(plan)
    with pytest.raises(ValueError, match="NaN"):
        headings_from_path(np.full((1, 8, 3), np.nan))


def test_infeasible_plans_are_flagged() -> None:
    lim = BicycleLimits()
    t = np.arange(1, 9) * 0.5
    ok = np.stack([10 * t, 0 * t, 0 * t], -1)
    teleport = ok.copy()
    teleport[3:, 0] += 40.0  # 80 m/s between two knots
    hard_brake = np.stack([np.minimum(10 * t, 2.0), 0 * t, 0 * t], -1)  # 10 m/s to 0 in 0.25 s
    sharp = np.stack([np.full(8, 2.0), 2.0 * t, 0 * t], -1)  # a right angle at 2 m: curvature far beyond 1/3.9
    backwards = np.stack([-5 * t, 0 * t, 0 * t], -1)
    flags = plan_infeasible(np.stack([ok, teleport, hard_brake, sharp, backwards]), np.full(5, 10.0), lim)
    np.testing.assert_array_equal(flags, [False, True, True, True, True])


# ---------------------------------------------------------------------------------------------- sim


def test_reset_depends_only_on_the_scene_seed() -> None:
    batch = DrivingSim("merge", 4)
    batch.reset(np.array([11, 12, 13, 14]))
    alone = DrivingSim("merge", 1)
    alone.reset(np.array([13]))
    for _ in range(20):
        batch.step(np.zeros(4), np.zeros(4))
        alone.step(np.zeros(1), np.zeros(1))
    np.testing.assert_allclose(batch.ego_pose()[2], alone.ego_pose()[0], atol=1e-12)
    np.testing.assert_allclose(batch.agent_boxes()[2][batch.agent_valid()[2]],
                               alone.agent_boxes()[0][alone.agent_valid()[0]], atol=1e-12)


def test_progress_collision_and_off_road_on_hand_built_scenes() -> None:
    sim = DrivingSim("intersection", 3)
    sim.reset(np.array([1, 2, 3]))
    k = _path(sim.road, "south_straight")
    sim.route[:] = k
    sim.traffic.valid[:, : sim.N] = False
    x0, y0 = 1.75, -60.0
    sim.ego.x[:], sim.ego.y[:], sim.ego.heading[:] = x0, y0, math.pi / 2
    sim.ego.speed[:], sim.ego.steer[:], sim.ego.accel[:] = 10.0, 0.0, 0.0
    sim.ego.x[2] = 40.0  # scene 2: in the grass
    sim.route_s[:] = y0 + 80.0
    sim._sync_ego()
    # scene 1: an agent placed right where the ego will be in one step
    tr = sim.traffic
    tr.valid[1, 0], tr.path[1, 0], tr.s[1, 0], tr.v[1, 0] = True, k, y0 + 80.0 + 1.0 + EGO_FRONT + 2.0, 0.0
    tr.length[1, 0] = 4.5
    out = sim.step(np.zeros(3), np.zeros(3))
    np.testing.assert_allclose(out.progress[:2], 1.0, atol=1e-9)  # 10 m/s x 0.1 s along a straight route
    np.testing.assert_array_equal(out.collision, [False, True, False])
    np.testing.assert_array_equal(out.off_road, [False, False, True])
    assert not out.completed.any() and not out.timeout.any()


def test_clone_replays_the_same_future_independently() -> None:
    sim = DrivingSim("intersection", 3)
    sim.reset(np.array([5, 6, 7]))
    twin = sim.clone()
    assert twin.road is sim.road and twin.traffic.road is sim.road
    for _ in range(15):
        sim.step(np.full(3, 1.0), np.full(3, 0.05))
        twin.step(np.full(3, 1.0), np.full(3, 0.05))
    np.testing.assert_array_equal(sim.ego_pose(), twin.ego_pose())
    np.testing.assert_array_equal(sim.agent_boxes()[sim.agent_valid()], twin.agent_boxes()[twin.agent_valid()])
    sim.step(np.full(3, -5.0), np.zeros(3))
    assert not np.array_equal(sim.ego_pose(), twin.ego_pose()) and np.all(twin.steps == 15)


def test_bad_input_raises_clear_errors() -> None:
    with pytest.raises(ValueError, match="scenario must be one of"):
        DrivingSim("roundabout", 2)
    sim = DrivingSim("merge", 2)
    with pytest.raises(RuntimeError, match="before reset"):
        sim.step(np.zeros(2), np.zeros(2))
    with pytest.raises(ValueError, match="seeds must be 2 integers"):
        sim.reset(np.array([0.5, 1.5]))
    sim.reset(np.array([1, 2]))
    with pytest.raises(ValueError, match="accel_cmd has NaN"):
        sim.step(np.array([0.0, np.nan]), np.zeros(2))
    with pytest.raises(ValueError, match="steer_cmd must have shape"):
        sim.step(np.zeros(2), np.zeros(3))
