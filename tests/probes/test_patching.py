"""Activation patching by full hook name, against manual ``run_with_hooks`` and exact answers."""

from __future__ import annotations

import copy

import pytest
import torch
from transformer_lens import patching as tl_patching

from probes.patching import hook_layout, make_patch_setter, patch_by_name, run_with_patches
from tests.helpers import build


@pytest.fixture(scope="module")
def pair(induction_task):
    """Clean and corrupted token batches of the same shape (batch 4)."""
    clean = induction_task.sample(4, torch.Generator().manual_seed(11))
    corrupted = induction_task.sample(4, torch.Generator().manual_seed(12))
    return clean, corrupted


def loss_metric(task, batch):
    return lambda logits: torch.tensor(task.metrics(logits, batch)["loss"])


def test_full_patch_restores_the_clean_logits_exactly(kvshift_1l, vanilla_2l, pair):
    clean, corrupted = pair
    for model in (kvshift_1l, vanilla_2l):
        last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
        # (caching every hook puts attention on its explicit path, which differs from the fused
        # kernel by ~1e-6: the reference logits come from a plain forward pass, like the patched runs)
        clean_logits = model(clean.tokens)
        _, cache = model.run_with_cache(clean.tokens)
        corrupted_logits = model(corrupted.tokens)
        assert not torch.equal(clean_logits, corrupted_logits)

        def distance(logits, clean_logits=clean_logits):
            return (logits - clean_logits).abs().max()

        result = patch_by_name(model, clean.tokens, corrupted.tokens, [last], distance)
        assert result[last].item() == 0.0
        assert result.clean_value == 0.0 and result.corrupted_value > 0
        # every input-dependent tensor the first layer reads, patched together
        entry = ["hook_embed"] + (["hook_pos_embed"] if "hook_pos_embed" in model.hook_dict else [])
        patched = run_with_patches(model, corrupted.tokens, {n: cache[n] for n in entry})
        assert torch.equal(patched, clean_logits)
    # the 1-layer KV-shift model: attention reads only q, K' and V' -- patch them plus the residual
    # stream that bypasses attention, and the output is the clean one
    names = ["blocks.0.hook_resid_pre", "blocks.0.attn.hook_q", "blocks.0.attn.hook_k_shifted",
             "blocks.0.attn.hook_v_shifted"]
    _, cache = kvshift_1l.run_with_cache(clean.tokens, names_filter=lambda n: n in names)
    clean_logits = kvshift_1l(clean.tokens)
    patched = run_with_patches(kvshift_1l, corrupted.tokens, {n: cache[n] for n in names})
    torch.testing.assert_close(patched, clean_logits, rtol=0, atol=1e-5)


def test_per_position_patching_of_k_shifted_matches_manual_hooks(kvshift_1l, induction_task, pair):
    clean, corrupted = pair
    name = "blocks.0.attn.hook_k_shifted"
    metric = loss_metric(induction_task, clean)
    result = patch_by_name(kvshift_1l, clean.tokens, corrupted.tokens, [name], metric, index="pos")
    assert result.axes[name] == ("pos",) and result[name].shape == (32,)
    _, cache = kvshift_1l.run_with_cache(clean.tokens, names_filter=name)
    for pos in range(32):
        def hook(act, hook, pos=pos):
            act = act.clone()
            act[:, pos] = cache[name][:, pos]
            return act
        manual = metric(kvshift_1l.run_with_hooks(corrupted.tokens, fwd_hooks=[(name, hook)]))
        assert result[name][pos].item() == pytest.approx(manual.item(), abs=1e-6)
    # per (position, head): the same cells one head at a time
    per_head = patch_by_name(kvshift_1l, clean.tokens, corrupted.tokens, name, metric, index="pos_head")
    assert per_head[name].shape == (32, kvshift_1l.cfg.n_key_value_heads or kvshift_1l.cfg.n_heads)
    # patching a late position cannot change predictions before it: those cells equal no patch
    assert per_head[name][31].tolist() == pytest.approx([result.corrupted_value] * 4, abs=1e-6)


