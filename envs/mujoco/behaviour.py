"""SAC behaviour policies for D4RL-style datasets, trained with stable-baselines3 and resumable after a kill.

D4RL built its MuJoCo levels from one SAC run per env: ``expert`` = the converged policy, ``medium`` = a
snapshot at about a third of the expert's return, ``medium-replay`` = the replay buffer up to that snapshot.
``train_behaviour`` produces all three from one run directory::

    <run_dir>/
        config.json                 the SACConfig
        checkpoints/latest          name of the newest complete checkpoint
        checkpoints/step_<9 digits>/
            policy.safetensors      SB3 policy weights (actor, critics, target critics)
            optim.pt                optimizer states, log entropy coefficient, torch RNG (weights_only=True)
            state.json              counters, numpy/python/env RNG states, MuJoCo integration state, snapshots
        replay/rows_<start>_<end>.npz   append-only chunks of every training transition (+ qpos/qvel)
        snapshots/step_<9 digits>.safetensors   actor weights (TanhGaussianActor) every snapshot_every steps
        behaviour.json              written at the end: snapshots with returns, expert and medium choice

Nothing is loaded from SB3's pickle-based ``.zip``: a resumed run rebuilds the SAC from the config and
loads the weights, optimizer states, replay rows and every random state, so resuming continues the
interrupted run exactly (same weights as an uninterrupted run, bit for bit, on the same machine).
``TanhGaussianActor`` runs a snapshot without SB3.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import safetensors.torch
import torch
from torch import Tensor, nn

from trajgen.envs.mujoco.envs import ENV_IDS, env_name, get_sim_state, observation_of, set_sim_state

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0
"""SB3's clamp on the SAC actor's log standard deviation."""
_STEP_DIR = re.compile(r"^step_(\d{9})$")
_ROWS_FILE = re.compile(r"^rows_(\d{9})_(\d{9})\.npz$")


# ----------------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------------


@dataclass
class SACConfig:
    """Hyperparameters of one behaviour run (SB3 SAC defaults of the D4RL-era MuJoCo setups)."""

    env: str = "hopper"
    """short name or Gymnasium id, see ``ENV_IDS``."""
    total_steps: int = 1_000_000
    """environment steps of training (one gradient step per env step after ``learning_starts``)."""
    learning_starts: int = 10_000
    """uniform-random warm-up steps before the first update."""
    batch_size: int = 256
    learning_rate: float = 3e-4
    gamma: float = 0.99
    tau: float = 0.005
    hidden_sizes: tuple[int, ...] = (256, 256)
    """actor and critic MLP widths."""
    snapshot_every: int = 10_000
    """steps between actor snapshots (each evaluated); the medium policy is one of them."""
    checkpoint_every: int = 50_000
    """steps between resumable checkpoints; a multiple of ``snapshot_every``."""
    eval_episodes: int = 5
    """episodes per snapshot evaluation, for the stochastic and the deterministic policy each."""
    seed: int = 0
    torch_threads: int = 1
    """intra-op threads for training (small MLPs gain nothing from more)."""
    device: str = "cpu"
    """where SB3 trains ("cpu", "cuda"); resuming repeats a run bit for bit only on the CPU it ran on."""

    def __post_init__(self) -> None:
        self.env = env_name(self.env)
        self.hidden_sizes = tuple(int(h) for h in self.hidden_sizes)
        for name in ("total_steps", "batch_size", "snapshot_every", "checkpoint_every", "eval_episodes",
                     "torch_threads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"SACConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_every % self.snapshot_every:
            raise ValueError(f"SACConfig.checkpoint_every ({self.checkpoint_every}) must be a multiple of "
                             f"snapshot_every ({self.snapshot_every})")
        if not self.hidden_sizes or min(self.hidden_sizes) < 1:
            raise ValueError(f"SACConfig.hidden_sizes must be positive widths, got {self.hidden_sizes}")

    @classmethod
    def quick(cls, env: str = "hopper", seed: int = 0) -> SACConfig:
        """A tiny run for tests and smoke checks (seconds): 600 steps, 32-unit nets."""
        return cls(env=env, total_steps=600, learning_starts=200, batch_size=32, hidden_sizes=(32, 32),
                   snapshot_every=150, checkpoint_every=300, eval_episodes=2, seed=seed)


# ----------------------------------------------------------------------------------------------------
# the actor, without SB3
# ----------------------------------------------------------------------------------------------------


class TanhGaussianActor(nn.Module):
    """SAC's actor as SB3 builds it: ``a = tanh(mu(h) + exp(log_std(h)) * noise)``, ``h = MLP(obs)``.

    Parameter names equal SB3's ``policy.actor`` (``latent_pi.0``, ``latent_pi.2``, ..., ``mu``, ``log_std``),
    so an SB3 actor's state dict loads directly. Actions are in [-1, 1] (the envs' action bounds).
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden_sizes: Sequence[int] = (256, 256)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = obs_dim
        for h in hidden_sizes:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.latent_pi = nn.Sequential(*layers)
        self.mu = nn.Linear(width, act_dim)
        self.log_std = nn.Linear(width, act_dim)
        self.obs_dim, self.act_dim, self.hidden_sizes = obs_dim, act_dim, tuple(hidden_sizes)

    def forward(self, obs: Tensor, noise: Tensor | None = None) -> Tensor:
        """``obs [B, obs_dim]``, ``noise [B, act_dim]`` standard normal or None (deterministic) -> ``[B, act_dim]``."""
        if obs.ndim != 2 or obs.shape[1] != self.obs_dim:
            raise ValueError(f"obs must be [B, {self.obs_dim}], got {tuple(obs.shape)}")
        h = self.latent_pi(obs)
        mean = self.mu(h)
        if noise is None:
            return torch.tanh(mean)
        if noise.shape != mean.shape:
            raise ValueError(f"noise must be {tuple(mean.shape)}, got {tuple(noise.shape)}")
        log_std = self.log_std(h).clamp(LOG_STD_MIN, LOG_STD_MAX)
        return torch.tanh(mean + log_std.exp() * noise)

    @torch.no_grad()
    def act(self, obs: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        """numpy in, numpy out: ``obs [B, obs_dim]`` (float64 ok), ``noise [B, act_dim]`` or None -> ``[B, act_dim]``."""
        o = torch.as_tensor(np.asarray(obs), dtype=torch.float32)
        n = None if noise is None else torch.as_tensor(np.asarray(noise), dtype=torch.float32)
        return self(o, n).numpy().astype(np.float64)

    def save(self, path: str | os.PathLike, **metadata: Any) -> Path:
        """Weights as safetensors; the architecture and ``metadata`` go into the file's string metadata."""
        meta = {"obs_dim": str(self.obs_dim), "act_dim": str(self.act_dim),
                "hidden_sizes": json.dumps(list(self.hidden_sizes)), **{k: json.dumps(v) for k, v in metadata.items()}}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        safetensors.torch.save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(tmp), meta)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> tuple[TanhGaussianActor, dict[str, Any]]:
        """Rebuild from ``save``: returns the actor (eval mode) and the metadata passed to ``save``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such actor file")
        with safetensors.safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
        if not {"obs_dim", "act_dim", "hidden_sizes"} <= set(meta):
            raise ValueError(f"{path}: not a TanhGaussianActor file (metadata lacks obs_dim/act_dim/hidden_sizes)")
        actor = cls(int(meta.pop("obs_dim")), int(meta.pop("act_dim")), json.loads(meta.pop("hidden_sizes")))
        actor.load_state_dict(safetensors.torch.load_file(str(path)))
        return actor.eval(), {k: json.loads(v) for k, v in meta.items()}


def actor_from_sb3(model: Any) -> TanhGaussianActor:
    """Copy an SB3 SAC's actor into a ``TanhGaussianActor`` (eval mode)."""
    sb3_actor = model.policy.actor
    hidden = [m.out_features for m in sb3_actor.latent_pi if isinstance(m, nn.Linear)]
    actor = TanhGaussianActor(sb3_actor.features_dim, sb3_actor.mu.out_features, hidden)
    state = {k: v for k, v in sb3_actor.state_dict().items() if not k.startswith("features_extractor")}
    actor.load_state_dict({k: v.detach().clone().cpu() for k, v in state.items()})
    return actor.eval()


