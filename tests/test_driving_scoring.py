"""NAVSIM PDM score on hand-built scenes whose sub-scores are known, comfort against closed forms, diversity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import shapely

from trajgen.envs.driving.scoring import (
    ComfortLimits,
    EgoShape,
    comfort_metrics,
    ego_progress_score,
    ego_velocity_and_acceleration,
    episode_scores,
    mode_diversity,
    pdm_scores,
    plan_errors,
)

DT = 0.1
T = np.arange(41) * DT  # 4 s at 10 Hz
LANE = 3.5
ROAD = shapely.box(-100.0, -1.5 * LANE, 400.0, 1.5 * LANE)  # three lanes, y in [-5.25, 5.25]
ROUTE = np.array([[-100.0, 0.0], [400.0, 0.0]])
SHAPE = EgoShape()  # 4.8 x 2.0, rear axle 1.35 m behind the centre


def on_road(xy: np.ndarray) -> np.ndarray:
    return shapely.contains_xy(ROAD, xy[..., 0], xy[..., 1])


def lane_of(xy: np.ndarray) -> np.ndarray:
    lane = np.floor((xy[..., 1] + 1.5 * LANE) / LANE).astype(np.int64)
    return np.where((lane >= 0) & (lane < 3), lane, -1)


def straight(x0: float, v: float, y: float = 0.0, a: float = 0.0, t: np.ndarray = T) -> np.ndarray:
    """Rear-axle poses [F, 3] along +x with speed v + a t (stopping at 0)."""
    t_stop = -v / a if a < 0 else np.inf
    tc = np.minimum(t, t_stop)
    x = x0 + v * tc + 0.5 * a * tc**2
    return np.stack([x, np.full_like(t, y), np.zeros_like(t)], axis=-1)


def agent(x0: float, y0: float, vx: float, vy: float = 0.0, t: np.ndarray = T, length: float = 4.8,
          width: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """One agent moving at constant velocity: boxes [F, 5] and velocity [F, 2]."""
    heading = math.atan2(vy, vx) if (vx or vy) else 0.0
    boxes = np.stack([x0 + vx * t, y0 + vy * t, np.full_like(t, heading), np.full_like(t, length),
                      np.full_like(t, width)], axis=-1)
    return boxes, np.tile([vx, vy], (t.shape[0], 1))


def score(poses: np.ndarray, agents: list[tuple[np.ndarray, np.ndarray]], reference: float | None = None,
          **kwargs: object) -> dict[str, float]:
    """Score one plan [F, 3] against agents; reference progress defaults to the plan's own."""
    f = poses.shape[0]
    if agents:
        boxes = np.stack([a[0] for a in agents], axis=1)[None]
        vel = np.stack([a[1] for a in agents], axis=1)[None]
    else:
        boxes, vel = np.zeros((1, f, 1, 5)), np.zeros((1, f, 1, 2))
    valid = np.full(boxes.shape[:3], bool(agents))
    if reference is None:
        reference = poses[-1, 0] - poses[0, 0]
    out = pdm_scores(poses[None], boxes, valid, vel, on_road, ROUTE, [reference], **kwargs)
    return {k: float(v[0]) for k, v in out.items()}


def pdms_formula(nc: float, dac: float, ep: float, ttc: float, c: float) -> float:
    return nc * dac * (5 * ep + 5 * ttc + 2 * c) / 12


# ---------------------------------------------------------------------------------------------- collisions


def test_free_road_scores_one() -> None:
    s = score(straight(0.0, 10.0), [])
    assert {k: s[k] for k in ("nc", "dac", "ttc", "ep", "c", "pdms")} == dict.fromkeys(
        ("nc", "dac", "ttc", "ep", "c", "pdms"), 1.0)
    assert s["progress"] == pytest.approx(40.0)


def test_head_on_collision_is_at_fault_at_the_right_frame() -> None:
    # centres close at 20 m/s from 58.65 m apart; boxes overlap once the gap < 4.8 m, i.e. t > 2.6925 s
    s = score(straight(0.0, 10.0), [agent(60.0, 0.0, -10.0)])
    assert s["nc"] == 0.0 and s["pdms"] == 0.0 and s["collision"] == 1.0
    assert s["collision_frame"] == 27
    assert s["ttc"] == 0.0 and s["ep"] == 0.0  # progress only counts when NC * DAC > 0


