"""HookedTransformer habits on ``HookedKVShiftTransformer``, checked against independent references.

Each numeric check compares against something computed another way: the unmodified model's
logits, ``tests.reference.reference_logits`` (a separate re-implementation reading a state dict), a
cached activation, or a sampling loop written here. Models are tiny, in float64, with random
weights, biases, norm weights and shift coefficients (``tests.helpers.randomize``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close
from transformer_lens.utilities import get_act_name as tl_get_act_name

from kvshift_lens import HookedKVShiftTransformer, KVShiftConfig, byte_level_tokenizer
from kvshift_lens.hooked_transformer import get_act_name
from tests.helpers import build, randomize, tiny_config
from tests.reference import reference_logits

TIGHT = dict(atol=1e-9, rtol=1e-9)


def toks(model, batch=2, seq=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.d_vocab, (batch, seq), generator=g)


def logprobs(model, tokens):
    return model(tokens).log_softmax(-1)


# ================================================================== refactor / process_weights

REFACTOR_CASES = [
    dict(),
    dict(shift_q=True, shift_window=2),
    dict(positional_embedding_type="shortformer", normalization_type="RMS"),
    dict(shift_param="convex", attn_only=True, normalization_type=None),
    dict(gated_mlp=True, act_fn="silu", positional_embedding_type="none"),
]


@pytest.mark.parametrize("overrides", REFACTOR_CASES)
def test_refactor_keeps_logits_qk_and_ov(overrides):
    model = build(dtype="float64", n_ctx=16, **overrides)
    tokens = toks(model, seq=12)
    before = model(tokens)
    QK, OV = model.QK.AB.clone(), model.OV.AB.clone()
    bias_out = torch.einsum("lhd,lhdm->lhm", model.b_V, model.W_O).clone()  # b_V W_O per head
    state = model.refactor_factored_attn_matrices()
    # The refactored weights, run by the independent implementation, give the same logits.
    assert_close(reference_logits(model.cfg, state, tokens), before, **TIGHT)
    model.load_state_dict(state)
    assert_close(model(tokens), before, **TIGHT)
    assert_close(model.QK.AB, QK, **TIGHT)
    assert_close(model.OV.AB, OV, **TIGHT)
    assert_close(torch.einsum("lhd,lhdm->lhm", model.b_V, model.W_O), bias_out, **TIGHT)
    # The new bases are the even SVD factorisation: W_O' has orthogonal rows of norm sqrt(S).
    gram = model.W_O @ model.W_O.transpose(-1, -2)  # [layer, head, d_head, d_head]
    assert_close(gram, torch.diag_embed(torch.diagonal(gram, dim1=-2, dim2=-1)), atol=1e-9,
                 rtol=0)


def test_folding_value_biases_would_be_wrong_under_the_shift():
    """Why b_V stays: TransformerLens' fold (b_O += b_V W_O, b_V = 0) changes a shifted model's
    logits, but is exact when the values are not shifted."""
    for shift_v, exact in ((True, False), (False, True)):
        model = build(dtype="float64", shift_v=shift_v)
        tokens = toks(model)
        before = model(tokens)
        with torch.no_grad():
            for block in model.blocks:
                a = block.attn
                a.b_O += torch.einsum("hd,hdm->m", a.b_V, a.W_O)
                a.b_V.zero_()
        diff = (model(tokens) - before).abs().max().item()
        assert (diff < 1e-9) == exact, diff
    with pytest.raises(ValueError, match="fold_value_biases=True is not exact"):
        build().process_weights_(fold_value_biases=True)


@pytest.mark.parametrize("overrides, match", [
    (dict(positional_embedding_type="rotary"), "rotary"),
    (dict(n_key_value_heads=2), "grouped-query"),
])
def test_refactor_refuses_rotary_and_gqa_before_changing_anything(overrides, match):
    model = build(dtype="float64", **overrides)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        model.refactor_factored_attn_matrices()
    with pytest.raises(ValueError, match=match):
        model.process_weights_(refactor_factored_attn_matrices=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("norm", ["LN", "RMS"])
@pytest.mark.parametrize("fold_ln", [True, False])
def test_process_weights_keeps_log_probs(norm, fold_ln):
    model = build(dtype="float64", normalization_type=norm, shift_q=True)
    tokens = toks(model)
    before = logprobs(model, tokens)
    model.process_weights_(fold_ln=fold_ln, refactor_factored_attn_matrices=True)
    assert_close(logprobs(model, tokens), before, **TIGHT)
    W_U = model.W_U
    assert_close(W_U.mean(-1), torch.zeros_like(W_U[:, 0]), atol=1e-12, rtol=0)
    if norm == "LN":  # writing weights centred over d_model
        assert_close(model.W_O.mean(-1), torch.zeros_like(model.W_O[..., 0]), atol=1e-12, rtol=0)
    if fold_ln:
        assert torch.equal(model.blocks[0].ln1.w, torch.ones_like(model.blocks[0].ln1.w))
    else:
        assert not torch.equal(model.blocks[0].ln1.w, torch.ones_like(model.blocks[0].ln1.w))


# ================================================================== forward(start_at_layer=...)


@pytest.mark.parametrize("overrides", [dict(), dict(positional_embedding_type="shortformer"),
                                       dict(positional_embedding_type="rotary", shift_q=True)])
def test_start_and_stop_at_layer_slice_the_blocks(overrides):
    model = build(dtype="float64", n_layers=3, **overrides)
    tokens = toks(model)
    logits, cache = model.run_with_cache(tokens)
    extra = {}
    if model.cfg.positional_embedding_type == "shortformer":
        extra["shortformer_pos_embed"] = cache["pos_embed"]
    for start in range(3):
        resid = cache["resid_pre", start]
        assert_close(model(resid, start_at_layer=start, **extra), logits, **TIGHT)
        assert_close(model(resid, start_at_layer=start - 3, **extra), logits, **TIGHT)
        for stop in range(start, 3):
            out = model(resid, start_at_layer=start, stop_at_layer=stop, **extra)
            assert_close(out, cache["resid_pre", stop], **TIGHT)
    # A patched residual stream gives what a hook patching it in a full run gives.
    patched = cache["resid_pre", 1] * 1.5
    hooked = model.run_with_hooks(tokens, fwd_hooks=[
        ("blocks.1.hook_resid_pre", lambda x, hook: patched)])
    assert_close(model(patched, start_at_layer=1, **extra), hooked, **TIGHT)
    loss = model(cache["resid_pre", 2], start_at_layer=2, tokens=tokens, return_type="loss",
                 **extra)
    assert_close(loss, model(tokens, return_type="loss"), **TIGHT)


def test_start_at_layer_errors():
    model = build()
    tokens = toks(model)
    _, cache = model.run_with_cache(tokens)
    resid = cache["resid_pre", 1]
    with pytest.raises(ValueError, match="start_at_layer=5"):
        model(resid, start_at_layer=5)
    with pytest.raises(ValueError, match="residual stream"):
        model(tokens, start_at_layer=1)
    with pytest.raises(ValueError, match="tokens="):
        model(resid, start_at_layer=1, return_type="loss")
    with pytest.raises(ValueError, match="past_kv_cache"):
        model(resid, start_at_layer=1, past_kv_cache=model.new_cache())
    with pytest.raises(ValueError, match="shortformer_pos_embed is for shortformer"):
        model(resid, start_at_layer=1, shortformer_pos_embed=resid)
    with pytest.raises(ValueError, match="go with start_at_layer"):
        model(tokens, tokens=tokens)
    short = build(positional_embedding_type="shortformer")
    with pytest.raises(ValueError, match="shortformer_pos_embed=cache"):
        short(resid, start_at_layer=1)


# ================================================================== loss_fn, config


def test_loss_fn_matches_cross_entropy():
    model = build(dtype="float64")
    tokens = toks(model)
    logits = model(tokens)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                               tokens[:, 1:].reshape(-1), reduction="none").view(2, -1)
    assert_close(model.loss_fn(logits, tokens, per_token=True), expected, **TIGHT)
    assert_close(model.loss_fn(logits, tokens), expected.mean(), **TIGHT)
    assert_close(model(tokens, return_type="loss"), expected.mean(), **TIGHT)
    with pytest.raises(ValueError, match="same batch and pos"):
        model.loss_fn(logits, tokens[:, :-1])


def test_config_seed_and_attention_dir():
    def weights(**kw):
        return HookedKVShiftTransformer(tiny_config(shift_init="normal", **kw)).state_dict()

    a, b, c = weights(seed=3), weights(seed=3), weights(seed=4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.attn.W_Q"], c["blocks.0.attn.W_Q"])
    assert not torch.equal(a["blocks.0.attn.shift_k"], c["blocks.0.attn.shift_k"])
    # An explicit generator wins over cfg.seed.
    g = HookedKVShiftTransformer(tiny_config(seed=3), generator=torch.Generator().manual_seed(9))
    assert not torch.equal(g.state_dict()["embed.W_E"], a["embed.W_E"])
    assert tiny_config(attention_dir="causal").attention_dir == "causal"
    with pytest.raises(ValueError, match="attention_dir='bidirectional'"):
        tiny_config(attention_dir="bidirectional")


# ================================================================== generate


def reference_sample(model, prompt, n, temperature, seed, freq_penalty=0.0):
    """Sampling written out: full forward, scale, penalise, softmax, one draw per row."""
    g = torch.Generator().manual_seed(seed)
    out = prompt.clone()
    for _ in range(n):
        logits = model(out)[:, -1].float() / temperature
        counts = torch.stack([torch.bincount(row, minlength=model.cfg.d_vocab) for row in out])
        probs = (logits - freq_penalty * counts).softmax(-1)
        out = torch.cat([out, torch.multinomial(probs, 1, generator=g)], dim=1)
    return out


def test_generate_samples_by_default_and_honours_temperature():
    model = build(n_ctx=20, d_vocab=23)
    prompt = toks(model, batch=3, seq=4)
    default = model.generate(prompt, max_new_tokens=8, verbose=False,
                             generator=torch.Generator().manual_seed(5))
    assert torch.equal(default, reference_sample(model, prompt, 8, 1.0, seed=5))
    cool = model.generate(prompt, max_new_tokens=8, temperature=0.7, verbose=False,
                          generator=torch.Generator().manual_seed(5))
    assert torch.equal(cool, reference_sample(model, prompt, 8, 0.7, seed=5))
    assert not torch.equal(cool, default)  # the temperature changed the draws
    pen = model.generate(prompt, max_new_tokens=8, freq_penalty=2.0, use_past_kv_cache=False,
                         verbose=False, generator=torch.Generator().manual_seed(5))
    assert torch.equal(pen, reference_sample(model, prompt, 8, 1.0, seed=5, freq_penalty=2.0))
    # Temperature 0 is greedy: each new token is the argmax of a full forward pass.
    greedy = model.generate(prompt, max_new_tokens=8, temperature=0, verbose=False)
    assert torch.equal(greedy, model.generate(prompt, max_new_tokens=8, do_sample=False,
                                              verbose=False))
    assert torch.equal(greedy[:, 4:], model(greedy)[:, 3:-1].argmax(-1))


def test_generate_refuses_options_it_would_ignore():
    model = build(n_ctx=20)
    prompt = toks(model, batch=1, seq=3)
    for kw, match in [(dict(do_sample=False, temperature=0.7), "temperature"),
                      (dict(do_sample=False, top_k=5), "top_k"),
                      (dict(do_sample=False, freq_penalty=1.0), "freq_penalty"),
                      (dict(temperature=-1.0), "temperature=-1"),
                      (dict(return_type="logits"), "return_type='logits'"),
                      (dict(stop_at_eos=False, eos_token_id=3), "stop_at_eos=False"),
                      (dict(eos_token_id=99), "eos_token_id=99"),
                      (dict(prepend_bos=True), "text input only"),
                      (dict(return_type="str"), "needs a tokenizer")]:
        with pytest.raises(ValueError, match=match):
            model.generate(prompt, max_new_tokens=2, verbose=False, **kw)


def test_generate_text_return_types_and_eos():
    model = HookedKVShiftTransformer(tiny_config(d_vocab=257, n_ctx=32),
                                     tokenizer=byte_level_tokenizer())
    randomize(model)
    model.eval()
    kw = dict(max_new_tokens=4, do_sample=False, verbose=False)
    text = model.generate("ab", **kw)
    ids = model.generate("ab", return_type="tokens", **kw)
    assert isinstance(text, str) and text == model.to_string(ids[0, 1:])  # no BOS in the text
    assert ids[0, 0] == model.tokenizer.bos_token_id
    assert model.generate(ids[:, :3], return_type="str", **kw) == model.to_string(
        model.generate(ids[:, :3], **kw)[0])
    both = model.generate(["ab", "cd"], **kw)
    assert isinstance(both, list) and len(both) == 2 and both[0] == text
    with pytest.raises(ValueError, match="different lengths"):
        model.generate(["ab", "abc"], **kw)
    # stop_at_eos uses the tokenizer's EOS: make EOS the greedy choice after the prompt.
    eos = model.tokenizer.eos_token_id
    assert eos is not None
    with torch.no_grad():
        model.unembed.b_U[eos] = 1e4
    out = model.generate("ab", return_type="tokens", max_new_tokens=6, do_sample=False,
                         verbose=False)
    assert out.shape[1] == 3 + 1 and out[0, -1] == eos
    longer = model.generate("ab", return_type="tokens", max_new_tokens=6, do_sample=False,
                            stop_at_eos=False, verbose=False)
    assert longer.shape[1] == 3 + 6


# ================================================================== names and stacked weights


def test_short_names_reach_the_shift_hooks():
    model = build(shift_q=True)
    _, cache = model.run_with_cache(toks(model))
    for short in ("k_shifted", "v_shifted", "q_shifted", "shift_k", "shift_v", "shift_q"):
        full = f"blocks.1.attn.hook_{short}"
        assert get_act_name(short, 1) == full
        assert get_act_name(short, 1, "attn") == full == get_act_name(f"{short}1")
        assert torch.equal(cache[short, 1], cache[full])
        assert torch.equal(cache[short, -1], cache[full])
        assert torch.equal(cache[f"{short}1"], cache[full])
    for args in [("k", 0), ("pattern", 1), ("resid_pre", 0), ("scale", 1, "ln2"), ("embed",),
                 ("blocks.0.attn.hook_k_shifted",)]:
        assert get_act_name(*args) == tl_get_act_name(*args)
    assert torch.equal(cache["pattern", 1], cache["blocks.1.attn.hook_pattern"])


def test_stacked_weights_are_the_blocks_weights():
    model = build(n_key_value_heads=2, gated_mlp=True, act_fn="silu")
    L, H = model.cfg.n_layers, model.cfg.n_heads
    group = H // 2
    for layer, block in enumerate(model.blocks):
        a, m = block.attn, block.mlp
        for h in range(H):
            assert torch.equal(model.b_K[layer, h], a._b_K[h // group])
            assert torch.equal(model.b_V[layer, h], a._b_V[h // group])
            assert torch.equal(model.b_Q[layer, h], a.b_Q[h])
        assert torch.equal(model.b_O[layer], a.b_O)
        for name in ("W_in", "W_gate", "W_out", "b_in", "b_out"):
            assert torch.equal(getattr(model, name)[layer], getattr(m, name))
    assert model.W_in.shape == (L, model.cfg.d_model, model.cfg.d_mlp)
    assert torch.equal(model.W_E_pos, torch.cat([model.W_E, model.W_pos]))
    assert model.all_head_labels() == [f"L{l}H{h}" for l in range(L) for h in range(H)]
    with pytest.raises(AttributeError):
        build(attn_only=True).W_in  # noqa: B018


# ================================================================== HookedTransformer state dicts


def hooked_transformer_format(model) -> dict:
    """What a HookedTransformer of the same shape saves: no shift coefficients, a causal mask
    and an IGNORE buffer in every attention layer."""
    state = {k: v.clone() for k, v in model.state_dict().items() if ".shift_" not in k}
    n = model.cfg.n_ctx
    for layer in range(model.cfg.n_layers):
        state[f"blocks.{layer}.attn.mask"] = torch.ones(n, n, dtype=torch.bool).tril()
        state[f"blocks.{layer}.attn.IGNORE"] = torch.tensor(-1e5)
    return state


def test_hooked_transformer_state_dict_loads_with_exactly_its_differences():
    source = build(dtype="float64")
    tl_state = hooked_transformer_format(source)
    with pytest.raises(RuntimeError):  # a plain strict load still refuses it
        build(dtype="float64", seed=1).load_state_dict(tl_state)
    model = HookedKVShiftTransformer.from_hooked_transformer_state_dict(
        tl_state, tiny_config(dtype="float64", shift_init="induction"))
    tokens = toks(model)
    # The HookedTransformer's computation: the same weights without any shift.
    vanilla_cfg = tiny_config(dtype="float64", shift_k=False, shift_v=False)
    plain = {k: v for k, v in tl_state.items() if not k.endswith((".mask", ".IGNORE"))}
    assert_close(model(tokens), reference_logits(vanilla_cfg, plain, tokens), **TIGHT)
    coeffs = model.shift_coefficients()
    assert torch.equal(coeffs["k"][..., 0], torch.ones_like(coeffs["k"][..., 0]))
    assert torch.equal(coeffs["v"][..., 1], torch.zeros_like(coeffs["v"][..., 1]))
    # keep_shift keeps the current coefficients.
    kept = build(dtype="float64", seed=3)
    before = kept.shift_coefficients()["k"]
    kept.load_hooked_transformer_state_dict(tl_state, keep_shift=True)
    assert torch.equal(kept.shift_coefficients()["k"], before)
    assert torch.equal(kept.blocks[0].attn.W_Q, source.blocks[0].attn.W_Q)


def test_hooked_transformer_state_dict_refuses_other_differences():
    model = build()
    good = hooked_transformer_format(model)
    bidirectional = dict(good, **{"blocks.0.attn.mask": torch.ones(12, 12, dtype=torch.bool)})
    with pytest.raises(ValueError, match="blocks.0.attn.mask is not a causal"):
        model.load_hooked_transformer_state_dict(bidirectional)
    with pytest.raises(ValueError, match=r"unexpected keys \['blocks.0.attn.W_extra'\]"):
        model.load_hooked_transformer_state_dict(
            dict(good, **{"blocks.0.attn.W_extra": torch.zeros(1)}))
    missing = {k: v for k, v in good.items() if k != "blocks.1.mlp.b_in"}
    with pytest.raises(ValueError, match=r"missing keys \['blocks.1.mlp.b_in'\]"):
        model.load_hooked_transformer_state_dict(missing)
    wrong = dict(good, **{"embed.W_E": torch.zeros(5, 16)})
    with pytest.raises(ValueError, match=r"embed.W_E: \(5, 16\)"):
        model.load_hooked_transformer_state_dict(wrong)


def test_config_in_kvshift_config_terms():
    # from_hooked_transformer_state_dict takes a dict config too.
    cfg = tiny_config().to_dict()
    model = HookedKVShiftTransformer.from_hooked_transformer_state_dict(
        hooked_transformer_format(build()), cfg)
    assert isinstance(model.cfg, KVShiftConfig) and not model.training