# ----------------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------------


def episode_seeds(*key: int) -> np.random.SeedSequence:
    """The seed sequence of one episode, from integers such as ``(seed, stream, episode)``."""
    return np.random.SeedSequence([int(k) for k in key])


def evaluate_actor(env: str, actor: TanhGaussianActor | None, seeds: Sequence[np.random.SeedSequence], *,
                   deterministic: bool) -> np.ndarray:
    """Undiscounted returns of one episode per seed, ``[len(seeds)]`` float64, all run in lockstep.

    Episode ``j`` resets its env with a seed drawn from ``seeds[j]`` and draws its action noise from a
    generator on ``seeds[j]``, so its return does not depend on which other episodes run beside it.
    ``actor=None`` acts uniformly at random in [-1, 1] (the random reference).
    """
    envs = [gym.make(ENV_IDS[env_name(env)]) for _ in seeds]
    rngs = [np.random.default_rng(s) for s in seeds]
    obs = np.stack([e.reset(seed=int(r.integers(2**31)))[0] for e, r in zip(envs, rngs)])
    act_dim = envs[0].action_space.shape[0]
    returns = np.zeros(len(envs))
    live = np.ones(len(envs), dtype=bool)
    while live.any():
        idx = np.flatnonzero(live)
        noise = np.stack([rngs[i].standard_normal(act_dim) for i in idx])
        if actor is None:
            actions = np.stack([rngs[i].uniform(-1.0, 1.0, act_dim) for i in idx])
        else:
            actions = actor.act(obs[idx], None if deterministic else noise)
        for i, a in zip(idx, actions):
            obs[i], r, terminated, truncated, _ = envs[i].step(a)
            returns[i] += r
            live[i] = not (terminated or truncated)
    for e in envs:
        e.close()
    return returns


