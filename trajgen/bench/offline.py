"""Offline-RL benchmark (issue 5): every algorithm on every D4RL-style dataset under one training budget.

A *cell* is one (env, level, algorithm, training seed). Each cell trains the algorithm with the same
``steps`` and ``batch_size`` as every other algorithm, evaluates ``episodes`` episodes batched over a
Gymnasium vector env (episode k reset with seed ``eval_seed + k``, identical starts for every cell),
times decisions at batch 1 and writes ``cells/<env>/<level>/<algo>/seed<k>/result.json``. A rerun skips
finished cells (and reuses a finished training run of an unfinished cell), so the benchmark resumes.

:func:`aggregate` turns the cell JSONs into one row per (env, level, algorithm):

- score: D4RL-normalised, ``100 (R - R_random) / (R_expert - R_random)``, once with D4RL's published
  reference returns (``d4rl``) and once with trajgen's references measured on the v5 envs (``trajgen``;
  None until the expert reference is measured). ``mean`` is over all episodes of all seeds (equal episodes
  per seed, so it is also the mean of the seed means); ``se`` is the standard error of the seed means when
  there are >= 2 seeds, else the standard error over that seed's episodes (``se_over`` says which).
- latency: median and 99th percentile of the decision times of all seeds pooled (batch 1). On CUDA each cell
  is timed eagerly and with the whole decision replayed from a CUDA graph; the table uses the graph timings
  only when every cell could be captured, so that all algorithms are compared in one mode.
- training wall time: mean over seeds; env steps/s: all evaluation env steps / all evaluation wall time.

:func:`run_offline_benchmark` writes ``bench_offline.json`` and ``bench_offline.md`` (the markdown table
and a targets section) under ``out_dir``.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trajgen.agents.offline import decision_latency, evaluate
from trajgen.bench.solvers import machine_info
from trajgen.bench.threads import torch_threads
from trajgen.envs.mujoco import ENV_IDS, collect_mujoco, env_name, load_mujoco_dataset, normalized_score
from trajgen.envs.mujoco.collect import LEVELS
from trajgen.policies.offline import (
    ALGORITHMS,
    POLICY_FILE,
    OfflinePolicy,
    StateHistory,
    load_policy,
    make_config,
    train_offline,
)

ALGORITHM_ORDER = ("trajectory-diffuser", "decision-diffuser", "decision-transformer", "behavior-cloning")
SHORT_NAMES = {"trajectory-diffuser": "TD", "decision-diffuser": "DD", "decision-transformer": "DT",
               "behavior-cloning": "BC"}
REFERENCES = ("d4rl", "trajgen")
RESULT_FILE = "result.json"
TRAIN_FILE = "train.json"
TARGET_LATENCY_RATIO = 3.0

QUICK_OVERRIDES: dict[str, dict[str, Any]] = {
    "trajectory-diffuser": {"horizon": 8, "unet_base_dim": 8, "unet_dim_mults": (1, 2), "diffusion_steps": 100,
                            "gpt_width": 32, "gpt_depth": 1, "gpt_heads": 2, "invdyn_hidden": 32, "invdyn_depth": 1,
                            "warmup_steps": 5},
    "decision-diffuser": {"horizon": 8, "unet_base_dim": 8, "unet_dim_mults": (1, 2), "diffusion_steps": 100,
                          "invdyn_hidden": 32, "invdyn_depth": 1, "sample_steps": 10, "warmup_steps": 5},
    "decision-transformer": {"horizon": 8, "gpt_width": 32, "gpt_depth": 1, "gpt_heads": 2, "invdyn_hidden": 32,
                             "invdyn_depth": 1, "warmup_steps": 5},
    "behavior-cloning": {"hidden_dim": 32, "depth": 1, "warmup_steps": 5},
}
"""Tiny nets for ``--quick`` (the quick run checks the pipeline, not the algorithms)."""

SMALL_NET_OVERRIDES: dict[str, dict[str, Any]] = {
    "trajectory-diffuser": {"unet_base_dim": 16, "gpt_width": 64, "invdyn_hidden": 128},
    "decision-diffuser": {"unet_base_dim": 16, "invdyn_hidden": 128},
    "decision-transformer": {"gpt_width": 64, "invdyn_hidden": 128},
    "behavior-cloning": {"hidden_dim": 128},
}
"""Half-width nets for a CPU budget (about 4x fewer parameters: Trajectory Diffuser 0.68M against 2.68M); each net
keeps the same size in every algorithm that uses it (the UNet, the GPT, the inverse dynamics)."""


@dataclass(frozen=True)
class OfflineBenchSettings:
    """What to run and with which budget; one value per field for every algorithm."""

    envs: tuple[str, ...] = ("hopper", "halfcheetah", "walker2d")
    """env short names (``trajgen.envs.mujoco.ENV_IDS``)"""
    levels: tuple[str, ...] = ("medium", "medium-replay", "medium-expert")
    """dataset levels (``trajgen.envs.mujoco.LEVELS``)"""
    algos: tuple[str, ...] = ALGORITHM_ORDER
    """algorithms (keys of ``trajgen.policies.offline.ALGORITHMS``)"""
    seeds: tuple[int, ...] = (0, 1, 2)
    """training seeds (weights, data order, sampling noise)"""
    steps: int = 100_000
    """optimizer updates per cell, the same for every algorithm"""
    batch_size: int = 64
    """windows per update, the same for every algorithm"""
    episodes: int = 20
    """evaluation episodes per cell (>= 20 for the reported table), run batched"""
    eval_seed: int = 0
    """episode k of every cell resets with seed eval_seed + k"""
    max_episode_steps: int | None = None
    """cap on the env's time limit (None: the env's own, 1000 steps)"""
    latency_calls: int = 100
    """timed decisions at batch 1 per cell"""
    device: str = "cpu"
    """where training, evaluation and latency run ("cpu", "cuda", "cuda:1", ...)"""
    threads: int | None = None
    """torch intra-op threads on CPU (None: torch's default), in this process and in every worker"""
    jobs: int = 1
    """cells run side by side in this many worker processes (their latencies then share the machine: re-time
    them on an idle machine with ``run_offline_benchmark(..., retime=True)``)"""
    dataset_steps: int | None = None
    """transitions per policy part when a dataset is collected (None: collect_mujoco's default)"""
    quick: bool = False
    """datasets come from the tiny behaviour runs (``SACConfig.quick``)"""
    train_behaviour: bool = False
    """train a missing behaviour run before collecting (hours per env unless quick)"""
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """per-algorithm config overrides (net sizes, sampling); ``steps`` and ``batch_size`` stay shared"""

    def __post_init__(self) -> None:
        for env in self.envs:
            env_name(env)
        bad_levels = [lv for lv in self.levels if lv not in LEVELS]
        _require(not bad_levels, f"levels {bad_levels} unknown; expected some of {list(LEVELS)}")
        bad_algos = [a for a in self.algos if a not in ALGORITHMS]
        _require(not bad_algos, f"algos {bad_algos} unknown; expected some of {list(ALGORITHM_ORDER)}")
        bad_overrides = sorted(set(self.overrides) - set(self.algos))
        _require(not bad_overrides, f"overrides name algorithms {bad_overrides} that are not in algos {self.algos}")
        for name, value in (("envs", self.envs), ("levels", self.levels), ("algos", self.algos), ("seeds", self.seeds)):
            _require(len(value) > 0 and len(set(value)) == len(value), f"{name} must be non-empty without repeats")
        _require(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        _require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _require(self.episodes >= 1, f"episodes must be >= 1, got {self.episodes}")
        _require(self.latency_calls >= 1, f"latency_calls must be >= 1, got {self.latency_calls}")
        _require(self.threads is None or self.threads >= 1, f"threads must be >= 1, got {self.threads}")
        _require(self.jobs >= 1, f"jobs must be >= 1, got {self.jobs}")
        for algo in self.algos:
            self.config(algo)  # unknown fields fail here, before any training

    def config(self, algo: str) -> Any:
        """The config of ``algo``: its overrides plus the shared batch size."""
        overrides = dict(self.overrides.get(algo, {}))
        _require("batch_size" not in overrides, "batch_size is shared by every algorithm: set it in the settings")
        return make_config(algo, **overrides, batch_size=self.batch_size)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of the fields."""
        return json.loads(json.dumps(dataclasses.asdict(self) | {"overrides": dict(self.overrides)}))


def quick_settings(**changes: Any) -> OfflineBenchSettings:
    """The < 60 s pipeline check: hopper ``quick`` data, tiny nets, 30 updates, 20 short episodes, 1 seed."""
    base = {"envs": ("hopper",), "levels": ("quick",), "seeds": (0,), "steps": 30, "batch_size": 16,
            "episodes": 20, "max_episode_steps": 60, "latency_calls": 10, "threads": 1, "dataset_steps": 600,
            "quick": True, "train_behaviour": True}
    base.update(changes)
    algos = tuple(base.get("algos", ALGORITHM_ORDER))
    base.setdefault("overrides", {a: QUICK_OVERRIDES[a] for a in algos})
    return OfflineBenchSettings(**base)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


# ----------------------------------------------------------------------------------------------------
# datasets
# ----------------------------------------------------------------------------------------------------


def resolve_datasets(settings: OfflineBenchSettings, data_dir: Path, behaviour_dir: Path | None = None,
                     given: Mapping[tuple[str, str], str | os.PathLike] | None = None) -> dict[tuple[str, str], Path]:
    """A D4RL-format file per (env, level): the ``given`` path, or ``data_dir/<env>-<level>.hdf5`` (collected
    with ``collect_mujoco`` from ``behaviour_dir/<env>[-quick]`` when missing). Checks each file's env."""
    out = {}
    for (short, level), (path, was_given) in _dataset_paths(settings, data_dir, given).items():
        if not path.is_file():
            if was_given:
                raise FileNotFoundError(f"dataset for {short} {level}: {path} does not exist")
            path = _collect(settings, short, level, path, behaviour_dir)
        load_mujoco_dataset(path, short)  # refuses a file recorded in another env
        out[(short, level)] = path
    return out


def existing_datasets(settings: OfflineBenchSettings, data_dir: Path,
                      given: Mapping[tuple[str, str], str | os.PathLike] | None = None) -> dict[tuple[str, str], Path]:
    """Like :func:`resolve_datasets`, but only the (env, level) pairs whose file exists; nothing is collected."""
    return {key: path for key, (path, _) in _dataset_paths(settings, data_dir, given).items() if path.is_file()}


def _dataset_paths(settings: OfflineBenchSettings, data_dir: Path,
                   given: Mapping[tuple[str, str], str | os.PathLike] | None) -> dict[tuple[str, str], tuple[Path, bool]]:
    """(env short name, level) -> (the given path or ``data_dir/<env>-<level>.hdf5``, whether it was given)."""
    given = {(env_name(e), lv): Path(p) for (e, lv), p in (given or {}).items()}
    keys = [(env_name(env), level) for env in settings.envs for level in settings.levels]
    return {(short, level): (given.get((short, level)) or data_dir / f"{short}-{level}.hdf5", (short, level) in given)
            for short, level in keys}


def _collect(settings: OfflineBenchSettings, env: str, level: str, path: Path, behaviour_dir: Path | None) -> Path:
    quick = settings.quick or level == "quick"
    policy_dir = None if behaviour_dir is None else behaviour_dir / f"{env}{'-quick' if quick else ''}"
    try:
        return collect_mujoco(env, level, path, n_steps=settings.dataset_steps, policy_dir=policy_dir, quick=quick,
                              train_missing=settings.train_behaviour)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"cannot collect {env} {level}: {error}. Give the dataset with --dataset "
                                f"{env}:{level}=FILE, point --behaviour-dir at finished behaviour runs, or pass "
                                "--train-behaviour (SAC runs take hours)") from error


# ----------------------------------------------------------------------------------------------------
# one cell
# ----------------------------------------------------------------------------------------------------


def cell_dir(out_dir: Path, env: str, level: str, algo: str, seed: int) -> Path:
    """``out_dir/cells/<env>/<level>/<algo>/seed<k>``."""
    return out_dir / "cells" / env / level / algo / f"seed{seed}"


def cell_signature(settings: OfflineBenchSettings, env: str, level: str, algo: str, seed: int,
                   dataset: Path) -> dict[str, Any]:
    """Everything a cell's numbers depend on; a finished cell is reused only when its signature matches."""
    return {"env": env, "level": level, "algo": algo, "seed": seed, "steps": settings.steps,
            "config": settings.config(algo).to_dict(), "episodes": settings.episodes,
            "eval_seed": settings.eval_seed, "max_episode_steps": settings.max_episode_steps,
            "latency_calls": settings.latency_calls, "device": settings.device,
            "dataset": {"path": str(dataset.resolve()), "bytes": dataset.stat().st_size}}


def run_cell(settings: OfflineBenchSettings, env: str, level: str, algo: str, seed: int, dataset: Path,
             out_dir: Path) -> tuple[dict[str, Any], bool]:
    """Train, evaluate and time one cell, or read its finished result. Returns (result, was_skipped).

    Raises ValueError when the cell directory holds a result for other settings (it is never overwritten).
    """
    finished = finished_cell(settings, env, level, algo, seed, dataset, out_dir)
    if finished is not None:
        return finished, True
    directory = cell_dir(out_dir, env, level, algo, seed)
    signature = cell_signature(settings, env, level, algo, seed, dataset)
    policy, train = _trained_policy(settings, algo, seed, dataset, directory / "run", signature)
    evaluation = evaluate(policy, ENV_IDS[env], settings.episodes, seed=settings.eval_seed, device=settings.device,
                          max_episode_steps=settings.max_episode_steps)
    result = {"signature": signature, "env": env, "level": level, "algo": algo, "seed": seed,
              "train": train, "eval": _eval_record(env, evaluation, settings.eval_seed),
              "latency": measure_latency(policy, settings.latency_calls), "finished": time.strftime("%FT%T%z")}
    _set_aside(directory / RESULT_FILE)
    _write_json(directory / RESULT_FILE, result)
    return result, False


def _set_aside(result_file: Path) -> None:
    """Keep a result that new inference options supersede as ``result.superseded-<k>.json`` (k = 0, 1, ...)."""
    if result_file.is_file():
        k = len(list(result_file.parent.glob("result.superseded-*.json")))
        result_file.rename(result_file.with_name(f"result.superseded-{k}.json"))


def finished_cell(settings: OfflineBenchSettings, env: str, level: str, algo: str, seed: int, dataset: Path,
                  out_dir: Path) -> dict[str, Any] | None:
    """The cell's result when it has finished, else None (also when only the config's inference fields changed:
    :func:`run_cell` then evaluates the trained weights again and sets the old result aside). Raises ValueError
    when the cell directory holds a result for other settings (it is never overwritten)."""
    done = cell_dir(out_dir, env, level, algo, seed) / RESULT_FILE
    if not done.is_file():
        return None
    signature = cell_signature(settings, env, level, algo, seed, dataset)
    result = json.loads(done.read_text())
    old = result.get("signature", {})
    differ = sorted(k for k in signature if old.get(k) != signature[k])
    if not differ:
        return result
    if differ == ["config"] and _training_signature(old, algo) == _training_signature(signature, algo):
        return None
    raise ValueError(f"{done} was computed with other settings (differing: {differ}); use another "
                     "out_dir or delete that cell to recompute it")


def _training_signature(signature: Mapping[str, Any], algo: str) -> dict[str, Any]:
    """What a cell's trained weights depend on: updates, dataset, seed and the config without inference fields."""
    return {"steps": signature.get("steps"), "dataset": signature.get("dataset"), "seed": signature.get("seed"),
            "config": ALGORITHMS[algo].training_part(signature.get("config") or {})}


def _trained_policy(settings: OfflineBenchSettings, algo: str, seed: int, dataset: Path, run_dir: Path,
                    signature: dict[str, Any]) -> tuple[OfflinePolicy, dict[str, Any]]:
    """Train (resuming a killed run) or reload a finished training of this cell."""
    record = run_dir / TRAIN_FILE
    if record.is_file() and (run_dir / POLICY_FILE).is_file():
        train = json.loads(record.read_text())
        if _training_signature(train.get("signature", {}), algo) == _training_signature(signature, algo):
            config = settings.config(algo)
            options = {k: getattr(config, k) for k in config.inference_fields}
            return load_policy(run_dir, algorithm=algo, device=settings.device, options=options), train["summary"]
    resumed = (run_dir / "checkpoints").is_dir()
    policy, summary = train_offline(settings.config(algo), dataset, run_dir, settings.steps, seed=seed, resume=True,
                                    device=settings.device)
    train = {"steps": int(summary["step"]), "batch_size": settings.batch_size, "wall_s": float(summary["wall_time_s"]),
             "parameters": int(summary["parameters"]), "final_loss": summary.get("final_loss"),
             "resumed_from_checkpoint": resumed}
    _write_json(record, {"signature": {k: signature[k] for k in ("steps", "config", "dataset", "seed")},
                         "summary": train})
    return policy, train


def _eval_record(env: str, evaluation: dict[str, Any], eval_seed: int) -> dict[str, Any]:
    """Returns, lengths, throughput and the scores under both references (trajgen: None when not measured)."""
    returns = np.asarray(evaluation["returns"], dtype=np.float64)
    scores: dict[str, list[float] | None] = {}
    notes: dict[str, str] = {}
    for reference in REFERENCES:
        try:
            scores[reference] = np.atleast_1d(normalized_score(env, returns, reference)).tolist()
        except (ValueError, FileNotFoundError) as error:
            scores[reference], notes[reference] = None, str(error)
    return {"episodes": evaluation["episodes"], "eval_seed": eval_seed, "returns": returns.tolist(),
            "lengths": evaluation["lengths"], "env_steps": evaluation["env_steps"], "wall_s": evaluation["wall_s"],
            "env_steps_per_s": evaluation["env_steps_per_s"], "scores": scores, "score_notes": notes}


def measure_latency(policy: OfflinePolicy, calls: int, warmup: int = 5) -> dict[str, Any]:
    """Eager decision latency at batch 1 with every call's time (``times_ms``).

    On CUDA also ``"graph"``: the same decisions replayed from a CUDA graph (:func:`cuda_graph_latency`), or
    ``{"error": ...}`` when the decision cannot be captured.
    """
    eager = _eager_latency(policy, calls, warmup)
    if policy.device.type != "cuda":
        return eager
    try:
        graph = cuda_graph_latency(policy, calls, warmup)
    except RuntimeError as error:
        graph = {"error": str(error).splitlines()[0][:300] if str(error) else type(error).__name__}
    return {**eager, "graph": graph}


def _eager_latency(policy: OfflinePolicy, calls: int, warmup: int) -> dict[str, Any]:
    stats = decision_latency(policy, policy.obs_dim, calls, warmup=warmup)
    return {**stats, "device": str(policy.device), "cuda_graph": False}


def cuda_graph_latency(policy: OfflinePolicy, calls: int, warmup: int = 5) -> dict[str, Any]:
    """Batch-1 decisions replayed from one CUDA graph holding the whole ``policy.act`` (GPT draft, sampler,
    inverse dynamics); each timed call copies a new observation in and the action out to numpy.

    The diffusion noise comes from the default CUDA generator, which graphs replay with fresh values.
    """
    device = policy.device
    policy.model.eval()
    rng = np.random.default_rng(0)
    static_obs = torch.zeros(1, policy.obs_dim, device=device)
    k = policy.history_length  # a full history of the policy's length, as decision_latency times
    history = StateHistory(torch.zeros(1, k, policy.obs_dim, device=device),
                           torch.full((1, k), policy.default_return, device=device)) if k else None
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(3):
            policy.act(static_obs, history=history, validate=False)  # no host sync: checked after the replays
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_action = policy.act(static_obs, history=history, validate=False)
    times = []
    for i in range(calls + warmup):
        obs = rng.standard_normal((1, policy.obs_dim))
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        static_obs.copy_(torch.as_tensor(obs, dtype=torch.float32))
        graph.replay()
        action = static_action.cpu().numpy().astype(np.float64)
        if i >= warmup:
            times.append(1e3 * (time.perf_counter() - t0))
    if not np.isfinite(action).all():
        raise RuntimeError("the CUDA-graph decision produced non-finite actions")
    return {**_latency_stats(times, policy.nfe), "times_ms": times, "device": str(device), "cuda_graph": True}


def _latency_stats(times: Sequence[float], nfe: int) -> dict[str, Any]:
    ms = np.asarray(times)
    return {"median_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()),
            "n": len(ms), "nfe": nfe}


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------
# aggregation, targets, table
# ----------------------------------------------------------------------------------------------------


def aggregate(cells: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (env, level, algo) from the cells' result dicts (rules in the module docstring).

    Latency is the CUDA-graph timing when every cell has one, else the eager timing for every cell, so that
    the algorithms are always compared under the same mode.
    """
    use_graph = uses_graph_latency(cells)
    groups: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for cell in cells:
        groups.setdefault((cell["env"], cell["level"], cell["algo"]), []).append(cell)
    rows = []
    for (env, level, algo), group in groups.items():
        group = sorted(group, key=lambda c: c["seed"])
        latency = np.concatenate([_latency(c, use_graph)["times_ms"] for c in group])
        env_steps = sum(c["eval"]["env_steps"] for c in group)
        eval_wall = sum(c["eval"]["wall_s"] for c in group)
        rows.append({
            "env": env, "level": level, "algo": algo, "seeds": [c["seed"] for c in group], "n_seeds": len(group),
            "episodes_per_seed": [c["eval"]["episodes"] for c in group],
            "score": {ref: score_summary([c["eval"]["scores"][ref] for c in group]) for ref in REFERENCES},
            "return": score_summary([c["eval"]["returns"] for c in group]),
            "latency_median_ms": float(np.median(latency)), "latency_p99_ms": float(np.percentile(latency, 99)),
            "latency_cuda_graph": use_graph,
            "nfe": group[0]["latency"]["nfe"], "parameters": group[0]["train"]["parameters"],
            "train_steps": group[0]["train"]["steps"], "batch_size": group[0]["train"]["batch_size"],
            "train_wall_s": float(np.mean([c["train"]["wall_s"] for c in group])),
            "env_steps_per_s": env_steps / eval_wall if eval_wall > 0 else float("nan"),
        })
    order = {a: i for i, a in enumerate(ALGORITHM_ORDER)}
    return sorted(rows, key=lambda r: (r["env"], r["level"], order.get(r["algo"], len(order)), r["algo"]))


def uses_graph_latency(cells: Sequence[Mapping[str, Any]]) -> bool:
    """Whether every cell has a CUDA-graph latency (then the table reports those)."""
    return bool(cells) and all("times_ms" in c["latency"].get("graph", {}) for c in cells)


def _latency(cell: Mapping[str, Any], use_graph: bool) -> Mapping[str, Any]:
    return cell["latency"]["graph"] if use_graph else cell["latency"]


def score_summary(per_seed: Sequence[Sequence[float] | None]) -> dict[str, Any] | None:
    """Mean over all episodes; s.e. of the seed means (>= 2 seeds) or over the episodes (1 seed)."""
    if any(values is None for values in per_seed):
        return None
    seed_means = np.asarray([np.mean(values) for values in per_seed])
    pooled = np.concatenate([np.asarray(values, dtype=np.float64) for values in per_seed])
    if len(seed_means) >= 2:
        se, over = float(seed_means.std(ddof=1) / np.sqrt(len(seed_means))), "seeds"
    else:
        se = float(pooled.std(ddof=1) / np.sqrt(len(pooled))) if len(pooled) > 1 else 0.0
        over = "episodes"
    return {"mean": float(pooled.mean()), "se": se, "se_over": over, "seed_means": seed_means.tolist()}


def evaluate_targets(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The paper's claims per dataset: TD score >= DD score, TD latency <= DD latency / 3, TD > BC on
    medium-replay (``met`` None when an algorithm of the pair is missing).

    Scores are D4RL-referenced means over the training seeds both algorithms finished (listed under ``seeds``),
    so that a partial run compares like with like; latency compares the rows' medians."""
    by_key = {(r["env"], r["level"], r["algo"]): r for r in rows}
    datasets = sorted({(r["env"], r["level"]) for r in rows})
    targets = []
    for env, level in datasets:
        td, dd, bc = (by_key.get((env, level, a)) for a in ("trajectory-diffuser", "decision-diffuser",
                                                            "behavior-cloning"))
        targets.append(_target("TD score >= DD score", env, level, td, dd, lambda a, b: a >= b, _paired_scores))
        targets.append(_target(f"TD latency <= DD latency / {TARGET_LATENCY_RATIO:g}", env, level, td, dd,
                               lambda a, b: a <= b / TARGET_LATENCY_RATIO, _median_latencies))
        if level == "medium-replay":
            targets.append(_target("TD score > BC score", env, level, td, bc, lambda a, b: a > b, _paired_scores))
    if not any(t["level"] == "medium-replay" for t in targets):
        targets.append({"target": "TD score > BC score", "env": None, "level": "medium-replay", "td": None,
                        "other": None, "met": None, "note": "no medium-replay dataset in this run"})
    return targets


Comparison = tuple[float, float, dict[str, Any]]


def _paired_scores(td: Mapping[str, Any], other: Mapping[str, Any]) -> Comparison | None:
    """Mean D4RL score of each row over the seeds both finished (every seed has the same episode count, so the
    mean of seed means is the mean over episodes); None when they share no seed."""
    seeds = sorted(set(td["seeds"]) & set(other["seeds"]))
    if not seeds:
        return None

    def mean_over(row: Mapping[str, Any]) -> float:
        by_seed = dict(zip(row["seeds"], row["score"]["d4rl"]["seed_means"], strict=True))
        return float(np.mean([by_seed[seed] for seed in seeds]))

    return mean_over(td), mean_over(other), {"seeds": seeds}


def _median_latencies(td: Mapping[str, Any], other: Mapping[str, Any]) -> Comparison:
    return td["latency_median_ms"], other["latency_median_ms"], {}


def _target(name: str, env: str, level: str, td: Mapping[str, Any] | None, other: Mapping[str, Any] | None,
            holds: Callable[[float, float], bool],
            compare: Callable[[Mapping[str, Any], Mapping[str, Any]], Comparison | None]) -> dict[str, Any]:
    missing = {"target": name, "env": env, "level": level, "td": None, "other": None, "met": None}
    if td is None or other is None:
        return {**missing, "note": "algorithm not run"}
    compared = compare(td, other)
    if compared is None:
        return {**missing, "note": "no training seed finished for both"}
    a, b, extra = compared
    return {"target": name, "env": env, "level": level, "td": a, "other": b, "met": bool(holds(a, b)), **extra}


def format_score(summary: Mapping[str, Any] | None) -> str:
    """``"mean ± se"`` with one decimal, or ``"n/a"``."""
    return "n/a" if summary is None else f"{summary['mean']:.1f} ± {summary['se']:.1f}"


TABLE_COLUMNS = ("env", "dataset", "algorithm", "score (D4RL ref)", "score (trajgen ref)", "s.e. over",
                 "seeds x episodes", "latency median ms", "latency p99 ms", "NFE", "parameters", "train steps",
                 "train wall s / seed", "eval env steps/s")


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The results as a markdown table (columns ``TABLE_COLUMNS``)."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for r in rows:
        d4rl = r["score"]["d4rl"]
        cells = [r["env"], r["level"], r["algo"], format_score(d4rl), format_score(r["score"]["trajgen"]),
                 d4rl["se_over"] if d4rl else "-", f"{r['n_seeds']} x {min(r['episodes_per_seed'])}",
                 f"{r['latency_median_ms']:.2f}", f"{r['latency_p99_ms']:.2f}", str(r["nfe"]), str(r["parameters"]),
                 str(r["train_steps"]), f"{r['train_wall_s']:.1f}", f"{r['env_steps_per_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(result: Mapping[str, Any]) -> str:
    """Title, compute and budget, the table, and the targets section."""
    s, c = result["settings"], result["compute"]
    hardware = c["cuda"] if str(s["device"]).startswith("cuda") else c["cpu"]
    compute = (f"Compute: {hardware} ({s['device']}, {c['threads_used']} torch threads; CPU {c['cpu']}, "
               f"{c['cpu_count']} cores), torch {c['torch']}.")
    budget = (f"Budget, the same for every algorithm: {s['steps']} updates of batch {s['batch_size']} per seed; "
              f"evaluation {s['episodes']} episodes per seed (batched), latency over {s['latency_calls']} "
              f"decisions per seed at batch 1 ({result['latency_mode']}).")
    scores = ("Scores: D4RL-normalised with D4RL's published reference returns (D4RL ref) and with trajgen's "
              "references measured on the v5 envs (trajgen ref; n/a until the expert reference is measured); "
              "mean ± standard error (over seed means with >= 2 seeds, else over episodes).")
    lines = ["# Offline RL benchmark", "", compute, budget, scores, "", markdown_table(result["rows"]), "",
             "## Targets", ""]
    for t in result["targets"]:
        verdict = {True: "met", False: "NOT met", None: "n/a"}[t["met"]]
        where = f"{t['env']} {t['level']}" if t["env"] else t["level"]
        values = f": TD {t['td']:.2f} vs {t['other']:.2f}" if t["td"] is not None else f" ({t.get('note', '')})"
        if "seeds" in t:
            values += f" (seeds {', '.join(map(str, t['seeds']))})"
        lines.append(f"- [{verdict}] {t['target']}, {where}{values}")
    if result.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {note}" for note in result["notes"]]
    return "\n".join(lines) + "\n"


def print_offline_table(result: Mapping[str, Any], console: Any = None) -> None:
    """Print the results table and the target lines with rich."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=200)
    table = Table(title="offline RL benchmark")
    for column in TABLE_COLUMNS:
        table.add_column(column)
    for line in markdown_table(result["rows"]).splitlines()[2:]:
        table.add_row(*[cell.strip() for cell in line.strip("|").split("|")])
    console.print(table)
    console.print("Targets\n" + markdown_report(result).split("## Targets", 1)[1].strip(), markup=False)


# ----------------------------------------------------------------------------------------------------
# the whole run
# ----------------------------------------------------------------------------------------------------


def compute_info(settings: OfflineBenchSettings) -> dict[str, Any]:
    """CPU model, GPU name, core and thread counts, versions."""
    return {**machine_info(), "threads_used": torch.get_num_threads(), "device": settings.device}


def run_offline_benchmark(settings: OfflineBenchSettings, out_dir: str | os.PathLike, *,
                          data_dir: str | os.PathLike | None = None, behaviour_dir: str | os.PathLike | None = None,
                          datasets: Mapping[tuple[str, str], str | os.PathLike] | None = None,
                          log: Callable[[str], None] | None = None, retime: bool = False,
                          finished_only: bool = False) -> dict[str, Any]:
    """Run (or resume) every cell, then write ``out_dir/bench_offline.json`` and ``bench_offline.md``.

    Args:
        settings: what to run.
        out_dir: results directory (cells, training runs, the JSON and markdown).
        data_dir: where missing datasets are collected (default ``out_dir/data``).
        behaviour_dir: holds the behaviour runs ``<env>`` / ``<env>-quick`` (default runs/behaviour).
        datasets: ``{(env, level): path}`` of existing D4RL-format files (they take precedence).
        log: called with one line per cell.
        retime: afterwards, measure every cell's batch-1 latency again, one cell at a time in this process
            (run it on an idle machine after training cells side by side); the new times replace the cell's.
        finished_only: collect, train and evaluate nothing: the table of the cells finished so far (a report
            while a long run is under way); the rest are listed in ``missing``.
    Returns:
        ``{"settings", "compute", "latency_mode", "rows", "targets", "cells" (paths), "skipped" (cells reused),
        "missing" (cells left out), "notes", "wall_s"}``.
    """
    out_dir = Path(out_dir)
    log = log or (lambda line: None)
    start = time.perf_counter()
    with torch_threads(settings.threads):
        data_dir = Path(data_dir) if data_dir else out_dir / "data"
        if finished_only:
            paths = existing_datasets(settings, data_dir, datasets)
        else:
            paths = resolve_datasets(settings, data_dir, Path(behaviour_dir) if behaviour_dir else None, datasets)
        keys = [(env, level, algo, seed, dataset) for (env, level), dataset in paths.items()
                for algo in settings.algos for seed in settings.seeds]
        missing = []
        if finished_only:
            keys, outcomes, missing = _finished_cells(settings, keys, out_dir)
            missing += [f"{env} {level} (no dataset)" for env, level in _dataset_paths(settings, data_dir, datasets)
                        if (env, level) not in paths]
        else:
            outcomes = _run_cells(settings, keys, out_dir, log)
        if retime:
            outcomes = [(retime_cell(settings, result, out_dir), was_skipped) for result, was_skipped in outcomes]
            log(f"re-timed {len(outcomes)} cells in one process")
        cells = [result for result, _ in outcomes]
        cell_paths = [str(cell_dir(out_dir, *key[:4]) / RESULT_FILE) for key in keys]
        skipped = [path for path, (_, was_skipped) in zip(cell_paths, outcomes, strict=True) if was_skipped]
        compute = compute_info(settings)
    rows = aggregate(cells)
    result = {"settings": settings.to_dict(), "compute": compute, "latency_mode": _latency_mode(cells),
              "datasets": {f"{e}/{lv}": str(p) for (e, lv), p in paths.items()}, "rows": rows,
              "targets": evaluate_targets(rows), "cells": cell_paths, "skipped": skipped, "missing": missing,
              "notes": _notes(settings, cells, missing), "wall_s": time.perf_counter() - start}
    _write_json(out_dir / "bench_offline.json", result)
    (out_dir / "bench_offline.md").write_text(markdown_report(result))
    return result


def _run_cells(settings: OfflineBenchSettings, keys: Sequence[tuple[str, str, str, int, Path]], out_dir: Path,
               log: Callable[[str], None]) -> list[tuple[dict[str, Any], bool]]:
    """``run_cell`` for every (env, level, algo, seed, dataset), serially or in ``settings.jobs`` spawned workers;
    outcomes in the order of ``keys``."""
    def report(key: tuple[str, str, str, int, Path], was_skipped: bool) -> None:
        env, level, algo, seed, _ = key
        log(f"{'skipped (done)' if was_skipped else 'finished'}: {env} {level} {algo} seed {seed}")

    if settings.jobs == 1:
        outcomes = []
        for key in keys:
            outcomes.append(run_cell(settings, *key, out_dir))
            report(key, outcomes[-1][1])
        return outcomes
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(settings.jobs, mp_context=context) as pool:
        futures = {pool.submit(_worker_cell, settings, *key, out_dir): i for i, key in enumerate(keys)}
        results: dict[int, tuple[dict[str, Any], bool]] = {}
        for future in as_completed(futures):
            index = futures[future]
            results[index] = future.result()
            report(keys[index], results[index][1])
    return [results[i] for i in range(len(keys))]


def _finished_cells(settings: OfflineBenchSettings, keys: Sequence[tuple[str, str, str, int, Path]], out_dir: Path
                    ) -> tuple[list[tuple[str, str, str, int, Path]], list[tuple[dict[str, Any], bool]], list[str]]:
    """(the finished keys, their outcomes as ``run_cell`` reports a skipped cell, "env level algo seed" of the rest)."""
    found = [(key, finished_cell(settings, *key, out_dir)) for key in keys]
    done = [(key, result) for key, result in found if result is not None]
    missing = [" ".join(map(str, key[:4])) for key, result in found if result is None]
    return [key for key, _ in done], [(result, True) for _, result in done], missing


def _worker_cell(settings: OfflineBenchSettings, env: str, level: str, algo: str, seed: int, dataset: Path,
                 out_dir: Path) -> tuple[dict[str, Any], bool]:
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    return run_cell(settings, env, level, algo, seed, dataset, out_dir)


def retime_cell(settings: OfflineBenchSettings, result: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Measure a finished cell's batch-1 latency again and rewrite its result file.

    The new timing replaces ``result["latency"]``; ``result["retimed"]`` keeps when it ran and the median the
    cell had before. Returns the updated result.
    """
    directory = cell_dir(out_dir, result["env"], result["level"], result["algo"], result["seed"])
    policy = load_policy(directory / "run", algorithm=result["algo"], device=settings.device)
    previous = result["latency"]
    result = {**result, "latency": measure_latency(policy, settings.latency_calls),
              "retimed": {"at": time.strftime("%FT%T%z"), "previous_median_ms": previous["median_ms"]}}
    _write_json(directory / RESULT_FILE, result)
    return result


def _latency_mode(cells: Sequence[Mapping[str, Any]]) -> str:
    if uses_graph_latency(cells):
        return "CUDA, whole decision replayed from a CUDA graph"
    device = cells[0]["latency"]["device"] if cells else "cpu"
    return f"{device}, eager"


def _notes(settings: OfflineBenchSettings, cells: Sequence[Mapping[str, Any]], missing: Sequence[str]) -> list[str]:
    notes = [f"not finished, left out of the table: {', '.join(missing)}"] if missing else []
    if settings.quick:
        notes.append("quick run: tiny behaviour policy, tiny nets and budgets; checks the pipeline, not the methods")
    if settings.max_episode_steps is not None:
        notes.append(f"episodes capped at {settings.max_episode_steps} steps (returns are not comparable to "
                     "full-length episodes)")
    failed = sorted({f"{c['algo']}: {c['latency']['graph']['error']}" for c in cells
                     if "error" in c["latency"].get("graph", {})})
    notes += [f"CUDA graph capture failed, so every latency is eager: {f}" for f in failed]
    missing = {n for c in cells for n in c["eval"]["score_notes"].values()}
    notes += [f"trajgen reference: {n}" for n in sorted(missing)]
    return notes
