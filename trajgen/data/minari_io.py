"""Minari datasets as D4RL-layout arrays (the same ``D4RLDataset`` that ``load_d4rl`` returns).

Needs the optional ``minari`` package (``pip install 'trajgen[minari]'``). Only local datasets are read:
nothing is ever downloaded.

Mapping of one Minari episode of ``T`` steps (observations ``[T+1, D]``) to D4RL rows::

    observations       = observations[:-1]          next_observations = observations[1:]
    actions, rewards   = actions, rewards           terminals = terminations
    timeouts           = truncations & ~terminations, and the last step of an episode that ends with
                         neither flag (a collection cut short) is marked as a timeout
    infos/qpos, qvel   = infos["qpos"][:-1], infos["qvel"][:-1] when the dataset recorded them (Minari's
                         infos have T+1 rows, row 0 from reset, so row t is the state of observation t)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from trajgen.data.d4rl import D4RLDataset, _check_arrays, _check_episodes


def _import_minari() -> Any:
    try:
        import minari
    except ImportError as e:
        raise ImportError("reading Minari datasets needs the optional 'minari' package: "
                          "pip install 'trajgen[minari]' (or pip install minari)") from e
    return minari


def load_minari(dataset: str | os.PathLike, *, env: str | None = None,
                datasets_path: str | os.PathLike | None = None) -> D4RLDataset:
    """Read a local Minari dataset into D4RL-layout arrays (mapping in the module docstring).

    Args:
        dataset: a dataset id (``"trajgen/hopper-medium-v0"``), looked up under ``datasets_path``, else
            ``$MINARI_DATASETS_PATH``, else ``~/.minari/datasets``; or the path of a dataset directory
            (the one holding ``data/``) or of its ``data/`` directory.
        env: if given, the dataset's env id must equal it, or its name before ``-v`` lower-cased must
            (``"hopper"`` matches ``"Hopper-v5"``); ValueError naming both otherwise.
        datasets_path: root directory of local Minari datasets.

    Returns:
        A ``D4RLDataset`` with ``next_observations`` (and ``qpos``/``qvel`` when recorded in infos);
        ``metadata`` holds ``env`` (the env id, if the dataset has a spec), ``minari_id`` and ``source``.

    Raises:
        ImportError: minari is not installed (the message says how to install it).
        FileNotFoundError: no such local dataset.
        TypeError: non-Box (dict/tuple) observations or actions.
        ValueError: wrong env, or arrays failing D4RL validation.
    """
    minari = _import_minari()
    data_path = _resolve_data_path(dataset, datasets_path)
    ds = minari.MinariDataset(str(data_path))
    env_id = ds.spec.env_spec.id if ds.spec.env_spec is not None else None
    _check_env(str(dataset), env_id, env)
    episodes = [_episode_rows(ep, str(dataset)) for ep in ds.iterate_episodes()]
    if not episodes:
        raise ValueError(f"{dataset}: Minari dataset has no episodes")
    keys = set.intersection(*(set(e) for e in episodes))
    arrays = _check_arrays({k: np.concatenate([e[k] for e in episodes]) for k in keys}, str(dataset))
    _check_episodes(arrays, str(dataset), allow_truncated_end=False)
    metadata: dict[str, Any] = {"minari_id": ds.spec.dataset_id, "source": "minari"}
    if env_id is not None:
        metadata["env"] = env_id
    return D4RLDataset(
        observations=arrays["observations"], actions=arrays["actions"], rewards=arrays["rewards"],
        terminals=arrays["terminals"], timeouts=arrays["timeouts"], next_observations=arrays["next_observations"],
        qpos=arrays.get("infos/qpos"), qvel=arrays.get("infos/qvel"), metadata=metadata,
    )


def _resolve_data_path(dataset: str | os.PathLike, datasets_path: str | os.PathLike | None) -> Path:
    """The ``data/`` directory of ``dataset`` (an id or a path)."""
    candidates = [Path(dataset), Path(dataset) / "data"]
    root = datasets_path or os.environ.get("MINARI_DATASETS_PATH") or Path.home() / ".minari" / "datasets"
    candidates.append(Path(root) / str(dataset) / "data")
    for path in candidates:
        if path.name == "data" and path.is_dir():
            return path
    raise FileNotFoundError(f"Minari dataset {str(dataset)!r} not found locally (looked in "
                            f"{', '.join(str(c) for c in candidates)}); trajgen never downloads datasets")


def _check_env(source: str, env_id: str | None, env: str | None) -> None:
    if env is None:
        return
    if env_id is None:
        raise ValueError(f"{source}: Minari dataset records no env spec; cannot check that it is for '{env}'")
    if env != env_id and env.lower() != env_id.split("-v")[0].lower():
        raise ValueError(f"{source}: Minari dataset was recorded in env '{env_id}' but env='{env}' was requested")


def _episode_rows(ep: Any, source: str) -> dict[str, np.ndarray]:
    """One Minari ``EpisodeData`` -> D4RL arrays ``[T, ...]``."""
    obs, actions = ep.observations, ep.actions
    if not isinstance(obs, np.ndarray) or not isinstance(actions, np.ndarray):
        raise TypeError(f"{source}: episode {ep.id} has non-array observations or actions (dict/tuple spaces "
                         "are not supported by the D4RL layout)")
    t = len(ep.rewards)
    obs = obs.reshape(t + 1, -1)
    terminals = np.asarray(ep.terminations, dtype=bool)
    timeouts = np.asarray(ep.truncations, dtype=bool) & ~terminals
    if not (terminals[-1] or timeouts[-1]):
        timeouts[-1] = True
    rows = {"observations": obs[:-1], "next_observations": obs[1:], "actions": actions.reshape(t, -1),
            "rewards": np.asarray(ep.rewards), "terminals": terminals, "timeouts": timeouts}
    for key in ("qpos", "qvel"):
        value = ep.infos.get(key) if isinstance(ep.infos, dict) else None
        if isinstance(value, np.ndarray) and len(value) == t + 1:
            rows[f"infos/{key}"] = value[:-1].reshape(t, -1)
    return rows
