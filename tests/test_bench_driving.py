"""The driving benchmark pipeline (quick sizes), its statistics and the simulator throughput probe."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import trajgen.bench.driving as bench_driving
from trajgen.bench.driving import (
    DrivingBenchConfig,
    _pool,
    build_policy,
    check_targets,
    combine_seeds,
    ensure_data,
    evaluate_driving_policy,
    held_out_scene_seeds,
    interleaved_decision_latencies,
    mean_se,
    plan_batched,
    read_rows,
    remeasure_latency,
    run_driving_benchmark,
    split_seeds,
    train_policy,
)
from trajgen.bench.driving_speed import trajgen_throughput
from trajgen.envs.driving.collect import split_of_seed
from trajgen.envs.driving.open_loop import LOG_KEYS, open_loop_scores
from trajgen.envs.driving.sim import COMMANDS, SCENARIOS, DrivingSim
from trajgen.envs.driving.tracking import headings_from_path
from trajgen.policies.anchors import kmeans_anchors, trajectory_bounds
from trajgen.policies.driving import (
    OBSERVATION_KEYS,
    AnchoredDiffusionPolicy,
    DrivingPolicy,
    DrivingSamples,
    RegressionPolicy,
)


def test_pooled_mean_and_se_equal_those_of_the_concatenation() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.2, 1.0, 40), rng.normal(0.9, 0.5, 40)
    pooled = _pool([mean_se(a), mean_se(b)])
    direct = mean_se(np.concatenate([a, b]))
    assert pooled["n"] == 80
    np.testing.assert_allclose(pooled["mean"], direct["mean"], rtol=1e-12)
    np.testing.assert_allclose(pooled["se"], direct["se"], rtol=1e-12)


def test_held_out_scene_seeds_are_test_split_and_outside_collection_seeds() -> None:
    seeds = held_out_scene_seeds(50, seed=0)
    assert seeds.size == 50 and np.unique(seeds).size == 50
    assert (split_of_seed(seeds, 0.1) == 1).all()
    assert (seeds >= 2**31).all()  # collections draw scene seeds below 2**31


def _result(pdms_open: float, pdms_closed: float, latency: float, diversity: float) -> dict:
    return {"open_loop": {"all": {"pdms": {"mean": pdms_open}}}, "closed_loop": {"all": {"pdms": {"mean": pdms_closed}}},
            "latency_batch1": {"median_ms": latency}, "mode_diversity": {"mean": diversity}}


def test_targets_compare_the_right_numbers() -> None:
    results = {"anchored": _result(0.9, 0.8, 10.0, 0.5), "vanilla": _result(0.85, 0.82, 90.0, 0.2),
               "regression": _result(0.88, 0.7, 1.0, 0.0)}
    t = check_targets(results)
    assert t["anchored_pdms_ge_vanilla_open_loop"]["met"]
    assert not t["anchored_pdms_ge_vanilla_closed_loop"]["met"]
    assert t["latency_ratio_vanilla_over_anchored"]["ratio"] == pytest.approx(9.0)
    assert t["latency_ratio_vanilla_over_anchored"]["met"]
    assert t["anchored_more_diverse"]["met"]
    assert t["anchored_pdms_gt_regression_open_loop"]["met"]
    assert "anchored_pdms_gt_regression_open_loop_policy_headings" not in t
    assert not any("unet" in name for name in t)
    for name, own in (("anchored", 0.87), ("regression", 0.89)):
        results[name]["open_loop_policy_headings"] = {"all": {"pdms": {"mean": own}}}
    own_headings = check_targets(results)["anchored_pdms_gt_regression_open_loop_policy_headings"]
    assert own_headings == {"anchored": 0.87, "regression": 0.89, "met": False}
    for name in ("anchored", "regression"):
        del results[name]["open_loop_policy_headings"]

    results["vanilla-unet"] = _result(0.95, 0.6, 70.0, 0.6)
    t = check_targets(results)
    assert t["latency_ratio_vanilla_unet_over_anchored"]["ratio"] == pytest.approx(7.0)
    assert not t["latency_ratio_vanilla_unet_over_anchored"]["met"]
    assert not t["anchored_pdms_ge_vanilla_unet_open_loop"]["met"]
    assert t["anchored_pdms_ge_vanilla_unet_closed_loop"]["met"]
    assert not t["anchored_more_diverse_than_vanilla_unet"]["met"]
    assert t["latency_ratio_vanilla_over_anchored"]["ratio"] == pytest.approx(9.0)  # the DiT's targets unchanged


def test_bench_config_refuses_unknown_policies() -> None:
    with pytest.raises(ValueError, match=r"policies: unknown \['vanila'\]"):
        DrivingBenchConfig(policies=("anchored", "vanila"))
    with pytest.raises(ValueError, match="anchor_space must be one of"):
        DrivingBenchConfig(anchor_space="meters")
    with pytest.raises(ValueError, match="anchor_heading must be one of"):
        DrivingBenchConfig(anchor_heading="noisy")


def test_policy_lr_overrides_the_shared_rate_per_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = DrivingBenchConfig.quick(str(tmp_path))
    config = dataclasses.replace(config, policy_lr=("anchored=2e-3", "regression=5e-4"))
    assert (config.lr_for("anchored"), config.lr_for("regression"), config.lr_for("vanilla")) == (2e-3, 5e-4,
                                                                                                  config.lr)
    for bad in (("anchored",), ("anchord=1e-3",), ("anchored=0",), ("anchored=fast",), ("anchored=1", "anchored=2")):
        with pytest.raises(ValueError, match=f"policy_lr.*{bad[-1]!r}"):
            DrivingBenchConfig(policy_lr=bad)
    trainers = []
    monkeypatch.setattr(bench_driving, "train_driving_policy",
                        lambda policy, dataset, trainer, resume: (trainers.append(trainer), (policy, {}))[1])
    path = ensure_data(config)
    dataset = DrivingSamples(path, seeds=split_seeds(path)[0])
    _, summary = train_policy("regression", config, dataset, dataset.arrays["trajectory"])
    assert trainers[-1].lr == summary["settings"]["lr"] == 5e-4


def test_a_rerun_with_other_training_settings_is_refused_not_resumed(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A run directory trained (or being trained) at one lr is not resumed at another, nor served under its label;
    fewer steps are refused too, and only a longer budget continues the run. Runs that predate the settings file are
    checked against their summary."""
    config = DrivingBenchConfig.quick(str(tmp_path))
    trained = []
    monkeypatch.setattr(bench_driving, "train_driving_policy",
                        lambda policy, dataset, trainer, resume: (trained.append(trainer), (policy, {}))[1])
    path = ensure_data(config)
    dataset = DrivingSamples(path, seeds=split_seeds(path)[0])
    plans = dataset.arrays["trajectory"]
    train_policy("regression", config, dataset, plans)  # "interrupted": settings written, no policy file
    for changed, field in [({"policy_lr": ("regression=0.1",)}, "lr"), ({"batch_size": config.batch_size + 1}, "batch_size"),
                           ({"train_steps": config.train_steps - 1}, "train_steps")]:
        with pytest.raises(ValueError, match=rf"other settings.*{field}: "):
            train_policy("regression", dataclasses.replace(config, **changed), dataset, plans)
    longer = dataclasses.replace(config, train_steps=config.train_steps + 10)
    train_policy("regression", longer, dataset, plans)
    assert [t.steps for t in trained] == [config.train_steps, config.train_steps + 10]

    older = tmp_path / "older" / "regression"
    older.mkdir(parents=True)
    settings = json.loads((tmp_path / "regression" / "train_settings.json").read_text())
    (older / "train_summary.json").write_text(json.dumps({"settings": {**settings, "lr": 1.0}}))
    with pytest.raises(ValueError, match=r"other settings.*lr: 1\.0 vs"):
        train_policy("regression", dataclasses.replace(longer, out_dir=str(tmp_path / "older")), dataset, plans)


