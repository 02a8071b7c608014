"""Datasets: synthetic trajectory distributions with known structure (later: D4RL HDF5, Minari, motion)."""

from trajgen.data.synthetic import ArcTrajectories

__all__ = ["ArcTrajectories"]
