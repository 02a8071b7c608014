"""Driving policies: focal loss, anchors, truncated training, masking, anchored inference, a multi-modal task,
checkpoints, data set and bad input."""

from __future__ import annotations

import dataclasses
import json
import math

import h5py
import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from trajgen.policies.anchors import TrajectoryNormalizer, kmeans_anchors, nearest_anchor, trajectory_bounds
from trajgen.policies.driving import (
    AnchoredDiffusionConfig,
    AnchoredDiffusionPolicy,
    DrivingPolicy,
    DrivingSamples,
    LanePoints,
    RegressionConfig,
    RegressionPolicy,
    VanillaDiffusionConfig,
    VanillaDiffusionPolicy,
    sigmoid_focal_loss,
    train_driving_policy,
    waypoint_lane_features,
)
from trajgen.policies.scene_encoder import ObservationSpec, SceneEncoder, validate_observation

SMALL = {"n_agents": 3, "n_lanes": 2, "lane_points": 4, "d_model": 32, "heads": 2, "encoder_layers": 1,
         "mlp_ratio": 2.0}
SPEC = ObservationSpec(n_agents=3, n_lanes=2, lane_points=4)
TIMES = torch.arange(1, 9) * 0.5


def random_obs(batch: int, spec: ObservationSpec = SPEC, generator: torch.Generator | None = None,
               command: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    g = generator
    if command is None:
        command = torch.randint(0, spec.n_commands, (batch,), generator=g)
    return {
        "ego": torch.randn(batch, spec.ego_features, generator=g),
        "command": F.one_hot(command, spec.n_commands).float(),
        "agents": torch.randn(batch, spec.n_agents, spec.agent_features, generator=g) * 10,
        "agents_mask": (torch.rand(batch, spec.n_agents, generator=g) > 0.4).to(torch.int8),
        "lanes": torch.randn(batch, spec.n_lanes, spec.lane_points, 2, generator=g) * 10,
        "lanes_mask": (torch.rand(batch, spec.n_lanes, generator=g) > 0.3).to(torch.int8),
    }


def plan_from_lateral(lateral: torch.Tensor, speed: torch.Tensor) -> torch.Tensor:
    """Plans [B, 8, 3] with x = speed t, y = lateral(t) [B, 8], heading along the path."""
    x = speed[:, None] * TIMES
    dy = torch.gradient(lateral, spacing=(TIMES,), dim=1)[0]
    heading = torch.atan2(dy, speed[:, None].expand_as(dy))
    return torch.stack([x, lateral, heading], dim=-1)


def smoothstep(t: torch.Tensor, end: float) -> torch.Tensor:
    s = (t / end).clamp(max=1.0)
    return s * s * (3 - 2 * s)


# ---------------------------------------------------------------------------------------------- losses, anchors


def test_focal_loss_matches_hand_computed_values() -> None:
    logits = torch.tensor([0.0, 2.0, -1.0])
    targets = torch.tensor([1.0, 0.0, 1.0])
    p = [0.5, 1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(1.0))]
    expected = [
        0.25 * (1 - p[0]) ** 2 * -math.log(p[0]),       # positive: alpha (1 - p)^2 (-log p)
        0.75 * p[1] ** 2 * -math.log(1 - p[1]),          # negative: (1 - alpha) p^2 (-log(1 - p))
        0.25 * (1 - p[2]) ** 2 * -math.log(p[2]),
    ]
    got = sigmoid_focal_loss(logits, targets, gamma=2.0, alpha=0.25)
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-6, atol=1e-7)
    assert abs(expected[1] - 1.2375) < 1e-3  # 0.75 * 0.8808^2 * log(1 + e^2)


def test_nearest_anchor_uses_mean_xy_distance_only() -> None:
    speed = torch.full((3,), 8.0)
    anchors = plan_from_lateral(torch.stack([0 * TIMES, 4 * smoothstep(TIMES, 4), -4 * smoothstep(TIMES, 4)]), speed)
    truth = anchors[[1, 2, 0]] + torch.tensor([0.3, -0.4, 0.0])
    truth[..., 2] = 3.0  # headings are ignored by the assignment (as DiffusionDrive's xy distance)
    assert nearest_anchor(truth, anchors).tolist() == [1, 2, 0]
    # a plan half-way between two anchors (by mean distance) is assigned to the strictly closer one
    between = 0.45 * anchors[1] + 0.55 * anchors[0]
    assert nearest_anchor(between[None], anchors).tolist() == [0]


def test_kmeans_anchors_recovers_cluster_centres_and_circular_mean_heading() -> None:
    g = torch.Generator().manual_seed(0)
    speed = 8 + 0.2 * torch.randn(300, generator=g)
    which = torch.tensor([0] * 150 + [1] * 100 + [2] * 50)
    lateral = torch.stack([0 * TIMES, 6 * smoothstep(TIMES, 4), -6 * smoothstep(TIMES, 4)])[which]
    plans = plan_from_lateral(lateral, speed)
    anchors = kmeans_anchors(plans, k=3, seed=0)
    assert anchors.shape == (3, 8, 3)
    for slot, cluster in enumerate([0, 1, 2]):  # sorted by size
        members = plans[which == cluster]
        torch.testing.assert_close(anchors[slot, :, :2], members[..., :2].mean(0), atol=1e-4, rtol=0)
        heading = torch.atan2(members[..., 2].sin().mean(0), members[..., 2].cos().mean(0))
        torch.testing.assert_close(anchors[slot, :, 2], heading, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="at least k=3"):
        kmeans_anchors(plans[:2], k=3)
    with pytest.raises(ValueError, match=r"\[S, H, 3\]"):
        kmeans_anchors(plans[..., :2], k=3)


