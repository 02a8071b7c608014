"""DiT-style transformer denoiser over the horizon (Peebles & Xie 2023, adapted to 1-D trajectories)."""

from __future__ import annotations

from torch import Tensor, nn

from ._checks import check_features, check_mask
from .embeddings import ConditionEmbedding, TimeEmbedding, time_and_condition
from .layers import Attention, FeedForward, init_position_embedding


def modulate(h: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation of tokens: h [B, L, W], shift/scale [B, W] -> h * (1 + scale) + shift."""
    return h * (1 + scale[:, None]) + shift[:, None]


def _zero_linear(in_features: int, out_features: int) -> nn.Linear:
    """A Linear layer with zero weight and bias (adaLN-Zero: every block starts as the identity)."""
    layer = nn.Linear(in_features, out_features)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block, with optional cross-attention to context tokens.

    `forward(h [B, L, W], emb [B, W], context [B, N, C] | None, context_mask [B, N] | None) -> [B, L, W]`.
    Self-attention and MLP are modulated (shift, scale, gate) by the embedding; cross-attention is a
    plain pre-LN residual branch, skipped when context is None.
    """

    def __init__(
        self, width: int, heads: int, mlp_ratio: float, context_dim: int | None, dropout: float
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads, dropout=dropout)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = FeedForward(width, mlp_ratio, dropout)
        self.ada = nn.Sequential(nn.SiLU(), _zero_linear(width, 6 * width))
        if context_dim is not None:
            self.cross_norm = nn.LayerNorm(width, eps=1e-6)
            self.cross_attn = Attention(width, heads, context_dim=context_dim, dropout=dropout)

    def forward(
        self, h: Tensor, emb: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None
    ) -> Tensor:
        """h [B, L, W], emb [B, W], context [B, N, C] | None, context_mask [B, N] bool | None -> [B, L, W]."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(emb).chunk(6, dim=-1)
        h = h + gate1[:, None] * self.attn(modulate(self.norm1(h), shift1, scale1))
        if context is not None:
            h = h + self.cross_attn(self.cross_norm(h), context, key_mask=context_mask)
        return h + gate2[:, None] * self.mlp(modulate(self.norm2(h), shift2, scale2))


class DiT1d(nn.Module):
    """Transformer denoiser over a trajectory: `forward(x [B, H, D], t [B], cond [B, C] | None) -> [B, H, D]`.

    Each step is a token (linear embedding + learned position, H <= max_len). The time embedding plus
    the optional `cond` embedding drive adaLN-Zero in every block and the final layer, so the
    untrained network outputs zeros. Rows with `cond=None` or `cond_mask` False use a learned null
    embedding (classifier-free guidance). When built with `context_dim`, every block cross-attends
    to `context` tokens [B, N, context_dim] (e.g. agent/lane tokens); `context_mask` [B, N] marks
    valid tokens with True. A row with no valid token (or `context=None`) skips cross-attention.

    Args:
        in_dim: features D per step.
        width: token width W (divisible by heads).
        depth: number of blocks.
        heads: attention heads.
        max_len: longest horizon H supported (size of the position table).
        mlp_ratio: MLP hidden size / W.
        cond_dim: size C of the optional condition vector (None: no condition input).
        context_dim: size of the optional context tokens (None: no cross-attention).
        dropout: dropout in attention and MLPs.
    """

    def __init__(
        self,
        in_dim: int,
        width: int = 128,
        depth: int = 4,
        heads: int = 4,
        *,
        max_len: int = 128,
        mlp_ratio: float = 4.0,
        cond_dim: int | None = None,
        context_dim: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_dim, self.cond_dim, self.context_dim, self.max_len = in_dim, cond_dim, context_dim, max_len
        self.embed = nn.Linear(in_dim, width)
        self.pos = init_position_embedding(max_len, width)
        self.time_emb = TimeEmbedding(width, activation="silu")
        self.cond_emb = ConditionEmbedding(cond_dim, width, "silu") if cond_dim is not None else None
        self.blocks = nn.ModuleList(
            DiTBlock(width, heads, mlp_ratio, context_dim, dropout) for _ in range(depth)
        )
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), _zero_linear(width, 2 * width))
        self.head = _zero_linear(width, in_dim)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        cond: Tensor | None = None,
        *,
        cond_mask: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        """x [B, H, D], t [B] float in [0, 1], cond [B, C] | None, cond_mask [B] bool | None,
        context [B, N, C_ctx] | None, context_mask [B, N] bool | None -> [B, H, D]."""
        emb = self.embed_conditions(x, t, cond, cond_mask)
        self._check_context(context, context_mask, x.shape[0])
        h = self.embed(x) + self.pos[:, : x.shape[1]]
        for block in self.blocks:
            h = block(h, emb, context, context_mask)
        shift, scale = self.final_ada(emb).chunk(2, dim=-1)
        return self.head(modulate(self.final_norm(h), shift, scale))

    def embed_conditions(self, x: Tensor, t: Tensor, cond: Tensor | None, cond_mask: Tensor | None) -> Tensor:
        """Validate x, t, cond, cond_mask and return the time(+cond) embedding [B, W]."""
        check_features(x, ndim=3, in_dim=self.in_dim, layout="[B, H, D]")
        batch, horizon = x.shape[:2]
        if horizon > self.max_len:
            raise ValueError(
                f"x has horizon H={horizon} > max_len={self.max_len}; build DiT1d with a larger max_len"
            )
        return time_and_condition(self.time_emb, self.cond_emb, self.cond_dim, t, cond, cond_mask, batch)

    def _check_context(self, context: Tensor | None, context_mask: Tensor | None, batch: int) -> None:
        """Require context [B, N, context_dim] and context_mask [B, N] bool, or None."""
        if context is None:
            if context_mask is not None:
                raise ValueError("context_mask was given without context")
            return
        if self.context_dim is None:
            raise ValueError("context was given, but DiT1d was built with context_dim=None")
        if context.ndim != 3 or context.shape[0] != batch or context.shape[-1] != self.context_dim:
            raise ValueError(
                f"context must have shape [B, N, C_ctx] = [{batch}, N, {self.context_dim}], "
                f"got {tuple(context.shape)}"
            )
        check_mask(context_mask, shape=tuple(context.shape[:2]), name="context_mask")
