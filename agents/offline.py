"""Offline-RL policies acting in Gymnasium environments: numpy ``act``, batched evaluation, decision latency.

Receding horizon: every call plans from the current state and executes only the plan's first action.
Return conditioning follows Trajectory Diffuser: each episode starts from the policy's target return and
the condition is the return still to collect, floored at ``min_return_fraction`` of the target.
"""

from __future__ import annotations

import time
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from trajgen.data.d4rl import D4RL_REF_SCORES, d4rl_normalized_score
from trajgen.policies.offline import OfflinePolicy, StateHistory


class OfflineAgent:
    """numpy in, numpy out around an :class:`OfflinePolicy`: ``act(obs [B, S]) -> actions [B, A]`` (float64).

    Runs the policy in eval mode under no_grad on the policy's device.

    Args:
        policy: a trained (or freshly built) offline policy.
        seed: seeds the generator of the diffusion planners' noise, so rollouts repeat exactly.
    """

    def __init__(self, policy: OfflinePolicy, *, seed: int | None = None) -> None:
        if not isinstance(policy, OfflinePolicy):
            raise TypeError(f"policy must be a trajgen OfflinePolicy, got {type(policy).__name__}")
        self.policy = policy
        self.generator = torch.Generator(policy.device).manual_seed(seed) if seed is not None else None

    def act(self, obs: np.ndarray, returns_to_go: np.ndarray | None = None, *,
            history: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """obs [B, S], returns_to_go [B] | None (None: the policy's target return) -> actions [B, A] float64.

        ``history``: the episode's earlier (states [B, K, S], returns-to-go [B, K]), oldest first, for policies
        whose GPT drafts from it (``policy.history_length`` > 0); ``evaluate`` keeps it."""
        obs = np.asarray(obs)
        dim = self.policy.obs_dim
        if obs.ndim != 2 or obs.shape[1] != dim or obs.shape[0] == 0:
            hint = f"; for one observation pass obs[None] (shape [1, {dim}])" if obs.shape == (dim,) else ""
            raise ValueError(f"obs must have shape [B, {dim}] with B >= 1, got {obs.shape}{hint}")
        if not np.issubdtype(obs.dtype, np.number) or not np.isfinite(obs).all():
            raise ValueError("obs must be finite numbers (got NaN, inf or a non-numeric dtype)")
        device = self.policy.device
        rtg = None if returns_to_go is None else torch.as_tensor(np.asarray(returns_to_go, np.float32), device=device)
        past = None
        if history is not None:
            if len(history) != 2 or not all(np.isfinite(np.asarray(x, dtype=np.float64)).all() for x in history):
                raise ValueError("history must be (states [B, K, S], returns_to_go [B, K]) of finite numbers")
            past = StateHistory(*(torch.as_tensor(np.asarray(x), dtype=torch.float32, device=device) for x in history))
        self.policy.model.eval()
        with torch.no_grad():
            obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device)
            actions = self.policy.act(obs_t, rtg, history=past, generator=self.generator)
        return actions.cpu().numpy().astype(np.float64)


def evaluate(policy: OfflinePolicy, env_id: str, n_episodes: int, seed: int = 0, device: str | None = None, *,
             num_envs: int | None = None, max_episode_steps: int | None = None,
             target_return: float | None = None) -> dict[str, Any]:
    """Roll out ``n_episodes`` episodes over a Gymnasium vector env, one batched policy call per step.

    Episodes run in rounds of ``num_envs`` parallel envs (default: all at once); episode k is reset with
    seed ``seed + k``. An env whose episode ended is not restarted: it is stepped with zero actions until
    the round ends and its rewards are ignored. Actions are clipped to the action space.

    Args:
        policy: the policy; its ``env_id`` (if known) must name the same env family as ``env_id``.
        env_id: a Gymnasium id, e.g. ``"Hopper-v5"``.
        n_episodes: episodes to run (>= 1).
        seed: base reset seed (also seeds the planners' noise).
        device: where the policy runs (None: where it is).
        num_envs: parallel envs per round.
        max_episode_steps: override the env's time limit (short smoke runs).
        target_return: the return each episode starts from (default: the policy's ``default_return``, the
            best episode return of its training data); ignored by behaviour cloning.
    Returns:
        ``returns``, ``lengths`` (per episode), ``return_mean``, ``return_se``, ``scores`` /
        ``score_mean`` / ``score_se`` (D4RL-normalised with D4RL's reference returns; None for envs without
        references), ``episodes``, ``env_steps``, ``policy_calls``, ``wall_s``, ``env_steps_per_s``.
    """
    if n_episodes < 1:
        raise ValueError(f"n_episodes must be >= 1, got {n_episodes}")
    target = policy.default_return if target_return is None else float(target_return)
    if not np.isfinite(target):
        raise ValueError(f"target_return must be a finite number, got {target_return}")
    _check_env_match(policy, env_id)
    if device is not None:
        policy.to(device)
    agent = OfflineAgent(policy, seed=seed)
    num_envs = min(num_envs or n_episodes, n_episodes)
    returns, lengths, calls, start = [], [], 0, time.perf_counter()
    for first in range(0, n_episodes, num_envs):
        seeds = list(range(seed + first, seed + min(first + num_envs, n_episodes)))
        round_returns, round_lengths, round_calls = _run_round(agent, env_id, seeds, max_episode_steps, target)
        returns += round_returns
        lengths += round_lengths
        calls += round_calls
    wall = time.perf_counter() - start
    return {**_summary(env_id, np.asarray(returns)), "lengths": lengths, "episodes": len(returns),
            "env_steps": int(sum(lengths)), "policy_calls": calls, "wall_s": wall,
            "env_steps_per_s": sum(lengths) / wall if wall > 0 else float("nan")}


