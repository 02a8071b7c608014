"""Residual MLP: a small denoiser, inverse-dynamics model or discriminator."""

from __future__ import annotations

from torch import Tensor, nn

from ._checks import check_cond, check_features, check_mask, check_time
from .embeddings import ConditionEmbedding, FiLM, TimeEmbedding


class ResidualBlock(nn.Module):
    """h + Linear(Dropout(SiLU(Linear(FiLM(LN(h)))))); FiLM only when an embedding size is given.

    `forward(h [B, F], emb [B, E] | None) -> [B, F]`.
    """

    def __init__(self, width: int, emb_dim: int | None, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.film = FiLM(emb_dim, width, activation="silu") if emb_dim is not None else None
        self.net = nn.Sequential(
            nn.Linear(width, width), nn.SiLU(), nn.Dropout(dropout), nn.Linear(width, width)
        )

    def forward(self, h: Tensor, emb: Tensor | None = None) -> Tensor:
        """h [B, F], emb [B, E] | None -> [B, F]."""
        y = self.norm(h)
        if self.film is not None:
            y = self.film(y, emb)
        return h + self.net(y)


class ResidualMLP(nn.Module):
    """Residual MLP on vectors, or on whole trajectories when built with `horizon`.

    Vector mode (horizon=None): `forward(x [B, D_in], t [B] | None, cond [B, C] | None) -> [B, D_out]`.
    Trajectory mode (horizon=H): `forward(x [B, H, D_in], t, cond) -> [B, H, D_out]`; the trajectory is
    flattened to [B, H * D_in], so H is fixed at construction. With the default out_dim this is a
    shape-preserving denoiser like TemporalUnet1d and DiT1d.

    The time embedding (when `time_conditioned`) plus the optional cond embedding modulate every
    block through FiLM. Rows with `cond=None` or `cond_mask` False use a learned null embedding.
    With `time_conditioned=False` and no cond_dim it is a plain residual MLP (no t argument).

    Args:
        in_dim: input features D_in (per step in trajectory mode).
        out_dim: output features D_out (per step in trajectory mode; default in_dim).
        hidden_dim: width of the residual stream.
        depth: number of residual blocks.
        dropout: dropout inside each block.
        time_conditioned: whether forward takes a diffusion time t [B] in [0, 1].
        cond_dim: size C of the optional condition vector.
        emb_dim: size of the time/cond embedding.
        horizon: H for trajectory mode, None for vector mode.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int | None = None,
        *,
        hidden_dim: int = 256,
        depth: int = 3,
        dropout: float = 0.0,
        time_conditioned: bool = True,
        cond_dim: int | None = None,
        emb_dim: int = 128,
        horizon: int | None = None,
    ) -> None:
        super().__init__()
        if horizon is not None and horizon < 1:
            raise ValueError(f"horizon must be >= 1 or None, got {horizon}")
        self.in_dim, self.out_dim = in_dim, out_dim or in_dim
        self.cond_dim, self.horizon, self.time_conditioned = cond_dim, horizon, time_conditioned
        steps = horizon or 1
        self.time_emb = TimeEmbedding(emb_dim, activation="silu") if time_conditioned else None
        self.cond_emb = ConditionEmbedding(cond_dim, emb_dim, "silu") if cond_dim is not None else None
        block_emb_dim = emb_dim if (time_conditioned or cond_dim is not None) else None
        self.input = nn.Linear(steps * in_dim, hidden_dim)
        self.blocks = nn.ModuleList(ResidualBlock(hidden_dim, block_emb_dim, dropout) for _ in range(depth))
        self.output = nn.Sequential(nn.LayerNorm(hidden_dim), nn.Linear(hidden_dim, steps * self.out_dim))

    def forward(
        self,
        x: Tensor,
        t: Tensor | None = None,
        cond: Tensor | None = None,
        *,
        cond_mask: Tensor | None = None,
    ) -> Tensor:
        """x [B, D_in] or [B, H, D_in], t [B] | None, cond [B, C] | None, cond_mask [B] | None
        -> [B, D_out] or [B, H, D_out]."""
        self._check_x(x)
        emb = self._embed(x.shape[0], t, cond, cond_mask)
        h = self.input(x.flatten(1))
        for block in self.blocks:
            h = block(h, emb)
        out = self.output(h)
        return out if self.horizon is None else out.unflatten(1, (self.horizon, self.out_dim))

    def _check_x(self, x: Tensor) -> None:
        """x must be [B, D_in] (vector mode) or [B, horizon, D_in] (trajectory mode)."""
        if self.horizon is None:
            check_features(x, ndim=2, in_dim=self.in_dim, layout="[B, D_in]")
            return
        check_features(x, ndim=3, in_dim=self.in_dim, layout="[B, H, D_in]")
        if x.shape[1] != self.horizon:
            raise ValueError(
                f"x has horizon H={x.shape[1]}, but the model was built with horizon={self.horizon}"
            )

    def _embed(
        self, batch: int, t: Tensor | None, cond: Tensor | None, cond_mask: Tensor | None
    ) -> Tensor | None:
        """Validate t, cond, cond_mask and return the summed embedding [B, E], or None without any."""
        check_cond(cond, cond_dim=self.cond_dim, batch=batch)
        check_mask(cond_mask, shape=(batch,), name="cond_mask")
        emb = None
        if self.time_emb is not None:
            emb = self.time_emb(check_time(t, batch))
        elif t is not None:
            raise ValueError("t was given, but the model was built with time_conditioned=False")
        if self.cond_emb is not None:
            cond_emb = self.cond_emb(cond, batch, cond_mask)
            emb = cond_emb if emb is None else emb + cond_emb
        return emb
