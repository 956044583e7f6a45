"""Shift-aware circuits, each checked against the model's own hooks, TransformerLens' plain
circuits (their lag-0 case), a direct computation, or a hand-built model whose answer is known.

Random models (``tests.helpers.build``) have every parameter random, shift coefficients included
(``0.5 + 0.5 N(0, 1)`` per lag), and run in float64 so that "exact" means ~1e-12.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from probes.circuits import (
    LaggedComposition,
    decompose_attn_scores,
    full_ov_circuit,
    full_qk_circuit,
    lagged_composition_scores,
    lagged_ov_circuit,
    lagged_qk_circuit,
)
from probes.composition import all_composition_scores, random_composition_baseline
from tests.helpers import build
from tests.probes import MATCH, OUT, _zero_, shift_head_model

EXACT = dict(atol=1e-10, rtol=1e-10)

CONFIGS = {
    "ln_mlp": dict(),
    "rms_attn_only": dict(normalization_type="RMS", attn_only=True),
    "no_norm": dict(normalization_type=None),
    "rotary_pre": dict(positional_embedding_type="rotary"),
    "rotary_post_shift_q": dict(positional_embedding_type="rotary", shift_position="post_rotary",
                                shift_q=True),
    "shortformer": dict(positional_embedding_type="shortformer"),
    "no_positions_square": dict(positional_embedding_type="none", d_vocab=16, d_mlp=16),
    "gqa_swiglu": dict(n_heads=4, n_key_value_heads=2, gated_mlp=True, act_fn="silu",
                       normalization_type="RMS"),
    "window_2_shift_q": dict(shift_window=2, shift_q=True),
    "parallel": dict(parallel_attn_mlp=True),
    "vanilla": dict(shift_k=False, shift_v=False),
}
NON_ROTARY = [c for c in CONFIGS if "rotary" not in c]


def _tokens(model, batch: int = 2, seq: int = 9, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.d_vocab, (batch, seq), generator=g)


def _cache(model, tokens):
    with torch.no_grad():
        return model.run_with_cache(tokens)[1]


def _qk_input(model, cache, layer):
    """What a layer's queries and keys read: ln1's output (+ shortformer positions)."""
    x = (cache[f"blocks.{layer}.hook_resid_pre"] if model.cfg.normalization_type is None
         else cache[f"blocks.{layer}.ln1.hook_normalized"])
    if model.cfg.positional_embedding_type == "shortformer":
        x = x + cache["hook_pos_embed"]
    return x


def _unmasked(t: torch.Tensor) -> torch.Tensor:
    n = t.shape[-1]
    return t[..., torch.ones(n, n, dtype=torch.bool).tril()]


# ------------------------------------------------------------------ score decomposition


@pytest.mark.parametrize("config", list(CONFIGS))
def test_decomposition_sums_to_hook_attn_scores(config):
    model = build(dtype="float64", **CONFIGS[config])
    tokens = _tokens(model)
    cache = _cache(model, tokens)
    for layer in range(model.cfg.n_layers):
        real = cache[f"blocks.{layer}.attn.hook_attn_scores"]
        for head in range(model.cfg.n_heads):
            d = decompose_attn_scores(model, tokens, layer, head)
            n_lags = model.cfg.n_lags if model.cfg.shift_k else 1
            assert d.terms.shape == (len(d.labels), len(d.labels), n_lags, 2, 9, 9)
            assert_close(_unmasked(d.terms.sum((0, 1, 2))), _unmasked(real[:, head]), **EXACT)
            assert_close(d.total(), real[:, head], **EXACT)  # -inf above the diagonal too
            assert (d.terms[..., ~d.mask] == 0).all()
            heads = [f"L{l}H{h}" for l in range(layer) for h in range(model.cfg.n_heads)]
            assert [x for x in d.labels if x.startswith("L")] == heads


def test_decomposition_in_float32():
    model = build(shift_init="uniform")
    tokens = _tokens(model)
    real = _cache(model, tokens)["blocks.1.attn.hook_attn_scores"][:, 2]
    d = decompose_attn_scores(model, tokens, 1, 2)
    assert_close(d.total(), real, atol=1e-4, rtol=1e-4)


def test_decomposition_terms_are_the_formula():
    """Single terms against a direct computation from the weights and the residual stream (the
    norm's scale recomputed from resid_pre, not read from a hook)."""
    model = build(dtype="float64")
    tokens = _tokens(model)
    cache = _cache(model, tokens)
    layer, head = 1, 3
    d = decompose_attn_scores(model, tokens, layer, head)
    attn, ln1 = model.blocks[layer].attn, model.blocks[layer].ln1
    x = cache[f"blocks.{layer}.hook_resid_pre"]
    xc = x - x.mean(-1, keepdim=True)
    s = (xc.pow(2).mean(-1, keepdim=True) + model.cfg.eps).sqrt()  # [batch, pos, 1]
    a = model.shift_coefficients()["k"][layer, head]

    def side(component, W):  # the component's normalised contribution, projected
        c = component - component.mean(-1, keepdim=True)
        return (c / s * ln1.w) @ W

    heads = torch.einsum("bphd,hdm->hbpm", cache["blocks.0.attn.hook_z"], model.blocks[0].attn.W_O)
    q = side(cache["hook_embed"], attn.W_Q[head])  # query side: the token embedding
    k = side(heads[2], attn.W_K[head])  # key side: head L0H2's output
    for lag in range(2):
        k_lag = torch.zeros_like(k)
        k_lag[:, lag:] = k[:, : 9 - lag]
        expected = a[lag] * q @ k_lag.transpose(-1, -2) / math.sqrt(model.cfg.d_head)
        got = d.terms[d.index("embed"), d.index("L0H2"), lag]
        assert_close(_unmasked(got), _unmasked(expected), **EXACT)
    bias_q = attn.b_Q[head] + ln1.b @ attn.W_Q[head]
    bias_k = attn.b_K[head] + ln1.b @ attn.W_K[head]
    bias_term = (a[0] * (bias_q @ bias_k) / math.sqrt(model.cfg.d_head)).detach()
    qk_bias = d.index("qk_bias")
    assert_close(_unmasked(d.terms[qk_bias, qk_bias, 0]),
                 torch.full((2, 45), float(bias_term), dtype=torch.float64), **EXACT)
    # magnitude: RMS over unmasked entries
    assert_close(d.magnitude()[qk_bias, qk_bias, 0], bias_term.abs(), **EXACT)


def test_decomposition_against_raw_keys_misses_the_shifted_scores():
    """The plain (ARENA-style) decomposition projects components through W_K and sums to
    ``Q . K`` (its own check against hook_q / hook_k passes) - but a shifted head scores
    ``Q . K'``. With uniform key coefficients (0.5, 0.5) it misses the real scores by most of
    their size; the shift-aware decomposition matches them."""
    model = build(dtype="float64")
    with torch.no_grad():
        for block in model.blocks:
            block.attn.shift_k.fill_(0.5)
    tokens = _tokens(model, batch=4, seq=12)
    cache = _cache(model, tokens)
    layer, head = 1, 0
    real = _unmasked(cache[f"blocks.{layer}.attn.hook_attn_scores"][:, head])
    q, k = cache[f"blocks.{layer}.attn.hook_q"][:, :, head], cache[f"blocks.{layer}.attn.hook_k"][:, :, head]
    plain = _unmasked(q @ k.transpose(-1, -2) / math.sqrt(model.cfg.d_head))
    plain_error = ((plain - real).norm() / real.norm()).item()
    ours = _unmasked(decompose_attn_scores(model, tokens, layer, head).terms.sum((0, 1, 2)))
    ours_error = ((ours - real).norm() / real.norm()).item()
    assert plain_error > 0.5, plain_error
    assert ours_error < 1e-12, ours_error


# ------------------------------------------------------------------ per-lag circuits


@pytest.mark.parametrize("config", NON_ROTARY)
def test_lagged_qk_circuit_rebuilds_hook_attn_scores(config):
    model = build(dtype="float64", **CONFIGS[config])
    tokens = _tokens(model)
    cache = _cache(model, tokens)
    for layer in range(model.cfg.n_layers):
        for head in range(model.cfg.n_heads):
            if model.cfg.shift_q:
                with pytest.raises(ValueError, match="shift_q"):
                    lagged_qk_circuit(model, layer, head)
                continue
            circuit = lagged_qk_circuit(model, layer, head)
            assert circuit.QK.shape == (circuit.coefficients.shape[0], 16, 16)
            got = circuit.scores(_qk_input(model, cache, layer))
            assert_close(got, cache[f"blocks.{layer}.attn.hook_attn_scores"][:, head], **EXACT)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_lagged_ov_circuit_rebuilds_the_head_output(config):
    model = build(dtype="float64", **CONFIGS[config])
    tokens = _tokens(model)
    cache = _cache(model, tokens)
    for layer in range(model.cfg.n_layers):
        x = (cache[f"blocks.{layer}.hook_resid_pre"] if model.cfg.normalization_type is None
             else cache[f"blocks.{layer}.ln1.hook_normalized"])
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        z = cache[f"blocks.{layer}.attn.hook_z"]
        for head in range(model.cfg.n_heads):
            circuit = lagged_ov_circuit(model, layer, head)
            expected = z[:, :, head] @ model.blocks[layer].attn.W_O[head]
            assert_close(circuit.result(pattern[:, head], x), expected, **EXACT)


def test_plain_circuits_are_lag_zero_of_an_unshifted_head():
    """On a vanilla model the per-lag circuits have one lag, equal to TransformerLens' QK / OV."""
    model = build(dtype="float64", shift_k=False, shift_v=False)
    for layer in range(2):
        for head in range(4):
            qk, ov = lagged_qk_circuit(model, layer, head), lagged_ov_circuit(model, layer, head)
            assert qk.QK.shape[0] == ov.OV.shape[0] == 1
            assert_close(qk.QK.AB[0], model.QK[layer, head].AB, **EXACT)
            assert_close(ov.OV.AB[0], model.OV[layer, head].AB, **EXACT)
    shifted = build(dtype="float64")
    a = shifted.shift_coefficients()["k"][1, 2]
    assert_close(lagged_qk_circuit(shifted, 1, 2).QK.AB, a[:, None, None] * shifted.QK[1, 2].AB,
                 **EXACT)


def test_rotary_qk_circuit_warns_and_errors_name_the_bad_value():
    with pytest.warns(UserWarning, match="rotary"):
        lagged_qk_circuit(build(positional_embedding_type="rotary"), 0, 0)
    model = build()
    with pytest.raises(ValueError, match="layer=2"):
        lagged_qk_circuit(model, 2, 0)
    with pytest.raises(ValueError, match="head=4"):
        lagged_ov_circuit(model, 0, 4)
    with pytest.raises(ValueError, match="head=-1"):
        decompose_attn_scores(model, _tokens(model), 0, -1)
    with pytest.raises(ValueError, match="TransformerLens-style"):
        decompose_attn_scores(nn.Linear(2, 2), torch.zeros(1, 3, dtype=torch.long), 0, 0)
    with pytest.raises(ValueError, match="pos >= 2"):
        decompose_attn_scores(model, torch.zeros(1, 1, dtype=torch.long), 0, 0)


@pytest.mark.parametrize(("hook", "match"), [("blocks.1.hook_resid_pre", "hook_resid_pre"),
                                             ("blocks.1.attn.hook_attn_scores", "miss")])
def test_decomposition_refuses_what_it_cannot_explain(hook, match):
    """Something the components do not account for (here a hook adding a constant) raises
    instead of returning terms that do not sum to the scores."""
    model = build(dtype="float64")
    model.hook_dict[hook].add_hook(lambda t, hook: t + 1.0, is_permanent=True)
    try:
        with pytest.raises(ValueError, match=match):
            decompose_attn_scores(model, _tokens(model), 1, 0)
    finally:
        model.reset_hooks(including_permanent=True)
    decompose_attn_scores(model, _tokens(model), 1, 0)


def _no_bias_one_layer(**overrides):
    model = build(dtype="float64", n_layers=1, attn_only=True, normalization_type=None,
                  positional_embedding_type="none", **overrides)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1].lstrip("_").startswith("b_"):
                p.zero_()
    return model


