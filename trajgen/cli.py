"""The ``trajgen`` command line: ``trajgen --help`` lists the commands, each has its own ``--help``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="trajgen: diffusion-based trajectory generation for robotics.", no_args_is_help=True,
                  add_completion=False)
bench_app = typer.Typer(help="Benchmarks that print a table and write JSON.", no_args_is_help=True)
train_app = typer.Typer(help="Training recipes (checkpointed, resumable, torchrun-ready).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
collect_app = typer.Typer(help="Collect datasets (generated locally, never downloaded).", no_args_is_help=True)
app.add_typer(train_app, name="train")
app.add_typer(collect_app, name="collect")
eval_app = typer.Typer(help="Evaluate trained policies in their environments.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")
console = Console()


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("runs/demo"), help="data, checkpoints, results.json/.md, plots and GIF"),
    device: str | None = typer.Option(None, help="cpu | cuda (default: cuda when available)"),
    quick: bool = typer.Option(False, "--quick", help="a seconds-long smoke run (its numbers mean nothing)"),
) -> None:
    """The main job on built-in defaults, no files needed: collect expert driving data in trajgen's simulator,
    train the anchored 2-step diffusion policy, the vanilla 20-step diffusion policy and a regression baseline,
    score them open- and closed-loop with NAVSIM's PDM score, print the comparison, draw the anchors and a GIF.
    About 10 minutes on 2 CPU cores."""
    from dataclasses import replace

    from trajgen.bench.driving import DrivingBenchConfig

    config = DrivingBenchConfig.quick(str(out_dir)) if quick else DrivingBenchConfig.demo(str(out_dir))
    _run_driving(replace(config, device=device), throughput_seconds=0.5 if quick else 2.0)


def _run_driving(config: object, throughput_seconds: float) -> None:
    """Run the driving benchmark with stage messages, then print its table."""
    from rich.markdown import Markdown

    from trajgen.bench.driving import run_driving_benchmark

    document = run_driving_benchmark(config, status=lambda stage: console.rule(stage),
                                     throughput_seconds=throughput_seconds)
    console.print(Markdown(Path(config.out_dir, "results.md").read_text()))
    for name, path in document.get("pictures", {}).items():
        console.print(f"{name}: {path}")
    console.print(f"wrote {Path(config.out_dir, 'results.json')}")


@bench_app.command("driving")
def bench_driving(
    out_dir: Path = typer.Option(Path("runs/bench_driving"), help="data, checkpoints, results, pictures"),
    data: Path | None = typer.Option(None, help="an existing `trajgen collect driving` file (else collected)"),
    n_samples: int = typer.Option(50_000, help="rows to collect when --data is not given"),
    train_steps: int = typer.Option(5000, help="optimizer updates per policy (the same for all)"),
    batch_size: int = typer.Option(128),
    d_model: int = typer.Option(64, help="encoder/decoder width of every policy"),
    episodes: int = typer.Option(64, help="held-out closed-loop scenes per scenario"),
    open_loop_rows: int = typer.Option(4000, help="held-out logged ticks scored open-loop"),
    device: str | None = typer.Option(None, help="cpu | cuda"),
    seed: int = typer.Option(0),
    training_seed: list[int] | None = typer.Option(
        None, help="train every policy once per seed (repeat the option); scores become mean ± s.e. over seeds"),
    policy: list[str] | None = typer.Option(
        None, help="policies to compare (repeat the option; default anchored, vanilla, regression; "
                   "'vanilla-unet' adds the vanilla policy with DiffusionDrive's TransfuserDP U-Net)"),
    anchor_space: str = typer.Option("metres", help="k-means space of the anchors: metres (DiffusionDrive) | "
                                                    "normalised (x, y over the plan normaliser's half ranges)"),
    anchor_heading: str = typer.Option("predicted", help="the anchored policy's heading: predicted (DiffusionDrive: "
                                                         "only x, y diffused) | diffused (with x, y)"),
    anchor_waypoint_features: bool = typer.Option(
        True, help="the anchored decoder reads where each waypoint lies relative to the nearest lane"),
    extra_train_data: list[Path] = typer.Option(
        [], help="on-policy rows (`trajgen collect driving --driver-policy`) added to every policy's training rows "
                 "(repeat the option)"),
    plan_heading: str = typer.Option("path", help="headings the plans are executed with, for every policy: path "
                                                  "(the direction of each plan's own path) | policy (as regressed)"),
) -> None:
    """DiffusionDrive's comparison in trajgen's simulator: anchored truncated diffusion vs vanilla diffusion vs
    regression (PDMS open and closed loop, mode diversity, latency), plus simulator throughput vs highway-env."""
    from trajgen.bench.driving import POLICY_NAMES, DrivingBenchConfig

    config = DrivingBenchConfig(out_dir=str(out_dir), data=str(data) if data else None, n_samples=n_samples,
                                train_steps=train_steps, batch_size=batch_size, d_model=d_model,
                                closed_loop_episodes=episodes, open_loop_rows=open_loop_rows, device=device,
                                seed=seed, training_seeds=tuple(training_seed or ()),
                                policies=tuple(policy or POLICY_NAMES), anchor_space=anchor_space,
                                anchor_heading=anchor_heading, anchor_waypoint_features=anchor_waypoint_features,
                                extra_train_data=tuple(str(path) for path in extra_train_data),
                                plan_heading=plan_heading)
    _run_driving(config, throughput_seconds=5.0)


@bench_app.command("solvers")
def bench_solvers(
    quick: bool = typer.Option(False, "--quick", help="fewer repeats and samples (< 1 minute)"),
    out: Path | None = typer.Option(None, help="write the results as JSON to this file"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
) -> None:
    """Solver accuracy (exact Gaussian-mixture ODE), per-step overhead and end-to-end cost vs diffusers."""
    from trajgen.bench.solvers import print_solver_tables, run_solver_benchmark

    result = run_solver_benchmark(quick=quick, out=str(out) if out else None, device=device)
    print_solver_tables(result)
    if out:
        console.print(f"wrote {out}")


@bench_app.command("orders")
def bench_orders(
    out: Path | None = typer.Option(None, help="write the results as JSON to this file"),
) -> None:
    """Empirical convergence order of every deterministic solver against the exact Gaussian-mixture ODE."""
    from trajgen.bench.orders import print_order_table, run_order_benchmark

    with console.status("measuring convergence orders"):
        result = run_order_benchmark(str(out) if out else None)
    print_order_table(result)
    if out:
        console.print(f"wrote {out}")


@app.command("solvers")
def list_solvers() -> None:
    """List the registered solvers with their orders and options."""
    from trajgen.solvers import SOLVERS

    table = Table(title="trajgen solvers")
    for column in ("name", "orders", "default", "stochastic", "options"):
        table.add_column(column, no_wrap=column == "name")
    for name, spec in sorted(SOLVERS.items()):
        options = ", ".join(f"{k}={v!r}" for k, v in spec.options.items()) or "-"
        table.add_row(name, ",".join(map(str, spec.orders)), str(spec.default_order), str(spec.stochastic),
                      options)
    console.print(table)


@train_app.command("arcs")
def train_arcs_command(
    steps: int = typer.Option(3000, help="optimizer updates"),
    batch_size: int = typer.Option(256, help="trajectories per update (per rank under torchrun)"),
    lr: float = typer.Option(1e-3, help="peak learning rate"),
    prediction: str = typer.Option("eps", help="eps | x0 | v | flow"),
    schedule: str = typer.Option("vp-discrete", help="noise schedule"),
    solver: str = typer.Option("dpmsolver++", help="solver used to sample at the end"),
    sample_steps: int = typer.Option(10, help="solver steps when sampling"),
    out_dir: Path = typer.Option(Path("runs/arcs"), help="checkpoints, tensorboard and metrics.json"),
    resume: bool = typer.Option(False, "--resume", help="continue from the newest checkpoint in out_dir"),
    seed: int = typer.Option(0, help="random seed"),
    device: str | None = typer.Option(None, help="cpu | cuda (default: cuda when available)"),
) -> None:
    """Train a temporal-UNet diffusion model on multi-modal arc trajectories and score its samples.

    Run under ``torchrun --nproc_per_node N -m trajgen.cli train arcs`` for data-parallel training.
    """
    from trajgen.training.recipes import ArcsConfig, train_arcs

    config = ArcsConfig(steps=steps, batch_size=batch_size, lr=lr, prediction=prediction, schedule=schedule,
                        solver=solver, sample_steps=sample_steps, out_dir=str(out_dir), seed=seed, device=device)
    metrics = train_arcs(config, resume=resume)
    shown = {k: v for k, v in metrics.items() if k != "config"}
    console.print_json(json.dumps(shown))


def _parse_overrides(pairs: list[str]) -> dict[str, object]:
    """``["field=value", ...]`` -> {field: value}; values are read as YAML scalars/lists (safe_load)."""
    import yaml

    overrides: dict[str, object] = {}
    for pair in pairs:
        field, sep, value = pair.partition("=")
        if not sep or not field:
            raise typer.BadParameter(f"--set expects field=value, got {pair!r}")
        overrides[field.strip()] = yaml.safe_load(value)
    return overrides


@train_app.command("offline")
def train_offline_command(
    algo: str = typer.Option(..., help="trajectory-diffuser | decision-diffuser | decision-transformer | "
                             "behavior-cloning"),
    dataset: Path = typer.Option(..., help="a D4RL-format HDF5 file (trajgen collect mujoco, or real D4RL)"),
    out_dir: Path = typer.Option(..., help="run directory: policy.safetensors, checkpoints/"),
    steps: int = typer.Option(100_000, help="optimizer updates"),
    seed: int = typer.Option(0),
    resume: bool = typer.Option(False, "--resume", help="continue from the newest checkpoint in out_dir"),
    overrides: list[str] = typer.Option([], "--set", help="config override field=value (repeatable)"),
    device: str | None = typer.Option(None, help="cpu | cuda (default: cuda when available)"),
) -> None:
    """Train an offline-RL planner or baseline on a D4RL-format dataset (checkpointed, resumable)."""
    from trajgen.policies.offline import make_config, train_offline

    config = make_config(algo, **_parse_overrides(overrides))
    _, summary = train_offline(config, dataset, out_dir, steps, seed=seed, resume=resume, device=device,
                               progress=True)
    console.print_json(json.dumps(summary, default=str))


@eval_app.command("offline")
def eval_offline_command(
    policy: Path = typer.Option(..., help="policy.safetensors (or its run directory)"),
    env: str = typer.Option(..., help="Gymnasium id, e.g. Hopper-v5"),
    episodes: int = typer.Option(20, help="episodes, run batched over a vector env"),
    seed: int = typer.Option(0),
    device: str | None = typer.Option(None),
    target_return: float | None = typer.Option(
        None, help="return each episode starts from (default: the best episode return in the training data)"),
    options: list[str] = typer.Option([], "--set", help="inference option field=value, e.g. t_mid=0.1 "
                                      "(repeatable; the config's inference_fields, no retraining)"),
) -> None:
    """Normalised score (mean and standard error), returns and env steps/s of a trained offline policy."""
    from trajgen.agents.offline import evaluate
    from trajgen.policies.offline import load_policy

    loaded = load_policy(policy, env=env, device=device, options=_parse_overrides(options))
    result = evaluate(loaded, env, episodes, seed=seed, device=device, target_return=target_return)
    console.print_json(json.dumps(result, default=str))


@eval_app.command("driving")
def eval_driving_command(
    policy: Path = typer.Option(..., help="a trained driving policy.safetensors (any of the three algorithms)"),
    episodes: int = typer.Option(64, help="held-out scenes per scenario, driven closed loop in one batch"),
    data: Path | None = typer.Option(None, help="a `trajgen collect driving` file: also score its test rows open "
                                                "loop (NAVSIM's protocol) and the mode diversity"),
    open_loop_rows: int = typer.Option(4000, help="test rows scored open loop (with --data)"),
    plan_heading: str = typer.Option("path", help="path (each pose's heading from the plan's own path, as the "
                                                  "benchmark) | policy (as the policy regressed it)"),
    seed: int = typer.Option(0, help="picks the held-out scenes and seeds the sampling noise"),
    device: str | None = typer.Option(None, help="cpu | cuda (default: cuda when available)"),
    out: Path | None = typer.Option(None, help="write the result as JSON to this file"),
) -> None:
    """PDM scores of one trained driving policy, as the driving benchmark computes them: closed loop on held-out
    scenes (EP against the rule expert on the same scenes) and, with --data, open loop on the file's test rows."""
    import torch

    from trajgen.bench.driving import evaluate_driving_policy
    from trajgen.policies.driving import load_driving_policy

    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    loaded = load_driving_policy(policy, map_location=target)
    result = evaluate_driving_policy(loaded, episodes=episodes, seed=seed, plan_heading=plan_heading, data=data,
                                     open_loop_rows=open_loop_rows)
    console.print(f"{policy}: {result['algorithm']}, {result['nfe']} network call(s) per decision")
    console.print(f"{'loop':6} {'scenes':12} {'PDMS':>13} {'NC':>6} {'DAC':>6} {'TTC':>6} {'EP':>6} {'C':>6} "
                  f"{'collisions':>10}", soft_wrap=True)
    rows = [("closed", scenario, scores) for scenario, scores in result["closed_loop"].items()]
    rows += [("open", scenario, scores) for scenario, scores in result.get("open_loop", {}).items()]
    for loop, scenario, scores in rows:
        collisions = f"{scores['collision']['mean']:.3f}" if "collision" in scores else "-"
        cells = " ".join(f"{scores[k]['mean']:6.3f}" for k in ("nc", "dac", "ttc", "ep", "c"))
        console.print(f"{loop:6} {scenario:12} {scores['pdms']['mean']:.3f} ± {scores['pdms']['se']:.3f} {cells} "
                      f"{collisions:>10}", soft_wrap=True)
    if result.get("mode_diversity"):
        console.print(f"mode diversity {result['mode_diversity']['mean']:.3f}")
    if out:
        from trajgen.training.checkpoint import atomic_write_bytes

        atomic_write_bytes(out, json.dumps(result, indent=2, default=str).encode())
        console.print(f"wrote {out}")