def test_standard_hooks_go_through_transformer_lens_and_agree_with_it(kvshift_1l, induction_task, pair, monkeypatch):
    clean, corrupted = pair
    metric = loss_metric(induction_task, clean)
    _, cache = kvshift_1l.run_with_cache(clean.tokens)
    calls = []
    original = tl_patching.generic_activation_patch
    monkeypatch.setattr(tl_patching, "generic_activation_patch",
                        lambda *a, **k: calls.append(a[5]) or original(*a, **k))
    ours = patch_by_name(kvshift_1l, clean.tokens, corrupted.tokens, "blocks.0.attn.hook_z", metric, index="pos_head")
    patch_by_name(kvshift_1l, clean.tokens, corrupted.tokens, "blocks.0.attn.hook_k_shifted", metric)
    assert calls == ["z"]  # hook_z through TransformerLens; hook_k_shifted, which it cannot name, not
    monkeypatch.undo()
    theirs = tl_patching.get_act_patch_attn_head_out_by_pos(kvshift_1l, corrupted.tokens, cache, metric)
    torch.testing.assert_close(ours["blocks.0.attn.hook_z"], theirs[0].cpu(), rtol=0, atol=1e-6)
    # and per head, the TransformerLens path equals hand-written hooks
    per_head = patch_by_name(kvshift_1l, clean.tokens, corrupted.tokens, "blocks.0.attn.hook_z", metric, index="head")
    for head in range(4):
        def hook(act, hook, head=head):
            act = act.clone()
            act[:, :, head] = cache["blocks.0.attn.hook_z"][:, :, head]
            return act
        manual = metric(kvshift_1l.run_with_hooks(corrupted.tokens, fwd_hooks=[("blocks.0.attn.hook_z", hook)]))
        assert per_head["blocks.0.attn.hook_z"][head].item() == pytest.approx(manual.item(), abs=1e-6)


def test_patching_hook_v_at_j_changes_v_shifted_at_j_and_j_plus_1(kvshift_1l, pair):
    clean, corrupted = pair
    _, cache = kvshift_1l.run_with_cache(clean.tokens, names_filter="blocks.0.attn.hook_v")
    store = {}

    def keep(act, hook):
        store["v_shifted"] = act.detach().clone()

    capture = [("blocks.0.attn.hook_v_shifted", keep)]
    with kvshift_1l.hooks(fwd_hooks=capture):
        kvshift_1l(corrupted.tokens)
        base = store["v_shifted"]
        j = 10
        run_with_patches(kvshift_1l, corrupted.tokens, {"blocks.0.attn.hook_v": cache["blocks.0.attn.hook_v"]}, pos=j)
        patched = store["v_shifted"]
    changed = (patched != base).flatten(2).any(-1).any(0)  # [pos]
    assert changed.nonzero().flatten().tolist() == [j, j + 1]


def test_coefficient_patching(kvshift_1l, induction_task, pair):
    clean, corrupted = pair
    names = ["blocks.0.attn.hook_shift_k", "blocks.0.attn.hook_shift_v"]
    metric = loss_metric(induction_task, corrupted)
    # coefficients are weights: from a clean run of the same model they change nothing
    same = patch_by_name(kvshift_1l, clean.tokens, corrupted.tokens, names, metric, index="head")
    for n in names:
        assert same[n].tolist() == [same.corrupted_value] * 4

    # from another model they do: a twin with identity coefficients runs exactly as the trained
    # model once the trained coefficients are patched in
    twin = copy.deepcopy(kvshift_1l)
    with torch.no_grad():
        for which in ("k", "v"):
            p = getattr(twin.blocks[0].attn, f"shift_{which}")
            p.zero_()
            p[:, 0] = 1
    _, trained_cache = kvshift_1l.run_with_cache(corrupted.tokens, names_filter=lambda n: n in names)
    patched = run_with_patches(twin, corrupted.tokens, {n: trained_cache[n] for n in names})
    assert torch.equal(patched, kvshift_1l(corrupted.tokens))

    # patch_by_name with a clean_cache from the trained model, into the unshifted twin: the key
    # coefficients alone restore induction (the value shift is not needed, see test_ablation)
    acc = lambda logits: torch.tensor(induction_task.metrics(logits, corrupted)["accuracy"])  # noqa: E731
    result = patch_by_name(twin, None, corrupted.tokens, names, acc, clean_cache=trained_cache)
    assert result.clean_value is None and result.corrupted_value < 0.2
    assert result["blocks.0.attn.hook_shift_k"].item() > 0.85
    assert result["blocks.0.attn.hook_shift_v"].item() < 0.2
    with pytest.raises(ValueError, match="clean run"):
        result.normalized("blocks.0.attn.hook_shift_k")


