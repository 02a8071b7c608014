"""Offline-RL planners on D4RL-format data: Trajectory Diffuser and its baselines.

Four algorithms share one set of networks (:class:`OfflineModel`), one training loop and one checkpoint format:

| algorithm | nets | how it decides |
|---|---|---|
| ``trajectory-diffuser`` | CausalGPT + TemporalUnet1d + inverse dynamics | GPT drafts the state plan from s_0 (return-conditioned), diffusion noises it to ``t_mid`` and integrates back in ``sample_steps`` solver steps, a = f(s_0, s_1) |
| ``decision-diffuser`` | TemporalUnet1d + inverse dynamics | state plan from pure noise in ``sample_steps`` (20+) steps, a = f(s_0, s_1) |
| ``decision-transformer`` | CausalGPT + inverse dynamics | the GPT's one-step draft s_1, a = f(s_0, s_1) (no action head) |
| ``behavior-cloning`` | residual MLP | a = pi(s_0) |

The GPT drafts from the current state alone, or (``draft_history`` > 0, as the reference code) after reading
the episode's last ``draft_history`` states, which ``trajgen.agents.offline`` keeps per env.

Plans are state trajectories ``[B, H, S]`` in normalised units whose first state is the current state,
pinned by inpainting during sampling. Both diffusion planners use classifier-free guidance on the
return-to-go, ``cond = R / return_scale`` ``[B, 1]``. The receding-horizon loop (act on the first action,
replan every step) and the return-to-go bookkeeping live in ``trajgen.agents.offline``.

Training (:func:`train_offline`) optimises every net of an algorithm *jointly*: one loss, the sum of the
GPT's next-state MSE, the diffusion loss and the inverse-dynamics MSE, under one ``Trainer`` budget of
``steps`` updates. The exported policy (``out_dir/policy.safetensors``) holds the EMA weights, the
normalisers and metadata (algorithm, env id, obs/action dims, config); :func:`load_policy` refuses a
file for another env or algorithm.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import safetensors.torch
import scipy.signal
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trajgen.data.d4rl import D4RLDataset, GaussianNormalizer, SequenceDataset, load_d4rl
from trajgen.diffusion import SCHEDULES, DiffusionLoss, Schedule, make_schedule
from trajgen.guidance import ClassifierFreeGuidance, Inpainting, condition_on_first_state
from trajgen.nets import CausalGPT, ResidualMLP, TemporalUnet1d
from trajgen.policies._config import check_scalar_fields
from trajgen.solvers import Sampler, get_solver
from trajgen.training import Trainer, TrainerConfig, seed_everything
from trajgen.training.checkpoint import atomic_write_bytes

POLICY_FILE = "policy.safetensors"
RUN_FILE = "offline_run.json"
FORMAT_VERSION = "1"

# ----------------------------------------------------------------------------------------------------
# configs (one dataclass per algorithm)
# ----------------------------------------------------------------------------------------------------


@dataclass
class OfflineConfig:
    """Training settings every offline algorithm shares."""

    algorithm: ClassVar[str] = ""
    inference_fields: ClassVar[frozenset[str]] = frozenset()
    """fields that change only how a trained policy decides, not what it learns: ``load_policy(options=...)``
    may set them on trained weights"""
    batch_size: int = 64
    """windows per optimizer update"""
    lr: float = 2e-4
    """peak learning rate (AdamW, linear warm-up then cosine decay)"""
    warmup_steps: int = 200
    """linear warm-up length in updates"""
    weight_decay: float = 1e-4
    """AdamW weight decay on matrices"""
    grad_clip: float = 1.0
    """max global gradient L2 norm"""
    ema_decay: float = 0.995
    """EMA decay of the weights; the exported policy uses the EMA weights"""
    checkpoint_every: int = 1000
    """trainer checkpoint period in updates (resume granularity)"""

    def __post_init__(self) -> None:
        check_scalar_fields(self)
        _require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _require(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _require(0.0 <= self.ema_decay < 1.0, f"ema_decay must be in [0, 1), got {self.ema_decay}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of the fields."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def training_part(cls, fields: Mapping[str, Any]) -> dict[str, Any]:
        """``fields`` (a :meth:`to_dict`) without the inference fields: what the trained weights depend on."""
        return {k: v for k, v in fields.items() if k not in cls.inference_fields}


@dataclass
class BehaviorCloningConfig(OfflineConfig):
    """Behaviour cloning: a residual MLP regressing the dataset action from the state."""

    algorithm: ClassVar[str] = "behavior-cloning"
    hidden_dim: int = 256
    """width of the MLP"""
    depth: int = 3
    """residual blocks"""
    dropout: float = 0.1
    """dropout inside the blocks (training only)"""


@dataclass
class SequenceConfig(OfflineConfig):
    """Fields of the return-conditioned state-sequence planners (DT-style, Decision Diffuser, TD)."""

    inference_fields: ClassVar[frozenset[str]] = frozenset({"target_return", "min_return_fraction"})
    horizon: int = 16
    """H: states per plan (the current state included)"""
    return_scale: float = 1000.0
    """the return-to-go condition is R / return_scale"""
    discount: float = 1.0
    """discount of the return-to-go labels (1 = undiscounted, as Trajectory Diffuser)"""
    target_return: float | None = None
    """return to condition on at the first step of an episode; None: the best episode return in the data"""
    min_return_fraction: float = 1.0 / 3.0
    """during a rollout the remaining return R - collected is floored at this fraction of the target"""
    invdyn_hidden: int = 256
    """inverse-dynamics MLP width"""
    invdyn_depth: int = 2
    """inverse-dynamics residual blocks"""

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.horizon >= 2, f"horizon must be >= 2 (a plan needs s_0 and s_1), got {self.horizon}")
        _require(self.return_scale > 0, f"return_scale must be > 0, got {self.return_scale}")
        _require(0.0 < self.discount <= 1.0, f"discount must be in (0, 1], got {self.discount}")
        _require(0.0 <= self.min_return_fraction <= 1.0,
                 f"min_return_fraction must be in [0, 1], got {self.min_return_fraction}")


@dataclass
class DecisionTransformerConfig(SequenceConfig):
    """Decision Transformer-style: the causal GPT's draft of s_1 plus inverse dynamics (no action head)."""

    algorithm: ClassVar[str] = "decision-transformer"
    inference_fields: ClassVar[frozenset[str]] = SequenceConfig.inference_fields | {"draft_history"}
    gpt_width: int = 128
    """GPT token width"""
    gpt_depth: int = 3
    """GPT blocks"""
    gpt_heads: int = 4
    """GPT attention heads"""
    gpt_dropout: float = 0.1
    """GPT dropout (training only)"""
    draft_history: int = 0
    """past states of the episode (before the current one) the GPT's draft starts from, as a Decision Transformer's
    context; the reference code uses horizon - 1. 0: the current state alone. At most horizon - 1"""

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(0 <= self.draft_history <= self.horizon - 1,
                 f"draft_history must be in [0, horizon - 1] = [0, {self.horizon - 1}], got {self.draft_history}")


