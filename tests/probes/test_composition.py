"""Composition scores: exact values on hand-built weights, the random baseline, a trained circuit."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from probes.ablation import ablate_each_head
from probes.composition import (
    all_composition_scores,
    composition_report,
    composition_scores_from_weights,
    random_composition_baseline,
)
from tests.helpers import build

D_MODEL, D_HEAD = 16, 4


def random_weights(seed: int, n_layers: int = 2, n_heads: int = 2):
    g = torch.Generator().manual_seed(seed)
    W_Q, W_K, W_V = (torch.randn(n_layers, n_heads, D_MODEL, D_HEAD, generator=g) for _ in range(3))
    W_O = torch.randn(n_layers, n_heads, D_HEAD, D_MODEL, generator=g)
    return W_Q, W_K, W_V, W_O


def e(i: int, n: int = D_MODEL) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(i), n).float()


def test_head_writing_exactly_what_a_later_key_reads_has_k_composition_one():
    W_Q, W_K, W_V, W_O = random_weights(0)
    # head A = (0, 0) reads residual direction 1 and writes direction 5 (rank 1)
    W_V[0, 0], W_O[0, 0] = 0, 0
    W_V[0, 0, :, 0], W_O[0, 0, 0] = e(1), e(5)
    # head B = (1, 1): its keys read exactly direction 5, its queries direction 2 (rank 1)
    W_K[1, 1], W_Q[1, 1] = 0, 0
    W_K[1, 1, :, 0], W_Q[1, 1, :, 0] = e(5), e(2)
    k = composition_scores_from_weights(W_Q, W_K, W_V, W_O, "K")
    q = composition_scores_from_weights(W_Q, W_K, W_V, W_O, "Q")
    assert k[0, 0, 1, 1].item() == pytest.approx(1.0, abs=1e-6)
    assert q[0, 0, 1, 1].item() == pytest.approx(0.0, abs=1e-6)  # B's queries read direction 2, not 5
    mean, std = random_composition_baseline(D_MODEL, D_HEAD, "K")
    assert (1.0 - mean) / std > 10  # far above chance
    # no path backwards or within a layer
    assert torch.equal(k[1], torch.zeros_like(k[1])) and torch.equal(k[0, :, 0], torch.zeros_like(k[0, :, 0]))
    # A writing a direction orthogonal to what B reads: 0
    W_O[0, 0, 0] = e(6)
    assert composition_scores_from_weights(W_Q, W_K, W_V, W_O, "K")[0, 0, 1, 1].item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_aligned_rank_r_projections_score_one_over_sqrt_r(rank):
    # W_OV of A and W_QK of B both the orthogonal projection onto the same r-dim subspace
    W_Q, W_K, W_V, W_O = random_weights(1)
    U = torch.linalg.qr(torch.randn(D_MODEL, rank, generator=torch.Generator().manual_seed(2)))[0]
    basis = torch.zeros(D_MODEL, D_HEAD)
    basis[:, :rank] = U
    W_V[0, 0], W_O[0, 0], W_Q[1, 0], W_K[1, 0] = basis, basis.T, basis, basis
    for mode in ("Q", "K"):
        s = composition_scores_from_weights(W_Q, W_K, W_V, W_O, mode)[0, 0, 1, 0].item()
        assert s == pytest.approx(1 / math.sqrt(rank), abs=1e-5)


def test_definition_matches_dense_products():
    W_Q, W_K, W_V, W_O = random_weights(3)
    ov = W_V[0, 1] @ W_O[0, 1]
    qk = W_Q[1, 0] @ W_K[1, 0].T
    ov2 = W_V[1, 0] @ W_O[1, 0]

    def score(a, b):
        return ((a @ b).norm() / (a.norm() * b.norm())).item()

    expected = {"Q": score(ov, qk), "K": score(ov, qk.T), "V": score(ov, ov2)}
    for mode, value in expected.items():
        assert composition_scores_from_weights(W_Q, W_K, W_V, W_O, mode)[0, 1, 1, 0].item() == pytest.approx(value, rel=1e-4)


def test_random_model_sits_at_the_baseline():
    model = build(n_layers=3, d_model=32, d_head=8, shift_k=False, shift_v=False, randomize_weights=False)
    for mode in ("Q", "K", "V"):
        report = composition_report(model, mode, n_draws=400)
        valid = report.scores[torch.arange(3)[:, None, None, None] < torch.arange(3)[None, None, :, None]
                              .expand(3, 4, 3, 4)]
        assert valid.numel() == 3 * 16
        n = valid.numel()
        assert abs(valid.mean().item() - report.baseline_mean) < 4 * report.baseline_std / math.sqrt(n)
        assert (valid - report.baseline_mean).abs().max().item() < 5 * report.baseline_std
        assert 0.1 < report.baseline_mean < 0.3


def test_trained_vanilla_previous_token_head_composes_with_layer_1_keys(vanilla_2l, eval_batch, vanilla_heads):
    prev = vanilla_heads["previous"]
    report = composition_report(vanilla_2l, "K")
    (src, dst, top) = report.top(1)[0]
    assert src == (0, prev) and dst[0] == 1  # the largest entry starts at the previous-token head
    drops = ablate_each_head(vanilla_2l, eval_batch).accuracy_drop
    assert drops[1, dst[1]] > 0.03  # and ends at a head that induction needs
    z = report.z_scores[0, :, 1]
    assert (z[prev] > 10).all()  # every layer-1 head's keys read the previous-token head
    others = [h for h in range(vanilla_2l.cfg.n_heads) if h != prev]
    assert z[prev].min() > 2 * z[others].max()
    # the previous-token head's output is not what layer-1 queries or values read
    assert composition_report(vanilla_2l, "Q").z_scores[0, prev, 1].max() < 2
    assert composition_report(vanilla_2l, "V").z_scores[0, prev, 1].max() < 2


def test_errors_and_the_shift_warning():
    with pytest.raises(ValueError, match="at least 2 layers"):
        all_composition_scores(build(n_layers=1))
    with pytest.raises(ValueError, match="W_Q"):
        all_composition_scores(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="mode"):
        all_composition_scores(build(n_layers=2), "X")
    with pytest.raises(ValueError, match="W_O"):
        W_Q, W_K, W_V, W_O = random_weights(0)
        composition_scores_from_weights(W_Q, W_K, W_V, W_O.transpose(-1, -2)[..., :3], "K")
    with pytest.warns(UserWarning, match="shift"):
        all_composition_scores(build(n_layers=2))  # random (non-identity) coefficients
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        all_composition_scores(build(n_layers=2, shift_k=False, shift_v=False))
        all_composition_scores(build(n_layers=2, randomize_weights=False))  # identity coefficients


def test_hand_built_two_layer_circuit_has_high_k_composition():
    """The hand-built previous-token (L0) -> induction (L1) circuit of tests/probes: its L0 head
    writes the previous token exactly where the L1 head's keys read, so K-composition is far above
    the random baseline and above Q- and V-composition."""
    from tests.probes import two_layer_induction_model

    model = two_layer_induction_model(16, 24)
    k = all_composition_scores(model, "K")[0, 0, 1, 0].item()
    q = all_composition_scores(model, "Q")[0, 0, 1, 0].item()
    v = all_composition_scores(model, "V")[0, 0, 1, 0].item()
    mean, std = random_composition_baseline(model.cfg.d_model, model.cfg.d_head, "K")
    assert (k - mean) / std > 5
    assert k > q and k > v
