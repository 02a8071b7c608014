"""Offline policies: Trajectory Diffuser, Decision Diffuser, DT-style, BC; training, checkpoints, evaluation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from trajgen.agents.offline import OfflineAgent, decision_latency, evaluate
from trajgen.data import load_d4rl, write_d4rl
from trajgen.policies.offline import (
    ALGORITHMS,
    BehaviorCloningConfig,
    DecisionDiffuserConfig,
    StateHistory,
    TrajectoryDiffuserConfig,
    build_policy,
    load_policy,
    make_config,
    read_policy_metadata,
    returns_to_go,
    save_policy,
    train_offline,
)

S, A = 4, 2
A_SYS = np.array([[0.9, 0.2, 0.0, 0.0], [-0.2, 0.9, 0.0, 0.0], [0.0, 0.0, 0.8, 0.3], [0.0, 0.0, -0.3, 0.8]])
B_SYS = np.array([[1.0, 0.0], [0.0, 0.5], [0.5, 1.0], [0.0, -1.0]])
TINY = {"horizon": 8, "unet_base_dim": 8, "unet_dim_mults": (1, 2), "diffusion_steps": 100, "gpt_width": 32,
        "gpt_depth": 1, "gpt_heads": 2, "invdyn_hidden": 64, "invdyn_depth": 1, "sample_steps": 3, "batch_size": 32,
        "warmup_steps": 20}


def linear_system(n_episodes: int, length: int, seed: int) -> dict[str, np.ndarray]:
    """Rollouts of s' = A s + B a with uniform random actions: the exact inverse is a = pinv(B) (s' - A s)."""
    rng = np.random.default_rng(seed)
    obs, acts, nxt = [], [], []
    for _ in range(n_episodes):
        s = rng.standard_normal(S)
        for _ in range(length):
            a = rng.uniform(-1, 1, A)
            s_next = A_SYS @ s + B_SYS @ a
            obs.append(s), acts.append(a), nxt.append(s_next)
            s = s_next
    obs, nxt = np.asarray(obs), np.asarray(nxt)
    n = len(obs)
    ends = np.zeros(n, dtype=bool)
    ends[length - 1::length] = True
    return {"observations": obs, "actions": np.asarray(acts), "next_observations": nxt,
            "rewards": -0.1 * (obs**2).sum(1), "terminals": np.zeros(n, dtype=bool), "timeouts": ends}


@pytest.fixture(scope="module")
def linear_file(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("data") / "linear.hdf5"
    return write_d4rl(path, linear_system(30, 40, seed=0), env="Linear-v0", policy="uniform", seed=0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small nets on a shared CPU: one intra-op thread is fastest and avoids oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained_td(linear_file, tmp_path_factory: pytest.TempPathFactory):
    """A tiny Trajectory Diffuser trained jointly (GPT + UNet + inverse dynamics) for 150 updates."""
    out = tmp_path_factory.mktemp("td")
    config = TrajectoryDiffuserConfig(**TINY, lr=3e-3, ema_decay=0.9, checkpoint_every=150)
    policy, summary = train_offline(config, linear_file, out, steps=150, seed=0, device="cpu")
    return policy, summary, out


def tiny(algorithm: str, **overrides):
    """An untrained policy of ``algorithm`` with the TINY nets (fields the algorithm has)."""
    fields = {f.name for f in dataclasses.fields(ALGORITHMS[algorithm])} & set(TINY) - set(overrides)
    torch.manual_seed(0)
    return build_policy(make_config(algorithm, **{k: TINY[k] for k in fields}, **overrides), S, A, env_id="Linear-v0")


# ------------------------------------------------------------------------------------------------ training


def test_inverse_dynamics_recovers_exact_actions(trained_td) -> None:
    policy, summary, _ = trained_td
    assert summary["step"] == 150 and np.isfinite(summary["final_loss"])
    data = linear_system(5, 40, seed=123)                       # held-out transitions
    s, s_next = torch.tensor(data["observations"]).float(), torch.tensor(data["next_observations"]).float()
    model = policy.model
    with torch.no_grad():
        pair = torch.cat([model.normalize_states(s), model.normalize_states(s_next)], -1)
        predicted = model.unnormalize_actions(model.inverse_dynamics(pair)).numpy()
    exact = np.linalg.lstsq(B_SYS, (data["next_observations"] - data["observations"] @ A_SYS.T).T, rcond=None)[0].T
    np.testing.assert_allclose(exact, data["actions"], atol=1e-9)   # the reference itself is exact
    rmse = np.sqrt(((predicted - exact) ** 2).mean())
    assert rmse < 0.1 * exact.std(), f"inverse-dynamics RMSE {rmse:.3f} vs action std {exact.std():.3f}"


def test_gpt_loss_ignores_targets_past_the_episode_end() -> None:
    """The GPT is scored only on next states inside the episode: changing the padded states after the end leaves
    the loss unchanged, and it equals the MSE over the valid targets alone."""
    model = tiny("decision-transformer").model
    torch.manual_seed(1)
    states, cond = torch.randn(3, TINY["horizon"], S), torch.rand(3, 1)
    mask = torch.ones(3, TINY["horizon"], dtype=torch.bool)
    mask[0, 5:], mask[2, 2:] = False, False                     # windows that run past their episode's end
    padded = states.clone()
    padded[~mask] = 100.0
    with torch.no_grad():
        loss, loss_padded = model._gpt_loss(states, cond, mask), model._gpt_loss(padded, cond, mask)
        error = (model.gpt(states[:, :-1], cond) - states[:, 1:]).pow(2).mean(-1)
    assert loss == pytest.approx(loss_padded.item(), rel=1e-6)
    assert loss == pytest.approx(error[mask[:, 1:]].mean().item(), rel=1e-6)


def test_returns_to_go_closed_form(linear_file) -> None:
    ds = load_d4rl(linear_file)
    rtg = returns_to_go(ds, discount=0.5)
    r = ds.rewards[:40].astype(np.float64)
    expected_first = sum(0.5**k * r[k] for k in range(40))
    assert rtg[0] == pytest.approx(expected_first, rel=1e-9)
    assert rtg[39] == pytest.approx(r[39], rel=1e-6)          # last step of episode 0: no carry into episode 1
    assert rtg[38] == pytest.approx(r[38] + 0.5 * r[39], rel=1e-6)
    undiscounted = returns_to_go(ds)
    starts = [s for s, _ in ds.episodes()]
    np.testing.assert_allclose(undiscounted[starts], ds.episode_returns(), rtol=1e-9)


# ------------------------------------------------------------------------------------------------ sampling


def test_refine_with_t_mid_zero_returns_the_draft() -> None:
    policy = tiny("trajectory-diffuser")
    states, cond = torch.randn(3, S), torch.rand(3, 1)
    draft = policy.draft(states, cond)
    assert draft.shape == (3, 8, S)
    assert torch.equal(policy.refine(draft, cond, t_mid=0.0, steps=3), draft)
    t_small = 2.0 * policy.model.schedule.t_end_default
    near = policy.refine(draft, cond, t_mid=t_small, steps=1, generator=torch.Generator().manual_seed(0))
    sigma = float(policy.model.schedule.sigma(t_small))
    assert 0 < (near - draft).abs().max() < 10 * sigma       # continuous in t_mid: moves by O(sigma)


def test_refine_from_t_mid_one_is_decision_diffuser_sampling() -> None:
    policy = tiny("trajectory-diffuser", guidance_scale=1.7)
    states, cond = torch.randn(2, S), torch.rand(2, 1)
    draft = policy.draft(states, cond)
    refined = policy.refine(draft, cond, t_mid=1.0, steps=6, generator=torch.Generator().manual_seed(7))
    diffused = policy.diffuse(states, cond, steps=6, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(refined, diffused, rtol=0, atol=1e-6)
    other = torch.cat([draft[:, :1], torch.randn_like(draft[:, 1:])], dim=1)   # same s_0, another draft
    other_draft = policy.refine(other, cond, t_mid=1.0, steps=6,
                                generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(other_draft, diffused, rtol=0, atol=1e-6)  # the draft is forgotten


@pytest.mark.parametrize("algorithm", ["trajectory-diffuser", "decision-diffuser", "decision-transformer"])
def test_first_state_of_every_plan_is_the_current_state(algorithm: str) -> None:
    policy = tiny(algorithm)
    states, cond = torch.randn(5, S), torch.rand(5, 1)
    plan = policy.plan_normalized(states, cond, generator=torch.Generator().manual_seed(1))
    assert plan.shape == (5, 8, S)
    assert torch.equal(plan[:, 0], states)
    assert not torch.equal(plan[:, 1], states)
    obs = torch.randn(5, S) * 3 + 1
    assert torch.equal(policy.plan(obs)[:, 0], obs)


def test_guidance_scale_one_is_the_conditional_model() -> None:
    policy = tiny("decision-diffuser")
    unet = policy.model.unet
    x, t, cond = torch.randn(3, 8, S), torch.rand(3), torch.rand(3, 1)
    with torch.no_grad():
        conditional = unet(x, t, cond=cond)
        unconditional = unet(x, t, cond=cond, cond_mask=torch.zeros(3, dtype=torch.bool))
        torch.testing.assert_close(policy.denoiser(1.0)(x, t, cond=cond), conditional, rtol=0, atol=0)
        guided = policy.denoiser(2.5)(x, t, cond=cond)
    torch.testing.assert_close(guided, unconditional + 2.5 * (conditional - unconditional), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(conditional, unconditional)   # the null embedding really differs
    states = torch.randn(3, S)
    a = policy.diffuse(states, cond, steps=4, guidance_scale=1.0, generator=torch.Generator().manual_seed(3))
    pin = policy._first_state(states)
    x1 = pin(policy.model.schedule.prior_noise((3, 8, S), generator=torch.Generator().manual_seed(3)), None)
    b = policy.sampler(1.0, 4)(lambda x_t, t_, cond: unet(x_t, t_, cond=cond), x1, constraint=pin, cond=cond)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_decisions_and_nfe() -> None:
    td, dd = tiny("trajectory-diffuser"), tiny("decision-diffuser", sample_steps=20)
    assert dd.nfe == dd.sampler(1.0, 20).nfe + 1 >= 21
    assert td.nfe == 7 + td.sampler(0.3, 3).nfe + 1
    for policy in (td, dd, tiny("decision-transformer"), tiny("behavior-cloning")):
        actions = OfflineAgent(policy, seed=0).act(np.random.default_rng(0).standard_normal((4, S)))
        assert actions.shape == (4, A) and actions.dtype == np.float64 and np.isfinite(actions).all()


# ------------------------------------------------------------------------------------------------ bad input


def test_act_rejects_wrong_observation_shapes() -> None:
    agent = OfflineAgent(tiny("behavior-cloning"))
    with pytest.raises(ValueError, match=r"obs must have shape \[B, 4\].*obs\[None\]"):
        agent.act(np.zeros(S))
    with pytest.raises(ValueError, match=r"\[B, 4\]"):
        agent.act(np.zeros((2, S + 1)))
    with pytest.raises(ValueError, match="finite"):
        agent.act(np.full((1, S), np.nan))
    with pytest.raises(ValueError, match="returns_to_go"):
        tiny("trajectory-diffuser").act(torch.zeros(2, S), torch.zeros(3))


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="unknown algorithm"):
        make_config("diffuser")
    with pytest.raises(ValueError, match="no field"):
        make_config("behavior-cloning", horizon=4)
    with pytest.raises(ValueError, match="t_mid"):
        TrajectoryDiffuserConfig(t_mid=1.5)
    with pytest.raises(ValueError, match="solver"):
        DecisionDiffuserConfig(solver="nope")
    with pytest.raises(ValueError, match="horizon"):
        TrajectoryDiffuserConfig(horizon=1)


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("use_draft", "false", "must be a bool"),      # a str would read as True
    ("t_mid", "0.1", "must be a number"),
    ("horizon", 16.0, "must be an int"),
    ("sample_steps", True, "must be an int"),
    ("solver", 3, "must be a string"),
])
def test_config_refuses_values_of_another_type(field: str, value: object, expected: str) -> None:
    with pytest.raises(ValueError, match=f"TrajectoryDiffuserConfig.{field} {expected}"):
        make_config("trajectory-diffuser", **{field: value})


def test_config_accepts_an_int_for_a_float_and_none_where_optional() -> None:
    config = make_config("trajectory-diffuser", t_mid=0, target_return=None, guidance_scale=2)
    assert config.t_mid == 0 and config.target_return is None


# ------------------------------------------------------------------------------------------------ checkpoints


def test_checkpoint_round_trip_and_mismatch(trained_td) -> None:
    policy, _, out = trained_td
    meta = read_policy_metadata(out)
    assert meta["algorithm"] == "trajectory-diffuser" and meta["env"] == "Linear-v0"
    assert (meta["obs_dim"], meta["act_dim"]) == (S, A) and meta["config"]["t_mid"] == TrajectoryDiffuserConfig.t_mid
    loaded = load_policy(out, algorithm="trajectory-diffuser", env="Linear-v0")
    obs = np.random.default_rng(5).standard_normal((3, S))
    saved, restored = policy.model.state_dict(), loaded.model.state_dict()
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[k], restored[k]) for k in saved)
    # the same weights and noise give the same actions to the last bit (train_offline returns the file's copy)
    np.testing.assert_array_equal(OfflineAgent(loaded, seed=1).act(obs), OfflineAgent(policy, seed=1).act(obs))
    assert loaded.default_return == pytest.approx(policy.default_return) and loaded.default_return != 0
    with pytest.raises(ValueError, match="'trajectory-diffuser' policy, not 'decision-diffuser'"):
        load_policy(out, algorithm="decision-diffuser")
    with pytest.raises(ValueError, match="env 'Linear-v0', not 'Hopper-v5'"):
        load_policy(out / "policy.safetensors", env="Hopper-v5")
    with pytest.raises(ValueError, match="not a trajgen offline policy"):
        load_policy(out / "checkpoints" / "step_00000150" / "model.safetensors")


def test_inference_options_on_load_change_the_decision_not_the_weights(trained_td) -> None:
    policy, _, out = trained_td
    draft_only = load_policy(out, options={"t_mid": 0.0, "sample_steps": 1})
    assert (draft_only.config.t_mid, draft_only.config.sample_steps) == (0.0, 1)
    assert all(torch.equal(v, policy.model.state_dict()[k]) for k, v in draft_only.model.state_dict().items())
    states, cond = torch.randn(4, S), torch.rand(4, 1)
    # t_mid = 0: nothing to refine, the plan is the GPT's draft (refine's closed form)
    assert torch.equal(draft_only.plan_normalized(states, cond), draft_only.draft(states, cond))
    assert draft_only.nfe == policy.config.horizon - 1 + 1          # the draft's GPT calls and the inverse dynamics
    with pytest.raises(ValueError, match=r"\['unet_base_dim'\] change what a 'trajectory-diffuser' policy learns"):
        load_policy(out, options={"unet_base_dim": 8})
    with pytest.raises(ValueError, match=r"\['t_mdi'\] are not fields of TrajectoryDiffuserConfig"):
        load_policy(out, options={"t_mdi": 0.1})
    with pytest.raises(ValueError, match="t_mid must be in"):
        load_policy(out, options={"t_mid": 1.5})


def test_training_resumes(linear_file, tmp_path) -> None:
    config = BehaviorCloningConfig(hidden_dim=32, depth=1, batch_size=16, warmup_steps=2, checkpoint_every=5)
    _, first = train_offline(config, linear_file, tmp_path, steps=5, seed=0, device="cpu")
    policy, second = train_offline(config, linear_file, tmp_path, steps=8, seed=0, resume=True, device="cpu")
    assert first["step"] == 5 and second["step"] == 8 and len(second["history"]["step"]) <= 3
    save_policy(policy, tmp_path / "bc.safetensors")
    assert read_policy_metadata(tmp_path / "bc.safetensors")["algorithm"] == "behavior-cloning"
    with pytest.raises(ValueError, match="algorithm='behavior-cloning'"):
        train_offline(TrajectoryDiffuserConfig(**TINY), linear_file, tmp_path, steps=2, resume=True)
    wider = dataclasses.replace(config, hidden_dim=64)
    with pytest.raises(ValueError, match="another config .*hidden_dim: 32 vs 64"):
        train_offline(wider, linear_file, tmp_path, steps=9, resume=True)
    td = TrajectoryDiffuserConfig(**TINY, checkpoint_every=2)
    train_offline(td, linear_file, tmp_path / "td", steps=2, device="cpu")
    resumed, summary = train_offline(dataclasses.replace(td, t_mid=0.2), linear_file, tmp_path / "td", steps=3,
                                     resume=True, device="cpu")   # an inference field may change on resume
    assert summary["step"] == 3 and resumed.config.t_mid == 0.2


# ------------------------------------------------------------------------------------------------ evaluation


def test_evaluate_hopper_counts_episodes_and_matches_a_single_env_rollout() -> None:
    import gymnasium as gym

    torch.manual_seed(0)
    policy = build_policy(BehaviorCloningConfig(hidden_dim=32, depth=1), 11, 3, env_id="Hopper-v5")
    result = evaluate(policy, "Hopper-v5", n_episodes=3, seed=10, num_envs=2, max_episode_steps=25)
    assert result["episodes"] == 3 and len(result["returns"]) == len(result["lengths"]) == 3
    assert all(1 <= n <= 25 for n in result["lengths"]) and result["env_steps"] == sum(result["lengths"])
    assert result["policy_calls"] == max(result["lengths"][:2]) + result["lengths"][2]   # one call per step
    assert np.isfinite([result["return_mean"], result["return_se"], result["score_mean"], result["score_se"],
                        result["env_steps_per_s"]]).all()
    # episode 2 (seed 12), replayed alone in a plain env, gives the same return and length
    env = gym.make("Hopper-v5", max_episode_steps=25)
    obs, _ = env.reset(seed=12)
    agent, total, steps, done = OfflineAgent(policy), 0.0, 0, False
    while not done:
        action = np.clip(agent.act(obs[None])[0], env.action_space.low, env.action_space.high)
        obs, reward, terminated, truncated, _ = env.step(action)
        total, steps, done = total + reward, steps + 1, terminated or truncated
    assert result["lengths"][2] == steps
    assert result["returns"][2] == pytest.approx(total, rel=1e-5)
    expected_score = 100 * (np.mean(result["returns"]) + 20.272305) / (3234.3 + 20.272305)
    assert result["score_mean"] == pytest.approx(expected_score)


def test_evaluate_with_a_target_return_conditions_on_it_and_floors_at_its_fraction() -> None:
    """The return condition starts at ``target_return`` and follows R - r, floored at min_return_fraction of that
    target, checked against the same episode replayed by hand in a plain env."""
    import gymnasium as gym

    torch.manual_seed(0)
    config = make_config("decision-transformer", **{k: v for k, v in TINY.items() if k.startswith("gpt") or
                                                    k in ("horizon", "invdyn_hidden", "invdyn_depth")})
    policy = build_policy(config, 11, 3, env_id="Hopper-v5")
    seen: list[float] = []
    act = policy.act

    def spy(obs, returns_to_go=None, **kwargs):
        seen.append(float(returns_to_go[0]))
        return act(obs, returns_to_go, **kwargs)

    policy.act = spy
    target = 2.5
    result = evaluate(policy, "Hopper-v5", n_episodes=1, seed=3, max_episode_steps=6, target_return=target)
    env = gym.make("Hopper-v5", max_episode_steps=6)
    obs, _ = env.reset(seed=3)
    agent, rtg, expected, done = OfflineAgent(policy, seed=3), target, [], False
    while not done:
        expected.append(rtg)
        action = np.clip(agent.act(obs[None], np.array([rtg]))[0], env.action_space.low, env.action_space.high)
        obs, reward, terminated, truncated, _ = env.step(action)
        rtg, done = max(rtg - reward, config.min_return_fraction * target), terminated or truncated
    assert seen[:len(expected)] == pytest.approx(expected, rel=1e-6) and len(expected) == result["lengths"][0]
    assert expected[-1] == pytest.approx(target / 3)   # the floor of this target, not of the policy's default
    with pytest.raises(ValueError, match="target_return"):
        evaluate(policy, "Hopper-v5", n_episodes=1, target_return=float("nan"))


def test_evaluate_diffusion_planner_and_env_mismatch() -> None:
    torch.manual_seed(0)
    config = TrajectoryDiffuserConfig(**TINY)
    policy = build_policy(config, 11, 3, env_id="Hopper-v5")
    result = evaluate(policy, "Hopper-v5", n_episodes=2, seed=0, max_episode_steps=4)
    assert result["episodes"] == 2 and np.isfinite(result["returns"]).all() and max(result["lengths"]) <= 4
    with pytest.raises(ValueError, match="cannot evaluate it in 'Walker2d-v5'"):
        evaluate(policy, "Walker2d-v5", n_episodes=1)
    latency = decision_latency(policy, 11, n=5, warmup=1)
    assert 0 < latency["median_ms"] <= latency["p99_ms"] and latency["nfe"] == policy.nfe


# ------------------------------------------------------------------------------------------------ draft history


def _manual_draft(policy, prefix: torch.Tensor, steps: int, cond: torch.Tensor) -> torch.Tensor:
    """Reference rollout: rerun the GPT on the last max_len steps and append its last output, step by step."""
    gpt, seq = policy.model.gpt, prefix
    for _ in range(steps):
        seq = torch.cat([seq, gpt(seq[:, -gpt.max_len:], cond)[:, -1:]], dim=1)
    return seq


def test_draft_reads_the_history_and_conditions_on_its_first_step() -> None:
    """With ``draft_history`` = K the draft is the GPT's rollout after the last K history states (window sliding once
    it outgrows the GPT), conditioned on the return-to-go held at the first of them, and starts at the current state."""
    K, B, H = 3, 2, TINY["horizon"]
    policy = tiny("trajectory-diffuser", draft_history=K, t_mid=0.0)        # t_mid 0: the plan is the draft
    gen = torch.Generator().manual_seed(0)
    obs, past = torch.randn(B, S, generator=gen), torch.randn(B, 5, S, generator=gen)
    past_rtg = torch.tensor([[9.0, 8.0, 7.0, 6.0, 5.0], [4.0, 3.0, 2.0, 1.0, 0.5]])
    plan = policy.plan(obs, torch.tensor([4.0, 0.2]), history=StateHistory(past, past_rtg))
    model = policy.model
    prefix = model.normalize_states(torch.cat([past[:, -K:], obs[:, None]], dim=1))
    with torch.no_grad():
        expected = _manual_draft(policy, prefix, H - 1, past_rtg[:, -K:-K + 1] / policy.config.return_scale)[:, K:]
    torch.testing.assert_close(plan[:, 1:], model.unnormalize_states(expected)[:, 1:], rtol=0, atol=1e-5)
    torch.testing.assert_close(plan[:, 0], obs)
    assert not torch.allclose(plan, policy.plan(obs, torch.tensor([4.0, 0.2])), atol=1e-3)   # the history mattered


def test_decision_transformer_acts_on_the_gpt_prediction_after_the_history() -> None:
    policy = tiny("decision-transformer", draft_history=2)
    gen = torch.Generator().manual_seed(1)
    obs, past, past_rtg = torch.randn(3, S, generator=gen), torch.randn(3, 4, S, generator=gen), torch.rand(3, 4)
    actions = policy.act(obs, torch.ones(3), history=StateHistory(past, past_rtg))
    model = policy.model
    with torch.no_grad():
        prefix = model.normalize_states(torch.cat([past[:, -2:], obs[:, None]], dim=1))
        s1 = model.gpt(prefix, past_rtg[:, -2:-1] / policy.config.return_scale)[:, -1]
        pair = torch.cat([prefix[:, -1], s1], dim=-1)
        expected = model.unnormalize_actions(model.inverse_dynamics(pair))
    torch.testing.assert_close(actions, expected, rtol=0, atol=1e-6)


def test_history_is_ignored_without_draft_history_and_by_policies_without_a_gpt() -> None:
    gen = torch.Generator().manual_seed(2)
    obs, history = torch.randn(2, S, generator=gen), StateHistory(torch.randn(2, 3, S, generator=gen), torch.ones(2, 3))
    for policy in (tiny("decision-transformer"), tiny("behavior-cloning"), tiny("decision-diffuser", sample_steps=2)):
        assert policy.history_length == 0
        a = policy.act(obs, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(policy.act(obs, history=history, generator=torch.Generator().manual_seed(0)), a,
                                   rtol=0, atol=0)


def test_bad_history_and_draft_history_raise() -> None:
    policy = tiny("trajectory-diffuser", draft_history=2)
    obs = torch.zeros(2, S)
    with pytest.raises(ValueError, match=r"history.states must be a tensor \[B, K, S\]"):
        policy.act(obs, history=StateHistory(torch.zeros(3, 2, S), torch.zeros(3, 2)))
    with pytest.raises(ValueError, match=r"history.returns_to_go must be a tensor \[B, K\]"):
        policy.act(obs, history=StateHistory(torch.zeros(2, 2, S), torch.zeros(2)))
    with pytest.raises(ValueError, match="history must be .* of finite numbers"):
        OfflineAgent(policy).act(np.zeros((2, S)), history=(np.full((2, 1, S), np.nan), np.zeros((2, 1))))
    with pytest.raises(ValueError, match="draft_history must be in"):
        make_config("trajectory-diffuser", horizon=8, draft_history=8)
    assert "draft_history" in TrajectoryDiffuserConfig.inference_fields


def test_evaluate_hands_the_policy_the_episode_history() -> None:
    """At decision t the policy sees the last min(t, K) observations and the conditions it held at them."""
    torch.manual_seed(0)
    config = make_config("decision-transformer", draft_history=3, **{
        k: v for k, v in TINY.items() if k.startswith("gpt") or k in ("horizon", "invdyn_hidden", "invdyn_depth")})
    policy = build_policy(config, 11, 3, env_id="Hopper-v5")
    calls: list[tuple[np.ndarray, np.ndarray, StateHistory | None]] = []
    act = policy.act

    def spy(obs, returns_to_go=None, *, history=None, **kwargs):
        rtg = None if returns_to_go is None else returns_to_go.numpy().copy()
        calls.append((obs.numpy().copy(), rtg, history))
        return act(obs, returns_to_go, history=history, **kwargs)

    policy.act = spy
    result = evaluate(policy, "Hopper-v5", n_episodes=2, seed=0, max_episode_steps=6)
    assert len(calls) == max(result["lengths"]) == 6
    for t, (_, _, history) in enumerate(calls):
        k = min(t, 3)
        assert tuple(history.states.shape) == (2, k, 11) and tuple(history.returns_to_go.shape) == (2, k)
        for j in range(k):   # history step j is the decision made t - k + j steps ago
            obs, rtg, _ = calls[t - k + j]
            np.testing.assert_allclose(history.states[:, j].numpy(), obs, rtol=0, atol=1e-6)
            np.testing.assert_allclose(history.returns_to_go[:, j].numpy(), rtg, rtol=1e-6)
    latency = decision_latency(policy, 11, n=3, warmup=1)
    assert latency["median_ms"] > 0 and calls[-1][2].states.shape[1] == 3   # timed with a full history
