"""D4RL-format offline-RL datasets: HDF5 read/write, episode windows, normalizers, normalized scores.

File layout (D4RL's; ``N`` transitions, flat over episodes)::

    observations       [N, obs_dim] float32
    actions            [N, act_dim] float32
    rewards            [N]          float32
    terminals          [N]          bool     the episode ended in a true terminal state
    timeouts           [N]          bool     the episode was cut by the time limit
    next_observations  [N, obs_dim] float32  optional (old D4RL files lack it)
    infos/qpos         [N, nq]      float64  optional simulator state
    infos/qvel         [N, nv]      float64  optional
    file attributes: env, policy, seed, plus any extras (optional when reading: D4RL files lack them)

An episode ends at every index where ``terminals | timeouts``. Anything else in a file (D4RL's
``metadata/*`` and other ``infos/*`` groups) is ignored.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

REQUIRED_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")
OPTIONAL_KEYS = ("next_observations", "infos/qpos", "infos/qvel")
_NDIM = {"observations": 2, "actions": 2, "rewards": 1, "terminals": 1, "timeouts": 1,
         "next_observations": 2, "infos/qpos": 2, "infos/qvel": 2}
_DTYPE = {"observations": np.float32, "actions": np.float32, "rewards": np.float32, "terminals": np.bool_,
          "timeouts": np.bool_, "next_observations": np.float32, "infos/qpos": np.float64,
          "infos/qvel": np.float64}
_FINITE_KEYS = ("observations", "actions", "rewards", "next_observations")
CONTINUITY_TOL = 1e-6
"""``next_observations[i]`` and ``observations[i+1]`` must agree within rtol = atol = this value."""

# ----------------------------------------------------------------------------------------------------
# validation (shared by write_d4rl and load_d4rl)
# ----------------------------------------------------------------------------------------------------


def _check_arrays(arrays: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """Check keys, ndim, dtypes, lengths and finiteness; return the arrays cast to the layout's dtypes."""
    for key in REQUIRED_KEYS:
        if key not in arrays:
            raise ValueError(f"{source}: missing required key '{key}' (required: {', '.join(REQUIRED_KEYS)})")
    out: dict[str, np.ndarray] = {}
    for key in (*REQUIRED_KEYS, *OPTIONAL_KEYS):
        if key not in arrays:
            continue
        a = np.asarray(arrays[key])
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
            raise ValueError(f"{source}: '{key}' has non-numeric dtype {a.dtype}")
        if a.ndim != _NDIM[key]:
            raise ValueError(f"{source}: '{key}' must have {_NDIM[key]} dimensions, got shape {a.shape}")
        out[key] = a.astype(bool) if _DTYPE[key] is np.bool_ else a.astype(_DTYPE[key], copy=False)
    n = len(out["observations"])
    for key, a in out.items():
        if len(a) != n:
            raise ValueError(f"{source}: '{key}' has {len(a)} rows but 'observations' has {n}")
    if n == 0:
        raise ValueError(f"{source}: 'observations' is empty")
    if "next_observations" in out and out["next_observations"].shape != out["observations"].shape:
        raise ValueError(f"{source}: 'next_observations' has shape {out['next_observations'].shape} but "
                         f"'observations' has {out['observations'].shape}")
    for key in _FINITE_KEYS:
        if key in out and not np.isfinite(out[key]).all():
            bad = np.flatnonzero(~np.isfinite(out[key]).reshape(n, -1).all(axis=1))[0]
            raise ValueError(f"{source}: '{key}' contains NaN or inf (first at row {bad})")
    return out


def _check_episodes(arrays: Mapping[str, np.ndarray], source: str, allow_truncated_end: bool) -> None:
    """The last transition ends an episode; ``next_observations`` continues into ``observations`` within one."""
    done = arrays["terminals"] | arrays["timeouts"]
    if not done[-1] and not allow_truncated_end:
        raise ValueError(f"{source}: the last transition (row {len(done) - 1}) is neither a terminal nor a "
                         "timeout, so the last episode is unfinished; set its 'timeouts' entry, or pass "
                         "allow_truncated_end=True to load it as a truncated episode")
    if "next_observations" not in arrays:
        return
    nxt, obs = arrays["next_observations"][:-1], arrays["observations"][1:]
    close = np.isclose(nxt, obs, rtol=CONTINUITY_TOL, atol=CONTINUITY_TOL).all(axis=1)
    broken = np.flatnonzero(~close & ~done[:-1])
    if len(broken):
        i = int(broken[0])
        gap = float(np.abs(nxt[i] - obs[i]).max())
        raise ValueError(f"{source}: 'next_observations'[{i}] != 'observations'[{i + 1}] (max |diff| {gap:.3g}) "
                         f"inside an episode; {len(broken)} such rows in all")


