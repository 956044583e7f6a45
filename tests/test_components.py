"""Components: parameter names, shapes and initial values frozen against the model's first
release (so that checkpoints and every seeded number in REPRODUCTION.md and the demo stay valid),
and attention's public sub-steps against hand-written references."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from kvshift_lens import HookedKVShiftTransformer
from tests.helpers import build, tiny_config

# ------------------------------------------------------------------ the frozen layout and init
# A copy of how the first release named, shaped and initialised parameters (one function walking
# ``named_parameters()`` in order, drawing weights from one generator). Kept here, independent of
# the library, as the reference the components' own initialisation must reproduce bit for bit.


def frozen_layout(cfg) -> list[tuple[str, tuple[int, ...]]]:
    """Every parameter's name and shape, in the order the first release registered them."""
    H, KV, dm, dh, lags = cfg.n_heads, cfg.n_key_value_heads, cfg.d_model, cfg.d_head, \
        cfg.shift_window + 1
    out = [("embed.W_E", (cfg.d_vocab, dm))]
    if cfg.positional_embedding_type in ("standard", "shortformer"):
        out.append(("pos_embed.W_pos", (cfg.n_ctx, dm)))

    def norm(prefix):
        if cfg.normalization_type in ("LN", "RMS"):
            out.append((f"{prefix}.w", (dm,)))
        if cfg.normalization_type == "LN":
            out.append((f"{prefix}.b", (dm,)))

    kv = "_" if KV != H else ""
    for layer in range(cfg.n_layers):
        b = f"blocks.{layer}."
        norm(b + "ln1")
        a = b + "attn."
        out += [(a + "W_Q", (H, dm, dh)), (a + "b_Q", (H, dh)),
                (a + kv + "W_K", (KV, dm, dh)), (a + kv + "W_V", (KV, dm, dh)),
                (a + kv + "b_K", (KV, dh)), (a + kv + "b_V", (KV, dh)),
                (a + "W_O", (H, dh, dm)), (a + "b_O", (dm,))]
        for which, n in (("q", H), ("k", KV), ("v", KV)):
            if getattr(cfg, f"shift_{which}"):
                out.append((a + f"shift_{which}", (n, lags)))
        if not cfg.attn_only:
            norm(b + "ln2")
            m = b + "mlp."
            out += [(m + "W_in", (dm, cfg.d_mlp)), (m + "b_in", (cfg.d_mlp,))]
            if cfg.gated_mlp:
                out.append((m + "W_gate", (dm, cfg.d_mlp)))
            out += [(m + "W_out", (cfg.d_mlp, dm)), (m + "b_out", (dm,))]
    norm("ln_final")
    if not cfg.tie_word_embeddings:
        out.append(("unembed.W_U", (dm, cfg.d_vocab)))
    out.append(("unembed.b_U", (cfg.d_vocab,)))
    return out


def _frozen_simplex(v):
    n = v.shape[-1]
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = u.cumsum(-1) - 1
    ind = torch.arange(1, n + 1, dtype=v.dtype)
    rho = ((u - css / ind) > 0).to(v.dtype).cumsum(-1).argmax(-1, keepdim=True)
    return (v - css.gather(-1, rho) / (rho + 1).to(v.dtype)).clamp_min(0)


def _frozen_coefficients(n, lags, scheme, which, std, generator):
    out = torch.zeros(n, lags)
    if scheme == "identity":
        out[:, 0] = 1
    elif scheme == "uniform":
        out[:] = 1.0 / lags
    elif scheme == "normal":
        out[:, 0] = 1
        out = out + std * torch.randn(n, lags, generator=generator, dtype=torch.float32)
    elif scheme == "induction":
        out[:, 1 if which == "k" else 0] = 1
    return out


