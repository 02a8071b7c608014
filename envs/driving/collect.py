"""Expert demonstrations for the driving policies: run :class:`RuleExpert` over a :class:`DrivingVectorEnv`, one
row per replanning tick, written to HDF5.

Each row holds the observation at the tick (every key of the observation contract), and, filled in after the
episode from its log:

- ``trajectory`` ``[8, 3]``: the expert's plan at the tick (ego frame), the label policies learn;
- ``future_poses`` ``[8, 3]``: the ego's ACTUAL poses 0.5 ... 4.0 s later, in the ego frame at the tick;
- ``future_agents`` ``[40, N, 5]`` (float32, WORLD frame): the other vehicles' boxes (x, y, heading, length,
  width) at the 40 sim steps (10 Hz) after the tick, with ``future_agents_valid`` ``[40, N]``; N = the sim's
  agent count (attr ``n_agents_log``), rows in the sim's agent order (stable over an episode);
- ``ego_pose`` ``[3]`` (world), ``route`` ``[128, 2]`` (world, the route resampled uniformly),
  ``expert_progress`` (m advanced along the route in the 4 s), ``ego_speed``;
- ``scenario`` (0 intersection, 1 merge), ``seed`` (the episode's scene seed), ``split`` (0 train, 1 test),
  ``episode`` (a running id within the file), ``tick`` (replanning tick within the episode).

Noise injection (DART, Laskey et al. 2017): at each tick, with probability ``perturb``, the plan the ego
executes is the expert's plan rotated about the ego by a random angle and stretched along its path by a
random factor (:func:`perturb_plans`); the label stays the expert's own plan. The ego therefore visits the
slightly-off states a learned policy drifts into, and the data shows how the expert recovers from them
-- without it, every policy trained here drifted off the road in closed loop within seconds.

On-policy rows (DAgger, Ross et al. 2011): with ``drivers`` (learned policies), scene slot s executes the plans
of driver s mod D instead of the expert's, and the label stays the expert's plan at the state the driver reached.
A policy trained on expert rows alone reaches states the expert never visits (in trajgen's intersection, stopped
at the line while the cross traffic waits for it to go); these rows show what the expert does there. Only
train-split scene seeds are written, so such a file can be added to any data file's training rows.

Ticks with less than 4 s of episode left, and every tick of an episode that ended in a collision or off the
road, are dropped. The split is decided by the scene seed alone (:func:`split_of_seed`), so a seed is never in
both. The file is written to a temporary name and moved into place (``os.replace``) when complete.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from trajgen.envs.driving.env import DrivingVectorEnv
from trajgen.envs.driving.expert import RuleExpert
from trajgen.envs.driving.geometry import poses_to_ego_frame, resample_polyline
from trajgen.envs.driving.sim import SCENARIOS

FORMAT_VERSION = 2  # 2: "trajectory" is the expert plan, "future_poses" the actual motion (noise injection)
FUTURE_STEPS = 40
ROUTE_POINTS = 128
STEPS_PER_POSE = 5


PERTURB_HEADING = 0.025
"""Standard deviation of the executed plan's rotation about the ego, rad (0.25 m at 10 m; larger values made
merge-road episodes fail: 0.04 rad lost 20% of them to collisions or the road edge, 0.025 rad under 2%)."""
PERTURB_STRETCH = 0.08
"""Standard deviation of the executed plan's relative stretch along its path (speed error)."""


Driver = Callable[[dict[str, np.ndarray]], np.ndarray]
"""A learned policy driving the ego: observations ``{key: [S', ...]}`` -> plans ``[S', 8, 3]`` (ego frame)."""