@dataclass
class DecisionDiffuserConfig(SequenceConfig):
    """Decision Diffuser-style: return-conditioned diffusion over state plans from pure noise."""

    algorithm: ClassVar[str] = "decision-diffuser"
    inference_fields: ClassVar[frozenset[str]] = SequenceConfig.inference_fields | {"guidance_scale", "solver",
                                                                                     "sample_steps"}
    unet_base_dim: int = 32
    """TemporalUnet1d channels of the first level"""
    unet_dim_mults: tuple[int, ...] = (1, 2, 4)
    """channel multiplier per UNet level"""
    schedule: str = "vp-discrete"
    """noise schedule name (trajgen.diffusion.SCHEDULES); vp-discrete uses a linear betas table"""
    diffusion_steps: int = 200
    """length N of the discrete betas table (vp-discrete only)"""
    prediction: str = "eps"
    """what the UNet predicts: eps | x0 | v | flow"""
    cond_drop_prob: float = 0.25
    """probability of dropping the return condition in training (classifier-free guidance)"""
    guidance_scale: float = 1.2
    """classifier-free guidance weight w (1 = conditional model)"""
    solver: str = "dpmsolver++"
    """sampling solver (trajgen.solvers.SOLVERS)"""
    sample_steps: int = 20
    """solver steps from t = 1"""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.unet_dim_mults = tuple(int(m) for m in self.unet_dim_mults)
        _require(self.schedule in SCHEDULES, f"schedule {self.schedule!r} is not one of {sorted(SCHEDULES)}")
        get_solver(self.solver)
        _require(0.0 <= self.cond_drop_prob < 1.0, f"cond_drop_prob must be in [0, 1), got {self.cond_drop_prob}")
        _require(math.isfinite(self.guidance_scale), f"guidance_scale must be finite, got {self.guidance_scale}")
        _require(self.sample_steps >= 1, f"sample_steps must be >= 1, got {self.sample_steps}")


@dataclass
class TrajectoryDiffuserConfig(DecisionDiffuserConfig, DecisionTransformerConfig):
    """Trajectory Diffuser: the GPT drafts the plan, diffusion refines it from ``t_mid`` in a few steps."""

    algorithm: ClassVar[str] = "trajectory-diffuser"
    inference_fields: ClassVar[frozenset[str]] = (DecisionDiffuserConfig.inference_fields
                                                  | DecisionTransformerConfig.inference_fields | {"t_mid", "use_draft"})
    use_draft: bool = True
    """refine the GPT's draft (False: sample from pure noise with ``sample_steps`` steps, an ablation)"""
    t_mid: float = 0.055
    """diffusion time the draft is noised to before refinement (0: keep the draft, 1: pure noise). 0.055 is
    sigma = 0.081 on the default 200-step linear table: the reference code refines the draft as its x at step 5
    of a 100-step linear table (betas 1e-3 to 2e-2), sigma = 0.083"""
    sample_steps: int = 3
    """solver steps from t_mid down to the schedule's end"""

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(0.0 <= self.t_mid <= 1.0, f"t_mid must be in [0, 1], got {self.t_mid}")


ALGORITHMS: dict[str, type[OfflineConfig]] = {
    cls.algorithm: cls for cls in (TrajectoryDiffuserConfig, DecisionDiffuserConfig, DecisionTransformerConfig,
                                   BehaviorCloningConfig)
}
"""algorithm name -> its config class."""


def make_config(algorithm: str, **overrides: Any) -> OfflineConfig:
    """The config of ``algorithm`` (a key of ``ALGORITHMS``) with ``overrides`` applied."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {sorted(ALGORITHMS)}")
    cls = ALGORITHMS[algorithm]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}; its fields are {sorted(names)}")
    return cls(**overrides)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _uses_gpt(config: OfflineConfig) -> bool:
    return isinstance(config, DecisionTransformerConfig)


def _uses_diffusion(config: OfflineConfig) -> bool:
    return isinstance(config, DecisionDiffuserConfig)


def make_offline_schedule(config: DecisionDiffuserConfig) -> Schedule:
    """The config's noise schedule (a linear betas table of ``diffusion_steps`` for vp-discrete)."""
    if config.schedule == "vp-discrete":
        return make_schedule("vp-discrete", table="linear", num_steps=config.diffusion_steps)
    return make_schedule(config.schedule)


