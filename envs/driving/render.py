"""Bird's-eye pictures of driving scenes: a scene with its planned modes, and a GIF of a closed-loop episode.

- :func:`plot_scene` draws one instant in the world frame, centred on the ego: the drivable area (light grey),
  lane centre lines (dashed) and boundaries (thin), the ego route (faint), the other vehicles (rotated
  rectangles), the ego (a distinct rectangle) and, optionally, a policy's modes ``[K, H, 3]`` (ego-frame poses)
  coloured by confidence through a colormap with a colorbar, the chosen mode highlighted thick on top.
- :func:`save_scene_png` writes that figure as a PNG; :func:`episode_gif` animates one episode of a rollout
  (:class:`trajgen.agents.driving.Rollout` or anything with its fields) with one reused figure whose artists are
  updated in place, frame by frame.

matplotlib is used through its object API on the Agg canvas (no pyplot, no screen, no global figure state).
Files are written atomically: to a temporary name in the same folder, then ``os.replace``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import imageio.v3 as iio
import numpy as np
from matplotlib import colormaps, patheffects
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection, PolyCollection
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import PathPatch, Polygon
from matplotlib.path import Path as MplPath
from numpy.typing import ArrayLike, NDArray
from shapely.geometry.polygon import orient

from trajgen.envs.driving.geometry import box_corners, poses_from_ego_frame, poses_to_ego_frame
from trajgen.envs.driving.maps import RoadMap
from trajgen.envs.driving.traffic import EGO_LENGTH, EGO_REAR_TO_CENTRE, EGO_WIDTH

FloatArray = NDArray[np.float64]

BACKGROUND_COLOR = "#ffffff"
"""Off-road (figure and axes face)."""
DRIVABLE_COLOR = "#d9d9d9"
"""Fill of the drivable area."""
LANE_COLOR = "#8c8c8c"
ROUTE_COLOR = "#2ca02c"
AGENT_COLOR = "#f2a65a"
EGO_COLOR = "#1f5fbf"
HIGHLIGHT_COLOR = "#e0115f"
"""Default colour of the chosen mode (outside the default colormap)."""
CMAP = "viridis"
MODE_WIDTH = 2.0
CHOSEN_WIDTH = 3.5

# z-order, bottom to top
_Z_AREA, _Z_LANES, _Z_ROUTE, _Z_AGENTS, _Z_MODES, _Z_CHOSEN, _Z_EGO = 0, 1, 2, 3, 4, 5, 6  # the ego stays visible


class EpisodeLog(Protocol):
    """What :func:`episode_gif` reads from a rollout (see :class:`trajgen.agents.driving.Rollout`)."""

    scenario: str
    poses: FloatArray  # [E, F, 3]
    agent_boxes: FloatArray  # [E, F, N, 5]
    agent_valid: np.ndarray  # [E, F, N]
    routes: FloatArray  # [E, R, 2]
    n_frames: np.ndarray  # [E]


# ---------------------------------------------------------------------------------------------- input checks


def _finite(name: str, value: ArrayLike, shape: tuple[int | None, ...], what: str) -> FloatArray:
    """``value`` as float64 of ``shape`` (None = any size); ValueError naming ``name`` otherwise."""
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != len(shape) or any(want is not None and got != want for got, want in zip(arr.shape, shape)):
        raise ValueError(f"{name} must have shape {what}, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} has NaN or infinite entries")
    return arr


@dataclass
class _Scene:
    """One instant's validated inputs, world frame except ``modes`` (ego frame)."""

    ego_pose: FloatArray  # [3]
    agent_boxes: FloatArray  # [N, 5]
    agent_valid: NDArray[np.bool_]  # [N]
    modes: FloatArray | None  # [K, H, 3]
    scores: FloatArray | None  # [K]
    chosen: int | None
    route: FloatArray | None  # [R, 2]