def test_normalised_anchor_space_clusters_in_the_normaliser_half_ranges() -> None:
    plans = np.random.default_rng(0).normal(size=(200, 8, 3)) * [20.0, 4.0, 0.5] + [30.0, 0.0, 0.0]
    config = DrivingBenchConfig.quick("unused")
    low, high = trajectory_bounds(plans)
    half_range = (np.asarray(high[:2]) - np.asarray(low[:2])) / 2
    for space, scale in [("metres", None), ("normalised", half_range)]:
        policy = build_policy("anchored", dataclasses.replace(config, anchor_space=space), plans)
        expected = kmeans_anchors(plans, k=policy.config.n_anchors, seed=config.seed, position_scale=scale)
        torch.testing.assert_close(policy.anchors, expected)
    for heading in ("predicted", "diffused"):
        assert build_policy("anchored", dataclasses.replace(config, anchor_heading=heading), plans
                            ).config.heading == heading
    for enabled in (True, False):
        assert build_policy("anchored", dataclasses.replace(config, anchor_waypoint_features=enabled), plans
                            ).config.waypoint_map_features is enabled


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``trajgen demo --quick`` run once, as a user would: its output directory."""
    out = tmp_path_factory.mktemp("demo") / "d"
    result = subprocess.run([sys.executable, "-m", "trajgen.cli", "demo", "--quick", "--out-dir", str(out)],
                            check=False, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "anchored" in result.stdout
    return out


@pytest.mark.timeout(900)
def test_quick_pipeline_end_to_end(quick_demo: Path) -> None:
    config = DrivingBenchConfig.quick(str(quick_demo))
    saved = json.loads((quick_demo / "results.json").read_text())
    assert set(saved["policies"]) == {"anchored", "vanilla", "regression"}
    for name, result in saved["policies"].items():
        for mode in ("open_loop", "closed_loop"):
            pdms = result[mode]["all"]["pdms"]
            assert 0.0 <= pdms["mean"] <= 1.0, (name, mode)
        assert result["closed_loop"]["all"]["pdms"]["n"] == 2 * config.closed_loop_episodes
    assert saved["policies"]["anchored"]["nfe"] == 2 and saved["policies"]["vanilla"]["nfe"] == 20
    # the closed loop by route command splits each scenario's episodes by the command their scene seed draws
    seeds = held_out_scene_seeds(config.closed_loop_episodes, config.seed)
    for scenario in SCENARIOS:
        sim = DrivingSim(scenario, seeds.size)
        sim.reset(seeds)
        want = {COMMANDS[c]: int((sim.command == c).sum()) for c in np.unique(sim.command)}
        for name, result in saved["policies"].items():
            parts = result["closed_loop_by_command"][scenario]
            assert {c: p["pdms"]["n"] for c, p in parts.items()} == want, (name, scenario)
            pooled = sum(p["pdms"]["mean"] * p["pdms"]["n"] for p in parts.values()) / seeds.size
            assert pooled == pytest.approx(result["closed_loop"][scenario]["pdms"]["mean"], abs=1e-12)
    # the expert drives its own reference scenes: progress is its own, so EP is 1 and nothing collides
    for scenario in saved["expert_closed_loop"].values():
        assert scenario["ep"]["mean"] == pytest.approx(1.0, abs=1e-3)
        assert scenario["collision"]["mean"] == 0.0
    table = (quick_demo / "results.md").read_text()
    for name, result in saved["policies"].items():
        assert f"| {name} | {result['nfe']} | {result['open_loop']['all']['pdms']['mean']:.3f}" in table
        errors = result["open_loop"]["all"]
        assert errors["ade"]["n"] == errors["heading_error"]["n"] == errors["pdms"]["n"]
        assert f"{errors['ade']['mean']:.2f} / {errors['fde']['mean']:.2f}, {errors['heading_error']['mean']:.3f}" in table
    assert "Closed loop by route command" in table
    assert saved["simulator_throughput"]["runs"]
    for picture in saved["pictures"].values():
        assert Path(picture).stat().st_size > 1000


def test_open_loop_scores_the_executed_path_headings_and_reports_the_policys_own(quick_demo: Path) -> None:
    """The table's open loop tracks the plans with their path headings; the policies' own headings are scored too.
    Recomputed here for the (deterministic) regression from its weights and the held-out rows."""
    config = DrivingBenchConfig.quick(str(quick_demo))
    assert config.plan_heading == "path"
    saved = json.loads((quick_demo / "results.json").read_text())["policies"]
    path = ensure_data(config)
    _, test_seeds = split_seeds(path)
    rows = read_rows(path, test_seeds, config.open_loop_rows, (*LOG_KEYS, *OBSERVATION_KEYS))
    policy = DrivingPolicy.load(quick_demo / "regression" / "policy.safetensors")
    plans, _, _ = plan_batched(policy, {k: rows[k] for k in OBSERVATION_KEYS})
    executed = open_loop_scores(headings_from_path(plans), rows)["pdms"].mean()
    own = open_loop_scores(plans, rows)["pdms"].mean()
    result = saved["regression"]
    assert result["open_loop"]["all"]["pdms"]["mean"] == pytest.approx(executed, abs=1e-12)
    assert result["open_loop_policy_headings"]["all"]["pdms"]["mean"] == pytest.approx(own, abs=1e-12)
    assert all("open_loop_policy_headings" in r for r in saved.values())
    assert "Open loop with each policy's own headings" in (quick_demo / "results.md").read_text()


def test_eval_driving_scores_a_policy_as_the_benchmark_does(quick_demo: Path, tmp_path: Path) -> None:
    """``trajgen eval driving`` on the benchmark's regression with the benchmark's settings gives its numbers."""
    config = DrivingBenchConfig.quick(str(quick_demo))
    saved = json.loads((quick_demo / "results.json").read_text())["policies"]["regression"]
    policy_file = quick_demo / "regression" / "policy.safetensors"
    result = evaluate_driving_policy(DrivingPolicy.load(policy_file), episodes=config.closed_loop_episodes,
                                     seed=config.seed, data=ensure_data(config), open_loop_rows=config.open_loop_rows,
                                     diversity_rows=config.diversity_rows, max_decisions=config.max_decisions)
    for key in ("open_loop", "open_loop_policy_headings", "closed_loop", "closed_loop_by_command"):
        # as JSON text: a single-episode command has a NaN standard error, and NaN != NaN
        assert json.dumps(result[key], sort_keys=True) == json.dumps(saved[key], sort_keys=True), key
    out = tmp_path / "eval.json"
    cli = subprocess.run([sys.executable, "-m", "trajgen.cli", "eval", "driving", "--policy", str(policy_file),
                          "--episodes", "2", "--out", str(out)], check=False, capture_output=True, text=True,
                         timeout=600)
    assert cli.returncode == 0, cli.stdout[-2000:] + cli.stderr[-2000:]
    written = json.loads(out.read_text())
    assert "open_loop" not in written and written["closed_loop"]["all"]["pdms"]["n"] == 2 * len(SCENARIOS)
    assert "PDMS" in cli.stdout and "intersection" in cli.stdout
    with pytest.raises(ValueError, match="data: no file"):
        evaluate_driving_policy(DrivingPolicy.load(policy_file), episodes=1, data=tmp_path / "missing.h5")
    with pytest.raises(ValueError, match="plan_heading"):
        evaluate_driving_policy(DrivingPolicy.load(policy_file), episodes=1, plan_heading="tangent")


def test_rerun_reloads_instead_of_training(quick_demo: Path) -> None:
    config = DrivingBenchConfig.quick(str(quick_demo))
    path = ensure_data(config)
    train_seeds, _ = split_seeds(path)
    dataset = DrivingSamples(path, seeds=train_seeds)
    saved = json.loads((quick_demo / "regression" / "train_summary.json").read_text())
    policy, summary = train_policy("regression", config, dataset, dataset.arrays["trajectory"])
    assert summary == saved
    assert isinstance(policy, RegressionPolicy)


def test_vanilla_unet_width_is_part_of_what_a_rerun_must_match(quick_demo: Path, tmp_path: Path) -> None:
    """Weights of one U-Net width are reused for that width only: another width is refused in that directory, naming
    the field, rather than served the old weights (use another --out-dir)."""
    config = dataclasses.replace(DrivingBenchConfig.quick(str(tmp_path)), data=str(quick_demo / "data.h5"),
                                 unet_base_dim=8)
    train_seeds, _ = split_seeds(Path(config.data))
    dataset = DrivingSamples(config.data, seeds=train_seeds)
    plans = dataset.arrays["trajectory"]
    policy, first = train_policy("vanilla-unet", config, dataset, plans)
    assert policy.config.denoiser == "unet" and policy.config.unet_base_dim == 8
    assert train_policy("vanilla-unet", config, dataset, plans)[1] == first  # reloaded
    wider = dataclasses.replace(config, unet_base_dim=16)
    with pytest.raises(ValueError, match="built differently.*unet_base_dim: 8 vs 16"):
        train_policy("vanilla-unet", wider, dataset, plans)
    policy, _ = train_policy("vanilla-unet", dataclasses.replace(wider, out_dir=str(tmp_path / "w16")), dataset, plans)
    assert policy.config.unet_base_dim == 16


def test_a_rerun_with_other_anchors_is_refused_not_served_old_weights(quick_demo: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings and config match, the anchors do not (as from k-means over another training set): refused."""
    config = DrivingBenchConfig.quick(str(quick_demo))
    path = ensure_data(config)
    train_seeds, _ = split_seeds(path)
    dataset = DrivingSamples(path, seeds=train_seeds)
    plans = dataset.arrays["trajectory"]
    assert isinstance(train_policy("anchored", config, dataset, plans)[0], AnchoredDiffusionPolicy)  # reloaded
    kmeans = bench_driving.kmeans_anchors
    monkeypatch.setattr(bench_driving, "kmeans_anchors", lambda *a, **kw: kmeans(*a, **kw) + 0.5)
    with pytest.raises(ValueError, match=r"built differently.*: anchors"):
        train_policy("anchored", config, dataset, plans)