# ----------------------------------------------------------------------------------------------------
# networks and training loss
# ----------------------------------------------------------------------------------------------------


class OfflineModel(nn.Module):
    """The nets of one algorithm plus the data normalisers (buffers, so they travel in the weights).

    Submodules (present when the algorithm uses them): ``gpt`` CausalGPT over normalised states with a
    return token; ``unet`` TemporalUnet1d denoiser over state plans [B, H, S] with a return condition;
    ``inverse_dynamics`` ResidualMLP [B, 2S] -> [B, A]; ``actor`` ResidualMLP [B, S] -> [B, A] (BC).
    ``forward(batch)`` returns the training losses ``{"loss", "loss_gpt", "loss_diffusion", ...}``.

    Args:
        config: the algorithm's config.
        obs_dim: S. act_dim: A.
    """

    def __init__(self, config: OfflineConfig, obs_dim: int, act_dim: int) -> None:
        super().__init__()
        _require(obs_dim >= 1 and act_dim >= 1, f"obs_dim and act_dim must be >= 1, got {obs_dim}, {act_dim}")
        self.config, self.obs_dim, self.act_dim = config, obs_dim, act_dim
        for name, dim in (("state", obs_dim), ("action", act_dim)):
            self.register_buffer(f"{name}_mean", torch.zeros(dim))
            self.register_buffer(f"{name}_std", torch.ones(dim))
        self.register_buffer("target_return", torch.zeros(()))
        if isinstance(config, BehaviorCloningConfig):
            self.actor = ResidualMLP(obs_dim, act_dim, hidden_dim=config.hidden_dim, depth=config.depth,
                                     dropout=config.dropout, time_conditioned=False)
            return
        assert isinstance(config, SequenceConfig)
        if _uses_gpt(config):
            self.gpt = CausalGPT(obs_dim, width=config.gpt_width, depth=config.gpt_depth, heads=config.gpt_heads,
                                 max_len=config.horizon, cond_dim=1, dropout=config.gpt_dropout)
        if _uses_diffusion(config):
            self.schedule = make_offline_schedule(config)
            self.unet = TemporalUnet1d(obs_dim, config.unet_base_dim, config.unet_dim_mults, cond_dim=1)
            self.diffusion_loss = DiffusionLoss(self.schedule, config.prediction)
        self.inverse_dynamics = ResidualMLP(2 * obs_dim, act_dim, hidden_dim=config.invdyn_hidden,
                                            depth=config.invdyn_depth, time_conditioned=False)

    def fit_normalizers(self, dataset: D4RLDataset, target_return: float) -> None:
        """Set the state/action mean and std from ``dataset`` and the default return condition."""
        for name, array in (("state", dataset.observations), ("action", dataset.actions)):
            norm = GaussianNormalizer().fit(array)
            getattr(self, f"{name}_mean").copy_(norm.shift)
            getattr(self, f"{name}_std").copy_(norm.scale)
        self.target_return.fill_(float(target_return))

    def normalize_states(self, states: Tensor) -> Tensor:
        """[..., S] raw -> normalised."""
        return (states - self.state_mean) / self.state_std

    def unnormalize_states(self, states: Tensor) -> Tensor:
        """[..., S] normalised -> raw."""
        return states * self.state_std + self.state_mean

    def unnormalize_actions(self, actions: Tensor) -> Tensor:
        """[..., A] normalised -> raw."""
        return actions * self.action_std + self.action_mean

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Training losses for a batch of normalised windows.

        Args:
            batch: ``observations`` [B, H, S], ``actions`` [B, H, A] (normalised), ``returns`` [B, 1]
                (return-to-go at the window start, raw), ``mask`` [B, H] (steps inside the episode).
        Returns:
            ``{"loss": sum of the parts, "loss_<part>": each part}`` (scalars).
        """
        states, actions, mask = batch["observations"], batch["actions"], batch["mask"]
        if isinstance(self.config, BehaviorCloningConfig):
            loss = F.mse_loss(self.actor(states[:, 0]), actions[:, 0])
            return {"loss": loss, "loss_actor": loss.detach()}
        cond = batch["returns"] / self.config.return_scale
        parts: dict[str, Tensor] = {"inverse_dynamics": self._inverse_dynamics_loss(states, actions, mask)}
        if hasattr(self, "gpt"):
            parts["gpt"] = self._gpt_loss(states, cond, mask)
        if hasattr(self, "unet"):
            keep = torch.rand(states.shape[0], device=states.device) >= self.config.cond_drop_prob
            parts["diffusion"] = self.diffusion_loss(self.unet, states, cond=cond, cond_mask=keep).mean()
        total = torch.stack(list(parts.values())).sum()
        return {"loss": total, **{f"loss_{k}": v.detach() for k, v in parts.items()}}

    def _gpt_loss(self, states: Tensor, cond: Tensor, mask: Tensor) -> Tensor:
        """MSE of the GPT's output i against state i + 1 over targets inside the episode: states [B, H, S], cond
        [B, 1], mask [B, H]. Past an episode's end a window repeats its last state (Diffuser's padding, which the
        diffusion model may learn as an absorbing state); as a target it would teach the draft to stand still, so
        it is masked out, as a Decision Transformer masks its padding."""
        error = (self.gpt(states[:, :-1], cond) - states[:, 1:]).pow(2).mean(-1)       # [B, H - 1]
        return _masked_mean(error, mask[:, 1:])

    def _inverse_dynamics_loss(self, states: Tensor, actions: Tensor, mask: Tensor) -> Tensor:
        """MSE of f(s_t, s_{t+1}) against a_t over pairs with both steps inside the episode."""
        pairs = torch.cat([states[:, :-1], states[:, 1:]], dim=-1).flatten(0, 1)      # [B (H-1), 2S]
        error = (self.inverse_dynamics(pairs) - actions[:, :-1].flatten(0, 1)).pow(2).mean(-1)
        return _masked_mean(error, mask[:, 1:].flatten())                              # [B (H-1)]


def _masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``values`` where ``valid`` (bool, same shape) holds; 0 when nothing is valid."""
    weights = valid.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


