"""Driving planners (issue 4): truncated anchored diffusion (DiffusionDrive), vanilla diffusion, regression.

All three read the same ego-frame observation (``trajgen.policies.scene_encoder``) and output a plan of
``horizon`` poses (x, y, heading) at 0.5 s spacing; they share one API (:class:`DrivingPolicy`):
``loss(batch) -> {"loss": ...}``, ``plan(obs) -> DrivingPlan``, ``nfe``, ``save`` / ``load``.

- :class:`AnchoredDiffusionPolicy` (Liao et al. 2025, DiffusionDrive): the (x, y) waypoints of K k-means
  anchors are noised to a small step (t < 50 of a 1000-step scaled-linear DDPM schedule in training, step 8 at
  inference) and a 2-stage cascade decoder predicts the clean waypoints, a heading per pose and a confidence per
  anchor; sampling is 2 DDIM steps (x0 prediction) through ``trajgen.solvers`` and the most confident anchor's
  plan is returned.
- :class:`VanillaDiffusionPolicy`: a DiT-1d denoiser with cross-attention to the scene tokens, full-range
  diffusion, 20 DDIM steps from pure noise.
- :class:`RegressionPolicy`: one learned query attending to the scene, an MLP head, L1 loss (Transfuser's head).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from trajgen.diffusion.losses import DiffusionLoss, sample_times
from trajgen.diffusion.schedules import VPDiscrete
from trajgen.nets.dit1d import DiT1d, modulate
from trajgen.nets.embeddings import TimeEmbedding
from trajgen.nets.layers import Attention
from trajgen.nets.unet1d import TemporalUnet1d
from trajgen.policies._config import check_scalar_fields
from trajgen.policies.anchors import TrajectoryNormalizer, nearest_anchor
from trajgen.policies.scene_encoder import ObservationSpec, SceneEncoder, validate_observation
from trajgen.solvers import Sampler

POSE_DIM = 3  # (x, y, heading): the contract's plan format, not a tunable size
OBSERVATION_KEYS = ("ego", "command", "agents", "agents_mask", "lanes", "lanes_mask")


# ---------------------------------------------------------------------------------------------- configs


@dataclass
class DrivingPolicyConfig:
    """What every driving policy shares: observation sizes, scene encoder, plan coordinates."""

    n_agents: int = 16
    """agent tokens per observation (N_AGENTS)"""
    agent_features: int = 8
    """features per agent (AGENT_FEATURES)"""
    n_lanes: int = 24
    """lane polylines per observation (N_LANES)"""
    lane_points: int = 20
    """points per lane polyline (LANE_POINTS)"""
    ego_features: int = 4
    """ego state size (EGO_FEATURES)"""
    n_commands: int = 3
    """route commands (len(COMMANDS))"""
    horizon: int = 8
    """poses per plan (HORIZON_POSES)"""
    d_model: int = 128
    """token width of the scene encoder and the decoders"""
    heads: int = 4
    """attention heads"""
    encoder_layers: int = 2
    """transformer layers over the scene tokens"""
    mlp_ratio: float = 4.0
    """FFN hidden size / d_model"""
    dropout: float = 0.0
    """dropout in attention and FFNs"""
    position_scale: float = 20.0
    """metres per unit of positional inputs to the encoder"""
    speed_scale: float = 10.0
    """m/s per unit of speed inputs to the encoder"""
    norm_low: tuple[float, float, float] = (-5.0, -35.0, -2.0)
    """(x, y, heading) that map to -1 (DiffusionDrive's norm_odo; see anchors.trajectory_bounds)"""
    norm_high: tuple[float, float, float] = (65.0, 35.0, 2.0)
    """(x, y, heading) that map to +1"""

    def __post_init__(self) -> None:
        self.norm_low = tuple(float(v) for v in self.norm_low)  # type: ignore[assignment]
        self.norm_high = tuple(float(v) for v in self.norm_high)  # type: ignore[assignment]
        check_scalar_fields(self)
        positive = ["n_agents", "agent_features", "n_lanes", "ego_features", "n_commands", "horizon", "d_model",
                    "heads", "position_scale", "speed_scale"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{type(self).__name__}.{name} must be > 0, got {getattr(self, name)}")
        if self.lane_points < 2:
            raise ValueError(f"lane_points must be >= 2, got {self.lane_points}")
        if self.d_model % self.heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by heads={self.heads}")

    @property
    def observation_spec(self) -> ObservationSpec:
        """The observation sizes as an :class:`ObservationSpec`."""
        return ObservationSpec(self.n_agents, self.agent_features, self.n_lanes, self.lane_points,
                               self.ego_features, self.n_commands)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    predated_values: ClassVar[dict[str, Any]] = {}
    """values of fields added after files were saved, for dicts that lack them, where the field's default is not
    what those files did (the other missing fields take their defaults)"""

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DrivingPolicyConfig:
        """Inverse of :meth:`to_dict`; unknown fields raise ValueError. A saved dict without a field of
        ``predated_values`` gets that value."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}")
        return cls(**{**cls.predated_values, **values})

    def differences(self, other: DrivingPolicyConfig) -> list[tuple[str, Any, Any]]:
        """(field, this value, ``other``'s value) for every field whose values differ (as in :meth:`to_dict`)."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [(k, mine.get(k), v) for k, v in theirs.items() if mine.get(k) != v]


ANCHOR_HEADINGS = ("predicted", "diffused")


@dataclass
class AnchoredDiffusionConfig(DrivingPolicyConfig):
    """Truncated anchored diffusion (DiffusionDrive's defaults)."""

    n_anchors: int = 20
    """K anchors (k-means clusters of the training plans)"""
    stages: int = 2
    """cascade decoder stages; stage s + 1 refines stage s's plans"""
    diffusion_steps: int = 1000
    """steps of the DDPM scaled-linear schedule"""
    beta_start: float = 1e-4
    """first beta of the schedule"""
    beta_end: float = 0.02
    """last beta of the schedule"""
    truncation_steps: int = 50
    """training draws step n uniformly in [0, truncation_steps)"""
    start_step: int = 8
    """inference noises the anchors to this 0-based step (t = (start_step + 1) / diffusion_steps)"""
    steps: int = 2
    """solver steps at inference (each one network call of the whole cascade)"""
    solver: str = "ddim"
    """trajgen.solvers name"""
    t_end: float = 0.0
    """where sampling ends (0 = clean: the last step returns the network's x0 prediction)"""
    cls_weight: float = 10.0
    """weight of the focal classification loss (DiffusionDrive: 10)"""
    reg_weight: float = 8.0
    """weight of the L1 regression loss (DiffusionDrive: 8)"""
    focal_gamma: float = 2.0
    """focal loss gamma"""
    focal_alpha: float = 0.25
    """focal loss alpha (weight of the positive class)"""
    cls_prior: float = 0.01
    """initial confidence of every anchor (classifier bias = logit of it)"""
    point_embedding_dim: int = 32
    """sinusoidal features per pose coordinate in the anchor-query embedding"""
    heading: str = "predicted"
    """'predicted' (DiffusionDrive): the diffusion runs over the (x, y) waypoints only and every decoder stage
    regresses the heading outright, as pi * tanh; 'diffused': the heading is a third diffused coordinate that each
    stage refines by an offset, as x and y (trajgen's first version: its decoder learned to pass the start noise
    through to the heading, about 0.05 rad per pose)"""

    waypoint_map_features: bool = True
    """each decoder stage also reads, for every waypoint of every plan, its offset from the nearest lane centre-line
    point and that lane's direction (see :func:`waypoint_lane_features`): the vector-map counterpart of DiffusionDrive's
    BEV features sampled at each plan's points, which its decoder has and global attention to lane tokens lacks"""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.heading not in ANCHOR_HEADINGS:
            raise ValueError(f"AnchoredDiffusionConfig.heading must be one of {ANCHOR_HEADINGS}, got "
                             f"{self.heading!r}")
        if self.n_anchors < 1 or self.stages < 1 or self.steps < 1:
            raise ValueError(f"n_anchors, stages, steps must be >= 1, got {self.n_anchors}, {self.stages}, "
                             f"{self.steps}")
        if not 0 <= self.start_step < self.diffusion_steps or not 0 < self.truncation_steps <= self.diffusion_steps:
            raise ValueError(f"need 0 <= start_step < diffusion_steps and 0 < truncation_steps <= diffusion_steps, "
                             f"got {self.start_step}, {self.truncation_steps}, {self.diffusion_steps}")
        if self.point_embedding_dim < 2 or self.point_embedding_dim % 2:
            raise ValueError(f"point_embedding_dim must be even and >= 2, got {self.point_embedding_dim}")

    # every anchored policy saved before these fields worked this way
    predated_values: ClassVar[dict[str, Any]] = {"heading": "diffused", "waypoint_map_features": False}

    @property
    def diffused_dims(self) -> int:
        """Pose coordinates the diffusion runs over: 2 (x, y) when the heading is predicted, else 3."""
        return 2 if self.heading == "predicted" else POSE_DIM


VANILLA_DENOISERS = ("dit", "unet")


@dataclass
class VanillaDiffusionConfig(DrivingPolicyConfig):
    """Full-range diffusion over the plan with a DiT-1d or a temporal U-Net denoiser."""

    denoiser: str = "dit"
    """'dit': DiT-1d, adaLN on the ego token and cross-attention to every scene token; 'unet': Diffusion Policy's
    conditional 1-D U-Net (``TemporalUnet1d``), DiffusionDrive's TransfuserDP baseline: it replaces the regression
    MLP head on the same input (a learned plan query pooled over the scene, with the ego token) as its FiLM
    condition"""
    denoiser_width: int = 128
    """DiT token width"""
    denoiser_depth: int = 3
    """DiT blocks"""
    unet_base_dim: int = 16
    """U-Net channels of the first level (denoiser='unet')"""
    unet_dim_mults: tuple[int, ...] = (1, 2, 4)
    """U-Net channel multiplier per level (denoiser='unet'; Diffusion Policy's down_dims are 1:2:4)"""
    prediction: str = "eps"
    """what the denoiser predicts: 'eps', 'x0' or 'v'"""
    diffusion_steps: int = 1000
    """steps of the DDPM scaled-linear schedule"""
    beta_start: float = 1e-4
    """first beta of the schedule"""
    beta_end: float = 0.02
    """last beta of the schedule"""
    steps: int = 20
    """solver steps from pure noise"""
    solver: str = "ddim"
    """trajgen.solvers name"""
    t_end: float = 0.0
    """where sampling ends"""
    n_modes: int = 1
    """samples per observation drawn by ``plan`` (the plan is the first); a decision needs one, so more only
    cost time -- ask ``plan(obs, n_modes=20)`` for the modes (mode diversity)"""
    clip_sample: bool = True
    """clip the sampled normalised plan to [-1, 1] (Diffusion Policy's clip_sample)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.unet_dim_mults = tuple(int(m) for m in self.unet_dim_mults)  # type: ignore[assignment]
        if self.denoiser not in VANILLA_DENOISERS:
            raise ValueError(f"VanillaDiffusionConfig.denoiser must be one of {VANILLA_DENOISERS}, got "
                             f"{self.denoiser!r}")


@dataclass
class RegressionConfig(DrivingPolicyConfig):
    """Deterministic regression (Transfuser-style MLP head)."""

    head_hidden: int = 256
    """hidden width of the MLP head"""
    head_layers: int = 2
    """hidden layers of the MLP head"""


@dataclass
class DrivingPlan:
    """A policy's decision for a batch: ``trajectory`` [B, H, 3] ego-frame poses; ``modes`` [B, K, H, 3] and
    ``scores`` [B, K] (confidence per mode) when the policy has them, else None."""

    trajectory: Tensor
    modes: Tensor | None = None
    scores: Tensor | None = None


def check_plan_finite(decision: DrivingPlan) -> None:
    """Raise ValueError when a decision's plan (or any of its modes) holds NaN or inf (one host sync)."""
    values = decision.modes if decision.modes is not None else decision.trajectory
    if not bool(torch.isfinite(values).all()):
        raise ValueError("the policy produced a plan with NaN or inf: check the weights and the observation")


# ---------------------------------------------------------------------------------------------- base class


class DrivingPolicy(nn.Module):
    """Scene encoder + plan head; subclasses give ``loss``, ``_plan`` and ``nfe``.

    ``forward(batch)`` is ``loss(batch)`` so a Trainer (and DDP) can call the module directly.
    A batch is the observation keys ([B, ...]) plus ``"trajectory"`` [B, H, 3], the expert's plan.
    """

    algorithm: ClassVar[str] = ""
    config_class: ClassVar[type[DrivingPolicyConfig]] = DrivingPolicyConfig

    def __init__(self, config: DrivingPolicyConfig) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got "
                             f"{type(config).__name__}")
        self.config = config
        self.encoder = SceneEncoder(config.observation_spec, config.d_model, config.encoder_layers, config.heads,
                                    config.mlp_ratio, config.dropout, config.position_scale, config.speed_scale)
        self.normalizer = TrajectoryNormalizer(config.norm_low, config.norm_high)

    @property
    def nfe(self) -> int:
        """Network evaluations (denoising steps) per decision."""
        return 1

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Same as :meth:`loss`."""
        return self.loss(batch)

    def loss(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Training loss on a batch: {"loss": scalar, **scalar metrics}."""
        raise NotImplementedError

    def plan(self, obs: Mapping[str, Any], generator: torch.Generator | None = None, **kwargs: Any) -> DrivingPlan:
        """Plans for a batch of observations ([B, ...], or one unbatched observation -> B = 1), under
        ``torch.inference_mode`` (the returned tensors are inference tensors: ``clone()`` them to use them in
        autograd) and in eval mode (a policy in training mode is switched back afterwards).

        The observation is validated once here; :meth:`_plan` then runs on device tensors with no host sync
        (the same code a CUDA graph captures, see :meth:`cuda_graph`), and the plan is checked for NaN / inf.
        """
        # Switching modes walks every submodule (~0.3 ms each way at batch 1 on a CPU), so a policy that is
        # already in eval mode, as in a control loop, skips it.
        was_training = self.training
        if was_training:
            self.eval()
        try:
            with torch.inference_mode():
                decision = self._plan(self.observation_tensors(obs), generator, **kwargs)
        finally:
            if was_training:
                self.train()
        check_plan_finite(decision)
        return decision

    def observation_tensors(self, obs: Mapping[str, Any]) -> dict[str, Tensor]:
        """``validate_observation`` for this policy: batched tensors [B, ...] on ``self.device``. Host inputs
        (numpy, CPU tensors) are checked on the host and then copied, so a CUDA policy pays no device syncs."""
        on_host = not isinstance(obs, Mapping) or all(not isinstance(v, Tensor) or v.device.type == "cpu"
                                                      for v in obs.values())
        device = self.device
        tensors = validate_observation(obs, self.config.observation_spec, "cpu" if on_host else device)
        return {k: v.to(device) for k, v in tensors.items()}

    def _plan(self, obs: Mapping[str, Tensor], generator: torch.Generator | None, **kwargs: Any) -> DrivingPlan:
        """Validated observation tensors [B, ...] on ``self.device`` -> the decision. Subclasses keep this free of
        host syncs (no ``bool()``, ``.item()``, ``.cpu()``) and of CPU tensors, so a CUDA graph can hold it."""
        raise NotImplementedError

    def cuda_graph(self, obs: Mapping[str, Any], *, warmup: int = 2, **kwargs: Any) -> GraphedPlanner:
        """Capture the whole decision (scene encoder, sampler, mode choice) for observations shaped like ``obs``
        ([B, ...] or one unbatched observation) in one CUDA graph; see :class:`GraphedPlanner`.

        The policy must be on a CUDA device. Diffusion noise comes from the default CUDA generator, which
        graphs replay with fresh values; ``kwargs`` go to ``_plan`` (e.g. ``n_modes`` for the vanilla policy).
        """
        return GraphedPlanner(self, obs, warmup=warmup, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _split_batch(self, batch: Mapping[str, Any]) -> tuple[dict[str, Tensor], Tensor]:
        """Validated observation tensors and the expert plan [B, H, 3]."""
        if not isinstance(batch, Mapping) or "trajectory" not in batch:
            raise ValueError(f"a training batch needs the observation keys and 'trajectory' [B, "
                             f"{self.config.horizon}, 3]; got {list(batch) if isinstance(batch, Mapping) else batch}")
        obs = validate_observation(batch, self.config.observation_spec, self.device)
        trajectory = torch.as_tensor(batch["trajectory"], device=self.device).float()
        expected = (obs["ego"].shape[0], self.config.horizon, POSE_DIM)
        if tuple(trajectory.shape) != expected:
            raise ValueError(f"batch['trajectory'] must have shape [B, H, 3] = {list(expected)}, got "
                             f"{tuple(trajectory.shape)}")
        if not bool(torch.isfinite(trajectory).all()):
            raise ValueError("batch['trajectory'] contains NaN or inf")
        return obs, trajectory

    # ------------------------------------------------------------------ checkpoints

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write weights (safetensors) with the algorithm name and config in the metadata; returns the path."""
        from trajgen.training.checkpoint import _plain_state_dict, atomic_write_bytes

        metadata = {"format": "pt", "algorithm": self.algorithm, "config": json.dumps(self.config.to_dict())}
        data = safetensors.torch.save(_plain_state_dict(self.state_dict()), metadata=metadata)
        atomic_write_bytes(path, data)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> DrivingPolicy:
        """A policy rebuilt from a :meth:`save` file, in eval mode (the Trainer switches it back to train mode to
        fine-tune). On ``DrivingPolicy`` any algorithm loads; on a subclass a checkpoint of another algorithm raises
        ValueError."""
        algorithm, config_values, state = _read_policy_file(path)
        if cls is DrivingPolicy:
            if algorithm not in POLICIES:
                raise ValueError(f"{path}: unknown policy algorithm {algorithm!r}; expected one of {sorted(POLICIES)}")
            target = POLICIES[algorithm]
        elif algorithm != cls.algorithm:
            raise ValueError(f"{path} holds a {algorithm!r} policy, not {cls.algorithm!r}; load it with "
                             f"{POLICIES[algorithm].__name__ if algorithm in POLICIES else 'DrivingPolicy'}.load")
        else:
            target = cls
        policy = target(target.config_class.from_dict(config_values))
        policy._load_state(state, str(path))
        return policy.to(map_location).eval()

    def load_weights(self, path: str | os.PathLike[str]) -> DrivingPolicy:
        """Load a :meth:`save` file into this policy; another algorithm or a different config (anchor count,
        sizes) raises ValueError saying which fields differ."""
        algorithm, config_values, state = _read_policy_file(path)
        if algorithm != self.algorithm:
            raise ValueError(f"{path} holds a {algorithm!r} policy; this policy is {self.algorithm!r}")
        differ = self.differences_from(algorithm, config_values)
        if differ:
            raise ValueError(f"{path} was saved with a different config (checkpoint vs policy): " + "; ".join(differ))
        self._load_state(state, str(path))
        return self

    def differences_from(self, algorithm: str, config_values: Mapping[str, Any], anchors: Tensor | None = None
                         ) -> list[str]:
        """How this policy is built differently from one saved as (``algorithm``, ``config_values`` as in
        ``config.to_dict()``, ``anchors`` [K, H, 3] or None): "field: saved vs this" for each differing config field
        (fields the saved dict predates take their defaults, or their ``predated_values``), and the anchors when they
        differ by more than 1e-3 m (k-means centroids may differ by float round-off between BLAS thread counts, never
        by metres). Empty when the two match."""
        if algorithm != self.algorithm:
            return [f"algorithm {algorithm!r} vs {self.algorithm!r}"]
        saved = self.config_class.from_dict(config_values)
        differences = [f"{k}: {a!r} vs {b!r}" for k, a, b in saved.differences(self.config)]
        mine = getattr(self, "anchors", None)
        if (anchors is not None and mine is not None and anchors.shape == mine.shape
                and not torch.allclose(anchors.cpu(), mine.cpu(), atol=1e-3)):
            differences.append("anchors (another training set or k-means seed)")
        return differences

    renamed_parameters: ClassVar[dict[str, str]] = {}
    """old -> new parameter-name prefixes: checkpoints written before a rename load under the new names"""

    def _load_state(self, state: dict[str, Tensor], source: str) -> None:
        state = {_renamed(key, self.renamed_parameters): value for key, value in state.items()}
        own = self.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                 if k in state and state[k].shape != v.shape]
        if missing or unexpected or wrong:
            raise ValueError(f"{source} does not match {type(self).__name__}: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}, shape mismatch {wrong[:5]}")
        self.load_state_dict(state)


class GraphedPlanner:
    """A driving policy's whole decision (scene encoder, sampler, mode choice) captured in one CUDA graph for a
    fixed batch size B; build it with :meth:`DrivingPolicy.cuda_graph`.

    ``graphed(obs)`` checks a new observation on the host (numpy or CPU tensors, the shapes given at capture),
    copies it into the graph's static input tensors, replays the graph and returns a :class:`DrivingPlan` of
    fresh device tensors: trajectory [B, H, 3] (and modes [B, K, H, 3], scores [B, K] when the policy has
    them), checked for NaN / inf. Diffusion noise is drawn inside the graph from the default CUDA generator,
    so every replay gets fresh noise. The policy's weights are read in place: load new weights with
    ``load_state_dict`` (not by rebuilding the policy) and the graph uses them.
    """

    def __init__(self, policy: DrivingPolicy, obs: Mapping[str, Any], *, warmup: int = 2, **kwargs: Any) -> None:
        if not isinstance(policy, DrivingPolicy):
            raise TypeError(f"policy must be a DrivingPolicy, got {type(policy).__name__}")
        device = policy.device
        if device.type != "cuda":
            raise ValueError(f"cuda_graph needs the policy on a CUDA device (policy.to('cuda')), got {device}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an integer >= 1, got {warmup!r}")
        self.policy = policy.eval()
        self.spec = policy.config.observation_spec
        self.static_obs = {k: v.clone() for k, v in policy.observation_tensors(obs).items()}
        self.batch_size = self.static_obs["ego"].shape[0]

        def run() -> DrivingPlan:
            with torch.no_grad():
                return policy._plan(self.static_obs, None, **kwargs)

        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):  # allocates the sampler's buffers and the lazily built constants
                run()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_plan = run()

    def __call__(self, obs: Mapping[str, Any]) -> DrivingPlan:
        """New observation ([B, ...] or one unbatched observation when B = 1) -> the decision (device tensors)."""
        tensors = validate_observation(obs, self.spec, "cpu")
        batch = tensors["ego"].shape[0]
        if batch != self.batch_size:
            raise ValueError(f"the graph was captured for batch {self.batch_size}, got an observation batch of {batch}")
        for key, value in tensors.items():
            self.static_obs[key].copy_(value)
        self.graph.replay()
        out = self.static_plan
        decision = DrivingPlan(out.trajectory.clone(), None if out.modes is None else out.modes.clone(),
                               None if out.scores is None else out.scores.clone())
        check_plan_finite(decision)
        return decision


def _renamed(key: str, prefixes: Mapping[str, str]) -> str:
    """``key`` with the first matching old prefix replaced by its new one."""
    for old, new in prefixes.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _read_policy_file(path: str | os.PathLike[str]) -> tuple[str, dict[str, Any], dict[str, Tensor]]:
    """(algorithm, config dict, state dict) of a policy file, or ValueError."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no policy file at {path}")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    if "algorithm" not in metadata or "config" not in metadata:
        raise ValueError(f"{path} has no policy metadata (algorithm, config); was it written by DrivingPolicy.save?")
    return metadata["algorithm"], json.loads(metadata["config"]), state


# ---------------------------------------------------------------------------------------------- losses


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, gamma: float = 2.0, alpha: float = 0.25) -> Tensor:
    """Elementwise sigmoid focal loss (Lin et al. 2017): -alpha_t (1 - p_t)^gamma log p_t.

    logits, targets: [...] (targets in {0, 1}); p_t = sigmoid(logit) for a positive, 1 - sigmoid for a
    negative; alpha_t = alpha for a positive, 1 - alpha for a negative. Returns [...] (unreduced).
    """
    targets = targets.to(logits.dtype)
    p = torch.sigmoid(logits)
    one_minus_pt = p * (1 - targets) + (1 - p) * targets
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return alpha_t * one_minus_pt.pow(gamma) * bce


# ---------------------------------------------------------------------------------------------- anchored diffusion


def sine_embedding(values: Tensor, dim: int) -> Tensor:
    """Sinusoidal features of coordinates (DAB-DETR / DiffusionDrive): [...] -> [..., dim], frequencies
    2 pi / 10000^(i / (dim / 2)) per unit, i < dim / 2."""
    args = values[..., None] * _sine_frequencies(dim, values.device, values.dtype)
    return torch.cat([args.sin(), args.cos()], dim=-1)


@functools.lru_cache(maxsize=16)
def _sine_frequencies(dim: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    half = dim // 2
    return 2 * math.pi / 10000 ** (torch.arange(half, device=device, dtype=dtype) / half)


class AnchorQueryEncoder(nn.Module):
    """Plans [B, K, H, C] (metres, radians; C = ``coordinates``) and ``waypoint_features`` extra features per pose
    -> one query per plan [B, K, D]: sine features of every pose coordinate, with the extra ones, flattened, then
    Linear-ReLU-LN-Linear."""

    def __init__(self, horizon: int, embedding_dim: int, width: int, coordinates: int = POSE_DIM,
                 waypoint_features: int = 0) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.net = nn.Sequential(nn.Linear(horizon * (coordinates * embedding_dim + waypoint_features), width),
                                 nn.ReLU(), nn.LayerNorm(width), nn.Linear(width, width))

    def forward(self, plans: Tensor, features: Tensor | None = None) -> Tensor:
        """plans [B, K, H, C], features [B, K, H, F] or None (F = ``waypoint_features``) -> [B, K, D]."""
        embedded = sine_embedding(plans, self.embedding_dim).flatten(-2)
        if features is not None:
            embedded = torch.cat([embedded, features], dim=-1)
        return self.net(embedded.flatten(-2))


class DecoderStage(nn.Module):
    """One cascade stage (DiffusionDrive's CustomTransformerDecoderLayer, with token cross-attention):

    queries -> cross-attn to agent tokens -> cross-attn to map (ego + lane) tokens -> + ego token (DiffusionDrive's
    cross-attention to its single ego query, which is a projection of that query) -> FFN -> timestep FiLM ->
    classification logit per plan, an offset added to the stage's input (the diffused coordinates, normalised)
    and, with ``heading='predicted'``, the heading itself: pi * tanh of the head's output (DiffusionDrive).
    """

    def __init__(self, config: AnchoredDiffusionConfig, normalizer: TrajectoryNormalizer) -> None:
        super().__init__()
        width, heads = config.d_model, config.heads
        self.horizon = config.horizon
        self.predicts_heading = config.heading == "predicted"
        self.normalizer = normalizer
        self.agent_attn = Attention(width, heads, dropout=config.dropout)
        self.map_attn = Attention(width, heads, dropout=config.dropout)
        self.ego_proj = nn.Linear(width, width)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        hidden = int(width * config.mlp_ratio)
        self.ffn = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width))
        self.film = nn.Sequential(nn.Mish(), nn.Linear(width, 2 * width))
        nn.init.zeros_(self.film[1].weight)  # starts as the identity (DiffusionDrive's if_zeroinit_scale, DiT's adaLN-Zero)
        nn.init.zeros_(self.film[1].bias)
        self.cls_head = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.LayerNorm(width),
                                      nn.Linear(width, width), nn.ReLU(), nn.LayerNorm(width), nn.Linear(width, 1))
        nn.init.constant_(self.cls_head[-1].bias, -math.log((1 - config.cls_prior) / config.cls_prior))
        self.reg_head = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                      nn.Linear(width, config.horizon * POSE_DIM))

    def forward(self, query: Tensor, plans: Tensor, scene: SceneContext, time_emb: Tensor, decide: bool = True
                ) -> tuple[Tensor, Tensor, Tensor | None]:
        """query [B, K, D], plans [B, K, H, C] (the C diffused coordinates, normalised), time_emb [B, D]
        -> (features [B, K, D], clean plans [B, K, H, 3] normalised, logits [B, K]). Without ``decide`` the outputs
        only a decision reads are skipped: the logits are None and a predicted heading is left out ([B, K, H, C])."""
        h = self.norm1(query + self.agent_attn(query, scene.agents, key_mask=scene.agents_mask))
        h = self.norm2(h + self.map_attn(h, scene.map, key_mask=scene.map_mask) + self.ego_proj(scene.map[:, :1]))
        h = self.norm3(h + self.ffn(h))
        shift, scale = self.film(time_emb).chunk(2, dim=-1)
        h = modulate(h, shift, scale)
        raw = self.reg_head(h).unflatten(-1, (self.horizon, POSE_DIM))
        if not self.predicts_heading:
            return h, plans + raw, self.cls_head(h).squeeze(-1) if decide else None
        clean = plans + raw[..., :2]
        if not decide:
            return h, clean, None
        heading = self.normalizer.normalize(math.pi * torch.tanh(raw[..., 2:]), first=2)
        return h, torch.cat([clean, heading], dim=-1), self.cls_head(h).squeeze(-1)