# ----------------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------------


def write_d4rl(path: str | os.PathLike, data: Mapping[str, np.ndarray], *, env: str, policy: str, seed: int,
               **attrs: Any) -> Path:
    """Validate ``data`` and write it atomically as a D4RL-layout HDF5 file.

    Args:
        path: destination ``.hdf5``; written to a temporary file in the same directory, then renamed.
        data: the arrays of the module docstring, keyed by their names (``"infos/qpos"`` for the
            simulator state). Cast to the layout's dtypes. The last transition must end an episode.
        env / policy / seed: stored as file attributes; ``load_d4rl(env=...)`` checks ``env``.
        **attrs: extra file attributes (anything h5py stores: str, numbers, numeric arrays).

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    arrays = _check_arrays(data, str(path))
    _check_episodes(arrays, str(path), allow_truncated_end=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            for key, a in arrays.items():
                f.create_dataset(key, data=a)
            f.attrs.update({"env": env, "policy": policy, "seed": int(seed), **attrs})
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _attr_value(v: Any) -> Any:
    """HDF5 attribute -> plain Python (bytes -> str, numpy scalars -> Python scalars)."""
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


def _read_file(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read the layout's datasets and the file attributes; HDF5 failures become ValueError naming the path."""
    try:
        with h5py.File(path, "r") as f:
            arrays = {k: f[k][()] for k in (*REQUIRED_KEYS, *OPTIONAL_KEYS)
                      if k in f and isinstance(f[k], h5py.Dataset)}
            metadata = {k: _attr_value(v) for k, v in f.attrs.items()}
    except OSError as e:
        raise ValueError(f"{path}: not a readable HDF5 file ({e})") from e
    return arrays, metadata


def load_d4rl(path: str | os.PathLike, *, env: str | None = None,
              allow_truncated_end: bool = False) -> D4RLDataset:
    """Load and validate a D4RL-layout HDF5 file (ours or an original D4RL download).

    Args:
        path: the ``.hdf5`` file.
        env: if given, the file's ``env`` attribute must equal it (ValueError naming both). A file
            without an ``env`` attribute (original D4RL downloads carry no such metadata) cannot be
            checked: it loads with a ``UserWarning`` instead of failing.
        allow_truncated_end: accept a last transition that is neither terminal nor timeout; the tail
            then counts as an episode cut short.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable/corrupt file, missing keys, wrong ndim, non-numeric dtype, mismatched
            lengths, NaN/inf, wrong env, unfinished last episode, or ``next_observations`` that do not
            continue into ``observations`` within an episode. Messages name the file and the key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such D4RL file")
    raw, metadata = _read_file(path)
    arrays = _check_arrays(raw, str(path))
    _check_episodes(arrays, str(path), allow_truncated_end)
    _check_env(path, metadata, env)
    return D4RLDataset(
        observations=arrays["observations"], actions=arrays["actions"], rewards=arrays["rewards"],
        terminals=arrays["terminals"], timeouts=arrays["timeouts"],
        next_observations=arrays.get("next_observations"), qpos=arrays.get("infos/qpos"),
        qvel=arrays.get("infos/qvel"), metadata=metadata,
    )


def _check_env(path: Path, metadata: Mapping[str, Any], env: str | None) -> None:
    """Compare the requested env with the file's ``env`` attribute (warn when the file has none)."""
    if env is None:
        return
    if "env" not in metadata:
        warnings.warn(f"{path}: file has no 'env' attribute (e.g. an original D4RL download); "
                      f"cannot check that it was recorded in '{env}'", UserWarning, stacklevel=3)
        return
    if metadata["env"] != env:
        raise ValueError(f"{path}: file was recorded in env '{metadata['env']}' but env='{env}' was requested")