# ----------------------------------------------------------------------------------------------------
# policies
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StateHistory:
    """The steps of the episode before the current decision, oldest first: ``states`` [B, K, S] and the
    return-to-go condition held at each of them, ``returns_to_go`` [B, K] (raw units in :meth:`OfflinePolicy.act`).
    K may be 0 (the episode's first decision)."""

    states: Tensor
    returns_to_go: Tensor


class OfflinePolicy:
    """A trained :class:`OfflineModel` that decides: ``act(obs [B, S], returns_to_go [B]) -> [B, A]`` (raw units).

    Subclasses implement :meth:`_act_normalized`. Tensors in, tensors out, under no_grad and eval mode;
    ``trajgen.agents.offline.OfflineAgent`` wraps this for numpy and environments.

    Args:
        model: the trained nets and normalisers.
        env_id: the environment the data came from (checked by ``evaluate`` and on load).
    """

    def __init__(self, model: OfflineModel, *, env_id: str | None = None) -> None:
        self.model = model.eval()
        self.config = model.config
        self.env_id = env_id
        self.obs_dim, self.act_dim = model.obs_dim, model.act_dim

    @property
    def algorithm(self) -> str:
        return self.config.algorithm

    @property
    def device(self) -> torch.device:
        return self.model.state_mean.device

    @property
    def nfe(self) -> int:
        """Network evaluations per decision (GPT forwards, UNet calls at batch 2B under CFG count once, MLPs)."""
        return 1

    def to(self, device: torch.device | str) -> OfflinePolicy:
        """Move the nets to ``device``; returns self."""
        self.model.to(device)
        return self

    @property
    def default_return(self) -> float:
        """Return-to-go conditioned on at the first step of an episode."""
        return float(self.model.target_return)

    @property
    def history_length(self) -> int:
        """Past steps :meth:`act` uses from its ``history`` (the config's ``draft_history``; 0 without a GPT)."""
        return int(getattr(self.config, "draft_history", 0))

    def next_returns_to_go(self, returns_to_go: Tensor | np.ndarray, rewards: Tensor | np.ndarray,
                           target_return: float) -> Any:
        """Remaining return after collecting ``rewards``: R - r, floored at min_return_fraction * ``target_return``
        (the return the episode started from). Arrays [B] in, [B] out."""
        floor = getattr(self.config, "min_return_fraction", 0.0) * target_return
        remaining = returns_to_go - rewards
        if isinstance(remaining, Tensor):
            return remaining.clamp_min(floor)
        return np.maximum(remaining, floor)

    def act(self, obs: Tensor, returns_to_go: Tensor | None = None, *, history: StateHistory | None = None,
            generator: torch.Generator | None = None, validate: bool = True) -> Tensor:
        """obs [B, S] raw, returns_to_go [B] raw (None: ``default_return``) -> actions [B, A] raw.

        ``history``: the episode's earlier states and conditions (raw); the GPT's draft starts from the last
        ``history_length`` of them (other policies ignore it). ``validate=False`` skips the samplers' finiteness
        checks (host syncs): with it and ``returns_to_go`` None, ``act`` on device tensors has no host sync and no
        host tensor, so a CUDA graph can capture it (check the actions yourself after the replay)."""
        obs = self._check_obs(obs)
        with torch.no_grad():
            states = self.model.normalize_states(obs)
            cond = self._condition(returns_to_go, obs.shape[0])
            past = self._normalized_history(history, obs.shape[0])
            return self.model.unnormalize_actions(self._act_normalized(states, cond, generator, validate, past))

    def _act_normalized(self, states: Tensor, cond: Tensor, generator: torch.Generator | None,
                        validate: bool = True, history: StateHistory | None = None) -> Tensor:
        raise NotImplementedError

    def _normalized_history(self, history: StateHistory | None, batch: int) -> StateHistory | None:
        """The last ``history_length`` steps of ``history`` as (normalised states, conditions R / return_scale);
        None when there is nothing to use."""
        if history is None:
            return None
        states, rtg = history.states, history.returns_to_go
        if not isinstance(states, Tensor) or states.ndim != 3 or states.shape[0] != batch or \
                states.shape[2] != self.obs_dim:
            raise ValueError(f"history.states must be a tensor [B, K, S] = [{batch}, K, {self.obs_dim}], got "
                             f"{tuple(states.shape) if isinstance(states, Tensor) else type(states).__name__}")
        if not isinstance(rtg, Tensor) or tuple(rtg.shape) != tuple(states.shape[:2]):
            raise ValueError(f"history.returns_to_go must be a tensor [B, K] = {list(states.shape[:2])}, got "
                             f"{tuple(rtg.shape) if isinstance(rtg, Tensor) else type(rtg).__name__}")
        k = min(self.history_length, states.shape[1])
        if k == 0:
            return None
        states, rtg = states[:, -k:].to(self.device, torch.float32), rtg[:, -k:].to(self.device, torch.float32)
        scale = getattr(self.config, "return_scale", 1.0)
        return StateHistory(self.model.normalize_states(states), rtg / scale)

    def _check_obs(self, obs: Tensor) -> Tensor:
        if not isinstance(obs, Tensor):
            raise TypeError(f"obs must be a torch.Tensor [B, {self.obs_dim}], got {type(obs).__name__}")
        if obs.ndim != 2 or obs.shape[1] != self.obs_dim or obs.shape[0] == 0:
            raise ValueError(f"obs must have shape [B, {self.obs_dim}] (B >= 1), got {tuple(obs.shape)}")
        return obs.to(self.device, torch.float32)

    def _condition(self, returns_to_go: Tensor | None, batch: int) -> Tensor:
        """The return condition [B, 1] = R / return_scale."""
        scale = getattr(self.config, "return_scale", 1.0)
        if returns_to_go is None:
            return (self.model.target_return / scale).expand(batch, 1).clone()
        rtg = torch.as_tensor(returns_to_go, dtype=torch.float32, device=self.device)
        if rtg.shape != (batch,):
            raise ValueError(f"returns_to_go must have shape [B] = [{batch}], got {tuple(rtg.shape)}")
        return rtg[:, None] / scale


