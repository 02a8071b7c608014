"""How good are the offline planners' state plans? Compare each trained cell's plans with the data.

For N states s_0 drawn from a D4RL-format dataset (episode steps with a logged next state), every planner of a
benchmark cell plans from s_0 under its default return condition, and the script reports, in normalised state
units (the policy's own state normaliser):

- ``s1_rms``: RMS of plan[1] - the logged next state (the behaviour policy's step, so not 0 even for a
  perfect planner conditioned on a higher return; compare planners with each other and with ``data``);
- ``step_ratio``: RMS of the plan's consecutive-state differences over the same RMS of the data's windows
  (1 = steps as large as the data's; >> 1 = the plan jumps between states the dynamics cannot connect);
- ``action_rms``: RMS (raw action units) of the inverse-dynamics action on (s_0, plan[1]) minus the logged one;
- ``reconstruction_rms`` (diffusion planners): for each probe time t, the plan noised to t (the same noise for every
  row) and denoised once by the planner's guided UNet: RMS of x0_hat - plan over plan[1:]. It measures how far the
  diffusion model finds a plan from its data: compare a row with ``data`` (a per-decision t_mid could follow it).

Variants: ``policy`` (the algorithm's decision plan), ``from-noise`` (a diffusion planner sampled from pure
noise with its default solver and steps: the Decision Diffuser's plan, and what a Trajectory Diffuser's UNet
gives without the draft), ``draft`` (the GPT's draft alone), and ``data`` (the logged window itself: the
reference row, s1_rms 0 and step_ratio 1).

    python scripts/diagnose_offline_plans.py --cells runs/bench_offline_cpu/cells --env halfcheetah \\
        --level medium --data data/halfcheetah-medium.hdf5 --out runs/diagnose/halfcheetah-medium.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trajgen.data.d4rl import load_d4rl
from trajgen.diffusion.predictions import convert
from trajgen.policies.offline import (
    DiffusionPlanningPolicy,
    OfflinePolicy,
    PlanningPolicy,
    load_policy,
)


def logged_windows(path: str | Path, horizon: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n windows of ``horizon`` consecutive states inside one episode, and each window's first action:
    -> states [n, horizon, S] (raw), actions [n, A] (raw)."""
    data = load_d4rl(path)
    starts = np.concatenate([np.arange(start, end - horizon + 1) for start, end in data.episodes()])
    if len(starts) < n:
        raise ValueError(f"{path}: only {len(starts)} windows of {horizon} steps, asked for n={n}")
    chosen = np.sort(np.random.default_rng(seed).choice(starts, n, replace=False))
    states = data.observations[chosen[:, None] + np.arange(horizon)]
    return states, data.actions[chosen]


def plan_errors(policy: PlanningPolicy, plan: torch.Tensor, states: torch.Tensor, actions: torch.Tensor
                ) -> dict[str, float]:
    """plan [N, H', S] and the logged windows states [N, H, S] (both normalised), actions [N, A] raw -> metrics."""
    data_step = (states[:, 1:] - states[:, :-1]).pow(2).mean().sqrt()
    plan_step = (plan[:, 1:] - plan[:, :-1]).pow(2).mean().sqrt()
    acted = policy.model.unnormalize_actions(policy.model.inverse_dynamics(torch.cat([plan[:, 0], plan[:, 1]], -1)))
    return {"s1_rms": float((plan[:, 1] - states[:, 1]).pow(2).mean().sqrt()),
            "step_ratio": float(plan_step / data_step),
            "action_rms": float((acted - actions).pow(2).mean().sqrt())}


PROBE_TIMES = (0.035, 0.055, 0.1, 0.2, 0.3)
"""diffusion times of ``reconstruction_rms`` (0.055 is the Trajectory Diffuser's default t_mid)"""


def reconstruction_rms(policy: DiffusionPlanningPolicy, plan: torch.Tensor, cond: torch.Tensor, seed: int
                       ) -> dict[str, float]:
    """plan [N, H, S], cond [N, 1] (normalised) -> {str(t): RMS of x0_hat(alpha_t plan + sigma_t eps) - plan over
    plan[:, 1:]} for t in PROBE_TIMES; eps is drawn from ``seed``, so rows diagnosed with one seed share it."""
    schedule, denoiser = policy.model.schedule, policy.denoiser()
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for t in PROBE_TIMES:
        times = torch.full((len(plan),), t)
        x_t = schedule.add_noise(plan, times, torch.randn(plan.shape, generator=generator))
        x0 = convert(denoiser(x_t, times, cond=cond), x_t, times, schedule, policy.config.prediction, "x0")
        out[str(t)] = float((x0[:, 1:] - plan[:, 1:]).pow(2).mean().sqrt())
    return out


