"""End-to-end: train a trajectory diffusion model with the shared loss/trainer/solvers and score it."""

from __future__ import annotations

import json

import pytest
import torch

from trajgen.data import ArcTrajectories
from trajgen.training.recipes import ArcsConfig, evaluate_arcs, train_arcs


def test_arc_family_fit_recovers_modes_and_speeds():
    data = ArcTrajectories()
    traj, modes = data.sample(500, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fit = data.fit(traj)
    assert torch.equal(fit["mode"], modes)
    assert float(fit["rmse"].max()) < 0.1
    noisy = data.fit(traj + 2.0 * torch.randn_like(traj))
    assert float(noisy["rmse"].median()) > 1.0  # the fit notices trajectories that are not arcs


def _untrained_scores(config: ArcsConfig) -> dict:
    from trajgen.diffusion import make_schedule
    from trajgen.nets import TemporalUnet1d
    from trajgen.training.recipes import _data_scale

    torch.manual_seed(0)
    data = ArcTrajectories(horizon=config.horizon)
    net = TemporalUnet1d(2, base_dim=config.base_dim)
    return evaluate_arcs(net, data, make_schedule("vp-discrete", table="linear"), config, _data_scale(data))


def test_short_training_run_learns_the_modes(tmp_path):
    config = ArcsConfig(steps=250, batch_size=128, base_dim=16, lr=3e-3, warmup_steps=25, eval_samples=500,
                        out_dir=str(tmp_path), progress=False, checkpoint_every=125, device="cpu")
    metrics = train_arcs(config)
    untrained = _untrained_scores(config)
    # measured: 250 steps give ~1 m median arc error and mode TV ~0.1; the untrained net is ~800 m off
    assert metrics["median_arc_rmse"] < 2.5 and metrics["median_arc_rmse"] < 0.01 * untrained["median_arc_rmse"]
    assert metrics["mode_tv"] < 0.25
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["valid_fraction"] == metrics["valid_fraction"]
    assert (tmp_path / "checkpoints" / "latest").exists()


@pytest.mark.slow
def test_full_training_run_matches_the_distribution(tmp_path):
    metrics = train_arcs(ArcsConfig(steps=1500, out_dir=str(tmp_path), progress=False, device="cpu"))
    assert metrics["mode_tv"] < 0.08
    assert metrics["valid_fraction"] > 0.6
