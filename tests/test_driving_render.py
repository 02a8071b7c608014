"""Bird's-eye pictures: PNG size, pixels at known world points (mode colours, ego, agents, road, off-road), GIFs."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import imageio.v3 as iio
import numpy as np
import pytest
import shapely
from matplotlib import colormaps
from matplotlib.colors import to_rgb
from shapely.geometry import LineString

from trajgen.envs.driving.geometry import poses_from_ego_frame
from trajgen.envs.driving.maps import four_way_intersection, merge_road
from trajgen.envs.driving.render import (
    AGENT_COLOR,
    BACKGROUND_COLOR,
    CMAP,
    DRIVABLE_COLOR,
    EGO_COLOR,
    confidence_norm,
    episode_gif,
    gif_frame_indices,
    hold_plans,
    plot_scene,
    save_scene_png,
)
from trajgen.envs.driving.sim import DrivingSim

ROAD = four_way_intersection()
HIGHLIGHT = "#ff00ff"
EGO_POSE = np.array([1.75, -30.0, math.pi / 2])  # south arm, incoming lane, heading north
STEPS = 2.5 * np.arange(1, 9)
MODE_STRAIGHT = np.stack([STEPS, np.zeros(8), np.zeros(8)], axis=1)  # ego frame
MODE_LEFT = np.stack([STEPS, 0.25 * STEPS, np.full(8, math.atan(0.25))], axis=1)
MODE_RIGHT = MODE_LEFT * [1.0, -1.0, -1.0]
ON_ROAD = np.array([7.5, -7.5])  # inside the intersection box, away from every line
OFF_ROAD = np.array([-25.0, -25.0])


def _agents() -> tuple[np.ndarray, np.ndarray]:
    """One agent across the west arm (heading north) and an invalid row sitting on the on-road probe point."""
    boxes = np.array([[-30.0, 1.75, math.pi / 2, 4.5, 1.9], [ON_ROAD[0], ON_ROAD[1], 0.0, 4.5, 1.9]])
    return boxes, np.array([True, False])


def _route() -> np.ndarray:
    return ROAD.routes[ROAD.path_names.index("south_straight")].polyline


def _scene_kwargs() -> dict:
    boxes, valid = _agents()
    return {"road": ROAD, "ego_pose": EGO_POSE, "agent_boxes": boxes, "agent_valid": valid,
            "modes": np.stack([MODE_STRAIGHT, MODE_LEFT, MODE_RIGHT]), "scores": [0.7, 0.2, 0.1], "route": _route(),
            "highlight_color": HIGHLIGHT, "figsize": (6.0, 6.0), "dpi": 100}


def _pixel(fig, world_xy: np.ndarray, image: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] of the pixel under a world point (the axes transform of a drawn figure)."""
    ax = fig.axes[0]
    x, y = ax.transData.transform(world_xy)
    row, col = math.floor(image.shape[0] - y), math.floor(x)
    return image[row, col, :3] / 255.0


def _world(ego_xy: np.ndarray) -> np.ndarray:
    """Ego-frame point -> world for EGO_POSE (heading north: ego +x = world +y, ego +y = world -x)."""
    return EGO_POSE[:2] + np.array([-ego_xy[1], ego_xy[0]])


def test_png_exists_and_decodes_to_figsize_times_dpi(tmp_path: Path) -> None:
    kwargs = _scene_kwargs() | {"figsize": (5.0, 4.0), "dpi": 50}
    path = save_scene_png(tmp_path / "sub" / "scene.png", **kwargs)
    assert path == tmp_path / "sub" / "scene.png" and path.is_file()
    image = iio.imread(path)
    assert image.shape[:2] == (200, 250) and image.dtype == np.uint8
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind


def test_probe_points_are_clear_of_every_drawn_line() -> None:
    # precondition of the pixel test: the on-road probe is > 2 m from lanes, boundaries, route, modes and ego
    lines = list(ROAD.lanes) + [b for pair in ROAD.lane_boundaries for b in pair] + [_route()]
    dist = min(shapely.distance(LineString(line), shapely.Point(ON_ROAD)) for line in lines)
    assert dist > 2.0
    assert ROAD.is_drivable_exact(ON_ROAD) and not ROAD.is_drivable_exact(OFF_ROAD)


