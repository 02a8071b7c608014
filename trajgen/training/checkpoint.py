"""Checkpoint files: atomic writes, safetensors weights, a weights_only-loadable state file.

A checkpoint is one directory per saved step under ``<out_dir>/checkpoints``::

    checkpoints/
        latest                      text file holding the name of the newest complete step dir
        step_00001000/
            model.safetensors       trained weights (unwrapped module, no "module." prefix)
            ema.safetensors         EMA weights (absent when EMA is disabled)
            trainer_state.pt        everything else; loads with torch.load(..., weights_only=True)

Every file is written to a temporary file in the same directory, flushed, fsync'ed and moved into
place with ``os.replace``, so a reader never sees a half-written file. ``trainer_state.pt`` is
written last and marks the directory complete; ``latest`` is updated after it.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import safetensors.torch
import torch
from torch import nn

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "trainer_state.pt"
LATEST_FILE = "latest"
CHECKPOINT_SUBDIR = "checkpoints"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not match the model it is loaded into."""


# ---------------------------------------------------------------------------------------------
# atomic writes


def _fsync_dir(directory: Path) -> None:
    """Persist a rename in ``directory`` (best effort; not supported on every platform)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> None:
    """Write a file so that ``path`` holds either its old content or the complete new content.

    ``write(f)`` fills a temporary file in the same directory; it is flushed, fsync'ed and renamed
    over ``path`` with ``os.replace``. If anything raises, the temporary file is removed and the
    exception propagates; ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """``atomic_write`` for a ready byte string."""
    atomic_write(path, lambda f: f.write(data))


# ---------------------------------------------------------------------------------------------
# weights (safetensors)


def _plain_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, storage-unshared copies of a state dict's tensors (safetensors needs that)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"state dict entry {key!r} is a {type(value).__name__}, not a tensor; safetensors "
                "stores tensors only (move extra state into a buffer)"
            )
        t = value.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:  # tied / overlapping tensors: safetensors refuses shared storage
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def save_weights(path: str | os.PathLike[str], state: Mapping[str, torch.Tensor]) -> None:
    """Atomically write a state dict as safetensors. Tied tensors are stored once per key."""
    data = safetensors.torch.save(_plain_state_dict(state), metadata={"format": "pt"})
    atomic_write_bytes(path, data)


def read_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a safetensors file into CPU tensors; a missing or corrupt file raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return safetensors.torch.load(path.read_bytes())
    except Exception as e:  # safetensors raises its own error type for a bad header
        raise CheckpointError(
            f"could not read weights from {path}: {e}. The file is corrupt or truncated; "
            "resume from an earlier checkpoint directory instead."
        ) from e


def check_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError listing missing/unexpected keys and shape mismatches.

    Args:
        module: the module the state is meant for.
        state: name -> tensor, as read from ``source``.
        source: where the state came from (a path), used in the message.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and isinstance(v, torch.Tensor) and tuple(state[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or shapes):
        return
    lines = [f"checkpoint {source} does not match the model ({type(module).__name__}):"]
    for title, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", shapes),
    ):
        if items:
            shown = ", ".join(items[:10]) + (f", ... ({len(items) - 10} more)" if len(items) > 10 else "")
            lines.append(f"  {title} ({len(items)}): {shown}")
    lines.append("  Build the model with the same architecture/config it was trained with.")
    raise CheckpointError("\n".join(lines))


def load_weights(module: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load a safetensors file into ``module`` strictly (keys and shapes must match); returns it.

    ``path`` may be a ``.safetensors`` file or a step directory (then ``model.safetensors``).
    """
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    state = read_weights(path)
    check_state_dict(module, state, str(path))
    module.load_state_dict(state, strict=True)
    return module


# ---------------------------------------------------------------------------------------------
# trainer state (torch.save, weights_only-loadable)

_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.Size)


def _check_plain(obj: Any, where: str = "state") -> None:
    """Raise CheckpointError if ``obj`` holds anything a weights_only load would reject."""
    if isinstance(obj, (torch.Tensor, *_PLAIN)):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (int, str)):
                raise CheckpointError(f"{where}: key {k!r} is a {type(k).__name__}; use str or int")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise CheckpointError(
        f"{where} is a {type(obj).__name__}; trainer state may hold only tensors, numbers, strings, "
        "None and dicts/lists/tuples of them (it is loaded with torch.load(weights_only=True))"
    )


def save_trainer_state(path: str | os.PathLike[str], state: Mapping[str, Any]) -> None:
    """Validate that ``state`` is weights_only-safe, then write it atomically with torch.save."""
    state = dict(state)
    _check_plain(state)
    atomic_write(path, lambda f: torch.save(state, f))


def read_trainer_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``; a missing or corrupt file raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"could not read trainer state from {path}: {e}. The file is corrupt, truncated, or holds "
            "objects that weights_only loading refuses; resume from an earlier checkpoint directory."
        ) from e
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a trajgen trainer state (format_version {FORMAT_VERSION})")
    return state


# ---------------------------------------------------------------------------------------------
# RNG state as tensors and primitives


def capture_rng_state() -> dict[str, Any]:
    """State of Python's, NumPy's, torch's CPU and (if initialised) CUDA global generators."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {
            "version": py_version,
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss_next": py_gauss,
        },
        "numpy": {
            "kind": str(np_kind),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of ``capture_rng_state``."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss_next"]))
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["kind"],
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            torch.cuda.set_rng_state(cuda_states[torch.cuda.current_device() % len(cuda_states)])


