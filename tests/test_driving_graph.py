"""CUDA-graph-capturable decisions, checked without a GPU: every decision path runs on the "meta" device, where any
host sync (bool(), .item(), .cpu()) raises, under modes that flag host tensors meeting device tensors and
tensors built from Python data (host-to-device copies); plus the latency-only benchmark from a copied run dir."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from trajgen.bench.driving import (
    LATENCY_OBS_FILE,
    DrivingBenchConfig,
    build_policy,
    check_targets,
    graphed_decision_latency,
    load_latency_observations,
    markdown_table,
)
from trajgen.policies.driving import (
    AnchoredDiffusionConfig,
    AnchoredDiffusionPolicy,
    DrivingPolicy,
    RegressionConfig,
    RegressionPolicy,
    VanillaDiffusionConfig,
    VanillaDiffusionPolicy,
)
from trajgen.policies.offline import ALGORITHMS, POLICIES, make_config
from trajgen.policies.offline import build_policy as build_offline_policy
from trajgen.policies.scene_encoder import validate_observation

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"d_model": 32, "heads": 2, "encoder_layers": 1}


class HostDeviceMixes(TorchDispatchMode):
    """Records every op whose tensors (inputs or outputs) sit both on the host and on another device."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        devices = {t.device.type for t in tree_flatten((args, kwargs or {}, out))[0] if isinstance(t, torch.Tensor)}
        if "cpu" in devices and len(devices) > 1:
            self.found.append(str(func))
        return out


