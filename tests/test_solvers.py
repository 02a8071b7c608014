"""Solvers against the exact probability-flow ODE of a Gaussian mixture (scipy DOP853 ground truth)."""

from __future__ import annotations

import math

import pytest
import torch

from trajgen.diffusion import EDM, Flow, VPCosine, VPDiscrete, VPLinear
from trajgen.diffusion.analytic import GaussianMixture
from trajgen.diffusion.predictions import convert
from trajgen.solvers import SOLVERS, Sampler, make_grid, sample

GMM = GaussianMixture.random(3, 2, seed=1)
VP = VPLinear()
T_END = 1e-3


def rel_rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())


@pytest.fixture(scope="module")
def vp_problem():
    x = VP.prior_noise((16, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return x, GMM.ode_reference(VP, x, 1.0, T_END)


def gaussian_flow_map(gmm: GaussianMixture, schedule, x: torch.Tensor, t_s: float, t_e: float) -> torch.Tensor:
    """Closed-form probability-flow map for Gaussian data: whitened coordinates are preserved."""
    C, mu = gmm.covs[0], gmm.means[0]

    def sqrtm(t: float, power: float) -> torch.Tensor:
        a, s = float(schedule.alpha(t)), float(schedule.sigma(t))
        ev, V = torch.linalg.eigh(a * a * C + s * s * torch.eye(len(mu), dtype=torch.float64))
        return V @ torch.diag(ev**power) @ V.T

    a_s, a_e = float(schedule.alpha(t_s)), float(schedule.alpha(t_e))
    return a_e * mu + (x - a_s * mu) @ (sqrtm(t_e, 0.5) @ sqrtm(t_s, -0.5)).T


def test_reference_integrator_matches_closed_form():
    gaussian = GaussianMixture.random(1, 3, seed=4)
    for schedule, t_end in [(VPLinear(), 1e-3), (EDM(), 0.0), (Flow(), 1e-3)]:
        x = schedule.prior_noise((8, 3), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        exact = gaussian_flow_map(gaussian, schedule, x, 1.0 if not isinstance(schedule, Flow) else 0.999, t_end)
        ref = gaussian.ode_reference(schedule, x, 1.0 if not isinstance(schedule, Flow) else 0.999, t_end)
        assert rel_rmse(ref, exact) < 1e-9


# (solver, order, options, expected empirical order, calls per step)
CONVERGENCE = [
    ("ddim", 1, {}, 1.0),
    ("euler", 1, {}, 1.0),
    ("dpmsolver", 1, {}, 1.0),
    ("dpmsolver", 2, {}, 2.0),
    ("dpmsolver", 3, {}, 3.0),
    ("dpmsolver++", 1, {}, 1.0),
    ("dpmsolver++", 2, {}, 2.0),
    ("dpmsolver++", 3, {}, 3.0),
    ("dpmsolver++-2s", 2, {}, 2.0),
    ("deis", 1, {}, 1.0),
    ("deis", 2, {}, 2.0),
    ("deis", 3, {}, 3.0),
    ("unipc", 1, {}, 2.0),  # UniC raises the order by one
    ("unipc", 2, {}, 3.0),
    ("unipc", 2, {"variant": "bh1"}, 3.0),
    ("heun", 2, {}, 2.0),
    ("midpoint", 2, {}, 2.0),
    ("rk4", 4, {}, 4.0),
    ("pndm", 4, {}, 2.0),  # measured: the DDIM transfer + AB on a log-SNR grid behaves as order 2
]


@pytest.mark.parametrize("solver,order,options,expected", CONVERGENCE,
                         ids=[f"{c[0]}-{c[1]}{'-' + '-'.join(map(str, c[2].values())) if c[2] else ''}" for c in CONVERGENCE])
def test_convergence_order(vp_problem, solver, order, options, expected):
    x, ref = vp_problem
    model = GMM.denoiser(VP, "eps")
    errors = []
    for steps in (32, 64, 128):
        if "lower_order_final" in SOLVERS[solver].options:
            options = {"lower_order_final": False, **options}  # measure the method's own order to the end
        sampler = Sampler(VP, solver, steps, "eps", t_end=T_END, order=order, grid="logsnr", **options)
        errors.append(rel_rmse(sampler(model, x), ref))
    empirical = math.log2(errors[-2] / errors[-1])
    assert errors[-1] < errors[0]
    assert expected - 0.3 <= empirical <= expected + 0.9, f"errors {errors}"


def test_dpmsolver_pp_3m_is_third_order_on_quadratic_x0():
    """x0_hat(lambda) = lambda^2 makes the exact solution an integral: sigma_t int e^lambda lambda^2 d lambda.
    A third-order multistep method is exact for quadratics up to its lower-order warm-up; with the
    reference code's D2 coefficient (half ours) the error would fall only at order 2."""
    from scipy.integrate import quad

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        lam = 0.5 * VP.logsnr(t.double())
        return (lam**2)[:, None].expand_as(x).to(x.dtype)

    x = torch.zeros(1, 1, dtype=torch.float64)
    lam_s, lam_e = 0.5 * float(VP.logsnr(1.0)), 0.5 * float(VP.logsnr(T_END))
    integral = quad(lambda lam: math.exp(lam) * lam * lam, lam_s, lam_e, epsabs=1e-13, epsrel=1e-13, limit=200)[0]
    exact = float(VP.sigma(T_END)) * integral
    def error(n: int, warmup: str) -> float:
        sampler = Sampler(VP, "dpmsolver++", n, "x0", t_end=T_END, order=3, grid="logsnr", warmup=warmup,
                          lower_order_final=False)
        return abs(float(sampler(model, x)) - exact)

    exact_start = [error(n, "singlestep") for n in (32, 64)]
    assert math.log2(exact_start[0] / exact_start[1]) > 2.7
    assert exact_start[-1] < 1e-6 * abs(exact)
    euler_start = [error(n, "lower-order") for n in (32, 64)]  # only the first-order warm-up step errs
    assert 1.7 < math.log2(euler_start[0] / euler_start[1]) < 2.4


@pytest.mark.parametrize("schedule,prediction,solver,order,t_start,t_end,grid", [
    (Flow(), "flow", "rk4", 4, 1.0, 1e-3, "time"),
    (Flow(), "flow", "heun", 2, 1.0, 1e-3, "time"),
    (Flow(), "x0", "dpmsolver++", 2, 1.0, 1e-3, "time"),
    (EDM(), "x0", "heun", 2, 1.0, 0.0, "time"),
    (EDM(), "x0", "unipc", 2, 1.0, 0.0, "time"),
    (VPDiscrete.linear(), "v", "dpmsolver++", 2, 1.0, 1e-3, "logsnr"),
    (VPCosine(), "eps", "deis", 3, 1.0, 1e-3, "logsnr"),
    (VPLinear(), "x0", "dpmsolver", 3, 0.6, 1e-3, "time-quadratic"),
], ids=lambda v: repr(v) if not isinstance(v, (int, float)) else str(v))
def test_every_schedule_and_prediction_converges(schedule, prediction, solver, order, t_start, t_end, grid):
    expected = {"rk4": 4, "heun": 2, "dpmsolver++": 2, "unipc": 3, "deis": 3, "dpmsolver": 3}[solver]
    x = schedule.prior_noise((12, 2), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = x if t_start == 1.0 else GMM.ode_reference(schedule, x, 1.0, t_start)
    ref = GMM.ode_reference(schedule, x, t_start, t_end)
    model = GMM.denoiser(schedule, prediction)
    options = {"lower_order_final": False} if "lower_order_final" in SOLVERS[solver].options else {}
    errors = [rel_rmse(Sampler(schedule, solver, n, prediction, t_start=t_start, t_end=t_end, order=order,
                               grid=grid, **options)(model, x), ref) for n in (40, 80)]
    assert math.log2(errors[0] / errors[1]) > expected - 0.5, f"errors {errors}"


def test_truncated_sampling_composes(vp_problem):
    """1 -> 0.3 then 0.3 -> t_end equals 1 -> t_end: exactly for DDIM on a shared grid, and up to
    discretisation for a high-order solver."""
    x, ref = vp_problem
    model = GMM.denoiser(VP, "eps")
    grid = torch.cat([torch.linspace(1.0, 0.3, 11, dtype=torch.float64)[:-1],
                      torch.linspace(0.3, T_END, 11, dtype=torch.float64)])
    full = Sampler(VP, "ddim", timesteps=grid)(model, x)
    half = Sampler(VP, "ddim", 10, t_start=1.0, t_end=0.3, grid="time")(model, x)
    split = Sampler(VP, "ddim", 10, t_start=0.3, t_end=T_END, grid="time")(model, half)
    assert torch.allclose(split, full, rtol=0, atol=1e-12)

    one = Sampler(VP, "rk4", 40, t_end=T_END)(model, x)
    first = Sampler(VP, "rk4", 20, t_end=0.3)(model, x)
    two = Sampler(VP, "rk4", 20, t_start=0.3, t_end=T_END)(model, first)
    assert rel_rmse(first, GMM.ode_reference(VP, x, 1.0, 0.3)) < 1e-4
    assert rel_rmse(one, ref) < 1e-4 and rel_rmse(two, ref) < 1e-4


STOCHASTIC = [("ddpm", {}, 1, 500), ("ddim", {"eta": 1.0}, 1, 500), ("sde-dpmsolver++", {}, 2, 100),
              ("euler", {"churn": 10.0}, 1, 300), ("heun", {"churn": 40.0}, 2, 100)]


@pytest.mark.parametrize("solver,options,order,steps", STOCHASTIC, ids=[f"{s}-{o}" for s, _, o, _ in STOCHASTIC])
def test_stochastic_solvers_reproduce_mixture_moments(solver, options, order, steps):
    """Sample means within 5 standard errors; covariance within 5% (sampling s.e. ~1.4% at n = 10^4, the
    rest first-order discretisation bias)."""
    n = 10000
    schedule = VPLinear()
    g = torch.Generator().manual_seed(3)
    x = schedule.prior_noise((n, 2), generator=g, dtype=torch.float64)
    out = Sampler(schedule, solver, steps, "eps", order=order, grid="logsnr", **options)(
        GMM.denoiser(schedule, "eps"), x, generator=g)
    mean_se = (GMM.covariance.diagonal() / n).sqrt()
    assert torch.all((out.mean(0) - GMM.mean).abs() < 5 * mean_se)
    cov_error = (torch.cov(out.T) - GMM.covariance).abs().max() / GMM.covariance.abs().max()
    assert cov_error < 0.05


def test_ddpm_is_ddim_eta_one_is_sde_dpmsolver_pp_first_order():
    """Three derivations of ancestral sampling must agree exactly given the same noise."""
    x = VP.prior_noise((7, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = GMM.denoiser(VP, "eps")
    outs = []
    for solver, options, order in [("ddpm", {}, 1), ("ddim", {"eta": 1.0}, 1), ("sde-dpmsolver++", {}, 1)]:
        outs.append(Sampler(VP, solver, 12, "eps", order=order, **options)(
            model, x, generator=torch.Generator().manual_seed(5)))
    assert torch.allclose(outs[0], outs[1], atol=1e-12) and torch.allclose(outs[0], outs[2], atol=1e-12)


def test_stochastic_solvers_use_noise_callable():
    calls = []

    def centred_noise(ref: torch.Tensor) -> torch.Tensor:
        z = torch.randn_like(ref)
        calls.append(1)
        return z - z.mean(dim=1, keepdim=True)  # zero centre of mass over the "bodies" axis

    x = torch.randn(4, 5, 3, dtype=torch.float64)
    x = x - x.mean(1, keepdim=True)
    out = sample(lambda x_t, t: torch.zeros_like(x_t), x, schedule=VP, solver="ddpm", steps=7, prediction="eps",
                 noise=centred_noise)
    assert len(calls) == 7
    assert torch.allclose(out.mean(1), torch.zeros(4, 3, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_constraint_holds_after_every_step(solver):
    """Inpainting: the first feature is pinned to its noised known value after every step."""
    known = torch.tensor(0.7, dtype=torch.float64)
    seen_times = []

    def constraint(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen_times.append(float(t[0]))
        x = x.clone()
        x[:, 0] = VP.alpha(t) * known
        return x

    x = VP.prior_noise((5, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sampler = Sampler(VP, solver, 6, "eps", t_end=T_END)
    out, traj = sampler(GMM.denoiser(VP, "eps"), x, constraint=constraint, return_trajectory=True,
                        generator=torch.Generator().manual_seed(1))
    assert traj.shape == (len(sampler.plan) + 1, 5, 2)
    assert torch.equal(out, traj[-1])
    step_times = [s.t_next for s in sampler.plan]
    assert seen_times == step_times
    for state, t in zip(traj[1:], step_times):
        assert torch.allclose(state[:, 0], VP.alpha(torch.tensor(t, dtype=torch.float64)) * known)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_batch_composition_does_not_matter(solver):
    x = VP.prior_noise((6, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = GMM.denoiser(VP, "eps")
    sampler = Sampler(VP, solver, 8, "eps", t_end=T_END)
    if sampler.stochastic:
        noise = torch.randn(64, 6, 2, dtype=torch.float64)
        counter = iter(range(64))
        batch = sampler(model, x, noise=lambda ref: noise[next(counter)])
        counter2 = iter(range(64))
        singles = torch.cat([sampler(model, x[i:i + 1], noise=lambda ref, i=i: noise[next(counter2)][i:i + 1])
                             for i in range(6)])
        # each single call consumes the noise sequence from the start
        singles = []
        for i in range(6):
            it = iter(range(64))
            singles.append(sampler(model, x[i:i + 1], noise=lambda ref, i=i, it=it: noise[next(it)][i:i + 1]))
        singles = torch.cat(singles)
    else:
        batch = sampler(model, x)
        singles = torch.cat([sampler(model, x[i:i + 1]) for i in range(6)])
    assert torch.allclose(batch, singles, rtol=0, atol=1e-12)


def test_any_shape_and_float32():
    gaussian = GaussianMixture.random(2, 6, seed=0)
    schedule = VPLinear()
    model6 = gaussian.denoiser(schedule, "eps")

    def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model6(x_t.reshape(len(x_t), 6), t).reshape(x_t.shape)

    x64 = schedule.prior_noise((4, 2, 3), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out64 = sample(model, x64, schedule=schedule, solver="dpmsolver++", steps=20, prediction="eps")
    out32 = sample(model, x64.float(), schedule=schedule, solver="dpmsolver++", steps=20, prediction="eps")
    assert out32.dtype == torch.float32 and out32.shape == (4, 2, 3)
    assert torch.allclose(out32.double(), out64, atol=1e-4)


def test_final_denoise_returns_x0_prediction(vp_problem):
    x, _ = vp_problem
    model = GMM.denoiser(VP, "eps")
    sampler = Sampler(VP, "dpmsolver++", 10, "eps", t_end=0.05, final_denoise=True)
    plain = Sampler(VP, "dpmsolver++", 10, "eps", t_end=0.05)(model, x)
    t = torch.full((len(x),), 0.05, dtype=torch.float64)
    expected = GMM.posterior_mean(plain, VP.alpha(t), VP.sigma(t))
    assert sampler.nfe == 11
    assert torch.allclose(sampler(model, x), expected, atol=1e-12)


@pytest.mark.parametrize("solver,prediction", [("ddim", "eps"), ("dpmsolver++", "v"), ("unipc", "eps"),
                                               ("dpmsolver", "x0")])
def test_clip_x0_matches_the_closed_form_for_a_constant_data_prediction(vp_problem, solver, prediction):
    """A model whose x0 prediction is 3 everywhere, clipped to [-1, 1], is the constant-1 model: its
    probability-flow ODE keeps eps_hat = (x_t - alpha_t) / sigma_t fixed, so x(t_e) = alpha_e + sigma_e eps_T,
    and data-prediction solvers integrate it exactly."""
    x, _ = vp_problem
    def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return convert(torch.full_like(x_t, 3.0), x_t, t, VP, "x0", prediction)

    t_end = 0.02
    alpha_s, sigma_s, alpha_e, sigma_e = (float(f(torch.tensor(tt, dtype=torch.float64)))
                                          for tt in (1.0, t_end) for f in (VP.alpha, VP.sigma))
    exact = alpha_e + sigma_e * (x - alpha_s) / sigma_s
    clipped = sample(model, x, schedule=VP, solver=solver, steps=6, prediction=prediction, t_end=t_end, clip_x0=1.0)
    unclipped = sample(model, x, schedule=VP, solver=solver, steps=6, prediction=prediction, t_end=t_end)
    assert torch.allclose(clipped, exact, atol=1e-10)
    assert torch.allclose(unclipped, 3 * alpha_e + sigma_e * (x - 3 * alpha_s) / sigma_s, atol=1e-10)


def test_clip_x0_that_never_binds_changes_nothing(vp_problem):
    x, _ = vp_problem
    model = GMM.denoiser(VP, "eps")
    plain = Sampler(VP, "dpmsolver++", 10, "eps", t_end=0.05)(model, x)
    wide = Sampler(VP, "dpmsolver++", 10, "eps", t_end=0.05, clip_x0=(-100.0, 100.0))(model, x)
    assert torch.allclose(wide, plain, atol=1e-12)


@pytest.mark.parametrize("bad", [(1.0, -1.0), (0.0,), "1", float("nan"), True])
def test_clip_x0_rejects_bad_ranges(bad):
    with pytest.raises(ValueError, match="clip_x0"):
        Sampler(VP, "ddim", 4, "eps", clip_x0=bad)


def test_discrete_grid_lands_on_training_steps():
    s = VPDiscrete.linear()
    grid = make_grid(s, "discrete", 10, 1.0, s.t_end_default)
    steps = s.step_of_time(grid)
    assert torch.allclose(steps, torch.round(steps), atol=1e-9)
    assert float(steps[0]) == 999 and float(steps[-1]) == 0


# ---- bad input -------------------------------------------------------------------------------------------

def zero_model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x_t)


@pytest.mark.parametrize("kwargs,match", [
    ({"solver": "dpm-solver-9000"}, "solver='dpm-solver-9000' is not a known solver"),
    ({"solver": "dpmsolver++", "order": 5}, "order=5 is not supported"),
    ({"steps": 0}, "steps must be an integer >= 1"),
    ({"t_start": 0.2, "t_end": 0.5}, "t_end < t_start"),
    ({"prediction": "score"}, "prediction='score'"),
    ({"grid": "cosine"}, "grid='cosine'"),
    ({"solver": "ddim", "solver_options": {"etaa": 1}}, "has no option"),
])
def test_bad_arguments_raise(kwargs, match):
    kwargs = {"solver": "ddim", "steps": 5, "prediction": "eps", **kwargs}
    with pytest.raises(ValueError, match=match):
        sample(zero_model, torch.randn(2, 3), schedule=VP, **kwargs)


def test_bad_model_output_raises():
    with pytest.raises(ValueError, match="model output has shape"):
        sample(lambda x, t: x[:, :1], torch.randn(2, 3), schedule=VP, solver="ddim", steps=3)
    with pytest.raises(ValueError, match="NaN"):
        sample(lambda x, t: x * float("nan"), torch.randn(2, 3), schedule=VP, solver="ddim", steps=3)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="x contains NaN"):
        sample(zero_model, torch.full((2, 3), float("nan")), schedule=VP, solver="ddim", steps=3)
    with pytest.raises(ValueError, match="floating-point"):
        sample(zero_model, torch.ones(2, 3, dtype=torch.long), schedule=VP, solver="ddim", steps=3)


def test_noise_prediction_solver_at_singular_end_raises_clearly():
    with pytest.raises(ValueError, match="noise prediction"):
        Sampler(Flow(), "dpmsolver", 5, "flow")


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_every_solver_can_end_at_clean_data(solver):
    """t_end = 0 (sigma = 0) is reachable by every solver with an eps model: steps that end there are
    taken in their finite first-order limit and the network is never called at sigma = 0."""
    schedule = VPDiscrete.linear()
    model = GMM.denoiser(schedule, "eps")
    called_at = []

    def spy(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        called_at.append(float(t[0]))
        return model(x_t, t)

    x = schedule.prior_noise((8, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sampler = Sampler(schedule, solver, 40, "eps", t_end=0.0)
    out = sampler(spy, x, generator=torch.Generator().manual_seed(1))
    assert min(called_at) > 0.0
    assert torch.isfinite(out).all()
    if not sampler.stochastic:
        ref = GMM.posterior_mean(GMM.ode_reference(schedule, x, 1.0, 1e-5), schedule.alpha(1e-5), schedule.sigma(1e-5))
        assert rel_rmse(out, ref) < 0.1  # 40 steps of a first-order method give ~6%


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_equals_eager():
    from trajgen.nets import TemporalUnet1d

    torch.manual_seed(0)
    net = TemporalUnet1d(4).cuda().eval()
    schedule = VPDiscrete.linear()
    sampler = Sampler(schedule, "dpmsolver++", 10, "eps")
    x = torch.randn(2, 16, 4, device="cuda")
    with torch.inference_mode():
        eager = sampler(net, x)
        graphed = sampler.cuda_graph(net, x)
        replay = graphed(x)
        other = torch.randn_like(x)
        assert torch.allclose(graphed(other), sampler(net, other), atol=1e-5)
    assert torch.allclose(replay, eager, atol=1e-5)


def test_sampling_a_trainable_network_builds_no_graph():
    """A network with requires_grad parameters samples fine outside torch.no_grad, in and out of
    inference mode (the workspace buffers of one mode are not reused by the other)."""
    from trajgen.nets import TemporalUnet1d

    torch.manual_seed(0)
    net = TemporalUnet1d(4, base_dim=8, dim_mults=(1, 2))
    sampler = Sampler(VPDiscrete.linear(), "unipc", 4, "eps")
    x = torch.randn(2, 8, 4)
    plain = sampler(net, x)
    assert not plain.requires_grad
    with torch.inference_mode():
        inferred = sampler(net, x)
    assert torch.allclose(plain, sampler(net, x)) and torch.allclose(plain, inferred)
