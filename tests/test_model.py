"""The model against independent references: vanilla equivalence at identity, a from-scratch
re-implementation, the two attention paths, float64, losses and input errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from kvshift_lens import HookedKVShiftTransformer, KVShiftConfig
from tests.helpers import ARCHS, build, randomize, tiny_config
from tests.reference import reference_logits

POS_TYPES = ["standard", "rotary", "shortformer", "none"]
NORMS = ["LN", "RMS", None]


def _tokens(cfg, batch=2, pos=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.d_vocab, (batch, pos or cfg.n_ctx), generator=g)


def _copy_shared(src: HookedKVShiftTransformer, dst: HookedKVShiftTransformer) -> None:
    state = {k: v for k, v in src.state_dict().items() if ".shift_" not in k}
    missing, unexpected = dst.load_state_dict(state, strict=False)
    assert all(".shift_" in k for k in missing) and not unexpected


@pytest.mark.parametrize(
    "pos_type,norm,arch,gqa,tied",
    list(itertools.product(POS_TYPES, NORMS, ARCHS, [False, True], [False, True])),
)
def test_identity_coefficients_equal_vanilla(pos_type, norm, arch, gqa, tied):
    """At identity the shifted model is exactly the vanilla one, for every shift variant."""
    common = dict(positional_embedding_type=pos_type, normalization_type=norm,
                  n_key_value_heads=2 if gqa else None, tie_word_embeddings=tied, **ARCHS[arch])
    vanilla = build(shift_k=False, shift_v=False, **common)
    tokens = _tokens(vanilla.cfg)
    expected = vanilla(tokens)
    variants = [
        dict(shift_window=1, shift_param="free"),
        dict(shift_window=2, shift_param="convex", shift_q=True),
        dict(shift_window=3, shift_param="free", shift_k=False, shift_q=True),
        dict(shift_window=2, shift_param="gain_mix", shift_q=True),
    ]
    if pos_type == "rotary":
        variants.append(dict(shift_position="post_rotary"))
    for variant in variants:
        shifted = HookedKVShiftTransformer(tiny_config(**common, **variant)).eval()
        _copy_shared(vanilla, shifted)  # coefficients keep their identity init
        for which, c in shifted.shift_coefficients().values.items():
            assert torch.equal(c[..., 0], torch.ones_like(c[..., 0])), which
            assert torch.equal(c[..., 1:], torch.zeros_like(c[..., 1:])), which
        assert_close(shifted(tokens), expected, rtol=0, atol=1e-6)


REFERENCE_CASES = [
    dict(),
    dict(normalization_type="RMS", gated_mlp=True, act_fn="silu", n_key_value_heads=2),
    dict(positional_embedding_type="rotary", shift_q=True, attn_only=True),
    dict(positional_embedding_type="rotary", shift_position="post_rotary", rotary_dim=2),
    dict(positional_embedding_type="shortformer", shift_window=2, tie_word_embeddings=True),
    dict(positional_embedding_type="none", normalization_type=None, shift_window=3,
         shift_param="convex", act_fn="relu"),
    dict(shift_window=2, shift_param="gain_mix", shift_q=True, n_key_value_heads=2),
    dict(shift_k=False, act_fn="gelu_new"),
    dict(shift_v=False, n_key_value_heads=1, shift_q=True),
]


@pytest.mark.parametrize("overrides", REFERENCE_CASES, ids=lambda o: ",".join(
    f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("sdpa", [True, False])
def test_matches_reference_implementation(overrides, sdpa):
    model = build(n_ctx=8, use_sdpa=sdpa, **overrides)
    tokens = _tokens(model.cfg, batch=2)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    expected = reference_logits(model.cfg, sd, tokens)
    assert_close(model(tokens), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("overrides", REFERENCE_CASES[:6])
def test_sdpa_path_equals_explicit_path(overrides):
    model = build(**overrides)
    tokens = _tokens(model.cfg, batch=3)
    fast = model(tokens)
    seen = {}

    def spy(pattern, hook):
        seen[hook.name] = pattern

    slow = model.run_with_hooks(tokens, fwd_hooks=[(lambda n: n.endswith("hook_pattern"), spy)])
    assert len(seen) == model.cfg.n_layers  # the hook forced the explicit path in every layer
    assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    model.cfg.use_sdpa = False
    assert_close(model(tokens), fast, rtol=1e-5, atol=1e-5)


def test_float64_agrees_with_float32():
    model32 = build(positional_embedding_type="rotary", shift_window=2, n_key_value_heads=2)
    model64 = build(positional_embedding_type="rotary", shift_window=2, n_key_value_heads=2)
    model64.to(torch.float64)
    assert model64.cfg.dtype == torch.float64
    tokens = _tokens(model32.cfg)
    out64 = model64(tokens)
    assert out64.dtype == torch.float64
    assert_close(model32(tokens).double(), out64, rtol=1e-5, atol=1e-5)


def test_loss_matches_manual_cross_entropy():
    model = build()
    tokens = _tokens(model.cfg, batch=3)
    logits, loss = model(tokens, return_type="both")
    manual = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                             tokens[:, 1:].reshape(-1), reduction="none").view(3, -1)
    assert_close(loss, manual.mean())
    assert_close(model(tokens, return_type="loss", loss_per_token=True), manual)
    assert model(tokens, return_type=None) is None


def test_shift_changes_output_and_only_through_coefficients():
    """Sanity that the references are sensitive: non-identity coefficients change the logits."""
    model = build()
    tokens = _tokens(model.cfg)
    before = model(tokens)
    with torch.no_grad():
        model.blocks[0].attn.shift_v[0, 1] += 0.5
    assert (model(tokens) - before).abs().max() > 1e-3


def test_stop_at_layer_returns_residual():
    model = build()
    tokens = _tokens(model.cfg)
    _, cache = model.run_with_cache(tokens)
    assert_close(model(tokens, stop_at_layer=1), cache["blocks.0.hook_resid_post"])


@pytest.mark.parametrize("pos_type", ["standard", "shortformer"])
def test_too_long_sequence_with_learned_positions_raises(pos_type):
    model = build(positional_embedding_type=pos_type)
    tokens = torch.zeros(1, model.cfg.n_ctx + 1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"sequence length 13 exceeds n_ctx=12"):
        model(tokens)


def test_rotary_runs_past_n_ctx_consistently():
    model = build(positional_embedding_type="rotary")
    tokens = _tokens(model.cfg, pos=20)
    long = model(tokens)
    assert_close(long[:, :12], model(tokens[:, :12]), rtol=1e-5, atol=1e-5)  # causal prefix


@pytest.mark.parametrize(
    "bad,err,match",
    [
        (torch.tensor([[1, 2, 23]]), ValueError, r"token id 23 is out of range.*d_vocab=23"),
        (torch.tensor([[1, -1, 2]]), ValueError, r"token id -1 is out of range"),
        (torch.tensor([[1.0, 2.0]]), TypeError, r"integer tensor.*float32"),
        (torch.zeros(1, 2, 3, dtype=torch.long), ValueError, r"shape \[batch, pos\]"),
        ([1, 2, 3], TypeError, r"LongTensor of token ids.*got list"),
    ],
)
def test_bad_tokens_raise_clear_errors(bad, err, match):
    model = build()
    with pytest.raises(err, match=match):
        model(bad)


def test_text_without_tokenizer_raises():
    with pytest.raises(ValueError, match="no tokenizer"):
        build()("hello")


def test_bad_return_type():
    with pytest.raises(ValueError, match="return_type='logit'"):
        build()(torch.zeros(1, 3, dtype=torch.long), return_type="logit")


def test_convex_coefficients_stay_on_simplex_and_train():
    model = build(shift_param="convex", shift_window=2, shift_init="identity",
                  randomize_weights=False).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    tokens = _tokens(model.cfg, batch=4)
    for _ in range(5):
        opt.zero_grad()
        model(tokens, return_type="loss").backward()
        opt.step()
        model.constrain_shift_()
    coeffs = model.shift_coefficients()
    for which in coeffs.shifted:
        c = coeffs[which]
        assert (c >= 0).all() and (c <= 1).all()
        assert_close(c.sum(-1), torch.ones_like(c.sum(-1)))
    # It moved off identity: gradients reach coefficients that sit at 0.
    assert coeffs["k"][..., 1:].sum() > 0


def test_gain_mix_keeps_the_mix_on_the_simplex_and_trains_both_parameters():
    model = build(shift_param="gain_mix", shift_window=2, shift_init="identity",
                  randomize_weights=False).train()
    attn = model.blocks[0].attn
    names = [n for n, _ in model.named_parameters() if "shift" in n]
    assert {n.rsplit(".", 1)[-1] for n in names} == {"shift_k", "shift_v", "shift_k_gain",
                                                     "shift_v_gain"}
    assert len(model.shift_parameters()) == len(names)  # all land in the coefficient group
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    tokens = _tokens(model.cfg, batch=4)
    for _ in range(5):
        opt.zero_grad()
        model(tokens, return_type="loss").backward()
        assert attn.shift_k.grad.abs().sum() > 0 and attn.shift_k_gain.grad.abs().sum() > 0
        opt.step()
        model.constrain_shift_()
    for layer in range(model.cfg.n_layers):
        a = model.blocks[layer].attn
        for mix, gain in ((a.shift_k, a.shift_k_gain), (a.shift_v, a.shift_v_gain)):
            # the stored mix is on the simplex; the gain is free and moved off 1
            assert (mix >= 0).all() and (mix <= 1).all()
            assert_close(mix.sum(-1), torch.ones_like(mix.sum(-1)))
            assert not torch.equal(gain, torch.ones_like(gain))
            # the effective coefficients (what hook_shift_* carries) are gain x mix
    coeffs = model.shift_coefficients()
    assert_close(coeffs["k"][0], attn.shift_k_gain.detach()[:, None] * attn.shift_k.detach())
    assert_close(coeffs.gain("k")[0], attn.shift_k_gain.detach().abs())
    assert_close(coeffs.mix("k")[0], attn.shift_k.detach() * attn.shift_k_gain.detach().sign()[:, None])
    _, cache = model.run_with_cache(tokens)
    assert_close(cache["blocks.0.attn.hook_shift_k"], coeffs["k"][0])
    assert coeffs["k"][..., 1:].sum() > 0  # the mix moved off identity


def test_shift_init_schemes():
    for scheme, lag0 in [("identity", 1.0), ("uniform", 0.5)]:
        c = HookedKVShiftTransformer(tiny_config(shift_init=scheme)).shift_coefficients()
        assert torch.all(c["k"][..., 0] == lag0) and torch.all(c["v"][..., 0] == lag0)
    c = HookedKVShiftTransformer(tiny_config(shift_init="induction")).shift_coefficients()
    assert torch.all(c["k"][..., 1] == 1) and torch.all(c["k"][..., 0] == 0)
    assert torch.all(c["v"][..., 0] == 1) and torch.all(c["v"][..., 1] == 0)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = HookedKVShiftTransformer(tiny_config(shift_init="normal"), generator=g1)
    b = HookedKVShiftTransformer(tiny_config(shift_init="normal"), generator=g2)
    assert torch.equal(a.shift_coefficients()["k"], b.shift_coefficients()["k"])
    assert not torch.equal(a.shift_coefficients()["k"][..., 0],
                           torch.ones_like(a.shift_coefficients()["k"][..., 0]))


def test_shift_coefficients_labelled():
    model = build(shift_q=True, n_key_value_heads=2, shift_window=2)
    coeffs = model.shift_coefficients()
    assert coeffs["k"].shape == (2, 2, 3) and coeffs["q"].shape == (2, 4, 3)
    assert_close(coeffs["v"][1], model.blocks[1].attn.shift_v.detach())
    rows = coeffs.records()
    assert len(rows) == 2 * 2 * 3 * 2 + 2 * 4 * 3
    row = next(r for r in rows if r == {**r, "layer": 1, "head": 0, "which": "v", "lag": 2})
    assert row["value"] == pytest.approx(float(model.blocks[1].attn.shift_v[0, 2].detach()))
    with pytest.raises(KeyError, match="not shifted"):
        build(shift_q=False).shift_coefficients()["q"]


def test_randomize_helper_is_deterministic():
    a, b = build(seed=5), build(seed=5)
    randomize(a, 7)
    randomize(b, 7)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_config_accepts_dict_and_rejects_other_types():
    cfg = tiny_config().to_dict()
    assert isinstance(HookedKVShiftTransformer(cfg).cfg, KVShiftConfig)
    with pytest.raises(TypeError, match="cfg must be a KVShiftConfig or dict"):
        HookedKVShiftTransformer("gpt2")


@pytest.mark.parametrize("norm", ["LN", "RMS"])
def test_fused_norm_path_equals_hooked_path(norm):
    """Norms use fused kernels unless a hook watches their scale; both give the same numbers."""
    model = build(normalization_type=norm)
    tokens = _tokens(model.cfg)
    logits, cache = model.run_with_cache(tokens)  # every hook on: explicit norms and attention
    assert "blocks.0.ln1.hook_scale" in cache
    assert_close(model(tokens), logits, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ tokens (TransformerLens API)


def _byte_model(**overrides) -> HookedKVShiftTransformer:
    from kvshift_lens import byte_level_tokenizer

    return HookedKVShiftTransformer(tiny_config(d_vocab=300, n_ctx=16, **overrides),
                                    tokenizer=byte_level_tokenizer())


def test_to_tokens_prepends_bos_by_default_as_transformer_lens():
    model = _byte_model()
    assert model.cfg.default_prepend_bos is True
    assert model.to_tokens("hé").tolist() == [[256, 104, 195, 169]]
    assert model.to_tokens("hé", prepend_bos=False).tolist() == [[104, 195, 169]]
    off = _byte_model(default_prepend_bos=False)
    assert off.to_tokens("hé").tolist() == [[104, 195, 169]]
    assert off.to_tokens("hé", prepend_bos=True).tolist() == [[256, 104, 195, 169]]
    # padding with the pad token (<|bos|> for the byte tokenizer), on the tokenizer's side
    assert model.to_tokens(["a", "bc"]).tolist() == [[256, 97, 256], [256, 98, 99]]
    assert model.to_tokens(["a", "bc"], padding_side="left").tolist() == [[256, 256, 97],
                                                                          [256, 98, 99]]
    model.tokenizer.padding_side = "left"
    assert model.to_tokens(["a", "bc"])[0].tolist() == [256, 256, 97]
    assert model.to_tokens("x" * 40).shape == (1, 16)  # truncated to n_ctx
    assert model.to_tokens("x" * 40, truncate=False).shape == (1, 41)
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right'"):
        model.to_tokens(["a"], padding_side="middle")
    with pytest.raises(TypeError, match="non-empty list of strings"):
        model.to_tokens([])


def test_tokenizer_without_bos_gets_none_by_default():
    from tokenizers import Tokenizer, models, pre_tokenizers

    raw = Tokenizer(models.WordLevel(vocab={"a": 0, "b": 1}, unk_token=None))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    model = HookedKVShiftTransformer(tiny_config(d_vocab=2), tokenizer=raw)
    assert model.tokenizer.bos_token_id is None
    assert model.to_tokens("a b").tolist() == [[0, 1]]
    with pytest.raises(ValueError, match="no BOS token"):
        model.to_tokens("a b", prepend_bos=True)


def test_to_string_as_transformer_lens_and_undecodable_ids_are_marked():
    model = _byte_model()
    assert model.to_string(torch.tensor([104, 105])) == "hi"
    assert model.to_string(torch.tensor(104)) == "h"  # a 0-d tensor (TL's test_prompt does this)
    assert model.to_string([256, 104]) == "<|bos|>h"
    assert model.to_string(torch.tensor([[104], [105]])) == ["h", "i"]
    text = "é , ö ."  # no clean-up of the space before punctuation
    assert model.to_string(model.to_tokens(text, prepend_bos=False)[0]) == text
    # ids the tokenizer has no text for are marked in place, never dropped; the bytes of "é"
    # (195, 169) on either side of them still decode together
    assert (model.to_string(torch.tensor([104, 299, 195, 169, 257, 105]))
            == "h<|unknown id 299|>é<|unknown id 257|>i")
    assert model.to_string([-1, 104]) == "<|unknown id -1|>h"
    assert model.to_string(torch.tensor([[299], [104]])) == ["<|unknown id 299|>", "h"]
    with pytest.raises(ValueError, match="shape"):
        model.to_string(torch.zeros(1, 1, 1, dtype=torch.long))
    with pytest.raises(TypeError, match="integers"):
        model.to_string(torch.tensor([1.0]))


def test_to_str_tokens_as_transformer_lens():
    model = _byte_model()
    assert model.to_str_tokens("hi") == ["<|bos|>", "h", "i"]
    assert model.to_str_tokens("hi", prepend_bos=False) == ["h", "i"]
    assert model.to_str_tokens(["a", "bc"]) == [["<|bos|>", "a"], ["<|bos|>", "b", "c"]]
    assert model.to_str_tokens(torch.tensor([104, 105])) == ["h", "i"]
    assert model.to_str_tokens(torch.tensor([[104, 105]])) == ["h", "i"]
    assert model.to_str_tokens(torch.tensor(104)) == ["h"]
    assert model.to_str_tokens(np.array([104])) == ["h"]
    assert model.to_str_tokens([104, 105]) == ["h", "i"]
    assert model.to_str_tokens([torch.tensor([104]), [105, 106]]) == [["h"], ["i", "j"]]
    # ids the tokenizer has no text for are marked, one string per position, never dropped
    assert model.to_str_tokens(torch.tensor([104, 299, 105])) == ["h", "<|unknown id 299|>", "i"]
    with pytest.raises(ValueError, match=r"one sequence of ids.*\(2, 2\)"):
        model.to_str_tokens(torch.tensor([[104, 105], [106, 107]]))
    assert model.to_single_str_token(104) == "h"
    assert model.to_single_str_token(np.int64(256)) == "<|bos|>"
    with pytest.raises(TypeError, match="token id"):
        model.to_single_str_token("h")
    with pytest.raises(TypeError, match="bool"):
        model.to_single_str_token(True)


def test_get_token_position_as_transformer_lens():
    model = _byte_model()
    text = "abcab"
    # with the default BOS the string's first character is position 1
    assert model.get_token_position("a", text) == 1
    assert model.get_token_position("a", text, mode="last") == 4
    assert model.get_token_position("b", text, prepend_bos=False) == 1
    assert model.get_token_position(99, text, mode="last") == 3  # "c" by id
    ids = model.to_tokens(text)
    assert model.get_token_position(torch.tensor(98), ids, mode="last") == 5  # [1, pos] works
    assert model.get_token_position("b", ids[0]) == 2
    with pytest.raises(ValueError, match="'z' .id 122. does not occur"):
        model.get_token_position("z", text)
    with pytest.raises(ValueError, match="mode must be 'first' or 'last'"):
        model.get_token_position("a", text, mode="middle")
    with pytest.raises(ValueError, match="shape"):
        model.get_token_position("a", torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="2 tokens, not one"):
        model.get_token_position("ab", text)


def test_gain_mix_checkpoint_round_trip_and_other_parametrisations_keep_their_keys(tmp_path):
    model = build(shift_param="gain_mix", shift_q=True)  # randomised gains and mixes
    model.save_pretrained(tmp_path / "ckpt")
    loaded = HookedKVShiftTransformer.from_pretrained(tmp_path / "ckpt", device="cpu").eval()
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and "blocks.1.attn.shift_q_gain" in a
    assert all(torch.equal(a[k], b[k]) for k in a)
    tokens = _tokens(model.cfg)
    assert torch.equal(model(tokens), loaded(tokens))
    for param in ("free", "convex"):  # their checkpoints hold exactly what they held before
        keys = build(shift_param=param, shift_q=True).state_dict().keys()
        assert not [k for k in keys if k.endswith("_gain")]
        assert {k.rsplit(".", 1)[-1] for k in keys if ".shift_" in k} == {
            "shift_q", "shift_k", "shift_v"}