def test_pixels_at_known_world_points(tmp_path: Path) -> None:
    kwargs = _scene_kwargs()
    path = save_scene_png(tmp_path / "scene.png", **kwargs)
    image = iio.imread(path)
    reference = plot_scene(**kwargs)  # same layout: gives the axes transform
    reference.canvas.draw()
    assert image.shape[:2] == (600, 600)

    def close(world: np.ndarray, colour: str | tuple, tol: float = 0.02) -> bool:
        return bool(np.abs(_pixel(reference, world, image) - np.asarray(to_rgb(colour))).max() <= tol)

    # the chosen (highest-score) mode in the highlight colour, halfway between two of its poses
    chosen_point = _world(0.5 * (MODE_STRAIGHT[3, :2] + MODE_STRAIGHT[4, :2]))
    assert close(chosen_point, HIGHLIGHT)
    # the other modes in the colormap colours of their confidences (viridis 0.2 and 0.1 differ by ~0.12)
    for mode, score in ((MODE_LEFT, 0.2), (MODE_RIGHT, 0.1)):
        point = _world(0.5 * (mode[5, :2] + mode[6, :2]))
        expected = colormaps[CMAP](confidence_norm([0.7, 0.2, 0.1])(score))[:3]
        assert close(point, expected, tol=0.04) and not close(point, HIGHLIGHT, tol=0.2)
    # drivable area where nothing else is drawn (an invalid agent row sits there: it must not be drawn)
    assert close(ON_ROAD, DRIVABLE_COLOR)
    assert close(OFF_ROAD, BACKGROUND_COLOR)
    # the ego rectangle behind its rear axle's first metre (box: 1.05 m behind to 3.75 m ahead of the axle)
    assert close(_world(np.array([-0.6, 0.3])), EGO_COLOR)
    assert close(_world(np.array([3.0, 0.5])), EGO_COLOR)  # drawn over the chosen mode's start
    # the agent heads north: 1.2 m ahead of its centre is inside, 1.5 m east is outside (it is 1.9 m wide)
    assert close(np.array([-30.45, 1.75 + 1.2]), AGENT_COLOR)
    assert not close(np.array([-28.5, 1.75]), AGENT_COLOR, tol=0.1)


def test_chosen_overrides_the_best_score_and_colorbar_is_labelled(tmp_path: Path) -> None:
    kwargs = _scene_kwargs() | {"chosen": 1}
    fig = plot_scene(**kwargs)
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())
    left_point = _world(0.5 * (MODE_LEFT[5, :2] + MODE_LEFT[6, :2]))
    straight_point = _world(0.5 * (MODE_STRAIGHT[3, :2] + MODE_STRAIGHT[4, :2]))
    assert np.abs(_pixel(fig, left_point, image) - to_rgb(HIGHLIGHT)).max() <= 0.02
    assert np.abs(_pixel(fig, straight_point, image) - to_rgb(HIGHLIGHT)).max() > 0.2
    colorbar_axes = [ax for ax in fig.axes if ax.get_ylabel() == "confidence"]
    assert len(colorbar_axes) == 1
    ax = fig.axes[0]
    assert ax.get_xlim() == pytest.approx((EGO_POSE[0] - 45.0, EGO_POSE[0] + 45.0))
    assert ax.get_ylim() == pytest.approx((EGO_POSE[1] - 45.0, EGO_POSE[1] + 45.0))
    assert ax.get_aspect() == 1.0


def test_logit_scores_use_their_own_range_and_no_scores_means_no_colorbar() -> None:
    norm = confidence_norm([-2.0, 3.0])
    assert (norm.vmin, norm.vmax) == (-2.0, 3.0)
    assert (confidence_norm([0.1, 0.4]).vmin, confidence_norm([0.1, 0.4]).vmax) == (0.0, 1.0)
    boxes, valid = _agents()
    fig = plot_scene(ROAD, EGO_POSE, boxes, valid, modes=MODE_STRAIGHT[None], view_radius=20.0)
    assert len(fig.axes) == 1
    assert fig.axes[0].get_xlim() == pytest.approx((EGO_POSE[0] - 20.0, EGO_POSE[0] + 20.0))


def test_draws_into_given_axes() -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4))
    left, right = fig.subplots(1, 2)
    boxes, valid = _agents()
    out = plot_scene(ROAD, EGO_POSE, boxes, valid, ax=right, title="given")
    assert out is fig and right.get_title() == "given" and not left.has_data()