# ----------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------


class _StateInInfo(gym.Wrapper):
    """Puts the simulator state *before* each step into ``info`` (the qpos/qvel of the observation acted on)."""

    def step(self, action: np.ndarray) -> tuple:
        data = self.env.unwrapped.data
        qpos, qvel = data.qpos.copy(), data.qvel.copy()
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, reward, terminated, truncated, {**info, "qpos": qpos, "qvel": qvel}


@dataclass
class Snapshot:
    """One evaluated actor snapshot."""

    step: int
    return_stochastic: float
    """mean return of the sampling policy (the actions a dataset of this snapshot holds)."""
    return_deterministic: float
    """mean return of tanh(mean action)."""
    path: str
    """file name under ``snapshots/``."""


@dataclass
class BehaviourRun:
    """A finished behaviour run (``behaviour.json``): its snapshots, the expert and the medium choice."""

    run_dir: Path
    config: SACConfig
    snapshots: list[Snapshot]
    medium_step: int
    medium_fraction: float = 1.0 / 3.0
    extra: dict[str, Any] = field(default_factory=dict)
    finished: bool = True
    """False for a run stopped early at its medium policy (:func:`train_until_medium`): it has no expert."""

    @property
    def expert(self) -> Snapshot:
        """The final snapshot (taken at ``total_steps``)."""
        if not self.finished:
            raise ValueError(f"{self.run_dir}: the run was stopped early at step {self.snapshots[-1].step} for its "
                             "medium policy; the expert needs the finished run (train_behaviour)")
        return self.snapshots[-1]

    @property
    def medium(self) -> Snapshot:
        return next(s for s in self.snapshots if s.step == self.medium_step)

    def actor(self, which: str | int) -> TanhGaussianActor:
        """``"expert"``, ``"medium"`` or a snapshot step -> that snapshot's actor."""
        snap = self.expert if which == "expert" else self.medium if which == "medium" else \
            next((s for s in self.snapshots if s.step == which), None)
        if snap is None:
            raise ValueError(f"no snapshot {which!r}; steps: {[s.step for s in self.snapshots]}")
        return TanhGaussianActor.load(self.run_dir / "snapshots" / snap.path)[0]

    def replay(self, until_step: int | None = None) -> dict[str, np.ndarray]:
        """The training transitions of rows ``[0, until_step)`` (all when None), D4RL keys, flat ``[N, ...]``."""
        return read_replay(self.run_dir, until_step)