@collect_app.command("mujoco")
def collect_mujoco_command(
    env: str = typer.Option(..., help="hopper | halfcheetah | walker2d"),
    level: str = typer.Option(..., help="random | medium | expert | medium-replay | medium-expert | quick"),
    out: Path = typer.Option(..., help="the D4RL-format HDF5 file to write"),
    n_steps: int | None = typer.Option(None, help="transitions per part (default 1M; 2k with --quick)"),
    seed: int = typer.Option(0),
    policy_dir: Path | None = typer.Option(None, help="behaviour run (default runs/behaviour/<env>)"),
    quick: bool = typer.Option(False, "--quick", help="tiny behaviour policy and file, for tests"),
    medium_return: str | None = typer.Option(
        None, help="medium and medium-replay only: stop the behaviour run early, as D4RL did, once a snapshot "
        "returns this much, and take the medium policy there; 'reference' = 1/3 of trajgen's expert reference"),
) -> None:
    """D4RL-format dataset from SAC behaviour policies (trains or resumes them when missing; resumable)."""
    from trajgen.envs.mujoco import collect_mujoco

    path = collect_mujoco(env, level, out, n_steps=n_steps, seed=seed, policy_dir=policy_dir, quick=quick,
                          progress=True, medium_return=medium_return)
    console.print(f"wrote {path}")


