"""The (alpha1, beta1) loss landscape: its grid equals losses computed directly with a coefficient
hook, its gradient field equals finite differences of the surface, identity is the unhooked model,
and nothing about the model changes."""

from __future__ import annotations

import pytest
import torch

from kvshift_lens.data.tasks import InductionTask, masked_cross_entropy
from kvshift_lens.viz.figures import landscape_figure
from kvshift_lens.viz.landscape import loss_landscape, plane_hooks
from tests.helpers import build

TASK = InductionTask(d_vocab=23, seq_len=12)


def _batch(n: int = 6, seed: int = 3):
    return TASK.sample(n, torch.Generator().manual_seed(seed))


def _direct_loss(model, batch, layer: int, heads: list[int], a: float, b: float) -> float:
    """An independent reference: copy the model's coefficients, overwrite the heads' rows."""
    def set_row(value):
        def hook(coeffs, hook):
            new = coeffs.detach().clone()
            for h in heads:
                new[h, 0], new[h, 1] = value, 1 - value
            return new
        return hook

    hooks = [(f"blocks.{layer}.attn.hook_shift_k", set_row(a)),
             (f"blocks.{layer}.attn.hook_shift_v", set_row(b))]
    with torch.no_grad():
        logits = model.run_with_hooks(batch.tokens, fwd_hooks=hooks)
    return float(masked_cross_entropy(logits, batch))


@pytest.mark.parametrize("layer,heads", [(1, 2), (0, [0, 3]), (1, None)])
def test_grid_values_equal_losses_computed_directly(layer, heads):
    model = build(seed=1)  # 2 layers, 4 heads, random coefficients
    batch = _batch()
    land = loss_landscape(model, batch, layer=layer, heads=heads, grid=(4, 3),
                          a_range=(-0.5, 1.0), b_range=(0.0, 1.5), gradient=False, coords="raw")
    assert land.loss.shape == (4, 3) and land.grad is None
    assert land.a1.tolist() == pytest.approx([-0.5, 0.0, 0.5, 1.0])
    assert land.b1.tolist() == pytest.approx([0.0, 0.75, 1.5])
    chosen = [0, 1, 2, 3] if heads is None else ([heads] if isinstance(heads, int) else heads)
    assert land.heads == chosen
    for i, j in [(0, 0), (1, 2), (3, 1), (2, 2)]:
        expected = _direct_loss(model, batch, layer, chosen, float(land.a1[i]), float(land.b1[j]))
        assert float(land.loss[i, j]) == pytest.approx(expected, rel=1e-5), (i, j)
    own = model.shift_coefficients()
    assert land.positions == {f"L{layer}H{h}": (float(own["k"][layer, h, 0]),
                                                float(own["v"][layer, h, 0])) for h in chosen}
    # different points give different losses (the hooks really act)
    assert land.loss.std() > 0


@pytest.mark.parametrize("coords", ["mix", "raw"])
@pytest.mark.parametrize("heads", [1, None])
def test_gradient_field_matches_finite_differences_of_the_surface(heads, coords):
    model = build(seed=2, n_layers=1, dtype="float64")
    batch = _batch()
    a, b, h = (0.3, 0.8, 1e-4) if coords == "raw" else (-0.2, 0.6, 1e-4)
    land = loss_landscape(model, batch, layer=0, heads=heads, grid=3, a_range=(a - h, a + h),
                          b_range=(b - h, b + h), coords=coords)
    L = land.loss
    fd = torch.tensor([(L[2, 1] - L[0, 1]) / (2 * h), (L[1, 2] - L[1, 0]) / (2 * h)],
                      dtype=torch.float64)
    torch.testing.assert_close(land.grad[1, 1], fd, rtol=1e-5, atol=1e-8)
    assert fd.abs().max() > 1e-4  # a real slope, not zero against zero


def test_gradient_on_a_coarse_grid_points_like_the_surface():
    """On the report's kind of grid the gradient and the surface's central differences agree in
    direction at interior points (the difference is only the discretisation)."""
    model = build(seed=4, n_layers=1)
    land = loss_landscape(model, _batch(), heads=0, grid=9, a_range=(-0.5, 1.5),
                          b_range=(-0.5, 1.5), coords="raw")
    step = float(land.a1[1] - land.a1[0])
    fd_a = (land.loss[2:, 1:-1] - land.loss[:-2, 1:-1]) / (2 * step)
    fd_b = (land.loss[1:-1, 2:] - land.loss[1:-1, :-2]) / (2 * step)
    g = land.grad[1:-1, 1:-1]
    cos = (g[..., 0] * fd_a + g[..., 1] * fd_b) / (g.norm(dim=-1) * torch.hypot(fd_a, fd_b))
    assert float(cos.median()) > 0.95