def select_medium(snapshots: Sequence[Snapshot], fraction: float = 1.0 / 3.0) -> Snapshot:
    """The snapshot whose stochastic return is closest to ``fraction`` x the final snapshot's (the expert's).

    Candidates are the trained snapshots (step > 0; step 0 is the untrained actor and would leave
    medium-replay empty). Ties go to the earlier snapshot (less training, D4RL's early stopping).
    """
    trained = [s for s in snapshots if s.step > 0]
    if not trained:
        raise ValueError("no trained snapshots (step > 0) to choose the medium policy from")
    target = fraction * snapshots[-1].return_stochastic
    return min(trained, key=lambda s: (abs(s.return_stochastic - target), s.step))


def select_early_stopped_medium(snapshots: Sequence[Snapshot], target_return: float) -> Snapshot | None:
    """D4RL's early stopping: among the trained snapshots up to the first whose stochastic return reaches
    ``target_return``, the one closest to it (ties go to the earlier); None while no snapshot has reached it."""
    trained = [s for s in snapshots if s.step > 0]
    first = next((i for i, s in enumerate(trained) if s.return_stochastic >= target_return), None)
    if first is None:
        return None
    return min(trained[: first + 1], key=lambda s: (abs(s.return_stochastic - target_return), s.step))


def train_until_medium(config: SACConfig, run_dir: str | os.PathLike, target_return: float, *,
                       progress: bool = False, train_missing: bool = True) -> BehaviourRun:
    """Train (or resume) the run in ``run_dir`` one checkpoint stretch at a time until a snapshot's stochastic
    return reaches ``target_return``, then stop: D4RL trained its medium policies this way, stopping at about a
    third of the expert's return (e.g. ``reference_returns(env, "trajgen")[1] / 3``), without training the expert.

    The medium snapshot is :func:`select_early_stopped_medium`'s choice among the snapshots of the newest
    checkpoint, whose replay rows are on disk, so ``replay(until_step=medium_step)`` works. A finished run is used
    as it is. The returned run has ``finished=False`` unless the run had finished, and no expert then.

    Raises:
        ValueError: the run finished (``total_steps``) and no snapshot reached ``target_return``.
        FileNotFoundError: no snapshot has reached it yet and ``train_missing`` is False.
    """
    run_dir = Path(run_dir)
    _check_or_write_config(config, run_dir)
    while True:
        snapshots, step, finished = _trained_so_far(run_dir)
        medium = select_early_stopped_medium(snapshots, target_return)
        if medium is not None:
            info = {"medium_target_return": float(target_return), "stopped_at_step": step}
            return BehaviourRun(run_dir=run_dir, config=config, snapshots=snapshots, medium_step=medium.step,
                                extra=info, finished=finished)
        best = max((s.return_stochastic for s in snapshots), default=float("nan"))
        if finished:
            raise ValueError(f"{run_dir}: no snapshot of the finished run reached target_return={target_return} "
                             f"(best stochastic return {best:.1f})")
        if not train_missing:
            raise FileNotFoundError(f"{run_dir}: no snapshot up to step {step} reached target_return="
                                    f"{target_return} (best {best:.1f}); pass train_missing=True to train on")
        next_stop = (step // config.checkpoint_every + 1) * config.checkpoint_every
        train_behaviour(config, run_dir, progress=progress, stop_at=next_stop if next_stop < config.total_steps
                        else None)


def _trained_so_far(run_dir: Path) -> tuple[list[Snapshot], int, bool]:
    """(snapshots, step, finished): a finished run's snapshots, or an unfinished run's up to its newest checkpoint
    and that step (0: none yet)."""
    if (run_dir / "behaviour.json").is_file():
        snapshots = load_behaviour(run_dir).snapshots
        return snapshots, snapshots[-1].step, True
    latest = run_dir / "checkpoints" / "latest"
    if not latest.is_file():
        return [], 0, False
    state = json.loads((run_dir / "checkpoints" / latest.read_text().strip() / "state.json").read_text())
    return [Snapshot(**s) for s in state["snapshots"]], int(state["num_timesteps"]), False


def train_behaviour(config: SACConfig, run_dir: str | os.PathLike, *, progress: bool = False,
                    stop_at: int | None = None) -> BehaviourRun | None:
    """Train (or resume, or just load) the behaviour run in ``run_dir``.

    A finished run is loaded, a started one resumes from its newest checkpoint, else training starts.
    The config must equal the one stored in ``run_dir`` (ValueError naming the differing fields).

    Args:
        config: the run's hyperparameters.
        run_dir: the run directory (layout in the module docstring).
        progress: show a rich progress bar.
        stop_at: stop after the checkpoint at this step (must be a checkpoint step) and return None; the
            next call resumes. For budgeted sessions and tests.

    Returns:
        The ``BehaviourRun`` when training is complete, else None (stopped at ``stop_at``).
    """
    run_dir = Path(run_dir)
    if stop_at is not None and (stop_at % config.checkpoint_every or not 0 < stop_at < config.total_steps):
        raise ValueError(f"stop_at must be a checkpoint step (multiple of {config.checkpoint_every}) below "
                         f"total_steps={config.total_steps}, got {stop_at}")
    _check_or_write_config(config, run_dir)
    if (run_dir / "behaviour.json").is_file():
        return load_behaviour(run_dir)
    threads = torch.get_num_threads()
    try:
        trainer = _Trainer(config, run_dir)
        trainer.run(progress=progress, stop_at=stop_at)
    finally:
        torch.set_num_threads(threads)
    return None if stop_at is not None else load_behaviour(run_dir)


def load_behaviour(run_dir: str | os.PathLike, env: str | None = None) -> BehaviourRun:
    """Load a finished run's ``behaviour.json``; ``env`` (if given) must be the run's env."""
    run_dir = Path(run_dir)
    path = run_dir / "behaviour.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no finished behaviour run (behaviour.json missing); train it with "
                                "trajgen.envs.mujoco.train_behaviour(SACConfig(env=...), run_dir)")
    info = json.loads(path.read_text())
    config = _config_from_dict(info["config"])
    if env is not None and env_name(env) != config.env:
        raise ValueError(f"{run_dir}: behaviour run is for env '{config.env}' but env='{env_name(env)}' was requested")
    return BehaviourRun(run_dir=run_dir, config=config, snapshots=[Snapshot(**s) for s in info["snapshots"]],
                        medium_step=int(info["medium_step"]), medium_fraction=float(info["medium_fraction"]),
                        extra=info.get("extra", {}))