@dataclass(frozen=True, eq=False)
class D4RLDataset:
    """A loaded D4RL dataset: flat transitions ``[N, ...]`` over all episodes (see the module docstring).

    ``next_observations``, ``qpos`` ([N, nq]) and ``qvel`` ([N, nv]) are ``None`` when the file lacks them.
    ``metadata`` holds the file attributes (empty for original D4RL files).
    """

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminals: np.ndarray
    timeouts: np.ndarray
    next_observations: np.ndarray | None = None
    qpos: np.ndarray | None = None
    qvel: np.ndarray | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.observations)

    @property
    def obs_dim(self) -> int:
        return self.observations.shape[1]

    @property
    def act_dim(self) -> int:
        return self.actions.shape[1]

    def array(self, key: str) -> np.ndarray:
        """The array stored under ``key`` (also accepts the file names ``infos/qpos``, ``infos/qvel``)."""
        attr = key.removeprefix("infos/")
        value = getattr(self, attr, None) if attr in _FIELDS else None
        if not isinstance(value, np.ndarray):
            raise KeyError(f"dataset has no array '{key}'; available: {', '.join(self.keys())}")
        return value

    def keys(self) -> list[str]:
        """Names of the arrays present."""
        return [k for k in _FIELDS if isinstance(getattr(self, k), np.ndarray)]

    def episodes(self) -> list[tuple[int, int]]:
        """``(start, end)`` index pairs, end exclusive, split after every ``terminals | timeouts``.

        A tail without a final terminal/timeout (loaded with ``allow_truncated_end``) is the last episode.
        """
        ends = np.flatnonzero(self.terminals | self.timeouts) + 1
        if len(ends) == 0 or ends[-1] != len(self):
            ends = np.append(ends, len(self))
        starts = np.concatenate([[0], ends[:-1]])
        return [(int(s), int(e)) for s, e in zip(starts, ends)]

    def episode_returns(self) -> np.ndarray:
        """Undiscounted return of each episode, ``[E]`` float64."""
        sums = np.add.reduceat(self.rewards.astype(np.float64), [s for s, _ in self.episodes()])
        return sums


_FIELDS = ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations", "qpos", "qvel")

# ----------------------------------------------------------------------------------------------------
# windows
# ----------------------------------------------------------------------------------------------------

PAD_MODES = ("repeat-last", "zero")
DEFAULT_PAD: dict[str, str] = {"observations": "repeat-last", "next_observations": "repeat-last",
                               "qpos": "repeat-last"}
"""Per-key padding past an episode's end: states repeat their last value (the system stays where it
ended, as in Diffuser); every other key (actions, rewards, flags, qvel) is padded with zeros."""


class SequenceDataset(Dataset):
    """Diffuser-style windows of ``horizon`` steps: one window per start index of every episode.

    A window starting at ``t`` in episode ``[s, e)`` covers ``t .. t+H-1``; steps at or past ``e`` are
    padded (see ``pad``) and marked invalid in ``mask``. ``len(self) == len(dataset)`` (every transition
    starts one window).

    Args:
        dataset: a ``D4RLDataset``.
        horizon: window length H >= 1.
        keys: arrays to return (``observations``, ``actions``, ``rewards``, ``terminals``, ``timeouts``,
            ``next_observations``, ``qpos``, ``qvel``); 1-D arrays come back as ``[H, 1]``.
        pad: ``"repeat-last"`` or ``"zero"`` for every key, or a mapping key -> mode; keys it leaves out
            use ``DEFAULT_PAD`` (observations repeat-last, actions zero). ``None`` = ``DEFAULT_PAD``.
        normalizers: optional fitted ``Normalizer`` per key, applied before padding (so "zero" padding
            is zero in normalized units).
    """

    def __init__(self, dataset: D4RLDataset, horizon: int, *, keys: tuple[str, ...] = ("observations", "actions"),
                 pad: str | Mapping[str, str] | None = None,
                 normalizers: Mapping[str, Normalizer] | None = None) -> None:
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        self.horizon = horizon
        self.keys = tuple(keys)
        self.pad = _resolve_pad(self.keys, pad)
        self.arrays = {k: _as_2d(dataset.array(k)) for k in self.keys}
        for k, norm in (normalizers or {}).items():
            if k not in self.arrays:
                raise ValueError(f"normalizer given for '{k}' which is not in keys {self.keys}")
            self.arrays[k] = norm.normalize(self.arrays[k]).astype(np.float32)
        episodes = dataset.episodes()
        self.starts = np.concatenate([np.arange(s, e) for s, e in episodes])
        self.ends = np.concatenate([np.full(e - s, e) for s, e in episodes])

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        """``{key: [H, D] float32, "mask": [H] bool}`` for window ``i``."""
        return {k: v[0] for k, v in self._gather(np.asarray([i])).items()}

    def sample_batch(self, generator: torch.Generator, batch_size: int) -> dict[str, Tensor]:
        """``batch_size`` windows drawn uniformly with replacement: ``{key: [B, H, D], "mask": [B, H]}``."""
        idx = torch.randint(len(self), (batch_size,), generator=generator).numpy()
        return self._gather(idx)

    def batch_sampler(self, batch_size: int) -> Callable[[torch.Generator], dict[str, Tensor]]:
        """``sample_batch`` with the batch size bound: the ``sample_batch(generator)`` the Trainer takes."""
        return lambda generator: self.sample_batch(generator, batch_size)

    def _gather(self, idx: np.ndarray) -> dict[str, Tensor]:
        """Windows for window indices ``idx [B]``: ``{key: [B, H, D], "mask": [B, H]}``."""
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"window index out of range for {len(self)} windows")
        t = self.starts[idx][:, None] + np.arange(self.horizon)          # [B, H]
        end = self.ends[idx][:, None]
        mask = t < end
        rows = np.minimum(t, end - 1)                                      # repeat-last by construction
        out = {}
        for k in self.keys:
            x = self.arrays[k][rows]                                       # [B, H, D]
            if self.pad[k] == "zero":
                x = np.where(mask[..., None], x, 0)
            out[k] = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        out["mask"] = torch.from_numpy(mask)
        return out


