"""D4RL-format datasets for the MuJoCo v5 envs, built the way D4RL built its locomotion levels.

Levels (``LEVELS``):

- ``random``: a randomly initialised SAC actor (D4RL's "randomly initialized policy"), sampled.
- ``medium``: the behaviour run's medium snapshot (stochastic return closest to 1/3 of the expert's). With
  ``medium_return``, the run is instead stopped early, as D4RL stopped its medium runs, once a snapshot reaches
  that return (see ``train_until_medium``): ``medium`` and ``medium-replay`` then need no finished run.
- ``expert``: the behaviour run's final snapshot.
- ``medium-replay``: the behaviour run's training transitions up to the medium snapshot (its size is
  set by that step, not by ``n_steps``).
- ``medium-expert``: ``medium`` then ``expert`` (``n_steps`` each), concatenated.
- ``quick``: ``medium`` from a tiny behaviour run (``SACConfig.quick``), 2,000 steps: a file for tests.

Actions: like D4RL's medium/expert datasets, the policies *sample* their actions
(``tanh(mu + std * noise)``), they are not the deterministic mean.

Episode ``k`` of a part resets its env and draws its action noise from ``SeedSequence([seed, part, k])``,
so the data does not depend on how many envs run side by side (up to float rounding of batched matmuls).
Rollouts append finished episodes, in episode order, to ``<out>.<part>.partial.h5`` every few thousand
steps; an interrupted collection resumes from the episodes already there. The final file is written by
``trajgen.data.write_d4rl`` (validated, atomic) and the partial files are removed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np
import torch

from trajgen.data.d4rl import D4RLDataset, load_d4rl, write_d4rl
from trajgen.envs.mujoco.behaviour import (
    BehaviourRun,
    SACConfig,
    TanhGaussianActor,
    _progress_bar,
    episode_seeds,
    train_behaviour,
    train_until_medium,
)
from trajgen.envs.mujoco.envs import ENV_IDS, env_name
from trajgen.envs.mujoco.references import reference_returns

LEVELS = ("random", "medium", "expert", "medium-replay", "medium-expert", "quick")
DEFAULT_STEPS = 1_000_000
QUICK_STEPS = 2_000
_PART_STREAM = {"random": 0, "medium": 1, "expert": 2}
_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations", "infos/qpos",
         "infos/qvel")
_FLUSH_EVERY = 10_000


def default_policy_dir(env: str, quick: bool = False) -> Path:
    """``runs/behaviour/<env>`` (``<env>-quick`` for the tiny run), relative to the working directory."""
    return Path("runs") / "behaviour" / f"{env_name(env)}{'-quick' if quick else ''}"


def collect_mujoco(env: str, level: str, out: str | os.PathLike, *, n_steps: int | None = None, seed: int = 0,
                   policy_dir: str | os.PathLike | None = None, quick: bool = False, progress: bool = False,
                   n_envs: int = 8, train_missing: bool = True, medium_return: float | str | None = None) -> Path:
    """Collect one D4RL-format dataset and write it to ``out``.

    Args:
        env: ``hopper``, ``halfcheetah``, ``walker2d`` or their Gymnasium ids.
        level: one of ``LEVELS``.
        out: destination ``.hdf5``.
        n_steps: transitions per policy part (default 1,000,000 as D4RL; 2,000 with ``quick``).
        seed: collection seed (episode seeds, and the random actor's weights).
        policy_dir: the behaviour run directory (default ``default_policy_dir(env, quick)``).
        quick: use the tiny behaviour run (``SACConfig.quick``) and small default ``n_steps``.
        progress: rich progress bars for training and collection.
        n_envs: envs stepped side by side (one batched actor call per step).
        train_missing: train (or resume) the behaviour run when ``policy_dir`` has no finished one;
            otherwise that is a FileNotFoundError. Full runs take hours (1M SAC steps).
        medium_return: stop the behaviour run early at this stochastic return and take the medium policy there
            (levels ``medium`` and ``medium-replay`` only); ``"reference"`` is a third of trajgen's reference
            expert return for ``env`` (``reference_returns(env, "trajgen")``). None: the finished run's medium.

    Returns:
        ``out`` as a Path. File attributes: ``env`` (Gymnasium id), ``policy``, ``seed``, ``level``,
        ``actions`` ("stochastic"), ``behaviour_steps`` (snapshot step(s)), ``n_steps``.
    """
    short = env_name(env)
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; expected one of {', '.join(LEVELS)}")
    if level == "quick":
        level, quick = "medium", True
    if n_steps is None:
        n_steps = QUICK_STEPS if quick else DEFAULT_STEPS
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    if medium_return is not None and level not in ("medium", "medium-replay"):
        raise ValueError(f"medium_return applies to the levels medium and medium-replay (the others need the "
                         f"finished run's expert), got level={level!r}")
    out = Path(out)
    config = SACConfig.quick(short) if quick else SACConfig(env=short)
    attrs = {"level": level, "actions": "stochastic", "n_steps": int(n_steps), "quick": bool(quick)}

    if level == "random":
        actor = random_actor(short, seed, config.hidden_sizes)
        data = _rollouts(short, actor, n_steps, seed, "random", out, progress, n_envs)
        path = write_d4rl(out, data, env=ENV_IDS[short], policy="sac-random-init", seed=seed,
                          hidden_sizes=list(config.hidden_sizes), **attrs)
        _partial_path(out, "random").unlink(missing_ok=True)
        return path

    run_dir = Path(policy_dir) if policy_dir else default_policy_dir(short, quick)
    if medium_return is None:
        run = _behaviour(config, run_dir, progress, train_missing)
        policy_attrs = {"expert_return": run.expert.return_stochastic}
    else:
        target = _medium_target(short, medium_return)
        run = train_until_medium(config, run_dir, target, progress=progress, train_missing=train_missing)
        policy_attrs = {"medium_target_return": target, "behaviour_stopped_at": run.extra["stopped_at_step"]}
    medium = run.medium
    policy_attrs.update(behaviour_run=str(run.run_dir), medium_return=medium.return_stochastic)
    if level == "medium-replay":
        data = run.replay(until_step=medium.step)
        data["timeouts"][-1] |= ~data["terminals"][-1]           # the episode running at the cut ends there
        attrs.update(n_steps=len(data["rewards"]), actions="sac training (uniform warm-up, then sampled)")
        return write_d4rl(out, data, env=ENV_IDS[short], policy="sac-replay", seed=run.config.seed,
                          behaviour_steps=[medium.step], **policy_attrs, **attrs)
    parts = {"medium": ["medium"], "expert": ["expert"], "medium-expert": ["medium", "expert"]}[level]
    datas = [_rollouts(short, run.actor(part), n_steps, seed, part, out, progress, n_envs) for part in parts]
    data = {k: np.concatenate([d[k] for d in datas]) for k in _KEYS}
    steps = [medium.step if part == "medium" else run.expert.step for part in parts]
    path = write_d4rl(out, data, env=ENV_IDS[short], policy=f"sac-{level}", seed=seed, behaviour_steps=steps,
                      **policy_attrs, **attrs)
    for part in parts:
        _partial_path(out, part).unlink(missing_ok=True)
    return path


def load_mujoco_dataset(path: str | os.PathLike, env: str, **kwargs: bool) -> D4RLDataset:
    """``load_d4rl`` plus a check that the file was recorded in ``env`` (short name or Gymnasium id).

    Raises ValueError naming both envs when the file's ``env`` attribute names another env; files
    without the attribute (original D4RL downloads) load with load_d4rl's warning.
    """
    short = env_name(env)
    data = load_d4rl(path, **kwargs)
    recorded = data.metadata.get("env")
    if recorded is not None:
        try:
            recorded_short = env_name(str(recorded))
        except ValueError:
            recorded_short = str(recorded)
        if recorded_short != short:
            raise ValueError(f"{path}: dataset was recorded in env '{recorded}' but env '{ENV_IDS[short]}' "
                             f"({short}) was requested")
    else:
        load_d4rl(path, env=ENV_IDS[short], **kwargs)           # emits load_d4rl's "cannot check" warning
    return data


def random_actor(env: str, seed: int, hidden_sizes: tuple[int, ...] = (256, 256)) -> TanhGaussianActor:
    """A freshly initialised SAC actor (PyTorch's default init, as SB3's), weights drawn from ``seed``."""
    probe = gym.make(ENV_IDS[env_name(env)])
    obs_dim, act_dim = probe.observation_space.shape[0], probe.action_space.shape[0]
    probe.close()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TanhGaussianActor(obs_dim, act_dim, hidden_sizes).eval()


def _medium_target(env: str, medium_return: float | str) -> float:
    """``medium_return`` as a return: a number, or ``"reference"`` = a third of trajgen's reference expert."""
    if medium_return == "reference":
        return reference_returns(env, "trajgen")[1] / 3.0
    try:
        target = float(medium_return)
    except (TypeError, ValueError) as e:
        raise ValueError(f"medium_return must be a return or 'reference', got {medium_return!r}") from e
    if not np.isfinite(target):
        raise ValueError(f"medium_return must be finite, got {medium_return!r}")
    return target


def _behaviour(config: SACConfig, run_dir: Path, progress: bool, train_missing: bool) -> BehaviourRun:
    if not train_missing and not (run_dir / "behaviour.json").is_file():
        raise FileNotFoundError(f"{run_dir}: no finished behaviour run; pass train_missing=True or train it with "
                                "trajgen.envs.mujoco.train_behaviour")
    if (run_dir / "behaviour.json").is_file():
        from trajgen.envs.mujoco.behaviour import load_behaviour

        return load_behaviour(run_dir, env=config.env)
    run = train_behaviour(config, run_dir, progress=progress)
    assert run is not None
    return run


# ----------------------------------------------------------------------------------------------------
# rollouts with a resumable partial file
# ----------------------------------------------------------------------------------------------------


def _partial_path(out: Path, part: str) -> Path:
    return out.with_name(f"{out.name}.{part}.partial.h5")


class _PartialFile:
    """Append-only episode store: ``<out>.<part>.partial.h5`` with resizable datasets and a signature."""

    def __init__(self, path: Path, signature: dict) -> None:
        self.path = path
        sig = json.dumps(signature, sort_keys=True)
        if path.is_file():
            with h5py.File(path, "r") as f:
                if f.attrs.get("signature") != sig:
                    raise ValueError(f"{path}: partial collection from different settings "
                                     f"({f.attrs.get('signature')} vs {sig}); delete it to start over")
                self.episodes, self.rows = int(f.attrs["episodes"]), int(f.attrs["rows"])
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with h5py.File(tmp, "w") as f:
            f.attrs.update({"signature": sig, "episodes": 0, "rows": 0})
        os.replace(tmp, path)
        self.episodes, self.rows = 0, 0

    def append(self, episodes: list[dict[str, np.ndarray]]) -> None:
        """Append whole episodes; the counters are updated last, so a kill mid-write loses only this batch."""
        if not episodes:
            return
        data = {k: np.concatenate([e[k] for e in episodes]) for k in _KEYS}
        n = len(data["rewards"])
        with h5py.File(self.path, "a") as f:
            for k, a in data.items():
                if k not in f:
                    f.create_dataset(k, shape=(0, *a.shape[1:]), maxshape=(None, *a.shape[1:]), dtype=a.dtype,
                                     chunks=(min(_FLUSH_EVERY, 4096), *a.shape[1:]))
                f[k].resize(self.rows + n, axis=0)
                f[k][self.rows:self.rows + n] = a
            f.flush()
            self.episodes, self.rows = self.episodes + len(episodes), self.rows + n
            f.attrs["episodes"], f.attrs["rows"] = self.episodes, self.rows

    def read(self) -> dict[str, np.ndarray]:
        with h5py.File(self.path, "r") as f:
            return {k: f[k][: self.rows] for k in _KEYS}


def _rollouts(env: str, actor: TanhGaussianActor, n_steps: int, seed: int, part: str, out: Path,
              progress: bool, n_envs: int) -> dict[str, np.ndarray]:
    """``n_steps`` transitions of ``actor`` (sampled actions), whole episodes in order, the last cut with a
    timeout. Resumes from ``<out>.<part>.partial.h5``. Returns the D4RL arrays ``[n_steps, ...]``."""
    store = _PartialFile(_partial_path(out, part), {"env": env, "part": part, "seed": seed, "n_steps": n_steps,
                                                    "actor": _fingerprint(actor)})
    with _progress_bar(progress, n_steps, f"collect {env} {part}", min(store.rows, n_steps)) as advance:
        runner = _EpisodeRunner(env, actor, seed, _PART_STREAM[part], n_envs, first_episode=store.episodes)
        pending: list[dict[str, np.ndarray]] = []
        pending_rows = 0
        while store.rows + pending_rows < n_steps:
            episode = runner.next_episode()
            keep = min(len(episode["rewards"]), n_steps - store.rows - pending_rows)
            if keep < len(episode["rewards"]):
                episode = {k: v[:keep] for k, v in episode.items()}
                episode["timeouts"][-1] = not episode["terminals"][-1]
            pending.append(episode)
            pending_rows += keep
            if pending_rows >= _FLUSH_EVERY or store.rows + pending_rows >= n_steps:
                store.append(pending)
                pending, pending_rows = [], 0
                advance(store.rows)
    return store.read()


class _EpisodeRunner:
    """Runs episodes ``first_episode, first_episode + 1, ...`` in ``n_envs`` slots; yields them in order."""

    def __init__(self, env: str, actor: TanhGaussianActor, seed: int, stream: int, n_envs: int,
                 first_episode: int) -> None:
        self.envs = [gym.make(ENV_IDS[env]) for _ in range(n_envs)]
        self.actor, self.seed, self.stream = actor, seed, stream
        self.act_dim = self.envs[0].action_space.shape[0]
        self.next_index = first_episode                     # next episode to start
        self.next_out = first_episode                       # next episode to hand out
        self.done: dict[int, dict[str, np.ndarray]] = {}
        self.slots: list[dict | None] = [self._start(e) for e in self.envs]

    def next_episode(self) -> dict[str, np.ndarray]:
        """The next episode in index order: D4RL keys, arrays ``[T, ...]``."""
        while self.next_out not in self.done:
            self._step_all()
        episode = self.done.pop(self.next_out)
        self.next_out += 1
        return episode

    def _start(self, env: gym.Env) -> dict:
        rng = np.random.default_rng(episode_seeds(self.seed, self.stream, self.next_index))
        obs, _ = env.reset(seed=int(rng.integers(2**31)))
        slot = {"index": self.next_index, "rng": rng, "obs": obs, "rows": []}
        self.next_index += 1
        return slot

    def _step_all(self) -> None:
        obs = np.stack([s["obs"] for s in self.slots])
        noise = np.stack([s["rng"].standard_normal(self.act_dim) for s in self.slots])
        actions = self.actor.act(obs, noise)
        for i, (env, slot, action) in enumerate(zip(self.envs, self.slots, actions)):
            data = env.unwrapped.data
            qpos, qvel = data.qpos.copy(), data.qvel.copy()
            next_obs, reward, terminated, truncated, _ = env.step(action)
            slot["rows"].append((slot["obs"], action, reward, terminated, truncated and not terminated, next_obs,
                                 qpos, qvel))
            slot["obs"] = next_obs
            if terminated or truncated:
                self.done[slot["index"]] = _episode_arrays(slot["rows"])
                self.slots[i] = self._start(env)


def _episode_arrays(rows: list[tuple]) -> dict[str, np.ndarray]:
    cols = list(zip(*rows))
    dtypes = (np.float32, np.float32, np.float32, bool, bool, np.float32, np.float64, np.float64)
    return {k: np.asarray(c, dtype=d) for k, c, d in zip(_KEYS, cols, dtypes)}


def _fingerprint(actor: TanhGaussianActor) -> str:
    """A short checksum of the actor's weights (a partial file from another policy is refused)."""
    with torch.no_grad():
        total = sum(float(p.double().abs().sum()) for p in actor.parameters())
    return f"{total:.10e}"

