"""Small causal transformer (GPT-2 style) for autoregressive trajectory drafts."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._checks import check_cond, check_features
from .layers import Attention, FeedForward, init_position_embedding


class GPTBlock(nn.Module):
    """Pre-LN causal transformer block: h + attn(LN(h)), then h + mlp(LN(h)). [B, L, W] -> [B, L, W]."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, dropout=dropout)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = FeedForward(width, mlp_ratio, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: Tensor) -> Tensor:
        """h [B, L, W] -> [B, L, W]; position i sees positions <= i only."""
        h = h + self.drop(self.attn(self.norm1(h), causal=True))
        return h + self.drop(self.mlp(self.norm2(h)))


class CausalGPT(nn.Module):
    """Causal transformer mapping a sequence to next-step predictions.

    `forward(x [B, H, D_in], cond [B, C] | None) -> [B, H, D_out]`: output i predicts step i + 1 from
    steps 0..i (and cond), never from later steps. When built with `cond_dim`, the condition is
    projected to one token prepended to the sequence (a learned null token when cond is None).

    This is a draft model, not a denoiser: it takes no diffusion time t. Its rollout (`generate`)
    gives the Trajectory Diffuser a starting trajectory that diffusion then refines from a small
    t_start.

    Args:
        in_dim: features D_in per input step.
        out_dim: features D_out per prediction (default in_dim; must equal in_dim for `generate`).
        width: token width W (divisible by heads).
        depth: number of blocks.
        heads: attention heads.
        max_len: longest input sequence H (size of the position table).
        mlp_ratio: MLP hidden size / W.
        cond_dim: size C of the optional per-sequence condition vector.
        dropout: dropout on embeddings, attention and residual branches.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int | None = None,
        width: int = 128,
        depth: int = 4,
        heads: int = 4,
        *,
        max_len: int = 128,
        mlp_ratio: float = 4.0,
        cond_dim: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim or in_dim
        self.cond_dim, self.max_len = cond_dim, max_len
        self.embed = nn.Linear(in_dim, width)
        self.pos = init_position_embedding(max_len, width)
        if cond_dim is not None:
            self.cond_proj = nn.Linear(cond_dim, width)
            self.null_cond = nn.Parameter(torch.randn(width) * 0.02)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(GPTBlock(width, heads, mlp_ratio, dropout) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, self.out_dim)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """x [B, H, D_in], cond [B, C] | None -> [B, H, D_out] (output i predicts step i + 1)."""
        self._check_inputs(x, cond)
        h = self.embed(x) + self.pos[:, : x.shape[1]]
        if self.cond_dim is not None:
            h = torch.cat([self._cond_token(cond, h)[:, None], h], dim=1)
        h = self.drop(h)
        for block in self.blocks:
            h = block(h)
        out = self.head(self.final_norm(h))
        return out[:, 1:] if self.cond_dim is not None else out

    @torch.no_grad()
    def generate(self, prefix: Tensor, steps: int, cond: Tensor | None = None) -> Tensor:
        """Autoregressive rollout: prefix [B, P, D] (P >= 1), cond [B, C] | None -> [B, P + steps, D].

        Returns the prefix followed by `steps` predicted steps; each prediction is fed back as the
        next input. Deterministic (no sampling) and without a KV cache: every step reruns the
        network on the last `max_len` steps. Runs under no_grad; call `.eval()` first if the model
        has dropout.
        """
        if self.out_dim != self.in_dim:
            raise ValueError(
                f"generate needs out_dim == in_dim to feed predictions back, got {self.out_dim} != {self.in_dim}"
            )
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        self._check_inputs(prefix, cond, name="prefix")
        seq = prefix
        for _ in range(steps):
            next_step = self(seq[:, -self.max_len :], cond)[:, -1:]
            seq = torch.cat([seq, next_step], dim=1)
        return seq

    def _cond_token(self, cond: Tensor | None, h: Tensor) -> Tensor:
        """The condition token [B, W]: projected cond, or the learned null token."""
        if cond is None:
            return self.null_cond.to(h.dtype).expand(h.shape[0], -1)
        return self.cond_proj(cond)

    def _check_inputs(self, x: Tensor, cond: Tensor | None, name: str = "x") -> None:
        """Validate x [B, H, D_in] with H <= max_len, and cond."""
        check_features(x, ndim=3, in_dim=self.in_dim, layout="[B, H, D_in]", name=name)
        if x.shape[1] > self.max_len:
            raise ValueError(f"{name} has length H={x.shape[1]} > max_len={self.max_len}")
        check_cond(cond, cond_dim=self.cond_dim, batch=x.shape[0])
