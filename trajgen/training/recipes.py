"""End-to-end recipes over the library: train a trajectory diffusion model, sample it, score it.

``train_arcs`` fits a temporal UNet to :class:`~trajgen.data.ArcTrajectories` (multi-modal planar
manoeuvres with known modes) with the shared loss, trainer and solvers, then scores samples exactly:
each generated trajectory is fitted with the best arc, so mode frequencies and shape errors are known.
Works under ``torchrun`` unchanged (the Trainer handles DDP).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trajgen.data.synthetic import ArcTrajectories
from trajgen.diffusion import DiffusionLoss, make_schedule
from trajgen.nets import TemporalUnet1d, count_parameters
from trajgen.solvers import Sampler
from trajgen.training.trainer import Trainer, TrainerConfig, seed_everything


@dataclass
class ArcsConfig:
    """Hyperparameters of the arc-trajectory recipe."""

    steps: int = 3000
    """optimizer updates"""
    batch_size: int = 256
    """trajectories per update"""
    lr: float = 1e-3
    """peak learning rate (AdamW, warm-up + cosine)"""
    warmup_steps: int = 100
    """linear warm-up steps"""
    base_dim: int = 32
    """UNet base channels (dim_mults (1, 2, 4): ~1.8M parameters)"""
    prediction: str = "eps"
    """what the network predicts: eps | x0 | v | flow"""
    schedule: str = "vp-discrete"
    """noise schedule name (trajgen.diffusion.SCHEDULES)"""
    solver: str = "dpmsolver++"
    """sampling solver"""
    sample_steps: int = 10
    """solver steps at evaluation"""
    eval_samples: int = 2000
    """generated trajectories scored at the end"""
    horizon: int = 16
    """waypoints per trajectory"""
    seed: int = 0
    """global seed"""
    out_dir: str = "runs/arcs"
    """checkpoints, tensorboard events and metrics.json go here"""
    checkpoint_every: int = 500
    """checkpoint period (steps)"""
    device: str | None = None
    """cpu / cuda / None (auto)"""
    progress: bool = True
    """rich progress bar"""


def train_arcs(config: ArcsConfig, *, resume: bool = False) -> dict[str, Any]:
    """Train, sample ``eval_samples`` trajectories with the EMA model, score them; returns metrics.

    Metrics: ``mode_tv`` total-variation distance between generated and true mode frequencies,
    ``valid_fraction`` share of samples within 0.25 m RMS of an arc with an in-range speed,
    ``median_arc_rmse`` (m), plus training summary numbers. Also written to ``out_dir/metrics.json``.
    """
    seed_everything(config.seed)
    data = ArcTrajectories(horizon=config.horizon)
    scale = _data_scale(data)
    schedule = make_schedule(config.schedule, **({"table": "linear"} if config.schedule == "vp-discrete" else {}))
    Sampler(schedule, config.solver, config.sample_steps, config.prediction)  # fail on bad options before training
    net = TemporalUnet1d(2, base_dim=config.base_dim)
    loss = DiffusionLoss(schedule, config.prediction)

    def sample_batch(generator: torch.Generator) -> torch.Tensor:
        return data.sample(config.batch_size, generator=generator)[0] / scale

    def loss_fn(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return loss(model, batch).mean()

    trainer = Trainer(net, loss_fn, sample_batch, TrainerConfig(
        steps=config.steps, lr=config.lr, warmup_steps=config.warmup_steps, out_dir=config.out_dir,
        seed=config.seed, checkpoint_every=config.checkpoint_every, device=config.device,
        progress=config.progress, log_every=max(1, min(100, config.steps // 10))))
    summary = trainer.fit(resume=resume)
    metrics = {"config": dataclasses.asdict(config), "parameters": count_parameters(net),
               "final_loss": summary["final_loss"], "train_wall_s": summary["wall_time_s"],
               "steps_per_sec": summary["steps_per_sec"]}
    if trainer.dist.is_main:
        metrics.update(evaluate_arcs(trainer.ema_model, data, schedule, config, scale))
        Path(config.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(config.out_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    trainer.close()
    return metrics


@torch.inference_mode()
def evaluate_arcs(model: torch.nn.Module, data: ArcTrajectories, schedule: Any, config: ArcsConfig,
                  scale: float) -> dict[str, float]:
    """Sample with ``config.solver`` and score against the arc family (see :func:`train_arcs`)."""
    device = next(model.parameters()).device
    sampler = Sampler(schedule, config.solver, config.sample_steps, config.prediction)
    g = torch.Generator(device=device).manual_seed(config.seed + 1)
    x = schedule.prior_noise((config.eval_samples, config.horizon, 2), generator=g, device=device)
    samples = sampler(model.eval(), x).cpu() * scale
    fit = data.fit(samples)
    lo, hi = data.speed_range
    valid = (fit["rmse"] < 0.25) & (fit["speed"] > 0.9 * lo) & (fit["speed"] < 1.1 * hi)
    counts = torch.bincount(fit["mode"][valid], minlength=len(data.weights)).double()
    freq = counts / counts.sum().clamp_min(1.0)
    target = torch.tensor(data.weights, dtype=torch.float64)
    target = target / target.sum()
    return {"mode_tv": float(0.5 * (freq - target).abs().sum()), "valid_fraction": float(valid.double().mean()),
            "median_arc_rmse": float(fit["rmse"].median()), "nfe": sampler.nfe,
            "mode_frequencies": [float(f) for f in freq]}


def _data_scale(data: ArcTrajectories) -> float:
    """One scalar normaliser (the data's RMS coordinate), computed from a fixed draw."""
    sample, _ = data.sample(4096, generator=torch.Generator().manual_seed(12345), dtype=torch.float64)
    return float(sample.pow(2).mean().sqrt())