def driven_plans(drivers: Mapping[str, Driver], obs: Mapping[str, np.ndarray], n_scenes: int) -> np.ndarray:
    """The plans ``[S, 8, 3]`` the drivers execute: scene s is driven by the (s mod D)-th driver."""
    plans = np.empty((n_scenes, 8, 3), dtype=np.float32)
    for index, (name, driver) in enumerate(drivers.items()):
        scenes = np.arange(index, n_scenes, len(drivers))
        if scenes.size == 0:
            continue
        out = np.asarray(driver({k: v[scenes] for k, v in obs.items()}))
        if out.shape != (scenes.size, 8, 3):
            raise ValueError(f"driver {name!r} must return plans of shape [{scenes.size}, 8, 3], got {out.shape}")
        plans[scenes] = out
    return plans


def perturb_plans(plans: np.ndarray, rng: np.random.Generator, probability: float) -> np.ndarray:
    """Executed plans for noise injection: each plan ``[S, 8, 3]`` (ego frame), with ``probability``, is rotated
    about the ego by N(0, PERTURB_HEADING) rad and scaled by 1 + N(0, PERTURB_STRETCH) (clipped to [0.6, 1.4]);
    the others are returned unchanged."""
    n = plans.shape[0]
    chosen = rng.uniform(size=n) < probability
    angle = np.where(chosen, rng.normal(0.0, PERTURB_HEADING, n), 0.0)
    stretch = np.where(chosen, np.clip(1.0 + rng.normal(0.0, PERTURB_STRETCH, n), 0.6, 1.4), 1.0)
    c, s = np.cos(angle)[:, None], np.sin(angle)[:, None]
    x, y = plans[..., 0] * stretch[:, None], plans[..., 1] * stretch[:, None]
    out = np.empty_like(plans)
    out[..., 0], out[..., 1] = c * x - s * y, s * x + c * y
    out[..., 2] = plans[..., 2] + angle[:, None]
    return out