class TensorsFromHostData(TorchFunctionMode):
    """Records tensors built from Python data (torch.tensor, as_tensor, new_tensor) and list indices: on CUDA each
    is a host-to-device copy with a sync, which a CUDA graph cannot hold (dispatch modes do not see them)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = getattr(func, "__name__", str(func))
        out = func(*args, **(kwargs or {}))
        from_data = name in ("tensor", "new_tensor") or (name == "as_tensor" and not isinstance(args[0], torch.Tensor))
        if from_data and out.device.type != "cpu":  # host-only constants are fine: nothing crosses to the device
            self.found.append(name)
        if name in ("__getitem__", "__setitem__"):
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, list | np.ndarray) for i in index):
                self.found.append(f"{name} with a list index")
        return out


def assert_capturable(run: Callable[[], Any]) -> Any:
    """Run ``run`` (on meta tensors) once as a warm-up, as a capture does (lazily built buffers and constants
    are made there), then again, and assert that the second run did nothing a CUDA graph cannot capture."""
    with torch.no_grad():
        run()
    with torch.no_grad(), HostDeviceMixes() as mixes, TensorsFromHostData() as data:
        out = run()
    assert not mixes.found, f"host tensors meet device tensors in {sorted(set(mixes.found))}"
    assert not data.found, f"tensors built from host data: {sorted(set(data.found))}"
    return out


def observation(batch: int, seed: int = 0, spec: Any = None) -> dict[str, np.ndarray]:
    """A random valid observation batch (numpy): some agents and lanes padded, one-hot commands."""
    rng = np.random.default_rng(seed)
    spec = spec or AnchoredDiffusionConfig().observation_spec
    obs = {k: rng.normal(0, 5, (batch, *shape)).astype(np.float32) for k, shape in spec.shapes().items()}
    obs["agents_mask"] = (rng.random((batch, spec.n_agents)) < 0.6).astype(np.float32)
    obs["lanes_mask"] = (rng.random((batch, spec.n_lanes)) < 0.7).astype(np.float32)
    obs["command"] = np.eye(spec.n_commands, dtype=np.float32)[rng.integers(0, spec.n_commands, batch)]
    return obs


def small_policies() -> dict[str, DrivingPolicy]:
    torch.manual_seed(0)
    anchors = torch.randn(20, 8, 3) * torch.tensor([10.0, 3.0, 0.2]) + torch.tensor([20.0, 0.0, 0.0])
    return {"anchored": AnchoredDiffusionPolicy(AnchoredDiffusionConfig(**SMALL), anchors=anchors).eval(),
            "vanilla": VanillaDiffusionPolicy(VanillaDiffusionConfig(**SMALL, denoiser_width=32, steps=4)).eval(),
            "regression": RegressionPolicy(RegressionConfig(**SMALL)).eval()}


@pytest.mark.parametrize("name", ["anchored", "vanilla", "regression"])
def test_decision_path_has_no_host_sync_and_no_host_tensor(name: str) -> None:
    policy = small_policies()[name]
    obs = validate_observation(observation(2), policy.config.observation_spec, "cpu")
    policy.to("meta")
    meta_obs = {k: v.to("meta") for k, v in obs.items()}
    decision = assert_capturable(lambda: policy._plan(meta_obs, None))
    assert decision.trajectory.device.type == "meta" and tuple(decision.trajectory.shape) == (2, 8, 3)
    if name == "anchored":
        assert tuple(decision.modes.shape) == (2, 20, 8, 3) and tuple(decision.scores.shape) == (2, 20)
    if name == "vanilla":  # several modes per scene too
        assert tuple(assert_capturable(lambda: policy._plan(meta_obs, None, n_modes=3)).modes.shape) == (2, 3, 8, 3)


def test_the_checks_catch_what_a_graph_cannot_hold() -> None:
    """The detectors themselves: a host sync, a host tensor meeting a device tensor, a tensor from host data."""
    x = torch.zeros(2, 3, device="meta")
    with pytest.raises(RuntimeError):
        assert_capturable(lambda: bool(x.sum() > 0))
    with pytest.raises(AssertionError, match="host tensors meet"):
        assert_capturable(lambda: torch.full((2,), 0.5).to(x.device))
    with pytest.raises(AssertionError, match="host data"):
        assert_capturable(lambda: x[:, [0, 2]])
    with pytest.raises(AssertionError, match="host data"):
        assert_capturable(lambda: x * x.new_tensor([1.0, 2.0, 3.0]))


def test_plan_outputs_match_the_unvalidated_path_and_an_independent_anchor_noising() -> None:
    """plan() = validate once + _plan; the anchored start state is alpha(t_start) anchors + sigma(t_start) noise
    of the schedule over the anchors' (x, y), the headings are the last call's, and the plan is the mode with the
    highest score."""
    policy = small_policies()["anchored"]
    obs = observation(3, seed=1)
    noise = torch.randn(3, 20, 8, 2, generator=torch.Generator().manual_seed(1))
    decision = policy.plan(obs, noise=noise)
    t = torch.full((3,), float(policy.schedule.time_of_step(policy.config.start_step)))
    anchors = policy.normalizer.normalize(policy.anchors)[..., :2].expand(3, -1, -1, -1)
    x_start = policy.schedule.add_noise(anchors, t, noise)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        scene = policy.scene_context(policy.observation_tensors(obs))

        def denoiser(x_t: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
            plans, logits = policy.decoder(x_t, time, scene, every_stage=False)[-1]
            seen.append((plans, logits))
            return plans[..., :2]

        xy = policy.sampler(denoiser, x_start)
        reference = policy.normalizer.denormalize(torch.cat([xy, seen[-1][0][..., 2:]], dim=-1))
    torch.testing.assert_close(decision.modes, reference, atol=1e-6, rtol=0)
    torch.testing.assert_close(decision.scores, torch.sigmoid(seen[-1][1]), atol=1e-6, rtol=0)
    best = decision.scores.argmax(-1)
    torch.testing.assert_close(decision.trajectory, reference[torch.arange(3), best], atol=0, rtol=0)


def test_vanilla_and_regression_plans_are_reproducible_and_validated_once() -> None:
    policies = small_policies()
    obs = observation(2, seed=2)
    a = policies["vanilla"].plan(obs, generator=torch.Generator().manual_seed(3))
    b = policies["vanilla"].plan(obs, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.trajectory, b.trajectory, atol=0, rtol=0)
    # regression is deterministic: the plan equals its head on the validating encoder's tokens
    policy = policies["regression"]
    with torch.no_grad():
        tokens, mask = policy.encoder(obs)
        pooling = policy.pooling
        query = pooling.query.expand(2, -1, -1)
        feature = pooling.norm(query + pooling.attn(query, tokens, key_mask=mask))[:, 0]
        expected = policy.normalizer.denormalize(policy.head(torch.cat([feature, tokens[:, 0]], -1)).unflatten(-1, (8, 3)))
    torch.testing.assert_close(policy.plan(obs).trajectory, expected, atol=1e-6, rtol=0)
    bad = dict(obs, ego=np.full_like(obs["ego"], np.nan))
    with pytest.raises(ValueError, match="ego"):
        policy.plan(bad)


def test_nan_weights_are_caught_after_the_decision() -> None:
    policy = small_policies()["anchored"]
    with torch.no_grad():
        policy.decoder.stages[-1].reg_head[-1].bias.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        policy.plan(observation(1))


def test_graph_code_refuses_a_cpu_policy() -> None:
    policy = small_policies()["regression"]
    with pytest.raises(ValueError, match="CUDA device"):
        policy.cuda_graph(observation(1))
    with pytest.raises(ValueError, match="CUDA device"):
        graphed_decision_latency(policy, observation(2), repeats=2)


@pytest.mark.parametrize("algorithm", sorted(POLICIES))
def test_offline_act_as_the_bench_captures_it_has_no_host_sync(algorithm: str) -> None:
    names = {f.name for f in dataclasses.fields(ALGORITHMS[algorithm])}
    small = {"horizon": 8, "gpt_width": 32, "gpt_depth": 1, "gpt_heads": 2, "unet_base_dim": 16, "sample_steps": 3}
    policy = build_offline_policy(make_config(algorithm, **{k: v for k, v in small.items() if k in names}), 5, 2)
    obs = torch.randn(1, 5)
    torch.manual_seed(0)
    eager = policy.act(obs)  # the validating path
    torch.manual_seed(0)
    torch.testing.assert_close(policy.act(obs, validate=False), eager, atol=0, rtol=0)
    policy.to("meta")
    action = assert_capturable(lambda: policy.act(torch.zeros(1, 5, device="meta"), validate=False))
    assert tuple(action.shape) == (1, 2) and action.device.type == "meta"


def test_trajectory_diffuser_refine_noises_the_draft_as_the_schedule_does() -> None:
    config = make_config("trajectory-diffuser", horizon=8, gpt_width=32, gpt_depth=1, gpt_heads=2, unet_base_dim=16,
                         sample_steps=2)
    policy = build_offline_policy(config, 4, 2)
    draft = torch.randn(2, 8, 4)
    alpha, sigma = policy.model.schedule.coefficients(config.t_mid)
    t = torch.tensor(config.t_mid)
    assert alpha == pytest.approx(float(policy.model.schedule.alpha(t)), rel=1e-6)
    assert sigma == pytest.approx(float(policy.model.schedule.sigma(t)), rel=1e-6)
    eps = torch.randn(2, 8, 4)
    torch.testing.assert_close(alpha * draft + sigma * eps, policy.model.schedule.add_noise(draft, t, eps),
                               atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- latency-only CLI


def _run_dir(tmp_path: Path) -> Path:
    """A finished run as the lead carries it: results.json, the three policy dirs, latency_obs.npz (no data)."""
    config = DrivingBenchConfig.quick(str(tmp_path / "run"))
    out = Path(config.out_dir)
    plans = np.cumsum(np.random.default_rng(0).normal([2.0, 0.0, 0.0], [0.5, 0.3, 0.05], (64, 8, 3)), axis=1)
    score = {"mean": 0.5, "se": 0.01, "n": 4}
    loop = {"all": {k: score for k in ("pdms", "nc", "dac", "ttc", "ep", "c", "collision", "route_completion")}}
    policies = {}
    for name in ("anchored", "vanilla", "regression"):
        policy = build_policy(name, config, plans)
        policy.save(out / name / "policy.safetensors")
        policies[name] = {"nfe": policy.nfe, "parameters": 1000, "open_loop": loop, "closed_loop": loop,
                          "mode_diversity": None if name == "regression" else score, "latency_batch1": {"median_ms": 1.0, "p99_ms": 2.0, "repeats": 1},
                          "latency_batch1_graph": {"median_ms": 0.1, "p99_ms": 0.2}}  # a stale GPU figure
    document = {"policies": policies, "expert_closed_loop": {"merge": loop["all"]}}
    (out / "results.json").write_text(json.dumps(document))
    np.savez(out / LATENCY_OBS_FILE, **observation(3, spec=policy.config.observation_spec))
    return out


def test_latency_only_command_runs_from_a_copied_run_dir(tmp_path: Path) -> None:
    out = _run_dir(tmp_path)
    spec = importlib.util.spec_from_file_location("bench_driving_script", ROOT / "scripts" / "bench_driving.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    document = script.main(["--latency-only", "--out-dir", str(out), "--device", "cpu", "--latency-repeats", "3",
                            "--data", str(tmp_path / "absent.h5")])
    for name, result in document["policies"].items():
        assert result["latency_batch1"]["repeats"] == 3 and result["latency_batch1"]["median_ms"] > 0, name
        assert result["latency_batch1"]["threads"] == 1  # the default --latency-threads
        assert "latency_batch1_graph" not in result  # a CPU remeasure drops the stale GPU figure
    assert json.loads((out / "results.json").read_text())["policies"] == document["policies"]
    assert "graph" not in (out / "results.md").read_text()
    assert "batch-1 decision, eager, 1 torch thread(s)" in (out / "results.md").read_text()
    # an explicit --latency-obs file is read the same way
    explicit = tmp_path / "obs.npz"
    np.savez(explicit, **{k: v[:1] for k, v in load_latency_observations(out / LATENCY_OBS_FILE).items()})
    document = script.main(["--latency-only", "--out-dir", str(out), "--device", "cpu", "--latency-repeats", "2",
                            "--latency-obs", str(explicit), "--latency-threads", "none"])
    assert {r["latency_batch1"]["threads"] for r in document["policies"].values()} == {torch.get_num_threads()}
    bad = tmp_path / "bad.npz"
    np.savez(bad, ego=np.zeros((1, 4)))
    with pytest.raises(ValueError, match="missing key"):
        load_latency_observations(bad)


def test_graph_latency_is_reported_and_used_for_the_target_when_present() -> None:
    def result(eager: float, graph: float | None) -> dict[str, Any]:
        score = {"mean": 0.5, "se": 0.01, "n": 4}
        loop = {"all": {k: score for k in ("pdms", "nc", "dac", "ttc", "ep", "c", "collision", "route_completion")}}
        r = {"nfe": 2, "parameters": 1000, "open_loop": loop, "closed_loop": loop, "mode_diversity": score,
             "latency_batch1": {"median_ms": eager, "p99_ms": eager * 1.5}}
        if graph is not None:
            r["latency_batch1_graph"] = {"median_ms": graph, "p99_ms": graph * 1.2}
        return r

    results = {"anchored": result(8.0, 0.5), "vanilla": result(32.0, 5.0), "regression": result(2.0, None)}
    target = check_targets(results)["latency_ratio_vanilla_over_anchored"]
    assert target["cuda_graph"] and target["ratio"] == pytest.approx(10.0) and target["met"]
    table = markdown_table({"policies": results, "expert_closed_loop": {}})
    assert "| 8.0 / 12.0; graph 0.50 / 0.60 |" in table and "| 2.0 / 3.0 |" in table
    results["vanilla"]["latency_batch1_graph"] = {"error": "RuntimeError: capture failed"}
    target = check_targets(results)["latency_ratio_vanilla_over_anchored"]
    assert not target["cuda_graph"] and target["ratio"] == pytest.approx(4.0)
    assert "graph failed" in markdown_table({"policies": results, "expert_closed_loop": {}})


# ---------------------------------------------------------------------------------------------- on a GPU only

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_graphed_decisions_match_eager_ones_on_cuda() -> None:
    policies = {k: p.cuda() for k, p in small_policies().items()}
    obs = observation(1, seed=4)
    regression = policies["regression"].cuda_graph(observation(1, seed=5))
    torch.testing.assert_close(regression(obs).trajectory, policies["regression"].plan(obs).trajectory,
                               atol=1e-5, rtol=1e-5)
    noise = torch.randn(1, 20, 8, 3, device="cuda")
    anchored = policies["anchored"].cuda_graph(observation(1, seed=5), noise=noise)  # noise captured as a constant
    graphed = anchored(obs)
    eager = policies["anchored"].plan(obs, noise=noise)
    torch.testing.assert_close(graphed.modes, eager.modes, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(graphed.scores, eager.scores, atol=1e-5, rtol=1e-5)
    vanilla = policies["vanilla"].cuda_graph(obs, n_modes=1)
    first, second = vanilla(obs).trajectory, vanilla(obs).trajectory
    assert torch.isfinite(first).all() and not torch.equal(first, second)  # fresh noise at every replay
    stats = graphed_decision_latency(policies["anchored"], observation(4), repeats=5)
    assert stats["cuda_graph"] and stats["median_ms"] > 0