class BehaviorCloningPolicy(OfflinePolicy):
    """a = pi(s): one MLP call; ignores the return condition."""

    def _act_normalized(self, states: Tensor, cond: Tensor, generator: torch.Generator | None,
                        validate: bool = True, history: StateHistory | None = None) -> Tensor:
        return self.model.actor(states)


class PlanningPolicy(OfflinePolicy):
    """A policy that plans states [B, H, S] and acts by inverse dynamics on the plan's first two states."""

    def plan(self, obs: Tensor, returns_to_go: Tensor | None = None, *, history: StateHistory | None = None,
             generator: torch.Generator | None = None) -> Tensor:
        """obs [B, S] raw, returns_to_go [B] | None, history (raw, see :meth:`act`) -> the plan [B, H, S] in raw
        units (plan[:, 0] = obs)."""
        obs = self._check_obs(obs)
        with torch.no_grad():
            states = self.model.normalize_states(obs)
            plan = self.plan_normalized(states, self._condition(returns_to_go, obs.shape[0]), generator=generator,
                                        history=self._normalized_history(history, obs.shape[0]))
            out = self.model.unnormalize_states(plan)
            out[:, 0] = obs  # the pinned state, without the round-off of unnormalising
            return out

    def plan_normalized(self, states: Tensor, cond: Tensor, *, generator: torch.Generator | None = None,
                        validate: bool = True, history: StateHistory | None = None) -> Tensor:
        """states [B, S] normalised, cond [B, 1], history (normalised, see :meth:`draft`) -> plan [B, H, S]
        normalised with plan[:, 0] = states."""
        raise NotImplementedError

    def _act_normalized(self, states: Tensor, cond: Tensor, generator: torch.Generator | None,
                        validate: bool = True, history: StateHistory | None = None) -> Tensor:
        plan = self.plan_normalized(states, cond, generator=generator, validate=validate, history=history)
        return self.model.inverse_dynamics(torch.cat([plan[:, 0], plan[:, 1]], dim=-1))

    def draft(self, states: Tensor, cond: Tensor, steps: int | None = None,
              history: StateHistory | None = None) -> Tensor:
        """The GPT's autoregressive draft: states [B, S], cond [B, 1] -> [B, 1 + steps, S] (default H states).

        With ``history`` (normalised states [B, K, S], conditions [B, K]) the GPT reads the K earlier states first,
        as in training, where a window starts anywhere in an episode and its condition is the return-to-go at
        the window's first step: here the condition held at the first history step. Once the rollout outgrows the
        GPT's window, the window slides and keeps that condition (the rewards of drafted steps are unknown).
        """
        steps = self.config.horizon - 1 if steps is None else steps
        if history is None:
            return self.model.gpt.generate(states[:, None], steps, cond)
        prefix = torch.cat([history.states, states[:, None]], dim=1)
        k = history.states.shape[1]
        return self.model.gpt.generate(prefix, steps, history.returns_to_go[:, :1])[:, k:]


class DecisionTransformerPolicy(PlanningPolicy):
    """The GPT alone: its draft of s_1 (one autoregressive step at decision time) + inverse dynamics."""

    @property
    def nfe(self) -> int:
        return 2  # one GPT forward, one inverse-dynamics call

    def plan_normalized(self, states: Tensor, cond: Tensor, *, generator: torch.Generator | None = None,
                        validate: bool = True, history: StateHistory | None = None) -> Tensor:
        return self.draft(states, cond, history=history)

    def _act_normalized(self, states: Tensor, cond: Tensor, generator: torch.Generator | None,
                        validate: bool = True, history: StateHistory | None = None) -> Tensor:
        plan = self.draft(states, cond, steps=1, history=history)   # only s_1 is acted on: do not roll out the rest
        return self.model.inverse_dynamics(torch.cat([plan[:, 0], plan[:, 1]], dim=-1))


