"""Simulator throughput: trajgen's batched driving sim against highway-env, side by side on one core.

The unit is **simulated vehicle-seconds per wall-clock second**: every vehicle in every scene (ego included)
advanced by one second of simulated time counts as one. It is independent of the step length, so highway-env
(15 Hz simulation, 1 Hz policy) and trajgen (10 Hz simulation, 2 Hz policy) compare directly; the raw
vehicle-steps per second are reported too. Both sides include producing observations, as an RL loop must.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Throughput:
    """One timed run of a simulator."""

    name: str
    scenes: int
    vehicles_per_scene: float
    sim_dt: float
    wall_s: float
    vehicle_steps: int

    @property
    def vehicle_steps_per_s(self) -> float:
        return self.vehicle_steps / self.wall_s

    @property
    def vehicle_seconds_per_s(self) -> float:
        return self.vehicle_steps * self.sim_dt / self.wall_s

    def as_dict(self) -> dict[str, float | int | str]:
        return {
            "name": self.name,
            "scenes": self.scenes,
            "vehicles_per_scene": self.vehicles_per_scene,
            "sim_dt": self.sim_dt,
            "wall_s": self.wall_s,
            "vehicle_steps": self.vehicle_steps,
            "vehicle_steps_per_s": self.vehicle_steps_per_s,
            "vehicle_seconds_per_s": self.vehicle_seconds_per_s,
        }


def time_loop(step: Callable[[], int], seconds: float) -> tuple[float, int]:
    """Call ``step`` (returning the vehicle-steps it simulated) until ``seconds`` have passed.

    Returns (wall seconds, total vehicle-steps).
    """
    total = 0
    start = time.perf_counter()
    while True:
        total += step()
        wall = time.perf_counter() - start
        if wall >= seconds:
            return wall, total


def highway_env_throughput(env_id: str = "intersection-v1", seconds: float = 5.0, seed: int = 0) -> Throughput:
    """Throughput of one highway-env environment stepped with random actions (its usual single-scene loop).

    highway-env runs ``simulation_frequency / policy_frequency`` simulation sub-steps per ``env.step`` for every
    vehicle on the road; those sub-steps are what is counted.
    """
    try:
        import gymnasium as gym
        import highway_env  # noqa: F401  (registers the highway-env ids)
    except ImportError as err:  # pragma: no cover - depends on the bench extra
        raise ImportError("highway-env is a benchmark extra: pip install -e '.[bench]'") from err
    env = gym.make(env_id)
    config = env.unwrapped.config
    sub_steps = int(config["simulation_frequency"] // config["policy_frequency"])
    env.reset(seed=seed)
    env.action_space.seed(seed)
    counts: list[int] = []

    def step() -> int:
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        n_vehicles = len(env.unwrapped.road.vehicles)
        counts.append(n_vehicles)
        if terminated or truncated:
            env.reset()
        return n_vehicles * sub_steps

    wall, total = time_loop(step, seconds)
    env.close()
    return Throughput(
        name=f"highway-env {env_id}",
        scenes=1,
        vehicles_per_scene=float(np.mean(counts)),
        sim_dt=1.0 / float(config["simulation_frequency"]),
        wall_s=wall,
        vehicle_steps=total,
    )


def trajgen_throughput(scenario: str = "intersection", n_scenes: int = 256, seconds: float = 5.0,
                       seed: int = 0) -> Throughput:
    """Throughput of trajgen's :class:`DrivingVectorEnv` with ``n_scenes`` scenes, every step a batched
    trajectory action tracked for one replanning period (5 sim steps) and a fresh observation, as an agent's
    loop sees it. The plans are constant-speed straight lines (the policy's cost is not the simulator's)."""
    from trajgen.envs.driving.env import DrivingVectorEnv

    env = DrivingVectorEnv(num_envs=n_scenes, scenario=scenario)
    obs, _ = env.reset(seed=seed)
    sub_steps = env.core.replan_every
    counts: list[float] = []
    horizon = 0.5 * np.arange(1, 9)

    def step() -> int:
        nonlocal obs
        plans = np.zeros((n_scenes, 8, 3), dtype=np.float32)
        plans[..., 0] = obs["ego"][:, :1] * horizon
        obs, _, _, _, _ = env.step(plans)
        vehicles = env.sim.agent_valid().sum() + n_scenes  # other vehicles + the egos
        counts.append(vehicles / n_scenes)
        return int(vehicles) * sub_steps

    wall, total = time_loop(step, seconds)
    return Throughput(name=f"trajgen {scenario}", scenes=n_scenes, vehicles_per_scene=float(np.mean(counts)),
                      sim_dt=0.1, wall_s=wall, vehicle_steps=total)


def run_throughput_comparison(seconds: float = 5.0, scenes: tuple[int, ...] = (1, 256)) -> dict[str, object]:
    """trajgen (intersection, several batch sizes) against highway-env's intersection-v1 on one thread.

    Returns a JSON-able dict with every run and the ratio of simulated vehicle-seconds per wall second,
    trajgen's best batch over highway-env (None when highway-env is not installed).
    """
    from threadpoolctl import threadpool_limits

    from trajgen.bench.threads import torch_threads

    with torch_threads(1), threadpool_limits(1):
        runs = [trajgen_throughput("intersection", n, seconds) for n in scenes]
        runs += [trajgen_throughput("merge", max(scenes), seconds)]
        try:
            reference = highway_env_throughput("intersection-v1", seconds)
        except ImportError:
            reference = None
    best = max(r.vehicle_seconds_per_s for r in runs if r.name.endswith("intersection"))
    return {
        "unit": "simulated vehicle-seconds per wall-clock second, one thread, observations included",
        "runs": [r.as_dict() for r in runs] + ([reference.as_dict()] if reference else []),
        "ratio_vs_highway_env": best / reference.vehicle_seconds_per_s if reference else None,
    }