@dataclass
class SceneContext:
    """Encoded scene split for the decoder: agent tokens [B, N, D] and map (ego + lane) tokens [B, 1 + M, D],
    each with a key mask (True = valid); with ``lanes``, the lane centre-line points for waypoint features."""

    agents: Tensor
    agents_mask: Tensor
    map: Tensor
    map_mask: Tensor
    lanes: LanePoints | None = None

    @classmethod
    def split(cls, tokens: Tensor, mask: Tensor, encoder: SceneEncoder, lanes: LanePoints | None = None
              ) -> SceneContext:
        agents, lane_tokens = encoder.agent_slice, encoder.lane_slice
        map_tokens = torch.cat([tokens[:, :1], tokens[:, lane_tokens]], dim=1)
        map_mask = torch.cat([mask[:, :1], mask[:, lane_tokens]], dim=1)
        return cls(tokens[:, agents], mask[:, agents], map_tokens, map_mask, lanes)


WAYPOINT_FEATURES = 4
"""per waypoint: (lateral, longitudinal) offset from the nearest lane point in that lane's frame, the lane's direction"""
WAYPOINT_OFFSET_SCALE = 2.0
"""metres per unit of the waypoint offsets (a lane is 3.5 m wide: its edges are at +-0.875)"""
WAYPOINT_MAX_OFFSET = 5.0
"""offsets are clamped to +-this many units (10 m): farther than that, only the sign matters"""


