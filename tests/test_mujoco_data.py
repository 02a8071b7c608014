"""MuJoCo data: envs, SAC behaviour runs (exact resume), D4RL-format collection, references, Minari round trip."""

from __future__ import annotations

import dataclasses
import json

import gymnasium as gym
import h5py
import numpy as np
import pytest
import torch

import trajgen.envs.mujoco.collect as collect_module
from trajgen.data import load_d4rl
from trajgen.envs.mujoco import (
    ENV_IDS,
    SACConfig,
    Snapshot,
    TanhGaussianActor,
    collect_mujoco,
    evaluate_actor,
    load_mujoco_dataset,
    make_env,
    make_vector_env,
    measure_references,
    normalized_score,
    read_replay,
    reference_returns,
    select_early_stopped_medium,
    select_medium,
    train_behaviour,
    train_until_medium,
    write_references,
)
from trajgen.envs.mujoco.behaviour import actor_from_sb3, episode_seeds

QUICK = SACConfig.quick("hopper", seed=0)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory):
    """One uninterrupted tiny behaviour run shared by the tests below."""
    return train_behaviour(QUICK, tmp_path_factory.mktemp("behaviour") / "run")


# ----------------------------------------------------------------------------------------------------
# envs
# ----------------------------------------------------------------------------------------------------


def test_make_env_names_seeds_and_errors() -> None:
    a, b = make_env("hopper", 3), make_env("Hopper-v5", 3)
    actions = [a.action_space.sample() for _ in range(5)]
    obs_a = [a.step(x)[0] for x in actions]
    obs_b = [b.step(x)[0] for x in actions]
    np.testing.assert_array_equal(obs_a, obs_b)                     # same seed, same actions -> same states
    vec = make_vector_env("halfcheetah", 3, seed=0)
    obs, *_ = vec.step(np.zeros((3, 6)))
    assert obs.shape == (3, 17)
    assert not np.allclose(obs[0], obs[1])                          # sub-envs seeded differently
    with pytest.raises(ValueError, match="unknown MuJoCo env 'ant'.*hopper"):
        make_env("ant", 0)
    with pytest.raises(ValueError, match="n \\(number of envs\\)"):
        make_vector_env("hopper", 0, 0)


# ----------------------------------------------------------------------------------------------------
# actor and behaviour runs
# ----------------------------------------------------------------------------------------------------


def test_actor_matches_sb3_and_round_trips(tmp_path) -> None:
    from stable_baselines3 import SAC

    model = SAC("MlpPolicy", "Hopper-v5", policy_kwargs={"net_arch": [16, 16]}, seed=0, buffer_size=10, device="cpu")
    actor = actor_from_sb3(model)
    obs = torch.randn(7, 11)
    expected_det, _ = model.predict(obs.numpy(), deterministic=True)
    np.testing.assert_allclose(actor(obs).detach().numpy(), expected_det, atol=1e-6)
    mean, log_std, _ = model.actor.get_action_dist_params(obs)     # SB3's own distribution parameters
    noise = torch.randn(7, 3)
    expected = torch.tanh(mean + log_std.exp() * noise)
    torch.testing.assert_close(actor(obs, noise), expected)
    loaded, meta = TanhGaussianActor.load(actor.save(tmp_path / "a.safetensors", env="hopper", step=5))
    assert meta == {"env": "hopper", "step": 5}
    torch.testing.assert_close(loaded(obs, noise), expected)
    with pytest.raises(ValueError, match="obs must be \\[B, 11\\]"):
        actor(torch.zeros(2, 5))


def test_select_medium_is_closest_to_a_third_of_expert() -> None:
    snaps = [Snapshot(s, r, 0.0, "") for s, r in [(0, 5.0), (10, 20.0), (20, 31.0), (30, 36.0), (40, 99.0)]]
    assert select_medium(snaps).step == 20                         # |31 - 33| < |36 - 33|
    tie = [Snapshot(0, 33.0, 0, ""), Snapshot(1, 30.0, 0, ""), Snapshot(2, 36.0, 0, ""), Snapshot(3, 99.0, 0, "")]
    assert select_medium(tie).step == 1                            # step 0 excluded, tie -> earlier
    with pytest.raises(ValueError, match="no trained snapshots"):
        select_medium([Snapshot(0, 1.0, 1.0, "")])