@pytest.mark.parametrize("coords", ["mix", "raw"])
def test_identity_point_is_the_unhooked_identity_model(coords):
    model = build(seed=5, n_layers=1)
    with torch.no_grad():
        for block in model.blocks:
            for which in ("k", "v"):
                p = getattr(block.attn, f"shift_{which}")
                p.zero_()
                p[:, 0] = 1.0
    batch = _batch()
    with torch.no_grad():
        unhooked = float(masked_cross_entropy(model(batch.tokens), batch))
    land = loss_landscape(model, batch, heads=None, grid=3, a_range=(0.0, 1.0),
                          b_range=(0.0, 1.0), coords=coords)
    assert float(land.a1[2]) == 1.0 and float(land.b1[2]) == 1.0
    assert float(land.loss[2, 2]) == pytest.approx(unhooked, rel=1e-6)
    assert land.model_loss == pytest.approx(unhooked, rel=1e-6)
    assert land.positions == {f"L0H{h}": (1.0, 1.0) for h in range(4)}
    assert float(land.loss[0, 0]) != pytest.approx(unhooked, rel=1e-3)


def test_the_model_is_left_as_it_was():
    model = build(seed=6, n_layers=1).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    land = loss_landscape(model, TASK, heads=2, grid=2, n_sequences=3, seed=7)
    assert land.n_sequences == 3
    assert model.training
    assert all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    # the task is sampled with the given seed: the same landscape again
    again = loss_landscape(model, TASK, heads=2, grid=2, n_sequences=3, seed=7)
    assert torch.equal(land.loss, again.loss)
    landscape_figure(land)  # the figure takes it as it is


def test_plane_hooks_are_differentiable_in_the_point():
    model = build(seed=8, n_layers=1)
    batch = _batch()
    a = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    logits = model.run_with_hooks(batch.tokens, fwd_hooks=plane_hooks(model, 0, [1], a, b))
    loss = masked_cross_entropy(logits, batch)
    ga, gb = torch.autograd.grad(loss, (a, b))
    land = loss_landscape(model, batch, heads=1, grid=2, a_range=(0.2, 0.3), b_range=(0.9, 1.0),
                          coords="raw")
    assert float(ga) == pytest.approx(float(land.grad[0, 0, 0]), rel=1e-4)
    assert float(gb) == pytest.approx(float(land.grad[0, 0, 1]), rel=1e-4)


@pytest.mark.parametrize("overrides,kwargs,match", [
    (dict(shift_window=2), {}, "shift_window=1"),
    (dict(shift_v=False), {}, "shift_v=False"),
    (dict(shift_k=False), {}, "shift_k=False"),
    ({}, dict(layer=2), "layer=2 is out of range"),
    ({}, dict(heads=4), "heads=4"),
    ({}, dict(heads=[]), "at least one"),
    ({}, dict(grid=1), "at least 2 points"),
    ({}, dict(a_range=(1.0, 0.0)), "a_range"),
    ({}, dict(b_range=(-0.5, 1.5)), "within \\[-1, 1\\]"),
    ({}, dict(coords="alpha"), "coords='alpha'"),
])
def test_bad_arguments_say_what_is_wrong(overrides, kwargs, match):
    model = build(n_layers=2, **overrides)
    with pytest.raises(ValueError, match=match):
        loss_landscape(model, _batch(2), **kwargs)


def test_batch_or_task_must_be_one_of_them():
    with pytest.raises(TypeError, match="Batch or a task"):
        loss_landscape(build(n_layers=1), torch.zeros(2, 12, dtype=torch.long))


def _set_coefficients(model, layer: int, head: int, alpha, beta) -> None:
    with torch.no_grad():
        attn = model.blocks[layer].attn
        attn.shift_k[head] = torch.tensor(alpha, dtype=attn.shift_k.dtype)
        attn.shift_v[head] = torch.tensor(beta, dtype=attn.shift_v.dtype)