def test_latency_can_be_remeasured_on_a_finished_run(quick_demo: Path) -> None:
    before = json.loads((quick_demo / "results.json").read_text())
    after = remeasure_latency(DrivingBenchConfig.quick(str(quick_demo)))
    for name, result in after["policies"].items():
        assert result["latency_batch1"]["repeats"] == 3 and result["latency_batch1"]["median_ms"] > 0
        assert result["open_loop"] == before["policies"][name]["open_loop"]  # only the timing changes
    assert json.loads((quick_demo / "results.json").read_text())["policies"] == after["policies"]


def test_latencies_are_timed_in_interleaved_blocks() -> None:
    """Policies are timed block by block in turn (a, b, a, b, ...), each ``repeats`` times after 3 warm-up calls."""
    calls: list[str] = []

    class Recorder:
        device = torch.device("cpu")

        def __init__(self, name: str) -> None:
            self.name = name

        def plan(self, obs: dict) -> None:
            assert len(obs["ego"]) == 1  # batch 1: the first observation only
            calls.append(self.name)

    out = interleaved_decision_latencies({"a": Recorder("a"), "b": Recorder("b")}, {"ego": np.zeros((4, 4))},
                                         repeats=7, rounds=3)
    assert calls == ["a"] * 3 + ["b"] * 3 + (["a"] * 3 + ["b"] * 3) + (["a"] * 2 + ["b"] * 2) * 2
    assert out["a"]["repeats"] == out["b"]["repeats"] == 7
    assert 0 <= out["a"]["median_ms"] <= out["a"]["p99_ms"]