def test_select_early_stopped_medium_looks_only_up_to_the_first_crossing() -> None:
    snaps = [Snapshot(s, r, 0.0, "") for s, r in [(0, 50.0), (10, 20.0), (20, 29.0), (30, 45.0), (40, 31.0)]]
    assert select_early_stopped_medium(snaps, 30.0).step == 20      # |29 - 30| < |45 - 30|; 40 comes after
    assert select_early_stopped_medium(snaps, 40.0).step == 30      # the crossing itself
    assert select_early_stopped_medium(snaps, 46.0) is None         # step 0's 50 is not a trained snapshot
    assert select_early_stopped_medium(snaps, -1.0).step == 10      # the first trained snapshot already reaches it


def test_early_stopped_medium_replay_equals_the_finished_runs_rows(quick_run, tmp_path) -> None:
    """Stopping at the first checkpoint whose snapshots reach the target gives the same medium snapshot and replay
    rows as choosing it afterwards in the finished run (the runs are identical up to there), and no expert."""
    first_stretch = [s for s in quick_run.snapshots if 0 < s.step <= QUICK.checkpoint_every]
    target = max(s.return_stochastic for s in first_stretch)
    expected = select_early_stopped_medium(quick_run.snapshots, target)
    run_dir = tmp_path / "early"
    early = train_until_medium(QUICK, run_dir, target)
    assert not early.finished and early.medium_step == expected.step
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{QUICK.checkpoint_every:09d}"
    assert not (run_dir / "behaviour.json").exists()
    with pytest.raises(ValueError, match="stopped early.*finished run"):
        _ = early.expert
    out = collect_mujoco("hopper", "medium-replay", tmp_path / "mr.hdf5", policy_dir=run_dir, quick=True,
                         medium_return=target)
    replay = load_d4rl(out, env="Hopper-v5")
    source = read_replay(quick_run.run_dir, expected.step)
    assert len(replay) == expected.step
    np.testing.assert_array_equal(replay.actions, source["actions"].astype(np.float32))
    assert replay.metadata["medium_target_return"] == pytest.approx(target)
    assert list(replay.metadata["behaviour_steps"]) == [expected.step]
    # a finished run is used as it is; a target it never reached is an error, and so is an expert level
    assert train_until_medium(QUICK, quick_run.run_dir, target).medium_step == expected.step
    best = max(s.return_stochastic for s in quick_run.snapshots)
    with pytest.raises(ValueError, match="no snapshot of the finished run reached target_return"):
        train_until_medium(QUICK, quick_run.run_dir, best + 1.0)
    with pytest.raises(FileNotFoundError, match="no snapshot up to step 0"):
        train_until_medium(QUICK, tmp_path / "empty", target, train_missing=False)
    with pytest.raises(ValueError, match="medium_return applies to the levels medium and medium-replay"):
        collect_mujoco("hopper", "medium-expert", tmp_path / "x.hdf5", policy_dir=run_dir, medium_return=target)
    with pytest.raises(ValueError, match="medium_return applies to the levels medium and medium-replay"):
        collect_mujoco("hopper", "random", tmp_path / "x.hdf5", medium_return=target)
    with pytest.raises(ValueError, match="medium_return must be a return or 'reference', got 'high'"):
        collect_mujoco("hopper", "medium", tmp_path / "x.hdf5", policy_dir=run_dir, medium_return="high")


