"""Ablations through hooks: mechanics on small random models, and known answers on trained ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from probes.ablation import (
    Ablation,
    ablate_each_head,
    ablate_each_shift,
    ablation_effect,
    head_means,
    masked_metrics,
    mean_ablate_head,
    remove_key_shift,
    remove_shift,
    remove_value_shift,
    zero_ablate_head,
)
from tests.helpers import build

CHANCE = 1 / 23  # uniform guess over the 23 content tokens of the induction task


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed: ablations must never edit weights"


def capture(model, tokens, names, ablations=()):
    """Activations at ``names`` with the ablations' hooks applied (they run first)."""
    store = {}
    hooks = [a.fwd_hook for a in ablations] + [
        (n, lambda t, hook: store.__setitem__(hook.name, t.detach().clone())) for n in names]
    model.run_with_hooks(tokens, fwd_hooks=hooks)
    return store


# --------------------------------------------------------------------------- mechanics


def test_zero_and_mean_ablation_write_the_head_slice_only():
    model = build(n_layers=2)
    tokens = torch.randint(0, 23, (3, 10), generator=torch.Generator().manual_seed(1))
    reference = torch.randint(0, 23, (5, 10), generator=torch.Generator().manual_seed(2))
    before = snapshot(model)
    z = "blocks.1.attn.hook_z"
    plain = capture(model, tokens, [z])[z]
    zeroed = capture(model, tokens, [z], [zero_ablate_head(model, 1, 2)])[z]
    assert torch.equal(zeroed[:, :, 2], torch.zeros_like(zeroed[:, :, 2]))
    keep = [h for h in range(model.cfg.n_heads) if h != 2]
    assert torch.equal(zeroed[:, :, keep], plain[:, :, keep])

    ref_z = capture(model, reference, [z])[z]
    mean = ref_z[:, :, 2].mean(dim=(0, 1))
    meaned = capture(model, tokens, [z], [mean_ablate_head(model, 1, 2, reference)])[z]
    torch.testing.assert_close(meaned[:, :, 2], mean.expand(3, 10, -1))
    assert torch.equal(meaned[:, :, keep], plain[:, :, keep])
    # precomputed means give the same ablation
    via_means = capture(model, tokens, [z], [mean_ablate_head(model, 1, 2, means=head_means(model, reference))])[z]
    assert torch.equal(via_means, meaned)
    assert_unchanged(model, before)


@pytest.mark.parametrize("which", ["k", "v"])
def test_removing_a_shift_makes_the_shifted_tensor_the_raw_one_for_that_kv_head(which):
    # grouped-query attention: 4 query heads, 2 KV heads; random (non-identity) coefficients
    model = build(n_heads=4, d_head=4, n_key_value_heads=2, n_layers=2)
    tokens = torch.randint(0, 23, (2, 9), generator=torch.Generator().manual_seed(3))
    before = snapshot(model)
    raw, shifted = f"blocks.0.attn.hook_{which}", f"blocks.0.attn.hook_{which}_shifted"
    plain = capture(model, tokens, [raw, shifted])
    ablation = remove_key_shift(model, 0, 1) if which == "k" else remove_value_shift(model, 0, 1)
    assert ablation.hook_name == f"blocks.0.attn.hook_shift_{which}"
    out = capture(model, tokens, [raw, shifted], [ablation])
    assert torch.equal(out[shifted][:, :, 1], out[raw][:, :, 1])  # K' = K: identity coefficients
    assert torch.equal(out[shifted][:, :, 0], plain[shifted][:, :, 0])  # the other KV head untouched
    assert not torch.equal(plain[shifted][:, :, 1], plain[raw][:, :, 1])  # it was shifted before
    assert_unchanged(model, before)
    # the next plain forward is the unablated model again
    assert torch.equal(capture(model, tokens, [shifted])[shifted], plain[shifted])


def test_ablation_effect_accepts_a_task_or_a_batch_and_no_ablation_changes_nothing(induction_task):
    model = build(n_layers=1, d_vocab=24, n_ctx=32)
    batch = induction_task.sample(8, torch.Generator().manual_seed(5))
    none = ablation_effect(model, batch, [])
    assert none.accuracy_after == none.accuracy_before and none.loss_after == none.loss_before
    assert none.n_predictions == batch.n_predictions
    # a task draws its batch from the seed: the same numbers as that batch passed directly
    from_task = ablation_effect(model, induction_task, zero_ablate_head(model, 0, 1), batch_size=8, seed=5)
    from_batch = ablation_effect(model, batch, [zero_ablate_head(model, 0, 1)])
    assert from_task == from_batch
    # the batch metric is the task's
    logits = model(batch.tokens)
    assert masked_metrics(logits, batch) == induction_task.metrics(logits, batch)
    # (hook_name, fn) pairs are ablations too
    pair = ("blocks.0.attn.hook_z", zero_ablate_head(model, 0, 1).fn)
    assert ablation_effect(model, batch, [pair]).accuracy_after == from_batch.accuracy_after


