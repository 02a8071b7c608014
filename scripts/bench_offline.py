"""Offline-RL benchmark: Trajectory Diffuser vs Decision Diffuser, DT-style and BC on MuJoCo datasets.

    python scripts/bench_offline.py --quick --out-dir runs/bench_offline_quick
    python scripts/bench_offline.py --behaviour-dir runs/behaviour --out-dir runs/bench_offline --steps 100000
    python scripts/bench_offline.py --dataset hopper:medium=data/hopper-medium.hdf5 --envs hopper --levels medium
    python scripts/bench_offline.py --nets small --steps 4000 --jobs 2 --threads 1 ...   # a CPU budget
    python scripts/bench_offline.py --nets small --steps 4000 --threads 1 ... --retime   # latency on an idle machine
    python scripts/bench_offline.py ... --finished-only         # the table so far, while cells still run

Every (env, level, algorithm, seed) cell trains with the same --steps and --batch-size, evaluates --episodes
episodes batched and times batch-1 decisions; finished cells are skipped on a rerun. Writes
OUT_DIR/bench_offline.json and OUT_DIR/bench_offline.md (table + targets) and prints the table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from trajgen.bench.offline import (
    ALGORITHM_ORDER,
    SMALL_NET_OVERRIDES,
    OfflineBenchSettings,
    print_offline_table,
    quick_settings,
    run_offline_benchmark,
)


def parse_datasets(pairs: list[str]) -> dict[tuple[str, str], str]:
    """``["hopper:medium=FILE", ...]`` -> {("hopper", "medium"): FILE}."""
    out = {}
    for pair in pairs:
        key, sep, path = pair.partition("=")
        env, colon, level = key.partition(":")
        if not (sep and colon and env and level and path):
            raise SystemExit(f"--dataset expects ENV:LEVEL=FILE, got {pair!r}")
        out[(env, level)] = path
    return out


def parse_overrides(pairs: list[str]) -> dict[str, dict[str, Any]]:
    """``["trajectory-diffuser.t_mid=0.2", ...]`` -> {algo: {field: value}}; values are YAML scalars or lists
    (``true``, ``0.2``, ``[1, 2, 4]``), as ``trajgen train offline --set`` reads them."""
    out: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        algo, dot, name = key.partition(".")
        if not (sep and dot and algo and name):
            raise SystemExit(f"--set expects ALGO.FIELD=VALUE, got {pair!r}")
        out.setdefault(algo, {})[name] = yaml.safe_load(text)
    return out


def build_settings(args: argparse.Namespace) -> OfflineBenchSettings:
    """Settings from the parsed command line (``--quick`` starts from ``quick_settings``)."""
    given = {k: v for k, v in {
        "envs": tuple(args.envs) if args.envs else None, "levels": tuple(args.levels) if args.levels else None,
        "algos": tuple(args.algos) if args.algos else None, "seeds": tuple(args.seeds) if args.seeds else None,
        "steps": args.steps, "batch_size": args.batch_size, "episodes": args.episodes, "device": args.device,
        "eval_seed": args.eval_seed, "max_episode_steps": args.max_episode_steps,
        "latency_calls": args.latency_calls, "threads": args.threads, "dataset_steps": args.dataset_steps,
        "jobs": args.jobs,
    }.items() if v is not None}
    if args.train_behaviour:
        given["train_behaviour"] = True
    overrides = parse_overrides(args.set)
    if args.quick and args.nets != "default":
        raise SystemExit("--quick brings its own tiny nets; drop --nets")
    if args.nets == "small":
        preset = {algo: SMALL_NET_OVERRIDES[algo] for algo in (args.algos or ALGORITHM_ORDER)
                  if algo in SMALL_NET_OVERRIDES}
        overrides = {algo: {**preset.get(algo, {}), **overrides.get(algo, {})}
                     for algo in sorted({*preset, *overrides})}
    if args.quick:
        settings = quick_settings(**given)
        if overrides:
            merged = {a: {**settings.overrides.get(a, {}), **o} for a, o in overrides.items()}
            settings = quick_settings(**given, overrides={**settings.overrides, **merged})
        return settings
    return OfflineBenchSettings(**given, overrides=overrides)


def make_parser() -> argparse.ArgumentParser:
    """The command line of this script."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="hopper 'quick' data, tiny nets and budgets (< 60 s)")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/bench_offline"), help="results directory")
    parser.add_argument("--envs", nargs="+", help="hopper halfcheetah walker2d (default: all three)")
    parser.add_argument("--levels", nargs="+", help="default: medium medium-replay medium-expert")
    parser.add_argument("--algos", nargs="+", help="default: all four algorithms")
    parser.add_argument("--seeds", nargs="+", type=int, help="training seeds (default 0 1 2)")
    parser.add_argument("--steps", type=int, help="optimizer updates per cell, every algorithm (default 100000)")
    parser.add_argument("--batch-size", type=int, help="batch size, every algorithm (default 64)")
    parser.add_argument("--episodes", type=int, help="evaluation episodes per cell (default 20)")
    parser.add_argument("--eval-seed", type=int, help="episode k resets with seed EVAL_SEED + k (default 0)")
    parser.add_argument("--max-episode-steps", type=int, help="cap episode length (smoke runs only)")
    parser.add_argument("--latency-calls", type=int, help="timed batch-1 decisions per cell (default 100)")
    parser.add_argument("--device", help="cpu | cuda (training, evaluation and latency; default cpu)")
    parser.add_argument("--threads", type=int, help="torch CPU threads per process (default: torch's)")
    parser.add_argument("--jobs", type=int, help="cells trained side by side in worker processes (default 1)")
    parser.add_argument("--finished-only", action="store_true",
                        help="train nothing: the table of the cells finished so far (the rest listed as missing)")
    parser.add_argument("--retime", action="store_true",
                        help="measure every finished cell's latency again, one at a time (on an idle machine)")
    parser.add_argument("--dataset", action="append", default=[], metavar="ENV:LEVEL=FILE",
                        help="an existing D4RL-format file for one dataset (repeatable)")
    parser.add_argument("--data-dir", type=Path, help="where missing datasets are collected (OUT_DIR/data)")
    parser.add_argument("--dataset-steps", type=int, help="transitions per policy part when collecting")
    parser.add_argument("--behaviour-dir", type=Path,
                        help="directory of behaviour runs <env> / <env>-quick (default runs/behaviour)")
    parser.add_argument("--train-behaviour", action="store_true",
                        help="train missing behaviour runs before collecting (hours per env)")
    parser.add_argument("--nets", choices=("default", "small"), default="default",
                        help="small: half-width UNet, GPT and MLPs for CPU budgets (SMALL_NET_OVERRIDES)")
    parser.add_argument("--set", action="append", default=[], metavar="ALGO.FIELD=VALUE",
                        help="config override of one algorithm, e.g. trajectory-diffuser.t_mid=0.2 (repeatable)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Parse the command line, run (or resume) the benchmark, print the table; returns the result dict."""
    args = make_parser().parse_args(argv)
    settings = build_settings(args)
    result = run_offline_benchmark(settings, args.out_dir, data_dir=args.data_dir, behaviour_dir=args.behaviour_dir,
                                   datasets=parse_datasets(args.dataset), retime=args.retime,
                                   finished_only=args.finished_only,
                                   log=lambda line: print(line, file=sys.stderr, flush=True))
    print_offline_table(result)
    print(f"wrote {args.out_dir / 'bench_offline.json'} and {args.out_dir / 'bench_offline.md'}")
    return result


if __name__ == "__main__":
    main()