@dataclass
class LanePoints:
    """Every lane centre-line point of a batch of observations, flattened (L = M * P), as a nearest-point search needs
    them: ``points`` [B, L, 2] (metres, ego frame), ``squared_norms`` [B, L] (|point|^2, inf where the point is not
    valid) and ``frames`` [B, L, 8]: the point, the rows of the rotation into its lane's frame (lateral, along)
    divided by WAYPOINT_OFFSET_SCALE, and the lane's unit direction; all zero where the point is not valid. A point is
    valid on a valid lane unless it repeats the lane's end point (there its tangent vanishes)."""

    points: Tensor
    squared_norms: Tensor
    frames: Tensor

    @classmethod
    def from_observation(cls, lanes: Tensor, lanes_mask: Tensor) -> LanePoints:
        """lanes [B, M, P, 2], lanes_mask [B, M] bool -> the flattened points with central-difference tangents."""
        tangents = torch.cat([lanes[..., 1:2, :] - lanes[..., :1, :], lanes[..., 2:, :] - lanes[..., :-2, :],
                              lanes[..., -1:, :] - lanes[..., -2:-1, :]], dim=-2)
        length = tangents.norm(dim=-1, keepdim=True)
        valid = ((length[..., 0] > 1e-3) & lanes_mask[..., None]).flatten(1, 2)
        cos, sin = (tangents / length.clamp_min(1e-3)).flatten(1, 2).unbind(-1)
        points = lanes.flatten(1, 2)
        # (lateral, along) = rotation @ offset: lateral = cos * dy - sin * dx (left of the lane), along = cos * dx + sin * dy
        rotation = torch.stack([-sin, cos, cos, sin], dim=-1) / WAYPOINT_OFFSET_SCALE
        frames = torch.cat([points, rotation, torch.stack([cos, sin], dim=-1)], dim=-1) * valid[..., None]
        squared_norms = torch.where(valid, points.square().sum(-1), torch.full_like(points[..., 0], math.inf))
        return cls(points, squared_norms, frames)