def test_latencies_are_timed_with_the_requested_thread_count_and_restore_it() -> None:
    seen: list[int] = []

    class Recorder:
        device = torch.device("cpu")

        def plan(self, obs: dict) -> None:
            seen.append(torch.get_num_threads())

    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    out = interleaved_decision_latencies({"a": Recorder()}, {"ego": np.zeros((2, 4))}, repeats=2, threads=target)
    assert set(seen) == {target} and out["a"]["threads"] == target
    assert torch.get_num_threads() == before
    seen.clear()
    assert interleaved_decision_latencies({"a": Recorder()}, {"ego": np.zeros((2, 4))}, repeats=2,
                                          threads=None)["a"]["threads"] == before == seen[0]
    with pytest.raises(ValueError, match="latency_threads"):
        DrivingBenchConfig(latency_threads=0)


def test_trajgen_throughput_counts_every_vehicle_step() -> None:
    run = trajgen_throughput("merge", n_scenes=4, seconds=0.2)
    assert run.scenes == 4 and run.vehicles_per_scene >= 1.0
    # each env.step tracks one 0.5 s replanning period: 5 sim steps per vehicle
    assert run.vehicle_steps % 5 == 0
    assert run.vehicle_seconds_per_s == pytest.approx(run.vehicle_steps * 0.1 / run.wall_s)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_full_demo_meets_its_claim(tmp_path: Path) -> None:
    """The README's first command: within its budget the anchored policy beats regression on PDMS."""
    document = run_driving_benchmark(DrivingBenchConfig.demo(str(tmp_path / "demo")))
    assert document["targets"]["anchored_pdms_gt_regression_closed_loop"]["met"]
    assert (tmp_path / "demo" / "anchored_closed_loop.gif").exists()


