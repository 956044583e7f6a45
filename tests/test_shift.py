"""The shift function, the simplex projection and the effective pattern, against brute force."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from kvshift_lens.shift import (
    constrain,
    init_coefficients,
    is_shift_parameter,
    project_to_simplex,
    shift,
)
from probes import effective_pattern
from tests.helpers import build


def _loop_shift(x, c):
    out = torch.zeros_like(x)
    for t in range(x.shape[1]):
        for h in range(x.shape[2]):
            for lag in range(c.shape[1]):
                if t - lag >= 0:
                    out[:, t, h] += c[h, lag] * x[:, t - lag, h]
    return out


@pytest.mark.parametrize("lags,pos", [(1, 5), (2, 5), (3, 7), (5, 3)])
def test_shift_matches_loops(lags, pos):
    x = torch.randn(2, pos, 3, 4, dtype=torch.float64)
    c = torch.randn(3, lags, dtype=torch.float64)
    assert_close(shift(x, c), _loop_shift(x, c))


def test_paper_equation_window_one():
    """K'_t = a1 K_t + a2 K_{t-1}, K'_0 = a1 K_0."""
    k = torch.randn(1, 4, 1, 2)
    a1, a2 = 0.3, 1.7
    out = shift(k, torch.tensor([[a1, a2]]))
    assert_close(out[:, 0], a1 * k[:, 0])
    assert_close(out[:, 1:], a1 * k[:, 1:] + a2 * k[:, :-1])


@pytest.mark.parametrize("lags", [2, 3, 4])
def test_shift_with_past_equals_shift_of_concatenation(lags):
    x = torch.randn(2, 9, 3, 4, dtype=torch.float64)
    c = torch.randn(3, lags, dtype=torch.float64)
    full = shift(x, c)
    for split in range(1, 9):
        past = x[:, max(0, split - (lags - 1)) : split]
        assert_close(shift(x[:, split:], c, past=past), full[:, split:])


def test_bf16_keeps_activation_dtype():
    x = torch.randn(1, 4, 2, 8, dtype=torch.bfloat16)
    assert shift(x, torch.randn(2, 2)).dtype == torch.bfloat16


def _brute_simplex(v, steps=400):
    """Projection by exhaustive minimisation over a fine grid (2 or 3 coordinates)."""
    n = v.numel()
    grid = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    best, best_d = None, float("inf")
    for point in itertools.product(grid.tolist(), repeat=n - 1):
        last = 1 - sum(point)
        if last < -1e-12:
            continue
        p = torch.tensor([*point, max(last, 0.0)], dtype=torch.float64)
        d = float(((p - v) ** 2).sum())
        if d < best_d:
            best, best_d = p, d
    return best


@settings(max_examples=15, deadline=None)
@given(st.lists(st.floats(-2, 2), min_size=2, max_size=3))
def test_simplex_projection_is_the_closest_point(values):
    v = torch.tensor(values, dtype=torch.float64)
    p = project_to_simplex(v)
    assert (p >= 0).all() and abs(float(p.sum()) - 1) < 1e-9
    steps = 400 if v.numel() == 2 else 60
    brute = _brute_simplex(v, steps)
    tol = 2.0 / steps
    assert float(((p - v) ** 2).sum()) <= float(((brute - v) ** 2).sum()) + 1e-9
    assert (p - brute).abs().max() <= tol


def test_convex_identity_is_exact_with_gradient_at_zero():
    raw = torch.tensor([[1.0, 0.0]], requires_grad=True)
    c = constrain(raw, "convex")
    assert torch.equal(c.detach(), raw.detach())
    (c * torch.tensor([[0.0, -1.0]])).sum().backward()
    assert raw.grad[0, 1] == -1.0  # the coefficient sitting at 0 still gets a gradient


@pytest.mark.parametrize("window", [1, 2, 3])
def test_effective_pattern_reads_the_same_values(window):
    """pattern @ V' == A_eff @ V: the effective pattern says which *tokens'* values a shifted
    head reads, exactly."""
    model = build(shift_window=window, n_key_value_heads=2)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, model.cfg.n_ctx))
    _, cache = model.run_with_cache(tokens)
    for layer in range(model.cfg.n_layers):
        pattern = cache["pattern", layer]  # [b, head, q, k]
        v = cache["v", layer].repeat_interleave(2, dim=2)  # raw values per query head
        v_shifted = cache[f"blocks.{layer}.attn.hook_v_shifted"].repeat_interleave(2, dim=2)
        coeffs = model.shift_coefficients()["v"][layer].repeat_interleave(2, dim=0)
        a_eff = effective_pattern(pattern, coeffs)
        lhs = torch.einsum("bhqk,bkhd->bqhd", pattern, v_shifted)
        rhs = torch.einsum("bhqk,bkhd->bqhd", a_eff, v)
        assert_close(lhs, rhs, rtol=1e-5, atol=1e-5)
        assert_close(lhs, cache["z", layer], rtol=1e-5, atol=1e-5)


def test_effective_pattern_window_one_formula():
    a = torch.rand(1, 1, 4, 4).tril()
    b1, b2 = 0.25, 0.75
    eff = effective_pattern(a, torch.tensor([[b1, b2]]))
    expected = torch.zeros_like(a)
    for i, j in itertools.product(range(4), range(4)):
        expected[..., i, j] = b1 * a[..., i, j] + (b2 * a[..., i, j + 1] if j + 1 < 4 else 0)
    assert_close(eff, expected)
    with pytest.raises(ValueError, match="value_coeffs has 2 heads, pattern has 1"):
        effective_pattern(a, torch.ones(2, 2))


@pytest.mark.parametrize("lags,pos", [(2, 5), (3, 4), (4, 2)])
def test_shift_gradients_match_autograd_of_the_loops(lags, pos):
    """The hand-written backward equals autograd through the loop reference (and gradcheck)."""
    x = torch.randn(2, pos, 3, 4, dtype=torch.float64, requires_grad=True)
    c = torch.randn(3, lags, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, pos, 3, 4, dtype=torch.float64)
    dx, dc = torch.autograd.grad((shift(x, c) * g).sum(), (x, c))
    rx, rc = torch.autograd.grad((_loop_shift(x, c) * g).sum(), (x, c))
    assert_close(dx, rx)
    assert_close(dc, rc)
    assert torch.autograd.gradcheck(shift, (x, c))


def test_shift_gradients_on_strided_views_match_the_loops():
    """x as the model passes it: a view of K inside a fused [batch, pos, q|k|v heads, d_head]
    projection (not contiguous), and an upstream gradient that is not contiguous either."""
    base = torch.randn(2, 6, 9, 4, dtype=torch.float64, requires_grad=True)
    x = base[:, :, 3:6]
    c = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, 6, 4, dtype=torch.float64).transpose(1, 2)
    dx, dc = torch.autograd.grad((shift(x, c) * g).sum(), (base, c))
    rx, rc = torch.autograd.grad((_loop_shift(x, c) * g).sum(), (base, c))
    assert_close(dx, rx)
    assert_close(dc, rc)


def test_is_shift_parameter():
    for name in ("shift_k", "blocks.0.attn.shift_q", "blocks.11.attn.shift_v",
                 "blocks.0.attn.shift_k_gain", "shift_q_gain", "blocks.3.attn.shift_v_gain"):
        assert is_shift_parameter(name)
    for name in ("blocks.0.attn.W_K", "blocks.0.attn._W_K", "blocks.0.attn.b_V", "shift",
                 "blocks.0.attn.shift_x", "blocks.0.attn.hook_shift_k", "shift_window",
                 "blocks.0.attn.shift_x_gain", "gain", "blocks.0.attn.hook_shift_k_gain"):
        assert not is_shift_parameter(name)
    from kvshift_lens.shift import is_gain_parameter

    assert is_gain_parameter("blocks.0.attn.shift_k_gain")
    assert not is_gain_parameter("blocks.0.attn.shift_k")


@pytest.mark.parametrize("scheme", ["identity", "uniform", "normal", "induction"])
def test_convex_initial_coefficients_start_on_the_simplex(scheme):
    g = torch.Generator().manual_seed(0)
    c = init_coefficients(3, 3, scheme, "k", std=0.5, generator=g, param="convex")
    assert (c >= 0).all() and torch.allclose(c.sum(-1), torch.ones(3))
    free = init_coefficients(3, 3, scheme, "k", std=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(c, project_to_simplex(free))
    with pytest.raises(ValueError, match="shift_param='sigmoid'"):
        init_coefficients(3, 3, scheme, "k", param="sigmoid")


def test_gain_and_mix_read_coefficients_as_scale_times_lag_weights():
    from kvshift_lens.shift import gain_and_mix, previous_share

    c = torch.tensor([[0.5, 4.0], [1.0, 0.0], [0.0, 0.0], [-0.2, 0.8], [0.2, 0.3, 0.5]][:4])
    gain, mix = gain_and_mix(c)
    torch.testing.assert_close(gain, torch.tensor([4.5, 1.0, 0.0, 1.0]))
    torch.testing.assert_close(mix, torch.tensor([[1 / 9, 8 / 9], [1.0, 0.0], [1.0, 0.0],
                                                  [-0.2, 0.8]]))
    torch.testing.assert_close(gain[:, None] * mix, c)  # the decomposition is exact
    torch.testing.assert_close(previous_share(c), torch.tensor([8 / 9, 0.0, 0.0, 0.8]))
    # scale-free: a head's share does not change when its coefficients grow
    torch.testing.assert_close(previous_share(7 * c), previous_share(c))
    window2 = torch.tensor([0.2, 0.3, 0.5])
    assert float(previous_share(window2)) == pytest.approx(0.8)


def test_shift_coefficients_expose_gain_mix_and_previous_share():
    from tests.helpers import build

    model = build(n_layers=2)
    coeffs = model.shift_coefficients()
    k = coeffs["k"]
    torch.testing.assert_close(coeffs.gain("k"), k.abs().sum(-1))
    torch.testing.assert_close(coeffs.gain("k")[..., None] * coeffs.mix("k"), k)
    rec = [r for r in coeffs.records() if r["which"] == "k" and r["layer"] == 1 and r["head"] == 0]
    assert [r["lag"] for r in rec] == [0, 1]
    assert rec[1]["mix"] == pytest.approx(float(k[1, 0, 1] / k[1, 0].abs().sum()))


def test_gain_mix_is_gain_times_projected_mix_and_identity_is_exact():
    mix = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.2, 0.8]])
    gain = torch.tensor([1.0, 3.0, -2.0])
    c = constrain(mix, "gain_mix", gain)
    assert torch.equal(c, gain[:, None] * mix)
    assert torch.equal(constrain(mix[:1], "gain_mix", gain[:1]), torch.tensor([[1.0, 0.0]]))
    # an infeasible stored mix reads as its projection (as convex does)
    off = torch.tensor([[2.0, -1.0]])
    assert torch.equal(constrain(off, "gain_mix", torch.tensor([2.0])), torch.tensor([[2.0, 0.0]]))
    with pytest.raises(ValueError, match="'gain_mix' takes a gain"):
        constrain(mix, "gain_mix")
    with pytest.raises(ValueError, match="gain_mix"):
        constrain(mix, "free", gain)
    with pytest.raises(ValueError, match="shift_param='sigmoid'"):
        constrain(mix, "sigmoid")


def test_gain_mix_gradients_follow_the_chain_rule_and_finite_differences():
    """dL/dgain_h = sum_l dL/dc_hl * mix_hl and dL/dmix_hl = gain_h * dL/dc_hl (straight-through
    on the projection), checked against the free parametrisation's gradient and against central
    finite differences of the loss in the gain."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 3, 4, generator=g, dtype=torch.float64)
    w = torch.randn(2, 6, 3, 4, generator=g, dtype=torch.float64)
    mix0 = project_to_simplex(torch.rand(3, 3, generator=g, dtype=torch.float64))
    gain0 = torch.tensor([1.0, 2.5, -0.7], dtype=torch.float64)

    def loss(c):
        return (shift(x, c) * w).pow(2).sum()

    mix, gain = mix0.clone().requires_grad_(), gain0.clone().requires_grad_()
    loss(constrain(mix, "gain_mix", gain)).backward()
    free = (gain0[:, None] * mix0).requires_grad_()
    loss(constrain(free, "free")).backward()
    assert_close(gain.grad, (free.grad * mix0).sum(-1))
    assert_close(mix.grad, gain0[:, None] * free.grad)
    eps = 1e-6
    for h in range(3):
        up, down = gain0.clone(), gain0.clone()
        up[h] += eps
        down[h] -= eps
        fd = (loss(up[:, None] * mix0) - loss(down[:, None] * mix0)) / (2 * eps)
        assert float(gain.grad[h]) == pytest.approx(float(fd), rel=1e-6)


@pytest.mark.parametrize("scheme", ["identity", "uniform", "normal", "induction"])
def test_gain_mix_initial_mix_is_the_convex_init_at_gain_one(scheme):
    from kvshift_lens.shift import init_gain

    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    mix = init_coefficients(3, 2, scheme, "k", std=0.5, generator=g1, param="gain_mix")
    convex = init_coefficients(3, 2, scheme, "k", std=0.5, generator=g2, param="convex")
    assert torch.equal(mix, convex)
    assert torch.equal(init_gain(3), torch.ones(3))
