"""D4RL-format files: round trip, validation errors, episodes, windows, normalizers, scores."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from trajgen.data import (
    D4RL_REF_SCORES,
    GaussianNormalizer,
    LimitsNormalizer,
    Normalizer,
    SequenceDataset,
    d4rl_normalized_score,
    load_d4rl,
    write_d4rl,
)

EPISODE_LENGTHS = (5, 3, 7)   # 1st and 2nd end in terminals, the 3rd in a timeout
OBS_DIM, ACT_DIM = 4, 2


def make_data(seed: int = 0) -> dict[str, np.ndarray]:
    """Three episodes with consistent next_observations and qpos/qvel."""
    rng = np.random.default_rng(seed)
    obs, nxt, terms, touts = [], [], [], []
    for i, n in enumerate(EPISODE_LENGTHS):
        states = rng.normal(size=(n + 1, OBS_DIM)).astype(np.float32)
        obs.append(states[:-1])
        nxt.append(states[1:])
        terms.append(np.arange(n) == n - 1 if i < 2 else np.zeros(n, bool))
        touts.append(np.arange(n) == n - 1 if i == 2 else np.zeros(n, bool))
    n_total = sum(EPISODE_LENGTHS)
    return {
        "observations": np.concatenate(obs),
        "next_observations": np.concatenate(nxt),
        "actions": rng.uniform(-1, 1, size=(n_total, ACT_DIM)).astype(np.float32),
        "rewards": rng.normal(size=n_total).astype(np.float32),
        "terminals": np.concatenate(terms),
        "timeouts": np.concatenate(touts),
        "infos/qpos": rng.normal(size=(n_total, 3)),
        "infos/qvel": rng.normal(size=(n_total, 3)),
    }


def write_raw(path: Path, data: dict[str, np.ndarray], **attrs) -> Path:
    """Write without validation (to build bad files)."""
    with h5py.File(path, "w") as f:
        for k, v in data.items():
            f.create_dataset(k, data=v)
        f.attrs.update(attrs)
    return path


@pytest.fixture
def data() -> dict[str, np.ndarray]:
    return make_data()


@pytest.fixture
def path(tmp_path: Path, data) -> Path:
    return write_d4rl(tmp_path / "hopper.hdf5", data, env="Hopper-v4", policy="sac-medium", seed=3, note="x")


def test_round_trip_exact(path, data):
    ds = load_d4rl(path, env="Hopper-v4")
    for key, attr in [("observations", "observations"), ("actions", "actions"), ("rewards", "rewards"),
                      ("terminals", "terminals"), ("timeouts", "timeouts"),
                      ("next_observations", "next_observations"), ("infos/qpos", "qpos"), ("infos/qvel", "qvel")]:
        got = getattr(ds, attr)
        assert got.dtype == data[key].dtype and np.array_equal(got, data[key]), key
    assert ds.metadata == {"env": "Hopper-v4", "policy": "sac-medium", "seed": 3, "note": "x"}
    assert (len(ds), ds.obs_dim, ds.act_dim) == (15, OBS_DIM, ACT_DIM)
    assert not list(path.parent.glob("*.tmp"))          # atomic write left nothing behind


def test_d4rl_original_layout_loads_without_metadata_or_next_obs(tmp_path, data):
    raw = {k: v for k, v in data.items() if k != "next_observations"}
    p = write_raw(tmp_path / "orig.hdf5", raw)
    ds = load_d4rl(p)
    assert ds.next_observations is None and ds.metadata == {}
    with pytest.warns(UserWarning, match="no 'env' attribute"):
        load_d4rl(p, env="hopper-medium-v2")


def _missing_key(d):
    del d["actions"]
    return d, "actions"


def _mismatched(d):
    d["rewards"] = d["rewards"][:-1]
    return d, "rewards"


def _nan(d):
    d["observations"][4, 1] = np.nan
    return d, "observations"


def _broken_next_obs(d):
    d["next_observations"][1] += 1.0
    return d, r"next_observations'\[1\]"


def _unfinished(d):
    d["timeouts"][-1] = False
    return d, "last transition"


def _wrong_ndim(d):
    d["rewards"] = d["rewards"][:, None]
    return d, "rewards"


def _non_numeric(d):
    d["actions"] = np.array([b"a"] * len(d["actions"]))
    return d, "actions"


@pytest.mark.parametrize("corrupt", [_missing_key, _mismatched, _nan, _broken_next_obs, _unfinished, _wrong_ndim,
                                     _non_numeric])
def test_bad_files_raise_naming_key_and_path(tmp_path, data, corrupt):
    bad, key_pattern = corrupt(data)
    p = write_raw(tmp_path / "bad.hdf5", bad, env="Hopper-v4")
    with pytest.raises(ValueError, match=key_pattern) as err:
        load_d4rl(p)
    assert str(p) in str(err.value)
    with pytest.raises(ValueError, match=key_pattern):        # the writer refuses the same data
        write_d4rl(tmp_path / "bad2.hdf5", bad, env="Hopper-v4", policy="p", seed=0)
    assert not (tmp_path / "bad2.hdf5").exists()


def test_wrong_env_names_both(path):
    with pytest.raises(ValueError, match="Hopper-v4.*Walker2d-v4") as err:
        load_d4rl(path, env="Walker2d-v4")
    assert str(path) in str(err.value)


def test_corrupt_file(tmp_path):
    p = tmp_path / "garbage.hdf5"
    p.write_bytes(b"this is not an HDF5 file" * 10)
    with pytest.raises(ValueError, match="not a readable HDF5 file") as err:
        load_d4rl(p)
    assert str(p) in str(err.value)
    with pytest.raises(FileNotFoundError):
        load_d4rl(tmp_path / "absent.hdf5")


def test_truncated_end_allowed(tmp_path, data):
    data["timeouts"][-1] = False
    p = write_raw(tmp_path / "trunc.hdf5", data)
    ds = load_d4rl(p, allow_truncated_end=True)
    assert ds.episodes()[-1] == (8, 15)


def test_episodes_and_returns(path, data):
    ds = load_d4rl(path)
    assert ds.episodes() == [(0, 5), (5, 8), (8, 15)]
    expected = [data["rewards"][s:e].astype(np.float64).sum() for s, e in ds.episodes()]
    np.testing.assert_allclose(ds.episode_returns(), expected, rtol=1e-12)


@pytest.mark.parametrize("horizon", [1, 4, 9])
def test_sequence_windows(path, horizon):
    ds = load_d4rl(path)
    seq = SequenceDataset(ds, horizon, keys=("observations", "actions", "rewards"))
    assert len(seq) == len(ds)
    i = 0
    for s, e in ds.episodes():
        for t in range(s, e):
            w = seq[i]
            valid = min(horizon, e - t)
            assert w["observations"].shape == (horizon, OBS_DIM) and w["rewards"].shape == (horizon, 1)
            assert w["mask"].tolist() == [True] * valid + [False] * (horizon - valid)
            np.testing.assert_array_equal(w["observations"][:valid].numpy(), ds.observations[t:t + valid])
            np.testing.assert_array_equal(w["actions"][:valid].numpy(), ds.actions[t:t + valid])
            # padding: observations repeat the episode's last state, actions and rewards are zero
            np.testing.assert_array_equal(w["observations"][valid:].numpy(),
                                          np.broadcast_to(ds.observations[e - 1], (horizon - valid, OBS_DIM)))
            assert not w["actions"][valid:].any() and not w["rewards"][valid:].any()
            i += 1


def test_sequence_pad_override_and_batches(path):
    ds = load_d4rl(path)
    seq = SequenceDataset(ds, 6, pad="zero")
    w = seq[4]                                           # last step of episode 1: one valid step
    assert w["mask"].sum() == 1 and not w["observations"][1:].any()
    with pytest.raises(ValueError, match="pad"):
        SequenceDataset(ds, 6, pad={"observations": "mirror"})
    batch = seq.batch_sampler(8)(torch.Generator().manual_seed(0))
    again = seq.sample_batch(torch.Generator().manual_seed(0), 8)
    assert batch["observations"].shape == (8, 6, OBS_DIM) and batch["mask"].shape == (8, 6)
    assert all(torch.equal(batch[k], again[k]) for k in batch)


def test_sequence_normalizers(path):
    ds = load_d4rl(path)
    norm = LimitsNormalizer().fit(ds.observations)
    seq = SequenceDataset(ds, 3, normalizers={"observations": norm})
    np.testing.assert_allclose(seq[0]["observations"].numpy(), norm.normalize(ds.observations[0:3]), atol=1e-6)


@pytest.mark.parametrize("cls", [GaussianNormalizer, LimitsNormalizer])
def test_normalizer_round_trip_and_state_dict(cls):
    x = np.random.default_rng(0).normal(size=(200, 5)) * [1, 10, 0.1, 3, 1] + [0, 5, -2, 1, 0]
    x[:, 4] = 7.0                                        # a constant feature: floored, still invertible
    norm = cls().fit(x)
    np.testing.assert_allclose(norm.unnormalize(norm.normalize(x)), x, rtol=1e-12, atol=1e-12)
    xt = torch.from_numpy(x).float()
    torch.testing.assert_close(norm.unnormalize(norm.normalize(xt)), xt, rtol=1e-5, atol=1e-5)
    state = norm.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    back = Normalizer.from_state_dict(torch.load(buf, weights_only=True))
    assert type(back) is cls
    np.testing.assert_array_equal(back.normalize(x), norm.normalize(x))


def test_limits_normalizer_maps_to_unit_box():
    x = np.random.default_rng(1).uniform(-3, 8, size=(100, 3))
    y = LimitsNormalizer().fit(x).normalize(x)
    np.testing.assert_allclose(y.min(axis=0), -1.0, atol=1e-12)
    np.testing.assert_allclose(y.max(axis=0), 1.0, atol=1e-12)
    g = GaussianNormalizer().fit(x).normalize(x)
    np.testing.assert_allclose(g.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(g.std(axis=0), 1.0, atol=1e-12)


@pytest.mark.parametrize("env", ["hopper", "halfcheetah-medium-v2", "Walker2d-v4"])
def test_normalized_score_references(env):
    lo, hi = D4RL_REF_SCORES[env.split("-")[0].lower()]
    assert d4rl_normalized_score(env, lo) == pytest.approx(0.0, abs=1e-9)
    assert d4rl_normalized_score(env, hi) == pytest.approx(100.0)
    np.testing.assert_allclose(d4rl_normalized_score(env, np.array([lo, hi])), [0.0, 100.0], atol=1e-9)


def test_reference_values_match_d4rl_infos():
    assert D4RL_REF_SCORES["hopper"] == (-20.272305, 3234.3)
    assert D4RL_REF_SCORES["halfcheetah"] == (-280.178953, 12135.0)
    assert D4RL_REF_SCORES["walker2d"] == (1.629008, 4592.3)
    with pytest.raises(ValueError, match="no D4RL reference"):
        d4rl_normalized_score("CartPole-v1", 1.0)


def test_no_warning_when_env_matches(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_d4rl(path, env="Hopper-v4")
