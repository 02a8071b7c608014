"""Agents acting in environments (installed as ``trajgen.agents``): policies turned into env actions, batched
evaluation and real-time loops."""

from trajgen.agents.driving import (
    DrivingAgent,
    RealTimeReport,
    Rollout,
    closed_loop_scores,
    evaluate_closed_loop,
    expert_decider,
    rollout,
    run_realtime,
    shift_plan,
)
from trajgen.agents.offline import OfflineAgent, decision_latency, evaluate

__all__ = [
    "DrivingAgent",
    "OfflineAgent",
    "RealTimeReport",
    "Rollout",
    "closed_loop_scores",
    "decision_latency",
    "evaluate",
    "evaluate_closed_loop",
    "expert_decider",
    "rollout",
    "run_realtime",
    "shift_plan",
]
