"""Edge attribution patching with shift edges: known circuits of hand-built models, the shift split
against a hand-written re-implementation, exactness where the model is linear, and faithfulness
1 / 0 for the full / empty graph."""

from __future__ import annotations

import pytest
import torch

from probes.attribution import agreement, logprob_metric
from probes.eap import (
    Circuit,
    CircuitRunner,
    ComponentGraph,
    edge_attribution,
    faithfulness,
)
from tests.helpers import build
from tests.probes import shift_head_model, two_layer_induction_model
from tests.probes.test_attribution import corrupt_induction, target_logit_metric

V, N = 16, 8  # vocabulary and length of the repeated segment of the hand-built inputs


@pytest.fixture(scope="module")
def repeated():
    """Clean: 4 random segments of 8 distinct tokens, each repeated. Corrupted: the same second
    copy after a different first copy (nothing to induct from). Metric: the mean logit of the
    next token over the second copy (linear in the logits)."""
    g = torch.Generator().manual_seed(0)
    first = torch.stack([torch.randperm(V, generator=g)[:N] for _ in range(4)])
    clean = torch.cat([first, first], 1)
    corrupted = clean.clone()
    corrupted[:, :N] = torch.stack([torch.randperm(V, generator=g)[:N] for _ in range(4)])
    weight = torch.zeros(clean.shape)
    weight[:, N:-1] = 1
    targets = torch.cat([clean[:, 1:], clean[:, :1]], 1)

    def metric(logits):
        picked = logits.gather(-1, targets[..., None].to(logits.device))[..., 0]
        return (picked * weight).sum() / weight.sum()

    return clean, corrupted, metric


def _soften(model, factor: float):
    """Scale every W_Q: attention scores of 40 * factor instead of 40 (unsaturated for small
    factors, so gradients through the pattern do not vanish)."""
    with torch.no_grad():
        for block in model.blocks:
            block.attn.W_Q.mul_(factor)
    return model


HEAD_INPUTS = ["L0H0 <- embed via q", "L0H0 <- embed via k", "L0H0 <- embed via k_shift",
               "L0H0 <- embed via v", "L0H0 <- embed via v_shift"]


# ------------------------------------------------------------------ the 1-layer shift induction head
def test_graph_of_a_shifted_head_has_own_and_shift_ports():
    graph = ComponentGraph.from_model(shift_head_model(V, 2 * N))
    labels = [e.label for e in graph.edges]
    assert sorted(labels) == sorted(HEAD_INPUTS + ["logits <- embed via logits", "logits <- L0H0 via logits"])
    assert [e.is_shift for e in graph.edges if e.receiver == "L0H0"] == [False, False, True, False, True]


@pytest.mark.parametrize("softness", [1.0, 0.1])
def test_shift_induction_head_is_found_through_its_key_shift(repeated, softness):
    """alpha = (0, 1), beta = (1, 0): the key at j is token j-1, the value token j. The circuit is
    embed -> L0H0 via k_shift (find the earlier occurrence) and via v (copy what follows it), then
    L0H0 -> logits; the own key path carries nothing (alpha1 = 0), nor do q (the queries of the
    second copy are not corrupted) and v_shift (beta2 = 0)."""
    clean, corrupted, metric = repeated
    model = _soften(shift_head_model(V, 2 * N), softness)
    method = "eap-ig" if softness == 1.0 else "eap"  # saturated attention needs the integral
    scores = edge_attribution(model, clean, corrupted, metric, method=method, ig_steps=10)
    runner = CircuitRunner(model, clean, corrupted, metric)
    exact = dict(zip([e.label for e in runner.graph.edges], runner.edge_effects().tolist()))
    for label in ("L0H0 <- embed via k", "L0H0 <- embed via q", "L0H0 <- embed via v_shift"):
        assert scores[label] == 0 and exact[label] == 0
    ranked = [e.label for e, _ in scores.ranked() if e.receiver == "L0H0"]
    assert set(ranked[:2]) == {"L0H0 <- embed via k_shift", "L0H0 <- embed via v"}
    assert scores["L0H0 <- embed via k_shift"] < -1 and exact["L0H0 <- embed via k_shift"] < -4
    # the circuit by construction carries the metric; without its shift edge it collapses
    circuit = Circuit.from_labels(runner.graph, ["L0H0 <- embed via k_shift", "L0H0 <- embed via v",
                                                 "logits <- L0H0 via logits"])
    assert runner.faithfulness(circuit).fraction == pytest.approx(1.0, abs=1e-6)
    assert runner.faithfulness(circuit.without("L0H0 <- embed via k_shift")).fraction < 0.2
    # the extracted top-3 circuit is that circuit
    assert set(scores.circuit(top_k=3).labels) == set(circuit.labels)


