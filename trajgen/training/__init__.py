"""Training: ``Trainer`` (AdamW, warm-up + cosine LR, EMA, AMP, atomic safetensors checkpoints with
bit-exact resume, torchrun DDP, tensorboard + rich progress) and its building blocks."""

from trajgen.training.checkpoint import (
    CheckpointError,
    atomic_write,
    latest_checkpoint,
    load_weights,
    read_checkpoint,
    resolve_checkpoint,
)
from trajgen.training.data import derive_seed
from trajgen.training.distributed import DistInfo
from trajgen.training.ema import EMA, ema_decay_at
from trajgen.training.trainer import (
    Trainer,
    TrainerConfig,
    lr_multiplier,
    move_to,
    seed_everything,
    split_loss,
    unwrap_model,
)

__all__ = [
    "EMA",
    "CheckpointError",
    "DistInfo",
    "Trainer",
    "TrainerConfig",
    "atomic_write",
    "derive_seed",
    "ema_decay_at",
    "latest_checkpoint",
    "load_weights",
    "lr_multiplier",
    "move_to",
    "read_checkpoint",
    "resolve_checkpoint",
    "seed_everything",
    "split_loss",
    "unwrap_model",
]
