"""Mode persistence of the driving agent: the continuing mode is kept across replans unless another mode is more
confident by more than the margin; closed-form scenes with known answers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
import torch

from trajgen.agents.driving import DrivingAgent, ModePersistence, persistent_mode, rollout
from trajgen.policies.driving import DrivingPlan, DrivingPolicy, DrivingPolicyConfig

T = 0.5 * np.arange(1, 9)  # plan times, s


def straight(speed: float) -> np.ndarray:
    """Ego-frame plan [8, 3] driving straight at constant ``speed``."""
    plan = np.zeros((8, 3))
    plan[:, 0] = speed * T
    return plan


def test_persistent_mode_keeps_the_nearest_mode_within_the_margin() -> None:
    modes = np.stack([straight(0.0), straight(5.0), straight(10.0)])[None]  # [1, 3, 8, 3]
    previous = straight(5.2)[None]
    # mode 1 continues the previous plan; mode 2 is the most confident
    assert persistent_mode(modes, np.array([[0.1, 0.50, 0.55]]), previous, margin=0.1)[0] == 1
    assert persistent_mode(modes, np.array([[0.1, 0.50, 0.65]]), previous, margin=0.1)[0] == 2
    assert persistent_mode(modes, np.array([[0.1, 0.50, 0.55]]), previous, margin=0.0)[0] == 2
    # no previous plan (NaN): the most confident mode
    assert persistent_mode(modes, np.array([[0.1, 0.50, 0.55]]), np.full((1, 8, 3), np.nan), 0.1)[0] == 2


def test_choose_shifts_the_previous_plan_into_the_new_ego_frame() -> None:
    """A plan made heading north at (0, 0) at 6 m/s, of which the ego drove only 1 m in 0.5 s: in the new ego frame
    its continuation is x = 6 (t + 0.5) - 1 = 6 t + 2. The same plan unshifted (6 t) or only re-timed (6 t + 3)
    are other modes; a wrong rotation would make the stop mode the nearest."""
    memory = ModePersistence(margin=0.2)
    north = np.array([[0.0, 0.0, np.pi / 2]])
    first = memory.choose(np.stack([straight(6.0), straight(0.0)])[None], np.array([[0.9, 0.1]]), north,
                          np.array([0.0]), np.array([1]))
    np.testing.assert_allclose(first[0], straight(6.0))
    ahead = np.array([1.0, 0.0, 0.0])
    continuation, unshifted, retimed = straight(6.0) + 2 * ahead, straight(6.0), straight(6.0) + 3 * ahead
    candidates = np.stack([unshifted, retimed, continuation, straight(0.0)])[None]
    scores = np.array([[0.3, 0.3, 0.2, 0.35]])  # the stop mode is the most confident, by 0.15 < margin
    moved = np.array([[0.0, 1.0, np.pi / 2]])
    chosen = memory.choose(candidates, scores, moved, np.array([0.5]), np.array([1]))
    np.testing.assert_allclose(chosen[0], continuation)
    # a new episode (another id) forgets the previous plan: the most confident mode
    chosen = memory.choose(candidates, scores, moved, np.array([0.5]), np.array([2]))
    np.testing.assert_allclose(chosen[0], straight(0.0))


def test_choose_validates_its_inputs() -> None:
    with pytest.raises(ValueError, match="margin"):
        ModePersistence(margin=1.5)
    memory = ModePersistence()
    modes, scores = np.zeros((2, 3, 8, 3)), np.zeros((2, 3))
    with pytest.raises(ValueError, match=r"ego_pose must be \[S, 3\]"):
        memory.choose(modes, scores, np.zeros((3, 3)), np.zeros(2), np.zeros(2))
    with pytest.raises(ValueError, match="modes must be"):
        memory.choose(modes[:, :2], scores, np.zeros((2, 3)), np.zeros(2), np.zeros(2))
    with pytest.raises(ValueError, match="finite"):
        memory.choose(modes, np.full((2, 3), np.nan), np.zeros((2, 3)), np.zeros(2), np.zeros(2))


class FlipFlopPolicy(DrivingPolicy):
    """Two modes, 'go' (8 m/s) and 'stop', whose confidences swap at every call by 0.05: the top-confidence
    choice flips at every decision."""

    algorithm = "flip-flop-test"

    def __init__(self) -> None:
        super().__init__(DrivingPolicyConfig(d_model=16, heads=2, encoder_layers=1))
        self.calls = 0

    def _plan(self, obs: Mapping[str, Any], generator: torch.Generator | None, **kwargs: Any) -> DrivingPlan:
        batch = np.asarray(obs["ego"]).shape[0]
        modes = torch.as_tensor(np.stack([straight(8.0), straight(0.0)]), dtype=torch.float32)
        modes = modes.expand(batch, -1, -1, -1)
        go_first = self.calls % 2 == 0
        self.calls += 1
        scores = torch.tensor([0.5, 0.45] if go_first else [0.45, 0.5]).expand(batch, -1)
        return DrivingPlan(modes[torch.arange(batch), scores.argmax(-1)], modes, scores)


def executed_plans(agent: DrivingAgent, decisions: int) -> list[np.ndarray]:
    plans: list[np.ndarray] = []

    def make(sim: Any) -> Any:
        decide = agent.decider()

        def record(obs: dict[str, np.ndarray], sim: Any) -> np.ndarray:
            plans.append(decide(obs, sim))
            return plans[-1]
        return record

    rollout(make, "merge", [11, 12], n_envs=2, max_decisions=decisions)
    return plans


def test_agent_commits_to_a_mode_in_closed_loop() -> None:
    go = straight(8.0)
    flipping = executed_plans(DrivingAgent(FlipFlopPolicy()), 4)
    assert [bool(np.allclose(p[0], go)) for p in flipping] == [True, False, True, False]
    committed = executed_plans(DrivingAgent(FlipFlopPolicy(), mode_persistence=0.1), 4)
    assert all(np.allclose(p, go) for p in committed)
    # a margin below the confidence swing flips again
    flips = executed_plans(DrivingAgent(FlipFlopPolicy(), mode_persistence=0.01), 4)
    assert [bool(np.allclose(p[0], go)) for p in flips] == [True, False, True, False]