def test_normalized_batch_and_gqa():
    model = build(n_layers=2, n_heads=4, d_head=4, n_key_value_heads=2)
    g = torch.Generator().manual_seed(4)
    clean, corrupted = torch.randint(0, 23, (3, 8), generator=g), torch.randint(0, 23, (3, 8), generator=g)
    clean_logits = model(clean)
    metric = lambda logits: -(logits - clean_logits).square().mean()  # noqa: E731
    names = ["blocks.1.attn.hook_k_shifted", "blocks.1.attn.hook_shift_k", "blocks.0.attn.hook_z",
             "blocks.1.attn.hook_pattern", "blocks.1.hook_resid_post"]
    result = patch_by_name(model, clean, corrupted, names, metric, index="all")
    assert result.normalized("blocks.1.hook_resid_post").item() == pytest.approx(1.0)
    assert result.normalized("blocks.1.attn.hook_shift_k").item() == pytest.approx(0.0)
    heads = patch_by_name(model, clean, corrupted, names[:4], metric, index="head")
    assert heads["blocks.1.attn.hook_k_shifted"].shape == (2,)  # KV heads
    assert heads["blocks.1.attn.hook_shift_k"].shape == (2,)
    assert heads["blocks.0.attn.hook_z"].shape == (4,)  # query heads
    assert heads["blocks.1.attn.hook_pattern"].shape == (4,)


def test_layouts_and_errors():
    assert hook_layout("blocks.0.attn.hook_shift_k", (2, 2)) == (None, 0)
    assert hook_layout("blocks.0.attn.hook_pattern", (1, 4, 5, 5)) == (None, 1)
    assert hook_layout("blocks.0.attn.hook_k_shifted", (1, 5, 2, 4)) == (1, 2)
    assert hook_layout("blocks.0.hook_resid_pre", (1, 5, 16)) == (1, None)
    setter = make_patch_setter("blocks.0.attn.hook_z", (1, 3, 2, 2), "pos_head")
    corrupted, clean = torch.zeros(1, 3, 2, 2), torch.ones(1, 3, 2, 2)
    out = setter(corrupted, [0, 1, 0], clean)
    assert out.sum() == 2 and out[0, 1, 0].sum() == 2 and corrupted.sum() == 0  # a copy

    model = build(n_layers=1)
    tokens = torch.randint(0, 23, (2, 6), generator=torch.Generator().manual_seed(0))
    metric = lambda logits: logits.mean()  # noqa: E731
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.hook_nope"):
        patch_by_name(model, tokens, tokens, ["blocks.0.attn.hook_nope"], metric)
    with pytest.raises(ValueError, match="position axis|pos axis"):
        patch_by_name(model, tokens, tokens, ["blocks.0.attn.hook_shift_k"], metric, index="pos")
    with pytest.raises(ValueError, match="head axis"):
        patch_by_name(model, tokens, tokens, ["blocks.0.hook_resid_pre"], metric, index="head")
    with pytest.raises(ValueError, match="index="):
        patch_by_name(model, tokens, tokens, ["blocks.0.hook_resid_pre"], metric, index="layer")
    with pytest.raises(ValueError, match="same shape"):
        patch_by_name(model, tokens, tokens[:, :5], ["blocks.0.attn.hook_k_shifted"], metric)
    with pytest.raises(ValueError, match="scalar"):
        patch_by_name(model, tokens, tokens, ["blocks.0.attn.hook_k_shifted"], lambda logits: logits)
    vanilla = build(n_layers=1, shift_k=False, shift_v=False)
    with pytest.raises(ValueError, match=r"hook_k_shifted"):
        patch_by_name(vanilla, tokens, tokens, ["blocks.0.attn.hook_k_shifted"], metric)
    model.train()
    with pytest.raises(ValueError, match="eval"):
        patch_by_name(model, tokens, tokens, ["blocks.0.attn.hook_k_shifted"], metric)
