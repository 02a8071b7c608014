"""Gymnasium MuJoCo locomotion (v5): behaviour policies, D4RL-format data collection, reference returns (issue 5)."""

from trajgen.envs.mujoco.behaviour import (
    BehaviourRun,
    SACConfig,
    Snapshot,
    TanhGaussianActor,
    actor_from_sb3,
    evaluate_actor,
    load_behaviour,
    read_replay,
    select_early_stopped_medium,
    select_medium,
    train_behaviour,
    train_until_medium,
)
from trajgen.envs.mujoco.collect import LEVELS, collect_mujoco, default_policy_dir, load_mujoco_dataset, random_actor
from trajgen.envs.mujoco.envs import ENV_IDS, env_name, make_env, make_vector_env
from trajgen.envs.mujoco.references import (
    REFERENCES_PATH,
    load_references,
    measure_references,
    normalized_score,
    reference_returns,
    write_references,
)

__all__ = [
    "ENV_IDS",
    "LEVELS",
    "REFERENCES_PATH",
    "BehaviourRun",
    "SACConfig",
    "Snapshot",
    "TanhGaussianActor",
    "actor_from_sb3",
    "collect_mujoco",
    "default_policy_dir",
    "env_name",
    "evaluate_actor",
    "load_behaviour",
    "load_mujoco_dataset",
    "load_references",
    "make_env",
    "make_vector_env",
    "measure_references",
    "normalized_score",
    "random_actor",
    "read_replay",
    "reference_returns",
    "select_early_stopped_medium",
    "select_medium",
    "train_behaviour",
    "train_until_medium",
    "write_references",
]