@pytest.mark.parametrize("window", [1, 2])
def test_full_circuits_predict_scores_and_direct_logits(window):
    """A one-layer model without norms, positions or biases is its full circuits:
    ``score(i, j) = scale * sum_l FQK[l, tok_i, tok_{j-l}]`` and the head's direct logits are
    ``sum_j A[i, j] sum_l FOV[l, tok_{j-l}]``."""
    model = _no_bias_one_layer(shift_window=window, d_vocab=16)  # square: d_vocab == d_model
    tokens = _tokens(model, seq=10)
    cache = _cache(model, tokens)
    scale = 1 / math.sqrt(model.cfg.d_head)
    n = tokens.shape[1]
    for head in range(model.cfg.n_heads):
        fqk = full_qk_circuit(model, 0, head).AB  # [lag, d_vocab, d_vocab]
        fov = full_ov_circuit(model, 0, head).AB
        assert fqk.shape == fov.shape == (window + 1, 16, 16)
        scores = torch.zeros(2, n, n, dtype=torch.float64)
        mixed = torch.zeros(2, n, 16, dtype=torch.float64)  # [batch, key_pos, d_vocab]
        for lag in range(window + 1):
            src = tokens[:, : n - lag]  # the token at j - lag, for j >= lag
            scores[:, :, lag:] += scale * fqk[lag][tokens[:, :, None], src[:, None, :]]
            mixed[:, lag:] += fov[lag][src]
        real = cache["blocks.0.attn.hook_attn_scores"][:, head]
        assert_close(_unmasked(scores), _unmasked(real), **EXACT)
        pattern = cache["blocks.0.attn.hook_pattern"][:, head]
        direct = cache["blocks.0.attn.hook_z"][:, :, head] @ model.blocks[0].attn.W_O[head] @ model.W_U
        assert_close(pattern @ mixed, direct, **EXACT)


