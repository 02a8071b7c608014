"""The Gymnasium MuJoCo v5 locomotion environments trajgen uses, by short name."""

from __future__ import annotations

import gymnasium as gym
import mujoco
import numpy as np
from gymnasium.vector import SyncVectorEnv

ENV_IDS: dict[str, str] = {"hopper": "Hopper-v5", "halfcheetah": "HalfCheetah-v5", "walker2d": "Walker2d-v5"}
"""Short name -> Gymnasium id. Every env here has a 1000-step time limit and actions in [-1, 1]."""


def env_name(name: str) -> str:
    """The short name for ``name``, given as a short name (``"hopper"``) or a Gymnasium id (``"Hopper-v5"``).

    Raises:
        ValueError: the name is neither, listing the known ones.
    """
    if name in ENV_IDS:
        return name
    for short, gym_id in ENV_IDS.items():
        if name == gym_id:
            return short
    known = ", ".join(f"{k} ({v})" for k, v in ENV_IDS.items())
    raise ValueError(f"unknown MuJoCo env {name!r}; known: {known}")


def make_env(name: str, seed: int) -> gym.Env:
    """One seeded environment, already reset once with ``seed``.

    A later ``reset()`` without a seed continues the env's seeded random stream, so a run of resets and
    steps is a deterministic function of ``seed`` and the actions. ``action_space`` is seeded too.

    Args:
        name: short name or Gymnasium id (see ``ENV_IDS``).
        seed: integer seed.
    """
    env = gym.make(ENV_IDS[env_name(name)])
    env.reset(seed=int(seed))
    env.action_space.seed(int(seed))
    return env


def make_vector_env(name: str, n: int, seed: int) -> SyncVectorEnv:
    """``n`` copies in a ``SyncVectorEnv`` (next-step autoreset), sub-env ``i`` reset with ``seed + i``.

    Observations come back as ``[n, obs_dim]``, actions go in as ``[n, act_dim]``.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n (number of envs) must be a positive int, got {n!r}")
    gym_id = ENV_IDS[env_name(name)]
    vec = SyncVectorEnv([lambda: gym.make(gym_id) for _ in range(n)])
    vec.reset(seed=int(seed))
    vec.action_space.seed(int(seed))
    return vec


# ----------------------------------------------------------------------------------------------------
# simulator state (what resuming an interrupted run needs beyond qpos/qvel)
# ----------------------------------------------------------------------------------------------------

_FULL_STATE = mujoco.mjtState.mjSTATE_INTEGRATION


def get_sim_state(env: gym.Env) -> dict[str, np.ndarray | int | dict]:
    """Everything that determines the env's future given the actions: MuJoCo's integration state (qpos, qvel,
    act, warm start, time, ...), the time-limit counter and the env's random generator state."""
    u = env.unwrapped
    state = np.empty(mujoco.mj_stateSize(u.model, _FULL_STATE))
    mujoco.mj_getState(u.model, u.data, state, _FULL_STATE)
    return {"mj_state": state, "elapsed_steps": int(_time_limit(env)._elapsed_steps or 0),
            "np_random": u.np_random.bit_generator.state}


def set_sim_state(env: gym.Env, saved: dict) -> None:
    """Inverse of ``get_sim_state`` on an env that has been reset at least once."""
    u = env.unwrapped
    mujoco.mj_setState(u.model, u.data, np.asarray(saved["mj_state"], dtype=np.float64), _FULL_STATE)
    mujoco.mj_forward(u.model, u.data)
    _time_limit(env)._elapsed_steps = int(saved["elapsed_steps"])
    u.np_random.bit_generator.state = saved["np_random"]


def observation_of(env: gym.Env) -> np.ndarray:
    """The observation of the env's current simulator state, ``[obs_dim]`` float64."""
    return np.asarray(env.unwrapped._get_obs(), dtype=np.float64)


def _time_limit(env: gym.Env) -> gym.wrappers.TimeLimit:
    w = env
    while not isinstance(w, gym.wrappers.TimeLimit):
        if not hasattr(w, "env"):
            raise ValueError(f"{env} has no TimeLimit wrapper")
        w = w.env
    return w
