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