def waypoint_lane_features(waypoints: Tensor, lanes: LanePoints) -> Tensor:
    """Where each waypoint lies relative to the lanes: waypoints [B, K, H, 2] (metres, ego frame) -> [B, K, H, 4].

    Per waypoint: its offset from the nearest valid lane point in that lane's frame (lateral: left of the lane
    positive; longitudinal: along it), in units of WAYPOINT_OFFSET_SCALE metres clamped to +-WAYPOINT_MAX_OFFSET, then
    the lane's unit direction (ego frame). A scene without a valid lane point gives zeros.
    """
    batch, modes, horizon, _ = waypoints.shape
    flat = waypoints.reshape(batch, modes * horizon, 2)
    # argmin over points of |w - q|^2 = |w|^2 + (|q|^2 - 2 w.q), and |w|^2 is the same for every q
    distance = torch.baddbmm(lanes.squared_norms[:, None, :], flat, lanes.points.transpose(1, 2), alpha=-2.0)
    nearest = distance.argmin(dim=-1)[..., None].expand(-1, -1, lanes.frames.shape[-1])
    frame = torch.gather(lanes.frames, 1, nearest)  # [B, K * H, 8]; zeros when the scene has no valid point
    offset = flat - frame[..., :2]
    offsets = (frame[..., 2:6].unflatten(-1, (2, 2)) @ offset[..., None])[..., 0]
    features = torch.cat([offsets.clamp(-WAYPOINT_MAX_OFFSET, WAYPOINT_MAX_OFFSET), frame[..., 6:]], dim=-1)
    return features.reshape(batch, modes, horizon, WAYPOINT_FEATURES)


