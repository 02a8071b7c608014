"""Vehicle models of the driving simulator against closed forms: bicycle geometry, limits, IDM."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trajgen.envs.driving.vehicles import (
    BicycleLimits,
    IDMParams,
    KinematicBicycle,
    LaneFollowers,
    find_leaders,
    idm_acceleration,
    idm_equilibrium_gap,
    sample_idm_params,
)

IDM = {"a_max": 1.0, "b": 1.5, "s0": 2.0, "T": 1.5, "delta": 4.0}


def _params(n: int, v0: float | np.ndarray = 20.0) -> IDMParams:
    return IDMParams(v0=np.broadcast_to(v0, (n,)), T=np.full(n, 1.5), s0=np.full(n, 2.0), a_max=np.full(n, 1.0),
                     b=np.full(n, 1.5))


# ---------------------------------------------------------------------------------------------- bicycle


def _fit_circle(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least-squares circle through points: x^2 + y^2 = 2 cx x + 2 cy y + c."""
    A = np.stack([2 * x, 2 * y, np.ones_like(x)], axis=1)
    cx, cy, c = np.linalg.lstsq(A, x**2 + y**2, rcond=None)[0]
    return cx, cy, math.sqrt(c + cx**2 + cy**2)


@pytest.mark.parametrize("steer", [0.05, 0.3, -0.55])
def test_constant_steer_traces_circle_of_radius_L_over_tan(steer: float) -> None:
    lim = BicycleLimits()
    car = KinematicBicycle(x=[1.0], y=[-2.0], heading=[0.4], speed=[8.0], steer=[steer], limits=lim)
    pts = [(car.x[0], car.y[0])]
    for _ in range(300):
        st = car.step(0.0, steer, dt=0.1)
        pts.append((st.x[0], st.y[0]))
        assert st.speed[0] == 8.0 and st.steer[0] == steer
    x, y = np.array(pts).T
    cx, cy, r = _fit_circle(x, y)
    radius = lim.wheelbase / math.tan(abs(steer))
    dist = np.hypot(x - cx, y - cy)
    np.testing.assert_allclose(dist, radius, rtol=0, atol=1e-9 * max(1.0, radius / 10))
    assert abs(r - radius) < 1e-9 * max(1.0, radius / 10)
    # the centre is on the left of the initial heading for positive steer
    side = np.sign(steer)
    np.testing.assert_allclose([cx, cy], [1.0 - side * radius * math.sin(0.4), -2.0 + side * radius * math.cos(0.4)],
                               atol=1e-8)


def test_straight_driving_covers_v_t_exactly() -> None:
    car = KinematicBicycle(x=[0.0, 5.0], y=[0.0, 1.0], heading=[0.3, -2.0], speed=[10.0, 3.5])
    for _ in range(50):
        st = car.step([0.0, 0.0], [0.0, 0.0], dt=0.1)
    dist = np.hypot(st.x - [0.0, 5.0], st.y - [0.0, 1.0])
    np.testing.assert_allclose(dist, [50.0, 17.5], rtol=0, atol=1e-9)
    np.testing.assert_allclose(st.heading, [0.3, -2.0], atol=1e-15)


def test_constant_accel_distance_is_exact() -> None:
    car = KinematicBicycle(x=[0.0], y=[0.0], heading=[0.0], speed=[2.0], accel=[1.5])
    for _ in range(40):
        st = car.step(1.5, 0.0, dt=0.1)
    assert abs(st.x[0] - (2.0 * 4.0 + 0.5 * 1.5 * 16.0)) < 1e-9
    assert abs(st.speed[0] - 8.0) < 1e-12


def test_jerk_and_accel_limits_bind() -> None:
    lim = BicycleLimits()
    car = KinematicBicycle(x=[0.0, 0.0], y=[0.0, 0.0], heading=[0.0, 0.0], speed=[5.0, 25.0], limits=lim)
    accels = [car.step([100.0, -100.0], 0.0, dt=0.1).accel.copy() for _ in range(12)]
    step = lim.max_jerk * 0.1
    expected_up = [min((k + 1) * step, lim.max_accel) for k in range(12)]
    expected_down = [max(-(k + 1) * step, -lim.max_decel) for k in range(12)]
    np.testing.assert_allclose(np.array(accels), np.array([expected_up, expected_down]).T, atol=1e-12)