class DiffusionPlanningPolicy(PlanningPolicy):
    """Shared sampling of the diffusion planners: guidance, first-state inpainting, cached Samplers."""

    def __init__(self, model: OfflineModel, *, env_id: str | None = None) -> None:
        super().__init__(model, env_id=env_id)
        self._samplers: dict[tuple[str, int, float], Sampler] = {}

    def denoiser(self, guidance_scale: float | None = None) -> ClassifierFreeGuidance:
        """The UNet under classifier-free guidance (scale default: the config's)."""
        scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        return ClassifierFreeGuidance(self.model.unet, scale)

    def sampler(self, t_start: float, steps: int, solver: str | None = None) -> Sampler:
        """The cached Sampler integrating from ``t_start`` to the schedule's end in ``steps`` steps."""
        solver = solver or self.config.solver
        key = (solver, steps, float(t_start))
        if key not in self._samplers:
            self._samplers[key] = Sampler(self.model.schedule, solver, steps, self.config.prediction,
                                          t_start=t_start)
        return self._samplers[key]

    def diffuse(self, states: Tensor, cond: Tensor, *, steps: int | None = None, solver: str | None = None,
                guidance_scale: float | None = None, generator: torch.Generator | None = None,
                validate: bool = True) -> Tensor:
        """Decision Diffuser sampling: plan [B, H, S] from pure noise x_1 ~ N(0, sigma(1)^2) with s_0 pinned.

        states [B, S], cond [B, 1] (normalised); ``steps`` default: the config's ``sample_steps``.
        """
        pin = self._first_state(states)
        shape = (states.shape[0], self.config.horizon, self.obs_dim)
        x = pin(self.model.schedule.prior_noise(shape, generator=generator, device=states.device), None)
        sampler = self.sampler(1.0, steps or self.config.sample_steps, solver)
        return sampler(self.denoiser(guidance_scale), x, constraint=pin, generator=generator, validate=validate,
                       cond=cond)

    def refine(self, draft: Tensor, cond: Tensor, *, t_mid: float, steps: int, solver: str | None = None,
               guidance_scale: float | None = None, generator: torch.Generator | None = None,
               validate: bool = True) -> Tensor:
        """Trajectory Diffuser refinement: noise ``draft`` [B, H, S] to ``t_mid`` and integrate back to t_end.

        x_{t_mid} = alpha(t_mid) draft + sigma(t_mid) eps (at t_mid = 1 the prior sigma(1) eps, exactly as
        :meth:`diffuse` starts), then ``steps`` solver steps with the first state re-pinned after each.
        For t_mid at or below the schedule's end there is nothing to integrate: the draft comes back.
        """
        if t_mid <= self.model.schedule.t_end_default:
            return draft
        pin = self._first_state(draft[:, 0])
        if t_mid >= 1.0:
            x = self.model.schedule.prior_noise(draft.shape, generator=generator, device=draft.device)
        else:
            eps = torch.randn(draft.shape, generator=generator, device=draft.device)
            alpha, sigma = self.model.schedule.coefficients(t_mid)  # add_noise without device tables
            x = alpha * draft + sigma * eps
        sampler = self.sampler(t_mid, steps, solver)
        return sampler(self.denoiser(guidance_scale), pin(x, None), constraint=pin, generator=generator,
                       validate=validate, cond=cond)

    def _first_state(self, states: Tensor) -> Inpainting:
        """The constraint pinning plan[:, 0] = states [B, S] (a slice over every feature: CUDA-graph safe)."""
        return condition_on_first_state(states, slice(None), horizon=self.config.horizon, dim=self.obs_dim)


class DecisionDiffuserPolicy(DiffusionPlanningPolicy):
    """Plans from pure noise with ``sample_steps`` solver steps (guided), acts by inverse dynamics."""

    @property
    def nfe(self) -> int:
        return self.sampler(1.0, self.config.sample_steps).nfe + 1

    def plan_normalized(self, states: Tensor, cond: Tensor, *, generator: torch.Generator | None = None,
                        validate: bool = True, history: StateHistory | None = None) -> Tensor:
        return self.diffuse(states, cond, generator=generator, validate=validate)


class TrajectoryDiffuserPolicy(DiffusionPlanningPolicy):
    """GPT draft -> noise to t_mid -> ``sample_steps`` guided solver steps -> inverse dynamics."""

    @property
    def nfe(self) -> int:
        c = self.config
        if not c.use_draft:
            return self.sampler(1.0, c.sample_steps).nfe + 1
        refine = self.sampler(c.t_mid, c.sample_steps).nfe if c.t_mid > self.model.schedule.t_end_default else 0
        return (c.horizon - 1) + refine + 1

    def plan_normalized(self, states: Tensor, cond: Tensor, *, generator: torch.Generator | None = None,
                        validate: bool = True, history: StateHistory | None = None) -> Tensor:
        c = self.config
        if not c.use_draft:
            return self.diffuse(states, cond, generator=generator, validate=validate)
        return self.refine(self.draft(states, cond, history=history), cond, t_mid=c.t_mid, steps=c.sample_steps,
                           generator=generator, validate=validate)


POLICIES: dict[str, type[OfflinePolicy]] = {
    "trajectory-diffuser": TrajectoryDiffuserPolicy,
    "decision-diffuser": DecisionDiffuserPolicy,
    "decision-transformer": DecisionTransformerPolicy,
    "behavior-cloning": BehaviorCloningPolicy,
}
"""algorithm name -> its policy class."""


def build_policy(config: OfflineConfig, obs_dim: int, act_dim: int, *, env_id: str | None = None) -> OfflinePolicy:
    """An (untrained) policy of ``config``'s algorithm for the given dims."""
    if type(config).algorithm not in POLICIES:
        raise ValueError(f"config must be one of {[c.__name__ for c in ALGORITHMS.values()]}, got "
                         f"{type(config).__name__}")
    return POLICIES[config.algorithm](OfflineModel(config, obs_dim, act_dim), env_id=env_id)