def test_kmeans_anchors_position_scale_separates_turns_that_speed_spread_hides() -> None:
    # straight plans at speeds 2..14 m/s (final x 8..56 m) and two lane changes of +-3 m at 8 m/s: in metres the
    # speed spread dominates and k = 3 splits the straight plans by speed; with x / 24, y / 1.5 (ranges of about
    # +-1 each) the three shapes are the clusters, and the centres come back in metres as the members' means
    g = torch.Generator().manual_seed(0)
    which = torch.tensor([0] * 200 + [1] * 60 + [2] * 40)
    speed = torch.where(which == 0, 2 + 12 * torch.rand(300, generator=g), 8 + 0.1 * torch.randn(300, generator=g))
    lateral = torch.stack([0 * TIMES, 3 * smoothstep(TIMES, 4), -3 * smoothstep(TIMES, 4)])[which]
    plans = plan_from_lateral(lateral, speed)
    in_metres = kmeans_anchors(plans, k=3, seed=0)
    assert in_metres[:, -1, 1].abs().max() < 2.0  # no centre is a lane change
    scaled = kmeans_anchors(plans, k=3, seed=0, position_scale=(24.0, 1.5))
    for slot, cluster in enumerate([0, 1, 2]):  # sorted by size
        torch.testing.assert_close(scaled[slot, :, :2], plans[which == cluster][..., :2].mean(0), atol=1e-4, rtol=0)
    for bad in [(0.0, 1.0), (1.0,), (float("nan"), 1.0)]:
        with pytest.raises(ValueError, match="position_scale"):
            kmeans_anchors(plans, k=3, position_scale=bad)


def test_normalizer_round_trip_and_bounds() -> None:
    low, high = trajectory_bounds(torch.tensor([[[0.0, -10.0, -1.0], [50.0, 10.0, 1.0]]]), margin=0.0)
    assert low == [0.0, -10.0, -1.0] and high == [50.0, 10.0, 1.0]
    norm = TrajectoryNormalizer(low, high)
    x = torch.tensor([[0.0, -10.0, -1.0], [50.0, 10.0, 1.0], [25.0, 0.0, 0.0]])
    torch.testing.assert_close(norm.normalize(x), torch.tensor([[-1.0] * 3, [1.0] * 3, [0.0] * 3]))
    torch.testing.assert_close(norm.denormalize(norm.normalize(x)), x)
    # a slice of the coordinates: (x, y) alone, or the heading alone (first=2)
    torch.testing.assert_close(norm.normalize(x[:, :2]), norm.normalize(x)[:, :2])
    torch.testing.assert_close(norm.normalize(x[:, 2:], first=2), norm.normalize(x)[:, 2:])
    torch.testing.assert_close(norm.denormalize(torch.tensor([[1.0]]), first=2), torch.tensor([[1.0]]))
    with pytest.raises(ValueError, match="not among"):
        norm.normalize(x, first=1)


# ---------------------------------------------------------------------------------------------- encoder


def test_masked_tokens_do_not_influence_anything() -> None:
    torch.manual_seed(0)
    encoder = SceneEncoder(SPEC, width=32, layers=2, heads=2).eval()
    obs = random_obs(4, generator=torch.Generator().manual_seed(1))
    obs["agents_mask"][:, 0] = 1
    obs["agents_mask"][:, -1] = 0
    obs["lanes_mask"][:, 0], obs["lanes_mask"][:, -1] = 1, 0
    tokens, mask = encoder(obs)
    changed = {k: v.clone() for k, v in obs.items()}
    changed["agents"][:, -1] = torch.randn_like(changed["agents"][:, -1]) * 100
    changed["lanes"][:, -1] = torch.randn_like(changed["lanes"][:, -1]) * 100
    tokens2, mask2 = encoder(changed)
    assert torch.equal(mask, mask2)
    torch.testing.assert_close(tokens2, tokens, rtol=0, atol=1e-6)
    assert bool((tokens[~mask] == 0).all())
    # ...while a valid agent does change every token (so the check above can fail)
    changed["agents"][:, 0] += 5.0
    tokens3, _ = encoder(changed)
    assert (tokens3[:, 0] - tokens[:, 0]).abs().max() > 1e-3
    # the whole policy's plan is invariant too
    torch.manual_seed(0)
    policy = RegressionPolicy(RegressionConfig(**SMALL))
    moved = {k: v.clone() for k, v in obs.items()}
    moved["agents"][:, -1] = 1e3
    torch.testing.assert_close(policy.plan(obs).trajectory, policy.plan(moved).trajectory, rtol=0, atol=1e-5)


def test_bad_observations_raise_clear_errors() -> None:
    obs = random_obs(2)
    with pytest.raises(ValueError, match="missing key.*'lanes'"):
        validate_observation({k: v for k, v in obs.items() if k != "lanes"}, SPEC)
    with pytest.raises(ValueError, match=r"observation\['agents'\] must have shape \[B, 3, 8\]"):
        validate_observation({**obs, "agents": obs["agents"][:, :2]}, SPEC)
    bad = {**obs, "lanes": obs["lanes"].clone()}
    bad["lanes"][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"observation\['lanes'\] contains NaN"):
        validate_observation(bad, SPEC)
    with pytest.raises(ValueError, match="one-hot"):
        validate_observation({**obs, "command": torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])}, SPEC)
    with pytest.raises(ValueError, match="agents_mask.*0 and 1"):
        validate_observation({**obs, "agents_mask": obs["agents_mask"] * 2 + 2}, SPEC)
    single = validate_observation({k: v[0].numpy() for k, v in obs.items()}, SPEC)
    assert single["agents"].shape == (1, 3, 8) and single["agents_mask"].dtype == torch.bool
    policy = RegressionPolicy(RegressionConfig(**SMALL))
    with pytest.raises(ValueError, match=r"batch\['trajectory'\] must have shape"):
        policy.loss({**obs, "trajectory": torch.zeros(2, 7, 3)})


