"""Train SAC behaviour runs for several envs side by side, sized to a wall-clock budget.

    python scripts/train_behaviour.py --envs halfcheetah walker2d --seeds 0 1 --budget-s 400 \
        --out-dir runs/behaviour_budget --pack-dir runs/packed

Each (env, seed) is one ``train_behaviour`` process. ``total_steps`` is not given but measured: a short SB3 SAC
probe on every candidate device (CPU with 1 and 2 threads, CUDA when present) times updates per second, the
fastest device is used and ``total_steps`` is what that rate fits into ``--budget-s`` (whole snapshots, after the
uniform warm-up). A run that does not finish in time stays resumable in its run directory.

With ``--pack-dir``, for each env the seed whose expert snapshot returns most is packed as
``<env>.tar.gz`` (config, behaviour.json, actor snapshots and the medium-replay dataset, D4RL HDF5), split into
parts below ``--part-mb`` when larger: what a machine without shared disk sends back. ``summary.json`` holds the
probe rates, the chosen settings and every run's snapshot returns.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

PROBE = """
import sys, time, torch, gymnasium as gym
from stable_baselines3 import SAC
from trajgen.envs.mujoco.envs import ENV_IDS
env, device, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(threads)
model = SAC("MlpPolicy", gym.make(ENV_IDS[env]), learning_starts=200, device=device, seed=0, verbose=0)
model.learn(400)
start = time.perf_counter()
model.learn(800, reset_num_timesteps=False)
print(800 / (time.perf_counter() - start))
"""

TRAIN = """
import json, sys
from trajgen.envs.mujoco import SACConfig, train_behaviour
config = SACConfig(**json.loads(sys.argv[1]))
train_behaviour(config, sys.argv[2])
"""


def probe_rates(env: str, candidates: list[tuple[str, int]]) -> dict[str, float]:
    """SAC updates per second (one env step + one gradient step each) per ``device/threads`` candidate, probed
    side by side (as the runs will train)."""
    procs = [subprocess.Popen([sys.executable, "-c", PROBE, env, device, str(threads)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for device, threads in candidates]
    rates = {}
    for (device, threads), proc in zip(candidates, procs):
        stdout, stderr = proc.communicate(timeout=300)
        if proc.returncode != 0:
            print(f"probe {device}/{threads} failed:\n{stderr[-2000:]}", flush=True)
            continue
        rates[f"{device}/{threads}"] = float(stdout.strip().splitlines()[-1])
        print(f"probe {env} {device} threads={threads}: {rates[f'{device}/{threads}']:.0f} steps/s", flush=True)
    if not rates:
        raise RuntimeError("every SAC probe failed")
    return rates


def planned_steps(rate: float, budget_s: float, learning_starts: int, snapshot_every: int, margin: float) -> int:
    """Env steps that fit: the warm-up plus whole snapshots of updates at ``margin`` x the probed rate."""
    updates = int(rate * margin * budget_s) // snapshot_every * snapshot_every
    least = -(-(learning_starts + snapshot_every) // snapshot_every) * snapshot_every
    return max((learning_starts + updates) // snapshot_every * snapshot_every, least)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", nargs="+", default=["hopper", "halfcheetah", "walker2d"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--budget-s", type=float, required=True, help="wall seconds of SAC updates per run")
    parser.add_argument("--margin", type=float, default=0.8,
                        help="fraction of the probed rate planned for (runs side by side and evaluations cost)")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="kill runs still going this many seconds after launch (default 1.35 x budget + 60)")
    parser.add_argument("--out-dir", default="runs/behaviour_budget")
    parser.add_argument("--pack-dir", default=None)
    parser.add_argument("--part-mb", type=float, default=15.5)
    parser.add_argument("--config", default="{}",
                        help='JSON of further SACConfig fields, e.g. {"batch_size": 32} (total_steps is planned)')
    parser.add_argument("--devices", nargs="+", default=None,
                        help="candidates as device/threads, e.g. cpu/1 cuda/1 (default: cpu/1 cpu/2 and cuda/1)")
    args = parser.parse_args(argv)

    import torch

    from trajgen.envs.mujoco import SACConfig

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    candidates = ([(c.split("/")[0], int(c.split("/")[1])) for c in args.devices] if args.devices else
                  [("cpu", 1), ("cpu", 2)] + ([("cuda", 1)] if torch.cuda.is_available() else []))
    rates = probe_rates(args.envs[0], candidates)
    best = max(rates, key=rates.get)
    device, threads = best.split("/")[0], int(best.split("/")[1])
    overrides = json.loads(args.config)
    base = SACConfig(**{**overrides, "checkpoint_every": overrides.get("snapshot_every", SACConfig.snapshot_every)})
    total = planned_steps(rates[best], args.budget_s, base.learning_starts, base.snapshot_every, args.margin)
    print(f"using {best} at {rates[best]:.0f} steps/s -> total_steps {total}", flush=True)

    runs: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()
    for env in args.envs:
        for seed in args.seeds:
            config = SACConfig(**{**overrides, "env": env, "total_steps": total, "seed": seed, "device": device,
                                  "torch_threads": threads, "checkpoint_every": base.snapshot_every})
            run_dir = out_dir / f"{config.env}-s{seed}"
            log = open(out_dir / f"{config.env}-s{seed}.log", "a")  # noqa: SIM115 (closed once the run ends)
            proc = subprocess.Popen([sys.executable, "-c", TRAIN, json.dumps(dataclasses.asdict(config)),
                                     str(run_dir)], stdout=log, stderr=subprocess.STDOUT)
            runs[run_dir.name] = {"env": config.env, "seed": seed, "dir": run_dir, "proc": proc, "log": log}
    deadline = start + (args.deadline_s if args.deadline_s is not None else args.budget_s * 1.35 + 60)
    while any(r["proc"].poll() is None for r in runs.values()) and time.perf_counter() < deadline:
        time.sleep(5)
    for name, r in runs.items():
        if r["proc"].poll() is None:
            r["proc"].kill()
            r["proc"].wait()
        r["log"].close()
        r["returncode"], r["wall_s"] = r["proc"].returncode, time.perf_counter() - start
        print(f"{name}: exit {r['returncode']}", flush=True)
        if r["returncode"] != 0:
            print(Path(out_dir / f"{name}.log").read_text()[-3000:], flush=True)

    summary = {"rates": rates, "device": device, "threads": threads, "total_steps": total, "budget_s": args.budget_s,
               "runs": {}}
    for name, r in runs.items():
        info_path = r["dir"] / "behaviour.json"
        info = json.loads(info_path.read_text()) if info_path.is_file() else None
        summary["runs"][name] = {"env": r["env"], "seed": r["seed"], "finished": info is not None,
                                 "returncode": r["returncode"], "snapshots": info and info["snapshots"],
                                 "medium_step": info and info["medium_step"]}
    if args.pack_dir:
        summary["packed"] = pack_best(summary, out_dir, Path(args.pack_dir), args.part_mb)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if args.pack_dir:
        (Path(args.pack_dir) / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def pack_best(summary: dict[str, Any], out_dir: Path, pack_dir: Path, part_mb: float) -> dict[str, list[str]]:
    """Per env, the finished seed with the highest expert return: its medium-replay dataset and actors, tarred."""
    from trajgen.envs.mujoco import collect_mujoco

    pack_dir.mkdir(parents=True, exist_ok=True)
    packed: dict[str, list[str]] = {}
    envs = sorted({r["env"] for r in summary["runs"].values()})
    for env in envs:
        done = {n: r for n, r in summary["runs"].items() if r["env"] == env and r["finished"]}
        if not done:
            print(f"{env}: no finished run to pack", flush=True)
            continue
        name = max(done, key=lambda n: done[n]["snapshots"][-1]["return_stochastic"])
        run_dir = out_dir / name
        replay = collect_mujoco(env, "medium-replay", run_dir / "medium-replay.hdf5", policy_dir=run_dir,
                                train_missing=False)
        archive = pack_dir / f"{env}.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            for item in ("config.json", "behaviour.json", "snapshots", replay.name):
                tar.add(run_dir / item, arcname=f"{name}/{item}")
        packed[env] = split_file(archive, part_mb)
        print(f"{env}: packed {name} ({archive.stat().st_size / 2**20:.1f} MB) as {packed[env]}", flush=True)
    return packed


def split_file(path: Path, part_mb: float) -> list[str]:
    """Split ``path`` into ``path.partNN`` files of at most ``part_mb`` MiB (kept whole when it fits)."""
    limit = int(part_mb * 2**20)
    if path.stat().st_size <= limit:
        return [path.name]
    names = []
    with open(path, "rb") as f:
        while chunk := f.read(limit):
            part = path.with_name(f"{path.name}.part{len(names):02d}")
            part.write_bytes(chunk)
            names.append(part.name)
    path.unlink()
    return names


if __name__ == "__main__":
    main()