@pytest.mark.parametrize("change, argument", [
    ({"modes": MODE_STRAIGHT}, "modes"),  # [8, 3], not [K, 8, 3]
    ({"modes": np.zeros((2, 8, 2))}, "modes"),
    ({"modes": np.full((2, 8, 3), np.nan)}, "modes"),
    ({"scores": [0.1, 0.2]}, "scores"),  # K = 3 modes
    ({"chosen": 3}, "chosen"),
    ({"ego_pose": [0.0, 0.0]}, "ego_pose"),
    ({"ego_pose": [np.nan, 0.0, 0.0]}, "ego_pose"),
    ({"agent_boxes": np.zeros((2, 4))}, "agent_boxes"),
    ({"agent_valid": [True]}, "agent_valid"),
    ({"route": np.zeros((5, 3))}, "route"),
    ({"view_radius": 0.0}, "view_radius"),
])
def test_bad_inputs_raise_naming_the_argument(change: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        plot_scene(**(_scene_kwargs() | change))


def test_scores_without_modes_raise() -> None:
    boxes, valid = _agents()
    with pytest.raises(ValueError, match="modes"):
        plot_scene(ROAD, EGO_POSE, boxes, valid, scores=[1.0])


# ---------------------------------------------------------------------------------------------- GIF


def _short_log(n_frames: int) -> SimpleNamespace:
    """Two episodes of the intersection logged at 10 Hz like agents.driving.Rollout (episode 1 shorter)."""
    sim = DrivingSim("intersection", 2)
    sim.reset(np.array([3, 4]))
    poses, boxes, valid = [], [], []
    for _ in range(n_frames):
        poses.append(sim.ego_pose())
        boxes.append(sim.agent_boxes())
        valid.append(sim.agent_valid())
        sim.step(np.full(2, 0.5), np.zeros(2))
    return SimpleNamespace(scenario="intersection", poses=np.stack(poses, 1), agent_boxes=np.stack(boxes, 1),
                           agent_valid=np.stack(valid, 1), routes=sim.route_polylines(),
                           n_frames=np.array([n_frames, n_frames - 7]))


def _has_colour(frame: np.ndarray, colour: str, tol: float = 0.08) -> bool:
    return bool((np.abs(frame[..., :3] / 255.0 - np.asarray(to_rgb(colour))).max(axis=-1) <= tol).any())


def test_gif_frame_indices() -> None:
    assert gif_frame_indices(23, 5) == [0, 5, 10, 15, 20, 22]
    assert gif_frame_indices(21, 5) == [0, 5, 10, 15, 20]
    assert gif_frame_indices(1, 2) == [0]


def test_gif_has_expected_frames_and_plans_only_where_given(tmp_path: Path) -> None:
    log = _short_log(23)
    road = four_way_intersection()
    # plans on frames 10 and later: K = 3 modes with scores; none before
    modes = np.stack([MODE_STRAIGHT, MODE_LEFT, MODE_LEFT * [1, -1, -1]])
    plans = [None] * 10 + [modes] * 13
    scores = [None] * 10 + [np.array([0.6, 0.3, 0.1])] * 13
    path = episode_gif(tmp_path / "ep.gif", road, log, 0, every=5, plans=plans, plan_scores=scores,
                       highlight_color=HIGHLIGHT, figsize=(4.0, 4.0), dpi=50)
    frames = iio.imread(path, index=None)
    assert frames.shape[:3] == (6, 200, 200)  # frames 0, 5, 10, 15, 20, 22
    assert [_has_colour(f, HIGHLIGHT) for f in frames] == [False, False, True, True, True, True]
    assert not np.array_equal(frames[0], frames[1])
    assert list(tmp_path.iterdir()) == [path]
    # the shorter episode: 16 logged frames, every 2 -> 0, 2, ..., 14, 15
    frames = iio.imread(episode_gif(tmp_path / "ep1.gif", road, log, 1, every=2, figsize=(3.0, 3.0), dpi=40),
                        index=None)
    assert frames.shape[:3] == (9, 120, 120)


def test_gif_bad_inputs(tmp_path: Path) -> None:
    log = _short_log(5)
    with pytest.raises(ValueError, match="episode"):
        episode_gif(tmp_path / "a.gif", ROAD, log, 2)
    with pytest.raises(ValueError, match="plans"):
        episode_gif(tmp_path / "a.gif", ROAD, log, 0, plans=[MODE_STRAIGHT] * 3)
    with pytest.raises(ValueError, match="modes"):
        episode_gif(tmp_path / "a.gif", ROAD, log, 0, plans=[np.zeros((8, 2))] * 5)
    with pytest.raises(ValueError, match="plan_scores"):
        episode_gif(tmp_path / "a.gif", ROAD, log, 0, plans=[MODE_STRAIGHT] * 5, plan_scores=[[1.0]] * 2)
    with pytest.raises(ValueError, match="scores"):  # K = 1 mode per frame, 2 scores
        episode_gif(tmp_path / "a.gif", ROAD, log, 0, plans=[MODE_STRAIGHT] * 5, plan_scores=[[0.5, 0.5]] * 5)
    with pytest.raises(ValueError, match="every"):
        episode_gif(tmp_path / "a.gif", ROAD, log, 0, every=0)
    with pytest.raises(ValueError, match="merge"):
        episode_gif(tmp_path / "a.gif", ROAD, SimpleNamespace(**{**vars(log), "scenario": "merge"}), 0)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary file left


def test_hold_plans_keeps_each_plan_fixed_in_the_world() -> None:
    # ego drives east at 1 m per frame, turning by 0.1 rad per frame; decisions at frames 2 and 5
    f = np.arange(8, dtype=np.float64)
    poses = np.stack([f, np.zeros(8), 0.1 * f], axis=1)
    plans = np.stack([MODE_STRAIGHT, MODE_LEFT])
    modes, scores = hold_plans(poses, np.array([2, 5]), plans, scores=[[0.9], [0.4]])
    assert modes[0] is None and modes[1] is None and scores[1] is None
    np.testing.assert_allclose(modes[2][0], MODE_STRAIGHT, atol=1e-12)  # the decision frame itself
    assert scores[3][0] == 0.9 and scores[6][0] == 0.4
    # frame 3, closed form: the ego moved 1 m along the old +x (old heading 0.2) and turned by 0.1 rad
    d = np.array([math.cos(0.2), -math.sin(0.2)])  # the displacement seen in the frame-2 ego frame
    rel = MODE_STRAIGHT[:, :2] - d
    expected_xy = rel @ np.array([[math.cos(0.1), -math.sin(0.1)], [math.sin(0.1), math.cos(0.1)]])
    np.testing.assert_allclose(modes[3][0, :, :2], expected_xy, atol=1e-12)
    np.testing.assert_allclose(modes[3][0, :, 2], -0.1, atol=1e-12)
    for frame, decision, plan in ((4, 2, MODE_STRAIGHT), (7, 5, MODE_LEFT)):  # held plans stay put in the world
        np.testing.assert_allclose(poses_from_ego_frame(modes[frame][0], poses[frame]),
                                   poses_from_ego_frame(plan, poses[decision]), atol=1e-12)
    with pytest.raises(ValueError, match="decision_frames"):
        hold_plans(poses, np.array([5, 2]), plans)
    with pytest.raises(ValueError, match="plans"):
        hold_plans(poses, np.array([2, 5]), plans[:1])


def test_gif_of_a_closed_loop_rollout_with_the_expert_plans(tmp_path: Path) -> None:
    from trajgen.agents.driving import expert_decider, rollout

    decisions: list[tuple[int, np.ndarray]] = []

    def recording_decider(sim):
        decide = expert_decider(sim)

        def decide_and_record(obs, sim_):
            plans = decide(obs, sim_)
            decisions.append((int(sim_.steps[0]), plans[0].copy()))
            return plans

        return decide_and_record

    run = rollout(recording_decider, "merge", [11], n_envs=1)
    n = int(run.n_frames[0])
    frames_at = np.array([frame for frame, _ in decisions if frame < n])
    plans = np.stack([plan for frame, plan in decisions if frame < n])
    modes, _ = hold_plans(run.poses[0, :n], frames_at, plans)
    path = episode_gif(tmp_path / "merge.gif", merge_road(), run, 0, every=30, plans=modes, highlight_color=HIGHLIGHT,
                       figsize=(3.0, 3.0), dpi=40)
    frames = iio.imread(path, index=None)
    assert frames.shape[:3] == (len(gif_frame_indices(n, 30)), 120, 120)
    assert all(_has_colour(frame, HIGHLIGHT) for frame in frames)