@contextlib.contextmanager
def preserve_rng() -> Iterator[None]:
    """Run a block without disturbing the global RNGs (e.g. a lazy import that calls ``random``).

    Logging, progress bars and checkpoint writes happen in one run and not in its resumed twin;
    keeping them RNG-neutral is what makes resume bit-exact.
    """
    state = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)


# ---------------------------------------------------------------------------------------------
# checkpoint directories


def step_dir_name(step: int) -> str:
    """``step_00001000`` for step 1000 (zero-padded so names sort by step)."""
    return f"step_{step:08d}"


def _complete_step_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) for every step dir under ``root`` that has its state file, sorted by step."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir() and (child / STATE_FILE).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    """Newest complete step dir under ``root`` (a checkpoints dir), or None if there is none.

    Follows the ``latest`` pointer when it names a complete directory, else scans step dirs.
    """
    root = Path(root)
    pointer = root / LATEST_FILE
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / STATE_FILE).is_file():
            return candidate
    complete = _complete_step_dirs(root)
    return complete[-1][1] if complete else None


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """Turn a run dir, a checkpoints dir or a step dir into the step dir to load.

    Raises CheckpointError if nothing complete is found.
    """
    path = Path(path)
    if (path / STATE_FILE).is_file() or _STEP_DIR.match(path.name):
        return path
    for root in (path, path / CHECKPOINT_SUBDIR):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise CheckpointError(
        f"no complete checkpoint under {path} (looked for {CHECKPOINT_SUBDIR}/step_*/{STATE_FILE}); "
        "pass a run's out_dir, its checkpoints dir, or one step dir"
    )


def write_checkpoint(
    root: str | os.PathLike[str],
    step: int,
    model_state: Mapping[str, torch.Tensor],
    ema_state: Mapping[str, torch.Tensor] | None,
    trainer_state: Mapping[str, Any],
    keep: int = 0,
) -> Path:
    """Write one step dir under ``root`` (weights first, state file last, then ``latest``).

    Args:
        root: the checkpoints dir.
        step: number of optimizer updates done.
        model_state / ema_state: state dicts of the trained and EMA modules.
        trainer_state: weights_only-safe dict (optimizer, scheduler, RNG, data, config, ...).
        keep: keep only the newest ``keep`` complete step dirs (0 keeps all).
    Returns:
        the step dir.
    """
    root = Path(root)
    step_dir = root / step_dir_name(step)
    created = not step_dir.exists()
    step_dir.mkdir(parents=True, exist_ok=True)
    (step_dir / STATE_FILE).unlink(missing_ok=True)  # mark incomplete while rewriting
    try:
        save_weights(step_dir / MODEL_FILE, model_state)
        if ema_state is not None:
            save_weights(step_dir / EMA_FILE, ema_state)
        else:
            (step_dir / EMA_FILE).unlink(missing_ok=True)
        save_trainer_state(step_dir / STATE_FILE, trainer_state)
    except BaseException:
        if created:  # leave no half-filled directory behind
            shutil.rmtree(step_dir, ignore_errors=True)
        raise
    atomic_write_bytes(root / LATEST_FILE, (step_dir.name + "\n").encode())
    if keep > 0:
        for _, old in _complete_step_dirs(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return step_dir


def read_checkpoint(
    step_dir: str | os.PathLike[str],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict[str, Any]]:
    """Read (model state, EMA state or None, trainer state) from a step dir."""
    step_dir = Path(step_dir)
    if not step_dir.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {step_dir}")
    trainer_state = read_trainer_state(step_dir / STATE_FILE)
    model_state = read_weights(step_dir / MODEL_FILE)
    ema_path = step_dir / EMA_FILE
    ema_state = read_weights(ema_path) if trainer_state.get("has_ema") else None
    return model_state, ema_state, trainer_state
