"""Schedules, prediction conversions and losses against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from trajgen.diffusion import (
    EDM,
    VE,
    DiffusionLoss,
    Flow,
    VPCosine,
    VPDiscrete,
    VPLinear,
    conversion_coefficients,
    convert,
    make_schedule,
    sample_times,
    target,
)

SCHEDULES = [VPLinear(), VPCosine(), VPDiscrete.linear(), VPDiscrete.scaled_linear(), EDM(), VE(), Flow()]
IDS = [repr(s) for s in SCHEDULES]
T = torch.linspace(0.02, 0.98, 25, dtype=torch.float64)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=IDS)
def test_logsnr_inverse_roundtrip(schedule):
    back = schedule.t_of_logsnr(schedule.logsnr(T))
    assert torch.allclose(back, T, atol=1e-12)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=IDS)
def test_logsnr_matches_alpha_sigma(schedule):
    expected = torch.log(schedule.alpha(T) ** 2 / schedule.sigma(T) ** 2)
    assert torch.allclose(schedule.logsnr(T), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=IDS)
def test_derivatives_match_finite_differences(schedule):
    t = torch.linspace(0.05, 0.95, 9, dtype=torch.float64) + 1.3e-4  # off the discrete table's knots
    h = 1e-6
    fd_alpha = (schedule.alpha(t + h) - schedule.alpha(t - h)) / (2 * h)
    fd_sigma = (schedule.sigma(t + h) - schedule.sigma(t - h)) / (2 * h)
    assert torch.allclose(schedule.d_alpha(t), fd_alpha, rtol=1e-5, atol=1e-6)
    assert torch.allclose(schedule.d_sigma(t), fd_sigma, rtol=1e-5, atol=1e-6)


def test_vp_schedules_preserve_variance():
    for schedule in [VPLinear(), VPCosine(), VPDiscrete.linear()]:
        assert torch.allclose(schedule.alpha(T) ** 2 + schedule.sigma(T) ** 2, torch.ones_like(T), atol=1e-12)


def test_vp_linear_closed_form():
    # log alpha(t) = -t^2 (b1 - b0) / 4 - t b0 / 2 (Song et al. 2021)
    s = VPLinear(0.1, 20.0)
    expected = torch.exp(-0.25 * T**2 * 19.9 - 0.5 * T * 0.1)
    assert torch.allclose(s.alpha(T), expected, rtol=1e-14)


def test_discrete_schedule_hits_alphas_cumprod_at_training_steps():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    s = VPDiscrete(betas)
    n = torch.arange(1000)
    assert torch.allclose(s.alpha(s.time_of_step(n)) ** 2, alphas_cumprod, rtol=1e-12)
    assert torch.allclose(s.step_of_time(s.time_of_step(n)), n.double())
    assert float(s.alpha(0.0)) == 1.0 and float(s.sigma(0.0)) == 0.0


def test_scaled_linear_table():
    s = VPDiscrete.scaled_linear(1000, 1e-4, 0.02)
    expected = torch.linspace(1e-2, 0.02**0.5, 1000, dtype=torch.float64) ** 2
    assert torch.allclose(s.betas, expected)


def test_edm_time_uniform_is_karras_rho_grid():
    s = EDM(0.002, 80.0, 7.0)
    i = torch.arange(11, dtype=torch.float64)
    karras = (80 ** (1 / 7) + i / 10 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert torch.allclose(s.sigma(1 - i / 10), karras, rtol=1e-12)


def test_flow_path():
    s = Flow()
    assert torch.allclose(s.alpha(T), 1 - T) and torch.allclose(s.sigma(T), T)
    assert float(s.logsnr(1.0)) == -math.inf


@pytest.mark.parametrize("schedule", [VPLinear(), EDM(), Flow(), VPDiscrete.linear()], ids=repr)
@pytest.mark.parametrize("src", ["eps", "x0", "v", "flow"])
@pytest.mark.parametrize("dst", ["eps", "x0", "v", "flow"])
def test_conversions_recover_targets(schedule, src, dst):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 3, generator=g, dtype=torch.float64)
    t = torch.rand(6, generator=g, dtype=torch.float64) * 0.9 + 0.05
    x_t = schedule.add_noise(x0, t, eps)
    got = convert(target(src, schedule, t, x0, eps), x_t, t, schedule, src, dst)
    assert torch.allclose(got, target(dst, schedule, t, x0, eps), rtol=1e-9, atol=1e-9)


def test_flow_velocity_is_path_derivative():
    s = VPLinear()
    x0, eps = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    t = torch.full((4,), 0.4, dtype=torch.float64)
    h = 1e-6
    fd = (s.add_noise(x0, t + h, eps) - s.add_noise(x0, t - h, eps)) / (2 * h)
    assert torch.allclose(target("flow", s, t, x0, eps), fd, atol=1e-7)


def test_singular_conversion_raises():
    with pytest.raises(ValueError, match="cannot convert"):
        conversion_coefficients("eps", "x0", Flow(), torch.tensor(1.0, dtype=torch.float64))


def test_sample_times_truncated_discrete():
    s = VPDiscrete.scaled_linear()
    t = sample_times(s, 20000, t_max=50 / 1000, generator=torch.Generator().manual_seed(0))
    steps = torch.round(s.step_of_time(t.double()))
    assert steps.min() == 0 and steps.max() == 49
    assert torch.allclose(s.step_of_time(t.double()), steps, atol=1e-4)  # only integer training steps


def test_sample_times_continuous_range():
    t = sample_times(VPLinear(), 10000, t_max=0.3, generator=torch.Generator().manual_seed(0))
    assert float(t.min()) >= 1e-3 and float(t.max()) <= 0.3
    assert abs(float(t.mean()) - (0.3 + 1e-3) / 2) < 0.01


def test_sample_times_bad_range():
    with pytest.raises(ValueError, match="t_max"):
        sample_times(VPLinear(), 4, t_max=1.5)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "flow"])
def test_loss_zero_for_oracle_and_positive_otherwise(prediction):
    s = VPLinear()
    x0 = torch.randn(32, 5, dtype=torch.float64)
    loss = DiffusionLoss(s, prediction, noise_fn=lambda x: fixed_eps)
    fixed_eps = torch.randn_like(x0)

    def oracle(x_t, t):
        return target(prediction, s, t, x0, fixed_eps)

    assert torch.allclose(loss(oracle, x0), torch.zeros(32, dtype=torch.float64), atol=1e-18)
    wrong = loss(lambda x_t, t: torch.zeros_like(x_t), x0)
    assert bool((wrong > 0).all())


def test_edm_weighting_closed_form():
    s = EDM()
    loss = DiffusionLoss(s, "x0", weighting="edm", sigma_data=0.5)
    t = torch.tensor([0.2, 0.7], dtype=torch.float64)
    sigma = s.sigma(t)
    expected = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    assert torch.allclose(loss.weight(t), expected)


def test_min_snr_weighting():
    s = VPLinear()
    loss = DiffusionLoss(s, "eps", weighting="min-snr", min_snr_gamma=5.0)
    t = torch.tensor([0.01, 0.9], dtype=torch.float64)
    snr = torch.exp(s.logsnr(t))
    assert torch.allclose(loss.weight(t), torch.clamp(snr, max=5.0))
    assert loss.loss_space == "x0"


def test_loss_rejects_bad_input():
    loss = DiffusionLoss(VPLinear(), "eps")
    with pytest.raises(ValueError, match="x0"):
        loss(lambda x, t: x, torch.tensor([[float("nan")]]))
    with pytest.raises(ValueError, match="net output"):
        loss(lambda x, t: x[:, :1], torch.randn(3, 2))
    with pytest.raises(ValueError, match="prediction"):
        DiffusionLoss(VPLinear(), "score")


@pytest.mark.parametrize("schedule", SCHEDULES, ids=IDS)
def test_fixed_time_coefficients_reproduce_add_noise_exactly(schedule) -> None:
    x0, noise = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), torch.randn(4, 3)
    for t in (0.009, 0.3, 0.77):
        alpha, sigma = schedule.coefficients(t)
        assert isinstance(alpha, float) and isinstance(sigma, float)
        torch.testing.assert_close(alpha * x0 + sigma * noise, schedule.add_noise(x0, torch.tensor(t), noise),
                                   atol=0, rtol=0)


def test_make_schedule():
    assert isinstance(make_schedule("vp-discrete", table="scaled-linear"), VPDiscrete)
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("sigmoid")