def test_behaviour_resume_after_kill_equals_uninterrupted(quick_run, tmp_path, monkeypatch) -> None:
    run_dir = tmp_path / "killed"
    assert train_behaviour(QUICK, run_dir, stop_at=300) is None   # stop at the first checkpoint
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_000000300"

    real_save = TanhGaussianActor.save                             # then "kill" mid-stretch, after a file write

    def save_then_die(self, path, **meta):
        out = real_save(self, path, **meta)
        if meta.get("step") == 450:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(TanhGaussianActor, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_behaviour(QUICK, run_dir)
    monkeypatch.setattr(TanhGaussianActor, "save", real_save)
    resumed = train_behaviour(QUICK, run_dir)

    assert [s.step for s in resumed.snapshots] == [0, 150, 300, 450, 600]
    assert [s.return_stochastic for s in resumed.snapshots] == [s.return_stochastic for s in quick_run.snapshots]
    for name in ("expert", "medium"):
        a, b = resumed.actor(name).state_dict(), quick_run.actor(name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    final_a = (run_dir / "checkpoints" / "step_000000600" / "policy.safetensors").read_bytes()
    final_b = (quick_run.run_dir / "checkpoints" / "step_000000600" / "policy.safetensors").read_bytes()
    assert final_a == final_b                                      # critics and targets too, bit for bit
    rep_a, rep_b = read_replay(run_dir), quick_run.replay()
    assert all(np.array_equal(rep_a[k], rep_b[k]) for k in rep_b)


def test_behaviour_run_stops_at_total_steps_between_snapshots(tmp_path) -> None:
    config = dataclasses.replace(QUICK, total_steps=500, checkpoint_every=150)   # 500 is no multiple of 150
    run = train_behaviour(config, tmp_path / "run")
    assert [s.step for s in run.snapshots] == [0, 150, 300, 450, 500]
    assert len(run.replay()["rewards"]) == 500                    # every transition kept, none overwritten
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    del stored["device"]                                           # a run written before the field existed
    (tmp_path / "run" / "config.json").write_text(json.dumps(stored))
    assert train_behaviour(config, tmp_path / "run").expert.step == 500


def test_behaviour_replay_is_consistent_and_config_is_checked(quick_run, tmp_path) -> None:
    rep = quick_run.replay()
    assert len(rep["rewards"]) == QUICK.total_steps
    obs, qpos, qvel = rep["observations"], rep["infos/qpos"], rep["infos/qvel"]
    np.testing.assert_allclose(obs, np.concatenate([qpos[:, 1:], np.clip(qvel, -10, 10)], 1), atol=1e-12)
    done = rep["terminals"] | rep["timeouts"]
    inside = ~done[:-1]
    np.testing.assert_array_equal(rep["next_observations"][:-1][inside], obs[1:][inside])
    with pytest.raises(ValueError, match="different config.*batch_size"):
        train_behaviour(SACConfig(**{**QUICK.__dict__, "batch_size": 64}), quick_run.run_dir)
    with pytest.raises(ValueError, match="multiple of snapshot_every"):
        SACConfig(snapshot_every=7, checkpoint_every=10)


# ----------------------------------------------------------------------------------------------------
# collection
# ----------------------------------------------------------------------------------------------------


def _hopper_healthy(obs: np.ndarray) -> np.ndarray:
    """Hopper-v5's health test on observations ``[N, 11]`` (z = obs[0], angle = obs[1])."""
    z, angle = obs[:, 0], obs[:, 1]
    return (np.abs(obs[:, 1:]) < 100).all(1) & (z > 0.7) & (np.abs(angle) < 0.2)


def test_quick_collection_end_to_end(quick_run, tmp_path) -> None:
    out = collect_mujoco("hopper", "quick", tmp_path / "q.hdf5", n_steps=1500, seed=4, policy_dir=quick_run.run_dir)
    ds = load_d4rl(out, env="Hopper-v5")
    assert len(ds) == 1500 and ds.metadata["level"] == "medium" and ds.metadata["policy"] == "sac-medium"
    assert ds.metadata["seed"] == 4 and list(ds.metadata["behaviour_steps"]) == [quick_run.medium_step]
    assert not list(tmp_path.glob("*.partial.h5"))
    # terminals are exactly gymnasium's terminations: the next state is unhealthy
    np.testing.assert_array_equal(ds.terminals, ~_hopper_healthy(ds.next_observations))
    assert ds.timeouts.sum() == 1 and ds.timeouts[-1] and not ds.terminals[-1]     # only the budget cut
    # observations are qpos[1:] ++ clip(qvel, -10, 10) of the recorded simulator state
    expected = np.concatenate([ds.qpos[:, 1:], np.clip(ds.qvel, -10, 10)], 1)
    np.testing.assert_allclose(ds.observations, expected.astype(np.float32), rtol=0, atol=1e-6)
    # replaying a recorded action from the recorded state gives the recorded reward and next observation
    env = make_env("hopper", 0)
    for t in (0, 7, 500, 1498):
        env.unwrapped.set_state(ds.qpos[t], ds.qvel[t])
        nxt, reward, terminated, *_ = env.step(ds.actions[t])
        np.testing.assert_allclose(nxt, ds.next_observations[t], atol=1e-4)
        assert reward == pytest.approx(ds.rewards[t], abs=1e-4) and terminated == ds.terminals[t]


def test_wrong_env_is_refused(quick_run, tmp_path) -> None:
    out = collect_mujoco("hopper", "expert", tmp_path / "e.hdf5", n_steps=300, policy_dir=quick_run.run_dir)
    with pytest.raises(ValueError, match="recorded in env 'Hopper-v5' but env 'Walker2d-v5'"):
        load_mujoco_dataset(out, "walker2d")
    assert len(load_mujoco_dataset(out, "Hopper-v5")) == 300
    with pytest.raises(ValueError, match="unknown level 'hard'"):
        collect_mujoco("hopper", "hard", tmp_path / "x.hdf5")
    with pytest.raises(FileNotFoundError, match="no finished behaviour run"):
        collect_mujoco("hopper", "medium", tmp_path / "x.hdf5", policy_dir=tmp_path / "none", train_missing=False)


def test_medium_replay_and_medium_expert_levels(quick_run, tmp_path) -> None:
    kw = {"policy_dir": quick_run.run_dir, "seed": 1}
    replay = load_d4rl(collect_mujoco("hopper", "medium-replay", tmp_path / "mr.hdf5", **kw))
    assert len(replay) == quick_run.medium_step                        # the buffer up to the medium snapshot
    source = read_replay(quick_run.run_dir, quick_run.medium_step)
    np.testing.assert_array_equal(replay.actions, source["actions"].astype(np.float32))
    assert replay.terminals[-1] or replay.timeouts[-1]
    medium = load_d4rl(collect_mujoco("hopper", "medium", tmp_path / "m.hdf5", n_steps=400, **kw))
    expert = load_d4rl(collect_mujoco("hopper", "expert", tmp_path / "e.hdf5", n_steps=400, **kw))
    both = load_d4rl(collect_mujoco("hopper", "medium-expert", tmp_path / "me.hdf5", n_steps=400, **kw))
    for key in ("observations", "actions", "rewards", "terminals", "timeouts"):
        np.testing.assert_array_equal(both.array(key), np.concatenate([medium.array(key), expert.array(key)]))


def test_random_level_time_limits_and_resume(tmp_path, monkeypatch) -> None:
    """HalfCheetah never terminates: 1000-step episodes end in timeouts; an interrupted collection resumes."""
    full = load_d4rl(collect_mujoco("halfcheetah", "random", tmp_path / "full.hdf5", n_steps=2500, n_envs=2))
    assert not full.terminals.any()
    np.testing.assert_array_equal(np.flatnonzero(full.timeouts), [999, 1999, 2499])
    assert full.metadata["policy"] == "sac-random-init"

    monkeypatch.setattr(collect_module, "_FLUSH_EVERY", 1)
    real_append = collect_module._PartialFile.append
    calls = {"n": 0}

    def append_then_die(self, episodes):
        real_append(self, episodes)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(collect_module._PartialFile, "append", append_then_die)
    with pytest.raises(KeyboardInterrupt):
        collect_mujoco("halfcheetah", "random", tmp_path / "cut.hdf5", n_steps=2500, n_envs=2)
    partial = tmp_path / "cut.hdf5.random.partial.h5"
    with h5py.File(partial, "r") as f:
        assert f.attrs["episodes"] == 2 and f.attrs["rows"] == 2000
    monkeypatch.setattr(collect_module._PartialFile, "append", real_append)
    resumed = load_d4rl(collect_mujoco("halfcheetah", "random", tmp_path / "cut.hdf5", n_steps=2500, n_envs=2))
    for key in ("observations", "actions", "rewards", "timeouts"):
        np.testing.assert_array_equal(resumed.array(key), full.array(key))
    assert not partial.exists()
    with pytest.raises(ValueError, match="partial collection from different settings"):
        collect_module._PartialFile(tmp_path / "p.h5", {"a": 1})
        collect_module._PartialFile(tmp_path / "p.h5", {"a": 2})


# ----------------------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------------------


def test_evaluate_actor_random_matches_a_hand_rolled_episode() -> None:
    seq = episode_seeds(5, 100, 0)
    rng = np.random.default_rng(seq)
    env = gym.make(ENV_IDS["hopper"])
    env.reset(seed=int(rng.integers(2**31)))
    total, done = 0.0, False
    while not done:
        rng.standard_normal(3)                                     # the noise draw evaluate_actor makes first
        _, r, term, trunc, _ = env.step(rng.uniform(-1, 1, 3))
        total, done = total + r, term or trunc
    assert evaluate_actor("hopper", None, [seq], deterministic=False)[0] == pytest.approx(total, abs=1e-12)


def test_references_and_normalized_score(quick_run, tmp_path) -> None:
    lo, hi = reference_returns("hopper", "d4rl")
    assert normalized_score("Hopper-v5", [lo, hi, (lo + hi) / 2]) == pytest.approx([0.0, 100.0, 50.0])
    path = tmp_path / "refs.json"
    write_references({"hopper": None}, path=path, episodes=4, seed=0)
    with pytest.raises(ValueError, match="random only.*write_references"):
        normalized_score("hopper", 10.0, "trajgen", path)
    table = write_references({"hopper": quick_run.run_dir}, path=path, episodes=4, seed=0)
    entry = json.loads(path.read_text())["hopper"]
    assert entry == table["hopper"] and entry["gym_id"] == "Hopper-v5" and entry["episodes"] == 4
    measured = measure_references("hopper", policy_dir=quick_run.run_dir, episodes=4, seed=0)
    assert measured["random"] == entry["random"] and measured["expert"] == entry["expert"]
    assert normalized_score("hopper", entry["expert"], "trajgen", path) == pytest.approx(100.0)
    assert normalized_score("hopper", entry["random"], "trajgen", path) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="reference must be one of"):
        normalized_score("hopper", 1.0, "mine", path)


# ----------------------------------------------------------------------------------------------------
# Minari
# ----------------------------------------------------------------------------------------------------


def _hopper_episodes(n: int, max_steps: int) -> list[list[tuple]]:
    """``n`` uniform-random Hopper episodes of at most ``max_steps``: rows (obs, action, reward, term, trunc, next)."""
    env = gym.make("Hopper-v5", max_episode_steps=max_steps)
    rng = np.random.default_rng(0)
    episodes = []
    for k in range(n):
        obs, _ = env.reset(seed=k)
        rows, done = [], False
        while not done:
            a = rng.uniform(-1, 1, 3).astype(np.float32)
            nxt, r, term, trunc, _ = env.step(a)
            rows.append((obs, a, r, term, trunc, nxt))
            obs, done = nxt, term or trunc
        episodes.append(rows)
    return episodes


def _write_minari(minari, dataset_id: str, episodes: list[list[tuple]], max_steps: int) -> None:
    """Create a local Minari dataset: through DataCollector when minari[create] (jax) is installed, else
    through minari.create_dataset_from_buffers (Minari's own writer, no jax)."""
    try:
        import jax  # noqa: F401
    except ImportError:
        from minari.data_collector import EpisodeBuffer

        buffers = [EpisodeBuffer(id=k, observations=[r[0] for r in rows] + [rows[-1][5]],
                                 actions=[r[1] for r in rows], rewards=[r[2] for r in rows],
                                 terminations=[r[3] for r in rows], truncations=[r[4] for r in rows])
                   for k, rows in enumerate(episodes)]
        minari.create_dataset_from_buffers(dataset_id, buffers, env=gym.make("Hopper-v5", max_episode_steps=max_steps),
                                           algorithm_name="uniform")
        return
    env = minari.DataCollector(gym.make("Hopper-v5", max_episode_steps=max_steps))
    for k, rows in enumerate(episodes):
        env.reset(seed=k)
        for row in rows:
            env.step(row[1])
    env.create_dataset(dataset_id, algorithm_name="uniform")


@pytest.mark.filterwarnings("ignore::UserWarning:minari.*")
def test_minari_round_trip_equals_source_episodes(tmp_path, monkeypatch) -> None:
    minari = pytest.importorskip("minari")
    from trajgen.data.minari_io import load_minari

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    episodes = _hopper_episodes(5, max_steps=15)
    _write_minari(minari, "trajgen/hopper-test-v0", episodes, max_steps=15)
    cols = [np.asarray(c) for c in zip(*[row for rows in episodes for row in rows])]
    cols[4] = cols[4] & ~cols[3]                                    # D4RL: a timeout is a truncation without termination
    ds = load_minari("trajgen/hopper-test-v0", env="hopper")
    for key, col in zip(("observations", "actions", "rewards", "terminals", "timeouts", "next_observations"), cols):
        np.testing.assert_array_equal(ds.array(key), col.astype(ds.array(key).dtype))
    assert ds.timeouts.any() and ds.terminals.any() == bool(cols[3].any())
    assert ds.metadata["env"] == "Hopper-v5" and len(ds.episodes()) == 5
    assert [e - s for s, e in ds.episodes()] == [len(rows) for rows in episodes]
    with pytest.raises(ValueError, match="recorded in env 'Hopper-v5' but env='walker2d'"):
        load_minari("trajgen/hopper-test-v0", env="walker2d")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_minari("trajgen/missing-v0")