def test_seed_average_is_the_mean_and_standard_error_of_the_seed_means() -> None:
    def result(open_pdms: float, closed: dict[str, float], diversity: float | None) -> dict:
        stat = lambda m: {"mean": m, "se": 0.01, "n": 64}
        return {"algorithm": "a", "nfe": 2, "latency_batch1": {"median_ms": 3.0},
                "open_loop": {"all": {"pdms": stat(open_pdms)}},
                "closed_loop": {s: {"pdms": stat(v)} for s, v in closed.items()},
                "closed_loop_by_command": {"merge": {"left": {"pdms": stat(closed["all"])}}},
                "mode_diversity": None if diversity is None else stat(diversity), "training": {"wall_s": 1.0}}

    per_seed = [result(0.9, {"merge": 0.8, "all": 0.6}, 0.5), result(0.8, {"merge": 0.6, "all": 0.4}, 0.7),
                result(0.7, {"merge": 0.7, "all": 0.8}, 0.6)]
    combined = combine_seeds(per_seed, [0, 1, 2])
    pdms = combined["open_loop"]["all"]["pdms"]
    assert pdms["mean"] == pytest.approx(0.8) and pdms["n"] == 3 and pdms["over"] == "training seeds"
    assert pdms["se"] == pytest.approx(0.1 / np.sqrt(3))                 # std(0.9, 0.8, 0.7) = 0.1
    assert combined["closed_loop"]["all"]["pdms"]["mean"] == pytest.approx(0.6)
    assert combined["closed_loop"]["all"]["pdms"]["se"] == pytest.approx(0.2 / np.sqrt(3))
    assert combined["mode_diversity"]["mean"] == pytest.approx(0.6)
    assert combined["closed_loop_by_command"]["merge"]["left"]["pdms"]["mean"] == pytest.approx(0.6)
    assert combined["latency_batch1"] == {"median_ms": 3.0} and combined["training_seeds"] == [0, 1, 2]
    assert [s["open_loop"]["all"]["pdms"]["mean"] for s in combined["per_seed"]] == [0.9, 0.8, 0.7]
    assert len(combined["training"]) == 3
    no_modes = combine_seeds([result(0.9, {"all": 0.5}, None), result(0.7, {"all": 0.5}, None)], [3, 4])
    assert no_modes["mode_diversity"] is None
    single = combine_seeds(per_seed[:1], [5])
    assert single["open_loop"] == per_seed[0]["open_loop"] and "per_seed" not in single