@pytest.mark.parametrize(("key", "value", "qk_lag", "ov_lag"), [
    ((0.0, 1.0), (1.0, 0.0), 1, 0),            # the paper's one-layer induction head
    ((0.0, 0.0, 1.0), (0.0, 1.0, 0.0), 2, 1),  # window 2, one position later
])
def test_full_circuits_of_a_hand_built_shift_head_show_where_it_reads(key, value, qk_lag, ov_lag):
    """The hand-built shift head matches its query token against the token ``qk_lag`` before the
    key and copies the token ``ov_lag`` before the attended position. Its plain full QK circuit
    (``W_E W_Q W_K^T W_E^T``, lag 0 without the coefficient) is a diagonal that reads as a
    duplicate-token head; the model's attention says otherwise, and the per-lag circuits say why."""
    V = 12
    model = shift_head_model(V, 4 * V, key, value, dtype="float64")
    fqk, fov = full_qk_circuit(model, 0, 0).AB, full_ov_circuit(model, 0, 0).AB
    eye = torch.eye(V, dtype=torch.float64)
    match = MATCH * math.sqrt(V)
    built = dict(atol=1e-10, rtol=1e-6)  # the builder writes its weights through float32
    for lag in range(len(key)):
        assert_close(fqk[lag], eye * match * (lag == qk_lag), **built)
        assert_close(fov[lag], eye * OUT * (lag == ov_lag), **EXACT)
    plain = model.W_E @ model.QK[0, 0].AB @ model.W_E.T
    assert_close(plain, eye * match, **built)  # "attends to its own token"

    g = torch.Generator().manual_seed(0)
    half = torch.stack([torch.randperm(V, generator=g) for _ in range(4)])
    tokens = torch.cat([half, half], dim=1)  # every token once, then repeated
    pattern = _cache(model, tokens)["blocks.0.attn.hook_pattern"][:, 0, V + 1:]  # second half
    i = torch.arange(V + 1, 2 * V)
    duplicate = pattern[:, torch.arange(V - 1), i - V].mean()  # the earlier copy of tok_i
    read = pattern[:, torch.arange(V - 1), i - V + qk_lag].mean()  # qk_lag after it
    assert read > 0.99 and duplicate < 0.01


