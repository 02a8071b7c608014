"""Agents acting in environments (installed as ``trajgen.agents``)."""
