"""Scene encoder for the driving policies: observation dict -> scene tokens (VectorNet/PointNet-lite + transformer).

Tokens are laid out as [ego+command | N agents | M lanes]; every observation is in the ego frame (see the
driving contract in ``trajgen.envs.driving.observation``). Padded agents and lanes never influence a valid
token: they are masked as attention keys, and their own outputs are zeroed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from trajgen.nets.layers import Attention, FeedForward

COMMANDS: tuple[str, ...] = ("left", "straight", "right")


@dataclass(frozen=True)
class ObservationSpec:
    """Sizes of one driving observation (the contract's N_AGENTS, AGENT_FEATURES, N_LANES, LANE_POINTS, ...)."""

    n_agents: int = 16
    agent_features: int = 8
    n_lanes: int = 24
    lane_points: int = 20
    ego_features: int = 4
    n_commands: int = 3

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-sample shape of every required key."""
        return {
            "ego": (self.ego_features,),
            "command": (self.n_commands,),
            "agents": (self.n_agents, self.agent_features),
            "agents_mask": (self.n_agents,),
            "lanes": (self.n_lanes, self.lane_points, 2),
            "lanes_mask": (self.n_lanes,),
        }


def validate_observation(obs: Mapping[str, Any], spec: ObservationSpec, device: torch.device | str | None = None
                         ) -> dict[str, Tensor]:
    """Check a (batched or single) observation and return it as batched tensors on ``device``.

    Features become float32 [B, ...], masks bool [B, ...]. A single observation (``ego`` of shape [4]) gets a
    batch dim of 1. Raises ValueError naming the key and the expected shape for a missing key, a wrong
    shape, NaN/inf, a mask that is not 0/1, or a command that is not one-hot over ``COMMANDS``.
    """
    if not isinstance(obs, Mapping):
        raise TypeError(f"observation must be a dict of arrays with keys {list(spec.shapes())}, "
                         f"got {type(obs).__name__}")
    shapes = spec.shapes()
    missing = [key for key in shapes if key not in obs]
    if missing:
        raise ValueError(f"observation is missing key(s) {missing}; expected "
                         + ", ".join(f"{k!r} [B, {', '.join(map(str, s))}]" for k, s in shapes.items() if k in missing))
    tensors = {key: _as_tensor(obs[key], key, device) for key in shapes}
    unbatched = tensors["ego"].ndim == len(shapes["ego"])
    if unbatched:
        tensors = {key: value.unsqueeze(0) for key, value in tensors.items()}
    batch = tensors["ego"].shape[0]
    for key, shape in shapes.items():
        if tuple(tensors[key].shape) != (batch, *shape):
            raise ValueError(f"observation[{key!r}] must have shape [B, {', '.join(map(str, shape))}] with "
                             f"B = {batch} (from 'ego'), got {tuple(tensors[key].shape)}")
        if not bool(torch.isfinite(tensors[key]).all()):
            raise ValueError(f"observation[{key!r}] contains NaN or inf")
    for key in ("agents_mask", "lanes_mask"):
        if not bool(((tensors[key] == 0) | (tensors[key] == 1)).all()):
            raise ValueError(f"observation[{key!r}] must hold only 0 and 1 (1 = valid)")
        tensors[key] = tensors[key] != 0
    command = tensors["command"]
    one_hot = ((command == 0) | (command == 1)).all(-1) & (command.sum(-1) == 1)
    if not bool(one_hot.all()):
        row = int((~one_hot).nonzero()[0, 0])
        raise ValueError(f"observation['command'] must be one-hot over {COMMANDS}; row {row} is "
                         f"{command[row].tolist()}")
    return {key: value if value.dtype == torch.bool else value.float() for key, value in tensors.items()}


def _as_tensor(value: Any, key: str, device: torch.device | str | None) -> Tensor:
    if isinstance(value, Tensor):
        return value.to(device) if device is not None else value
    try:
        array = np.asarray(value)
        return torch.as_tensor(array, device=device)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"observation[{key!r}] must be an array or tensor, got {type(value).__name__}") from e


class EncoderLayer(nn.Module):
    """Pre-LN transformer layer with a key mask: h + Attn(LN(h)), then h + FFN(LN(h)).

    `forward(h [B, T, D], key_mask [B, T] bool) -> [B, T, D]`.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = Attention(width, heads, dropout=dropout)
        self.ffn = FeedForward(width, mlp_ratio, dropout)

    def forward(self, h: Tensor, key_mask: Tensor) -> Tensor:
        """h [B, T, D], key_mask [B, T] (True = valid) -> [B, T, D]."""
        h = h + self.attn(self.norm1(h), key_mask=key_mask)
        return h + self.ffn(self.norm2(h))


def _mlp(in_dim: int, width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, width), nn.ReLU(), nn.LayerNorm(width), nn.Linear(width, width))


