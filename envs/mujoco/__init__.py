"""Gymnasium MuJoCo locomotion (v5): behaviour policies, D4RL-format data collection, reference returns (issue 5)."""
