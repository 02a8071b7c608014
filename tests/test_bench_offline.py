"""Offline benchmark (trajgen.bench.offline, scripts/bench_offline.py): the quick run end to end, its table against
an independent recomputation from the per-cell JSONs, resuming, hand-built aggregation and targets, bad input.

One quick run (about 20 s on 2 busy cores: a tiny SAC behaviour run, 600 transitions, 4 tiny algorithms) is shared
by the module. No assertion looks at wall time.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trajgen.bench.offline import (
    ALGORITHM_ORDER,
    QUICK_OVERRIDES,
    OfflineBenchSettings,
    aggregate,
    cell_dir,
    evaluate_targets,
    markdown_report,
    quick_settings,
    run_offline_benchmark,
)
from trajgen.envs.mujoco import REFERENCES_PATH
from trajgen.policies.offline import TrajectoryDiffuserConfig

HOPPER_D4RL = (-20.272305, 3234.3)  # REF_MIN_SCORE / REF_MAX_SCORE of hopper in D4RL's infos.py


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("bench_offline")
    kwargs = {"out_dir": root / "out", "behaviour_dir": root / "behaviour"}
    first = run_offline_benchmark(quick_settings(), **kwargs)
    return {"root": root, "kwargs": kwargs, "first": first}


def _cells(out_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((out_dir / "cells").rglob("result.json"))]


def _table_rows(markdown: str) -> list[dict[str, str]]:
    lines = [ln for ln in markdown.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


def _trajgen_score_cell(returns: np.ndarray) -> str:
    """The table's trajgen-reference cell recomputed from references.json (n/a while no expert is measured)."""
    entry = json.loads(REFERENCES_PATH.read_text()).get("hopper", {})
    if "expert" not in entry:
        return "n/a"
    scores = 100.0 * (returns - entry["random"]) / (entry["expert"] - entry["random"])
    return f"{scores.mean():.1f} ± {_se(scores):.1f}"


def _se(values: np.ndarray) -> float:
    return float(np.sqrt(np.sum((values - values.mean()) ** 2) / (len(values) - 1) / len(values)))


def test_quick_run_writes_every_cell_json_and_md(quick_run: dict[str, Any]) -> None:
    out = quick_run["kwargs"]["out_dir"]
    first = quick_run["first"]
    assert json.loads((out / "bench_offline.json").read_text()) == json.loads(json.dumps(first))
    cells = _cells(out)
    assert sorted(c["algo"] for c in cells) == sorted(ALGORITHM_ORDER)
    for cell in cells:
        ev = cell["eval"]
        assert ev["episodes"] == len(ev["returns"]) == len(ev["lengths"]) == 20
        assert ev["env_steps"] == sum(ev["lengths"]) and max(ev["lengths"]) <= 60
        assert cell["train"]["steps"] == 30 and cell["train"]["batch_size"] == 16     # one budget for all
        assert len(cell["latency"]["times_ms"]) == 10
    assert first["skipped"] == [] and len(first["rows"]) == 4
    assert first["compute"]["cpu"] and first["compute"]["threads_used"] == 1
    markdown = (out / "bench_offline.md").read_text()
    assert "## Targets" in markdown and "TD latency <= DD latency / 3" in markdown