@pytest.mark.timeout(900)
def test_two_training_seeds_train_separately_and_average(quick_demo: Path, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "seeds"
    shutil.copytree(quick_demo, out)                         # the first seed's runs are reused from the demo
    config = dataclasses.replace(DrivingBenchConfig.quick(str(out)), training_seeds=(0, 1), pictures=False,
                                 policies=("regression",))
    document = run_driving_benchmark(config)
    assert (out / "regression-seed1" / "policy.safetensors").is_file()
    first = json.loads((quick_demo / "results.json").read_text())["policies"]["regression"]
    result = document["policies"]["regression"]
    assert result["training_seeds"] == [0, 1] and [s["seed"] for s in result["per_seed"]] == [0, 1]
    # seed 0: the demo's weights, so the same scores to the last bit (the demo scored the policy as loaded from its
    # file too, not the Trainer's in-memory EMA copy)
    assert result["per_seed"][0]["open_loop"] == first["open_loop"]
    assert result["per_seed"][0]["closed_loop"] == first["closed_loop"]
    seed_means = [s["closed_loop"]["all"]["pdms"]["mean"] for s in result["per_seed"]]
    assert result["closed_loop"]["all"]["pdms"]["mean"] == pytest.approx(np.mean(seed_means))
    assert seed_means[0] != seed_means[1] or result["per_seed"][0]["open_loop"] != result["per_seed"][1]["open_loop"]
    assert "mean ± standard error over the training seeds" in (out / "results.md").read_text()
    with pytest.raises(ValueError, match="distinct"):
        run_driving_benchmark(dataclasses.replace(config, training_seeds=(1, 1)))


def _load_script(name: str) -> Any:
    """A module of the repository's scripts/ folder (not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_script", Path(__file__).resolve().parents[1] / "scripts"
                                                  / f"{name}.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_on_policy_rows_are_added_to_training_and_test_rows_are_refused(quick_demo: Path, tmp_path: Path) -> None:
    from test_driving_expert import _creeping_plans

    from trajgen.bench.driving import training_samples
    from trajgen.envs.driving.collect import collect_driving

    config = DrivingBenchConfig.quick(str(quick_demo))
    path = ensure_data(config)
    train_seeds, test_seeds = split_seeds(path)
    extra = tmp_path / "dagger.h5"
    collect_driving(extra, scenario="merge", n_samples=64, seed=3, quick=True, drivers={"creep": _creeping_plans})
    base = DrivingSamples(path, seeds=train_seeds)
    both = training_samples(dataclasses.replace(config, extra_train_data=(str(extra),)), path, train_seeds,
                            test_seeds)
    assert len(both) == len(base) + 64
    np.testing.assert_array_equal(both.arrays["trajectory"][: len(base)], base.arrays["trajectory"])
    np.testing.assert_array_equal(both.arrays["trajectory"][len(base):], DrivingSamples(extra).arrays["trajectory"])
    # the benchmark's own data file holds test rows: adding it would train on the held-out split
    with pytest.raises(ValueError, match="test split or of a test scene seed"):
        training_samples(dataclasses.replace(config, extra_train_data=(str(path),)), path, train_seeds, test_seeds)
    with pytest.raises(ValueError, match="extra_train_data: no file"):
        training_samples(dataclasses.replace(config, extra_train_data=(str(tmp_path / "none.h5"),)), path,
                         train_seeds, test_seeds)


@pytest.mark.timeout(900)
def test_train_only_in_parallel_processes_then_a_full_run_reuses_the_weights(quick_demo: Path,
                                                                            tmp_path: Path) -> None:
    import shutil

    from trajgen.bench.driving import train_policies

    out = tmp_path / "parallel"
    out.mkdir()
    shutil.copy(quick_demo / "data.h5", out / "data.h5")
    config = dataclasses.replace(DrivingBenchConfig.quick(str(out)), policies=("regression",), training_seeds=(0, 1),
                                 pictures=False)
    summaries = train_policies(config, jobs=2)
    assert set(summaries) == {"regression", "regression-seed1"}
    # each process trained its own seed
    for run, seed in (("regression", 0), ("regression-seed1", 1)):
        assert summaries[run]["settings"]["seed"] == seed
    serial = dataclasses.replace(config, out_dir=str(tmp_path / "serial"))
    (tmp_path / "serial").mkdir()
    shutil.copy(quick_demo / "data.h5", tmp_path / "serial" / "data.h5")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the two workers on this 2-core machine (cpu_count // jobs)
    try:
        train_policies(serial, jobs=1)
    finally:
        torch.set_num_threads(threads)
    for run in summaries:
        a = RegressionPolicy.load(out / run / "policy.safetensors").state_dict()
        b = RegressionPolicy.load(tmp_path / "serial" / run / "policy.safetensors").state_dict()
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), run  # as when trained here
    document = run_driving_benchmark(config)
    assert document["policies"]["regression"]["training"] == [summaries["regression"], summaries["regression-seed1"]]
    with pytest.raises(ValueError, match="jobs must be >= 1"):
        train_policies(config, jobs=0)


def test_stall_diagnosis_drives_the_benchmark_scenes_as_the_benchmark_does(quick_demo: Path, tmp_path: Path) -> None:
    script = _load_script("diagnose_driving_stalls")
    config = DrivingBenchConfig.quick(str(quick_demo))
    result = script.main(["--policy", str(quick_demo / "regression" / "policy.safetensors"), "--episodes",
                          str(config.closed_loop_episodes), "--max-decisions", str(config.max_decisions),
                          "--out", str(tmp_path / "stalls.json")])
    assert json.loads((tmp_path / "stalls.json").read_text()) == result
    # the same scenes, decisions and scores as the benchmark's closed loop of that policy
    saved = json.loads((quick_demo / "results.json").read_text())["policies"]["regression"]
    assert result["closed_loop"]["pdms"] == pytest.approx(saved["closed_loop"]["intersection"]["pdms"]["mean"],
                                                          abs=1e-12)
    assert result["stalls"]["decisions"] + result["other"]["decisions"] == result["decisions"] > 0


def test_script_list_options_add_up_when_repeated(monkeypatch: pytest.MonkeyPatch) -> None:
    script = _load_script("bench_driving")
    seen: list[DrivingBenchConfig] = []
    monkeypatch.setattr(script, "train_policies", lambda config, jobs: seen.append(config) or {})
    script.main(["--train-only", "--extra-train-data", "a.h5", "--extra-train-data", "b.h5", "c.h5",
                 "--policies", "anchored", "--policies", "regression", "--training-seeds", "0", "--training-seeds", "2"])
    assert seen[-1].extra_train_data == ("a.h5", "b.h5", "c.h5")   # a repeated flag used to keep only its last list
    assert seen[-1].policies == ("anchored", "regression") and seen[-1].seeds_for_training == (0, 2)
    script.main(["--train-only"])
    defaults = DrivingBenchConfig()
    assert (seen[-1].policies, seen[-1].policy_lr, seen[-1].extra_train_data, seen[-1].training_seeds) == \
        (defaults.policies, defaults.policy_lr, (), ())


def test_latency_variant_script_builds_the_variants_it_names(tmp_path: Path) -> None:
    """scripts/latency_driving_variants.py: variants differ from the base only in the named fields, every policy is
    timed in each run, and a malformed variant is refused naming it."""
    from trajgen.envs.driving.env import DrivingVectorEnv

    script = _load_script("latency_driving_variants")
    obs, _ = DrivingVectorEnv(num_envs=2, scenario="merge").reset(seed=3)
    np.savez(tmp_path / "obs.npz", **{k: np.asarray(obs[k]) for k in OBSERVATION_KEYS})
    result = script.main(["--latency-obs", str(tmp_path / "obs.npz"), "--repeats", "2", "--runs", "1",
                          "--variant", "k4:n_anchors=4,mlp_ratio=2", "--out", str(tmp_path / "v.json")])
    assert set(result["runs"][0]) == {"anchored", "anchored/k4", "vanilla"}
    assert result["variants"] == {"k4": {"n_anchors": 4, "mlp_ratio": 2}}
    assert json.loads((tmp_path / "v.json").read_text())["ratios"][0].keys() == {"anchored", "anchored/k4"}
    base = build_policy("anchored", DrivingBenchConfig(), script.synthetic_plans())
    variant = script.build_variants(base, {"k4": {"n_anchors": 4}})["anchored/k4"]
    assert [k for k, _, _ in variant.config.differences(base.config)] == ["n_anchors"]
    torch.testing.assert_close(variant.anchors, base.anchors[:4])
    for bad in ("k4", "k4:anchors=4", ":n_anchors=4"):
        with pytest.raises(ValueError, match="variant"):
            script.parse_variant(bad)