def _config_from_dict(d: dict[str, Any]) -> SACConfig:
    return SACConfig(**{**d, "hidden_sizes": tuple(d["hidden_sizes"])})


def _check_or_write_config(config: SACConfig, run_dir: Path) -> None:
    path = run_dir / "config.json"
    if path.is_file():
        stored = json.loads(json.dumps(asdict(_config_from_dict(json.loads(path.read_text())))))  # fills new fields
        mine = json.loads(json.dumps(asdict(config)))
        diff = sorted(k for k in set(stored) | set(mine) if stored.get(k) != mine.get(k))
        if diff:
            changes = "; ".join(f"{k}: stored {stored.get(k)!r} != {mine.get(k)!r}" for k in diff)
            raise ValueError(f"{run_dir}: existing run has a different config ({changes}); use another run_dir")
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_text(path, json.dumps(asdict(config), indent=1))


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class _QposRecorder:
    """SB3 callback body: keeps the pre-step qpos/qvel of every training transition since the last checkpoint."""

    def __init__(self) -> None:
        self.qpos: list[np.ndarray] = []
        self.qvel: list[np.ndarray] = []

    def callback(self) -> Any:
        from stable_baselines3.common.callbacks import BaseCallback

        recorder = self

        class _Callback(BaseCallback):
            def _on_step(self) -> bool:
                info = self.locals["infos"][0]
                recorder.qpos.append(info["qpos"])
                recorder.qvel.append(info["qvel"])
                return True

        return _Callback()