def test_rear_ended_ego_is_not_at_fault() -> None:
    stopped = score(straight(0.0, 0.0), [agent(-15.0, 0.0, 10.0)])
    assert stopped["collision"] == 1.0 and stopped["nc"] == 1.0 and stopped["ttc"] == 1.0
    # a moving ego hit from behind: the agent is then ignored, even after it has driven through to the front
    moving = score(straight(0.0, 3.0), [agent(-15.0, 0.0, 12.0)])
    assert moving["collision"] == 1.0 and moving["nc"] == 1.0 and moving["ttc"] == 1.0
    # "behind" is decided before the lateral rule: still not at fault while straddling two lanes
    straddling = score(straight(0.0, 3.0, y=LANE / 2), [agent(-15.0, LANE / 2, 12.0)], lane_of=lane_of)
    assert straddling["collision"] == 1.0 and straddling["nc"] == 1.0


def test_driving_into_a_stopped_car_or_a_static_object() -> None:
    assert score(straight(0.0, 10.0), [agent(30.0, 0.0, 0.0)])["nc"] == 0.0
    static = score(straight(0.0, 10.0), [agent(30.0, 0.0, 0.0)], agent_static=[[True]])
    assert static["nc"] == 0.5
    assert static["pdms"] == pytest.approx(pdms_formula(0.5, 1, static["ep"], 0, 1))


def test_lateral_collision_is_at_fault_only_when_straddling_lanes() -> None:
    # ego on the boundary between lanes 1 and 2; an agent level with it drifts in from the left at 1 m/s
    ego = straight(0.0, 10.0, y=LANE / 2)
    side = agent(0.35, LANE / 2 + LANE, 10.0, -1.0)
    in_lane_rules = score(ego, [side])
    assert in_lane_rules["collision"] == 1.0 and in_lane_rules["nc"] == 1.0
    # NAVSIM's TTC judges "ahead" from the ego's current rear axle to the agent 0.9 s later (9 m further on): within
    # 30 deg, so a car drifting in at the ego's speed is a TTC infraction even though the contact is not at fault
    assert in_lane_rules["ttc"] == 0.0
    straddling = score(ego, [side], lane_of=lane_of)
    assert straddling["nc"] == 0.0 and straddling["ttc"] == 0.0
    centred = score(straight(0.0, 10.0, y=0.0), [agent(0.35, LANE, 10.0, -1.0)], lane_of=lane_of)
    assert centred["collision"] == 1.0 and centred["nc"] == 1.0  # in one lane: not at fault


# ---------------------------------------------------------------------------------------------- DAC, TTC, EP


def test_drivable_area_compliance_at_the_road_edge() -> None:
    # road edge at y = 5.25; the ego's left corners sit at y + 1
    assert score(straight(0.0, 10.0, y=4.2), [])["dac"] == 1.0
    edge = score(straight(0.0, 10.0, y=4.3), [])
    assert edge["dac"] == 0.0 and edge["pdms"] == 0.0
    leaving = straight(0.0, 10.0)
    leaving[:, 1] = 0.15 * leaving[:, 0]  # drifts off the road within 4 s
    leaving[:, 2] = math.atan(0.15)
    assert score(leaving, [])["dac"] == 0.0


def test_ttc_catches_a_near_miss_without_a_collision() -> None:
    # brake at 5 m/s^2 from 10 m/s: stops after 10 m, 1 m short of a stopped car; at t = 0.5 s the ego (7.5 m/s)
    # pushed 0.9 s ahead covers 6.75 m > the 6.625 m gap
    ego = straight(0.0, 10.0, a=-5.0)
    s = score(ego, [agent(10.0 + 1.35 + 2.4 + 1.0 + 2.4, 0.0, 0.0)])
    assert s["collision"] == 0.0 and s["nc"] == 1.0
    assert s["ttc"] == 0.0 and s["ttc_frame"] <= 5
    assert s["c"] == 0.0  # -5 m/s^2 is below nuPlan's -4.05
    assert s["pdms"] == pytest.approx(pdms_formula(1, 1, 1, 0, 0))
    # following a car 3 m ahead at the same speed is safe: the look-ahead moves the car too
    assert score(straight(0.0, 10.0), [agent(1.35 + 4.8 + 3.0, 0.0, 10.0)])["ttc"] == 1.0


def test_ego_progress_normalisation() -> None:
    np.testing.assert_allclose(ego_progress_score([20.0, 20.0, 2.0, 0.0, 30.0, 20.0], [40.0, 3.0, 4.0, 10.0, 20.0, 40.0],
                                                  [1, 1, 1, 1, 1, 0]), [0.5, 1.0, 1.0, 0.0, 1.0, 0.0])
    half = score(straight(0.0, 5.0), [], reference=40.0)  # 20 m of 40 m
    assert half["ep"] == pytest.approx(0.5)
    assert half["pdms"] == pytest.approx(pdms_formula(1, 1, 0.5, 1, 1))
    assert score(straight(0.0, 1.0), [], reference=4.0)["ep"] == 1.0  # best progress < 5 m