def test_saturated_attention_hides_the_shift_edge_from_plain_eap(repeated):
    """The documented failure: at scores of 40 the gradient through the pattern is ~e^-40, so
    plain EAP scores the key shift edge ~0 while patching it costs the whole metric."""
    clean, corrupted, metric = repeated
    model = shift_head_model(V, 2 * N)
    eap = edge_attribution(model, clean, corrupted, metric)
    exact = CircuitRunner(model, clean, corrupted, metric).edge_effects(["L0H0 <- embed via k_shift"])
    assert float(exact[0]) < -4
    assert abs(eap["L0H0 <- embed via k_shift"]) < 1e-3
    # ... while the value edge, linear in this model, is exact
    exact_v = CircuitRunner(model, clean, corrupted, metric).edge_effects(["L0H0 <- embed via v"])
    assert eap["L0H0 <- embed via v"] == pytest.approx(float(exact_v[0]), rel=1e-4)


# ------------------------------------------------------------------ the 2-layer vanilla composition
@pytest.mark.parametrize("softness", [1.0, 0.1])
def test_vanilla_two_layer_circuit_composes_through_the_key(repeated, softness):
    """Previous-token head L0H0 writes token j-1 at j; induction head L1H0 reads it through its
    key (K-composition), the current token through its query and copies through its value."""
    clean, corrupted, metric = repeated
    model = _soften(two_layer_induction_model(V, 2 * N), softness)
    graph = ComponentGraph.from_model(model)
    assert not any(e.is_shift for e in graph.edges)
    method = "eap-ig" if softness == 1.0 else "eap"
    scores = edge_attribution(model, clean, corrupted, metric, method=method, ig_steps=10)
    expected = ["L0H0 <- embed via v", "L1H0 <- L0H0 via k", "L1H0 <- embed via v",
                "logits <- L1H0 via logits"]
    assert set(scores.circuit(top_k=4).labels) == set(expected)
    runner = CircuitRunner(model, clean, corrupted, metric)
    circuit = Circuit.from_labels(runner.graph, expected)
    assert runner.faithfulness(circuit).fraction == pytest.approx(1.0, abs=1e-6)
    assert runner.faithfulness(circuit.without("L1H0 <- L0H0 via k")).fraction < 0.2
    # the composition edge's exact effect equals its source's (the only path from L0H0's value)
    effects = runner.edge_effects(["L1H0 <- L0H0 via k", "L0H0 <- embed via v"])
    assert float(effects[0]) < -4
    assert float(effects[0]) == pytest.approx(float(effects[1]), abs=1e-4)


# ------------------------------------------------------------------ the shift split, independently
def _reference_split_gradients(model, clean, metric):
    """A hand-written re-implementation of a 1-layer model's shifted keys and values from separate
    own-position and shift inputs: ``K'_t = c_0 K(x_own)_t + c_1 K(x_shift)_{t-1}`` with
    ``K(x) = ln1(x) W_K + b_K`` (per KV head), replacing what the model computes, and the
    gradients of the metric at ``x_own`` and ``x_shift``."""
    attn, ln1 = model.blocks[0].attn, model.blocks[0].ln1
    _, cache = model.run_with_cache(clean, names_filter="blocks.0.hook_resid_pre")
    resid = cache["blocks.0.hook_resid_pre"]
    n_kv, stride = model.cfg.n_key_value_heads, model.cfg.n_heads // model.cfg.n_key_value_heads
    leaves = {}
    for w in ("k", "v"):
        for part in ("own", "shift"):
            leaves[w, part] = resid[:, :, None].expand(-1, -1, n_kv, -1).clone().requires_grad_(True)

    def projection(x, w):
        W, b = getattr(attn, f"W_{w.upper()}")[::stride], getattr(attn, f"b_{w.upper()}")[::stride]
        return torch.einsum("bpnm,nmd->bpnd", ln1(x), W) + b

    def replace(w):
        def hook(act, hook):
            c = attn.coefficients(w).detach()
            own, shifted = projection(leaves[w, "own"], w), projection(leaves[w, "shift"], w)
            out = own * c[:, 0, None]
            out[:, 1:] = out[:, 1:] + shifted[:, :-1] * c[:, 1, None]
            return out
        return hook

    with torch.enable_grad():
        logits = model.run_with_hooks(clean, fwd_hooks=[(f"blocks.0.attn.hook_{w}_shifted", replace(w))
                                                        for w in ("k", "v")])
        grads = torch.autograd.grad(metric(logits), list(leaves.values()))
    return dict(zip(leaves, grads))