def _run_round(agent: OfflineAgent, env_id: str, seeds: list[int], max_episode_steps: int | None,
               target: float) -> tuple[list[float], list[int], int]:
    """One episode per seed in parallel, each starting from return condition ``target``; returns (returns,
    lengths, policy calls)."""
    kwargs = {} if max_episode_steps is None else {"max_episode_steps": max_episode_steps}
    envs = gym.make_vec(env_id, num_envs=len(seeds), vectorization_mode="sync", **kwargs)
    try:
        _check_spaces(agent.policy, envs)
        low, high = envs.single_action_space.low, envs.single_action_space.high
        obs, _ = envs.reset(seed=seeds)
        n = len(seeds)
        active = np.ones(n, dtype=bool)
        ep_return, ep_length = np.zeros(n), np.zeros(n, dtype=int)
        rtg = np.full(n, target, dtype=np.float64)
        history = EpisodeHistory(n, agent.policy.obs_dim, agent.policy.history_length)
        calls = 0
        while active.any():
            actions = np.zeros((n, *envs.single_action_space.shape))
            actions[active] = np.clip(agent.act(obs[active], rtg[active], history=history.of(active)), low, high)
            calls += 1
            history.push(obs, rtg)
            obs, rewards, terminated, truncated, _ = envs.step(actions)
            ep_return[active] += rewards[active]
            ep_length[active] += 1
            rtg[active] = agent.policy.next_returns_to_go(rtg[active], rewards[active], target)
            active &= ~(terminated | truncated)
        return ep_return.tolist(), ep_length.tolist(), calls
    finally:
        envs.close()


class EpisodeHistory:
    """The last ``length`` (state, return-to-go) steps of ``n`` episodes that started together (no autoreset).

    ``of(rows)`` -> (states [R, K, S], returns-to-go [R, K]) with K = min(steps so far, length), or None when
    ``length`` is 0; ``push(states [n, S], returns_to_go [n])`` appends one step of every episode.
    """

    def __init__(self, n: int, obs_dim: int, length: int) -> None:
        self.length = length
        self.states = np.zeros((n, 0, obs_dim))
        self.returns_to_go = np.zeros((n, 0))

    def of(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        if self.length == 0:
            return None
        return self.states[rows], self.returns_to_go[rows]

    def push(self, states: np.ndarray, returns_to_go: np.ndarray) -> None:
        if self.length == 0:
            return
        self.states = np.concatenate([self.states, states[:, None]], axis=1)[:, -self.length:]
        self.returns_to_go = np.concatenate([self.returns_to_go, returns_to_go[:, None]], axis=1)[:, -self.length:]


def _check_env_match(policy: OfflinePolicy, env_id: str) -> None:
    """Refuse evaluating a policy trained on another env (compared by family: 'Hopper-v5' ~ 'hopper')."""
    if policy.env_id is None:
        return
    family = policy.env_id.split("-", 1)[0].split("/")[-1].lower()
    if family != env_id.split("-", 1)[0].split("/")[-1].lower():
        raise ValueError(f"the policy was trained on data from '{policy.env_id}', cannot evaluate it in '{env_id}'")


def _check_spaces(policy: OfflinePolicy, envs: gym.vector.VectorEnv) -> None:
    obs_shape, act_shape = envs.single_observation_space.shape, envs.single_action_space.shape
    if obs_shape != (policy.obs_dim,) or act_shape != (policy.act_dim,):
        raise ValueError(f"env has observations {obs_shape} and actions {act_shape}, but the policy expects "
                         f"({policy.obs_dim},) and ({policy.act_dim},)")


def _mean_se(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt(n); 0 for one value)."""
    se = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
    return float(values.mean()), se


def _summary(env_id: str, returns: np.ndarray) -> dict[str, Any]:
    mean, se = _mean_se(returns)
    out: dict[str, Any] = {"returns": returns.tolist(), "return_mean": mean, "return_se": se,
                           "scores": None, "score_mean": None, "score_se": None}
    if env_id.split("-", 1)[0].split("/")[-1].lower() in D4RL_REF_SCORES:
        scores = np.atleast_1d(d4rl_normalized_score(env_id.split("/")[-1], returns))
        out["scores"] = scores.tolist()
        out["score_mean"], out["score_se"] = _mean_se(scores)
    return out


def decision_latency(policy: OfflinePolicy, obs_dim: int, n: int = 100, *, warmup: int = 5,
                     seed: int = 0) -> dict[str, float]:
    """Wall time of one decision at batch 1: ``{"median_ms", "p99_ms", "mean_ms", "n", "nfe", "times_ms"}``
    (``times_ms`` holds every timed call, so runs can be pooled).

    Times ``n`` calls of :meth:`OfflineAgent.act` on random observations [1, obs_dim] (after ``warmup``
    untimed calls), with a full random history when the policy reads one (``history_length``), synchronising
    CUDA around each call when the policy runs there.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    agent = OfflineAgent(policy, seed=seed)
    rng = np.random.default_rng(seed)
    obs = rng.standard_normal((n + warmup, 1, obs_dim))
    k = policy.history_length
    history = (rng.standard_normal((1, k, obs_dim)), np.full((1, k), policy.default_return)) if k else None
    cuda = policy.device.type == "cuda"
    times = []
    for i in range(n + warmup):
        if cuda:
            torch.cuda.synchronize(policy.device)
        t0 = time.perf_counter()
        agent.act(obs[i], history=history)
        if cuda:
            torch.cuda.synchronize(policy.device)
        if i >= warmup:
            times.append(1e3 * (time.perf_counter() - t0))
    ms = np.asarray(times)
    return {"median_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "n": n, "nfe": policy.nfe, "times_ms": times}
