"""Batch-1 decision latency of anchored-decoder variants against the vanilla policy, side by side in one process.

    python scripts/latency_driving_variants.py --out runs/latency_driving_variants.json \
        --variant no_waypoint_features:waypoint_map_features=false --variant anchors_10:n_anchors=10

Every policy is built by the driving benchmark's ``build_policy`` (its sizes) from synthetic plans, which set only
the normaliser's range and the k-means anchors, and is freshly initialised: a decision runs the same operations
whatever the weights, so the time is a trained policy's. The variants change ``AnchoredDiffusionConfig`` fields
(values read as YAML). All are timed with ``interleaved_decision_latencies`` (blocks of each policy in turn, one
torch thread) on held-out observations. Prints a table of medians and ratios and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from trajgen.bench.driving import (
    DrivingBenchConfig,
    build_policy,
    interleaved_decision_latencies,
    latency_observations,
    machine_info,
)
from trajgen.policies.driving import AnchoredDiffusionConfig, AnchoredDiffusionPolicy, DrivingPolicy


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """'name:field=value[,field=value...]' -> (name, {field: value}); fields must be AnchoredDiffusionConfig's."""
    name, sep, assignments = text.partition(":")
    if not sep or not name or not assignments:
        raise ValueError(f"--variant must be 'name:field=value[,field=value]', got {text!r}")
    fields = {f.name for f in dataclasses.fields(AnchoredDiffusionConfig)}
    values: dict[str, Any] = {}
    for assignment in assignments.split(","):
        key, eq, value = assignment.partition("=")
        if not eq or key not in fields:
            raise ValueError(f"--variant {name}: {assignment!r} is not field=value of an AnchoredDiffusionConfig field")
        values[key] = yaml.safe_load(value)
    return name, values


def synthetic_plans() -> np.ndarray:
    """60 plausible plans [60, 8, 3] (12 speeds x 5 lateral offsets): the policies read plans only through the
    normaliser's range and the k-means anchors, and a decision's cost depends on neither."""
    return np.stack([np.stack([np.linspace(2, 30, 8) * s, np.linspace(0, 8, 8) * t, np.zeros(8)], axis=-1)
                     for s in np.linspace(0.2, 1.5, 12) for t in np.linspace(-1, 1, 5)])


def build_variants(base: AnchoredDiffusionPolicy, variants: dict[str, dict[str, Any]]) -> dict[str, DrivingPolicy]:
    """The base anchored policy and one policy per variant (its first ``n_anchors`` anchors), in eval mode."""
    policies: dict[str, DrivingPolicy] = {"anchored": base.eval()}
    for name, values in variants.items():
        config = dataclasses.replace(base.config, **values)
        policies[f"anchored/{name}"] = AnchoredDiffusionPolicy(config, anchors=base.anchors[: config.n_anchors]).eval()
    return policies


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-obs", default="runs/bench_driving_v7/latency_obs.npz",
                        help="held-out observations (.npz, as the benchmark writes it)")
    parser.add_argument("--variant", action="append", default=[], help="name:field=value[,field=value] (repeat)")
    parser.add_argument("--repeats", type=int, default=150, help="timed decisions per policy")
    parser.add_argument("--runs", type=int, default=2, help="whole interleaved measurements, one after the other")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    variants = dict(parse_variant(text) for text in args.variant)
    config = DrivingBenchConfig(latency_obs=args.latency_obs)
    obs = latency_observations(config)
    plans = synthetic_plans()
    torch.manual_seed(0)
    policies = {**build_variants(build_policy("anchored", config, plans), variants),
                "vanilla": build_policy("vanilla", config, plans).eval()}
    runs = [interleaved_decision_latencies(policies, obs, args.repeats, threads=config.latency_threads)
            for _ in range(args.runs)]
    result = {"machine": machine_info(), "latency_obs": args.latency_obs, "variants": variants, "runs": runs,
              "ratios": [{name: run["vanilla"]["median_ms"] / run[name]["median_ms"] for name in policies
                          if name != "vanilla"} for run in runs]}
    print("| policy | " + " | ".join(f"run {i} median ms (vanilla / it)" for i in range(len(runs))) + " |")
    print("|---" * (len(runs) + 1) + "|")
    for name in policies:
        cells = [f"{run[name]['median_ms']:.2f} ({ratios.get(name, 1.0):.2f}x)"
                 for run, ratios in zip(runs, result["ratios"], strict=True)]
        print(f"| {name} | " + " | ".join(cells) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