def test_route_given_per_scene_and_progress_on_a_curve() -> None:
    # a quarter circle route of radius 50 m; the ego drives along it at 10 m/s
    phi = np.linspace(0.0, math.pi / 2, 200)
    arc = np.stack([50 * np.sin(phi), 50 - 50 * np.cos(phi)], -1)
    ang = 10.0 * T / 50.0
    poses = np.stack([50 * np.sin(ang), 50 - 50 * np.cos(ang), ang], -1)
    boxes, vel = np.zeros((2, 41, 1, 5)), np.zeros((2, 41, 1, 2))
    anywhere = shapely.box(-100, -100, 200, 200)
    out = pdm_scores(np.stack([poses, poses]), boxes, np.zeros((2, 41, 1)), vel,
                     lambda xy: shapely.contains_xy(anywhere, xy[..., 0], xy[..., 1]), [arc, arc[:100]], [40.0, 80.0])
    # the centre is 1.35 m ahead of the rear axle on the tangent; it moves 40 m along the arc (to chord error)
    np.testing.assert_allclose(out["progress"], 40.0, atol=0.1)
    np.testing.assert_allclose(out["ep"], [1.0, 0.5], atol=3e-3)


# ---------------------------------------------------------------------------------------------- comfort


def _circle(v: float, radius: float) -> np.ndarray:
    ang = v * T / radius
    return np.stack([radius * np.sin(ang), radius - radius * np.cos(ang), ang], -1)[None]


def test_derived_motion_matches_closed_forms() -> None:
    speed, accel = ego_velocity_and_acceleration(_circle(8.0, 20.0), DT)
    np.testing.assert_allclose(speed, 8.0, rtol=1e-3)
    np.testing.assert_allclose(accel[..., 1], 64.0 / 20.0, rtol=1e-2)  # v^2 / R to the left
    np.testing.assert_allclose(accel[0, 2:-2, 0], 0.0, atol=1e-9)
    np.testing.assert_allclose(accel[0, [0, 1, -2, -1], 0], 0.0, atol=0.1)  # one-sided differences near the ends
    speed, accel = ego_velocity_and_acceleration(straight(0.0, 2.0, a=1.5)[None], DT)
    np.testing.assert_allclose(speed[0], 2.0 + 1.5 * T, atol=1e-9)
    np.testing.assert_allclose(accel[..., 0], 1.5, atol=1e-9)


@pytest.mark.parametrize(("v", "radius", "yaw_rate_ok", "lat_ok"),
                         [(5.0, 5.5, True, True), (5.0, 5.15, False, True), (7.0, 9.5, True, False),
                          (10.0, 30.0, True, True)])
def test_comfort_on_circles_against_v_over_r(v: float, radius: float, yaw_rate_ok: bool, lat_ok: bool) -> None:
    # yaw rate v / R against 0.95 rad/s, lateral acceleration v^2 / R against 4.89 m/s^2
    flags = comfort_metrics(_circle(v, radius), DT)
    assert bool(flags["yaw_rate"][0]) is yaw_rate_ok and bool(flags["lat_accel"][0]) is lat_ok
    assert flags["lon_accel"][0] and flags["yaw_accel"][0]
    assert bool(flags["comfortable"][0]) is (yaw_rate_ok and lat_ok)


@pytest.mark.parametrize(("a", "ok"), [(2.3, True), (2.5, False), (-4.0, True), (-4.1, False)])
def test_longitudinal_acceleration_bounds(a: float, ok: bool) -> None:
    poses = straight(0.0, 20.0, a=a)[None]
    assert bool(comfort_metrics(poses, DT)["lon_accel"][0]) is ok


@pytest.mark.parametrize(("jerk", "ok"), [(3.5, True), (4.8, False)])
def test_longitudinal_jerk_bound_with_given_accelerations(jerk: float, ok: bool) -> None:
    # a linear ramp; NAVSIM's even pre-smoothing window (8) shifts the interior by half a sample, which bends the
    # ramp near the ends and moves the fitted jerk by up to ~5 %, hence the margin around 4.13
    accel = np.stack([jerk * (T - 2.0), np.zeros_like(T)], -1)[None]
    flags = comfort_metrics(straight(0.0, 10.0)[None], DT, ego_accel=accel)
    assert bool(flags["lon_jerk"][0]) is ok
    assert not flags["lon_accel"][0]  # the ramp reaches +-8 m/s^2


