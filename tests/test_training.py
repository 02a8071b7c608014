"""Tests for trajgen.training: optimisation, schedule, EMA, clipping, checkpoints, resume, DDP."""

from __future__ import annotations

import math
import os
import random
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trajgen.training import (
    CheckpointError,
    Trainer,
    TrainerConfig,
    atomic_write,
    latest_checkpoint,
    load_weights,
    lr_multiplier,
    seed_everything,
)
from trajgen.training import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
W_TRUE = torch.tensor([[1.0, -2.0], [0.5, 0.0], [0.0, 3.0], [-1.0, 1.0]])


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models run fastest single-threaded, and do not suffer from a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_model(hidden: int = 16, dropout: float = 0.1) -> nn.Module:
    """Tiny MLP [B, 4] -> [B, 2]; dropout makes resume depend on the torch RNG state."""
    return nn.Sequential(nn.Linear(4, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 2))


def sample_batch(g: torch.Generator) -> dict[str, torch.Tensor]:
    """Linear regression batch: x [32, 4], y [32, 2]."""
    x = torch.randn(32, 4, generator=g)
    return {"x": x, "y": x @ W_TRUE}


def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MSE plus tiny noise from torch, NumPy and Python RNGs, so resume must restore all three."""
    noise = 0.01 * torch.randn_like(batch["y"])
    jitter = 1.0 + 1e-3 * (random.random() + float(np.random.rand()))
    mse = ((model(batch["x"]) - batch["y"] - noise) ** 2).mean()
    return {"loss": mse * jitter, "mse": mse.detach()}


def tuple_loss_fn(model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
    """Loss for (x, y) batches from a TensorDataset."""
    x, y = batch
    return ((model(x) - y - 0.01 * torch.randn_like(y)) ** 2).mean()


def config(tmp_path: Path, **kw: object) -> TrainerConfig:
    base: dict[str, object] = {
        "steps": 30,
        "lr": 1e-2,
        "warmup_steps": 5,
        "min_lr_ratio": 0.1,
        "grad_clip": 1.0,
        "ema_decay": 0.9,
        "log_every": 10,
        "checkpoint_every": 1000,
        "out_dir": str(tmp_path),
        "progress": False,
        "tensorboard": False,
        "device": "cpu",
        "seed": 0,
    }
    base.update(kw)
    return TrainerConfig(**base)  # type: ignore[arg-type]


def make_trainer(tmp_path: Path, data: object = sample_batch, fn: object = loss_fn, **kw: object) -> Trainer:
    seed_everything(123)
    return Trainer(make_model(), fn, data, config(tmp_path, **kw))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ optimisation


def test_loss_goes_down(tmp_path: Path) -> None:
    trainer = make_trainer(
        tmp_path, steps=150, lr=2e-2, warmup_steps=10, log_every=25, ema_decay=0.99, tensorboard=True
    )
    out = trainer.fit()
    trainer.close()
    losses = out["history"]["loss"]
    assert out["step"] == 150 and len(losses) == 6
    assert losses[-1] < 0.1 * losses[0]
    assert set(out["history"]) >= {"step", "loss", "lr", "grad_norm", "steps_per_sec", "mse"}
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    x = torch.randn(64, 4)
    with torch.no_grad():
        ema_err = ((trainer.ema_model(x) - x @ W_TRUE) ** 2).mean()
    assert not trainer.ema_model.training and ema_err < losses[0]


def test_lr_schedule_closed_form(tmp_path: Path) -> None:
    warmup, total, lr, r = 10, 110, 1e-3, 0.2
    f = lambda s: lr_multiplier(s, warmup_steps=warmup, total_steps=total, min_lr_ratio=r)
    assert f(0) == pytest.approx(1 / warmup)
    assert f(warmup - 1) == pytest.approx(1.0)  # end of warm-up
    assert f(warmup) == pytest.approx(1.0)
    assert f(warmup + (total - warmup) // 2) == pytest.approx((1 + r) / 2)  # halfway through the cosine
    assert f(total) == pytest.approx(r)  # end
    assert f(warmup + 25) == pytest.approx(r + (1 - r) * 0.5 * (1 + math.cos(math.pi * 0.25)))
    trainer = make_trainer(tmp_path, steps=total, warmup_steps=warmup, lr=lr, min_lr_ratio=r)
    seen = []
    for _ in range(total):
        seen.append(trainer.train_step(sample_batch(trainer.stream.generator))["lr"].item())
    assert seen == pytest.approx([lr * f(s) for s in range(total)], rel=1e-6)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(lr * r)


def test_ema_one_step_closed_form(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, ema_decay=0.99)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train_step(sample_batch(torch.Generator().manual_seed(0)))
    d = min(0.99, (1 + 0) / (10 + 0))  # warm-up decay after the first update = 0.1
    for e, p0, p1 in zip(trainer.ema_model.parameters(), before, trainer.model.parameters()):
        torch.testing.assert_close(e, d * p0 + (1 - d) * p1.detach(), rtol=0, atol=1e-7)
        assert not e.requires_grad


def test_grad_clip_bounds_norm(tmp_path: Path) -> None:
    def big_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return 1e3 * ((model(batch["x"]) - batch["y"]) ** 2).mean()

    trainer = make_trainer(tmp_path, fn=big_loss, grad_clip=0.5)
    metrics = trainer.train_step(sample_batch(torch.Generator().manual_seed(0)))
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.model.parameters()]))
    assert metrics["grad_norm"] > 0.5
    assert clipped <= 0.5 * (1 + 1e-5)


def test_amp_modes_on_cpu(tmp_path: Path) -> None:
    assert make_trainer(tmp_path, amp="auto").amp_dtype is None  # auto = off on CPU
    trainer = make_trainer(tmp_path, amp="bf16")
    assert trainer.amp_dtype == torch.bfloat16
    m = trainer.train_step(sample_batch(torch.Generator().manual_seed(0)))
    assert torch.isfinite(m["loss"]) and next(trainer.model.parameters()).dtype == torch.float32
    fp16 = make_trainer(tmp_path, amp="fp16", steps=3)
    assert fp16.amp_dtype == torch.float16 and fp16.scaler is not None
    fp16.fit()
    assert torch.load(tmp_path / "checkpoints" / "step_00000003" / "trainer_state.pt", weights_only=True)[
        "scaler"
    ]


def test_bad_config_and_loss_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="amp must be one of"):
        TrainerConfig(amp="fp8")
    trainer = make_trainer(tmp_path, fn=lambda m, b: (m(b["x"]) - b["y"]) ** 2)
    with pytest.raises(ValueError, match="scalar"):
        trainer.train_step(sample_batch(torch.Generator().manual_seed(0)))


# ------------------------------------------------------------------------------------------ checkpoints


def test_atomic_write_leaves_no_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "file.bin"
    atomic_write(target, lambda f: f.write(b"old"))

    def failing(f: object) -> None:
        f.write(b"partial")  # type: ignore[attr-defined]
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, failing)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]


def test_failed_checkpoint_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = make_trainer(tmp_path, steps=10, checkpoint_every=5)
    trainer.fit(until=5)
    good = latest_checkpoint(trainer.checkpoint_dir)

    def boom(*a: object, **k: object) -> None:
        raise OSError("simulated crash while writing trainer state")

    monkeypatch.setattr(ckpt.torch, "save", boom)
    with pytest.raises(OSError, match="simulated crash"):
        trainer.fit()
    monkeypatch.undo()
    assert latest_checkpoint(trainer.checkpoint_dir) == good
    assert not (trainer.checkpoint_dir / "step_00000010").exists()  # no half-written step dir
    assert not list(trainer.checkpoint_dir.rglob("*.tmp"))
    fresh = make_trainer(tmp_path, steps=10, checkpoint_every=5)
    assert fresh.resume(tmp_path) == 5


def test_checkpoint_contents_and_weights_only(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, steps=4, checkpoint_every=2, keep_checkpoints=1)
    trainer.fit()
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000004"]
    step_dir = root / "step_00000004"
    assert sorted(p.name for p in step_dir.iterdir()) == [
        "ema.safetensors",
        "model.safetensors",
        "trainer_state.pt",
    ]
    state = torch.load(step_dir / "trainer_state.pt", weights_only=True)
    assert state["step"] == 4 and state["config"]["steps"] == 4 and state["world_size"] == 1
    assert set(state) >= {"optimizer", "scheduler", "ranks", "config"}
    assert set(state["ranks"][0]["rng"]) == {"python", "numpy", "torch", "cuda"}
    assert state["ranks"][0]["data"]["kind"] == "sampler"
    model = load_weights(make_model(), step_dir)
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), trainer.model.state_dict().values())
    )
    ema = safetensors.torch.load_file(step_dir / "ema.safetensors")
    assert all(torch.equal(ema[k], v) for k, v in trainer.ema_model.state_dict().items())
    with pytest.raises(CheckpointError, match="weights_only"):
        ckpt.save_trainer_state(tmp_path / "bad.pt", {"format_version": 1, "obj": object()})


def test_corrupt_checkpoint_names_path(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, steps=2)
    step_dir = trainer.fit()["checkpoint"]
    weights = Path(step_dir) / "model.safetensors"
    weights.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match=str(weights)):
        make_trainer(tmp_path, steps=2).resume(step_dir)
    state = Path(step_dir) / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:50])
    with pytest.raises(CheckpointError, match=str(state)):
        make_trainer(tmp_path, steps=2).resume(step_dir)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        make_trainer(tmp_path, steps=2).resume(tmp_path / "nowhere")


def test_mismatched_checkpoint_is_clear(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, steps=2)
    step_dir = trainer.fit()["checkpoint"]
    with pytest.raises(
        CheckpointError, match=r"shape mismatches.*0\.weight: checkpoint \(16, 4\) vs model \(8, 4\)"
    ):
        load_weights(make_model(hidden=8), step_dir)
    with pytest.raises(CheckpointError, match=r"missing keys \(2\): 4\.weight, 4\.bias"):
        load_weights(nn.Sequential(*make_model(), nn.Linear(2, 2)), step_dir)
    seed_everything(0)
    other = Trainer(make_model(hidden=8), loss_fn, sample_batch, config(tmp_path, steps=2))
    with pytest.raises(CheckpointError, match="does not match the model"):
        other.resume(step_dir)


# ------------------------------------------------------------------------------------------ resume


def _data(kind: str) -> tuple[object, object]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(200, 4, generator=g)
    ds = TensorDataset(x, x @ W_TRUE)
    if kind == "sampler":
        return sample_batch, loss_fn
    if kind == "dataset":  # Trainer builds the DataLoader: 200 // 16 = 12 batches per epoch
        return ds, tuple_loss_fn
    return DataLoader(ds, batch_size=16, shuffle=True, drop_last=True), tuple_loss_fn


@pytest.mark.parametrize("kind", ["sampler", "dataset", "dataloader"])
def test_resume_is_bit_exact(tmp_path: Path, kind: str) -> None:
    n, k = 30, 13  # k is mid-epoch for the dataset kinds (12 batches per epoch)
    data, fn = _data(kind)
    full = make_trainer(tmp_path / "full", data=data, fn=fn, steps=n, batch_size=16)
    full.fit()

    data, fn = _data(kind)
    first = make_trainer(tmp_path / "split", data=data, fn=fn, steps=n, batch_size=16)
    first.fit(until=k)
    assert first.step == k
    del first

    data, fn = _data(kind)
    second = make_trainer(tmp_path / "split", data=data, fn=fn, steps=n, batch_size=16)
    assert not all(torch.equal(a, b) for a, b in zip(second.model.parameters(), full.model.parameters()))
    second.fit(resume=True)
    assert second.step == n
    for name, a, b in [("model", full.model, second.model), ("ema", full.ema_model, second.ema_model)]:
        for (key, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(ta, tb), f"{name}.{key} differs after resume"
    sa, sb = full.optimizer.state_dict()["state"], second.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    assert second.scheduler.last_epoch == full.scheduler.last_epoch == n
    sa, sb = full.stream.state_dict(), second.stream.state_dict()
    assert sa.keys() == sb.keys() and all(
        torch.equal(sa[key], sb[key]) if isinstance(sa[key], torch.Tensor) else sa[key] == sb[key]
        for key in sa
    )


# ------------------------------------------------------------------------------------------ DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(out_dir: Path, *args: str) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(REPO / "tests" / "_ddp_worker.py"),
        str(out_dir),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout}\n{proc.stderr}"


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(path)


def test_ddp_gloo_two_ranks_agree(tmp_path: Path) -> None:
    _torchrun(tmp_path, "--steps", "12")
    r0, r1 = _weights(tmp_path / "rank0.safetensors"), _weights(tmp_path / "rank1.safetensors")
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # ranks hold identical weights
    b0 = _weights(tmp_path / "rank0_batch.safetensors")["x"]
    b1 = _weights(tmp_path / "rank1_batch.safetensors")["x"]
    assert not torch.equal(b0, b1)  # each rank draws its own data
    state = torch.load(tmp_path / "checkpoints" / "step_00000012" / "trainer_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    assert not torch.equal(state["ranks"][0]["data"]["generator"], state["ranks"][1]["data"]["generator"])
    assert not list(tmp_path.glob("tb"))  # tensorboard off in the worker; rank 1 never creates files


@pytest.mark.slow
def test_ddp_gloo_resume_is_bit_exact(tmp_path: Path) -> None:
    _torchrun(tmp_path / "full", "--steps", "12")
    _torchrun(tmp_path / "split", "--steps", "12", "--until", "7")
    _torchrun(tmp_path / "split", "--steps", "12", "--resume")
    for rank in (0, 1):
        a = _weights(tmp_path / "full" / f"rank{rank}.safetensors")
        b = _weights(tmp_path / "split" / f"rank{rank}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_auto_amp_trains(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, device="cuda", steps=60, amp="auto", checkpoint_every=30)
    assert trainer.amp_dtype == torch.bfloat16
    out = trainer.fit()
    assert out["history"]["loss"][-1] < out["history"]["loss"][0]
    fresh = make_trainer(tmp_path, device="cuda", steps=60, amp="auto")
    assert fresh.resume(tmp_path) == 60