@pytest.mark.parametrize("overrides", [dict(), dict(n_heads=4, n_key_value_heads=2),
                                       dict(positional_embedding_type="rotary")])
def test_shift_split_matches_a_hand_written_reference(overrides):
    model = build(seed=4, n_layers=1, attn_only=True, shift_k=True, shift_v=True, **overrides)
    g = torch.Generator().manual_seed(1)
    clean, corrupted = torch.randint(0, 23, (2, 10), generator=g), torch.randint(0, 23, (2, 10), generator=g)
    metric = logprob_metric(clean)
    scores = edge_attribution(model, clean, corrupted, metric)
    grads = _reference_split_gradients(model, clean, metric)
    names = ["hook_embed"] + (["hook_pos_embed"] if "hook_pos_embed" in model.hook_dict else [])
    _, c_cache = model.run_with_cache(clean, names_filter=lambda n: n in names)
    _, x_cache = model.run_with_cache(corrupted, names_filter=lambda n: n in names)
    delta = sum(x_cache[n] - c_cache[n] for n in names)  # the embed node's corrupted - clean
    kv = "KV" if model.cfg.n_key_value_heads != model.cfg.n_heads else "H"
    for (w, part), grad in grads.items():
        port = w if part == "own" else f"{w}_shift"
        for g_ in range(model.cfg.n_key_value_heads):
            expected = float((delta * grad[:, :, g_]).sum())
            got = scores[f"L0{kv}{g_} <- embed via {port}"]
            assert got == pytest.approx(expected, rel=1e-4, abs=1e-6), (w, part, g_)


def test_exact_where_the_model_is_linear_in_the_edge(random_linear_setup):
    """An attention-only layer without norms, float64, and a metric linear in the logits: the
    logits are linear in every value input (own and shift ports) and in every edge into the
    logits, so EAP equals exact edge patching there; this checks the scores' gradient split
    against the faithfulness run's recomputed V'."""
    model, clean, corrupted, metric = random_linear_setup
    scores = edge_attribution(model, clean, corrupted, metric)
    runner = CircuitRunner(model, clean, corrupted, metric)
    linear = [e.label for e in runner.graph.edges if e.port in ("v", "v_shift", "logits")]
    assert any("v_shift" in label for label in linear)
    exact = runner.edge_effects(linear)
    got = torch.tensor([scores[label] for label in linear], dtype=torch.float64)
    torch.testing.assert_close(got, exact, rtol=1e-9, atol=1e-12)
    assert exact.abs().max() > 0.05
    # the key edges are not linear (the pattern is a softmax of them): far beyond rounding apart
    keys = [e.label for e in runner.graph.edges if e.port in ("k", "k_shift")]
    got_k = torch.tensor([scores[label] for label in keys], dtype=torch.float64)
    assert (got_k - runner.edge_effects(keys)).abs().max() > 1e-4


@pytest.fixture
def random_linear_setup():
    model = build(seed=5, n_layers=1, attn_only=True, normalization_type=None, dtype="float64",
                  shift_k=True, shift_v=True, n_heads=4, n_key_value_heads=2)
    g = torch.Generator().manual_seed(2)
    clean, corrupted = torch.randint(0, 23, (3, 9), generator=g), torch.randint(0, 23, (3, 9), generator=g)
    return model, clean, corrupted, target_logit_metric(torch.randint(0, 23, (3, 9), generator=g))