# ----------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------


def returns_to_go(dataset: D4RLDataset, discount: float = 1.0) -> np.ndarray:
    """R_t = sum_{k >= t} discount^(k - t) r_k within each episode, [N] float64."""
    rewards = dataset.rewards.astype(np.float64)
    out = np.empty_like(rewards)
    for start, end in dataset.episodes():
        reversed_rewards = rewards[start:end][::-1]
        out[start:end] = scipy.signal.lfilter([1.0], [1.0, -discount], reversed_rewards)[::-1]
    return out


def offline_windows(model: OfflineModel, dataset: D4RLDataset) -> SequenceDataset:
    """Normalised windows of the config's horizon (1 for BC); the ``rewards`` key carries the return-to-go."""
    config = model.config
    horizon = getattr(config, "horizon", 1)
    rtg = returns_to_go(dataset, getattr(config, "discount", 1.0)).astype(np.float32)
    labelled = dataclasses.replace(dataset, rewards=rtg)
    norms = {}
    for key, name in (("observations", "state"), ("actions", "action")):
        mean, std = getattr(model, f"{name}_mean"), getattr(model, f"{name}_std")
        norms[key] = GaussianNormalizer.from_state_dict({"mean": mean.double().cpu(), "std": std.double().cpu()})
    return SequenceDataset(labelled, horizon, keys=("observations", "actions", "rewards"), normalizers=norms)


def _batch_sampler(windows: SequenceDataset, batch_size: int) -> Any:
    def sample_batch(generator: torch.Generator) -> dict[str, Tensor]:
        batch = windows.sample_batch(generator, batch_size)
        return {"observations": batch["observations"], "actions": batch["actions"],
                "returns": batch["rewards"][:, 0], "mask": batch["mask"]}

    return sample_batch


# ----------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------


