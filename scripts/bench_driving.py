"""Driving benchmark: anchored truncated diffusion (2 steps) vs vanilla diffusion (20 steps) vs regression.

    python scripts/bench_driving.py --out-dir runs/bench_driving
    python scripts/bench_driving.py --data runs/driving/data.h5 --train-steps 5000 --device cuda
    python scripts/bench_driving.py --out-dir runs/bench_driving --training-seeds 0 1 2   # mean ± s.e. over seeds

Collects expert data (unless --data), trains the three policies with the same budget (resumable), scores them
open-loop (NAVSIM-style PDMS against logged traffic) and closed-loop (whole held-out episodes), measures mode
diversity, batch-1 latency and simulator throughput against highway-env; writes OUT_DIR/results.json and
OUT_DIR/results.md (the README table) and prints the table. Every option is a DrivingBenchConfig field.
"""

from __future__ import annotations

import argparse
import dataclasses

from trajgen.bench.driving import DrivingBenchConfig, remeasure_latency, run_driving_benchmark, train_policies

LIST_FIELDS = ("policies", "policy_lr", "extra_train_data", "training_seeds")
"""DrivingBenchConfig fields given as lists: ``--policies anchored regression`` or the flag repeated"""


def _int_or_none(text: str) -> int | None:
    """An integer, or 'none' for None (e.g. ``--latency-threads none``: torch's default thread count)."""
    return None if text.lower() == "none" else int(text)


def main(argv: list[str] | None = None) -> dict:
    """Parse the command line (one option per DrivingBenchConfig field), run, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field in dataclasses.fields(DrivingBenchConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default)
        elif field.name in LIST_FIELDS:
            # extend: a repeated flag adds to the list instead of silently replacing it (None: the field's default)
            parser.add_argument(flag, nargs="+", action="extend", default=None,
                                type=int if field.name == "training_seeds" else str)
        else:
            kind = {"int": int, "float": float, "int | None": _int_or_none}.get(str(field.type), str)
            parser.add_argument(flag, type=kind, default=field.default)
    parser.add_argument("--throughput-seconds", type=float, default=5.0,
                        help="seconds per simulator-throughput run (0 skips it)")
    parser.add_argument("--latency-only", action="store_true",
                        help="re-time the trained policies' batch-1 decisions of an existing run (quiet machine)")
    parser.add_argument("--train-only", action="store_true",
                        help="train (or resume) every policy and seed, then stop: evaluate later, elsewhere")
    parser.add_argument("--jobs", type=int, default=1,
                        help="with --train-only: trainings run at once, one process each (e.g. 9 on one GPU)")
    args = vars(parser.parse_args(argv))
    throughput = args.pop("throughput_seconds")
    latency_only = args.pop("latency_only")
    train_only, jobs = args.pop("train_only"), args.pop("jobs")
    if jobs != 1 and not train_only:
        parser.error("--jobs applies to --train-only (evaluation runs in one process)")
    defaults = {field.name: field.default for field in dataclasses.fields(DrivingBenchConfig)}
    for name in LIST_FIELDS:
        args[name] = defaults[name] if args[name] is None else tuple(args[name])
    config = DrivingBenchConfig(**args)
    if train_only:
        summaries = train_policies(config, jobs)
        for run, summary in summaries.items():
            print(f"{run}: {summary.get('wall_s', 0.0):.0f} s, final loss {summary.get('final_loss', float('nan'))}")
        return summaries
    if latency_only:
        document = remeasure_latency(config)
    else:
        document = run_driving_benchmark(config, status=lambda stage: print(f"== {stage}", flush=True),
                                         throughput_seconds=throughput)
    with open(f"{config.out_dir}/results.md") as f:
        print(f.read())
    return document


if __name__ == "__main__":
    main()
