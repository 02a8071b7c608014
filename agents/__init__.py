"""Agents acting in environments (installed as ``trajgen.agents``)."""

from trajgen.agents.offline import OfflineAgent, decision_latency, evaluate

__all__ = ["OfflineAgent", "decision_latency", "evaluate"]
