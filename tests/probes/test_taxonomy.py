"""The head taxonomy on models whose answer is known: hand-constructed circuits (tests.probes), a
trained one-layer KV-shift model, and hand-written scores at the thresholds."""

from __future__ import annotations

import pytest
import torch
from transformer_lens.head_detector import detect_head

from kvshift_lens.data.tasks import RepeatedTokensTask
from kvshift_lens.train import RunSpec, TrainConfig, train
from probes.scores import HeadScores
from probes.taxonomy import (
    INDUCTION_THRESHOLD,
    KEY_SHIFT_THRESHOLD,
    PREVIOUS_TOKEN_THRESHOLD,
    HeadClass,
    HeadKind,
    classify_from_scores,
    classify_heads,
)
from tests.helpers import build
from tests.probes import shift_head_model, two_layer_induction_model

TASK = RepeatedTokensTask(d_vocab=16, run_length=8, distinct=True, bos=True)  # [BOS] r r, 17 tokens


@pytest.fixture(scope="module")
def batch():
    return TASK.sample(8, torch.Generator().manual_seed(0))


def accuracy(model, batch) -> float:
    with torch.no_grad():
        return TASK.metrics(model(batch.tokens), batch)["accuracy"]


# ================================================================== hand-constructed models


def test_hand_built_one_layer_shift_model_is_an_induction_head_via_the_shift(batch):
    """alpha = (0, 1), beta = (1, 0), Q.K' large iff tok_i == tok_{j-1}, OV copies: the paper's
    one-layer induction head. It solves the task and is classified as induction via the shift."""
    model = shift_head_model(16, 24)
    assert accuracy(model, batch) == 1.0
    tax = classify_heads(model, batch.tokens)
    (head,) = tax.heads
    assert head.kind is HeadKind.INDUCTION_VIA_SHIFT and head.kind.is_induction
    assert (head.layer, head.head) == (0, 0)
    assert head.induction > 0.99 and head.prefix_matching > 0.99 and head.key_match > 0.99
    assert head.key_past_weight == 1.0
    assert head.key_coeffs == (0.0, 1.0) and head.value_coeffs == (1.0, 0.0)
    assert head.copying == pytest.approx(1.0)
    # detect_head sees the stripe (it is right that this head attends like an induction head),
    # but from the pattern alone it cannot say that one layer did it through the shift.
    assert detect_head(model, batch.tokens[:1], "induction_head").item() > 0.45


def test_hand_built_window_two_shift_model_is_found_only_by_the_effective_score(batch):
    model = shift_head_model(16, 24, key_coeffs=(0.0, 0.0, 1.0), value_coeffs=(0.0, 1.0, 0.0))
    assert accuracy(model, batch) == 1.0
    head = classify_heads(model, batch.tokens).of(0, 0)
    assert head.kind is HeadKind.INDUCTION_VIA_SHIFT
    assert head.induction > 0.99 and head.prefix_matching < 0.01
    assert detect_head(model, batch.tokens[:1], "induction_head").item() < 0.01


def test_hand_built_key_and_value_both_shifted_is_a_duplicate_head_not_induction(batch):
    """alpha = beta = (0, 1): attends on the induction stripe but reads the earlier copy of the
    current token. detect_head calls it an induction head; it fails the task; the taxonomy reads
    the value sources and calls it a duplicate-token head."""
    model = shift_head_model(16, 24, key_coeffs=(0.0, 1.0), value_coeffs=(0.0, 1.0))
    assert accuracy(model, batch) == 0.0
    head = classify_heads(model, batch.tokens).of(0, 0)
    assert head.kind is HeadKind.DUPLICATE_TOKEN
    assert head.prefix_matching > 0.99 and head.induction < 0.01 and head.duplicate_token > 0.99
    assert detect_head(model, batch.tokens[:1], "induction_head").item() > 0.45