def test_table_equals_an_independent_recomputation_from_the_cells(quick_run: dict[str, Any]) -> None:
    out = quick_run["kwargs"]["out_dir"]
    table = {r["algorithm"]: r for r in _table_rows((out / "bench_offline.md").read_text())}
    rows = {r["algo"]: r for r in quick_run["first"]["rows"]}
    for cell in _cells(out):
        returns = np.asarray(cell["eval"]["returns"])
        scores = 100.0 * (returns - HOPPER_D4RL[0]) / (HOPPER_D4RL[1] - HOPPER_D4RL[0])
        times = np.asarray(cell["latency"]["times_ms"])
        sorted_times = np.sort(times)
        p99 = np.interp(0.99 * (len(times) - 1), np.arange(len(times)), sorted_times)     # linear percentile
        median = 0.5 * (sorted_times[(len(times) - 1) // 2] + sorted_times[len(times) // 2])
        steps_per_s = cell["eval"]["env_steps"] / cell["eval"]["wall_s"]
        row, shown = rows[cell["algo"]], table[cell["algo"]]
        assert row["score"]["d4rl"]["mean"] == pytest.approx(scores.mean(), abs=1e-9)
        assert row["score"]["d4rl"]["se"] == pytest.approx(_se(scores), abs=1e-9)
        assert row["latency_median_ms"] == pytest.approx(median) and row["latency_p99_ms"] == pytest.approx(p99)
        assert shown["score (D4RL ref)"] == f"{scores.mean():.1f} ± {_se(scores):.1f}"
        assert shown["score (trajgen ref)"] == _trajgen_score_cell(returns)
        assert shown["s.e. over"] == "episodes" and shown["seeds x episodes"] == "1 x 20"
        assert shown["latency median ms"] == f"{median:.2f}" and shown["latency p99 ms"] == f"{p99:.2f}"
        assert shown["NFE"] == str(cell["latency"]["nfe"]) and shown["train steps"] == "30"
        assert shown["parameters"] == str(cell["train"]["parameters"])
        assert shown["train wall s / seed"] == f"{cell['train']['wall_s']:.1f}"
        assert shown["eval env steps/s"] == f"{steps_per_s:.0f}"
    td, dd = rows["trajectory-diffuser"], rows["decision-diffuser"]
    horizon = quick_settings().config("trajectory-diffuser").horizon
    assert td["nfe"] == (horizon - 1) + 3 + 1 and dd["nfe"] == 10 + 1     # draft steps + refine + inverse dynamics
    target = next(t for t in quick_run["first"]["targets"] if t["target"] == "TD score >= DD score")
    assert target["met"] == (td["score"]["d4rl"]["mean"] >= dd["score"]["d4rl"]["mean"])


def test_rerun_skips_finished_cells_and_recomputes_a_deleted_one_identically(quick_run: dict[str, Any]) -> None:
    kwargs, first = quick_run["kwargs"], quick_run["first"]
    again = run_offline_benchmark(quick_settings(), **kwargs)
    assert sorted(again["skipped"]) == sorted(first["cells"])
    assert again["rows"] == first["rows"]
    bc = cell_dir(kwargs["out_dir"], "hopper", "quick", "behavior-cloning", 0)
    before = json.loads((bc / "result.json").read_text())
    (bc / "result.json").unlink()
    third = run_offline_benchmark(quick_settings(), **kwargs)
    assert str(bc / "result.json") not in third["skipped"] and len(third["skipped"]) == 3
    after = json.loads((bc / "result.json").read_text())
    assert after["train"] == before["train"]                 # the finished training run was reused, not redone
    assert after["eval"]["returns"] == before["eval"]["returns"]    # fixed seeds: the same episodes


def test_cells_in_two_worker_processes_train_and_score_as_the_serial_run(quick_run: dict[str, Any],
                                                                         tmp_path: Path) -> None:
    dataset = quick_run["kwargs"]["out_dir"] / "data" / "hopper-quick.hdf5"
    algos = ("decision-transformer", "behavior-cloning")
    parallel = run_offline_benchmark(quick_settings(algos=algos, jobs=2), tmp_path,
                                     datasets={("hopper", "quick"): dataset})
    serial = {c["algo"]: c for c in _cells(quick_run["kwargs"]["out_dir"])}
    assert [c.split("/cells/")[1] for c in parallel["cells"]] == [f"hopper/quick/{a}/seed0/result.json" for a in algos]
    for cell in _cells(tmp_path):
        assert cell["eval"]["returns"] == serial[cell["algo"]]["eval"]["returns"]   # same seeds, same episodes
        assert cell["train"]["final_loss"] == serial[cell["algo"]]["train"]["final_loss"]


def test_retime_replaces_only_the_latency(quick_run: dict[str, Any], tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "out"
    shutil.copytree(quick_run["kwargs"]["out_dir"], out)
    before = {c["algo"]: c for c in _cells(out)}
    dataset = quick_run["kwargs"]["out_dir"] / "data" / "hopper-quick.hdf5"    # the path the cells were run with
    result = run_offline_benchmark(quick_settings(), out, datasets={("hopper", "quick"): dataset}, retime=True)
    assert len(result["skipped"]) == 4
    for cell in _cells(out):
        old = before[cell["algo"]]
        assert cell["eval"] == old["eval"] and cell["train"] == old["train"]
        assert cell["retimed"]["previous_median_ms"] == old["latency"]["median_ms"]
        assert len(cell["latency"]["times_ms"]) == 10 and cell["latency"]["times_ms"] != old["latency"]["times_ms"]


def test_finished_only_reports_the_finished_cells_and_trains_nothing(quick_run: dict[str, Any], tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "out"
    shutil.copytree(quick_run["kwargs"]["out_dir"] / "cells", out / "cells")
    dataset = quick_run["kwargs"]["out_dir"] / "data" / "hopper-quick.hdf5"
    (cell_dir(out, "hopper", "quick", "decision-diffuser", 0) / "result.json").unlink()
    settings = quick_settings(seeds=(0, 1))
    result = run_offline_benchmark(settings, out, datasets={("hopper", "quick"): dataset}, finished_only=True)
    assert sorted(result["missing"]) == sorted(["hopper quick decision-diffuser 0"]
                                               + [f"hopper quick {a} 1" for a in ALGORITHM_ORDER])
    assert sorted(r["algo"] for r in result["rows"]) == sorted(set(ALGORITHM_ORDER) - {"decision-diffuser"})
    assert not (cell_dir(out, "hopper", "quick", "decision-diffuser", 0) / "result.json").exists()
    assert not cell_dir(out, "hopper", "quick", "behavior-cloning", 1).exists()
    assert "not finished" in (out / "bench_offline.md").read_text()
    first_rows = {r["algo"]: r for r in quick_run["first"]["rows"]}
    for row in result["rows"]:
        assert row["score"] == first_rows[row["algo"]]["score"]
    nothing = run_offline_benchmark(settings, tmp_path / "empty", finished_only=True)   # no data, no cells
    assert nothing["rows"] == [] and "hopper quick (no dataset)" in nothing["missing"]


def test_changed_settings_do_not_reuse_or_overwrite_finished_cells(quick_run: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"other settings.*'episodes'"):
        run_offline_benchmark(quick_settings(episodes=21), **quick_run["kwargs"])


def test_new_inference_options_reevaluate_the_trained_weights_and_keep_the_old_result(quick_run: dict[str, Any],
                                                                                      tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "out"
    shutil.copytree(quick_run["kwargs"]["out_dir"] / "cells", out / "cells")
    dataset = quick_run["kwargs"]["out_dir"] / "data" / "hopper-quick.hdf5"
    td = cell_dir(out, "hopper", "quick", "trajectory-diffuser", 0)
    before = json.loads((td / "result.json").read_text())
    overrides = {algo: dict(QUICK_OVERRIDES[algo]) for algo in ALGORITHM_ORDER}
    overrides["trajectory-diffuser"]["t_mid"] = 0.0
    result = run_offline_benchmark(quick_settings(overrides=overrides), out, datasets={("hopper", "quick"): dataset})
    assert len(result["skipped"]) == 3 and str(td / "result.json") not in result["skipped"]
    after = json.loads((td / "result.json").read_text())
    assert after["train"] == before["train"]                     # the trained weights were reused, not retrained
    assert after["signature"]["config"]["t_mid"] == 0.0 and before["signature"]["config"]["t_mid"] == TrajectoryDiffuserConfig.t_mid
    assert after["latency"]["nfe"] < before["latency"]["nfe"]    # no refinement steps: the new option was used
    assert json.loads((td / "result.superseded-0.json").read_text()) == before
    (row,) = _load_script("compare_superseded").paired_rows(out)     # the before / after table of the script
    assert (row["algo"], row["seeds"], row["changed"]) == ("trajectory-diffuser", [0], {"t_mid": (TrajectoryDiffuserConfig.t_mid, 0.0)})
    assert row["before"] == [np.mean(before["eval"]["scores"]["d4rl"])]
    assert row["after"] == [np.mean(after["eval"]["scores"]["d4rl"])]
    overrides["trajectory-diffuser"]["unet_base_dim"] = 4      # a field the weights depend on: refused as before
    with pytest.raises(ValueError, match=r"other settings.*'config'"):
        run_offline_benchmark(quick_settings(overrides=overrides), out, datasets={("hopper", "quick"): dataset})


def test_dataset_for_another_env_is_refused(quick_run: dict[str, Any], tmp_path: Path) -> None:
    hopper_file = quick_run["kwargs"]["out_dir"] / "data" / "hopper-quick.hdf5"
    settings = quick_settings(envs=("walker2d",), algos=("behavior-cloning",))
    with pytest.raises(ValueError, match="Walker2d"):
        run_offline_benchmark(settings, tmp_path, datasets={("walker2d", "quick"): hopper_file})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_offline_benchmark(settings, tmp_path, datasets={("walker2d", "quick"): tmp_path / "none.hdf5"})


def test_missing_behaviour_run_says_how_to_get_one(tmp_path: Path) -> None:
    settings = OfflineBenchSettings(envs=("hopper",), levels=("medium",), algos=("behavior-cloning",), seeds=(0,))
    with pytest.raises(FileNotFoundError, match="--behaviour-dir"):
        run_offline_benchmark(settings, tmp_path / "out", behaviour_dir=tmp_path / "none")


def _load_script(name: str = "bench_offline") -> Any:
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_script_reruns_the_quick_benchmark_and_prints_the_table(quick_run: dict[str, Any],
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    script = _load_script()
    out, behaviour = quick_run["kwargs"]["out_dir"], quick_run["kwargs"]["behaviour_dir"]
    result = script.main(["--quick", "--out-dir", str(out), "--behaviour-dir", str(behaviour)])
    assert len(result["skipped"]) == 4
    printed = capsys.readouterr().out
    assert "trajectory-diffuser" in printed.replace("…", "") or "trajectory-di" in printed
    assert "[met]" in printed or "[NOT met]" in printed
    assert script.parse_datasets(["hopper:medium=a.hdf5"]) == {("hopper", "medium"): "a.hdf5"}
    assert script.parse_overrides(["trajectory-diffuser.t_mid=0.2", "decision-diffuser.solver=ddim",
                                   "trajectory-diffuser.use_draft=false", "decision-diffuser.unet_dim_mults=[1, 2]"]) == {
        "trajectory-diffuser": {"t_mid": 0.2, "use_draft": False},
        "decision-diffuser": {"solver": "ddim", "unet_dim_mults": [1, 2]}}
    with pytest.raises(SystemExit):
        script.parse_datasets(["hopper=a.hdf5"])


def test_script_small_nets_preset_keeps_explicit_overrides() -> None:
    script = _load_script()
    args = script.make_parser().parse_args(["--nets", "small", "--set", "decision-diffuser.unet_base_dim=24"])
    settings = script.build_settings(args)
    td, dd = settings.config("trajectory-diffuser"), settings.config("decision-diffuser")
    assert (td.unet_base_dim, td.gpt_width, td.invdyn_hidden) == (16, 64, 128)
    assert (dd.unet_base_dim, dd.invdyn_hidden) == (24, 128)         # --set wins over the preset
    assert settings.config("behavior-cloning").hidden_dim == 128
    default = script.build_settings(script.make_parser().parse_args([]))
    assert default.config("trajectory-diffuser").unet_base_dim == 32
    only_bc = script.build_settings(script.make_parser().parse_args(["--nets", "small", "--algos", "behavior-cloning"]))
    assert set(only_bc.overrides) == {"behavior-cloning"} and only_bc.config("behavior-cloning").hidden_dim == 128
    with pytest.raises(SystemExit, match="--nets"):
        script.build_settings(script.make_parser().parse_args(["--quick", "--nets", "small"]))


def test_plan_diagnosis_of_the_quick_cells_against_the_logged_data(quick_run: dict[str, Any], tmp_path: Path) -> None:
    """The logged windows are the reference row (s1 error 0, step ratio 1, the inverse dynamics' own error); the
    DT-style planner's plan is its draft; windows never cross an episode end."""
    import h5py
    import torch

    from trajgen.policies.offline import load_policy

    script = _load_script("diagnose_offline_plans")
    out = quick_run["kwargs"]["out_dir"]
    data = out / "data" / "hopper-quick.hdf5"
    result = script.main(["--cells", str(out / "cells"), "--env", "hopper", "--level", "quick", "--data", str(data),
                          "--n", "32", "--out", str(tmp_path / "diag.json")])
    assert json.loads((tmp_path / "diag.json").read_text()) == result
    algos = result["algorithms"]
    assert set(algos) == {"trajectory-diffuser", "decision-diffuser", "decision-transformer"}
    assert set(algos["decision-diffuser"]) == {"data", "policy", "from-noise"}
    assert set(algos["trajectory-diffuser"]) == {"data", "policy", "from-noise", "draft"}
    dt = algos["decision-transformer"]
    assert dt["policy"] == dt["draft"]
    policy = load_policy(out / "cells" / "hopper" / "quick" / "decision-transformer" / "seed0" / "run")
    states, actions = script.logged_windows(data, policy.config.horizon, 32, 0)
    with h5py.File(data) as f:
        obs = f["observations"][:]
        episode = np.cumsum(np.concatenate([[0], (f["terminals"][:-1] | f["timeouts"][:-1])]))
    rows = [np.flatnonzero((obs == s[0]).all(1))[0] for s in states]
    assert all(episode[r] == episode[r + policy.config.horizon - 1] for r in rows)
    assert all(np.array_equal(obs[r: r + policy.config.horizon], s) for r, s in zip(rows, states))
    with torch.no_grad():
        norm = policy.model.normalize_states(torch.as_tensor(states))
        acted = policy.model.unnormalize_actions(policy.model.inverse_dynamics(torch.cat([norm[:, 0], norm[:, 1]], -1)))
    expected = float((acted - torch.as_tensor(actions)).pow(2).mean().sqrt())
    assert dt["data"] == pytest.approx({"s1_rms": 0.0, "step_ratio": 1.0, "action_rms": expected}, rel=1e-5, abs=1e-6)
    # reconstruction: eps-prediction gives x0_hat - plan = -(sigma / alpha) (eps_hat - eps) exactly, so the RMS over
    # plan[1:] is sigma / alpha times the noise-prediction error of the guided UNet on the same draw
    td_policy = load_policy(out / "cells" / "hopper" / "quick" / "trajectory-diffuser" / "seed0" / "run")
    assert td_policy.config.prediction == "eps" and "reconstruction_rms" not in dt["data"]
    td = algos["trajectory-diffuser"]
    assert set(td["data"]["reconstruction_rms"]) == {str(t) for t in script.PROBE_TIMES}
    with torch.no_grad():
        plan = td_policy.model.normalize_states(torch.as_tensor(states))
        cond = td_policy._condition(None, len(plan))
        generator = torch.Generator().manual_seed(0)
        for t in script.PROBE_TIMES:
            alpha, sigma = td_policy.model.schedule.coefficients(t)
            eps = torch.randn(plan.shape, generator=generator)
            eps_hat = td_policy.denoiser()(alpha * plan + sigma * eps, torch.full((len(plan),), t), cond=cond)
            by_hand = float(sigma / alpha * (eps_hat - eps)[:, 1:].pow(2).mean().sqrt())
            assert td["data"]["reconstruction_rms"][str(t)] == pytest.approx(by_hand, rel=1e-4)


# ---------------------------------------------------------------- aggregation and targets on hand-built cells


def _cell(env: str, level: str, algo: str, seed: int, returns: list[float], times: list[float],
          env_steps: int = 100, wall: float = 1.0) -> dict[str, Any]:
    scores = (100.0 * (np.asarray(returns) - HOPPER_D4RL[0]) / (HOPPER_D4RL[1] - HOPPER_D4RL[0])).tolist()
    return {"env": env, "level": level, "algo": algo, "seed": seed,
            "train": {"steps": 10, "batch_size": 4, "wall_s": 2.0 + seed, "parameters": 123},
            "eval": {"episodes": len(returns), "returns": returns, "env_steps": env_steps, "wall_s": wall,
                     "scores": {"d4rl": scores, "trajgen": None}, "score_notes": {}},
            "latency": {"times_ms": times, "nfe": 7, "cuda_graph": False, "device": "cpu"}}


def test_aggregate_two_seeds_by_hand() -> None:
    lo, hi = HOPPER_D4RL
    to_return = lambda s: lo + s * (hi - lo) / 100.0  # returns whose D4RL score is s
    cells = [_cell("hopper", "medium", "behavior-cloning", 1, [to_return(30), to_return(40)], [3.0, 4.0],
                   env_steps=300, wall=2.0),
             _cell("hopper", "medium", "behavior-cloning", 0, [to_return(10), to_return(20)], [1.0, 2.0],
                   env_steps=100, wall=2.0)]
    (row,) = aggregate(cells)
    assert row["seeds"] == [0, 1] and row["n_seeds"] == 2
    score = row["score"]["d4rl"]
    assert score["mean"] == pytest.approx(25.0) and score["seed_means"] == pytest.approx([15.0, 35.0])
    assert score["se"] == pytest.approx(10.0) and score["se_over"] == "seeds"   # std(15, 35) / sqrt(2)
    assert row["score"]["trajgen"] is None
    assert row["latency_median_ms"] == pytest.approx(2.5)
    assert row["latency_p99_ms"] == pytest.approx(3.97)                # 3 + 0.97 (4 - 3), linear interpolation
    assert row["env_steps_per_s"] == pytest.approx(100.0) and row["train_wall_s"] == pytest.approx(2.5)
    assert not row["latency_cuda_graph"]


def test_graph_latency_is_used_only_when_every_cell_has_one() -> None:
    cells = [_cell("hopper", "medium", algo, 0, [1.0], [10.0, 20.0]) for algo in ALGORITHM_ORDER[:2]]
    cells[0]["latency"]["graph"] = {"times_ms": [1.0, 3.0], "nfe": 7}
    cells[1]["latency"]["graph"] = {"error": "operation not permitted when stream is capturing"}
    assert [r["latency_median_ms"] for r in aggregate(cells)] == [15.0, 15.0]      # eager for both
    cells[1]["latency"]["graph"] = {"times_ms": [2.0, 4.0], "nfe": 7}
    rows = aggregate(cells)
    assert [r["latency_median_ms"] for r in rows] == [2.0, 3.0] and all(r["latency_cuda_graph"] for r in rows)


def _row(level: str, algo: str, seed_scores: dict[int, float], latency: float) -> dict[str, Any]:
    return {"env": "hopper", "level": level, "algo": algo, "latency_median_ms": latency, "seeds": sorted(seed_scores),
            "score": {"d4rl": {"mean": float(np.mean(list(seed_scores.values()))),
                               "seed_means": [seed_scores[s] for s in sorted(seed_scores)]}}}


def test_targets_by_hand() -> None:
    rows = [_row("medium", "trajectory-diffuser", {0: 50}, 10.0), _row("medium", "decision-diffuser", {0: 40}, 40.0),
            _row("medium-replay", "trajectory-diffuser", {0: 30}, 10.0),
            _row("medium-replay", "decision-diffuser", {0: 31}, 25.0),
            _row("medium-replay", "behavior-cloning", {0: 30}, 0.1)]
    got = {(t["level"], t["target"]): t["met"] for t in evaluate_targets(rows)}
    assert got == {("medium", "TD score >= DD score"): True, ("medium", "TD latency <= DD latency / 3"): True,
                   ("medium-replay", "TD score >= DD score"): False,
                   ("medium-replay", "TD latency <= DD latency / 3"): False,          # 10 > 25 / 3
                   ("medium-replay", "TD score > BC score"): False}                   # a tie is not a win
    only_td = evaluate_targets([_row("medium", "trajectory-diffuser", {0: 1}, 1)])
    assert [t["met"] for t in only_td] == [None, None, None]


def test_score_targets_compare_the_seeds_both_algorithms_finished() -> None:
    # TD's seed 1 is bad and DD has not finished it: over all seeds TD (20) loses to DD (30), over the shared
    # seeds 0 and 2 it wins (35 >= 30); BC shares no seed with TD
    rows = [_row("medium-replay", "trajectory-diffuser", {0: 30, 1: -10, 2: 40}, 10.0),
            _row("medium-replay", "decision-diffuser", {0: 32, 2: 28}, 40.0),
            _row("medium-replay", "behavior-cloning", {3: 0}, 0.1)]
    targets = {t["target"]: t for t in evaluate_targets(rows)}
    score = targets["TD score >= DD score"]
    assert score["met"] is True and score["seeds"] == [0, 2]
    assert (score["td"], score["other"]) == pytest.approx((35.0, 30.0))
    assert "seeds" not in targets["TD latency <= DD latency / 3"]
    versus_bc = targets["TD score > BC score"]
    assert versus_bc["met"] is None and versus_bc["note"] == "no training seed finished for both"
    report = markdown_report({"settings": {"device": "cpu", "steps": 1, "batch_size": 1, "episodes": 1,
                                           "latency_calls": 1},
                              "compute": {"cpu": "x", "threads_used": 1, "cpu_count": 1, "torch": "t"},
                              "latency_mode": "cpu, eager", "rows": [], "targets": list(targets.values())})
    assert "- [met] TD score >= DD score, hopper medium-replay: TD 35.00 vs 30.00 (seeds 0, 2)" in report
    assert "- [n/a] TD score > BC score, hopper medium-replay (no training seed finished for both)" in report


@pytest.mark.parametrize(("changes", "message"), [
    ({"algos": ("trajectory-diffuser", "ppo")}, r"algos \['ppo'\]"),
    ({"levels": ("hard",)}, r"levels \['hard'\]"),
    ({"envs": ("ant-maze",)}, "ant-maze"),
    ({"seeds": (0, 0)}, "seeds"),
    ({"episodes": 0}, "episodes"),
    ({"overrides": {"behavior-cloning": {"no_such_field": 1}}}, "no_such_field"),
    ({"overrides": {"behavior-cloning": {"batch_size": 8}}}, "batch_size is shared"),
    ({"overrides": {"decision-diffuser": {"sample_steps": 5}}, "algos": ("behavior-cloning",)}, "not in algos"),
])
def test_bad_settings_name_the_problem(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OfflineBenchSettings(**changes)