def _as_2d(a: np.ndarray) -> np.ndarray:
    """``[N] -> [N, 1]``; ``[N, D]`` unchanged."""
    return a[:, None] if a.ndim == 1 else a


def _resolve_pad(keys: tuple[str, ...], pad: str | Mapping[str, str] | None) -> dict[str, str]:
    """Padding mode per key from a single mode, a partial mapping, or ``None`` (defaults)."""
    given = {k: pad for k in keys} if isinstance(pad, str) else dict(pad or {})
    modes = {k: given.get(k, DEFAULT_PAD.get(k, "zero")) for k in keys}
    for k, m in {**given, **modes}.items():
        if m not in PAD_MODES:
            raise ValueError(f"pad for '{k}' must be one of {PAD_MODES}, got {m!r}")
        if k not in keys:
            raise ValueError(f"pad given for '{k}' which is not in keys {keys}")
    return modes


# ----------------------------------------------------------------------------------------------------
# normalizers
# ----------------------------------------------------------------------------------------------------


class Normalizer:
    """Per-feature affine map ``y = (x - shift) / scale`` over the last axis; subclasses set shift/scale.

    Works on numpy arrays and tensors ``[..., D]``. ``state_dict()`` holds plain tensors only, so it can
    be stored in a safetensors / ``weights_only`` checkpoint; ``Normalizer.from_state_dict`` rebuilds
    the right subclass from its keys.
    """

    _keys: tuple[str, str] = ("shift", "scale")

    def __init__(self) -> None:
        self.shift: Tensor | None = None
        self.scale: Tensor | None = None

    def fit(self, array: np.ndarray | Tensor) -> Normalizer:
        """Fit the statistics on ``array [..., D]`` (all leading axes pooled); returns ``self``."""
        raise NotImplementedError

    def normalize(self, x: np.ndarray | Tensor) -> np.ndarray | Tensor:
        """``[..., D]`` raw -> normalized, same type, dtype and device as ``x``."""
        shift, scale = self._params_like(x)
        return (x - shift) / scale

    def unnormalize(self, y: np.ndarray | Tensor) -> np.ndarray | Tensor:
        """``[..., D]`` normalized -> raw."""
        shift, scale = self._params_like(y)
        return y * scale + shift

    def _params_like(self, x: np.ndarray | Tensor) -> tuple[Any, Any]:
        if self.shift is None or self.scale is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit(array) or from_state_dict")
        if isinstance(x, Tensor):
            return self.shift.to(x.device, x.dtype), self.scale.to(x.device, x.dtype)
        dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float64
        return self.shift.numpy().astype(dtype), self.scale.numpy().astype(dtype)

    def state_dict(self) -> dict[str, Tensor]:
        """Subclass-specific statistics as float64 tensors ``[D]``."""
        raise NotImplementedError

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor]) -> Normalizer:
        """Rebuild from ``state_dict()``; on the base class the subclass is chosen by the keys."""
        targets = [cls] if cls is not Normalizer else [GaussianNormalizer, LimitsNormalizer]
        for sub in targets:
            if set(sub._keys) <= set(state):
                return sub._from_stats(*(torch.as_tensor(state[k], dtype=torch.float64) for k in sub._keys))
        raise ValueError(f"state_dict keys {sorted(state)} match no normalizer "
                         f"(Gaussian: {GaussianNormalizer._keys}, Limits: {LimitsNormalizer._keys})")

    @classmethod
    def _from_stats(cls, a: Tensor, b: Tensor) -> Normalizer:
        raise NotImplementedError