def _check_scene(ego_pose: ArrayLike, agent_boxes: ArrayLike, agent_valid: ArrayLike, modes: ArrayLike | None,
                 scores: ArrayLike | None, chosen: int | None, route: ArrayLike | None) -> _Scene:
    """Validate :func:`plot_scene`'s inputs; the chosen mode defaults to argmax(scores), or 0 without scores."""
    pose = _finite("ego_pose", ego_pose, (3,), "[3] = (x, y, heading)")
    boxes = _finite("agent_boxes", agent_boxes, (None, 5), "[N, 5] = (x, y, heading, length, width)")
    valid = np.asarray(agent_valid)
    if valid.shape != boxes.shape[:1]:
        raise ValueError(f"agent_valid must have shape [N] = ({boxes.shape[0]},) like agent_boxes, got {valid.shape}")
    valid = valid.astype(bool)
    if np.any(boxes[valid, 3:] < 0.0):
        raise ValueError("agent_boxes must have non-negative length and width (fields 3 and 4)")
    mode_arr = score_arr = None
    if modes is not None:
        mode_arr = _finite("modes", modes, (None, None, 3), "[K, H, 3] = ego-frame (x, y, heading) poses")
        if mode_arr.shape[0] < 1 or mode_arr.shape[1] < 1:
            raise ValueError(f"modes must hold at least one mode of at least one pose, got shape {mode_arr.shape}")
    if scores is not None:
        if mode_arr is None:
            raise ValueError("scores were given without modes; pass modes [K, H, 3] too")
        score_arr = _finite("scores", scores, (mode_arr.shape[0],), f"[K] with K = {mode_arr.shape[0]} (one per mode)")
    if chosen is not None:
        if mode_arr is None:
            raise ValueError("chosen was given without modes; pass modes [K, H, 3] too")
        if int(chosen) != chosen or not 0 <= chosen < mode_arr.shape[0]:
            raise ValueError(f"chosen must be a mode index in [0, {mode_arr.shape[0]}), got {chosen!r}")
        chosen = int(chosen)
    elif mode_arr is not None:
        chosen = int(np.argmax(score_arr)) if score_arr is not None else 0
    route_arr = None if route is None else _finite("route", route, (None, 2), "[R, 2] world-frame points")
    return _Scene(pose, boxes, valid, mode_arr, score_arr, chosen, route_arr)


def _check_view_radius(view_radius: float) -> float:
    if not np.isfinite(view_radius) or view_radius <= 0.0:
        raise ValueError(f"view_radius must be a positive number of metres, got {view_radius!r}")
    return float(view_radius)


# ---------------------------------------------------------------------------------------------- drawing


def _new_figure(figsize: tuple[float, float], dpi: float) -> Figure:
    """A figure on its own Agg canvas (not registered with pyplot, so nothing leaks between calls)."""
    fig = Figure(figsize=figsize, dpi=dpi, facecolor=BACKGROUND_COLOR)
    FigureCanvasAgg(fig)
    return fig


def _area_path(road: RoadMap) -> MplPath:
    """The drivable polygon(s) as one compound path; rings oriented so holes stay empty under nonzero filling."""
    geoms = getattr(road.drivable, "geoms", [road.drivable])
    vertices, codes = [], []
    for poly in geoms:
        poly = orient(poly, sign=1.0)  # exterior counter-clockwise, holes clockwise
        for ring in [poly.exterior, *poly.interiors]:
            xy = np.asarray(ring.coords)
            ring_codes = np.full(len(xy), MplPath.LINETO, dtype=MplPath.code_type)
            ring_codes[0], ring_codes[-1] = MplPath.MOVETO, MplPath.CLOSEPOLY
            vertices.append(xy)
            codes.append(ring_codes)
    return MplPath(np.concatenate(vertices), np.concatenate(codes))


def _draw_map(ax: Axes, road: RoadMap) -> None:
    """Drivable area, lane boundaries (thin) and lane centre lines (dashed): the static part of a picture."""
    ax.add_patch(PathPatch(_area_path(road), facecolor=DRIVABLE_COLOR, edgecolor="none", zorder=_Z_AREA))
    boundaries = [b for pair in road.lane_boundaries for b in pair]
    ax.add_collection(LineCollection(boundaries, colors=LANE_COLOR, linewidths=0.5, zorder=_Z_LANES))
    ax.add_collection(LineCollection(road.lanes, colors=LANE_COLOR, linewidths=0.8, linestyles=(0, (4, 4)),
                                     zorder=_Z_LANES))


def _box_noses(boxes: FloatArray) -> FloatArray:
    """Heading ticks: from each box's centre to the middle of its front edge. ``[N, 5] -> [N, 2, 2]``."""
    front = boxes[:, :2] + 0.5 * boxes[:, 3:4] * np.stack([np.cos(boxes[:, 2]), np.sin(boxes[:, 2])], axis=1)
    return np.stack([boxes[:, :2], front], axis=1)