class _Trainer:
    """One SB3 SAC over one env, with checkpoint / resume by weights, optimizer states and RNG states."""

    def __init__(self, config: SACConfig, run_dir: Path) -> None:
        from stable_baselines3 import SAC
        from stable_baselines3.common.monitor import Monitor
        from stable_baselines3.common.vec_env import DummyVecEnv

        self.config, self.run_dir = config, run_dir
        torch.set_num_threads(config.torch_threads)
        gym_id = ENV_IDS[config.env]
        self.vec_env = DummyVecEnv([lambda: Monitor(_StateInInfo(gym.make(gym_id)))])
        self.model = SAC("MlpPolicy", self.vec_env, learning_rate=config.learning_rate,
                         buffer_size=config.total_steps, learning_starts=config.learning_starts,
                         batch_size=config.batch_size, tau=config.tau, gamma=config.gamma, train_freq=1,
                         gradient_steps=1, policy_kwargs={"net_arch": list(config.hidden_sizes)},
                         seed=config.seed, device=config.device, verbose=0)
        self.recorder = _QposRecorder()
        self.snapshots: list[Snapshot] = []
        self.rows_written = 0

    # --- loop -----------------------------------------------------------------------------------

    def run(self, *, progress: bool, stop_at: int | None) -> None:
        cfg = self.config
        self._resume()
        if self.model.num_timesteps == 0:
            self._snapshot()                                       # step 0: the randomly initialised actor
        with _progress_bar(progress, cfg.total_steps, f"SAC {cfg.env}", self.model.num_timesteps) as advance:
            while self.model.num_timesteps < cfg.total_steps:
                chunk = min(cfg.snapshot_every, cfg.total_steps - self.model.num_timesteps)  # never past the buffer
                self.model.learn(chunk, callback=self.recorder.callback(), reset_num_timesteps=False)
                self._snapshot()
                step = self.model.num_timesteps
                if step % cfg.checkpoint_every == 0 or step >= cfg.total_steps:
                    self._checkpoint()
                advance(step)
                if stop_at is not None and step >= stop_at:
                    return
        self._finish()

    def _snapshot(self) -> None:
        cfg, step = self.config, self.model.num_timesteps
        actor = actor_from_sb3(self.model)
        name = f"step_{step:09d}.safetensors"
        actor.save(self.run_dir / "snapshots" / name, env=cfg.env, step=step)
        seeds = [episode_seeds(cfg.seed, 1, step, j) for j in range(cfg.eval_episodes)]
        stochastic = evaluate_actor(cfg.env, actor, seeds, deterministic=False)
        deterministic = evaluate_actor(cfg.env, actor, seeds, deterministic=True)
        self.snapshots.append(Snapshot(step, float(stochastic.mean()), float(deterministic.mean()), name))

    def _finish(self) -> None:
        cfg = self.config
        medium = select_medium(self.snapshots)
        info = {"env": ENV_IDS[cfg.env], "config": asdict(cfg), "snapshots": [asdict(s) for s in self.snapshots],
                "medium_step": medium.step, "medium_fraction": 1.0 / 3.0,
                "extra": {"expert_return_stochastic": self.snapshots[-1].return_stochastic,
                          "medium_return_stochastic": medium.return_stochastic}}
        _write_text(self.run_dir / "behaviour.json", json.dumps(info, indent=1))

    # --- checkpoint -----------------------------------------------------------------------------

    def _checkpoint(self) -> None:
        """Replay rows since the last checkpoint, then weights, optimizers and state, then ``latest``."""
        step, model = self.model.num_timesteps, self.model
        buf = model.replay_buffer
        rows = slice(self.rows_written, step)
        qpos, qvel = np.stack(self.recorder.qpos), np.stack(self.recorder.qvel)
        if len(qpos) != step - self.rows_written:
            raise RuntimeError(f"recorded {len(qpos)} states for {step - self.rows_written} transitions")
        dones, timeouts = buf.dones[rows, 0] > 0, buf.timeouts[rows, 0] > 0
        replay_dir = self.run_dir / "replay"
        replay_dir.mkdir(parents=True, exist_ok=True)
        tmp = replay_dir / f".rows_{step:09d}.tmp.npz"
        np.savez(tmp, observations=buf.observations[rows, 0], next_observations=buf.next_observations[rows, 0],
                 actions=buf.actions[rows, 0], rewards=buf.rewards[rows, 0], terminals=dones & ~timeouts,
                 timeouts=timeouts, qpos=qpos, qvel=qvel)
        os.replace(tmp, replay_dir / f"rows_{self.rows_written:09d}_{step:09d}.npz")
        self.rows_written, self.recorder.qpos, self.recorder.qvel = step, [], []

        ckpt = self.run_dir / "checkpoints" / f"step_{step:09d}"
        ckpt.mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_file({k: v.detach().cpu().contiguous() for k, v in model.policy.state_dict().items()},
                                    str(ckpt / "policy.safetensors"))
        torch.save({"actor_optimizer": model.actor.optimizer.state_dict(),
                    "critic_optimizer": model.critic.optimizer.state_dict(),
                    "ent_coef_optimizer": model.ent_coef_optimizer.state_dict(),
                    "log_ent_coef": model.log_ent_coef.detach().clone(),
                    "torch_rng": torch.get_rng_state()}, ckpt / "optim.pt")
        _write_text(ckpt / "state.json", json.dumps(self._state(), indent=None))
        _write_text(self.run_dir / "checkpoints" / "latest", ckpt.name)

    def _state(self) -> dict[str, Any]:
        model = self.model
        np_state = np.random.get_state()
        monitor = self.vec_env.envs[0]
        sim = get_sim_state(monitor)
        return {"num_timesteps": model.num_timesteps, "n_updates": model._n_updates,
                "episode_num": model._episode_num, "last_obs": model._last_obs.tolist(),
                "last_episode_starts": model._last_episode_starts.tolist(),
                "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
                "python_rng": _to_json(random.getstate()),
                "action_space_rng": model.action_space.np_random.bit_generator.state,
                "sim": {**sim, "mj_state": sim["mj_state"].tolist()}, "monitor_rewards": list(monitor.rewards),
                "snapshots": [asdict(s) for s in self.snapshots]}

    def _resume(self) -> None:
        latest = self.run_dir / "checkpoints" / "latest"
        step = 0
        if latest.is_file():
            ckpt = self.run_dir / "checkpoints" / latest.read_text().strip()
            step = int(_STEP_DIR.match(ckpt.name).group(1))
            self._load_checkpoint(ckpt)
        self._drop_after(step)

    def _drop_after(self, step: int) -> None:
        """Delete replay chunks, snapshots and checkpoints newer than ``step`` (from an interrupted stretch)."""
        for f in (self.run_dir / "replay").glob("rows_*.npz"):
            if int(_ROWS_FILE.match(f.name).group(2)) > step:
                f.unlink()
        kept = {s.path for s in self.snapshots}
        for f in (self.run_dir / "snapshots").glob("step_*.safetensors"):
            if f.name not in kept:
                f.unlink()
        for d in (self.run_dir / "checkpoints").glob("step_*"):
            if d.is_dir() and int(_STEP_DIR.match(d.name).group(1)) > step:
                shutil.rmtree(d)

    def _load_checkpoint(self, ckpt: Path) -> None:
        model = self.model
        state = json.loads((ckpt / "state.json").read_text())
        model.policy.load_state_dict(safetensors.torch.load_file(str(ckpt / "policy.safetensors")))
        optim = torch.load(ckpt / "optim.pt", weights_only=True, map_location=model.device)
        model.actor.optimizer.load_state_dict(optim["actor_optimizer"])
        model.critic.optimizer.load_state_dict(optim["critic_optimizer"])
        model.ent_coef_optimizer.load_state_dict(optim["ent_coef_optimizer"])
        with torch.no_grad():
            model.log_ent_coef.copy_(optim["log_ent_coef"])
        rows = read_replay(self.run_dir, state["num_timesteps"], d4rl_keys=False)
        buf, n = model.replay_buffer, state["num_timesteps"]
        for key in ("observations", "next_observations", "actions", "rewards"):
            getattr(buf, key)[:n, 0] = rows[key]
        buf.dones[:n, 0] = rows["terminals"] | rows["timeouts"]
        buf.timeouts[:n, 0] = rows["timeouts"]
        buf.pos, buf.full = n, n == buf.buffer_size
        self.rows_written = n
        model.num_timesteps, model._n_updates = n, state["n_updates"]
        model._episode_num = state["episode_num"]
        model._last_obs = np.asarray(state["last_obs"], dtype=np.float64)
        model._last_episode_starts = np.asarray(state["last_episode_starts"], dtype=bool)
        monitor = self.vec_env.envs[0]
        self.vec_env.reset()                                      # arms the wrappers; state is overwritten next
        set_sim_state(monitor, state["sim"])
        if not np.array_equal(observation_of(monitor), model._last_obs[0]):
            raise RuntimeError(f"{ckpt}: restored simulator state does not reproduce the saved observation")
        monitor.rewards = list(state["monitor_rewards"])
        np_rng = state["numpy_rng"]
        np.random.set_state((np_rng[0], np.asarray(np_rng[1], dtype=np.uint32), *np_rng[2:]))
        random.setstate(_from_json(state["python_rng"]))
        model.action_space.np_random.bit_generator.state = state["action_space_rng"]
        torch.set_rng_state(optim["torch_rng"].cpu())
        self.snapshots = [Snapshot(**s) for s in state["snapshots"]]