class CascadeDecoder(nn.Module):
    """Noisy plans -> per-stage (clean plans, logits). Stage 1 starts from the (clamped) noisy plans; stage s + 1
    from stage s's prediction of the diffused coordinates (detached, as DiffusionDrive) and its query features. Each
    stage's query embeds its input plans, with ``waypoint_map_features`` where their waypoints lie relative to the
    lanes (``scene.lanes`` is then required).

    `forward(x_t [B, K, H, C] normalised, t [B], scene) -> list over stages of (plans [B, K, H, 3], logits [B, K])`,
    C = ``config.diffused_dims`` (2: x, y; or 3 with the heading).
    """

    def __init__(self, config: AnchoredDiffusionConfig) -> None:
        super().__init__()
        self.normalizer = TrajectoryNormalizer(config.norm_low, config.norm_high)
        self.diffused_dims = config.diffused_dims
        self.reads_waypoint_features = config.waypoint_map_features
        self.query_encoder = AnchorQueryEncoder(config.horizon, config.point_embedding_dim, config.d_model,
                                                self.diffused_dims,
                                                WAYPOINT_FEATURES if self.reads_waypoint_features else 0)
        self.time_embedding = TimeEmbedding(config.d_model, activation="mish")
        self.stages = nn.ModuleList(DecoderStage(config, self.normalizer) for _ in range(config.stages))

    def forward(self, x_t: Tensor, t: Tensor, scene: SceneContext, every_stage: bool = True, decide: bool = True
                ) -> list[tuple[Tensor, Tensor | None]]:
        """Stages that do not ``decide`` (see :meth:`DecoderStage.forward`) return logits None and only the diffused
        coordinates: with ``every_stage=False`` (inference) all but the last; with ``decide=False`` all of them."""
        plans = x_t.clamp(-1.0, 1.0)
        time_emb = self.time_embedding(t)
        features: Tensor | None = None
        outputs = []
        last = len(self.stages) - 1
        for index, stage in enumerate(self.stages):
            query = self.stage_query(plans, scene)
            query = query if features is None else query + features
            features, predicted, logits = stage(query, plans, scene, time_emb,
                                                decide=decide and (every_stage or index == last))
            outputs.append((predicted, logits))
            plans = predicted[..., : self.diffused_dims].detach()
        return outputs

    def stage_query(self, plans: Tensor, scene: SceneContext) -> Tensor:
        """A stage's query from its input plans [B, K, H, C] (normalised) -> [B, K, D]: the embedding of the plans,
        with where their waypoints lie relative to the lanes (``waypoint_map_features``)."""
        metres = self.normalizer.denormalize(plans)
        if not self.reads_waypoint_features:
            return self.query_encoder(metres)
        if scene.lanes is None:
            raise ValueError("this decoder reads waypoint map features: build the SceneContext with its lanes")
        return self.query_encoder(metres, waypoint_lane_features(metres[..., :2], scene.lanes))


def _scaled_linear(steps: int, beta_start: float, beta_end: float) -> VPDiscrete:
    return VPDiscrete.scaled_linear(steps, beta_start, beta_end)