def test_a_weaving_plan_is_uncomfortable_and_scored_so() -> None:
    heading = 0.2 * np.sin(2 * math.pi * T)  # 1 Hz weave: yaw rate up to 1.26 rad/s
    x = np.concatenate([[0.0], np.cumsum(10.0 * DT * np.cos(heading[:-1]))])
    y = np.concatenate([[0.0], np.cumsum(10.0 * DT * np.sin(heading[:-1]))])
    poses = np.stack([x, y, heading], -1)
    flags = comfort_metrics(poses[None], DT)
    assert not flags["yaw_rate"][0] and not flags["yaw_accel"][0]
    s = score(poses, [])
    assert s["c"] == 0.0 and s["pdms"] == pytest.approx(pdms_formula(1, 1, 1, 1, 0))
    assert comfort_metrics(poses[None], DT, ComfortLimits(max_abs_yaw_rate=2.0, max_abs_yaw_accel=10.0))[
        "comfortable"][0]


# ---------------------------------------------------------------------------------------------- batches, episodes


def test_batch_scores_equal_single_scores() -> None:
    plans = [straight(0.0, 10.0), straight(0.0, 5.0), straight(0.0, 10.0, a=-5.0), straight(0.0, 10.0, y=4.3)]
    agents = [agent(60.0, 0.0, -10.0), agent(-30.0, 3.5, 10.0), agent(17.15, 0.0, 0.0), agent(0.0, -3.5, 8.0)]
    boxes = np.stack([a[0] for a in agents])[:, :, None]
    vel = np.stack([a[1] for a in agents])[:, :, None]
    refs = np.array([40.0, 30.0, 10.0, 40.0])
    batch = pdm_scores(np.stack(plans), boxes, np.ones(boxes.shape[:3]), vel, on_road, ROUTE, refs)
    for i in range(4):
        single = pdm_scores(plans[i][None], boxes[i:i + 1], np.ones((1, 41, 1)), vel[i:i + 1], on_road, ROUTE,
                            refs[i:i + 1])
        for key in ("nc", "dac", "ttc", "ep", "c", "pdms"):
            assert batch[key][i] == single[key][0], (key, i)
    np.testing.assert_allclose(batch["pdms"], pdms_formula(batch["nc"], batch["dac"], batch["ep"], batch["ttc"],
                                                           batch["c"]))


def test_episode_scores_collision_rate_and_route_completion() -> None:
    t = np.arange(101) * DT  # 10 s episodes
    safe = straight(0.0, 10.0, t=t)
    crash = straight(0.0, 10.0, t=t)
    crash_agent, crash_vel = agent(80.0, 0.0, 0.0, t=t)
    far_agent, far_vel = agent(-200.0, 3.5, 0.0, t=t)
    boxes = np.stack([far_agent, crash_agent])[:, :, None]
    vel = np.stack([far_vel, crash_vel])[:, :, None]
    route = np.array([[1.35, 0.0], [201.35, 0.0]])  # the ego centre starts at s = 0; 200 m long
    out = episode_scores(np.stack([safe, crash]), boxes, np.ones((2, 101, 1)), vel, on_road, route, [100.0, 100.0],
                         n_frames=[101, 81])
    np.testing.assert_array_equal(out["nc"], [1.0, 0.0])
    np.testing.assert_array_equal(out["collision"], [0.0, 1.0])
    np.testing.assert_allclose(out["route_completion"], [0.5, 0.4])  # 100 m and 80 m of 200 m
    np.testing.assert_allclose(out["ep"], [1.0, 0.0])
    assert out["c"][0] == 1.0 and out["pdms"][0] == 1.0


# ---------------------------------------------------------------------------------------------- diversity


def _straight_mode(distance: float) -> np.ndarray:
    """8 ego-frame poses evenly along +x to ``distance``."""
    x = np.linspace(distance / 8, distance, 8)
    return np.stack([x, np.zeros(8), np.zeros(8)], -1)


def _raster_diversity(modes: np.ndarray, res: float = 0.2, per_interval: int = 15) -> float:
    """Independent reference for one scene [K, H, 3]: grid cells covered by the ego box at densely interpolated
    poses (a point-in-box test per cell), then D = 1 - mean_k |cells_k| / |union of cells|."""
    xs, ys = np.arange(-4, 38, res), np.arange(-18, 18, res)
    grid = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
    covered = []
    for mode in modes:
        poses = np.concatenate([np.zeros((1, 3)), mode])
        f = np.linspace(0, 1, per_interval, endpoint=False)[:, None]
        dense = np.concatenate([(poses[:-1, None] + f * np.diff(poses, axis=0)[:, None]).reshape(-1, 3), poses[-1:]])
        cells = np.zeros(len(grid), bool)
        for x, y, h in dense:
            local = grid - [x + 1.35 * math.cos(h), y + 1.35 * math.sin(h)]
            along = local[:, 0] * math.cos(h) + local[:, 1] * math.sin(h)
            across = -local[:, 0] * math.sin(h) + local[:, 1] * math.cos(h)
            cells |= (np.abs(along) <= 2.4) & (np.abs(across) <= 1.0)
        covered.append(cells)
    covered = np.array(covered)
    return float(1 - (covered.sum(1) / covered.any(0).sum()).mean())