def test_hand_built_two_layer_vanilla_circuit_is_previous_token_plus_induction_via_composition(batch):
    model = two_layer_induction_model(16, 24)
    assert accuracy(model, batch) == 1.0
    tax = classify_heads(model, batch.tokens)
    assert tax.kinds() == [[HeadKind.PREVIOUS_TOKEN], [HeadKind.INDUCTION_VIA_COMPOSITION]]
    l0, l1 = tax.of(0, 0), tax.of(1, 0)
    assert l0.previous_token > 0.99 and l0.previous_token == l0.previous_token_plain
    assert l1.induction > 0.99 and l1.key_past_weight == 0.0 and l1.key_coeffs == (1.0,)
    assert l1.copying == pytest.approx(1.0)
    assert tax.by_kind("previous_token") == [l0]
    assert [r["kind"] for r in tax.records()] == ["previous_token", "induction_via_composition"]
    with pytest.raises(KeyError, match=r"no head \(2, 0\)"):
        tax.of(2, 0)


# ================================================================== trained model


@pytest.fixture(scope="module")
def trained_shift_model(tmp_path_factory):
    """The CI-sized run of tests/train/test_learning.py: one KV-shift layer learns induction."""
    spec = RunSpec(
        model=dict(d_model=32, d_head=8, n_layers=1, n_ctx=32, attn_only=True),
        task=dict(name="induction", d_vocab=24, seq_len=32),
        train=TrainConfig(steps=600, batch_size=32, lr=3e-3, warmup_steps=20, eval_every=20,
                          progress=False, device="cpu", stop_at_target=True, seed=0),
    )
    result = train(spec, tmp_path_factory.mktemp("kvshift_1l"))
    assert result.steps_to_target is not None
    return result.model.eval()


def test_trained_one_layer_shift_model_has_an_induction_head_via_the_shift(trained_shift_model):
    task = RepeatedTokensTask(d_vocab=24, run_length=15, distinct=True, bos=True)  # 31 tokens
    batch = task.sample(16, torch.Generator().manual_seed(1))
    tax = classify_heads(trained_shift_model, batch.tokens)
    found = tax.by_kind(HeadKind.INDUCTION_VIA_SHIFT)
    assert found, [h.reason for h in tax]
    assert not tax.by_kind(HeadKind.INDUCTION_VIA_COMPOSITION)  # one layer: nothing to compose
    best = max(tax, key=lambda h: h.induction)
    assert best in found
    a1, a2 = best.key_coeffs
    b1, b2 = best.value_coeffs
    assert a1 < a2 and b1 > b2  # the paper's induction-style head
    assert best.copying > 0.5


# ================================================================== rules and thresholds


def scores_for(rows: list[dict], key_coeffs=None, n_layers: int = 1) -> HeadScores:
    """HeadScores for n_layers x (len(rows) / n_layers) heads from per-head dicts of value-source
    scores (missing scores are 0)."""
    n_heads = len(rows) // n_layers

    def field(name: str) -> torch.Tensor:
        return torch.tensor([r.get(name, 0.0) for r in rows]).reshape(n_layers, n_heads)

    zero = torch.zeros(n_layers, n_heads)
    return HeadScores(previous_token=field("prev"), duplicate_token=field("dup"),
                      induction=field("ind"), previous_token_plain=zero, duplicate_token_plain=zero,
                      prefix_matching=zero, key_match=zero, key_coeffs=key_coeffs)


