"""Linear probes for the previous token: known answers on trained models and on synthetic features."""

from __future__ import annotations

import pytest
import torch

from probes.linear import default_sites, fit_logistic, previous_token_probe
from tests.helpers import build

CHANCE = 1 / 23  # 23 content tokens


def test_fit_logistic_separable_and_random_labels():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (400,), generator=g)
    x = torch.nn.functional.one_hot(y, 5).float() + 0.05 * torch.randn(400, 5, generator=g)
    W, b, mean, std = fit_logistic(x, y, 5)
    assert ((((x - mean) / std) @ W + b).argmax(-1) == y).all()
    again = fit_logistic(x, y, 5)
    assert torch.equal(again[0], W)  # deterministic


def test_kvshift_previous_token_lives_in_the_shifted_keys(kvshift_1l, eval_batch, kvshift_induction_heads):
    head = kvshift_induction_heads[0]
    sites = ["blocks.0.hook_resid_pre", ("blocks.0.attn.hook_k_shifted", head), ("blocks.0.attn.hook_k", head),
             "blocks.0.attn.hook_k_shifted"]
    # start=2: skip t = 1, whose previous token is always BOS
    res = previous_token_probe(kvshift_1l, eval_batch.tokens, sites, start=2)
    k_shifted = res[f"blocks.0.attn.hook_k_shifted[{head}]"]
    assert k_shifted.test_accuracy > 0.9 and k_shifted.above_shuffled > 0.8, k_shifted
    assert k_shifted.shuffled_accuracy < 2.5 * CHANCE
    assert res["blocks.0.attn.hook_k_shifted"].test_accuracy > 0.9  # all heads flattened
    # The residual stream entering layer 0 is token + position of t alone: near chance ...
    resid = res["blocks.0.hook_resid_pre"]
    assert resid.test_accuracy < 2 * CHANCE and abs(resid.above_shuffled) < 0.03, resid
    # ... and so is the same head's raw key: the previous token enters through the shift.
    raw = res[f"blocks.0.attn.hook_k[{head}]"]
    assert raw.test_accuracy < 2 * CHANCE and abs(raw.above_shuffled) < 0.03, raw
    for r in res.values():
        assert r.n_train == 128 * 30 and r.n_test == 128 * 30 and r.n_classes == 24
        assert abs(r.majority_accuracy - CHANCE) < 0.03


def test_vanilla_previous_token_is_written_by_layer_0(vanilla_2l, eval_batch):
    res = previous_token_probe(vanilla_2l, eval_batch.tokens,
                               ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post"], start=2)
    assert res["blocks.0.hook_resid_pre"].test_accuracy < 2 * CHANCE
    assert res["blocks.0.hook_resid_post"].test_accuracy > 0.9  # the previous-token head wrote it
    assert res["blocks.0.hook_resid_post"].above_shuffled > 0.8


def test_defaults_batch_and_errors():
    model = build(n_layers=2)
    tokens = torch.randint(0, 23, (6, 12), generator=torch.Generator().manual_seed(0))
    assert default_sites(model) == ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.0.attn.hook_k_shifted",
                                    "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post", "blocks.1.attn.hook_k_shifted"]
    res = previous_token_probe(model, tokens, steps=20)
    assert list(res) == default_sites(model)
    assert res["blocks.0.hook_resid_pre"].n_features == 16 and res["blocks.0.attn.hook_k_shifted"].n_features == 16
    assert res["blocks.0.hook_resid_pre"].n_train == 3 * 11
    assert previous_token_probe(model, tokens, steps=20) == res  # seeded
    vanilla = build(n_layers=1, shift_k=False, shift_v=False)
    assert default_sites(vanilla) == ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post"]
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.hook_k_shifted"):
        previous_token_probe(vanilla, tokens, ["blocks.0.attn.hook_k_shifted"])
    with pytest.raises(ValueError, match="per-position"):
        previous_token_probe(model, tokens, ["blocks.0.attn.hook_shift_k"])
    with pytest.raises(ValueError, match="head axis"):
        previous_token_probe(model, tokens, [("blocks.0.hook_resid_pre", 0)])
    with pytest.raises(ValueError, match="head=9"):
        previous_token_probe(model, tokens, [("blocks.0.attn.hook_k_shifted", 9)])
    with pytest.raises(ValueError, match="at least 2 sequences"):
        previous_token_probe(model, tokens[:1], ["blocks.0.hook_resid_pre"])
    with pytest.raises(ValueError, match="start"):
        previous_token_probe(model, tokens, ["blocks.0.hook_resid_pre"], start=0)
