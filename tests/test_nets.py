"""Tests for trajgen.nets: shapes, gradient flow, causality, batch independence, input validation."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from trajgen.nets import (
    CausalGPT,
    DiT1d,
    ResidualMLP,
    SinusoidalEmbedding,
    TemporalUnet1d,
    count_parameters,
)
from trajgen.nets.layers import Attention

D, C, C_CTX, B = 5, 3, 6, 4

DenoiserFactory = Callable[[int], nn.Module]

# Small configs keep the suite fast; each takes the horizon (only ResidualMLP needs it).
DENOISERS: dict[str, DenoiserFactory] = {
    "unet": lambda h: TemporalUnet1d(D, base_dim=8, dim_mults=(1, 2, 4), cond_dim=C, groups=4),
    "dit": lambda h: DiT1d(D, width=16, depth=2, heads=2, max_len=64, cond_dim=C, context_dim=C_CTX),
    "mlp": lambda h: ResidualMLP(D, hidden_dim=32, depth=2, emb_dim=16, cond_dim=C, horizon=h),
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _inputs(batch: int, horizon: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    return (
        torch.randn(batch, horizon, D, dtype=dtype),
        torch.rand(batch, dtype=dtype),
        torch.randn(batch, C, dtype=dtype),
    )


def _context(batch: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    context = torch.randn(batch, 3, C_CTX, dtype=dtype)
    mask = torch.ones(batch, 3, dtype=torch.bool)
    mask[0, 1:] = False
    if batch > 1:
        mask[1] = False  # a row with no valid context token
    return context, mask


def _perturb(module: nn.Module) -> None:
    """Move every parameter off its init, so zero-initialised (adaLN-Zero) layers pass gradients on."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))


