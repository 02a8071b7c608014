"""Batch-1 decision latency of every offline-RL algorithm, side by side in one process.

    python scripts/latency_offline.py --env hopper --device cuda --out runs/latency_offline.json

Each algorithm is built with the offline benchmark's config (``OfflineBenchSettings().config``) for the env's
state and action sizes and timed with ``trajgen.bench.offline.measure_latency``: eager, and on CUDA also with
the whole decision replayed from a CUDA graph. The weights are freshly initialised: a decision runs the same
operations whatever their values, so the time is the trained policy's. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import gymnasium as gym
import torch

from trajgen.bench.offline import ALGORITHM_ORDER, SHORT_NAMES, OfflineBenchSettings, machine_info, measure_latency
from trajgen.envs.mujoco import ENV_IDS, env_name
from trajgen.policies.offline import build_policy


def env_dims(env: str) -> tuple[int, int]:
    """(state size, action size) of a MuJoCo env."""
    probe = gym.make(ENV_IDS[env_name(env)])
    dims = probe.observation_space.shape[0], probe.action_space.shape[0]
    probe.close()
    return dims


def measure_all(env: str, device: str, calls: int, algos: tuple[str, ...] = ALGORITHM_ORDER) -> dict[str, Any]:
    """``{algo: measure_latency(...) without times_ms}`` for untrained policies of the benchmark's configs."""
    obs_dim, act_dim = env_dims(env)
    settings = OfflineBenchSettings(envs=(env,), algos=algos)
    results = {}
    for algo in algos:
        torch.manual_seed(0)
        policy = build_policy(settings.config(algo), obs_dim, act_dim, env_id=ENV_IDS[env_name(env)]).to(device)
        stats = measure_latency(policy, calls)
        stats.pop("times_ms", None)
        if isinstance(stats.get("graph"), dict):
            stats["graph"].pop("times_ms", None)
        stats["parameters"] = sum(p.numel() for p in policy.model.parameters())
        results[algo] = stats
        graph = stats.get("graph", {})
        print(f"{SHORT_NAMES[algo]:>3}  nfe {stats['nfe']:>3}  eager median {stats['median_ms']:8.2f} ms  "
              f"p99 {stats['p99_ms']:8.2f} ms"
              + (f"  graph median {graph['median_ms']:7.3f} ms p99 {graph['p99_ms']:7.3f} ms" if "median_ms" in graph
                 else f"  graph: {graph.get('error')}" if graph else ""), flush=True)
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="hopper")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU")
    parser.add_argument("--out", default="runs/latency_offline.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = measure_all(args.env, args.device, args.calls)
    td, dd = results["trajectory-diffuser"], results["decision-diffuser"]
    ratios = {"eager": dd["median_ms"] / td["median_ms"]}
    if "median_ms" in td.get("graph", {}) and "median_ms" in dd.get("graph", {}):
        ratios["graph"] = dd["graph"]["median_ms"] / td["graph"]["median_ms"]
    print("DD / TD latency ratio: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    document = {"env": env_name(args.env), "device": args.device, "calls": args.calls, "machine": machine_info(),
                "policies": results, "dd_over_td": ratios}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(document, indent=1))
    return document


if __name__ == "__main__":
    main()