def frozen_init(cfg, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """The first release's initial state: weights N(0, init_range) in float32, drawn in parameter
    order, then cast; biases 0, norm scales 1; coefficients by ``shift_init`` (projected onto the
    simplex when ``convex``)."""
    state = {}
    for name, shape in frozen_layout(cfg):
        leaf = name.rsplit(".", 1)[-1]
        if leaf.startswith("shift_"):
            which = leaf[-1]
            init = _frozen_coefficients(shape[0], shape[1], cfg.shift_init, which,
                                        cfg.shift_init_std, generator)
            if cfg.shift_param == "convex":
                init = _frozen_simplex(init)
            state[name] = init.to(cfg.dtype)
        elif leaf.lstrip("_").startswith("W_"):
            state[name] = (torch.randn(shape, generator=generator) * cfg.init_range).to(cfg.dtype)
        elif leaf == "w":
            state[name] = torch.ones(shape, dtype=cfg.dtype)
        else:
            state[name] = torch.zeros(shape, dtype=cfg.dtype)
    return state


INIT_CASES = [
    dict(),
    dict(n_key_value_heads=2, shift_q=True, shift_init="normal"),
    dict(n_key_value_heads=1, shift_init="normal", shift_param="convex", shift_window=2),
    dict(positional_embedding_type="rotary", normalization_type="RMS", gated_mlp=True,
         act_fn="silu", shift_init="induction"),
    dict(attn_only=True, shift_init="uniform", shift_window=3, shift_param="convex"),
    dict(positional_embedding_type="shortformer", tie_word_embeddings=True, shift_init="identity",
         shift_k=False, shift_q=True),
    dict(positional_embedding_type="none", normalization_type=None, shift_init="normal",
         shift_init_std=0.5, init_range=0.1, shift_q=True, shift_window=2),
    dict(shift_k=False, shift_v=False, n_key_value_heads=2, n_layers=3),
    dict(dtype="float64", shift_init="normal", n_key_value_heads=2),
]


@pytest.mark.parametrize("overrides", INIT_CASES, ids=lambda o: ",".join(
    f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("seed", [0, 11])
def test_initial_weights_are_bit_identical_to_the_first_release(overrides, seed):
    cfg = tiny_config(**overrides)
    model = HookedKVShiftTransformer(cfg, generator=torch.Generator().manual_seed(seed))
    expected = frozen_init(cfg, torch.Generator().manual_seed(seed))
    state = model.state_dict()
    assert list(state) == list(expected)  # names, and the order they are stored in
    for name, value in expected.items():
        assert state[name].dtype == value.dtype, name
        assert torch.equal(state[name], value), name


@pytest.mark.parametrize("overrides", INIT_CASES[:3])
def test_global_rng_initialisation_is_unchanged(overrides):
    """``generator=None`` draws from torch's global RNG, in the same order."""
    cfg = tiny_config(**overrides)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        model = HookedKVShiftTransformer(cfg)
        torch.manual_seed(5)
        expected = frozen_init(cfg, None)
        after_model = torch.randn(3)  # the model drew exactly as many numbers as the reference
        torch.manual_seed(5)
        HookedKVShiftTransformer(cfg)
        assert torch.equal(torch.randn(3), after_model)
    for name, value in expected.items():
        assert torch.equal(model.state_dict()[name], value), name


# ------------------------------------------------------------------ attention's sub-steps
def _attn_inputs(model, seed=3, pos=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, pos, model.cfg.d_model, generator=g)


def _by_hand(x, W, b):
    """x @ W[h] + b[h] for every head, with loops (independent of the library's layouts)."""
    return torch.stack([x @ W[h] + b[h] for h in range(W.shape[0])], dim=2)


@pytest.mark.parametrize("n_kv", [4, 2, 1])
def test_fused_qkv_projection_equals_separate_projections(n_kv):
    """One matmul for Q, K and V (shared input) gives each head's own x W + b, and the per-head
    input path (``use_split_qkv_input``) gives the same."""
    model = build(n_key_value_heads=n_kv)
    attn = model.blocks[0].attn
    x = _attn_inputs(model)
    W_K, b_K, W_V, b_V = attn.key_value_weights()
    assert W_K.shape == (n_kv, model.cfg.d_model, model.cfg.d_head)
    q, k, v = attn.calculate_qkv_matrices(x, x, x)
    assert q.shape == (2, 7, 4, 4) and k.shape == v.shape == (2, 7, n_kv, 4)
    assert_close(q, _by_hand(x, attn.W_Q, attn.b_Q), rtol=1e-5, atol=1e-6)
    assert_close(k, _by_hand(x, W_K, b_K), rtol=1e-5, atol=1e-6)
    assert_close(v, _by_hand(x, W_V, b_V), rtol=1e-5, atol=1e-6)
    per_head = lambda n: x.unsqueeze(2).expand(-1, -1, n, -1)  # noqa: E731
    q2, k2, v2 = attn.calculate_qkv_matrices(per_head(4), per_head(n_kv), per_head(n_kv))
    for fused, split in ((q, q2), (k, k2), (v, v2)):
        assert_close(fused, split, rtol=1e-5, atol=1e-6)


def test_hooks_see_and_can_edit_the_fused_projections():
    """hook_k is the raw projection of the normalised input; a hook may replace hook_v or edit
    it in place (TransformerLens-style ablation) with autograd on, and the logits and every
    gradient equal those of the same edit made out of place."""
    model = build()
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    _, cache = model.run_with_cache(tokens)
    x = cache["blocks.0.ln1.hook_normalized"]
    attn = model.blocks[0].attn
    assert_close(cache["blocks.0.attn.hook_k"], _by_hand(x, attn.W_K, attn.b_K),
                 rtol=1e-5, atol=1e-6)

    def in_place(v, hook):
        v[:, :, 1] = 0.0

    def out_of_place(v, hook):
        v = v.clone()
        v[:, :, 1] = 0.0
        return v

    results = []
    for hook_fn in (in_place, out_of_place):
        model.zero_grad(set_to_none=True)
        with model.hooks(fwd_hooks=[("blocks.0.attn.hook_v", hook_fn)]):
            loss = model(tokens, return_type="loss")
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    with torch.no_grad():
        assert abs(float(loss_a) - float(model(tokens, return_type="loss"))) > 1e-4  # ablated
    assert torch.equal(loss_a, loss_b)
    for name in grads_a:
        assert_close(grads_a[name], grads_b[name], rtol=1e-6, atol=1e-9, msg=name)


@pytest.mark.parametrize("overrides", [dict(), dict(n_key_value_heads=2, shift_q=True),
                                       dict(positional_embedding_type="rotary",
                                            shift_position="post_rotary", shift_window=2)])
def test_sub_steps_composed_by_hand_equal_forward(overrides):
    """The public steps, called one by one in the diagram's order, are the forward pass: on the
    explicit path (scores, pattern, z) and on the fused one."""
    model = build(**overrides)
    attn = model.blocks[1].attn
    x = _attn_inputs(model)
    q, k, v = attn.calculate_qkv_matrices(x, x, x)
    if model.cfg.shift_position == "post_rotary":
        q, k = attn.apply_rotary(q, k, 0)
        q, k, v = attn.apply_shift(q, k, v)
    else:
        q, k, v = attn.apply_shift(q, k, v)
        q, k = attn.apply_rotary(q, k, 0)
    scores = attn.calculate_attention_scores(q, k)
    assert torch.isinf(scores[..., 0, 1:]).all() and torch.isfinite(scores[..., -1, :]).all()
    pattern = attn.calculate_pattern(scores)
    assert_close(pattern.sum(-1), torch.ones_like(pattern.sum(-1)))
    explicit = attn.calculate_output(attn.calculate_z_scores(v, pattern))
    fused = attn.calculate_output(attn.calculate_z_scores_fused(q, k, v))
    assert_close(explicit, attn(x, x, x), rtol=1e-5, atol=1e-6)
    assert_close(fused, explicit, rtol=1e-5, atol=1e-6)


def test_grouped_query_attention_is_its_own_class_with_tl_storage():
    from kvshift_lens.components import Attention, GroupedQueryAttention, make_attention

    cfg = tiny_config(n_key_value_heads=2)
    attn = make_attention(cfg, torch.Generator().manual_seed(0))
    assert isinstance(attn, GroupedQueryAttention) and isinstance(attn, Attention)
    names = {n for n, _ in attn.named_parameters()}
    assert {"_W_K", "_W_V", "_b_K", "_b_V"} <= names and "W_K" not in names
    assert attn.W_K.shape == (4, 16, 4)
    assert torch.equal(attn.W_K[1], attn._W_K[0]) and torch.equal(attn.W_K[2], attn._W_K[1])
    assert torch.equal(attn.b_V[3], attn._b_V[1])
    assert type(make_attention(tiny_config())) is Attention
    with pytest.raises(ValueError, match=r"n_key_value_heads=2 with n_heads=4.*make_attention"):
        Attention(cfg)
    with pytest.raises(ValueError, match=r"n_key_value_heads=4 with n_heads=4"):
        GroupedQueryAttention(tiny_config())


def test_unshifted_projections_have_no_coefficients_or_hooks():
    attn = build(shift_k=False, shift_q=True).blocks[0].attn
    assert attn.shift_k is None and attn.coefficients("k") is None
    assert attn.shift_q is not None and attn.coefficients("q").shape == (4, 2)
    assert not hasattr(attn, "hook_shift_k") and not hasattr(attn, "hook_k_shifted")
    with pytest.raises(ValueError, match=r"which='x' is not one of \['q', 'k', 'v'\]"):
        attn.coefficients("x")


def test_shift_parameters_are_the_coefficients_in_parameter_order():
    model = build(shift_q=True, n_key_value_heads=2)
    expected = [p for n, p in model.named_parameters() if n.split(".")[-1] in
                ("shift_q", "shift_k", "shift_v")]
    got = model.shift_parameters()
    assert len(got) == 3 * model.cfg.n_layers
    assert all(a is b for a, b in zip(got, expected, strict=True))
    assert build(shift_k=False, shift_v=False).shift_parameters() == []


@pytest.mark.parametrize("n_kv", [4, 2])
def test_explicit_attention_gives_the_same_bits_with_and_without_autograd(n_kv):
    """The explicit path multiplies per batch element without autograd and batched with it."""
    model = build(n_key_value_heads=n_kv, use_sdpa=False)
    tokens = torch.randint(0, model.cfg.d_vocab, (3, 10), generator=torch.Generator().manual_seed(1))
    names = lambda n: n.endswith(("attn_scores", "pattern", "hook_z"))  # noqa: E731
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=names)
    logits_grad, cache_grad = model.run_with_cache(tokens, names_filter=names)
    assert logits_grad.requires_grad
    assert torch.equal(logits, logits_grad.detach())
    for name in cache:
        assert torch.equal(cache[name], cache_grad[name]), name