def test_rules_at_the_thresholds():
    t = INDUCTION_THRESHOLD
    rows = [
        {"ind": t, "prev": 0.9},          # induction wins over previous-token
        {"ind": t - 1e-3, "prev": PREVIOUS_TOKEN_THRESHOLD},
        {"ind": t, "dup": 0.9},           # induction, but key not shifted back, layer 0
        {"dup": 0.5},
    ]
    k = torch.tensor([[[0.4, 0.6], [1.0, 0.0], [0.5, 0.5], [1.0, 0.0]]])  # [layer, head, lag]
    tax = classify_from_scores(scores_for(rows, k))
    assert [h.kind for h in tax] == [HeadKind.INDUCTION_VIA_SHIFT, HeadKind.PREVIOUS_TOKEN,
                                     HeadKind.DUPLICATE_TOKEN, HeadKind.DUPLICATE_TOKEN]
    assert tax.of(0, 2).key_past_weight == KEY_SHIFT_THRESHOLD  # a tie is not "looks back"
    assert "layer 0" not in tax.of(0, 2).reason
    # layer 0 induction without a key shift and nothing else: "other", and the reason says why
    lone = classify_from_scores(scores_for([{"ind": 0.9}])).of(0, 0)
    assert lone.kind is HeadKind.OTHER and "layer 0 without a key shift" in lone.reason
    # the same head in layer 1 is induction via composition; a negative alpha2 still looks back
    two = classify_from_scores(scores_for([{}, {}, {"ind": 0.9}, {"ind": 0.9}], n_layers=2,
                                          key_coeffs=torch.tensor([[[1.0, 0.0]] * 2,
                                                                   [[1.0, 0.0], [0.2, -0.9]]])))
    assert two.kinds() == [[HeadKind.OTHER, HeadKind.OTHER],
                           [HeadKind.INDUCTION_VIA_COMPOSITION, HeadKind.INDUCTION_VIA_SHIFT]]
    # thresholds can be overridden per call
    assert classify_from_scores(scores_for([{"dup": 0.5}]), duplicate_token_threshold=0.6).of(
        0, 0).kind is HeadKind.OTHER


def test_a_previous_token_role_shared_by_several_heads():
    """Four layer-0 heads each attending to t-1 with ~0.18 (together 0.74, as the demo's vanilla
    2-layer model does) share the role; a fifth at 0.05 does not; a layer with a real
    previous-token head, or whose heads sum to less than the threshold, is left alone."""
    shared = [{"prev": 0.16}, {"prev": 0.21}, {"prev": 0.18}, {"prev": 0.19}, {"prev": 0.05}]
    tax = classify_from_scores(scores_for(shared))
    assert [h.kind for h in tax] == [HeadKind.PREVIOUS_TOKEN_SHARED] * 4 + [HeadKind.OTHER]
    assert "together at 0.79" in tax.of(0, 0).reason
    weak = classify_from_scores(scores_for([{"prev": 0.09}] * 4))
    assert {h.kind for h in weak} == {HeadKind.OTHER}
    strong = classify_from_scores(scores_for([{"prev": 0.5}, {"prev": 0.2}, {"prev": 0.2}]))
    assert [h.kind for h in strong] == [HeadKind.PREVIOUS_TOKEN, HeadKind.OTHER, HeadKind.OTHER]
    # per layer: layer 1's heads do not borrow layer 0's scores
    two = classify_from_scores(scores_for([{"prev": 0.2}] * 3 + [{"prev": 0.1}] * 3, n_layers=2))
    assert two.kinds() == [[HeadKind.PREVIOUS_TOKEN_SHARED] * 3, [HeadKind.OTHER] * 3]


def test_grouped_query_heads_get_their_kv_heads_coefficients():
    model = build(n_layers=1, n_key_value_heads=2, d_model=16, d_head=4)  # 4 query heads
    tokens = RepeatedTokensTask(d_vocab=23, run_length=5, distinct=True).sample(
        2, torch.Generator().manual_seed(0)).tokens
    tax = classify_heads(model, tokens)
    k = model.shift_coefficients()["k"][0]  # [kv_head, lag]
    assert len(tax) == 4 and all(isinstance(h, HeadClass) for h in tax)
    for h in tax:
        assert h.key_coeffs == pytest.approx(tuple(k[h.head // 2].tolist()))


def test_rules_read_the_mix_not_the_gain(batch):
    """Scaling the value coefficients by a gain (the key's would also sharpen the softmax) leaves
    every score and the class unchanged: the rules are scale-free."""
    model = shift_head_model(16, 24)
    base = classify_heads(model, batch.tokens).heads[0]
    with torch.no_grad():
        model.blocks[0].attn.shift_v.mul_(4.4)
    scaled = classify_heads(model, batch.tokens).heads[0]
    assert scaled.value_coeffs == pytest.approx((4.4, 0.0))
    assert scaled.kind is base.kind
    for field in ("induction", "previous_token", "duplicate_token", "key_past_weight"):
        assert getattr(scaled, field) == pytest.approx(getattr(base, field), abs=1e-6), field