def read_replay(run_dir: str | os.PathLike, until_step: int | None = None, *,
                d4rl_keys: bool = True) -> dict[str, np.ndarray]:
    """Concatenate a run's replay chunks: rows ``[0, until_step)`` of the training transitions.

    Returns ``observations [N, obs]``, ``next_observations``, ``actions [N, act]``, ``rewards [N]``,
    ``terminals [N]``, ``timeouts [N]`` and (with ``d4rl_keys``) ``infos/qpos``, ``infos/qvel``, else
    ``qpos``, ``qvel``. Episodes still running at ``until_step`` end there with no flag set.
    """
    files = sorted((Path(run_dir) / "replay").glob("rows_*.npz"))
    spans = [(int(m.group(1)), int(m.group(2)), f) for f in files if (m := _ROWS_FILE.match(f.name))]
    if not spans:
        raise FileNotFoundError(f"{run_dir}: no replay rows saved")
    end = spans[-1][1] if until_step is None else until_step
    chunks = []
    for start, stop, f in spans:
        if start >= end:
            break
        with np.load(f) as z:
            chunks.append({k: z[k][: end - start] for k in z.files})
    if sum(len(c["rewards"]) for c in chunks) != end:
        raise ValueError(f"{run_dir}: replay rows cover fewer than {end} transitions")
    out = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    out["rewards"] = out["rewards"].astype(np.float32)
    if d4rl_keys:
        out["infos/qpos"], out["infos/qvel"] = out.pop("qpos"), out.pop("qvel")
    return out


def _to_json(x: Any) -> Any:
    return [_to_json(v) for v in x] if isinstance(x, tuple | list) else x


def _from_json(x: Any) -> Any:
    return tuple(_from_json(v) for v in x) if isinstance(x, list) else x


class _progress_bar:
    """``with _progress_bar(show, total, label, done) as advance: advance(completed)``; a no-op when hidden."""

    def __init__(self, show: bool, total: int, label: str, done: int = 0) -> None:
        self.show, self.total, self.label, self.done = show, total, label, done

    def __enter__(self) -> Callable[[int], None]:
        if not self.show:
            return lambda completed: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        self.progress = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn())
        self.progress.start()
        task = self.progress.add_task(self.label, total=self.total, completed=self.done)
        return lambda completed: self.progress.update(task, completed=completed)

    def __exit__(self, *exc: object) -> None:
        if self.show:
            self.progress.stop()