def test_mode_diversity_closed_forms_and_raster_reference() -> None:
    same = np.stack([_straight_mode(40.0)] * 5)
    # swept area of a straight sweep = (distance + length) * width; the 20 m mode lies inside the 40 m one
    prefix = np.stack([_straight_mode(40.0), _straight_mode(20.0)])
    div = mode_diversity(np.stack([same[:2], prefix]), SHAPE)
    assert div[0] == pytest.approx(0.0, abs=1e-12)
    assert div[1] == pytest.approx(1 - (1 + (20 + 4.8) / (40 + 4.8)) / 2, rel=1e-9)
    assert mode_diversity(same[None], SHAPE)[0] == pytest.approx(0.0, abs=1e-12)
    # curved, mirrored and parallel modes against a rasterised sweep
    ang = np.linspace(0.1, 0.8, 8)
    left = np.stack([25 * np.sin(ang), 25 - 25 * np.cos(ang), ang], -1)  # a left turn of radius 25 m
    right = left * [1, -1, -1]
    apart = np.stack([_straight_mode(30.0) + [0, dy, 0] for dy in (-10.0, 0.0, 10.0)])
    for modes in (np.stack([left, right, _straight_mode(30.0)]), apart):
        assert mode_diversity(modes[None], SHAPE, substeps=4)[0] == pytest.approx(_raster_diversity(modes), abs=0.005)


def test_plan_errors_closed_forms() -> None:
    """A plan shifted by (3, 4) m at its last pose only and turned by 0.1 rad everywhere, and one whose heading
    differs by 2 pi - 0.2 (0.2 on the circle)."""
    expert = np.stack([_straight_mode(30.0)] * 2)
    plans = expert.copy()
    plans[0, -1, :2] += [3.0, 4.0]
    plans[0, :, 2] += 0.1
    plans[1, :, 2] += 2 * math.pi - 0.2
    errors = plan_errors(plans, expert)
    horizon = expert.shape[1]
    np.testing.assert_allclose(errors["ade"], [5.0 / horizon, 0.0], atol=1e-12)
    np.testing.assert_allclose(errors["fde"], [5.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(errors["heading_error"], [0.1, 0.2], atol=1e-12)
    with pytest.raises(ValueError, match="expert must have shape"):
        plan_errors(plans, expert[:, :-1])
    with pytest.raises(ValueError, match="finite"):
        plan_errors(np.full_like(plans, np.nan), expert)


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_naming_the_argument() -> None:
    poses = straight(0.0, 10.0)[None]
    boxes, vel = np.zeros((1, 41, 2, 5)), np.zeros((1, 41, 2, 2))
    valid = np.zeros((1, 41, 2))
    with pytest.raises(ValueError, match="agent_boxes"):
        pdm_scores(poses, boxes[:, :40], valid, vel, on_road, ROUTE, [1.0])
    with pytest.raises(ValueError, match="agent_valid"):
        pdm_scores(poses, boxes, valid[..., :1], vel, on_road, ROUTE, [1.0])
    with pytest.raises(ValueError, match="ego_poses has NaN"):
        pdm_scores(np.full_like(poses, np.nan), boxes, valid, vel, on_road, ROUTE, [1.0])
    with pytest.raises(ValueError, match="is_drivable"):
        pdm_scores(poses, boxes, valid, vel, lambda xy: np.ones(3, bool), ROUTE, [1.0])
    with pytest.raises(ValueError, match="reference_progress"):
        pdm_scores(poses, boxes, valid, vel, on_road, ROUTE, [1.0, 2.0])
    with pytest.raises(ValueError, match="route"):
        pdm_scores(poses, boxes, valid, vel, on_road, [ROUTE, ROUTE], [1.0])
    with pytest.raises(ValueError, match="n_frames"):
        episode_scores(poses, boxes, valid, vel, on_road, ROUTE, [1.0], n_frames=[3])
    with pytest.raises(ValueError, match="modes"):
        mode_diversity(np.zeros((2, 8, 3)))
