"""torchrun worker for tests/test_training.py: trains a tiny model with gloo on CPU.

Usage: python -m torch.distributed.run --standalone --nproc_per_node=2 tests/_ddp_worker.py OUT_DIR
       [--steps N] [--until K] [--resume]
Each rank writes OUT_DIR/rank{r}.safetensors (final weights) and OUT_DIR/rank{r}_batch.safetensors
(its first batch), so the test can compare ranks.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from trajgen.training import Trainer, TrainerConfig, seed_everything


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--until", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    rank = int(os.environ["RANK"])
    assert int(os.environ["WORLD_SIZE"]) == 2

    seed_everything(rank)  # different init per rank: DDP must broadcast rank 0's weights
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2))
    first: list[torch.Tensor] = []

    def sample_batch(g: torch.Generator) -> torch.Tensor:
        x = torch.randn(8, 3, generator=g)
        if not first:
            first.append(x)
        return x

    def loss_fn(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(x.shape[0], 2)  # global RNG: per-rank seeded and checkpointed
        return ((m(x) - x[:, :2] - 0.1 * noise) ** 2).mean()

    cfg = TrainerConfig(
        steps=args.steps,
        lr=1e-2,
        warmup_steps=2,
        log_every=4,
        checkpoint_every=5,
        out_dir=args.out_dir,
        progress=False,
        tensorboard=False,
        device="cpu",
    )
    with Trainer(model, loss_fn, sample_batch, cfg) as trainer:
        assert trainer.dist.world_size == 2 and trainer.dist.rank == rank
        trainer.fit(resume=args.resume, until=args.until)
        out = Path(args.out_dir)
        safetensors.torch.save_file(
            {k: v.contiguous() for k, v in trainer.model.state_dict().items()},
            out / f"rank{rank}.safetensors",
        )
        if first:
            safetensors.torch.save_file({"x": first[0]}, out / f"rank{rank}_batch.safetensors")


if __name__ == "__main__":
    main()
