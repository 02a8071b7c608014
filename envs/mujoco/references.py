"""Reference returns for normalised scores: D4RL's published ones and trajgen's own for the v5 envs.

D4RL's normalised score is ``100 (R - R_random) / (R_expert - R_random)``. D4RL's references were measured
on the v0-v2 envs (mujoco-py); the Gymnasium v5 envs differ (MuJoCo 3+, reset noise, contact model), so
trajgen also measures its own: ``random`` = mean return of uniform random actions in [-1, 1] over
``episodes`` episodes, ``expert`` = mean return of the behaviour run's expert (the final SAC snapshot,
sampling its actions, as in the expert dataset). ``write_references`` stores them in ``references.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from trajgen.data.d4rl import D4RL_REF_SCORES
from trajgen.envs.mujoco.behaviour import episode_seeds, evaluate_actor, load_behaviour
from trajgen.envs.mujoco.envs import ENV_IDS, env_name

REFERENCES_PATH = Path(__file__).with_name("references.json")
"""trajgen's measured references, shipped next to this module (regenerate with ``write_references``)."""
REFERENCE_KINDS = ("d4rl", "trajgen")
_RANDOM_STREAM, _EXPERT_STREAM = 100, 101


def measure_references(env: str, *, policy_dir: str | os.PathLike | None = None, episodes: int = 100,
                       seed: int = 0) -> dict[str, Any]:
    """Measure trajgen's reference returns for one env.

    Args:
        env: short name or Gymnasium id.
        policy_dir: a finished behaviour run; without it only the random reference is measured.
        episodes: episodes per reference (>= 1; D4RL-style references use >= 100).
        seed: episode seeds are ``SeedSequence([seed, stream, j])``.

    Returns:
        ``{"gym_id", "random", "random_se", "episodes", "seed"}`` plus ``"expert"``, ``"expert_se"``,
        ``"expert_policy"`` when ``policy_dir`` is given (``*_se``: standard error of the mean).
    """
    short = env_name(env)
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    random_returns = evaluate_actor(short, None, [episode_seeds(seed, _RANDOM_STREAM, j) for j in range(episodes)],
                                    deterministic=False)
    out: dict[str, Any] = {"gym_id": ENV_IDS[short], "episodes": episodes, "seed": seed,
                           "random": float(random_returns.mean()), "random_se": _se(random_returns)}
    if policy_dir is not None:
        run = load_behaviour(policy_dir, env=short)
        expert_returns = evaluate_actor(short, run.actor("expert"),
                                        [episode_seeds(seed, _EXPERT_STREAM, j) for j in range(episodes)],
                                        deterministic=False)
        out.update(expert=float(expert_returns.mean()), expert_se=_se(expert_returns),
                   expert_policy=f"{run.run_dir} step {run.expert.step}")
    return out


def write_references(envs: dict[str, str | os.PathLike | None], *, path: str | os.PathLike = REFERENCES_PATH,
                     episodes: int = 100, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Measure ``{env: policy_dir or None}`` and merge the results into the JSON file at ``path``.

    An env measured without a policy keeps an expert value already in the file. Returns the whole file.
    """
    path = Path(path)
    table = load_references(path) if path.is_file() else {}
    for env, policy_dir in envs.items():
        short = env_name(env)
        entry = measure_references(short, policy_dir=policy_dir, episodes=episodes, seed=seed)
        old = table.get(short, {})
        if policy_dir is None and "expert" in old:
            entry.update({k: old[k] for k in ("expert", "expert_se", "expert_policy") if k in old})
        table[short] = entry
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return table


def load_references(path: str | os.PathLike = REFERENCES_PATH) -> dict[str, dict[str, Any]]:
    """The references JSON: ``{env short name: entry of measure_references}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no references file; write it with write_references")
    return json.loads(path.read_text())


def reference_returns(env: str, reference: str = "d4rl",
                      path: str | os.PathLike = REFERENCES_PATH) -> tuple[float, float]:
    """``(R_random, R_expert)`` for ``env`` from D4RL's table (``"d4rl"``) or trajgen's file (``"trajgen"``)."""
    short = env_name(env)
    if reference == "d4rl":
        return D4RL_REF_SCORES[short]
    if reference != "trajgen":
        raise ValueError(f"reference must be one of {REFERENCE_KINDS}, got {reference!r}")
    entry = load_references(path).get(short)
    if entry is None or "expert" not in entry:
        have = "random only" if entry else "nothing"
        raise ValueError(f"{path}: trajgen references for '{short}' have {have}; measure the expert with "
                         f"write_references({{'{short}': <behaviour run dir>}})")
    return float(entry["random"]), float(entry["expert"])


def normalized_score(env: str, returns: float | np.ndarray, reference: str = "d4rl",
                     path: str | os.PathLike = REFERENCES_PATH) -> float | np.ndarray:
    """``100 (R - R_random) / (R_expert - R_random)`` with the chosen references; same shape as ``returns``."""
    lo, hi = reference_returns(env, reference, path)
    score = 100.0 * (np.asarray(returns, dtype=np.float64) - lo) / (hi - lo)
    return float(score) if score.ndim == 0 else score


def _se(x: np.ndarray) -> float:
    return float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0
