"""The offline-RL command line end to end on a quick dataset: collect -> train -> eval (subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trajgen.data import load_d4rl


def _trajgen(*args: str, cwd: Path) -> str:
    result = subprocess.run([sys.executable, "-m", "trajgen.cli", *args], check=False, cwd=cwd, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.timeout(600)
def test_collect_train_eval_quick(tmp_path: Path) -> None:
    data = tmp_path / "hopper-quick.hdf5"
    _trajgen("collect", "mujoco", "--env", "hopper", "--level", "quick", "--out", str(data), "--n-steps", "600",
             "--policy-dir", str(tmp_path / "behaviour"), cwd=tmp_path)
    dataset = load_d4rl(data)
    assert dataset.observations.shape == (600, 11)
    early = tmp_path / "hopper-early-replay.hdf5"                  # any return: the first trained snapshot (150)
    _trajgen("collect", "mujoco", "--env", "hopper", "--level", "medium-replay", "--quick", "--out", str(early),
             "--medium-return", "-1e9", "--policy-dir", str(tmp_path / "behaviour"), cwd=tmp_path)
    assert len(load_d4rl(early)) == 150 and load_d4rl(early).metadata["medium_target_return"] == -1e9
    run = tmp_path / "td"
    _trajgen("train", "offline", "--algo", "behavior-cloning", "--dataset", str(data), "--out-dir", str(run),
             "--steps", "20", "--set", "batch_size=16", "--set", "hidden_dim=32", "--device", "cpu", cwd=tmp_path)
    assert (run / "policy.safetensors").exists()
    out = _trajgen("eval", "offline", "--policy", str(run), "--env", "Hopper-v5", "--episodes", "2",
                   "--device", "cpu", "--target-return", "1500", cwd=tmp_path)
    result = json.loads(out[out.index("{"):])
    assert result["episodes"] == 2
    assert len(result["returns"]) == 2
    refused = subprocess.run([sys.executable, "-m", "trajgen.cli", "eval", "offline", "--policy", str(run), "--env",
                              "Hopper-v5", "--set", "hidden_dim=8"], check=False, cwd=tmp_path, capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode == 2 and "error: options ['hidden_dim'] change what a 'behavior-cloning' policy" in (
        refused.stdout + refused.stderr)


def test_bad_override_is_refused(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "trajgen.cli", "train", "offline", "--algo", "behavior-cloning",
                             "--dataset", "x.hdf5", "--out-dir", "r", "--set", "no_such_field=3"], check=False,
                            cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "no_such_field" in result.stdout + result.stderr