@collect_app.command("driving")
def collect_driving_command(
    out: Path = typer.Option(Path("runs/data/driving.h5"), help="HDF5 file to write"),
    scenario: str = typer.Option("both", help="intersection | merge | both"),
    n_samples: int = typer.Option(50_000, help="rows (replanning ticks) to write"),
    seed: int = typer.Option(0),
    test_fraction: float = typer.Option(0.1, help="share of scene seeds in the test split"),
    n_envs: int = typer.Option(64, help="scenes simulated together"),
    quick: bool = typer.Option(False, "--quick", help="512 rows, 16 scenes: seconds"),
    perturb: float | None = typer.Option(None, help="probability that a tick's executed plan is perturbed (noise "
                                         "injection); default 0.3, or 0 with --driver-policy"),
    driver_policy: list[Path] = typer.Option([], help="a trained policy.safetensors that drives the ego while the "
                                             "expert labels its states (DAgger; repeat to share the scenes "
                                             "round-robin); writes train-split rows only"),
) -> None:
    """Rule-based expert demonstrations in the batched driving simulator (train/test split by scene seed); with
    --driver-policy, on-policy rows: learned policies drive, the expert labels (add them to training with the
    driving benchmark's --extra-train-data)."""
    from trajgen.agents.driving import DrivingAgent
    from trajgen.envs.driving.collect import collect_driving
    from trajgen.policies.driving import load_driving_policy

    drivers = {}
    for index, path in enumerate(driver_policy):
        drivers[f"{index}:{path}"] = DrivingAgent(load_driving_policy(path), seed=seed).act
    stats = collect_driving(out, scenario=scenario, n_samples=n_samples, seed=seed, test_fraction=test_fraction,
                            n_envs=n_envs, quick=quick, progress=True, perturb=perturb, drivers=drivers)
    console.print_json(json.dumps(stats, default=str))
    console.print(f"wrote {out}")


def main() -> None:
    """Run the command line; bad input (ValueError, FileNotFoundError) prints its message and exits with 2,
    without a traceback (every such error names the argument and what was expected)."""
    try:
        app()
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