def test_steer_rate_and_steer_limits_bind() -> None:
    lim = BicycleLimits()
    car = KinematicBicycle(x=[0.0], y=[0.0], heading=[0.0], speed=[5.0], limits=lim)
    steers = [car.step(0.0, 5.0, dt=0.1).steer[0] for _ in range(10)]
    expected = [min((k + 1) * lim.max_steer_rate * 0.1, lim.max_steer) for k in range(10)]
    np.testing.assert_allclose(steers, expected, atol=1e-12)
    assert steers[-1] == lim.max_steer


def test_speed_never_negative_and_never_exceeds_max_under_saturation() -> None:
    lim = BicycleLimits(max_speed=12.0)
    car = KinematicBicycle(x=[0.0, 0.0], y=[0.0, 0.0], heading=[0.0, 0.0], speed=[6.0, 11.0], limits=lim)
    xs = [car.x.copy()]
    for _ in range(60):
        st = car.step([-50.0, 50.0], 0.0, dt=0.1)
        xs.append(st.x.copy())
        assert st.speed[0] >= 0.0 and st.speed[1] <= 12.0
    xs_arr = np.array(xs)
    assert np.all(np.diff(xs_arr[:, 0]) >= 0.0)  # braking never reverses
    assert st.speed[0] == 0.0 and st.speed[1] == 12.0
    final = xs_arr[-1, 0]
    for _ in range(10):
        assert car.step([-50.0, 50.0], 0.0).x[0] == final


def test_batch_equals_each_vehicle_alone() -> None:
    rng = np.random.default_rng(0)
    n = 6
    init = {"x": rng.normal(size=n), "y": rng.normal(size=n), "heading": rng.uniform(-3, 3, n),
            "speed": rng.uniform(0, 20, n)}
    cmds = [(rng.uniform(-10, 5, n), rng.uniform(-1, 1, n)) for _ in range(30)]
    batch = KinematicBicycle(**init)
    for a, d in cmds:
        out = batch.step(a, d, dt=0.1)
    for i in range(n):
        solo = KinematicBicycle(**{k: v[i : i + 1] for k, v in init.items()})
        for a, d in cmds:
            one = solo.step(a[i : i + 1], d[i : i + 1], dt=0.1)
        for name in ("x", "y", "heading", "speed", "accel", "steer"):
            assert getattr(one, name)[0] == getattr(out, name)[i], name


# ---------------------------------------------------------------------------------------------- IDM


def test_idm_free_road_closed_form() -> None:
    v = np.array([0.0, 5.0, 19.0, 20.0, 25.0])
    a = idm_acceleration(v, 20.0, np.inf, v - 3.0, **IDM)
    np.testing.assert_allclose(a, 1.0 * (1 - (v / 20.0) ** 4), rtol=0, atol=1e-15)


def test_idm_zero_acceleration_at_equilibrium_gap() -> None:
    v = np.array([0.0, 1.0, 7.5, 15.0, 19.9])
    gap = idm_equilibrium_gap(v, 20.0, 2.0, 1.5, 4.0)
    np.testing.assert_allclose(gap[0], 2.0)
    a = idm_acceleration(v, 20.0, gap, 0.0, **IDM)
    np.testing.assert_allclose(a, 0.0, atol=1e-12)
    assert np.all(np.isinf(idm_equilibrium_gap(np.array([20.0, 21.0]), 20.0, 2.0, 1.5)))
    # closer than equilibrium brakes, further accelerates
    assert np.all(idm_acceleration(v, 20.0, 0.9 * gap, 0.0, **IDM) < 0)
    assert np.all(idm_acceleration(v, 20.0, 1.1 * gap, 0.0, **IDM) > 0)