def ego_box(ego_pose: ArrayLike) -> FloatArray:
    """The ego's box (x, y, heading, length, width) from its rear-axle pose, as :class:`DrivingSim` has it.

    ``ego_pose [..., 3] -> [..., 5]``.
    """
    pose = np.asarray(ego_pose, dtype=np.float64)
    h = pose[..., 2]
    cx = pose[..., 0] + EGO_REAR_TO_CENTRE * np.cos(h)
    cy = pose[..., 1] + EGO_REAR_TO_CENTRE * np.sin(h)
    return np.stack([cx, cy, h, np.full_like(h, EGO_LENGTH), np.full_like(h, EGO_WIDTH)], axis=-1)


def mode_polylines(modes: ArrayLike, ego_pose: ArrayLike) -> FloatArray:
    """World-frame polylines of ego-frame modes, each starting at the ego's rear axle.

    ``modes [K, H, 3], ego_pose [3] -> [K, H + 1, 2]``.
    """
    modes = np.asarray(modes, dtype=np.float64)
    pose = np.asarray(ego_pose, dtype=np.float64)
    world = poses_from_ego_frame(modes, pose)[..., :2]
    start = np.broadcast_to(pose[:2], (world.shape[0], 1, 2))
    return np.concatenate([start, world], axis=1)


def confidence_norm(scores: ArrayLike) -> Normalize:
    """Colour scale of confidences: [0, 1] when every score is a probability, else the scores' own range."""
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0 or (s.min() >= 0.0 and s.max() <= 1.0):
        return Normalize(0.0, 1.0)
    lo, hi = float(s.min()), float(s.max())
    return Normalize(lo, hi if hi > lo else lo + 1.0)


class _SceneArtists:
    """The moving part of a picture, created once and updated in place (what makes the GIF fast).

    The map and route are drawn on creation; :meth:`update` sets the view, the agents, the ego and the modes.
    """

    def __init__(self, ax: Axes, road: RoadMap, route: FloatArray | None, highlight_color: str,
                 cmap: str | Colormap, norm: Normalize | None) -> None:
        self.ax = ax
        self.cmap = colormaps[cmap] if isinstance(cmap, str) else cmap
        self.norm = norm
        ax.set_facecolor(BACKGROUND_COLOR)
        ax.set_aspect("equal", adjustable="box")
        ax.set_xlabel("x [m]")
        ax.set_ylabel("y [m]")
        _draw_map(ax, road)
        if route is not None:
            ax.plot(route[:, 0], route[:, 1], color=ROUTE_COLOR, alpha=0.25, linewidth=6.0,
                    solid_capstyle="round", zorder=_Z_ROUTE)
        self.agents = PolyCollection([], facecolors=AGENT_COLOR, edgecolors="#5a3a1a", linewidths=0.6,
                                     zorder=_Z_AGENTS)
        self.agent_noses = LineCollection([], colors="#5a3a1a", linewidths=0.8, zorder=_Z_AGENTS)
        self.ego = Polygon(np.zeros((4, 2)), closed=True, facecolor=EGO_COLOR, edgecolor="black", linewidth=0.8,
                           zorder=_Z_EGO)
        self.ego_nose = Line2D([], [], color="white", linewidth=1.2, zorder=_Z_EGO)
        self.modes = LineCollection([], linewidths=MODE_WIDTH, capstyle="round", zorder=_Z_MODES)
        if norm is not None:
            self.modes.set_cmap(self.cmap)
            self.modes.set_norm(norm)
        self.chosen = Line2D([], [], color=highlight_color, linewidth=CHOSEN_WIDTH, solid_capstyle="round",
                             zorder=_Z_CHOSEN,
                             path_effects=[patheffects.Stroke(linewidth=CHOSEN_WIDTH + 2.0, foreground="white"),
                                           patheffects.Normal()])
        for artist in (self.agents, self.agent_noses, self.modes):
            ax.add_collection(artist)
        ax.add_patch(self.ego)
        ax.add_line(self.ego_nose)
        ax.add_line(self.chosen)
        self.title = ax.set_title("")

    def add_colorbar(self) -> None:
        """A colorbar labelled "confidence" for the mode colours (needs a norm)."""
        self.ax.figure.colorbar(self.modes, ax=self.ax, fraction=0.046, pad=0.04, label="confidence")

    def update(self, scene: _Scene, view_radius: float, title: str) -> None:
        """Show ``scene``: view centred on the ego, boxes, modes sorted so the most confident are drawn last."""
        ex, ey = scene.ego_pose[:2]
        self.ax.set_xlim(ex - view_radius, ex + view_radius)
        self.ax.set_ylim(ey - view_radius, ey + view_radius)
        boxes = scene.agent_boxes[scene.agent_valid]
        self.agents.set_verts(list(box_corners(boxes)) if len(boxes) else [])
        self.agent_noses.set_segments(list(_box_noses(boxes)) if len(boxes) else [])
        box = ego_box(scene.ego_pose)
        self.ego.set_xy(box_corners(box))
        nose = _box_noses(box[None])[0]
        self.ego_nose.set_data(nose[:, 0], nose[:, 1])
        self._update_modes(scene)
        self.title.set_text(title)

    def _update_modes(self, scene: _Scene) -> None:
        if scene.modes is None:
            self.modes.set_segments([])
            self.chosen.set_data([], [])
            return
        lines = mode_polylines(scene.modes, scene.ego_pose)
        others = [k for k in range(len(lines)) if k != scene.chosen]
        if scene.scores is not None and self.norm is not None:
            others.sort(key=lambda k: scene.scores[k])
            self.modes.set_edgecolor(None)  # back to colormapped after a frame without scores
            self.modes.set_array(scene.scores[others])
        else:
            self.modes.set_array(None)
            self.modes.set_color("#4c72b0")
        self.modes.set_segments([lines[k] for k in others])
        self.chosen.set_data(lines[scene.chosen, :, 0], lines[scene.chosen, :, 1])


