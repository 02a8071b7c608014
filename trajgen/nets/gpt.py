"""Small causal transformer (GPT-2 style) for autoregressive trajectory drafts, with a key/value cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_cond, check_features
from .layers import Attention, FeedForward, init_position_embedding


@dataclass
class KVCache:
    """Keys and values of every block for the tokens decoded so far (incremental decoding).

    ``keys[i]``, ``values[i]``: block i's buffers [B, heads, capacity, W / heads]; the first ``length``
    token slots are filled (the condition token, when the model has one, is slot 0). ``steps`` counts the
    sequence steps stored (tokens minus the condition token); the next step gets position ``steps``.
    """

    keys: list[Tensor]
    values: list[Tensor]
    length: int
    steps: int

    @property
    def capacity(self) -> int:
        """Token slots per buffer."""
        return self.keys[0].shape[2]


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

    def forward_cached(self, h: Tensor, keys: Tensor, values: Tensor, start: int) -> Tensor:
        """The same block for the new tokens h [B, L, W] at slots start..start+L-1, attending to the cache.

        Writes the new tokens' keys/values into ``keys``, ``values`` [B, heads, capacity, W / heads] and
        returns [B, L, W]; equals rows start.. of ``forward`` on the whole sequence.
        """
        h = h + self.drop(self._cached_attention(self.norm1(h), keys, values, start))
        return h + self.drop(self.mlp(self.norm2(h)))

    def _cached_attention(self, a: Tensor, keys: Tensor, values: Tensor, start: int) -> Tensor:
        """Causal self-attention of a [B, L, W] (slots start..) over cached slots 0..start+L-1 (as Attention)."""
        attn, new = self.attn, a.shape[1]
        end = start + new
        q = attn._split(attn.to_q(a))
        k, v = (attn._split(part) for part in attn.to_kv(a).chunk(2, dim=-1))
        keys[:, :, start:end], values[:, :, start:end] = k, v
        mask = None
        if start > 0 and new > 1:  # new token j (slot start + j) sees slots <= start + j
            mask = torch.ones(new, end, dtype=torch.bool, device=a.device).tril(diagonal=start)
        y = F.scaled_dot_product_attention(q, keys[:, :, :end], values[:, :, :end], attn_mask=mask,
                                           dropout_p=attn.dropout if self.training else 0.0,
                                           is_causal=start == 0 and new > 1)
        return attn.to_out(y.transpose(1, 2).flatten(2))


class CausalGPT(nn.Module):
    """Causal transformer mapping a sequence to next-step predictions.

    `forward(x [B, H, D_in], cond [B, C] | None) -> [B, H, D_out]`: output i predicts step i + 1 from
    steps 0..i (and cond), never from later steps. When built with `cond_dim`, the condition is
    projected to one token prepended to the sequence (a learned null token when cond is None).

    This is a draft model, not a denoiser: it takes no diffusion time t. Its rollout (`generate`)
    gives the Trajectory Diffuser a starting trajectory that diffusion then refines from a small
    t_start. Incremental decoding: `prefill` runs a prefix and returns a `KVCache`, `decode` appends
    one step at a time reusing the cached keys/values (same outputs as `forward`).

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
        self.heads = heads
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
        h = self._tokens(x, cond, first_position=0)
        for block in self.blocks:
            h = block(h)
        return self._predict(h, has_cond_token=self.cond_dim is not None)

    @torch.no_grad()
    def prefill(self, x: Tensor, cond: Tensor | None = None, *, capacity: int | None = None) -> tuple[Tensor, KVCache]:
        """Run a prefix and keep its keys/values: x [B, P, D_in], cond [B, C] | None -> ([B, P, D_out], cache).

        The outputs equal ``forward(x, cond)``. ``capacity``: sequence steps the cache can hold in all
        (default ``max_len``; at most ``max_len``, since positions come from a table of that size).
        """
        self._check_inputs(x, cond)
        capacity = self.max_len if capacity is None else capacity
        if not x.shape[1] <= capacity <= self.max_len:
            raise ValueError(f"capacity must be in [P, max_len] = [{x.shape[1]}, {self.max_len}], got {capacity}")
        h = self._tokens(x, cond, first_position=0)
        slots = capacity + (self.cond_dim is not None)
        shape = (x.shape[0], self.heads, slots, h.shape[-1] // self.heads)
        cache = KVCache([h.new_empty(shape) for _ in self.blocks], [h.new_empty(shape) for _ in self.blocks],
                        length=0, steps=0)
        return self._run_cached(h, cache, x.shape[1]), cache

    @torch.no_grad()
    def decode(self, x_new: Tensor, cache: KVCache) -> Tensor:
        """Append steps x_new [B, L, D_in] (usually L = 1) to a cache from `prefill` -> their outputs [B, L, D_out].

        Equals the last L rows of ``forward`` on the whole sequence so far; updates ``cache`` in place.
        """
        check_features(x_new, ndim=3, in_dim=self.in_dim, layout="[B, L, D_in]", name="x_new")
        if x_new.shape[0] != cache.keys[0].shape[0]:
            raise ValueError(f"x_new has batch {x_new.shape[0]}, the cache holds batch {cache.keys[0].shape[0]}")
        if cache.length + x_new.shape[1] > cache.capacity:
            raise ValueError(f"x_new ({x_new.shape[1]} steps) does not fit the cache: {cache.steps} steps stored, "
                             f"room for {cache.capacity - cache.length} more; prefill with a larger capacity "
                             f"(at most max_len={self.max_len})")
        return self._run_cached(self._tokens(x_new, None, first_position=cache.steps), cache, x_new.shape[1])

    @torch.no_grad()
    def generate(self, prefix: Tensor, steps: int, cond: Tensor | None = None, *, use_cache: bool = True) -> Tensor:
        """Autoregressive rollout: prefix [B, P, D] (P >= 1), cond [B, C] | None -> [B, P + steps, D].

        Returns the prefix followed by `steps` predicted steps; each prediction is fed back as the
        next input. Deterministic (no sampling). With ``use_cache`` (default) the keys/values of past
        steps are cached, so each new step costs one token per block; once the sequence is longer than
        ``max_len`` every step reruns the network on the last ``max_len`` steps (positions shift, so
        the cache no longer applies). ``use_cache=False`` reruns the window at every step; both give
        the same result up to float round-off. Runs under no_grad; call `.eval()` first if the model
        has dropout.
        """
        if self.out_dim != self.in_dim:
            raise ValueError(
                f"generate needs out_dim == in_dim to feed predictions back, got {self.out_dim} != {self.in_dim}"
            )
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        self._check_inputs(prefix, cond, name="prefix")
        seq = [prefix]
        # predictions made from sequences of length P .. max_len fit the position table: cache those
        cached = min(steps, self.max_len - prefix.shape[1] + 1) if use_cache else 0
        if cached > 0:
            out, cache = self.prefill(prefix, cond, capacity=prefix.shape[1] + cached - 1)
            next_step = out[:, -1:]
            for i in range(cached):
                seq.append(next_step)
                if i < cached - 1:
                    next_step = self.decode(next_step, cache)
        window = torch.cat(seq, dim=1)
        for _ in range(steps - cached):
            next_step = self(window[:, -self.max_len :], cond)[:, -1:]
            window = torch.cat([window, next_step], dim=1)
        return window

    def _tokens(self, x: Tensor, cond: Tensor | None, first_position: int) -> Tensor:
        """Embedded steps at positions first_position.. (after the condition token when first_position = 0)."""
        h = self.embed(x) + self.pos[:, first_position : first_position + x.shape[1]]
        if self.cond_dim is not None and first_position == 0:
            h = torch.cat([self._cond_token(cond, h)[:, None], h], dim=1)
        return self.drop(h)

    def _run_cached(self, h: Tensor, cache: KVCache, new_steps: int) -> Tensor:
        """Tokens h [B, L, W] through every block at slots cache.length.. -> the new steps' outputs."""
        start = cache.length
        for block, keys, values in zip(self.blocks, cache.keys, cache.values):
            h = block.forward_cached(h, keys, values, start)
        cache.length += h.shape[1]
        cache.steps += new_steps
        return self._predict(h, has_cond_token=self.cond_dim is not None and start == 0)

    def _predict(self, h: Tensor, has_cond_token: bool) -> Tensor:
        """Final norm and head; the condition token's own output is dropped."""
        out = self.head(self.final_norm(h))
        return out[:, 1:] if has_cond_token else out

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