def test_idm_approaching_leader_brakes_harder() -> None:
    a = idm_acceleration(np.full(3, 10.0), 20.0, 30.0, np.array([-2.0, 0.0, 5.0]), **IDM)
    assert a[0] > a[1] > a[2]
    # intelligent braking term: s* = s0 + v T + v dv / (2 sqrt(ab))
    s_star = 2.0 + 15.0 + 10.0 * 5.0 / (2 * math.sqrt(1.5))
    assert abs(a[2] - (1 - 0.5**4 - (s_star / 30.0) ** 2)) < 1e-12


@pytest.mark.parametrize(("s0", "floor"), [(1.0, 1.0 - 1e-6), (2.0, 0.95 * 2.0)])
def test_stops_behind_stopped_leader_without_overlap(s0: float, floor: float) -> None:
    """Near standstill IDM's gap error obeys e'' + (2aT/s0) e' + (2a/s0) e = 0: overdamped when
    a T^2 >= 2 s0 (s0 = 1 here: it stops at s0 from above), underdamped otherwise (s0 = 2 with T = 1.5,
    a = 1: continuous-time IDM itself undershoots s0 by about 2% before v reaches 0; never overlaps)."""
    params = IDMParams(v0=np.full(2, 20.0), T=np.full(2, 1.5), s0=np.full(2, s0), a_max=np.full(2, 1.0),
                       b=np.full(2, 1.5))
    cars = LaneFollowers(lane=np.array([0, 0]), s=[0.0, 120.0], v=[18.0, 0.0], params=params,
                         fixed=np.array([False, True]))
    min_gap = np.inf
    for _ in range(600):
        st = cars.step(0.1)
        min_gap = min(min_gap, st.gap[0])
        assert st.v[0] >= 0.0 and st.s[1] == 120.0
    final_gap = 120.0 - 4.5 - st.s[0]
    assert min_gap > 0.0 and min_gap >= floor and final_gap >= floor
    assert st.v[0] < 1e-3 and final_gap < s0 + 0.01  # it really came close and stopped


def test_ballistic_update_stops_exactly_within_the_step() -> None:
    cars = LaneFollowers(lane=np.array([0, 0, 1]), s=[0.0, 5.5, 0.0], v=[1.0, 0.0, 10.0], params=_params(3),
                         fixed=np.array([False, True, False]))
    a = idm_acceleration(np.array([1.0, 10.0]), 20.0, np.array([1.0, np.inf]), np.array([1.0, 0.0]), **IDM)
    assert 1.0 + a[0] * 0.1 < 0.0  # hard braking: would reverse within the step
    st = cars.step(0.1)
    np.testing.assert_allclose(st.s[[0, 2]], [-1.0 / (2.0 * a[0]), 10.0 * 0.1 + 0.5 * a[1] * 0.01], atol=1e-12)
    np.testing.assert_allclose(st.v[[0, 2]], [0.0, 10.0 + a[1] * 0.1], atol=1e-12)


def test_platoon_converges_to_equilibrium_gap() -> None:
    v0 = np.array([30.0, 30.0, 30.0, 30.0, 12.0])  # the front car (index 4) is slow
    s = np.array([0.0, 25.0, 60.0, 80.0, 130.0])
    cars = LaneFollowers(lane=np.zeros(5, dtype=np.int64), s=s, v=np.full(5, 12.0), params=_params(5, v0))
    for _ in range(3000):
        st = cars.step(0.1)
    np.testing.assert_allclose(st.v, 12.0, atol=1e-4)
    want = idm_equilibrium_gap(np.array([12.0]), 30.0, 2.0, 1.5)[0]
    np.testing.assert_allclose(st.gap[:4], want, rtol=1e-4)
    assert np.isinf(st.gap[4]) and st.leader[4] == -1


