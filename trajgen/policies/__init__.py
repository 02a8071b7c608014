"""Policies: the method families (anchored truncated diffusion, vanilla diffusion, regression for driving; the
Trajectory Diffuser and its offline-RL baselines). Each is model + loss + sample; no env code here."""

from trajgen.policies.offline import (
    ALGORITHMS,
    BehaviorCloningConfig,
    BehaviorCloningPolicy,
    DecisionDiffuserConfig,
    DecisionDiffuserPolicy,
    DecisionTransformerConfig,
    DecisionTransformerPolicy,
    OfflinePolicy,
    TrajectoryDiffuserConfig,
    TrajectoryDiffuserPolicy,
    build_policy,
    load_policy,
    make_config,
    save_policy,
    train_offline,
)

__all__ = [
    "ALGORITHMS",
    "BehaviorCloningConfig",
    "BehaviorCloningPolicy",
    "DecisionDiffuserConfig",
    "DecisionDiffuserPolicy",
    "DecisionTransformerConfig",
    "DecisionTransformerPolicy",
    "OfflinePolicy",
    "TrajectoryDiffuserConfig",
    "TrajectoryDiffuserPolicy",
    "build_policy",
    "load_policy",
    "make_config",
    "save_policy",
    "train_offline",
]
