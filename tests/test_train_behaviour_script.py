"""scripts/train_behaviour.py: step planning from a measured rate and the splitting of packed runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_behaviour.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_behaviour_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("rate", "budget", "expected"), [
    (100.0, 1000.0, 10_000 + 80_000),     # 0.8 * 100 * 1000 = 80k updates after the 10k warm-up
    (90.0, 320.0, 30_000),                # 23,040 updates -> 20k whole snapshots; 10k + 20k
    (1.0, 10.0, 20_000),                  # too slow for one snapshot: the smallest run (warm-up + one snapshot)
])
def test_planned_steps_are_whole_snapshots_after_the_warm_up(script, rate, budget, expected) -> None:
    total = script.planned_steps(rate, budget, learning_starts=10_000, snapshot_every=10_000, margin=0.8)
    assert total == expected and total % 10_000 == 0


def test_planned_steps_round_an_odd_warm_up_to_snapshots(script) -> None:
    assert script.planned_steps(1.0, 1.0, learning_starts=200, snapshot_every=150, margin=0.8) == 450
    assert script.planned_steps(10.0, 100.0, learning_starts=200, snapshot_every=150, margin=0.8) == 900


def test_split_file_parts_concatenate_to_the_original(script, tmp_path) -> None:
    payload = np.random.default_rng(0).bytes(int(2.5 * 2**20))
    path = tmp_path / "run.tar.gz"
    path.write_bytes(payload)
    parts = script.split_file(path, part_mb=1.0)
    assert parts == ["run.tar.gz.part00", "run.tar.gz.part01", "run.tar.gz.part02"] and not path.exists()
    assert b"".join((tmp_path / p).read_bytes() for p in parts) == payload
    small = tmp_path / "small.tar.gz"
    small.write_bytes(b"x" * 10)
    assert script.split_file(small, part_mb=1.0) == ["small.tar.gz"] and small.read_bytes() == b"x" * 10
