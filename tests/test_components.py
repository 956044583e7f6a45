"""Components: parameter names, shapes and initial values frozen against the model's first
release, so that checkpoints and every seeded number (REPRODUCTION.md, the demo) stay valid."""

from __future__ import annotations

import pytest
import torch

from kvshift_lens import HookedKVShiftTransformer
from tests.helpers import tiny_config

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