def test_removing_only_the_shift_path_recomputes_the_shifted_keys(random_linear_setup):
    """Circuit = everything but ``L0KV1 <- embed via k_shift``: KV head 1's K' must be
    ``c_0 K(clean)_t + c_1 K(corrupted)_{t-1}``, written here by hand from the two runs' keys."""
    model, clean, corrupted, metric = random_linear_setup
    runner = CircuitRunner(model, clean, corrupted, metric)
    circuit = Circuit.full(runner.graph).without("L0KV1 <- embed via k_shift")
    got = runner.logits(circuit)
    _, cc = model.run_with_cache(clean, names_filter="blocks.0.attn.hook_k")
    _, xc = model.run_with_cache(corrupted, names_filter="blocks.0.attn.hook_k")
    c = model.blocks[0].attn.coefficients("k").detach()

    def hook(act, hook):
        out = act.clone()
        k_clean, k_corr = cc["blocks.0.attn.hook_k"][:, :, 1], xc["blocks.0.attn.hook_k"][:, :, 1]
        out[:, :, 1] = c[1, 0] * k_clean
        out[:, 1:, 1] += c[1, 1] * k_corr[:, :-1]
        return out

    expected = model.run_with_hooks(clean, fwd_hooks=[("blocks.0.attn.hook_k_shifted", hook)])
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    assert (got - model(clean)).abs().max() > 1e-3


# ------------------------------------------------------------------ faithfulness by construction
@pytest.mark.parametrize("overrides", [
    dict(),
    dict(n_heads=4, n_key_value_heads=2, shift_q=True),
    dict(parallel_attn_mlp=True),
    dict(positional_embedding_type="rotary", shift_window=2, normalization_type="RMS"),
    dict(attn_only=True, shift_k=False, shift_v=False),
])
def test_full_graph_is_the_clean_run_and_empty_graph_the_corrupted_run(overrides):
    kw = dict(shift_k=True, shift_v=True)
    kw.update(overrides)
    model = build(seed=6, **kw)
    g = torch.Generator().manual_seed(3)
    clean, corrupted = torch.randint(0, 23, (2, 10), generator=g), torch.randint(0, 23, (2, 10), generator=g)
    metric = logprob_metric(clean)
    runner = CircuitRunner(model, clean, corrupted, metric)
    torch.testing.assert_close(runner.logits(Circuit.full(runner.graph)), model(clean), rtol=0, atol=1e-5)
    torch.testing.assert_close(runner.logits(Circuit.empty(runner.graph)), model(corrupted), rtol=0, atol=1e-5)
    assert runner.faithfulness(Circuit.full(runner.graph)).fraction == 1.0
    assert abs(runner.faithfulness(Circuit.empty(runner.graph)).fraction) < 1e-5
    # the model's hook flags are as they were
    for flag in ("use_split_qkv_input", "use_attn_result", "use_hook_mlp_in"):
        assert getattr(model.cfg, flag) is False


def test_eap_ig_with_one_step_is_eap_and_scores_agree_with_exact_edge_patching():
    model = build(seed=7, shift_k=True, shift_v=True)
    g = torch.Generator().manual_seed(4)
    clean, corrupted = torch.randint(0, 23, (3, 10), generator=g), torch.randint(0, 23, (3, 10), generator=g)
    metric = logprob_metric(clean)
    eap = edge_attribution(model, clean, corrupted, metric)
    one = edge_attribution(model, clean, corrupted, metric, method="eap-ig", ig_steps=1)
    assert torch.equal(eap.scores, one.scores)
    exact = CircuitRunner(model, clean, corrupted, metric).edge_effects()
    # measured: Spearman 0.87 over the 166 edges of this random model
    assert agreement(eap.scores, exact, top_k=10).spearman > 0.7