# ---------------------------------------------------------------------------------------------- anchored diffusion


def small_anchored(**kwargs) -> AnchoredDiffusionPolicy:
    speed = torch.tensor([6.0, 8.0, 8.0, 8.0])
    lateral = torch.stack([0 * TIMES, 0 * TIMES, 4 * smoothstep(TIMES, 3), -4 * smoothstep(TIMES, 3)])
    config = AnchoredDiffusionConfig(**{**SMALL, "n_anchors": 4, **kwargs})
    return AnchoredDiffusionPolicy(config, plan_from_lateral(lateral, speed))


def test_truncated_training_draws_only_steps_below_truncation() -> None:
    torch.manual_seed(0)
    policy = small_anchored()
    seen: list[torch.Tensor] = []
    policy.decoder.register_forward_hook(lambda module, args, out: seen.append(args[1].detach().clone()))
    obs = random_obs(256)
    batch = {**obs, "trajectory": policy.anchors[torch.randint(0, 4, (256,))]}
    for _ in range(4):
        out = policy.loss(batch)
    assert torch.isfinite(out["loss"]) and {"cls_loss_0", "reg_loss_1"} <= set(out)
    steps = policy.schedule.step_of_time(torch.cat(seen).double()).round().long()
    assert steps.min() >= 0 and steps.max() <= 49
    assert len(steps.unique()) >= 45  # uniform over the 50 truncated steps, not a constant


class IdentityDecoder(nn.Module):
    """x0 = x_t / alpha(t) (exact for zero noise) for the diffused coordinates, the given normalised headings
    [K, H, 1] when x_t has no heading, logits favouring one anchor; records its calls."""

    def __init__(self, schedule, favourite: int, n_anchors: int, heading: torch.Tensor, stages: int = 2) -> None:
        super().__init__()
        self.schedule, self.favourite, self.n_anchors, self.stages = schedule, favourite, n_anchors, stages
        self.heading = heading
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x_t, t, scene, every_stage=True, decide=True):
        self.calls.append((x_t.clone(), t.clone()))
        x0 = x_t / self.schedule.alpha(t.double()).float().view(-1, 1, 1, 1)
        if x0.shape[-1] == 2:
            x0 = torch.cat([x0, self.heading.expand(x0.shape[0], -1, -1, -1)], dim=-1)
        logits = torch.full((x_t.shape[0], self.n_anchors), -3.0)
        logits[:, self.favourite] = 3.0
        return [(x0, logits if decide else None)] * self.stages


@pytest.mark.parametrize(("steps", "heading"), [(2, "predicted"), (3, "predicted"), (2, "diffused")])
def test_anchored_inference_starts_from_noised_anchors_and_calls_the_network_steps_times(steps: int, heading: str
                                                                                         ) -> None:
    """The sampler starts from alpha * anchor + sigma * noise over the diffused coordinates (x, y, and the heading
    only when it is diffused); with zero noise and an exact denoiser the modes are the anchors."""
    policy = small_anchored(steps=steps, heading=heading)
    dims = 2 if heading == "predicted" else 3
    normalized = policy.normalizer.normalize(policy.anchors)
    stub = IdentityDecoder(policy.schedule, favourite=2, n_anchors=4, heading=normalized[..., 2:])
    policy.decoder = stub
    obs = random_obs(3)
    plan = policy.plan(obs, noise=torch.zeros(3, 4, 8, dims))
    assert policy.nfe == steps and len(stub.calls) == steps
    first_x, first_t = stub.calls[0]
    alpha8 = float(policy.schedule.alpha(torch.tensor(9 / 1000, dtype=torch.float64)))
    torch.testing.assert_close(first_t, torch.full((3,), 9 / 1000))  # step 8 sits at t = 9 / 1000
    torch.testing.assert_close(first_x, alpha8 * normalized[..., :dims].expand(3, -1, -1, -1))
    torch.testing.assert_close(plan.modes, policy.anchors.expand(3, -1, -1, -1), atol=1e-4, rtol=0)
    torch.testing.assert_close(plan.trajectory, policy.anchors[2].expand(3, -1, -1), atol=1e-4, rtol=0)
    assert plan.scores.shape == (3, 4) and bool((plan.scores.argmax(-1) == 2).all())
    # with real noise the start is alpha * anchor + sigma * noise
    noise = torch.randn(3, 4, 8, dims)
    stub.calls.clear()
    policy.plan(obs, noise=noise)
    sigma8 = float(policy.schedule.sigma(torch.tensor(9 / 1000, dtype=torch.float64)))
    expected = alpha8 * normalized[..., :dims] + sigma8 * noise
    torch.testing.assert_close(stub.calls[0][0], expected)
    with pytest.raises(ValueError, match="noise must have shape"):
        policy.plan(obs, noise=torch.zeros(3, 4, 8, 5 - dims))