def split_of_seed(seed: np.ndarray, test_fraction: float) -> np.ndarray:
    """0 (train) or 1 (test) per scene seed ``[...]``: a splitmix hash of the seed below the test fraction."""
    x = np.asarray(seed).astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(31))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(29))
    u = (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return (u < test_fraction).astype(np.int8)


@dataclass
class _EpisodeLog:
    """One scene's current episode: per sim step states, per tick observations."""

    poses: list[np.ndarray] = field(default_factory=list)
    boxes: list[np.ndarray] = field(default_factory=list)
    valid: list[np.ndarray] = field(default_factory=list)
    route_s: list[float] = field(default_factory=list)
    speed: list[float] = field(default_factory=list)
    ticks: list[tuple[int, dict[str, np.ndarray], np.ndarray]] = field(default_factory=list)


class _Writer:
    """Appends row batches to resizable, chunked, compressed HDF5 datasets."""

    def __init__(self, path: Path) -> None:
        self.file = h5py.File(path, "w")
        self.n = 0

    def append(self, rows: dict[str, np.ndarray]) -> None:
        n_new = next(iter(rows.values())).shape[0]
        for key, arr in rows.items():
            if key not in self.file:
                self.file.create_dataset(key, shape=(0, *arr.shape[1:]), maxshape=(None, *arr.shape[1:]),
                                         dtype=arr.dtype, chunks=(min(256, max(n_new, 1)), *arr.shape[1:]),
                                         compression="gzip", compression_opts=3)
            ds = self.file[key]
            ds.resize(self.n + n_new, axis=0)
            ds[self.n :] = arr
        self.n += n_new


def _finish_episode(log: _EpisodeLog, scenario: int, seed: int, episode: int, route: np.ndarray,
                    test_fraction: float) -> list[dict[str, np.ndarray]]:
    """The rows of one finished (successful or timed-out) episode."""
    poses = np.asarray(log.poses)
    boxes = np.asarray(log.boxes, dtype=np.float32)
    valid = np.asarray(log.valid)
    route_s = np.asarray(log.route_s)
    rows = []
    split = split_of_seed(np.array([seed]), test_fraction)[0]
    for tick, (step, obs, plan) in enumerate(log.ticks):
        if step + FUTURE_STEPS >= poses.shape[0]:
            break
        future = poses[step + STEPS_PER_POSE : step + FUTURE_STEPS + 1 : STEPS_PER_POSE]
        row = dict(obs)
        row["trajectory"] = plan.astype(np.float32)
        row["future_poses"] = poses_to_ego_frame(future, poses[step]).astype(np.float32)
        row["future_agents"] = boxes[step + 1 : step + FUTURE_STEPS + 1]
        row["future_agents_valid"] = valid[step + 1 : step + FUTURE_STEPS + 1]
        row["ego_pose"] = poses[step]
        row["ego_speed"] = np.float32(log.speed[step])
        row["route"] = route
        row["expert_progress"] = np.float32(route_s[step + FUTURE_STEPS] - route_s[step])
        row["scenario"] = np.int8(scenario)
        row["seed"] = np.int64(seed)
        row["split"] = np.int8(split)
        row["episode"] = np.int64(episode)
        row["tick"] = np.int32(tick)
        rows.append(row)
    return rows


def _collect_scenario(writer: _Writer, scenario: str, n_samples: int, seed: int, n_envs: int, test_fraction: float,
                      progress_cb: Callable[[int], None] | None, episode_offset: int,
                      perturb: float, drivers: Mapping[str, Driver]) -> dict[str, float]:
    env = DrivingVectorEnv(num_envs=n_envs, scenario=scenario)
    rng = np.random.default_rng([seed, 99])
    sim = env.sim
    expert = RuleExpert(sim)
    routes = np.stack([resample_polyline(r.polyline, ROUTE_POINTS) for r in sim.road.routes]).astype(np.float32)
    scen_id = SCENARIOS.index(scenario)
    logs = [_EpisodeLog() for _ in range(n_envs)]

    def log_state(scenes: np.ndarray) -> None:
        pose, boxes, valid = sim.ego_pose(), sim.agent_boxes(), sim.agent_valid()
        for s in scenes:
            logs[s].poses.append(pose[s])
            logs[s].boxes.append(boxes[s])
            logs[s].valid.append(valid[s])
            logs[s].route_s.append(float(sim.route_s[s]))
            logs[s].speed.append(float(sim.ego.speed[s]))

    env.core.on_substep = lambda live: log_state(np.flatnonzero(live))
    obs, _ = env.reset(seed=seed)
    log_state(np.arange(n_envs))
    written, episodes, failed, skipped, buffer = 0, 0, 0, 0, []
    while written < n_samples:
        plans = expert.plan()
        for s in range(n_envs):
            logs[s].ticks.append((int(sim.steps[s]), {k: v[s] for k, v in obs.items()}, plans[s]))
        seeds_before, routes_before = sim.seeds.copy(), sim.route.copy()
        executed = driven_plans(drivers, obs, n_envs) if drivers else plans
        obs, _, terminated, truncated, info = env.step(perturb_plans(executed, rng, perturb).astype(np.float32))
        done = np.flatnonzero(terminated | truncated)
        for s in done:
            final = info["final_info"]
            ok = not (final["collision"][s] or final["off_road"][s])
            failed += not ok
            test_seed = bool(drivers) and split_of_seed(seeds_before[s : s + 1], test_fraction)[0] == 1
            skipped += int(ok and test_seed)
            if ok and not test_seed:
                buffer += _finish_episode(logs[s], scen_id, int(seeds_before[s]), episode_offset + episodes,
                                          routes[routes_before[s]], test_fraction)
            episodes += 1
            logs[s] = _EpisodeLog()
        log_state(done)
        if episodes >= 4 * n_envs and written + len(buffer) == 0:
            raise RuntimeError(f"{scenario}: no usable episode in the first {episodes} ({failed} ended in a collision "
                               f"or off the road, {skipped} had test seeds): check the drivers")
        if len(buffer) >= 1024 or (buffer and written + len(buffer) >= n_samples):
            take = buffer[: n_samples - written]
            writer.append({k: np.stack([r[k] for r in take]) for k in take[0]})
            written += len(take)
            buffer = buffer[len(take) :]
            if progress_cb is not None:
                progress_cb(len(take))
    return {"episodes": episodes, "failed_episodes": failed, "skipped_test_episodes": skipped, "rows": written}


def collect_driving(out: Path, *, scenario: str = "both", n_samples: int = 50_000, seed: int = 0,
                    test_fraction: float = 0.1, n_envs: int = 64, quick: bool = False,
                    progress: bool = False, perturb: float | None = None,
                    drivers: Mapping[str, Driver] | None = None) -> dict[str, object]:
    """Collect expert rows into the HDF5 file ``out`` (see the module docstring); returns a summary dict.

    Args:
        out: destination path (parent directories are created).
        scenario: ``"intersection"``, ``"merge"`` or ``"both"`` (half the rows each).
        n_samples: rows to write in total.
        seed: seeds the episode seeds (scene seed k of scenario j comes from ``seed`` and j).
        test_fraction: share of scene seeds in the test split.
        n_envs: scenes simulated together.
        quick: a small run for smoke tests (at most 512 rows, 16 scenes).
        progress: show a progress bar.
        perturb: probability per tick that the executed plan is perturbed (noise injection; 0 = pure expert);
            default 0.3 for the expert, 0 with ``drivers``.
        drivers: learned policies that drive the ego (named; scene slot s is driven by the (s mod D)-th), the
            expert only labelling their states (DAgger; see the module docstring). Only train-split seeds are
            written.
    """
    drivers = dict(drivers or {})
    if perturb is None:
        perturb = 0.0 if drivers else 0.3
    scenarios = list(SCENARIOS) if scenario == "both" else [scenario]
    if any(s not in SCENARIOS for s in scenarios):
        raise ValueError(f"scenario must be one of {SCENARIOS} or 'both', got {scenario!r}")
    if int(n_samples) != n_samples or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples}")
    if not 0.0 <= perturb <= 1.0:
        raise ValueError(f"perturb must be a probability in [0, 1], got {perturb}")
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    if drivers and test_fraction >= 1.0:
        raise ValueError("drivers write train-split rows only: test_fraction must be below 1")
    if quick:
        n_samples, n_envs = min(n_samples, 512), min(n_envs, 16)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    t0 = time.perf_counter()
    per = [n_samples // len(scenarios) + (i < n_samples % len(scenarios)) for i in range(len(scenarios))]
    stats: dict[str, object] = {}
    bar = None
    try:
        if progress:
            from rich.progress import Progress

            bar = Progress()
            bar.start()
            task = bar.add_task("collect driving", total=n_samples)
        writer = _Writer(tmp)
        offset = 0
        for j, (name, count) in enumerate(zip(scenarios, per, strict=True)):
            cb = (lambda n: bar.advance(task, n)) if bar is not None else None
            stats[name] = _collect_scenario(writer, name, count, seed * 2 + j, n_envs, test_fraction, cb, offset,
                                            perturb, drivers)
            offset += int(stats[name]["episodes"])
        f = writer.file
        f.attrs.update({"version": FORMAT_VERSION, "scenario": scenario, "seed": seed, "test_fraction": test_fraction,
                        "future_frame": "world", "future_dt": 0.1, "perturb": perturb, "pose_dt": 0.5,
                        "drivers": ",".join(drivers) or "expert", "n_agents_log": int(f["future_agents"].shape[2]),
                        "scenarios": ",".join(SCENARIOS)})
        f.close()
        os.replace(tmp, out)
    finally:
        if bar is not None:
            bar.stop()
        if tmp.exists():
            tmp.unlink()
    stats["seconds"] = time.perf_counter() - t0
    stats["rows"] = n_samples
    return stats
