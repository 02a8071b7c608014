"""Gymnasium environments over the batched driving simulator.

- :class:`DrivingVectorEnv` (``gymnasium.vector.VectorEnv``): ``num_envs`` scenes in one numpy state, one call
  steps them all (no subprocesses), same-step autoreset (a finished scene is reset inside ``step``; its last
  observation and info are in ``info["final_obs"]`` / ``info["final_info"]`` where ``info["_final_obs"]``).
- :class:`DrivingEnv` (``gymnasium.Env``): one scene, no autoreset.

Actions: ``action_mode="trajectory"`` (default) takes a plan ``[8, 3]`` = ego-frame (x, y, heading) at
t = 0.5 ... 4.0 s, tracked by :class:`~trajgen.envs.driving.tracking.PlanTracker` for ``replan_every`` sim
steps (default 5 = 2 Hz replanning); a plan beyond the vehicle's limits is flagged in ``info["infeasible"]`` and
tracked as well as the limits allow. ``action_mode="control"`` takes (acceleration m/s^2, steering rad) for one
0.1 s step. Reward per step: ``progress_scale`` x route progress (m) - ``collision_penalty`` x collision -
``off_road_penalty`` x off-road. Episodes terminate on collision, off-road or route completion and truncate
at the scenario's time limit.

``info`` (arrays over scenes): ``collision``, ``off_road``, ``route_progress`` (m along the route since the
episode start), ``route_completed``, ``infeasible``, ``progress`` (m this step), ``seed`` (the episode's scene
seed), ``command`` (index into COMMANDS).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from trajgen.envs.driving.observation import build_observation, observation_space
from trajgen.envs.driving.sim import DT, SCENARIOS, DrivingSim
from trajgen.envs.driving.tracking import N_POSES, PlanTracker, check_plan, plan_infeasible

ACTION_MODES = ("trajectory", "control")
SEED_BOUND = 2**31 - 1


def _action_space(mode: str, sim: DrivingSim) -> gym.spaces.Box:
    lim = sim.limits
    if mode == "trajectory":
        low = np.tile(np.array([-20.0, -80.0, -np.pi], dtype=np.float32), (N_POSES, 1))
        high = np.tile(np.array([140.0, 80.0, np.pi], dtype=np.float32), (N_POSES, 1))
        return gym.spaces.Box(low, high, dtype=np.float32)
    return gym.spaces.Box(np.array([-lim.max_decel, -lim.max_steer], dtype=np.float32),
                          np.array([lim.max_accel, lim.max_steer], dtype=np.float32), dtype=np.float32)


class _DrivingCore:
    """What both environments share: the sim, the tracker, action handling, rewards and info."""

    def __init__(self, n_scenes: int, scenario: str, action_mode: str, replan_every: int, bev: bool, n_agents: int,
                 progress_scale: float, collision_penalty: float, off_road_penalty: float) -> None:
        if scenario not in SCENARIOS:
            raise ValueError(f"scenario must be one of {SCENARIOS}, got {scenario!r}")
        if action_mode not in ACTION_MODES:
            raise ValueError(f"action_mode must be one of {ACTION_MODES}, got {action_mode!r}")
        if int(replan_every) != replan_every or replan_every < 1:
            raise ValueError(f"replan_every must be a positive integer of sim steps, got {replan_every}")
        self.sim = DrivingSim(scenario, n_scenes, n_agents=n_agents)
        self.tracker = PlanTracker(self.sim.limits)
        self.action_mode, self.replan_every, self.bev = action_mode, int(replan_every), bev
        self.progress_scale, self.collision_penalty, self.off_road_penalty = (
            progress_scale, collision_penalty, off_road_penalty)
        self.on_substep: Callable[[np.ndarray], None] | None = None
        """Called after every sim step with the mask ``[S]`` of scenes still in their episode (loggers)."""

    def observe(self) -> dict[str, np.ndarray]:
        return build_observation(self.sim, bev=self.bev)

    def _check_control(self, action: Any) -> np.ndarray:
        arr = np.asarray(action, dtype=np.float64)
        if arr.shape != (self.sim.S, 2):
            raise ValueError(f"action must have shape [{self.sim.S}, 2] (acceleration m/s^2, steering rad), "
                             f"got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError("action has NaN or infinite entries")
        return arr

    def act(self, action: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Apply batched actions; returns (reward, terminated, truncated, info), each over scenes ``[S]``."""
        sim = self.sim
        S = sim.S
        if self.action_mode == "trajectory":
            plan = check_plan(action, S)
            infeasible = plan_infeasible(plan, sim.ego.speed, sim.limits)
            self.tracker.set_plan(plan, sim.ego_pose())
            n_steps = self.replan_every
        else:
            control = self._check_control(action)
            lim = sim.limits
            infeasible = ((control[:, 0] < -lim.max_decel) | (control[:, 0] > lim.max_accel)
                          | (np.abs(control[:, 1]) > lim.max_steer))
            n_steps = 1
        done = np.zeros(S, dtype=bool)
        reward = np.zeros(S)
        progress = np.zeros(S)
        flags = {k: np.zeros(S, dtype=bool) for k in ("collision", "off_road", "route_completed", "timeout")}
        for k in range(n_steps):
            if self.action_mode == "trajectory":
                accel, steer = self.tracker.control(sim.ego_pose(), sim.ego.speed, np.full(S, k * DT))
            else:
                accel, steer = control[:, 0], control[:, 1]
            out = sim.step(accel, steer)
            live = ~done
            if self.on_substep is not None:
                self.on_substep(live)
            progress += np.where(live, out.progress, 0.0)
            for name, value in (("collision", out.collision), ("off_road", out.off_road),
                                ("route_completed", out.completed), ("timeout", out.timeout)):
                flags[name] |= live & value
            done |= out.collision | out.off_road | out.completed | out.timeout
        reward = (self.progress_scale * progress - self.collision_penalty * flags["collision"]
                  - self.off_road_penalty * flags["off_road"])
        terminated = flags["collision"] | flags["off_road"] | flags["route_completed"]
        truncated = flags["timeout"] & ~terminated
        info = {
            "collision": flags["collision"], "off_road": flags["off_road"],
            "route_progress": sim.route_s - sim.start_s, "route_completed": flags["route_completed"],
            "infeasible": infeasible, "progress": progress, "seed": sim.seeds.copy(),
            "command": sim.command.copy(),
        }
        return reward, terminated, truncated, info