def train_offline(algo_config: OfflineConfig, dataset_path: str | Path, out_dir: str | Path, steps: int,
                  seed: int = 0, resume: bool = False, *, device: str | None = None,
                  progress: bool = False) -> tuple[OfflinePolicy, dict[str, Any]]:
    """Train ``algo_config``'s algorithm on a D4RL-format file; write ``out_dir/policy.safetensors``.

    All nets of the algorithm train jointly (one summed loss) for ``steps`` Trainer updates; trainer
    checkpoints go to ``out_dir/checkpoints`` every ``checkpoint_every`` updates.

    Args:
        algo_config: a config from ``ALGORITHMS`` (TrajectoryDiffuserConfig, ...).
        dataset_path: a D4RL-format HDF5 file (its ``env`` attribute becomes the policy's env id).
        out_dir: run directory.
        steps: total optimizer updates.
        seed: seeds weights init, data order and diffusion noise.
        resume: continue from the newest checkpoint in ``out_dir``; refused (ValueError) when that run
            was for another algorithm, env, obs/action dims or training config (inference fields may change).
        device: "cpu", "cuda", ... (None: cuda when available).
        progress: show a progress bar.
    Returns:
        (the policy with the EMA weights, as loaded from the saved file, the Trainer summary plus ``parameters`` and
        ``policy_path``).
    """
    if type(algo_config) not in ALGORITHMS.values():
        raise ValueError(f"algo_config must be one of {[c.__name__ for c in ALGORITHMS.values()]}, got "
                         f"{type(algo_config).__name__}")
    dataset = load_d4rl(dataset_path)
    env_id = str(dataset.metadata.get("env", "")) or None
    out_dir = Path(out_dir)
    run = _run_record(algo_config, env_id, dataset.obs_dim, dataset.act_dim)
    _check_or_write_run(out_dir, run, resume)
    seed_everything(seed)
    model = OfflineModel(algo_config, dataset.obs_dim, dataset.act_dim)
    model.fit_normalizers(dataset, _target_return(algo_config, dataset))
    sample_batch = _batch_sampler(offline_windows(model, dataset), algo_config.batch_size)
    trainer_config = TrainerConfig(
        steps=steps, batch_size=algo_config.batch_size, lr=algo_config.lr, weight_decay=algo_config.weight_decay,
        warmup_steps=min(algo_config.warmup_steps, steps), grad_clip=algo_config.grad_clip,
        ema_decay=algo_config.ema_decay, checkpoint_every=algo_config.checkpoint_every, out_dir=str(out_dir),
        seed=seed, device=device, progress=progress, tensorboard=False, log_every=max(1, min(100, steps // 10)))
    with Trainer(model, lambda net, batch: net(batch), sample_batch, trainer_config) as trainer:
        summary = trainer.fit(resume=resume)
        trained = trainer.ema_model
    path = save_policy(POLICIES[algo_config.algorithm](trained, env_id=env_id), out_dir / POLICY_FILE)
    summary = {**summary, "parameters": sum(p.numel() for p in trained.parameters()), "policy_path": str(path)}
    # return the file's copy, not the Trainer's EMA module: its parameters do not require grad, for which PyTorch
    # picks other kernels, so a policy loaded later would act differently in the last bits
    return load_policy(path, device=next(trained.parameters()).device), summary


def _target_return(config: OfflineConfig, dataset: D4RLDataset) -> float:
    """The configured target return, or the best episode return-to-go at an episode start."""
    target = getattr(config, "target_return", None)
    if target is not None:
        return float(target)
    rtg = returns_to_go(dataset, getattr(config, "discount", 1.0))
    return float(max(rtg[start] for start, _ in dataset.episodes()))


def _run_record(config: OfflineConfig, env_id: str | None, obs_dim: int, act_dim: int) -> dict[str, Any]:
    return {"algorithm": config.algorithm, "env": env_id, "obs_dim": obs_dim, "act_dim": act_dim,
            "config": config.to_dict()}


def _check_or_write_run(out_dir: Path, run: dict[str, Any], resume: bool) -> None:
    """On resume, refuse a run directory recorded for another algorithm/env/dims or another training config (the
    fields its weights depend on; inference fields may differ); then record this run."""
    record = out_dir / RUN_FILE
    if resume and record.is_file():
        saved = json.loads(record.read_text())
        for key in ("algorithm", "env", "obs_dim", "act_dim"):
            if saved.get(key) != run[key]:
                raise ValueError(f"{out_dir} holds a run with {key}={saved.get(key)!r}, but this run has "
                                 f"{key}={run[key]!r}; resume only the same algorithm on the same env/data, "
                                 "or use another out_dir")
        changed = _changed_training_fields(run["algorithm"], saved.get("config", {}), run["config"])
        if changed:
            raise ValueError(f"{out_dir} holds a run trained with another config ({'; '.join(changed)}, saved vs "
                             "this run); resume only with the same training fields, or use another out_dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(record, json.dumps(run, indent=2).encode())


def _changed_training_fields(algorithm: str, saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``"field: saved vs current"`` for each training field that differs; a field the saved record predates
    counts as its default."""
    config_class = ALGORITHMS[algorithm]
    known = {f.name for f in dataclasses.fields(config_class)}
    saved_full = make_config(algorithm, **{k: v for k, v in saved.items() if k in known}).to_dict()
    return [f"{k}: {saved_full.get(k)!r} vs {v!r}" for k, v in config_class.training_part(current).items()
            if saved_full.get(k) != v]


# ----------------------------------------------------------------------------------------------------
# checkpoints: weights + metadata in one safetensors file
# ----------------------------------------------------------------------------------------------------


def save_policy(policy: OfflinePolicy, path: str | Path) -> Path:
    """Write the policy's weights and normalisers with metadata (algorithm, env, dims, config) as safetensors."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in policy.model.state_dict().items()}
    metadata = {"format": "pt", "trajgen_offline_version": FORMAT_VERSION, "algorithm": policy.algorithm,
                "env": policy.env_id or "", "obs_dim": str(policy.obs_dim), "act_dim": str(policy.act_dim),
                "config": json.dumps(policy.config.to_dict())}
    atomic_write_bytes(path, safetensors.torch.save(state, metadata=metadata))
    return path


def read_policy_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a saved policy: algorithm, env (None if unknown), obs_dim, act_dim, config (dict)."""
    path = _policy_path(path)
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("trajgen_offline_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a trajgen offline policy (no 'trajgen_offline_version' "
                         f"{FORMAT_VERSION} metadata); save policies with save_policy/train_offline")
    return {"algorithm": meta["algorithm"], "env": meta["env"] or None, "obs_dim": int(meta["obs_dim"]),
            "act_dim": int(meta["act_dim"]), "config": json.loads(meta["config"])}


def load_policy(path: str | Path, *, algorithm: str | None = None, env: str | None = None,
                device: str | torch.device | None = None, options: Mapping[str, Any] | None = None) -> OfflinePolicy:
    """Load a policy written by :func:`save_policy` (a file, or a run dir holding ``policy.safetensors``).

    Args:
        algorithm: if given, the file must hold this algorithm.
        env: if given, the file must have been trained on data from this env.
        options: new values of the config's inference fields (``inference_fields``: e.g. ``t_mid``,
            ``sample_steps``, ``guidance_scale``), applied to the trained weights without retraining.
    Raises:
        ValueError: not a trajgen offline policy, another algorithm or env, weights not matching the config, or
            an option that is not an inference field of the algorithm.
    """
    path = _policy_path(path)
    meta = read_policy_metadata(path)
    if algorithm is not None and meta["algorithm"] != algorithm:
        raise ValueError(f"{path} holds a '{meta['algorithm']}' policy, not '{algorithm}'")
    if env is not None and meta["env"] != env:
        raise ValueError(f"{path} was trained on data from env '{meta['env']}', not '{env}'")
    _check_inference_options(meta["algorithm"], options or {})
    config = make_config(meta["algorithm"], **{**meta["config"], **(options or {})})
    policy = build_policy(config, meta["obs_dim"], meta["act_dim"], env_id=meta["env"])
    state = safetensors.torch.load_file(str(path))
    missing, unexpected = set(policy.model.state_dict()) - set(state), set(state) - set(policy.model.state_dict())
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the stored config (missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]})")
    policy.model.load_state_dict(state)
    return policy.to(device) if device is not None else policy


def _check_inference_options(algorithm: str, options: Mapping[str, Any]) -> None:
    """Raise ValueError unless every key of ``options`` is an inference field of ``algorithm``'s config."""
    config_class = ALGORITHMS[algorithm]
    fields = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"options {unknown} are not fields of {config_class.__name__}")
    learned = sorted(set(options) - config_class.inference_fields)
    if learned:
        allowed = sorted(config_class.inference_fields)
        raise ValueError(f"options {learned} change what a '{algorithm}' policy learns: retrain to change them "
                         f"({f'a trained one takes {allowed}' if allowed else 'it has no inference options'})")


def _policy_path(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / POLICY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such policy file")
    return path
