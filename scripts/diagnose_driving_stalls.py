"""Why does a driving policy wait at the intersection? Drive held-out scenes closed loop and ask the expert too.

At every decision of every held-out intersection episode (the benchmark's scenes), the policy plans and the rule
expert plans from the same state. A **stall** is a decision where the policy's plan ends within 3 m while the
expert's goes beyond 8 m. For stalls and for the other decisions the script reports:

- ``yielded_to``: the share of decisions where some other vehicle is yielding to the ego (it would not stop if the
  ego were not there: the traffic's yield obstacles computed with and without the ego);
- ``ego_must_yield``: the share where the traffic's priority rule makes the ego itself yield;
- ``stopped_s``: percentiles (10, 50, 90) of how long the ego has been stopped (under 0.3 m/s).

A stall where another vehicle yields to the ego and the ego need not yield is a deadlock: both wait for the other.

    python scripts/diagnose_driving_stalls.py --policy runs/bench_driving_v6/anchored/policy.safetensors \\
        --out runs/diagnose_driving/anchored_v6.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trajgen.agents.driving import DrivingAgent, closed_loop_scores, expert_decider, rollout
from trajgen.bench.driving import held_out_scene_seeds
from trajgen.envs.driving.expert import RuleExpert
from trajgen.envs.driving.sim import DrivingSim
from trajgen.policies.driving import load_driving_policy

STOPPED_SPEED = 0.3
"""m/s: under this the ego counts as stopped"""


def yielding_to_ego(sim: DrivingSim, with_ego: np.ndarray) -> np.ndarray:
    """Per scene [S]: how many other vehicles currently yield to the ego (their yield obstacle moves without it);
    ``with_ego`` [S, V] is ``sim.traffic.yield_obstacle()`` as it stands."""
    traffic = sim.traffic
    ego = [traffic.ego, traffic.shadow]
    saved = traffic.valid[:, ego].copy()
    traffic.valid[:, ego] = False
    try:
        without_ego = traffic.yield_obstacle()
    finally:
        traffic.valid[:, ego] = saved
    others = (np.arange(traffic.V) < traffic.n_agents)[None] & traffic.valid
    others[:, ego] = False
    return ((with_ego < without_ego) & others).sum(axis=1)


def diagnose(policy_file: str, episodes: int, seed: int, max_decisions: int = 1000) -> dict[str, Any]:
    """Closed-loop intersection episodes of one policy with the expert's plan at every decision; the summary."""
    agent = DrivingAgent(load_driving_policy(policy_file), seed=seed)
    log: list[dict[str, np.ndarray]] = []

    def make_decider(sim: DrivingSim):
        expert = RuleExpert(sim)
        stopped_for = np.zeros(sim.traffic.S)

        def decide(obs: dict[str, np.ndarray], sim: DrivingSim) -> np.ndarray:
            plan = agent.act(obs)
            stopped_for[:] = np.where(obs["ego"][:, 0] < STOPPED_SPEED, stopped_for + 0.5, 0.0)
            obstacles = sim.traffic.yield_obstacle()
            log.append({"plan_end": plan[:, -1, 0], "expert_end": expert.plan()[:, -1, 0],
                        "yielded_to": yielding_to_ego(sim, obstacles) > 0, "stopped_s": stopped_for.copy(),
                        "ego_must_yield": np.isfinite(obstacles[:, sim.traffic.ego])})
            return plan

        return decide

    seeds = held_out_scene_seeds(episodes, seed)
    run = rollout(make_decider, "intersection", seeds, max_decisions=max_decisions)
    scores = closed_loop_scores(run, rollout(expert_decider, "intersection", seeds, max_decisions=max_decisions))
    rows = {k: np.concatenate([entry[k] for entry in log]) for k in log[0]}
    stall = (rows["plan_end"] < 3.0) & (rows["expert_end"] > 8.0)

    def summary(mask: np.ndarray) -> dict[str, Any]:
        if not mask.any():
            return {"decisions": 0}
        return {"decisions": int(mask.sum()), "yielded_to": float(rows["yielded_to"][mask].mean()),
                "ego_must_yield": float(rows["ego_must_yield"][mask].mean()),
                "stopped_s": np.percentile(rows["stopped_s"][mask], [10, 50, 90]).tolist()}

    return {"policy": policy_file, "episodes": int(seeds.size), "decisions": int(stall.size),
            "stall_share": float(stall.mean()), "stalls": summary(stall), "other": summary(~stall),
            "closed_loop": {k: float(np.mean(v)) for k, v in scores.items()}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True, help="a trained policy.safetensors")
    parser.add_argument("--episodes", type=int, default=64, help="held-out intersection scenes")
    parser.add_argument("--seed", type=int, default=0, help="the benchmark's seed (held-out scenes, sampling noise)")
    parser.add_argument("--max-decisions", type=int, default=1000, help="decisions per episode at most (2 per s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, help="write the summary as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = diagnose(args.policy, args.episodes, args.seed, args.max_decisions)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return result


if __name__ == "__main__":
    main()