def test_leader_search_across_lanes_and_lane_end() -> None:
    lane = np.array([2, 0, 2, 0, 1, 0, 2])
    s = np.array([50.0, 10.0, 5.0, 40.0, 3.0, 25.0, 70.0])
    np.testing.assert_array_equal(find_leaders(lane, s), [6, 5, 0, -1, -1, 3, -1])
    cars = LaneFollowers(lane=lane, s=s, v=np.full(7, 10.0), params=_params(7))
    _, gap, _ = cars.leaders()
    np.testing.assert_allclose(gap, [15.5, 10.5, 40.5, np.inf, np.inf, 10.5, np.inf])
    # front-most vehicles of each lane see free road: a = a_max (1 - (v/v0)^4)
    a = cars.step(0.1).accel
    np.testing.assert_allclose(a[[3, 4, 6]], 1.0 - (10.0 / 20.0) ** 4)
    assert np.all(a[[0, 1, 2, 5]] < a[3])


def test_sample_idm_params_ranges_and_aggressiveness() -> None:
    p = sample_idm_params(1000, np.random.default_rng(1))
    assert p.n == 1000
    assert p.v0.min() >= 28.0 and p.v0.max() <= 36.0 and p.T.min() >= 1.0 and p.T.max() <= 2.0
    assert p.a_max.min() >= 1.0 and p.a_max.max() <= 1.5 and np.all(p.s0 == 2.0) and np.all(p.delta == 4.0)
    assert np.corrcoef(p.v0, p.T)[0, 1] < -0.99  # faster drivers keep shorter headways
    calm = sample_idm_params(50, np.random.default_rng(1), v0_range=(11.0, 17.0), aggressiveness_range=(0.0, 0.2))
    assert calm.v0.max() <= 11.0 + 0.2 * 6.0 + 1e-12 and calm.T.min() >= 1.8 - 1e-12


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: KinematicBicycle(x=[0.0, 0.0], y=[0.0], heading=[0.0, 0.0], speed=[1.0, 1.0]), "y"),
        (lambda: KinematicBicycle(x=[0.0], y=[0.0], heading=[np.nan], speed=[1.0]), "heading"),
        (lambda: KinematicBicycle(x=[0.0], y=[0.0], heading=[0.0], speed=[-1.0]), "speed"),
        (lambda: KinematicBicycle(x=[[0.0]], y=[0.0], heading=[0.0], speed=[1.0]), "x"),
        (lambda: KinematicBicycle(x=[0.0], y=[0.0], heading=[0.0], speed=[1.0]).step([np.nan], 0.0), "accel_cmd"),
        (lambda: KinematicBicycle(x=[0.0], y=[0.0], heading=[0.0], speed=[1.0]).step(0.0, [0.1, 0.2]), "steer_cmd"),
        (lambda: KinematicBicycle(x=[0.0], y=[0.0], heading=[0.0], speed=[1.0]).step(0.0, 0.0, dt=-0.1), "dt"),
        (lambda: BicycleLimits(wheelbase=-2.7), "wheelbase"),
        (lambda: idm_acceleration([1.0], 20.0, [np.nan], 0.0, **IDM), "gap"),
        (lambda: idm_acceleration([-1.0], 20.0, [5.0], 0.0, **IDM), "v"),
        (lambda: idm_acceleration([1.0], 20.0, [5.0], [0.0, 1.0], **IDM), "dv"),
        (lambda: idm_acceleration([1.0], 0.0, [5.0], 0.0, **IDM), "v0"),
        (lambda: idm_equilibrium_gap([1.0], 20.0, 2.0, -1.5), "T"),
        (lambda: IDMParams(v0=[20.0, 20.0], T=[1.5], s0=2.0, a_max=1.0, b=1.5), "T"),
        (lambda: LaneFollowers(lane=[0.5], s=[0.0], v=[1.0], params=_params(1)), "lane"),
        (lambda: LaneFollowers(lane=np.array([0]), s=[0.0], v=[1.0], params=_params(2)), "params"),
        (lambda: LaneFollowers(lane=np.array([0]), s=[np.nan], v=[1.0], params=_params(1)), "s"),
        (lambda: LaneFollowers(lane=np.array([0]), s=[0.0], v=[1.0], params=_params(1)).step(0.0), "dt"),
        (lambda: sample_idm_params(3, np.random.default_rng(0), T_range=(2.0, 1.0)), "T_range"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(call, name: str) -> None:
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        call()