# ------------------------------------------------------------------ trained fixtures
def test_trained_models_circuits(kvshift_1l, vanilla_2l, kvshift_induction_heads, vanilla_heads,
                                 induction_task):
    batch = induction_task.sample(16, torch.Generator().manual_seed(7))
    corrupted = corrupt_induction(batch, 8)
    metric = logprob_metric(batch.tokens, batch.mask)
    # kvshift_1l: an induction head reads the previous token through its key shift
    scores = edge_attribution(kvshift_1l, batch.tokens, corrupted, metric, method="eap-ig", ig_steps=5)
    top = [e.label for e, _ in scores.ranked()[:6]]
    assert any(f"L0H{h} <- embed via k_shift" in top for h in kvshift_induction_heads), top
    runner = CircuitRunner(kvshift_1l, batch.tokens, corrupted, metric)
    circuit = scores.circuit(top_k=10)
    assert runner.faithfulness(circuit).fraction > 0.7  # measured 0.89
    shift_edges = [f"L0H{h} <- embed via k_shift" for h in kvshift_induction_heads]
    assert runner.faithfulness(circuit.without(*shift_edges)).fraction < 0.5 * runner.faithfulness(circuit).fraction
    # vanilla_2l: the layer-1 induction head reads the layer-0 previous-token head through K
    prev, ind = vanilla_heads["previous"], vanilla_heads["induction"]
    scores = edge_attribution(vanilla_2l, batch.tokens, corrupted, metric, method="eap-ig", ig_steps=5)
    top = [e.label for e, _ in scores.ranked()[:10]]
    assert f"L1H{ind} <- L0H{prev} via k" in top, top
    runner = CircuitRunner(vanilla_2l, batch.tokens, corrupted, metric)
    assert runner.faithfulness(scores.circuit(top_k=20)).fraction > 0.8  # measured 0.985


# ------------------------------------------------------------------ circuits, data, errors
def test_circuit_extraction_and_plot_data(repeated):
    clean, corrupted, metric = repeated
    model = _soften(shift_head_model(V, 2 * N), 0.1)
    scores = edge_attribution(model, clean, corrupted, metric)
    top = scores.circuit(top_k=2)
    assert len(top) == 2
    magnitudes = sorted(scores.scores.abs().tolist(), reverse=True)
    assert sorted(abs(scores[label]) for label in top.labels) == sorted(magnitudes[:2])
    thr = scores.circuit(threshold=magnitudes[2])
    assert len(thr) == 3 and set(top.labels) < set(thr.labels)
    assert len(scores.circuit(threshold=1e9)) == 0
    data = thr.plot_data()
    assert {n["name"] for n in data["nodes"]} == set(thr.nodes)
    assert {e["label"] for e in data["edges"]} == set(thr.labels)
    assert all(e["score"] == pytest.approx(scores[e["label"]]) for e in data["edges"])
    assert [e["shift"] for e in data["edges"]] == [e["port"].endswith("_shift") for e in data["edges"]]
    frame = scores.to_pandas()
    assert len(frame) == scores.graph.n_edges and frame.is_shift.sum() == 2


def test_bad_input_is_named(repeated):
    clean, corrupted, metric = repeated
    model = shift_head_model(V, 2 * N)
    with pytest.raises(ValueError, match="method='ig'"):
        edge_attribution(model, clean, corrupted, metric, method="ig")
    with pytest.raises(ValueError, match="ig_steps=0"):
        edge_attribution(model, clean, corrupted, metric, method="eap-ig", ig_steps=0)
    with pytest.raises(ValueError, match="same shape"):
        edge_attribution(model, clean, corrupted[:, :5], metric)
    scores = edge_attribution(model, clean, corrupted, metric)
    with pytest.raises(ValueError, match="exactly one"):
        scores.circuit()
    with pytest.raises(ValueError, match="top_k=99"):
        scores.circuit(top_k=99)
    with pytest.raises(KeyError, match="L0H0 <- embed via w"):
        Circuit.from_labels(scores.graph, ["L0H0 <- embed via w"])
    with pytest.raises(ValueError, match="shortformer"):
        ComponentGraph.from_model(build(positional_embedding_type="shortformer"))
    with pytest.raises(ValueError, match="post_rotary"):
        ComponentGraph.from_model(build(positional_embedding_type="rotary", shift_k=True,
                                        shift_position="post_rotary"))
    with pytest.raises(ValueError, match="eval mode"):
        faithfulness(model.train(), clean, corrupted, metric, Circuit.full(scores.graph))