class SceneEncoder(nn.Module):
    """Observation -> scene tokens [B, 1 + N + M, D] and key mask [B, 1 + N + M] (True = valid).

    Token 0 is ego state + command; agent tokens embed the 8 agent features with an MLP; lane tokens run a
    per-point MLP over (x, y, dx, dy) and max-pool over the points (PointNet / VectorNet-lite). A learned
    type embedding marks each kind, then ``layers`` transformer layers mix all valid tokens.

    Args:
        spec: observation sizes.
        width: token width D.
        layers: transformer layers.
        heads: attention heads.
        mlp_ratio: FFN hidden size / D.
        dropout: dropout in attention and FFN.
        position_scale: metres per unit of the positional inputs (positions are divided by it).
        speed_scale: m/s per unit of the speed inputs.
        lane_point_width: width of the per-point lane features before max-pooling.
    """

    def __init__(self, spec: ObservationSpec, width: int = 128, layers: int = 2, heads: int = 4,
                 mlp_ratio: float = 4.0, dropout: float = 0.0, position_scale: float = 20.0,
                 speed_scale: float = 10.0, lane_point_width: int = 64) -> None:
        super().__init__()
        self.spec, self.width = spec, width
        self.position_scale, self.speed_scale = position_scale, speed_scale
        self.ego_mlp = _mlp(spec.ego_features + spec.n_commands, width)
        self.agent_mlp = _mlp(spec.agent_features, width)
        # per-point features stay narrow: the points outnumber every other input (B x 24 x 20), and a
        # width-D per-point MLP was most of the encoder's cost for no measurable gain after max-pooling
        self.lane_point_mlp = nn.Sequential(nn.Linear(4, lane_point_width), nn.ReLU(),
                                            nn.Linear(lane_point_width, lane_point_width))
        self.lane_mlp = _mlp(lane_point_width, width)
        self.type_embedding = nn.Parameter(torch.randn(3, width) * 0.02)
        self.layers = nn.ModuleList(EncoderLayer(width, heads, mlp_ratio, dropout) for _ in range(layers))
        self.out_norm = nn.LayerNorm(width)
        # input scales as device buffers (not rebuilt from Python lists per call: that is a host-to-device copy,
        # which a CUDA graph cannot hold); non-persistent, so checkpoints are unchanged
        self.register_buffer("ego_scale", torch.tensor([1.0 / speed_scale, 1.0 / 3.0, 1.0, 1.0]), persistent=False)
        agent_scale = torch.ones(spec.agent_features)
        agent_scale[:2] = 1.0 / position_scale
        agent_scale[4:6] = 1.0 / speed_scale
        agent_scale[6:8] = 0.2
        self.register_buffer("agent_scale", agent_scale, persistent=False)

    @property
    def agent_slice(self) -> slice:
        """Where the agent tokens sit in the token axis."""
        return slice(1, 1 + self.spec.n_agents)

    @property
    def lane_slice(self) -> slice:
        """Where the lane tokens sit in the token axis."""
        return slice(1 + self.spec.n_agents, 1 + self.spec.n_agents + self.spec.n_lanes)

    def forward(self, obs: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """obs (contract keys, [B, ...] or one sample) -> (tokens [B, T, D], key_mask [B, T] bool), T = 1 + N + M.

        Validates ``obs`` (host syncs), then :meth:`encode`."""
        return self.encode(validate_observation(obs, self.spec, self.type_embedding.device))

    def encode(self, obs: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Validated observation tensors (``validate_observation``'s output on this module's device)
        -> (tokens [B, T, D], key_mask [B, T] bool). No checks and no host sync: CUDA-graph capturable."""
        ego = self.ego_mlp(torch.cat([self._scale_ego(obs["ego"]), obs["command"]], dim=-1))[:, None]
        agents = self.agent_mlp(self._scale_agents(obs["agents"]))
        lanes = self._encode_lanes(obs["lanes"])
        tokens = torch.cat([ego + self.type_embedding[0], agents + self.type_embedding[1],
                            lanes + self.type_embedding[2]], dim=1)
        mask = torch.cat([torch.ones_like(obs["agents_mask"][:, :1]), obs["agents_mask"], obs["lanes_mask"]], dim=1)
        tokens = tokens * mask[..., None]  # padded inputs are not even looked at
        for layer in self.layers:
            tokens = layer(tokens, mask)
        return self.out_norm(tokens) * mask[..., None], mask

    def _scale_ego(self, ego: Tensor) -> Tensor:
        """(speed, accel, steer, yaw rate) -> roughly unit-scale features."""
        return ego * self.ego_scale

    def _scale_agents(self, agents: Tensor) -> Tensor:
        """(x, y, cos, sin, vx, vy, length, width) -> roughly unit-scale features (extra features pass as is)."""
        return agents * self.agent_scale

    def _encode_lanes(self, lanes: Tensor) -> Tensor:
        """[B, M, P, 2] centre-lines -> [B, M, D]: per-point MLP over (x, y, dx, dy), max over points."""
        points = lanes / self.position_scale
        direction = torch.diff(points, dim=-2, append=points[..., -1:, :] * 2 - points[..., -2:-1, :])
        features = self.lane_point_mlp(torch.cat([points, direction * 10.0], dim=-1))
        return self.lane_mlp(features.amax(dim=-2))