def test_clear_errors():
    vanilla = build(n_layers=1, shift_k=False, shift_v=False)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.hook_shift_k"):
        remove_key_shift(vanilla, 0, 0)
    shifted_v_only = build(n_layers=1, shift_k=False, shift_v=True)
    remove_value_shift(shifted_v_only, 0, 0)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.hook_shift_k"):
        remove_shift(shifted_v_only, 0, 0, "k")
    model = build(n_layers=1)
    with pytest.raises(ValueError, match="head=7"):
        zero_ablate_head(model, 0, 7)
    with pytest.raises(ValueError, match="layer=3"):
        zero_ablate_head(model, 3, 0)
    with pytest.raises(ValueError, match="kv_head=4"):
        remove_key_shift(model, 0, 4)
    with pytest.raises(ValueError, match="'x'"):
        remove_shift(model, 0, 0, "x")
    with pytest.raises(ValueError, match="hook_z"):
        zero_ablate_head(nn.Linear(2, 2), 0, 0)
    with pytest.raises(ValueError, match="exactly one"):
        mean_ablate_head(model, 0, 0)
    with pytest.raises(TypeError, match="task"):
        ablation_effect(model, torch.zeros(2, 3), [])
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.hook_shift_v"):
        ablate_each_shift(vanilla, torch.zeros(1), "v")


# --------------------------------------------------------------------------- known answers


def test_kvshift_induction_needs_the_key_shift_of_the_induction_heads_only(
        kvshift_1l, eval_batch, kvshift_induction_heads):
    model, heads = kvshift_1l, kvshift_induction_heads
    n_heads = model.cfg.n_heads
    others = [h for h in range(n_heads) if h not in heads]
    assert heads and others, f"induction heads {heads}: expected some, but not all, of {n_heads}"
    before = snapshot(model)

    clean = ablation_effect(model, eval_batch, []).accuracy_before
    assert clean >= 0.9
    # Removing the key shift of the induction heads destroys induction (near chance) ...
    no_key_shift = ablation_effect(model, eval_batch, [remove_key_shift(model, 0, h) for h in heads])
    assert no_key_shift.accuracy_after < 0.2 and no_key_shift.accuracy_drop > 0.7, no_key_shift
    assert no_key_shift.loss_increase > 1.0
    # ... and so does zero-ablating them; zero-ablating any other head does not.
    assert ablation_effect(model, eval_batch, [zero_ablate_head(model, 0, h) for h in heads]).accuracy_after < 0.35
    for h in others:
        assert ablation_effect(model, eval_batch, zero_ablate_head(model, 0, h)).accuracy_drop < 0.05
    assert ablation_effect(model, eval_batch, [zero_ablate_head(model, 0, h) for h in others]).accuracy_drop < 0.05
    # The value shift is not needed: one-layer induction reads the *current* token's value at the
    # position after the match (beta = (1, 0) is the paper's induction point), which identity
    # value coefficients already do. Removing every head's value shift leaves induction intact.
    no_value_shift = ablation_effect(model, eval_batch, [remove_value_shift(model, 0, h) for h in range(n_heads)])
    assert no_value_shift.accuracy_drop < 0.03, no_value_shift
    # The per-KV-head key-shift sweep ranks the induction heads first.
    shift_table = ablate_each_shift(model, eval_batch, "k")
    assert sorted(h for _, h, _ in shift_table.ranked()[: len(heads)]) == heads
    assert_unchanged(model, before)


def test_vanilla_two_layer_circuit_found_by_ablation(vanilla_2l, eval_batch, vanilla_heads):
    model = vanilla_2l
    n_heads = model.cfg.n_heads
    before = snapshot(model)
    zero = ablate_each_head(model, eval_batch)
    mean = ablate_each_head(model, eval_batch, method="mean")
    assert zero.accuracy_before >= 0.9
    prev = vanilla_heads["previous"]

    # The layer-0 head whose ablation hurts most is the one that attends to t - 1 (and hardly any
    # other head does) ...
    _, cache = model.run_with_cache(eval_batch.tokens, names_filter="blocks.0.attn.hook_pattern")
    pattern = cache["blocks.0.attn.hook_pattern"]  # [batch, head, q, k]
    prev_attention = pattern.diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=(0, -1))  # [head]
    assert int(prev_attention.argmax()) == prev
    assert prev_attention[prev] > 0.6
    assert all(prev_attention[h] < 0.4 for h in range(n_heads) if h != prev)
    # ... ablating it destroys induction; ablating any other layer-0 head does not.
    assert zero.accuracy[0, prev] < 0.3 and zero.accuracy_drop[0, prev] > 0.6
    assert all(zero.accuracy_drop[0, h] < 0.05 for h in range(n_heads) if h != prev), zero.accuracy_drop
    others = ablation_effect(model, eval_batch, [zero_ablate_head(model, 0, h) for h in range(n_heads) if h != prev])
    assert others.accuracy_drop < 0.1, others
    assert int(mean.accuracy_drop[0].argmax()) == prev and mean.accuracy[0, prev] < 0.3  # mean ablation agrees

    # Layer 1: induction is shared by the heads here: each one's ablation costs accuracy, none
    # destroys it alone, all together do.
    assert all(0.03 < zero.accuracy_drop[1, h] < 0.5 for h in range(n_heads)), zero.accuracy_drop
    all_l1 = ablation_effect(model, eval_batch, [zero_ablate_head(model, 1, h) for h in range(n_heads)])
    assert all_l1.accuracy_after < 0.1
    assert_unchanged(model, before)


def test_ablation_is_a_frozen_record():
    model = build(n_layers=1)
    a = zero_ablate_head(model, 0, 0)
    assert isinstance(a, Ablation) and a.label == "zero L0H0" and a.fwd_hook[0] == "blocks.0.attn.hook_z"
    with pytest.raises(AttributeError):
        a.label = "x"