# ------------------------------------------------------------------ composition


def test_lagged_composition_sums_to_the_plain_scores_and_matches_its_definition():
    model = build(n_layers=3, dtype="float64", shift_window=2, n_key_value_heads=2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in model.blocks:
            for name in ("_shift_k", "shift_k", "shift_v"):
                p = block.attn._parameters.get(name)
                if p is not None:
                    p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    coeffs = model.shift_coefficients()
    for mode in ("Q", "K", "V"):
        lagged = lagged_composition_scores(model, mode)
        assert isinstance(lagged, LaggedComposition) and lagged.mode == mode
        with pytest.warns(UserWarning, match="shift"):
            plain = all_composition_scores(model, mode)
        assert_close(lagged.plain, plain.float(), atol=1e-6, rtol=1e-5)
        assert_close(lagged.by_offset().sum(-1), lagged.plain, atol=1e-6, rtol=1e-5)
        # The definition, with dense per-lag matrices: ||OV_s M_l|| / (sum ||OV_s|| sum ||M_l||).
        l1, h1, l2, h2 = 0, 1, 2, 3
        a0, a2 = model.blocks[l1].attn, model.blocks[l2].attn
        b = coeffs["v"][l1, h1 // 2]
        ov = [b[s] * a0.W_V[h1] @ a0.W_O[h1] for s in range(3)]
        c = coeffs["v" if mode == "V" else "k"][l2, h2 // 2] if mode != "Q" else torch.ones(1)
        base = {"Q": a2.W_Q[h2] @ a2.W_K[h2].T, "K": (a2.W_Q[h2] @ a2.W_K[h2].T).T,
                "V": a2.W_V[h2] @ a2.W_O[h2]}[mode]
        m = [c[lag] * base for lag in range(c.shape[0])]
        denominator = sum(x.norm() for x in ov) * sum(x.norm() for x in m)
        expected = torch.tensor([[((ov[s] @ m[lag]).norm() / denominator).item() for lag in range(len(m))]
                                 for s in range(3)])
        assert_close(lagged.scores[l1, h1, l2, h2], expected.float(), atol=1e-6, rtol=1e-5)


def copy_then_shifted_key_model(d_vocab: int, n_ctx: int) -> torch.nn.Module:
    """Two layers, one head each, no norms. Residual stream ``[token | position | copy]``.

    Layer 0 (unshifted) attends to its own position and copies the token into the ``copy``
    subspace. Layer 1 queries with the current token, its keys read ``copy`` (so ``Q_i . K_j =
    MATCH * [tok_i == tok_j]`` before the shift), and its key coefficients are ``(0, 1)``: the key
    at j is the one of j - 1, so the head attends to j when ``tok_{j-1} == tok_i`` - induction,
    by K-composition with layer 0 through the key's previous-position term. Its OV copies tokens.
    """
    from kvshift_lens import HookedKVShiftTransformer, KVShiftConfig

    V, P = d_vocab, n_ctx
    d_model = 2 * V + P
    tok, pos, copy = slice(0, V), slice(V, V + P), slice(V + P, d_model)
    cfg = KVShiftConfig(d_model=d_model, d_head=d_model, n_heads=1, n_layers=2, n_ctx=P,
                        d_vocab=V, attn_only=True, normalization_type=None, device="cpu",
                        dtype="float64")
    model = HookedKVShiftTransformer(cfg)
    _zero_(model)
    scale = MATCH * math.sqrt(d_model)
    with torch.no_grad():
        model.embed.W_E[:, tok].copy_(torch.eye(V))
        model.pos_embed.W_pos[:, pos].copy_(torch.eye(P))
        model.unembed.W_U[tok, :].copy_(torch.eye(V))
        a0, a1 = model.blocks[0].attn, model.blocks[1].attn
        a0.W_Q[0, pos, pos].copy_(torch.eye(P) * scale)
        a0.W_K[0, pos, pos].copy_(torch.eye(P))
        a0.W_V[0, tok, tok].copy_(torch.eye(V))
        a0.W_O[0, tok, copy].copy_(torch.eye(V))
        a1.W_Q[0, tok, tok].copy_(torch.eye(V) * scale)
        a1.W_K[0, copy, tok].copy_(torch.eye(V))
        a1.W_V[0, tok, tok].copy_(torch.eye(V))
        a1.W_O[0, tok, tok].copy_(torch.eye(V) * OUT)
        a0.shift_k.copy_(torch.tensor([[1.0, 0.0]]))
        a0.shift_v.copy_(torch.tensor([[1.0, 0.0]]))
        a1.shift_k.copy_(torch.tensor([[0.0, 1.0]]))
        a1.shift_v.copy_(torch.tensor([[1.0, 0.0]]))
    return model.eval()


def test_k_composition_through_the_key_shift_catches_what_the_plain_score_misses():
    """Plain K-composition of L0H0 -> L1H0 is high and lag-blind: read as "L1's keys match on what
    L0 wrote *at the key's position*" (L0 copies the current token), it predicts a head attending
    to its own token (the earlier copy, and itself). The shift-aware score puts all of it on key lag 1 ("what L0 wrote one position before
    the key"): an induction head, which is what the model does."""
    V, P = 12, 30
    model = copy_then_shifted_key_model(V, P)
    with pytest.warns(UserWarning, match="shift"):
        plain = all_composition_scores(model, "K")[0, 0, 1, 0].item()
    mean, std = random_composition_baseline(model.cfg.d_model, model.cfg.d_head, "K")
    assert (plain - mean) / std > 5
    lagged = lagged_composition_scores(model, "K")
    assert lagged.by_lag()[0, 0, 1, 0].tolist() == pytest.approx([0.0, plain], abs=1e-6)
    assert lagged.by_offset()[0, 0, 1, 0].argmax().item() == 1

    g = torch.Generator().manual_seed(0)
    half = torch.stack([torch.randperm(V, generator=g) for _ in range(4)])
    tokens = torch.cat([half, half], dim=1)
    cache = _cache(model, tokens)
    i = torch.arange(V + 1, 2 * V)
    rows = torch.arange(V - 1)

    def shares(pattern):
        """Mass on the induction target, and on the positions holding the query's own token (its
        earlier copy and itself)."""
        p = pattern[:, V + 1:]
        same_token = p[:, rows, i - V] + p[:, rows, i]
        return p[:, rows, i - V + 1].mean().item(), same_token.mean().item()

    induction, same_token = shares(cache["blocks.1.attn.hook_pattern"][:, 0])
    assert induction > 0.99 and same_token < 0.01
    # What the lag-blind reading predicts: the plain QK circuit on the same residual stream.
    x = cache["blocks.1.hook_resid_pre"]
    n = tokens.shape[1]
    plain_scores = (x @ model.QK[1, 0].AB @ x.transpose(-1, -2)) / math.sqrt(model.cfg.d_head)
    plain_scores = plain_scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -torch.inf)
    plain_induction, plain_same_token = shares(plain_scores.softmax(-1))
    assert plain_same_token > 0.99 and plain_induction < 0.01
    # The per-lag circuit gives the model's scores exactly; the decomposition names the path.
    circuit = lagged_qk_circuit(model, 1, 0)
    assert_close(circuit.scores(x), cache["blocks.1.attn.hook_attn_scores"][:, 0], **EXACT)
    d = decompose_attn_scores(model, tokens, 1, 0)
    path = d.terms[d.index("embed"), d.index("L0H0"), 1]  # query token x L0's copy, key lag 1
    target = path[:, V + 1:][:, rows, i - V + 1]
    assert_close(target, torch.full_like(target, MATCH), atol=1e-3, rtol=0)
    magnitude = d.magnitude()  # [q_component, k_component, lag]
    assert magnitude[d.index("embed"), d.index("L0H0"), 1] == magnitude.max()


def test_lagged_composition_errors():
    with pytest.raises(ValueError, match="mode"):
        lagged_composition_scores(build(), "X")
    with pytest.raises(ValueError, match="at least 2 layers"):
        lagged_composition_scores(build(n_layers=1))