def _direct_mix_loss(model, batch, layer: int, heads: list[int], a: float, b: float) -> float:
    """Independent reference for mix coordinates: each head's own gain |c1| + |c2| and the sign
    of its c2, written out per head."""
    own = model.shift_coefficients()

    def set_rows(which, share):
        def hook(coeffs, hook):
            new = coeffs.detach().clone()
            for h in heads:
                c1, c2 = (float(x) for x in own[which][layer, h])
                gain, sign = abs(c1) + abs(c2), (-1.0 if c2 < 0 else 1.0)
                new[h, 0], new[h, 1] = gain * share, gain * sign * (1 - abs(share))
            return new
        return hook

    hooks = [(f"blocks.{layer}.attn.hook_shift_k", set_rows("k", a)),
             (f"blocks.{layer}.attn.hook_shift_v", set_rows("v", b))]
    with torch.no_grad():
        logits = model.run_with_hooks(batch.tokens, fwd_hooks=hooks)
    return float(masked_cross_entropy(logits, batch))


@pytest.mark.parametrize("layer,heads", [(1, 2), (0, [0, 3])])
def test_mix_grid_values_equal_losses_at_each_heads_own_gain(layer, heads):
    model = build(seed=1)
    _set_coefficients(model, layer, 2 if heads == 2 else 0, [-0.4, 4.1], [3.3, -0.6])
    batch = _batch()
    land = loss_landscape(model, batch, layer=layer, heads=heads, grid=(4, 3),
                          a_range=(-0.5, 1.0), b_range=(0.0, 1.0), gradient=False)
    assert land.coords == "mix"
    chosen = [heads] if isinstance(heads, int) else heads
    for i, j in [(0, 0), (1, 2), (3, 1), (2, 2)]:
        expected = _direct_mix_loss(model, batch, layer, chosen, float(land.a1[i]),
                                    float(land.b1[j]))
        assert float(land.loss[i, j]) == pytest.approx(expected, rel=1e-5), (i, j)
    own = model.shift_coefficients()
    for h in chosen:
        k, v = own["k"][layer, h], own["v"][layer, h]
        assert land.positions[f"L{layer}H{h}"] == pytest.approx(
            (float(k[0] / k.abs().sum()), float(v[0] / v.abs().sum())))
        assert land.gains[f"L{layer}H{h}"] == pytest.approx(
            (float(k.abs().sum()), float(v.abs().sum())))


def test_a_trained_size_head_lies_inside_the_mix_grid_and_on_the_surface():
    """Gains of 3-5 (what free coefficients reach in training) put a head far outside the raw
    plane's grid; in mix coordinates it is inside the default grid, and the surface at its own
    mix is the model's own loss."""
    model = build(seed=9, n_layers=1, dtype="float64")
    _set_coefficients(model, 0, 1, [-0.6, 4.4], [3.4, 0.3])  # key share -0.12, value 0.92
    batch = _batch()
    land = loss_landscape(model, batch, heads=1, grid=5, gradient=False)
    ka, vb = land.positions["L0H1"]
    assert ka == pytest.approx(-0.6 / 5.0) and vb == pytest.approx(3.4 / 3.7)
    assert float(land.a1.min()) <= ka <= float(land.a1.max())
    assert float(land.b1.min()) <= vb <= float(land.b1.max())
    raw = loss_landscape(model, batch, heads=1, grid=2, gradient=False, coords="raw")
    assert not float(raw.b1.min()) <= 3.4 <= float(raw.b1.max())  # what the mix view fixes
    at_own = loss_landscape(model, batch, heads=1, grid=2, a_range=(ka, 0.9), b_range=(vb, 1.0))
    assert float(at_own.loss[0, 0]) == pytest.approx(at_own.model_loss, rel=1e-9)
    assert float(at_own.loss[1, 1]) != pytest.approx(at_own.model_loss, rel=1e-3)
    fig = landscape_figure(land)
    heads = next(t for t in fig.data if (t.meta or {}).get("role") == "heads")
    assert list(heads.x) == pytest.approx([ka]) and list(heads.y) == pytest.approx([vb])
    assert fig.layout.xaxis.range[0] <= ka <= fig.layout.xaxis.range[1]
    assert fig.layout.yaxis.range[0] <= vb <= fig.layout.yaxis.range[1]