def test_deciding_only_in_the_last_stage_changes_nothing_it_returns() -> None:
    """Inference skips the logits and predicted headings of the earlier stages; what it does return is unchanged."""
    policy = small_anchored().eval()
    g = torch.Generator().manual_seed(3)
    obs = random_obs(2, generator=g)
    with torch.no_grad():
        scene = policy.scene_context(policy.observation_tensors(obs))
        x_t = torch.randn(2, 4, 8, 2, generator=g) * 0.3
        t = torch.full((2,), 0.009)
        full = policy.decoder(x_t, t, scene)
        fast = policy.decoder(x_t, t, scene, every_stage=False)
        none = policy.decoder(x_t, t, scene, decide=False)
    assert all(logits is None for _, logits in fast[:-1] + none)
    assert [plans.shape[-1] for plans, _ in fast] == [2] * (len(fast) - 1) + [3]
    for (plans_a, _), (plans_b, _), (plans_c, _) in zip(full, fast, none, strict=True):
        torch.testing.assert_close(plans_a[..., : plans_b.shape[-1]], plans_b, rtol=0, atol=0)
        torch.testing.assert_close(plans_a[..., :2], plans_c, rtol=0, atol=0)
    torch.testing.assert_close(full[-1], fast[-1], rtol=0, atol=0)


@pytest.mark.parametrize("heading", ["predicted", "diffused"])
def test_decoder_stage_adds_offsets_to_the_diffused_coordinates_and_predicts_the_heading(heading: str) -> None:
    """With a regression head that outputs a constant (zero weights, bias b), a stage returns input + b for the
    diffused coordinates; a predicted heading is pi * tanh(b_heading) radians whatever the input, as DiffusionDrive."""
    torch.manual_seed(0)
    policy = small_anchored(heading=heading).eval()
    stage = policy.decoder.stages[0]
    bias = torch.randn(8, 3) * torch.tensor([0.1, 0.1, 2.0])
    with torch.no_grad():
        stage.reg_head[-1].weight.zero_()
        stage.reg_head[-1].bias.copy_(bias.flatten())
        scene = policy.scene_context(policy.observation_tensors(random_obs(2)))
        dims = policy.config.diffused_dims
        plans = torch.rand(2, 4, 8, dims) * 2 - 1
        query = torch.randn(2, 4, policy.config.d_model)
        _, clean, _ = stage(query, plans, scene, torch.randn(2, policy.config.d_model))
    assert clean.shape == (2, 4, 8, 3)
    torch.testing.assert_close(clean[..., :dims], plans + bias[:, :dims])
    if heading == "predicted":
        radians = policy.normalizer.denormalize(clean)[..., 2]
        torch.testing.assert_close(radians, (math.pi * torch.tanh(bias[:, 2])).expand(2, 4, -1))


def test_an_anchored_checkpoint_older_than_the_heading_field_loads_as_diffused(tmp_path) -> None:
    """Anchored files written before ``heading`` existed diffused the heading: they load with heading='diffused'
    and plan as they did."""
    torch.manual_seed(0)
    policy = small_anchored(heading="diffused").eval()
    old_config = {k: v for k, v in policy.config.to_dict().items() if k != "heading"}
    metadata = {"format": "pt", "algorithm": policy.algorithm, "config": json.dumps(old_config)}
    path = tmp_path / "old.safetensors"
    safetensors.torch.save_file(policy.state_dict(), str(path), metadata=metadata)
    loaded = DrivingPolicy.load(path)
    assert loaded.config.heading == "diffused" and loaded.config == policy.config
    obs = random_obs(2)
    noise = torch.randn(2, 4, 8, 3)
    assert torch.equal(loaded.plan(obs, noise=noise).modes, policy.plan(obs, noise=noise).modes)
    with pytest.raises(ValueError, match="heading"):
        small_anchored().load_weights(path)


def test_anchored_plan_is_reproducible_with_a_generator() -> None:
    torch.manual_seed(0)
    policy = small_anchored()
    obs = random_obs(2)
    a = policy.plan(obs, torch.Generator().manual_seed(5))
    b = policy.plan(obs, torch.Generator().manual_seed(5))
    assert torch.equal(a.modes, b.modes) and torch.equal(a.scores, b.scores)
    assert a.trajectory.shape == (2, 8, 3) and a.modes.shape == (2, 4, 8, 3)


def test_plan_runs_in_eval_mode_and_leaves_the_callers_mode() -> None:
    """A policy in training mode plans exactly as in eval mode (dropout off) and is back in training mode after;
    a policy in eval mode stays there (plan skips the mode switch)."""
    torch.manual_seed(0)
    policy = small_anchored(dropout=0.5)
    obs = random_obs(2)
    policy.train()
    in_training = policy.plan(obs, torch.Generator().manual_seed(5))
    assert policy.training and all(m.training for m in policy.modules())
    policy.eval()
    in_eval = policy.plan(obs, torch.Generator().manual_seed(5))
    assert not any(m.training for m in policy.modules())
    assert torch.equal(in_training.modes, in_eval.modes) and torch.equal(in_training.scores, in_eval.scores)
    assert not in_eval.modes.requires_grad


# ---------------------------------------------------------------------------------------------- multi-modal task