def _extras(name: str, batch: int, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    if name != "dit":
        return {}
    context, mask = _context(batch, dtype)
    return {"context": context, "context_mask": mask}


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("name", DENOISERS)
@pytest.mark.parametrize("horizon", [1, 3, 5, 16, 17, 31])
def test_denoiser_output_shape(name: str, horizon: int) -> None:
    net = DENOISERS[name](horizon)
    x, t, cond = _inputs(2, horizon)
    assert net(x, t, cond, **_extras(name, 2)).shape == x.shape
    assert net(x, t).shape == x.shape


@pytest.mark.parametrize("horizon", [7, 32, 33])
def test_unet_default_config_any_horizon(horizon: int) -> None:
    net = TemporalUnet1d(11)
    x = torch.randn(2, horizon, 11)
    out = net(x, torch.rand(2))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_unet_default_param_count_in_1_to_2_million() -> None:
    net = TemporalUnet1d(11)
    assert 1_000_000 <= count_parameters(net) <= 2_000_000
    assert net(torch.randn(2, 32, 11), torch.rand(2)).shape == (2, 32, 11)


def test_count_parameters_trainable_only() -> None:
    net = nn.Linear(3, 2)
    net.bias.requires_grad_(False)
    assert count_parameters(net) == 8
    assert count_parameters(net, trainable_only=True) == 6


def test_mlp_vector_mode_and_plain_mlp() -> None:
    net = ResidualMLP(6, 2, hidden_dim=16, depth=2, emb_dim=8, cond_dim=C)
    assert net(torch.randn(3, 6), torch.rand(3), torch.randn(3, C)).shape == (3, 2)
    plain = ResidualMLP(6, 2, hidden_dim=16, depth=2, time_conditioned=False)
    assert plain(torch.randn(3, 6)).shape == (3, 2)


def test_gpt_output_shape_with_and_without_cond() -> None:
    net = CausalGPT(D, out_dim=2, width=16, depth=2, heads=2, max_len=32, cond_dim=C)
    x = torch.randn(3, 9, D)
    assert net(x, torch.randn(3, C)).shape == (3, 9, 2)
    assert net(x).shape == (3, 9, 2)


# ---------------------------------------------------------------- gradients


def _assert_all_grads(net: nn.Module) -> None:
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reached: {missing}"


@pytest.mark.parametrize("name", DENOISERS)
def test_gradients_reach_every_parameter(name: str) -> None:
    net = DENOISERS[name](8)
    _perturb(net)
    x, t, cond = _inputs(B, 8)
    cond_mask = torch.tensor([True, False, True, False])  # both the cond MLP and the null embedding used
    net(x, t, cond, cond_mask=cond_mask, **_extras(name, B)).square().sum().backward()
    _assert_all_grads(net)


def test_gpt_gradients_reach_every_parameter() -> None:
    net = CausalGPT(D, width=16, depth=2, heads=2, max_len=16, cond_dim=C)
    x = torch.randn(B, 8, D)
    (net(x, torch.randn(B, C)).square().sum() + net(x).square().sum()).backward()
    _assert_all_grads(net)


# ---------------------------------------------------------------- conditioning


@pytest.mark.parametrize("name", DENOISERS)
def test_cond_none_matches_fully_masked_cond(name: str) -> None:
    net = DENOISERS[name](8).double().eval()
    _perturb(net)
    x, t, cond = _inputs(B, 8, torch.float64)
    extras = _extras(name, B, torch.float64)
    unconditional = net(x, t, None, **extras)
    masked = net(x, t, cond, cond_mask=torch.zeros(B, dtype=torch.bool), **extras)
    conditional = net(x, t, cond, **extras)
    torch.testing.assert_close(unconditional, masked)
    assert not torch.allclose(unconditional, conditional), "cond has no effect on the output"


def test_dit_no_context_equals_fully_masked_context() -> None:
    net = DENOISERS["dit"](8).double().eval()
    _perturb(net)
    x, t, cond = _inputs(B, 8, torch.float64)
    context, _ = _context(B, torch.float64)
    none_valid = torch.zeros(B, 3, dtype=torch.bool)
    out_masked = net(x, t, cond, context=context, context_mask=none_valid)
    torch.testing.assert_close(out_masked, net(x, t, cond))
    assert not torch.allclose(net(x, t, cond, context=context), out_masked), "context has no effect"


def test_time_embedding_scales_t_by_1000() -> None:
    t = torch.tensor([0.0, 0.25, 0.999])
    torch.testing.assert_close(SinusoidalEmbedding(16)(t), SinusoidalEmbedding(16, scale=1.0)(1000 * t))


# ---------------------------------------------------------------- batch independence


def _check_batch_independence(run: Callable[[slice], Tensor], batch: int) -> None:
    full = run(slice(0, batch))
    for i in range(batch):
        torch.testing.assert_close(full[i : i + 1], run(slice(i, i + 1)), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", DENOISERS)
def test_denoiser_batch_independence(name: str) -> None:
    net = DENOISERS[name](9).double().eval()
    _perturb(net)
    x, t, cond = _inputs(B, 9, torch.float64)
    extras = _extras(name, B, torch.float64)
    cond_mask = torch.tensor([True, False, True, True])

    def run(s: slice) -> Tensor:
        return net(x[s], t[s], cond[s], cond_mask=cond_mask[s], **{k: v[s] for k, v in extras.items()})

    _check_batch_independence(run, B)


def test_gpt_batch_independence() -> None:
    net = CausalGPT(D, width=16, depth=2, heads=2, max_len=16, cond_dim=C).double().eval()
    x, _, cond = _inputs(B, 9, torch.float64)
    _check_batch_independence(lambda s: net(x[s], cond[s]), B)


def test_mlp_vector_mode_batch_independence() -> None:
    net = ResidualMLP(6, 2, hidden_dim=16, depth=2, emb_dim=8).double().eval()
    x, t = torch.randn(B, 6, dtype=torch.float64), torch.rand(B, dtype=torch.float64)
    _check_batch_independence(lambda s: net(x[s], t[s]), B)


# ---------------------------------------------------------------- causal GPT


def _changed_outputs(net: CausalGPT, x: Tensor, k: int, cond: Tensor | None) -> Tensor:
    """Which output positions [H] change when input step k is perturbed."""
    perturbed = x.clone()
    perturbed[:, k] += 1.0
    diff = (net(x, cond) - net(perturbed, cond)).abs().amax(dim=(0, 2))
    return diff > 1e-12


@pytest.mark.parametrize("with_cond", [False, True])
@pytest.mark.parametrize("k", [0, 4, 9])
def test_gpt_is_causal(k: int, with_cond: bool) -> None:
    net = CausalGPT(D, width=16, depth=2, heads=2, max_len=16, cond_dim=C).double().eval()
    x = torch.randn(2, 10, D, dtype=torch.float64)
    cond = torch.randn(2, C, dtype=torch.float64) if with_cond else None
    changed = _changed_outputs(net, x, k, cond)
    assert not changed[:k].any(), (
        f"perturbing step {k} changed earlier outputs {changed[:k].nonzero().tolist()}"
    )
    assert changed[k:].all(), "perturbing step k must change outputs k.."


def test_causality_check_detects_a_non_causal_model(monkeypatch: pytest.MonkeyPatch) -> None:
    net = CausalGPT(D, width=16, depth=2, heads=2, max_len=16).double().eval()
    original = Attention.forward
    monkeypatch.setattr(
        Attention, "forward", lambda self, x, *a, **kw: original(self, x, *a, **{**kw, "causal": False})
    )
    changed = _changed_outputs(net, torch.randn(2, 10, D, dtype=torch.float64), 5, None)
    assert changed[:5].any()


def test_gpt_generate_matches_teacher_forcing_on_its_rollout() -> None:
    net = CausalGPT(D, width=16, depth=2, heads=2, max_len=16, cond_dim=C).double().eval()
    prefix, cond = torch.randn(2, 3, D, dtype=torch.float64), torch.randn(2, C, dtype=torch.float64)
    seq = net.generate(prefix, 6, cond)
    assert seq.shape == (2, 9, D)
    torch.testing.assert_close(seq[:, :3], prefix)
    torch.testing.assert_close(net(seq[:, :-1], cond)[:, 2:], seq[:, 3:])


def test_gpt_generate_beyond_max_len_uses_a_window() -> None:
    net = CausalGPT(D, width=16, depth=1, heads=2, max_len=4).eval()
    seq = net.generate(torch.randn(2, 3, D), 5)
    assert seq.shape == (2, 8, D)
    assert torch.isfinite(seq).all()


def _manual_rollout(net: CausalGPT, prefix: Tensor, steps: int, cond: Tensor | None) -> Tensor:
    """Reference rollout: rerun `forward` on the last max_len steps and append its last output, step by step."""
    seq = prefix
    for _ in range(steps):
        seq = torch.cat([seq, net(seq[:, -net.max_len :], cond)[:, -1:]], dim=1)
    return seq


@pytest.mark.parametrize("with_cond", [False, True])
@pytest.mark.parametrize(("prefix_len", "steps"), [(1, 15), (3, 13), (5, 4), (2, 25), (16, 3)])
def test_gpt_generate_with_cache_equals_full_recompute(with_cond: bool, prefix_len: int, steps: int) -> None:
    torch.manual_seed(0)
    net = CausalGPT(D, width=32, depth=3, heads=4, max_len=16, cond_dim=C if with_cond else None).eval()
    prefix = torch.randn(3, prefix_len, D)
    cond = torch.randn(3, C) if with_cond else None
    cached = net.generate(prefix, steps, cond)
    assert cached.shape == (3, prefix_len + steps, D)
    torch.testing.assert_close(cached, net.generate(prefix, steps, cond, use_cache=False), rtol=0, atol=1e-5)
    torch.testing.assert_close(cached, _manual_rollout(net, prefix, steps, cond), rtol=0, atol=1e-5)


@pytest.mark.parametrize("with_cond", [False, True])
def test_gpt_prefill_and_decode_equal_forward_rows(with_cond: bool) -> None:
    net = CausalGPT(D, width=16, depth=2, heads=2, max_len=12, cond_dim=C if with_cond else None).double().eval()
    x = torch.randn(2, 10, D, dtype=torch.float64)
    cond = torch.randn(2, C, dtype=torch.float64) if with_cond else None
    full = net(x, cond)
    out, cache = net.prefill(x[:, :3], cond, capacity=10)
    outs = [out, net.decode(x[:, 3:4], cache), net.decode(x[:, 4:7], cache)]  # one step, then a chunk of three
    outs += [net.decode(x[:, k : k + 1], cache) for k in range(7, 10)]
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=0, atol=1e-12)
    assert cache.steps == 10 and cache.length == 10 + with_cond


def test_gpt_generate_embeds_each_step_once_with_the_cache() -> None:
    """The cache is really used: the embedding sees P + steps - 1 rows, not a growing window per step."""
    net = CausalGPT(D, width=16, depth=1, heads=2, max_len=16, cond_dim=C).eval()
    rows: list[int] = []
    net.embed.register_forward_hook(lambda module, inputs, output: rows.append(inputs[0].shape[1]))
    net.generate(torch.randn(1, 2, D), 10, torch.randn(1, C))
    assert rows == [2] + [1] * 9
    rows.clear()
    net.generate(torch.randn(1, 2, D), 10, torch.randn(1, C), use_cache=False)
    assert rows == list(range(2, 12))


def test_gpt_cache_bad_inputs() -> None:
    net = CausalGPT(D, width=16, depth=1, heads=2, max_len=8, cond_dim=C).eval()
    with pytest.raises(ValueError, match="capacity"):
        net.prefill(torch.randn(2, 3, D), capacity=9)
    with pytest.raises(ValueError, match="capacity"):
        net.prefill(torch.randn(2, 3, D), capacity=2)
    _, cache = net.prefill(torch.randn(2, 3, D), capacity=4)
    with pytest.raises(ValueError, match=r"\bx_new\b"):
        net.decode(torch.randn(2, 1, D + 1), cache)
    with pytest.raises(ValueError, match="batch"):
        net.decode(torch.randn(3, 1, D), cache)
    net.decode(torch.randn(2, 1, D), cache)
    with pytest.raises(ValueError, match="does not fit the cache"):
        net.decode(torch.randn(2, 1, D), cache)


# ---------------------------------------------------------------- input validation


@pytest.mark.parametrize("name", DENOISERS)
@pytest.mark.parametrize(
    ("arg", "make_bad"),
    [
        ("x", lambda x, t, c: (x[0], t, c)),  # ndim
        ("x", lambda x, t, c: (x[..., :-1], t, c)),  # feature dim
        ("t", lambda x, t, c: (x, t[:, None], c)),  # shape [B, 1]
        ("t", lambda x, t, c: (x, t[:-1], c)),  # wrong batch
        ("t", lambda x, t, c: (x, (t * 1000).long(), c)),  # integer steps
        ("cond", lambda x, t, c: (x, t, c[:, :-1])),  # cond feature dim
        ("cond", lambda x, t, c: (x, t, c[:-1])),  # cond batch
    ],
)
def test_denoiser_bad_inputs_name_the_argument(name: str, arg: str, make_bad: Callable) -> None:
    net = DENOISERS[name](8)
    with pytest.raises(ValueError, match=rf"\b{arg}\b"):
        net(*make_bad(*_inputs(2, 8)))


@pytest.mark.parametrize("name", DENOISERS)
def test_bad_cond_mask_and_unexpected_cond(name: str) -> None:
    x, t, cond = _inputs(2, 8)
    with pytest.raises(ValueError, match="cond_mask"):
        DENOISERS[name](8)(x, t, cond, cond_mask=torch.ones(2))  # not bool
    no_cond = {
        "unet": lambda: TemporalUnet1d(D, base_dim=8, groups=4),
        "dit": lambda: DiT1d(D, width=16, depth=1, heads=2),
        "mlp": lambda: ResidualMLP(D, hidden_dim=16, depth=1, horizon=8),
    }[name]()
    with pytest.raises(ValueError, match=r"\bcond\b.*cond_dim"):
        no_cond(x, t, cond)


def test_dit_bad_horizon_and_context() -> None:
    net = DENOISERS["dit"](8)
    x, t, _ = _inputs(2, 65)
    with pytest.raises(ValueError, match="max_len"):
        net(x, t)
    x, t, _ = _inputs(2, 8)
    with pytest.raises(ValueError, match=r"\bcontext\b"):
        net(x, t, context=torch.randn(2, 3, C_CTX + 1))
    with pytest.raises(ValueError, match="context_mask"):
        net(x, t, context=torch.randn(2, 3, C_CTX), context_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\bcontext\b"):
        DiT1d(D, width=16, depth=1, heads=2)(x, t, context=torch.randn(2, 3, C_CTX))


def test_mlp_bad_horizon_and_time_arguments() -> None:
    with pytest.raises(ValueError, match=r"\bx\b.*horizon"):
        DENOISERS["mlp"](8)(*_inputs(2, 9)[:2])
    with pytest.raises(ValueError, match=r"\bt\b"):
        DENOISERS["mlp"](8)(torch.randn(2, 8, D))  # t missing
    with pytest.raises(ValueError, match=r"\bt\b"):
        ResidualMLP(6, time_conditioned=False)(torch.randn(2, 6), torch.rand(2))


def test_gpt_bad_inputs() -> None:
    net = CausalGPT(D, width=16, depth=1, heads=2, max_len=8, cond_dim=C)
    with pytest.raises(ValueError, match=r"\bx\b"):
        net(torch.randn(2, 4, D + 1))
    with pytest.raises(ValueError, match="max_len"):
        net(torch.randn(2, 9, D))
    with pytest.raises(ValueError, match=r"\bcond\b"):
        net(torch.randn(2, 4, D), torch.randn(2, C + 1))
    with pytest.raises(ValueError, match="prefix"):
        net.generate(torch.randn(2, D), 3)
    with pytest.raises(ValueError, match="out_dim"):
        CausalGPT(D, out_dim=2, width=16, depth=1, heads=2).generate(torch.randn(2, 3, D), 3)


def test_bad_configs_raise() -> None:
    with pytest.raises(ValueError, match="groups"):
        TemporalUnet1d(D, base_dim=12, groups=8)
    with pytest.raises(ValueError, match="kernel_size"):
        TemporalUnet1d(D, kernel_size=4)
    with pytest.raises(ValueError, match="heads"):
        DiT1d(D, width=30, heads=4)