def _as_2d_float64(array: np.ndarray | Tensor) -> np.ndarray:
    a = array.detach().cpu().numpy() if isinstance(array, Tensor) else np.asarray(array)
    a = a.astype(np.float64).reshape(-1, a.shape[-1])
    if len(a) == 0:
        raise ValueError("cannot fit a normalizer on an empty array")
    return a


class GaussianNormalizer(Normalizer):
    """``(x - mean) / max(std, min_std)`` per feature."""

    _keys = ("mean", "std")

    def __init__(self, min_std: float = 1e-6) -> None:
        super().__init__()
        self.min_std = min_std

    def fit(self, array: np.ndarray | Tensor) -> GaussianNormalizer:
        a = _as_2d_float64(array)
        self.shift = torch.from_numpy(a.mean(axis=0))
        self.scale = torch.from_numpy(np.maximum(a.std(axis=0), self.min_std))
        return self

    def state_dict(self) -> dict[str, Tensor]:
        """``{"mean": [D], "std": [D]}`` (std already floored)."""
        self._params_like(np.zeros(1))
        return {"mean": self.shift.clone(), "std": self.scale.clone()}

    @classmethod
    def _from_stats(cls, mean: Tensor, std: Tensor) -> GaussianNormalizer:
        norm = cls()
        norm.shift, norm.scale = mean, std
        return norm


class LimitsNormalizer(Normalizer):
    """Per-feature ``[min, max] -> [-1, 1]`` (Diffuser's): ``2 (x - min) / (max - min) - 1``.

    Features with ``max - min < min_range`` use ``min_range`` as the range (they map to about -1).
    """

    _keys = ("min", "max")

    def __init__(self, min_range: float = 1e-6) -> None:
        super().__init__()
        self.min_range = min_range
        self.min: Tensor | None = None
        self.max: Tensor | None = None

    def fit(self, array: np.ndarray | Tensor) -> LimitsNormalizer:
        a = _as_2d_float64(array)
        self._set(torch.from_numpy(a.min(axis=0)), torch.from_numpy(a.max(axis=0)))
        return self

    def _set(self, lo: Tensor, hi: Tensor) -> None:
        self.min, self.max = lo, hi
        half_range = torch.clamp(hi - lo, min=self.min_range) / 2
        self.shift, self.scale = lo + half_range, half_range   # y = (x - mid) / half_range

    def state_dict(self) -> dict[str, Tensor]:
        """``{"min": [D], "max": [D]}``."""
        self._params_like(np.zeros(1))
        return {"min": self.min.clone(), "max": self.max.clone()}

    @classmethod
    def _from_stats(cls, lo: Tensor, hi: Tensor) -> LimitsNormalizer:
        norm = cls()
        norm._set(lo, hi)
        return norm


# ----------------------------------------------------------------------------------------------------
# scores
# ----------------------------------------------------------------------------------------------------

D4RL_REF_SCORES: dict[str, tuple[float, float]] = {
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
    "ant": (-325.6, 3879.7),
}
"""D4RL's reference episode returns ``(random, expert)`` per MuJoCo locomotion env: ``REF_MIN_SCORE`` and
``REF_MAX_SCORE`` of ``d4rl/infos.py`` in Farama-Foundation/D4RL (the same values for every dataset of an
env, v0/v1/v2: e.g. ``hopper-medium-v2`` uses ``hopper-random-v0``'s)."""


def d4rl_normalized_score(env_name: str, returns: float | np.ndarray) -> float | np.ndarray:
    """D4RL normalized score ``100 * (R - R_random) / (R_expert - R_random)`` with D4RL's references.

    Args:
        env_name: ``"hopper"``, a D4RL dataset id (``"hopper-medium-v2"``) or a Gymnasium id
            (``"Hopper-v4"``); the part before the first ``-``, lower-cased, picks the reference.
        returns: undiscounted episode return(s).

    Returns:
        The score(s), same shape as ``returns`` (d4rl's ``get_normalized_score`` is this divided by 100).
    """
    base = env_name.split("-", 1)[0].lower()
    if base not in D4RL_REF_SCORES:
        raise ValueError(f"no D4RL reference scores for '{env_name}'; known: {', '.join(D4RL_REF_SCORES)}")
    lo, hi = D4RL_REF_SCORES[base]
    score = 100.0 * (np.asarray(returns, dtype=np.float64) - lo) / (hi - lo)
    return float(score) if score.ndim == 0 else score