def multimodal_batch(batch: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """left -> turn left, right -> turn right, straight -> lane change left or right with probability 1/2."""
    command = torch.randint(0, 3, (batch,), generator=g)
    obs = random_obs(batch, generator=g, command=command)
    coin = torch.randint(0, 2, (batch,), generator=g) * 2 - 1
    lateral = torch.where(command == 0, 10.0, torch.where(command == 2, -10.0, 4.0 * coin.float()))
    ramp = torch.where(command[:, None] == 1, smoothstep(TIMES, 2.5), smoothstep(TIMES, 4.0))
    speed = 8.0 + 0.3 * torch.randn(batch, generator=g)
    obs["ego"][:, 0] = speed
    obs["trajectory"] = plan_from_lateral(lateral[:, None] * ramp, speed)
    return obs


def ade(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(a[..., :2] - b[..., :2], dim=-1).mean(-1)


def train(policy: DrivingPolicy, steps: int, g: torch.Generator, lr: float) -> None:
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr)
    for _ in range(steps):
        loss = policy.loss(multimodal_batch(64, g))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.fixture
def one_thread():
    """Tiny models train fastest on one thread (and do not fight other processes for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_multimodal_task_anchored_covers_both_modes_while_regression_averages(one_thread) -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    plans = multimodal_batch(600, g)["trajectory"]
    anchored = AnchoredDiffusionPolicy(AnchoredDiffusionConfig(**{**SMALL, "n_anchors": 4}, point_embedding_dim=16,
                                                               norm_low=(-2, -15, -1.5), norm_high=(40, 15, 1.5)),
                                       kmeans_anchors(plans, k=4, seed=0))
    regression = RegressionPolicy(RegressionConfig(**SMALL, norm_low=(-2, -15, -1.5), norm_high=(40, 15, 1.5)))
    # the focal classifier sits on a plateau (constant confidences) for ~300 steps before it uses the command
    train(anchored, 700, g, lr=1e-3)
    train(regression, 300, g, lr=2e-3)

    test = multimodal_batch(90, torch.Generator().manual_seed(123))
    command = test["command"].argmax(-1)
    plan = anchored.plan(test, torch.Generator().manual_seed(0))
    speed = torch.full((1,), 8.0)
    mode_left, mode_right = (plan_from_lateral(s * 4.0 * smoothstep(TIMES, 2.5)[None], speed)[0] for s in (1, -1))
    turns = command != 1
    errors = ade(plan.trajectory[turns], test["trajectory"][turns])  # the wrong turn would be ~11 m off
    assert errors.max() < 2.5 and errors.mean() < 1.0
    straight = ~turns
    best = plan.trajectory[straight]
    to_modes = torch.stack([ade(best, mode_left), ade(best, mode_right)]).min(0).values
    assert to_modes.max() < 2.0, to_modes  # the chosen plan is one of the two lane changes, not their average
    modes = plan.modes[straight]
    assert ade(modes, mode_left).min(-1).values.max() < 2.0  # both lane changes are among the modes
    assert ade(modes, mode_right).min(-1).values.max() < 2.0
    # best-of-modes error against the actual lane change, vs regression's one plan: L1 regression lands between
    # the lane changes (or on one of them, L1 fits a median), about 3 m from the sampled one on average
    assert ade(modes, test["trajectory"][straight][:, None]).min(-1).values.mean() < 1.0
    reg = regression.plan(test)
    assert ade(reg.trajectory[turns], test["trajectory"][turns]).mean() < 1.0  # it did learn the turns
    assert ade(reg.trajectory[straight], test["trajectory"][straight]).mean() > 2.0


# ---------------------------------------------------------------------------------------------- vanilla, checkpoints


@pytest.mark.parametrize("denoiser", ["dit", "unet"])
def test_vanilla_policy_samples_distinct_modes_in_20_steps(denoiser: str) -> None:
    torch.manual_seed(0)
    policy = VanillaDiffusionPolicy(VanillaDiffusionConfig(**SMALL, denoiser=denoiser, denoiser_width=32,
                                                           denoiser_depth=1, n_modes=5))
    obs = random_obs(2)
    out = policy.loss({**obs, "trajectory": torch.randn(2, 8, 3)})
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    plan = policy.plan(obs, torch.Generator().manual_seed(0))
    assert policy.nfe == 20 and plan.modes.shape == (2, 5, 8, 3) and plan.scores is None
    assert torch.equal(plan.trajectory, plan.modes[:, 0])
    assert (plan.modes[:, 0] - plan.modes[:, 1]).abs().max() > 1e-2


def test_checkpoint_round_trip_and_mismatch_errors(tmp_path) -> None:
    torch.manual_seed(0)
    policy = small_anchored()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = policy.save(tmp_path / "anchored.safetensors")
    loaded = DrivingPolicy.load(path)
    assert type(loaded) is AnchoredDiffusionPolicy and loaded.config == policy.config
    assert not any(m.training for m in loaded.modules())  # ready to decide, as from_pretrained conventions
    for key, value in policy.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    obs = random_obs(2)
    a, b = policy.plan(obs, torch.Generator().manual_seed(1)), loaded.plan(obs, torch.Generator().manual_seed(1))
    assert torch.equal(a.modes, b.modes) and torch.equal(a.scores, b.scores)
    assert torch.equal(AnchoredDiffusionPolicy.load(path).anchors, policy.anchors)

    regression_path = RegressionPolicy(RegressionConfig(**SMALL)).save(tmp_path / "regression.safetensors")
    with pytest.raises(ValueError, match="holds a 'regression' policy, not 'anchored-diffusion'"):
        AnchoredDiffusionPolicy.load(regression_path)
    with pytest.raises(ValueError, match="'regression'.*'anchored-diffusion'"):
        policy.load_weights(regression_path)
    other = AnchoredDiffusionPolicy(AnchoredDiffusionConfig(**{**SMALL, "n_anchors": 3}), policy.anchors[:3])
    with pytest.raises(ValueError, match=r"checkpoint vs policy\): n_anchors: 4 vs 3"):
        other.load_weights(path)
    assert small_anchored().load_weights(path).anchors.equal(policy.anchors)
    with pytest.raises(ValueError, match="no policy file"):
        DrivingPolicy.load(tmp_path / "missing.safetensors")


def test_unet_vanilla_is_conditioned_on_the_pooled_scene_and_round_trips(tmp_path) -> None:
    torch.manual_seed(0)
    policy = VanillaDiffusionPolicy(VanillaDiffusionConfig(**SMALL, denoiser="unet", unet_base_dim=8,
                                                           unet_dim_mults=(1, 2))).eval()
    tokens, mask = torch.randn(3, 6, 32), torch.ones(3, 6, dtype=torch.bool)
    mask[:, -1] = False
    x, t = torch.randn(3, 8, 3), torch.rand(3)
    with torch.no_grad():
        condition = policy._condition(tokens, mask)
        assert condition["cond"].shape == (3, 64)  # the regression head's input: pooled query and ego token
        torch.testing.assert_close(condition["cond"], policy.pooling(tokens, mask), rtol=0, atol=0)
        base = policy._denoise(x, t, **condition)
        other = tokens.clone()
        other[:, -1] = 1e3  # a masked token: no influence
        torch.testing.assert_close(policy._denoise(x, t, **policy._condition(other, mask)), base, rtol=0, atol=1e-6)
        other[:, 2] += 1.0  # a valid non-ego token does influence it
        assert (policy._denoise(x, t, **policy._condition(other, mask)) - base).abs().max() > 1e-4
    path = policy.save(tmp_path / "unet.safetensors")
    loaded = DrivingPolicy.load(path)
    assert loaded.config == policy.config and loaded.config.unet_dim_mults == (1, 2)
    obs = random_obs(2)
    a, b = policy.plan(obs, torch.Generator().manual_seed(4)), loaded.plan(obs, torch.Generator().manual_seed(4))
    assert torch.equal(a.trajectory, b.trajectory)
    dit = VanillaDiffusionPolicy(VanillaDiffusionConfig(**SMALL))
    with pytest.raises(ValueError, match="denoiser: 'unet' vs 'dit'"):
        dit.load_weights(path)
    with pytest.raises(ValueError, match="denoiser must be one of"):
        VanillaDiffusionConfig(**SMALL, denoiser="transformer")
    with pytest.raises(ValueError, match="heading must be one of"):
        AnchoredDiffusionConfig(**SMALL, heading="regressed")


@pytest.mark.parametrize(("config_class", "field", "value", "expected"), [
    (AnchoredDiffusionConfig, "n_anchors", 20.0, "must be an int"),
    (AnchoredDiffusionConfig, "d_model", "64", "must be an int"),
    (VanillaDiffusionConfig, "clip_sample", "false", "must be a bool"),
    (VanillaDiffusionConfig, "position_scale", None, "must be a number"),
])
def test_config_refuses_values_of_another_type(config_class: type, field: str, value: object, expected: str) -> None:
    with pytest.raises(ValueError, match=f"{config_class.__name__}.{field} {expected}"):
        config_class(**{**SMALL, field: value})


def test_regression_checkpoint_with_the_old_parameter_names_loads(tmp_path) -> None:
    torch.manual_seed(0)
    policy = RegressionPolicy(RegressionConfig(**SMALL))
    old_names = {key.removeprefix("pooling."): value for key, value in policy.state_dict().items()}
    assert "query" in old_names and "attn.to_q.weight" not in policy.state_dict()  # keys really were renamed
    metadata = {"format": "pt", "algorithm": policy.algorithm, "config": json.dumps(policy.config.to_dict())}
    safetensors.torch.save_file(old_names, str(tmp_path / "old.safetensors"), metadata=metadata)
    loaded = DrivingPolicy.load(tmp_path / "old.safetensors")
    obs = random_obs(2)
    assert torch.equal(loaded.plan(obs).trajectory, policy.plan(obs).trajectory)


def test_a_checkpoint_older_than_a_config_field_loads_with_its_default(tmp_path) -> None:
    """Vanilla checkpoints written before ``denoiser`` existed hold a DiT: they load as one, by both paths."""
    torch.manual_seed(0)
    policy = VanillaDiffusionPolicy(VanillaDiffusionConfig(**SMALL, denoiser_width=32, denoiser_depth=1))
    old_config = {k: v for k, v in policy.config.to_dict().items()
                  if k not in ("denoiser", "unet_base_dim", "unet_dim_mults")}
    metadata = {"format": "pt", "algorithm": policy.algorithm, "config": json.dumps(old_config)}
    path = tmp_path / "old.safetensors"
    safetensors.torch.save_file(policy.state_dict(), str(path), metadata=metadata)
    loaded = DrivingPolicy.load(path)
    assert loaded.config == policy.config and loaded.config.denoiser == "dit"
    copy = VanillaDiffusionPolicy(VanillaDiffusionConfig(**SMALL, denoiser_width=32, denoiser_depth=1))
    copy.load_weights(path)
    for key, value in policy.state_dict().items():
        assert torch.equal(copy.state_dict()[key], value), key


# ---------------------------------------------------------------------------------------------- data and training


def write_samples(path, rows: int) -> None:
    g = torch.Generator().manual_seed(0)
    batch = multimodal_batch(rows, g)
    with h5py.File(path, "w") as f:
        for key, value in batch.items():
            f.create_dataset(key, data=value.numpy())
        f.create_dataset("seed", data=np.arange(rows) % 4)
        f.create_dataset("scenario", data=np.zeros(rows, dtype=np.int64))


def test_driving_samples_reads_filters_and_validates(tmp_path) -> None:
    path = tmp_path / "samples.h5"
    write_samples(path, 40)
    data = DrivingSamples(path, spec=SPEC, seeds=[0, 1])
    assert len(data) == 20
    item = data[3]
    assert item["agents"].shape == (3, 8) and item["agents_mask"].dtype == torch.bool
    assert item["trajectory"].shape == (8, 3) and int(item["seed"]) in (0, 1)
    assert data.trajectories().shape == (20, 8, 3)
    with h5py.File(path, "a") as f:
        del f["lanes"]
        f.create_dataset("lanes", data=np.zeros((40, 2, 5, 2)))
    with pytest.raises(ValueError, match=r"'lanes'.*must have shape \[rows, 2, 4, 2\]"):
        DrivingSamples(path, spec=SPEC)
    with h5py.File(path, "a") as f:
        del f["lanes"]
    with pytest.raises(ValueError, match=r"missing key\(s\) \['lanes'\]"):
        DrivingSamples(path, spec=SPEC)


def test_train_driving_policy_checkpoints_and_resumes(tmp_path) -> None:
    from trajgen.training import TrainerConfig

    path = tmp_path / "samples.h5"
    write_samples(path, 64)
    data = DrivingSamples(path, spec=SPEC)
    torch.manual_seed(0)
    policy = AnchoredDiffusionPolicy(AnchoredDiffusionConfig(**{**SMALL, "n_anchors": 4}),
                                     kmeans_anchors(data.trajectories(), 4))
    config = TrainerConfig(steps=4, batch_size=16, warmup_steps=1, checkpoint_every=2, out_dir=str(tmp_path / "run"),
                           progress=False, tensorboard=False, device="cpu", log_every=1)
    trained, summary = train_driving_policy(policy, data, config)
    assert summary["step"] == 4 and np.isfinite(summary["final_loss"])
    reloaded = DrivingPolicy.load(summary["policy_file"])
    assert torch.equal(reloaded.anchors, trained.anchors)
    config.steps = 5
    _, resumed = train_driving_policy(policy, data, config)
    assert resumed["step"] == 5 and len(resumed["history"]["loss"]) == 1  # continued from step 4
    with pytest.raises(ValueError, match="no anchors"):
        train_driving_policy(AnchoredDiffusionPolicy(AnchoredDiffusionConfig(**{**SMALL, "n_anchors": 4})), data,
                             config)


def test_train_driving_policy_refuses_to_resume_checkpoints_of_another_build(tmp_path) -> None:
    """Same state-dict shapes, another schedule / other anchors / another algorithm: refused, naming the difference
    (the Trainer alone would load them); resume=False starts over and records the new build."""
    from trajgen.training import TrainerConfig

    path = tmp_path / "samples.h5"
    write_samples(path, 64)
    data = DrivingSamples(path, spec=SPEC)
    anchors = kmeans_anchors(data.trajectories(), 4)
    settings = {**SMALL, "n_anchors": 4}
    config = TrainerConfig(steps=2, batch_size=16, warmup_steps=1, checkpoint_every=2, out_dir=str(tmp_path / "run"),
                           progress=False, tensorboard=False, device="cpu", log_every=1)
    train_driving_policy(AnchoredDiffusionPolicy(AnchoredDiffusionConfig(**settings), anchors), data, config)
    config.steps = 3
    other_schedule = AnchoredDiffusionPolicy(AnchoredDiffusionConfig(**settings, beta_end=0.03), anchors)
    with pytest.raises(ValueError, match=r"built differently.*beta_end: 0\.02 vs 0\.03"):
        train_driving_policy(other_schedule, data, config)
    other_anchors = AnchoredDiffusionPolicy(AnchoredDiffusionConfig(**settings), anchors + 0.5)
    with pytest.raises(ValueError, match=r"built differently.*anchors"):
        train_driving_policy(other_anchors, data, config)
    with pytest.raises(ValueError, match=r"algorithm 'anchored-diffusion' vs 'regression'"):
        train_driving_policy(RegressionPolicy(RegressionConfig(**SMALL)), data, config)
    _, fresh = train_driving_policy(other_anchors, data, config, resume=False)
    assert fresh["step"] == 3 and len(fresh["history"]["loss"]) == 3  # started over
    config.steps = 4
    _, resumed = train_driving_policy(other_anchors, data, config)
    assert resumed["step"] == 4 and len(resumed["history"]["loss"]) == 1  # the new build resumes


# ---------------------------------------------------------------------------------------------- waypoint map features


def lane_table(*lanes: list[tuple[float, float]], valid: list[bool] | None = None) -> LanePoints:
    """LanePoints of one scene from lanes of equal point counts (metres)."""
    points = torch.tensor([lanes], dtype=torch.float32)  # [1, M, P, 2]
    mask = torch.tensor([valid if valid is not None else [True] * len(lanes)])
    return LanePoints.from_observation(points, mask)


def test_waypoint_features_are_the_offset_in_the_nearest_lanes_frame() -> None:
    """Hand-built lanes: an eastbound lane on y = 0 and a northbound one on x = 20. A waypoint 1 m left of and 1 m
    past a point of the first lies at (+1, +1) / 2 in its frame; one 1 m west of the second (its left) and 0.5 m
    past a point, (+1, +0.5) / 2 with direction (0, 1); a far one is clamped to max_offset."""
    east = [(3.0 * i, 0.0) for i in range(5)]
    north = [(20.0, 3.0 * i) for i in range(5)]
    lanes = lane_table(east, north)
    waypoints = torch.tensor([[[[4.0, 1.0], [19.0, 6.5], [6.0, -40.0]]]])  # [1, 1, 3, 2]
    features = waypoint_lane_features(waypoints, lanes)[0, 0]  # 2 m per unit, clamped to +-5
    expected = torch.tensor([[0.5, 0.5, 1.0, 0.0], [0.5, 0.25, 0.0, 1.0], [-5.0, 0.0, 1.0, 0.0]])
    torch.testing.assert_close(features, expected)


def test_waypoint_features_ignore_masked_lanes_and_repeated_end_points() -> None:
    """A masked lane never counts however near; a lane's repeated end point (no tangent) is skipped for the last
    distinct one; a scene with no valid lane gives zeros."""
    near = [(3.0 * i, 0.5) for i in range(5)]
    far = [(3.0 * i, -3.0) for i in range(5)]
    waypoints = torch.tensor([[[[6.0, 0.0]]]])
    masked = waypoint_lane_features(waypoints, lane_table(near, far, valid=[False, True]))[0, 0, 0]
    torch.testing.assert_close(masked, torch.tensor([1.5, 0.0, 1.0, 0.0]))
    ending = [(0.0, 0.0), (3.0, 0.0), (3.0, 0.0), (3.0, 0.0)]
    past_end = waypoint_lane_features(torch.tensor([[[[4.0, -1.0]]]]), lane_table(ending))[0, 0, 0]
    torch.testing.assert_close(past_end, torch.tensor([-0.5, 0.5, 1.0, 0.0]))
    none = waypoint_lane_features(waypoints, lane_table(near, far, valid=[False, False]))
    assert torch.equal(none, torch.zeros(1, 1, 1, 4))


def test_waypoint_features_are_invariant_to_moving_the_scene() -> None:
    """Rotating and translating lanes and waypoints together leaves the offsets unchanged and rotates the
    directions: the features depend on where a waypoint lies relative to the lanes, not on the frame."""
    g = torch.Generator().manual_seed(0)
    s = torch.linspace(0, 1, 12)
    curve = torch.stack([30 * s, 8 * s**2], dim=-1)
    lanes = torch.stack([curve, curve + torch.tensor([0.0, 3.5]), curve.flip(0) + torch.tensor([5.0, -4.0])])[None]
    mask = torch.tensor([[True, True, True]])
    waypoints = torch.rand(1, 3, 8, 2, generator=g) * torch.tensor([30.0, 10.0]) - torch.tensor([0.0, 3.0])
    angle = 0.7
    rotation = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    shift = torch.tensor([-12.0, 5.0])
    base = waypoint_lane_features(waypoints, LanePoints.from_observation(lanes, mask))
    moved = waypoint_lane_features(waypoints @ rotation.T + shift,
                                   LanePoints.from_observation(lanes @ rotation.T + shift, mask))
    torch.testing.assert_close(moved[..., :2], base[..., :2], atol=1e-4, rtol=0)
    torch.testing.assert_close(moved[..., 2:], base[..., 2:] @ rotation.T, atol=1e-5, rtol=0)


def test_the_decoder_reads_where_the_plans_lie_relative_to_the_lanes() -> None:
    """With waypoint map features the plans depend on the lane points beyond the lane tokens: moving one lane changes
    the stage queries even when the scene tokens are held fixed; without them the queries do not move."""
    torch.manual_seed(0)
    for enabled in (True, False):
        policy = small_anchored(waypoint_map_features=enabled).eval()
        obs = policy.observation_tensors(random_obs(2))
        scene = policy.scene_context(obs)
        moved = LanePoints.from_observation(obs["lanes"] + torch.tensor([0.0, 2.0]), obs["lanes_mask"])
        plans = policy.normalizer.normalize(policy.anchors[..., :2]).expand(2, -1, -1, -1)
        with torch.no_grad():
            query = policy.decoder.stage_query(plans, scene)
            query_moved = policy.decoder.stage_query(plans, dataclasses.replace(scene, lanes=moved))
        assert (not torch.allclose(query, query_moved)) if enabled else torch.equal(query, query_moved)
        assert (scene.lanes is not None) == enabled
    with pytest.raises(ValueError, match="waypoint map features"):
        small_anchored().decoder(plans, torch.full((2,), 0.009), dataclasses.replace(scene, lanes=None))


def test_an_anchored_checkpoint_older_than_waypoint_features_loads_without_them(tmp_path) -> None:
    """Files written before ``waypoint_map_features`` existed had no waypoint encoder: they load with the field
    False and plan as a policy built that way."""
    torch.manual_seed(0)
    policy = small_anchored(waypoint_map_features=False).eval()
    old_config = {k: v for k, v in policy.config.to_dict().items() if k != "waypoint_map_features"}
    metadata = {"format": "pt", "algorithm": policy.algorithm, "config": json.dumps(old_config)}
    path = tmp_path / "old.safetensors"
    safetensors.torch.save_file(policy.state_dict(), str(path), metadata=metadata)
    loaded = DrivingPolicy.load(path)
    assert loaded.config.waypoint_map_features is False and loaded.config == policy.config
    obs = random_obs(2)
    noise = torch.randn(2, 4, 8, 2)
    assert torch.equal(loaded.plan(obs, noise=noise).modes, policy.plan(obs, noise=noise).modes)
    with pytest.raises(ValueError, match="waypoint_map_features"):
        small_anchored().load_weights(path)