class AnchoredDiffusionPolicy(DrivingPolicy):
    """Truncated anchored diffusion (DiffusionDrive). ``anchors`` [K, H, 3] (see ``kmeans_anchors``) are a
    buffer saved with the weights; pass None only to load a checkpoint into the policy afterwards. With the default
    ``heading='predicted'`` only the anchors' (x, y) are diffused, as DiffusionDrive's [K, H, 2] plan anchors."""

    algorithm = "anchored-diffusion"
    config_class = AnchoredDiffusionConfig

    def __init__(self, config: AnchoredDiffusionConfig | None = None, anchors: Tensor | None = None) -> None:
        config = config or AnchoredDiffusionConfig()
        super().__init__(config)
        shape = (config.n_anchors, config.horizon, POSE_DIM)
        if anchors is None:
            anchors = torch.zeros(shape)
        anchors = torch.as_tensor(anchors, dtype=torch.float32)
        if tuple(anchors.shape) != shape:
            raise ValueError(f"anchors must have shape [n_anchors, horizon, 3] = {list(shape)}, got "
                             f"{tuple(anchors.shape)}")
        if not bool(torch.isfinite(anchors).all()):
            raise ValueError("anchors contain NaN or inf")
        self.register_buffer("anchors", anchors.clone())
        self.decoder = CascadeDecoder(config)
        self.schedule = _scaled_linear(config.diffusion_steps, config.beta_start, config.beta_end)
        self.sampler = Sampler(self.schedule, config.solver, config.steps, "x0", t_start=self.t_start,
                               t_end=config.t_end)
        self._alpha_start, self._sigma_start = self.schedule.coefficients(self.t_start)

    @property
    def t_start(self) -> float:
        """Continuous time of the inference start step: (start_step + 1) / diffusion_steps."""
        return float(self.schedule.time_of_step(self.config.start_step))

    @property
    def nfe(self) -> int:
        return self.sampler.nfe

    def loss(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Noise every anchor (its diffused coordinates) to one step n < truncation_steps per sample; focal loss on
        the anchor nearest the expert plan + L1 on that anchor's predicted plan (x, y, heading), summed over
        stages."""
        obs, expert = self._split_batch(batch)
        scene = self.scene_context(obs)
        batch_size, c = expert.shape[0], self.config
        anchors = self._normalized_anchors(batch_size)
        t = sample_times(self.schedule, batch_size, t_max=c.truncation_steps / c.diffusion_steps, device=self.device)
        x_t = self.schedule.add_noise(anchors, t, torch.randn_like(anchors))
        target = nearest_anchor(expert, self.anchors)
        one_hot = F.one_hot(target, c.n_anchors).float()
        total = expert.new_zeros(())
        metrics: dict[str, Tensor] = {}
        for s, (plans, logits) in enumerate(self.decoder(x_t, t, scene)):
            chosen = self.normalizer.denormalize(plans[torch.arange(batch_size), target])
            cls = sigmoid_focal_loss(logits, one_hot, c.focal_gamma, c.focal_alpha).mean()
            reg = (chosen - expert).abs().mean()
            total = total + c.cls_weight * cls + c.reg_weight * reg
            metrics[f"cls_loss_{s}"], metrics[f"reg_loss_{s}"] = cls.detach(), reg.detach()
        return {"loss": total, **metrics}

    def _plan(self, obs: Mapping[str, Tensor], generator: torch.Generator | None, noise: Tensor | None = None
              ) -> DrivingPlan:
        """Anchors noised to ``start_step`` (``noise`` [B, K, H, C] overrides the Gaussian draw, C =
        ``config.diffused_dims``), ``steps`` solver steps; the headings (when predicted) and confidences come from
        the last network call; the plan is the most confident mode.

        obs: validated tensors [B, ...] -> plan [B, H, 3], modes [B, K, H, 3], scores [B, K]. No host sync."""
        scene = self.scene_context(obs)
        anchors = self._normalized_anchors(scene.agents.shape[0])
        if noise is None:
            noise = torch.randn(anchors.shape, generator=generator, device=anchors.device)
        elif tuple(noise.shape) != tuple(anchors.shape):
            raise ValueError(f"noise must have shape [B, K, H, C] = {list(anchors.shape)}, got {tuple(noise.shape)}")
        # schedule.add_noise(anchors, t_start, noise), with the coefficients computed once on the host
        x_start = self._alpha_start * anchors + self._sigma_start * noise.to(anchors)
        last: list[tuple[Tensor, Tensor | None]] = []

        def denoiser(x_t: Tensor, t: Tensor) -> Tensor:
            # only the last call's confidences and headings are used: earlier calls skip them
            decide = len(last) == self.sampler.nfe - 1
            plans, logits = self.decoder(x_t, t.to(x_t.dtype), scene, every_stage=False, decide=decide)[-1]
            last.append((plans, logits))
            return plans[..., : x_t.shape[-1]]

        sample = self.sampler(denoiser, x_start, generator=generator, validate=False)
        last_plans, last_logits = last[-1]
        assert last_logits is not None  # the last call classifies
        modes = self.normalizer.denormalize(torch.cat([sample, last_plans[..., sample.shape[-1]:]], dim=-1))
        scores = torch.sigmoid(last_logits)
        best = scores.argmax(dim=-1)
        plan = torch.take_along_dim(modes, best[:, None, None, None], dim=1)[:, 0]
        return DrivingPlan(plan, modes, scores)

    def scene_context(self, obs: Mapping[str, Tensor]) -> SceneContext:
        """Validated observation tensors -> the decoder's scene (tokens, and lane points when the decoder reads
        waypoint map features)."""
        lanes = (LanePoints.from_observation(obs["lanes"], obs["lanes_mask"])
                 if self.config.waypoint_map_features else None)
        return SceneContext.split(*self.encoder.encode(obs), self.encoder, lanes)

    def _normalized_anchors(self, batch_size: int) -> Tensor:
        """The anchors' diffused coordinates, normalised, for a batch: [B, K, H, C]."""
        dims = self.config.diffused_dims
        return self.normalizer.normalize(self.anchors[..., :dims]).expand(batch_size, -1, -1, -1)


# ---------------------------------------------------------------------------------------------- plan query


