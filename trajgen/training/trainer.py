"""The training loop: AdamW, warm-up + cosine LR, grad clipping, EMA, AMP, checkpoints, DDP, logging.

Typical use::

    cfg = TrainerConfig(steps=20_000, lr=3e-4, out_dir="runs/unet")
    trainer = Trainer(model, loss_fn, sample_batch, cfg)   # loss_fn(model, batch) -> scalar
    summary = trainer.fit(resume=True)                     # continues from out_dir if possible
    sampler_net = trainer.ema_model

Run the same script under ``torchrun --nproc_per_node=N`` to train data-parallel: the Trainer
detects the launch, initialises the process group, wraps the model in DistributedDataParallel,
gives each rank its own data seed, and lets only rank 0 log and write checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR

from trajgen.training import checkpoint as ckpt
from trajgen.training import distributed as D
from trajgen.training.data import derive_seed, make_stream
from trajgen.training.ema import EMA

if TYPE_CHECKING:
    from typing_extensions import Self

LossOutput = torch.Tensor | Mapping[str, torch.Tensor]
LossFn = Callable[[nn.Module, Any], LossOutput]
_AMP_MODES = ("auto", "bf16", "fp16", "off")


@dataclass
class TrainerConfig:
    """Hyperparameters and run settings of ``Trainer`` (plain values only; stored in checkpoints)."""

    steps: int = 10_000
    """total number of optimizer updates ``fit()`` runs to (a resumed run continues up to it)"""
    batch_size: int = 256
    """per-rank batch size; used only when ``data`` is a map-style Dataset (a ``sample_batch``
    callable or a DataLoader chooses its own)"""
    lr: float = 2e-4
    """peak learning rate, reached at the end of warm-up"""
    weight_decay: float = 1e-4
    """AdamW decoupled weight decay; applied to parameters with >= 2 dims only (not biases/norms)"""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (beta1, beta2)"""
    warmup_steps: int = 500
    """linear warm-up length: lr = lr * (step + 1) / warmup_steps for step < warmup_steps"""
    min_lr_ratio: float = 0.1
    """cosine decay from lr (end of warm-up) to lr * min_lr_ratio (at ``steps``)"""
    grad_clip: float | None = 1.0
    """max global L2 norm of gradients; None disables clipping (the norm is still logged)"""
    ema_decay: float | None = 0.999
    """EMA decay of the weights; None disables EMA (``ema_model`` is then the trained model)"""
    ema_warmup: bool = True
    """use decay min(ema_decay, (1 + step) / (10 + step)) so early averages forget the init"""
    amp: str = "auto"
    """mixed precision: "auto" (bf16 autocast on CUDA, off on CPU), "bf16", "fp16" (with a
    GradScaler) or "off"; weights, optimizer state and EMA stay float32"""
    log_every: int = 100
    """log loss / lr / grad norm / steps per second every this many steps (rank 0)"""
    checkpoint_every: int = 1000
    """write a checkpoint every this many steps and at the end; <= 0 disables checkpoints"""
    keep_checkpoints: int = 3
    """keep only the newest this many checkpoints; 0 keeps all"""
    out_dir: str = "runs/trajgen"
    """run directory: checkpoints in out_dir/checkpoints, tensorboard events in out_dir/tb"""
    seed: int = 0
    """seed for Python/NumPy/torch global RNGs (offset per rank) and the data stream"""
    device: str | None = None
    """"cpu", "cuda", "cuda:1", ...; None picks cuda (cuda:LOCAL_RANK under torchrun) if available"""
    num_workers: int = 0
    """DataLoader worker processes; used only when ``data`` is a map-style Dataset"""
    progress: bool = True
    """show a rich progress bar (rank 0, and only when stderr is a terminal)"""
    tensorboard: bool = True
    """write tensorboard scalars to out_dir/tb (rank 0)"""
    find_unused_parameters: bool = False
    """passed to DistributedDataParallel; set True if some parameters get no gradient in a step"""

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        checks = [
            (self.steps > 0, f"steps must be > 0, got {self.steps}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (0.0 <= self.min_lr_ratio <= 1.0, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"),
            (
                self.grad_clip is None or self.grad_clip > 0,
                f"grad_clip must be > 0 or None, got {self.grad_clip}",
            ),
            (
                self.ema_decay is None or 0.0 <= self.ema_decay < 1.0,
                f"ema_decay must be in [0, 1) or None, got {self.ema_decay}",
            ),
            (self.amp in _AMP_MODES, f"amp must be one of {_AMP_MODES}, got {self.amp!r}"),
            (self.log_every > 0, f"log_every must be > 0, got {self.log_every}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (tuples as lists) for checkpoints and logs."""
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR factor for optimizer update ``step`` (0-based): linear warm-up, then cosine decay.

    ``(step + 1) / warmup_steps`` for ``step < warmup_steps``; afterwards
    ``min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + cos(pi * p))`` with
    ``p = (step - warmup_steps) / (total_steps - warmup_steps)`` clamped to [0, 1].
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    p = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global RNG and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DistributedDataParallel and/or ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def move_to(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested dict/list/tuple) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, Mapping):
        moved = {k: move_to(v, device) for k, v in batch.items()}
        try:
            return type(batch)(moved)  # type: ignore[call-arg]
        except TypeError:  # mapping types without a dict constructor (e.g. defaultdict)
            return moved
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(move_to(v, device) for v in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def split_loss(out: LossOutput) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(scalar loss, extra scalar metrics) from a loss_fn output (tensor or dict with "loss")."""
    if isinstance(out, Mapping):
        if "loss" not in out:
            raise KeyError(f"loss_fn returned a dict without a 'loss' entry (keys: {list(out)})")
        loss = out["loss"]
        extras = {
            k: v.detach()
            for k, v in out.items()
            if k != "loss" and isinstance(v, torch.Tensor) and v.numel() == 1
        }
    else:
        loss, extras = out, {}
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a scalar tensor (reduce with .mean()); got {shape}")
    return loss, extras


class Trainer:
    """Trains ``model`` by minimising ``loss_fn(model, batch)`` over batches from ``data``.

    Args:
        model: the network (any ``nn.Module``); moved to the config's device. Build it after
            ``seed_everything(seed)`` for reproducible initialisation; under torchrun rank 0's
            initial weights are broadcast to every rank.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor`` or ``{"loss": scalar, **metrics}``.
            Under torchrun ``model`` is the DDP wrapper (call it; reach attributes through
            ``unwrap_model(model)``). Draw noise from torch's global RNG: it is checkpointed.
        data: ``sample_batch(generator) -> batch`` callable, map-style Dataset, DataLoader or
            iterable (see ``trajgen.training.data``). Batches are nested tensors moved to device.
        config: a ``TrainerConfig``.

    Attributes:
        model: the unwrapped trained module. ema_model: the EMA copy (eval mode) to sample from.
        step: optimizer updates done. optimizer / scheduler / scaler: AdamW, LambdaLR, GradScaler|None.
    """

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, data: Any, config: TrainerConfig | None = None
    ) -> None:
        self.config = config = config or TrainerConfig()
        self.dist = D.dist_info_from_env()
        self.device = D.resolve_device(config.device, self.dist)
        self._owns_process_group = D.init_distributed(self.dist, self.device)
        seed_everything(derive_seed(config.seed, self.dist.rank, 1) if self.dist.rank else config.seed)

        self.model = unwrap_model(model).to(self.device)
        self.train_model: nn.Module = self.model
        if self.dist.is_distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(
                self.model, device_ids=ids, find_unused_parameters=config.find_unused_parameters
            )
        self.loss_fn = loss_fn
        # after the DDP wrap: DDP has broadcast rank 0's weights, so every rank's EMA starts equal
        self.ema = (
            EMA(self.model, config.ema_decay, config.ema_warmup) if config.ema_decay is not None else None
        )
        self.optimizer = self._make_optimizer()
        self.scheduler = LambdaLR(self.optimizer, self._lr_lambda())
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        self.stream = make_stream(
            data,
            seed=config.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            batch_size=config.batch_size,
            num_workers=config.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        self.step = 0
        self.out_dir = Path(config.out_dir)
        self.checkpoint_dir = self.out_dir / ckpt.CHECKPOINT_SUBDIR
        self._writer: Any = None

    # ------------------------------------------------------------------ construction helpers

    @property
    def ema_model(self) -> nn.Module:
        """The EMA module (eval mode) for sampling; the trained module itself when EMA is off.

        The EMA module's parameters do not require grad, and PyTorch picks other CPU kernels for those than for the
        same weights loaded into a fresh module, so outputs differ in the last bits: return the saved file's copy to
        users (as ``train_driving_policy`` and ``train_offline`` do) when later runs must reproduce them exactly."""
        return self.ema.model if self.ema is not None else self.model

    def _make_optimizer(self) -> torch.optim.AdamW:
        """AdamW with weight decay on >= 2-dim parameters only."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model has no parameters with requires_grad=True; nothing to train")
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [
            {"params": decay, "weight_decay": self.config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        fused = self.device.type == "cuda" and all(p.is_floating_point() for p in params)
        return torch.optim.AdamW(
            [g for g in groups if g["params"]],
            lr=self.config.lr,
            betas=self.config.betas,
            fused=fused or None,
        )

    def _lr_lambda(self) -> Callable[[int], float]:
        """The LambdaLR factor function bound to this config."""
        c = self.config

        def factor(step: int) -> float:
            return lr_multiplier(
                step, warmup_steps=c.warmup_steps, total_steps=c.steps, min_lr_ratio=c.min_lr_ratio
            )

        return factor

    def _amp_dtype(self) -> torch.dtype | None:
        """Autocast dtype for the configured AMP mode (None = full precision)."""
        mode = self.config.amp
        if mode == "auto":
            return torch.bfloat16 if self.device.type == "cuda" else None
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[mode]

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------ one step

    def train_step(self, batch: Any) -> dict[str, torch.Tensor]:
        """One optimizer update on ``batch``; returns detached metrics (loss, grad_norm, lr, extras).

        Gradients stay in ``.grad`` (clipped) until the next step zeroes them.
        """
        self.train_model.train()
        self.optimizer.zero_grad(set_to_none=True)
        batch = move_to(batch, self.device)
        with self._autocast():
            loss, extras = split_loss(self.loss_fn(self.train_model, batch))
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        grad_norm = self._clip_gradients()
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model, self.step)
        self.step += 1
        return {"loss": loss.detach().float(), "grad_norm": grad_norm, "lr": torch.tensor(lr), **extras}

    def _clip_gradients(self) -> torch.Tensor:
        """Clip the global grad norm to ``grad_clip``; returns the norm before clipping."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            raise RuntimeError("no parameter received a gradient; does loss_fn depend on the model?")
        max_norm = self.config.grad_clip if self.config.grad_clip is not None else math.inf
        return torch.nn.utils.clip_grad_norm_(params, max_norm).detach()

    # ------------------------------------------------------------------ fit

    def fit(self, resume: bool = False, until: int | None = None) -> dict[str, Any]:
        """Train until ``config.steps`` updates (or ``until``); returns a summary dict.

        Args:
            resume: first continue from the newest checkpoint in ``out_dir/checkpoints`` if any.
            until: stop after this many total updates (<= ``config.steps``) and checkpoint, e.g. to
                split a run over time-limited jobs; the LR schedule still spans ``config.steps``.
        Returns:
            ``{"step", "final_loss", "wall_time_s", "steps_per_sec", "checkpoint", "history"}``;
            ``history`` maps "step", "loss", "lr", "grad_norm", "steps_per_sec" (and extra loss
            metrics) to lists with one entry per logging interval.
        """
        if resume and ckpt.latest_checkpoint(self.checkpoint_dir) is not None:
            self.resume(self.checkpoint_dir)
        end = self.config.steps if until is None else min(until, self.config.steps)
        history: dict[str, list[float]] = {}
        start_time, last_path = time.perf_counter(), None
        window = _Window()
        with self._progress() as bar:
            task = bar.add_task("train", total=self.config.steps, completed=self.step, loss=float("nan"))
            while self.step < end:
                metrics = self.train_step(self.stream.next())
                window.add(metrics)
                if self.step % self.config.log_every == 0 or self.step == end:
                    row = window.flush(self.step)
                    self._log(row, history)
                    bar.update(task, loss=row["loss"])
                bar.update(task, completed=self.step)
                if self._should_checkpoint(end):
                    last_path = self.save()
        wall = time.perf_counter() - start_time
        if self._writer is not None:
            self._writer.flush()
        losses = history.get("loss", [])
        return {
            "step": self.step,
            "final_loss": losses[-1] if losses else float("nan"),
            "wall_time_s": wall,
            "steps_per_sec": window.steps_done / wall if wall > 0 else float("nan"),
            "checkpoint": str(last_path) if last_path else None,
            "history": history,
        }

    def _should_checkpoint(self, end: int) -> bool:
        every = self.config.checkpoint_every
        return every > 0 and (self.step % every == 0 or self.step == end)

    def _progress(self) -> Any:
        """A rich Progress bar, disabled off rank 0, when not wanted, or when stderr is no terminal."""
        with ckpt.preserve_rng():  # importing rich draws from Python's `random`
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        enabled = self.config.progress and self.dist.is_main and sys.stderr.isatty()
        return Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("loss {task.fields[loss]:.4g}"),
            disable=not enabled,
            transient=False,
        )

    def _log(self, row: dict[str, float], history: dict[str, list[float]]) -> None:
        """Append a log row to ``history`` and tensorboard (rank 0)."""
        for key, value in row.items():
            history.setdefault(key, []).append(value)
        if not (self.dist.is_main and self.config.tensorboard):
            return
        with ckpt.preserve_rng():
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(self.out_dir / "tb"))
            for key, value in row.items():
                if key != "step":
                    self._writer.add_scalar(f"train/{key}", value, int(row["step"]))

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """This rank's trainer state except weights (weights_only-safe)."""
        return {
            "format_version": ckpt.FORMAT_VERSION,
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "has_ema": self.ema is not None,
            "config": self.config.to_dict(),
            "world_size": self.dist.world_size,
        }

    def _rank_state(self) -> dict[str, Any]:
        """Per-rank state: global RNGs and data position."""
        return {"rng": ckpt.capture_rng_state(), "data": self.stream.state_dict()}

    def save(self, root: str | Path | None = None) -> Path:
        """Write a checkpoint for the current step (collective under torchrun; rank 0 writes).

        Args:
            root: checkpoints dir; default ``out_dir/checkpoints``.
        Returns:
            the step dir written.
        """
        root = Path(root) if root is not None else self.checkpoint_dir
        with ckpt.preserve_rng():  # writing must not change the run it records
            ranks = D.all_gather_objects(self._rank_state())
            error: str | None = None
            if self.dist.is_main:
                try:
                    self._write(root, ranks)
                except Exception as e:
                    if not self.dist.is_distributed:
                        raise
                    error = f"{type(e).__name__}: {e}"
            error = D.broadcast_object(error)  # also a barrier: nobody moves on before the write ends
        if error is not None:
            raise ckpt.CheckpointError(f"rank 0 failed to write the checkpoint: {error}")
        return root / ckpt.step_dir_name(self.step)

    def _write(self, root: Path, ranks: list[dict[str, Any]]) -> None:
        """Rank 0: write weights, EMA and the trainer state with every rank's RNG/data state."""
        state = {**self.state_dict(), "ranks": ranks}
        ema = self.ema.model.state_dict() if self.ema is not None else None
        ckpt.write_checkpoint(
            root, self.step, self.model.state_dict(), ema, state, keep=self.config.keep_checkpoints
        )

    def resume(self, path: str | Path) -> int:
        """Load weights, EMA, optimizer, scheduler, scaler, RNG and data position; returns the step.

        Args:
            path: a run's out_dir, its checkpoints dir, or a step dir.
        Raises:
            CheckpointError: nothing found, corrupt files, or a model/optimizer mismatch.
        """
        step_dir = ckpt.resolve_checkpoint(path)
        model_state, ema_state, state = ckpt.read_checkpoint(step_dir)
        self._load_weights(model_state, ema_state, step_dir)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise ckpt.CheckpointError(
                f"optimizer/scheduler state in {step_dir / ckpt.STATE_FILE} does not match this model: {e}"
            ) from e
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self._warn_config_changes(state["config"])
        self._load_rank_state(state)
        self.step = int(state["step"])
        D.barrier()
        return self.step

    def _load_weights(
        self, model_state: dict[str, torch.Tensor], ema_state: dict[str, torch.Tensor] | None, step_dir: Path
    ) -> None:
        ckpt.check_state_dict(self.model, model_state, str(step_dir / ckpt.MODEL_FILE))
        self.model.load_state_dict(model_state)
        if self.ema is not None:
            if ema_state is None:
                warnings.warn(
                    f"{step_dir} has no EMA weights; starting the EMA from the loaded weights", stacklevel=3
                )
                ema_state = model_state
            ckpt.check_state_dict(self.ema.model, ema_state, str(step_dir / ckpt.EMA_FILE))
            self.ema.model.load_state_dict(ema_state)

    def _load_rank_state(self, state: Mapping[str, Any]) -> None:
        """Restore this rank's RNG and data position (re-seed if the world size changed)."""
        ranks = state["ranks"]
        if len(ranks) != self.dist.world_size:
            warnings.warn(
                f"checkpoint was written by {len(ranks)} ranks, resuming with {self.dist.world_size}: "
                "RNG and data streams are re-seeded, so the run is not bit-exact",
                stacklevel=3,
            )
            seed_everything(derive_seed(self.config.seed, self.dist.rank, int(state["step"]), 2))
            return
        mine = ranks[self.dist.rank]
        ckpt.restore_rng_state(mine["rng"])
        self.stream.load_state_dict(mine["data"])

    def _warn_config_changes(self, saved: Mapping[str, Any]) -> None:
        """Warn about changed hyperparameters that alter the optimisation."""
        ignore = {
            "steps",
            "out_dir",
            "log_every",
            "checkpoint_every",
            "keep_checkpoints",
            "progress",
            "tensorboard",
            "device",
            "num_workers",
        }
        now = self.config.to_dict()
        changed = [
            f"{k}: {saved[k]!r} -> {now[k]!r}"
            for k in now
            if k not in ignore and k in saved and saved[k] != now[k]
        ]
        if changed and self.dist.is_main:
            warnings.warn("resuming with changed config: " + "; ".join(changed), stacklevel=3)

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        """Close the tensorboard writer and destroy the process group if this Trainer created it."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._owns_process_group:
            D.destroy_distributed()
            self._owns_process_group = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_LAST_VALUE = {"lr"}  # logged as the value at the log step; every other metric as the window mean


class _Window:
    """Accumulates metrics between log steps without forcing a device sync every step."""

    def __init__(self) -> None:
        self.last: Mapping[str, torch.Tensor] = {}
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.steps_done = 0
        self.t0 = time.perf_counter()

    def add(self, metrics: Mapping[str, torch.Tensor]) -> None:
        self.last = metrics
        for k, v in metrics.items():
            v = v.detach().float().reshape(())
            self.sums[k] = self.sums[k] + v.to(self.sums[k].device) if k in self.sums else v.clone()
        self.count += 1
        self.steps_done += 1

    def flush(self, step: int) -> dict[str, float]:
        """Mean of each metric over the window (loss also over ranks), lr at ``step``, and steps/s."""
        now = time.perf_counter()
        row: dict[str, float] = {"step": float(step)}
        for k, v in self.sums.items():
            v = self.last[k] if k in _LAST_VALUE else v / self.count
            if k == "loss":
                v = D.mean_across_ranks(v)
            row[k] = float(v.item())
        row["steps_per_sec"] = self.count / max(now - self.t0, 1e-9)
        self.sums, self.count, self.t0 = {}, 0, now
        return row