class DrivingVectorEnv(VectorEnv):
    """``num_envs`` driving scenes stepped together (see the module docstring).

    Args:
        num_envs: number of scenes.
        scenario: ``"intersection"`` or ``"merge"``.
        action_mode: ``"trajectory"`` or ``"control"``.
        replan_every: sim steps (0.1 s) a plan is tracked per ``step`` (trajectory mode).
        bev: add the ``"bev"`` raster to observations.
        n_agents: other vehicles per scene.
        progress_scale, collision_penalty, off_road_penalty: reward weights.
    """

    metadata: ClassVar[dict[str, Any]] = {"autoreset_mode": AutoresetMode.SAME_STEP, "render_modes": []}

    def __init__(self, num_envs: int = 1, scenario: str = "intersection", action_mode: str = "trajectory",
                 replan_every: int = 5, bev: bool = False, n_agents: int = 16, progress_scale: float = 0.1,
                 collision_penalty: float = 1.0, off_road_penalty: float = 1.0) -> None:
        self.core = _DrivingCore(num_envs, scenario, action_mode, replan_every, bev, n_agents, progress_scale,
                                 collision_penalty, off_road_penalty)
        self.num_envs = num_envs
        self.scenario = scenario
        self.single_observation_space = observation_space(bev)
        self.single_action_space = _action_space(action_mode, self.core.sim)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)

    @property
    def sim(self) -> DrivingSim:
        """The batched simulator (for experts, scoring and logging)."""
        return self.core.sim

    def _new_seeds(self, n: int) -> np.ndarray:
        return self.np_random.integers(0, SEED_BOUND, size=n, dtype=np.int64)

    def reset(self, *, seed: int | list[int] | None = None,
              options: dict[str, Any] | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Reset every scene. ``options={"seeds": [num_envs ints]}`` sets the scene seeds directly (e.g. a
        held-out split); otherwise they are drawn from ``seed``."""
        super().reset(seed=seed if isinstance(seed, int) or seed is None else int(seed[0]))
        options = options or {}
        if "seeds" in options:
            seeds = np.asarray(options["seeds"], dtype=np.int64).reshape(-1)
            if seeds.shape != (self.num_envs,):
                raise ValueError(f"options['seeds'] must hold {self.num_envs} integers, got shape {seeds.shape}")
        else:
            seeds = self._new_seeds(self.num_envs)
        self.core.sim.reset(seeds)
        return self.core.observe(), {"seed": seeds.copy(), "command": self.core.sim.command.copy()}

    def step(self, actions: Any) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Step every scene; finished scenes are reset in the same call (same-step autoreset)."""
        reward, terminated, truncated, info = self.core.act(actions)
        obs = self.core.observe()
        done = terminated | truncated
        if done.any():
            info["final_obs"] = obs
            info["_final_obs"] = done
            info["final_info"] = {k: v.copy() for k, v in info.items() if k not in ("final_obs", "_final_obs")}
            info["_final_info"] = done
            scenes = np.flatnonzero(done)
            self.core.sim.reset(self._new_seeds(scenes.size), scenes)
            obs = self.core.observe()
            info["seed"] = self.core.sim.seeds.copy()
            info["command"] = self.core.sim.command.copy()
        return obs, reward.astype(np.float64), terminated, truncated, info


class DrivingEnv(gym.Env):
    """One driving scene (arguments as :class:`DrivingVectorEnv`, without ``num_envs``)."""

    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}

    def __init__(self, scenario: str = "intersection", action_mode: str = "trajectory", replan_every: int = 5,
                 bev: bool = False, n_agents: int = 16, progress_scale: float = 0.1, collision_penalty: float = 1.0,
                 off_road_penalty: float = 1.0) -> None:
        self.core = _DrivingCore(1, scenario, action_mode, replan_every, bev, n_agents, progress_scale,
                                 collision_penalty, off_road_penalty)
        self.scenario = scenario
        self.observation_space = observation_space(bev)
        self.action_space = _action_space(action_mode, self.core.sim)
        self._needs_reset = True

    @property
    def sim(self) -> DrivingSim:
        """The (one-scene) simulator."""
        return self.core.sim

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Start an episode; ``options={"scene_seed": int}`` fixes the scene directly."""
        super().reset(seed=seed)
        options = options or {}
        scene_seed = int(options["scene_seed"]) if "scene_seed" in options else int(
            self.np_random.integers(0, SEED_BOUND))
        self.core.sim.reset(np.array([scene_seed]))
        self._needs_reset = False
        return self._unbatch(self.core.observe()), {"seed": scene_seed, "command": int(self.core.sim.command[0])}

    def step(self, action: Any) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        """One replanning period (trajectory mode) or one 0.1 s step (control mode)."""
        if self._needs_reset:
            raise RuntimeError("DrivingEnv.step called before reset (or after the episode ended)")
        arr = np.asarray(action)
        want = self.action_space.shape
        if arr.shape != want:
            raise ValueError(f"action must have shape {list(want)}, got shape {arr.shape}")
        reward, terminated, truncated, info = self.core.act(arr[None])
        self._needs_reset = bool(terminated[0] or truncated[0])
        scalar_info = {k: v[0].item() for k, v in info.items()}
        return (self._unbatch(self.core.observe()), float(reward[0]), bool(terminated[0]), bool(truncated[0]),
                scalar_info)

    @staticmethod
    def _unbatch(obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v[0] for k, v in obs.items()}