class PlanQueryPooling(nn.Module):
    """Transfuser's planning input: one learned plan query cross-attends to the scene tokens, and its feature is
    concatenated with the ego token: `forward(tokens [B, T, D], token_mask [B, T]) -> [B, 2D]` (``out_dim`` = 2D).
    The regression head reads it, and so does the U-Net vanilla policy (TransfuserDP) as its condition."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.out_dim = 2 * width
        self.query = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.attn = Attention(width, heads, dropout=dropout)
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: Tensor, token_mask: Tensor) -> Tensor:
        query = self.query.expand(tokens.shape[0], -1, -1)
        feature = self.norm(query + self.attn(query, tokens, key_mask=token_mask))[:, 0]
        return torch.cat([feature, tokens[:, 0]], dim=-1)


# ---------------------------------------------------------------------------------------------- vanilla diffusion


class VanillaDiffusionPolicy(DrivingPolicy):
    """A denoiser over the normalised plan [B, H, 3] (``config.denoiser``: a DiT-1d conditioned on the ego token by
    adaLN and cross-attending to all scene tokens, or a temporal U-Net with FiLM on :class:`PlanQueryPooling`'s
    vector); trained with DiffusionLoss over the full range, sampled from pure noise."""

    algorithm = "vanilla-diffusion"
    config_class = VanillaDiffusionConfig

    def __init__(self, config: VanillaDiffusionConfig | None = None) -> None:
        config = config or VanillaDiffusionConfig()
        super().__init__(config)
        self.denoiser: nn.Module
        if config.denoiser == "unet":
            self.pooling = PlanQueryPooling(config.d_model, config.heads, config.dropout)
            self.denoiser = TemporalUnet1d(POSE_DIM, config.unet_base_dim, config.unet_dim_mults,
                                           cond_dim=self.pooling.out_dim)
        else:
            if config.denoiser_width % config.heads:
                raise ValueError(f"denoiser_width={config.denoiser_width} must be divisible by heads={config.heads}")
            self.denoiser = DiT1d(POSE_DIM, config.denoiser_width, config.denoiser_depth, config.heads,
                                  max_len=config.horizon, mlp_ratio=config.mlp_ratio, cond_dim=config.d_model,
                                  context_dim=config.d_model, dropout=config.dropout)
        self.schedule = _scaled_linear(config.diffusion_steps, config.beta_start, config.beta_end)
        self.diffusion_loss = DiffusionLoss(self.schedule, config.prediction)
        self.sampler = Sampler(self.schedule, config.solver, config.steps, config.prediction, t_end=config.t_end)

    @property
    def nfe(self) -> int:
        return self.sampler.nfe

    def _condition(self, tokens: Tensor, token_mask: Tensor) -> dict[str, Tensor]:
        """The denoiser's scene condition, computed once per decision: the U-Net's pooled vector ``{"cond": [B, 2D]}``,
        or the DiT's tokens ``{"tokens": [B, T, D], "token_mask": [B, T]}``."""
        if isinstance(self.denoiser, TemporalUnet1d):
            return {"cond": self.pooling(tokens, token_mask)}
        return {"tokens": tokens, "token_mask": token_mask}

    def _denoise(self, x_t: Tensor, t: Tensor, **condition: Tensor) -> Tensor:
        """x_t [B, H, 3], t [B], the :meth:`_condition` of the scene -> prediction [B, H, 3]."""
        if isinstance(self.denoiser, TemporalUnet1d):
            return self.denoiser(x_t, t, condition["cond"])
        tokens = condition["tokens"]
        return self.denoiser(x_t, t, tokens[:, 0], context=tokens, context_mask=condition["token_mask"])

    def loss(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Denoising loss (``prediction`` space MSE) on the normalised expert plan."""
        obs, expert = self._split_batch(batch)
        condition = self._condition(*self.encoder.encode(obs))
        loss = self.diffusion_loss(self._denoise, self.normalizer.normalize(expert), **condition)
        return {"loss": loss.mean()}

    def _plan(self, obs: Mapping[str, Tensor], generator: torch.Generator | None, n_modes: int | None = None
              ) -> DrivingPlan:
        """``n_modes`` (default config.n_modes) samples per scene in one batch; the plan is the first.

        obs: validated tensors [B, ...] -> plan [B, H, 3], modes [B, n_modes, H, 3]. No host sync."""
        n_modes = self.config.n_modes if n_modes is None else n_modes
        if n_modes < 1:
            raise ValueError(f"n_modes must be >= 1, got {n_modes}")
        tokens, mask = self.encoder.encode(obs)
        batch_size = tokens.shape[0]
        condition = self._condition(tokens, mask)
        if n_modes > 1:
            condition = {k: v.repeat_interleave(n_modes, 0) for k, v in condition.items()}
        x = self.schedule.prior_noise((batch_size * n_modes, self.config.horizon, POSE_DIM), generator=generator,
                                      device=tokens.device)
        sample = self.sampler(lambda x_t, t: self._denoise(x_t, t.to(x_t.dtype), **condition), x,
                              generator=generator, validate=False)
        if self.config.clip_sample:
            sample = sample.clamp(-1.0, 1.0)
        modes = self.normalizer.denormalize(sample).unflatten(0, (batch_size, n_modes))
        return DrivingPlan(modes[:, 0], modes, None)


# ---------------------------------------------------------------------------------------------- regression


class RegressionPolicy(DrivingPolicy):
    """One learned plan query cross-attends to the scene tokens; an MLP on (query, ego token) regresses the
    normalised plan; L1 loss in metres / radians."""

    algorithm = "regression"
    config_class = RegressionConfig
    # the plan query lived on the policy itself before PlanQueryPooling was shared with the U-Net vanilla policy
    renamed_parameters: ClassVar[dict[str, str]] = {"query": "pooling.query", "attn.": "pooling.attn.",
                                                    "norm.": "pooling.norm."}

    def __init__(self, config: RegressionConfig | None = None) -> None:
        config = config or RegressionConfig()
        super().__init__(config)
        self.pooling = PlanQueryPooling(config.d_model, config.heads, config.dropout)
        layers: list[nn.Module] = []
        in_dim = self.pooling.out_dim
        for _ in range(config.head_layers):
            layers += [nn.Linear(in_dim, config.head_hidden), nn.ReLU()]
            in_dim = config.head_hidden
        self.head = nn.Sequential(*layers, nn.Linear(in_dim, config.horizon * POSE_DIM))

    def _predict(self, obs: Mapping[str, Tensor]) -> Tensor:
        """Validated observation tensors [B, ...] -> plans [B, H, 3] in metres / radians."""
        out = self.head(self.pooling(*self.encoder.encode(obs))).unflatten(-1, (self.config.horizon, POSE_DIM))
        return self.normalizer.denormalize(out)

    def loss(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """L1 between the regressed and the expert plan."""
        obs, expert = self._split_batch(batch)
        return {"loss": (self._predict(obs) - expert).abs().mean()}

    def _plan(self, obs: Mapping[str, Tensor], generator: torch.Generator | None) -> DrivingPlan:
        """obs: validated tensors [B, ...] -> plan [B, H, 3]. No host sync."""
        return DrivingPlan(self._predict(obs), None, None)


POLICIES: dict[str, type[DrivingPolicy]] = {
    AnchoredDiffusionPolicy.algorithm: AnchoredDiffusionPolicy,
    VanillaDiffusionPolicy.algorithm: VanillaDiffusionPolicy,
    RegressionPolicy.algorithm: RegressionPolicy,
}


def load_driving_policy(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> DrivingPolicy:
    """Any driving policy from a :meth:`DrivingPolicy.save` file (the algorithm is read from the metadata)."""
    return DrivingPolicy.load(path, map_location)


# ---------------------------------------------------------------------------------------------- data


class DrivingSamples(Dataset):
    """Rows of a ``trajgen collect driving`` HDF5 file: observation keys + "trajectory" [H, 3] (+ "scenario",
    "seed" when present), one dataset per key with the rows on axis 0.

    The file is opened on first access (not in the constructor, which only validates keys and shapes) and
    loaded to memory (fine up to ~100k rows). ``seeds`` keeps only rows whose "seed" is in it (train/test
    split by scenario seed). Items are dicts of tensors: features float32, masks bool, ids int64.
    """

    FEATURE_KEYS = (*OBSERVATION_KEYS, "trajectory")
    ID_KEYS = ("scenario", "seed")

    def __init__(self, path: str | os.PathLike[str] | None, *, spec: ObservationSpec | None = None,
                 horizon: int = 8, seeds: Sequence[int] | None = None, group: str | None = None) -> None:
        self.path, self.group = (Path(path) if path is not None else None), group
        self.spec, self.horizon = spec or ObservationSpec(), horizon
        self.seeds = None if seeds is None else {int(s) for s in seeds}
        self._arrays: dict[str, np.ndarray] | None = None
        if self.path is not None:
            if not self.path.is_file():
                raise ValueError(f"DrivingSamples: no HDF5 file at {self.path}")
            with self._open() as root:
                self._check({key: root[key].shape for key in root}, str(self.path))

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray | Tensor], *, spec: ObservationSpec | None = None,
                    horizon: int = 8, seeds: Sequence[int] | None = None) -> DrivingSamples:
        """A data set over in-memory arrays with the same keys and shapes as the file."""
        dataset = cls(None, spec=spec, horizon=horizon, seeds=seeds)
        numpy_arrays = {k: v.detach().cpu().numpy() if isinstance(v, Tensor) else np.asarray(v)
                        for k, v in arrays.items()}
        dataset._check({k: v.shape for k, v in numpy_arrays.items()}, "arrays")
        dataset._arrays = dataset._select(numpy_arrays)
        return dataset

    def _open(self) -> Any:
        import h5py

        file = h5py.File(self.path, "r")
        if self.group is None:
            return file
        if self.group not in file:
            file.close()
            raise ValueError(f"DrivingSamples: {self.path} has no group {self.group!r}")
        return _GroupHandle(file, file[self.group])

    def _check(self, shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
        expected = {**self.spec.shapes(), "trajectory": (self.horizon, POSE_DIM)}
        missing = [k for k in expected if k not in shapes]
        if missing:
            raise ValueError(f"DrivingSamples: {source} is missing key(s) {missing}; it has {sorted(shapes)}")
        rows = shapes["trajectory"][0] if shapes["trajectory"] else 0
        for key, shape in expected.items():
            if tuple(shapes[key]) != (rows, *shape):
                raise ValueError(f"DrivingSamples: {source}[{key!r}] must have shape [rows, "
                                 f"{', '.join(map(str, shape))}] with rows = {rows}, got {tuple(shapes[key])}")
        for key in self.ID_KEYS:
            if key in shapes and tuple(shapes[key]) != (rows,):
                raise ValueError(f"DrivingSamples: {source}[{key!r}] must have shape [{rows}], got {shapes[key]}")
        if self.seeds is not None and "seed" not in shapes:
            raise ValueError(f"DrivingSamples: seeds= selects rows by 'seed', but {source} has no 'seed' key")

    def _select(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        keep = {k: arrays[k] for k in (*self.FEATURE_KEYS, *self.ID_KEYS) if k in arrays}
        for key in self.FEATURE_KEYS:
            if not np.isfinite(keep[key]).all():
                raise ValueError(f"DrivingSamples: {key!r} contains NaN or inf")
        if self.seeds is not None:
            rows = np.isin(keep["seed"], list(self.seeds))
            keep = {k: v[rows] for k, v in keep.items()}
        return keep

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """All kept rows as numpy arrays (loads the file on first use)."""
        if self._arrays is None:
            with self._open() as root:
                self._arrays = self._select({k: root[k][()] for k in (*self.FEATURE_KEYS, *self.ID_KEYS) if k in root})
        return self._arrays

    def __len__(self) -> int:
        return len(self.arrays["trajectory"])

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        item: dict[str, Tensor] = {}
        for key, value in self.arrays.items():
            row = torch.as_tensor(value[index])
            if key.endswith("_mask"):
                row = row != 0
            elif key in self.ID_KEYS:
                row = row.long()
            else:
                row = row.float()
            item[key] = row
        return item

    def trajectories(self) -> Tensor:
        """Every kept expert plan, [S, H, 3] float32 (for ``kmeans_anchors`` and ``trajectory_bounds``)."""
        return torch.as_tensor(self.arrays["trajectory"], dtype=torch.float32)


class _GroupHandle:
    """A context manager that closes the file and yields one of its groups."""

    def __init__(self, file: Any, group: Any) -> None:
        self.file, self.group = file, group

    def __enter__(self) -> Any:
        return self.group

    def __exit__(self, *exc: object) -> None:
        self.file.close()


# ---------------------------------------------------------------------------------------------- training


def _policy_loss(model: nn.Module, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return model(batch)


def train_driving_policy(policy: DrivingPolicy, dataset: Dataset | Callable[[torch.Generator], Any],
                         config: Any = None, *, resume: bool = True,
                         policy_file: str = "policy.safetensors") -> tuple[DrivingPolicy, dict[str, Any]]:
    """Train ``policy`` with ``trajgen.training.Trainer`` (checkpoints in ``config.out_dir``, resumed when
    ``resume``), then save the EMA policy to ``out_dir/policy_file``.

    Args:
        policy: any :class:`DrivingPolicy` (build anchored ones with ``kmeans_anchors`` over the training plans).
        dataset: a :class:`DrivingSamples` (or any map-style Dataset / sample_batch callable of batches).
        config: a ``TrainerConfig``.
    Returns:
        (the EMA policy in eval mode, as loaded from the saved file, the Trainer's summary dict with "policy_file"
        added).
    """
    from trajgen.training import Trainer, TrainerConfig

    if not isinstance(policy, DrivingPolicy):
        raise TypeError(f"policy must be a DrivingPolicy, got {type(policy).__name__}")
    if isinstance(policy, AnchoredDiffusionPolicy) and not bool(policy.anchors.abs().sum() > 0):
        raise ValueError("the anchored policy has no anchors: build it with anchors=kmeans_anchors(plans, k)")
    config = config or TrainerConfig()
    if resume:
        _require_resumable(policy, Path(config.out_dir))
    _record_build(policy, Path(config.out_dir))
    with Trainer(policy, _policy_loss, dataset, config) as trainer:
        summary = trainer.fit(resume=resume)
        trained = trainer.ema_model
    path = trained.save(Path(config.out_dir) / policy_file)
    # return the file's copy, not the Trainer's EMA module: its parameters do not require grad, for which PyTorch
    # picks other kernels, so a later run that loads the file would plan differently in the last bits
    return DrivingPolicy.load(path, map_location=trained.device), {**summary, "policy_file": str(path)}


BUILD_RECORD = "policy_build.json"
"""written by :func:`train_driving_policy` next to the checkpoints: the algorithm and config they were trained with"""


def _record_build(policy: DrivingPolicy, out_dir: Path) -> None:
    from trajgen.training.checkpoint import atomic_write_bytes

    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"algorithm": policy.algorithm, "config": policy.config.to_dict()}
    atomic_write_bytes(out_dir / BUILD_RECORD, json.dumps(record, indent=1).encode())


def _require_resumable(policy: DrivingPolicy, out_dir: Path) -> None:
    """Refuse to resume checkpoints in ``out_dir`` trained for a policy built differently (algorithm, config, anchors);
    the Trainer alone would load any state dict of the same shapes. Runs that predate the build record pass."""
    from trajgen.training import checkpoint as ckpt

    latest = ckpt.latest_checkpoint(out_dir / ckpt.CHECKPOINT_SUBDIR)
    if latest is None or not (out_dir / BUILD_RECORD).is_file():
        return
    try:
        record = json.loads((out_dir / BUILD_RECORD).read_text())
        algorithm, config_values = record["algorithm"], record["config"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{out_dir / BUILD_RECORD} is not a build record written by train_driving_policy: {e}") from e
    anchors = ckpt.read_checkpoint(latest)[0].get("anchors") if isinstance(policy, AnchoredDiffusionPolicy) else None
    differences = policy.differences_from(algorithm, config_values, anchors)
    if differences:
        raise ValueError(f"{out_dir} holds checkpoints of a policy built differently (saved vs this policy: "
                         f"{'; '.join(differences)}); train into another out_dir, or pass resume=False")