# ---------------------------------------------------------------------------------------------- public API


def plot_scene(road: RoadMap, ego_pose: ArrayLike, agent_boxes: ArrayLike, agent_valid: ArrayLike, *,
               modes: ArrayLike | None = None, scores: ArrayLike | None = None, chosen: int | None = None,
               route: ArrayLike | None = None, title: str = "", ax: Axes | None = None, view_radius: float = 45.0,
               highlight_color: str = HIGHLIGHT_COLOR, cmap: str | Colormap = CMAP,
               figsize: tuple[float, float] = (6.0, 6.0), dpi: float = 100.0) -> Figure:
    """A bird's-eye picture of one instant, centred on the ego (world frame, equal aspect).

    Args:
        road: the scene's map.
        ego_pose: ``[3]`` rear-axle pose (x, y, heading), world frame.
        agent_boxes: ``[N, 5]`` other vehicles (x, y, heading, length, width), world frame.
        agent_valid: ``[N]`` which rows hold a vehicle.
        modes: ``[K, H, 3]`` ego-frame poses of a policy's candidate trajectories (e.g. K anchors, H = 8).
        scores: ``[K]`` confidence per mode: colours the modes through ``cmap``, with a colorbar "confidence".
        chosen: the mode drawn highlighted on top (default argmax of ``scores``; mode 0 without scores).
        route: ``[R, 2]`` the ego route, drawn faint.
        title: axes title.
        ax: draw into these axes (their figure is returned) instead of a new figure.
        view_radius: half the width of the view, m.
        highlight_color: colour of the chosen mode.
        cmap: colormap of the confidences.
        figsize, dpi: size of a new figure (``figsize * dpi`` pixels).

    Returns:
        The matplotlib Figure (Agg canvas).
    """
    scene = _check_scene(ego_pose, agent_boxes, agent_valid, modes, scores, chosen, route)
    radius = _check_view_radius(view_radius)
    if ax is None:
        ax = _new_figure(figsize, dpi).add_subplot()
    norm = confidence_norm(scene.scores) if scene.scores is not None else None
    artists = _SceneArtists(ax, road, scene.route, highlight_color, cmap, norm)
    artists.update(scene, radius, title)
    if norm is not None:
        artists.add_colorbar()
    return ax.figure


