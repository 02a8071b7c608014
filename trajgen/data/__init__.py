"""Datasets: synthetic trajectory distributions with known structure, D4RL-format HDF5 Minari."""

from trajgen.data.d4rl import (
    D4RL_REF_SCORES,
    D4RLDataset,
    GaussianNormalizer,
    LimitsNormalizer,
    Normalizer,
    SequenceDataset,
    d4rl_normalized_score,
    load_d4rl,
    write_d4rl,
)
from trajgen.data.minari_io import load_minari
from trajgen.data.synthetic import ArcTrajectories

__all__ = [
    "D4RL_REF_SCORES",
    "ArcTrajectories",
    "D4RLDataset",
    "GaussianNormalizer",
    "LimitsNormalizer",
    "Normalizer",
    "SequenceDataset",
    "d4rl_normalized_score",
    "load_d4rl",
    "load_minari",
    "write_d4rl",
]