def planners(policy: PlanningPolicy, generator: torch.Generator) -> dict[str, Callable[..., torch.Tensor]]:
    """Variant name -> plan(states [N, S] normalised, cond [N, 1]) -> plan [N, H, S] normalised."""
    out: dict[str, Callable[..., torch.Tensor]] = {
        "policy": lambda s, c: policy.plan_normalized(s, c, generator=generator)}
    if isinstance(policy, DiffusionPlanningPolicy):
        out["from-noise"] = lambda s, c: policy.diffuse(s, c, generator=generator)
    if hasattr(policy.model, "gpt"):
        out["draft"] = lambda s, c: policy.draft(s, c)
    return out


def diagnose_cell(policy: OfflinePolicy, raw_states: np.ndarray, raw_actions: np.ndarray, seed: int
                  ) -> dict[str, dict[str, Any]]:
    """Every variant's metrics (and the ``data`` reference) for one trained planner."""
    if not isinstance(policy, PlanningPolicy):
        raise TypeError(f"{policy.algorithm} does not plan states")
    with torch.no_grad():
        states = policy.model.normalize_states(torch.as_tensor(raw_states, dtype=torch.float32))
        actions = torch.as_tensor(raw_actions, dtype=torch.float32)
        cond = policy._condition(None, len(states))
        plans = {"data": states}
        for name, plan in planners(policy, torch.Generator().manual_seed(seed)).items():
            plans[name] = plan(states[:, 0], cond)
        rows: dict[str, dict[str, Any]] = {}
        for name, plan in plans.items():
            rows[name] = plan_errors(policy, plan, states, actions)
            if isinstance(policy, DiffusionPlanningPolicy):
                rows[name]["reconstruction_rms"] = reconstruction_rms(policy, plan, cond, seed)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", required=True, help="the benchmark's cells directory (OUT_DIR/cells)")
    parser.add_argument("--env", required=True)
    parser.add_argument("--level", required=True)
    parser.add_argument("--data", required=True, help="the cell's dataset (D4RL-format HDF5)")
    parser.add_argument("--seed", type=int, default=0, help="training seed of the cells")
    parser.add_argument("--n", type=int, default=256, help="windows drawn from the data")
    parser.add_argument("--out", help="JSON file to write")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result: dict[str, Any] = {"env": args.env, "level": args.level, "seed": args.seed, "n": args.n, "algorithms": {}}
    for algo in ("trajectory-diffuser", "decision-diffuser", "decision-transformer"):
        run = Path(args.cells) / args.env / args.level / algo / f"seed{args.seed}" / "run"
        if not run.is_dir():
            continue
        policy = load_policy(run)
        states, actions = logged_windows(args.data, policy.config.horizon, args.n, args.seed)
        result["algorithms"][algo] = diagnose_cell(policy, states, actions, args.seed)
    if not result["algorithms"]:
        raise SystemExit(f"no planner cells under {args.cells}/{args.env}/{args.level}/*/seed{args.seed}/run")
    print(f"{args.env} {args.level}, training seed {args.seed}, {args.n} logged windows (normalised state units)")
    print("| algorithm | plan | s1 rms | step ratio | action rms |\n|---|---|---|---|---|")
    for algo, rows in result["algorithms"].items():
        for name, m in rows.items():
            print(f"| {algo} | {name} | {m['s1_rms']:.3f} | {m['step_ratio']:.2f} | {m['action_rms']:.3f} |")
    print(f"\nreconstruction rms at t = {', '.join(map(str, PROBE_TIMES))}")
    for algo, rows in result["algorithms"].items():
        for name, m in rows.items():
            if "reconstruction_rms" in m:
                print(f"| {algo} | {name} | " + " | ".join(f"{v:.3f}" for v in m["reconstruction_rms"].values()) + " |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