def _atomic_target(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(final path, a temporary sibling with the same suffix); the folder is created."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    return final, final.with_name(f".{final.stem}.{os.getpid()}.tmp{final.suffix}")


def save_scene_png(path: str | os.PathLike[str], road: RoadMap, ego_pose: ArrayLike, agent_boxes: ArrayLike,
                   agent_valid: ArrayLike, **kwargs: object) -> Path:
    """Draw :func:`plot_scene` (same arguments) and write it as a PNG of ``figsize * dpi`` pixels, atomically.

    Returns:
        The written path.
    """
    fig = plot_scene(road, ego_pose, agent_boxes, agent_valid, **kwargs)  # type: ignore[arg-type]
    final, tmp = _atomic_target(path)
    try:
        fig.savefig(tmp, format="png", dpi=fig.dpi, facecolor=fig.get_facecolor())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def hold_plans(poses: ArrayLike, decision_frames: ArrayLike, plans: ArrayLike, scores: ArrayLike | None = None
               ) -> tuple[list[FloatArray | None], list[FloatArray | None]]:
    """Per-frame plans for :func:`episode_gif` from the decisions of an episode, each held until the next.

    A plan is made in the ego frame of its decision; on later frames it is re-expressed in that frame's ego frame,
    so it stays fixed in the world while the ego drives along it. Frames before the first decision get None.

    Args:
        poses: ``[F, 3]`` the episode's logged ego poses (world).
        decision_frames: ``[D]`` increasing frame index of each decision (e.g. ``sim.steps`` when it was made).
        plans: ``[D, H, 3]`` or ``[D, K, H, 3]`` ego-frame poses of each decision.
        scores: ``[D, K]`` confidences, or None.

    Returns:
        ``(modes, scores)``: lists of length F with ``[K, H, 3]`` (``[1, H, 3]`` for single plans) / ``[K]`` or None.
    """
    poses = _finite("poses", poses, (None, 3), "[F, 3] world-frame ego poses")
    frames = np.asarray(decision_frames)
    if frames.ndim != 1 or not np.issubdtype(frames.dtype, np.integer) or np.any(np.diff(frames) <= 0):
        raise ValueError(f"decision_frames must be a 1-D increasing integer array, got {frames!r}")
    plan_arr = np.asarray(plans, dtype=np.float64)
    if plan_arr.ndim == 3:
        plan_arr = plan_arr[:, None]
    plan_arr = _finite("plans", plan_arr, (frames.size, None, None, 3), f"[D, H, 3] or [D, K, H, 3] with D = "
                       f"{frames.size} (one per decision frame)")
    score_arr = None if scores is None else _finite("scores", scores, (frames.size, plan_arr.shape[1]),
                                                    f"[D, K] = [{frames.size}, {plan_arr.shape[1]}]")
    out_modes: list[FloatArray | None] = [None] * poses.shape[0]
    out_scores: list[FloatArray | None] = [None] * poses.shape[0]
    for f in range(poses.shape[0]):
        d = int(np.searchsorted(frames, f, side="right")) - 1
        if d < 0:
            continue
        world = poses_from_ego_frame(plan_arr[d], poses[min(frames[d], poses.shape[0] - 1)])
        out_modes[f] = poses_to_ego_frame(world, poses[f])
        out_scores[f] = None if score_arr is None else score_arr[d]
    return out_modes, out_scores


def gif_frame_indices(n_frames: int, every: int) -> list[int]:
    """Which logged frames a GIF shows: every ``every``-th from 0, plus the last (the episode's outcome)."""
    frames = list(range(0, n_frames, every))
    if frames[-1] != n_frames - 1:
        frames.append(n_frames - 1)
    return frames


def _frame_plans(plans: Sequence[ArrayLike | None] | ArrayLike | None,
                 plan_scores: Sequence[ArrayLike | None] | ArrayLike | None,
                 n_frames: int) -> tuple[list[FloatArray | None], list[FloatArray | None]]:
    """Per-frame modes ``[K, H, 3]`` (a single plan ``[H, 3]`` becomes K = 1) and scores ``[K]``, or None."""
    if plans is None:
        if plan_scores is not None:
            raise ValueError("plan_scores were given without plans")
        return [None] * n_frames, [None] * n_frames
    plan_list = list(plans)  # type: ignore[arg-type]
    score_list = [None] * len(plan_list) if plan_scores is None else list(plan_scores)  # type: ignore[arg-type]
    for name, entries in (("plans", plan_list), ("plan_scores", score_list)):
        if len(entries) < n_frames:
            raise ValueError(f"{name} must hold one entry (or None) per logged frame of the episode: {n_frames}, "
                             f"got {len(entries)}")
    modes: list[FloatArray | None] = []
    scores: list[FloatArray | None] = []
    for p, s in zip(plan_list[:n_frames], score_list[:n_frames]):
        p = None if p is None else np.asarray(p, dtype=np.float64)
        modes.append(p[None] if p is not None and p.ndim == 2 else p)
        scores.append(None if p is None or s is None else np.asarray(s, dtype=np.float64))
    return modes, scores


def episode_gif(path: str | os.PathLike[str], road: RoadMap, rollout: EpisodeLog, episode: int, *, fps: float = 10,
                every: int = 2, plans: Sequence[ArrayLike | None] | ArrayLike | None = None,
                plan_scores: Sequence[ArrayLike | None] | ArrayLike | None = None, view_radius: float = 45.0,
                figsize: tuple[float, float] = (6.0, 6.0), dpi: float = 80.0,
                highlight_color: str = HIGHLIGHT_COLOR) -> Path:
    """An animated GIF of one closed-loop episode, the view following the ego.

    Shows the logged frames ``gif_frame_indices(n_frames, every)`` (10 Hz sim frames; ``every=2`` at ``fps=10``
    plays at twice real time). One figure is drawn once; per frame only the view, the boxes, the plans and the
    title change.

    Args:
        path: the ``.gif`` to write (atomically).
        road: the map of ``rollout.scenario``.
        rollout: logged episodes (:class:`trajgen.agents.driving.Rollout`).
        episode: which one, ``0 <= episode < E``.
        fps: GIF frames per second.
        every: show every ``every``-th logged frame.
        plans: optional, one entry per logged frame (``[F, ...]`` or a sequence with None where there is no plan):
            ``[H, 3]`` or ``[K, H, 3]`` ego-frame poses in that frame's ego frame.
        plan_scores: optional ``[K]`` confidences per frame (colours the modes; a colorbar is added).
        view_radius: half the width of the view, m.
        figsize, dpi: frame size (``figsize * dpi`` pixels).
        highlight_color: colour of the chosen (best-scoring, or only) mode.

    Returns:
        The written path.
    """
    n_episodes = np.asarray(rollout.n_frames).shape[0]
    if int(episode) != episode or not 0 <= episode < n_episodes:
        raise ValueError(f"episode must be an index in [0, {n_episodes}), got {episode!r}")
    if getattr(rollout, "scenario", road.name) != road.name:
        raise ValueError(f"road is the {road.name!r} map but the rollout drove {rollout.scenario!r}")
    if int(every) != every or every < 1:
        raise ValueError(f"every must be a positive integer, got {every!r}")
    if not np.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be positive, got {fps!r}")
    radius = _check_view_radius(view_radius)
    n = int(rollout.n_frames[episode])
    if n < 1:
        raise ValueError(f"episode {episode} has no logged frames")
    modes, scores = _frame_plans(plans, plan_scores, n)
    known = [s for s in scores if s is not None]
    norm = confidence_norm(np.concatenate([np.ravel(s) for s in known])) if known else None
    route = _finite("rollout.routes[episode]", rollout.routes[episode], (None, 2), "[R, 2]")

    ax = _new_figure(figsize, dpi).add_subplot()
    artists = _SceneArtists(ax, road, route, highlight_color, CMAP, norm)
    if norm is not None:
        artists.add_colorbar()
    _scale_bar_instead_of_ticks(ax, radius)
    ax.figure.subplots_adjust(left=0.03, right=0.97 if norm is None else 0.9, bottom=0.03, top=0.93)
    shown = gif_frame_indices(n, every)
    scenes = [_check_scene(rollout.poses[episode, f], rollout.agent_boxes[episode, f],
                           rollout.agent_valid[episode, f], modes[f], scores[f], None, None) for f in shown]
    final, tmp = _atomic_target(path)
    try:
        with iio.imopen(tmp, "w", plugin="pillow", extension=".gif") as gif:
            for f, scene in zip(shown, scenes):
                artists.update(scene, radius, f"{road.name} episode {episode}   t = {0.1 * f:4.1f} s")
                gif.write(_canvas_rgb(ax.figure), duration=1000.0 / fps, loop=0)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def _scale_bar_instead_of_ticks(ax: Axes, view_radius: float, metres: float = 10.0) -> None:
    """Drop the ticks (re-laid out every frame as the view moves: most of the drawing time) for a scale bar.

    The view always spans ``2 * view_radius`` metres with equal aspect, so the bar is fixed in axes coordinates.
    """
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("")
    ax.set_ylabel("")
    x0, y0, length = 0.04, 0.04, metres / (2.0 * view_radius)
    ax.add_line(Line2D([x0, x0 + length], [y0, y0], transform=ax.transAxes, color="black", linewidth=2.0,
                       zorder=_Z_EGO + 1))
    ax.text(x0 + length / 2, y0 + 0.015, f"{metres:g} m", transform=ax.transAxes, ha="center", va="bottom",
            fontsize=8, zorder=_Z_EGO + 1)


def _canvas_rgb(fig: Figure) -> NDArray[np.uint8]:
    """Render the figure and return its pixels ``[H, W, 3]`` uint8."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
