"""An independent, minimal re-implementation of a KV-shift transformer, for tests only.

Written from PAPER.md with explicit loops over heads and lags, reading weights from a
state dict by TransformerLens name. It imports nothing from kvshift_lens' model code, so the
library's attention, shift, norms and embeddings are all checked against it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _norm(x, sd, prefix, kind, eps):
    if kind is None:
        return x
    if kind in ("LN", "LNPre"):
        x = x - x.mean(-1, keepdim=True)
    x = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    if kind in ("LN", "RMS"):
        x = x * sd[prefix + ".w"]
    if kind == "LN":
        x = x + sd[prefix + ".b"]
    return x


def _rotate(x, positions, rotary_dim, base):
    """Rotate-half rotary on [pos, d_head] for one head."""
    half = rotary_dim // 2
    out = x.clone()
    for p_i, p in enumerate(positions):
        for i in range(half):
            theta = p * base ** (-2 * i / rotary_dim)
            c, s = math.cos(theta), math.sin(theta)
            a, b = x[p_i, i].item(), x[p_i, i + half].item()
            out[p_i, i] = a * c - b * s
            out[p_i, i + half] = b * c + a * s
    return out


def _shift(x, coeffs):
    """x: [pos, d]; coeffs: [lag] -> sum_l c_l x_{t-l} with zeros before the start."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for lag, c in enumerate(coeffs):
            if t - lag >= 0:
                out[t] = out[t] + c * x[t - lag]
    return out


def _simplex(v):
    """Projection onto the simplex by bisection on the threshold (independent of the library)."""
    lo, hi = float(v.min()) - 1, float(v.max())
    for _ in range(200):
        mid = (lo + hi) / 2
        if float((v - mid).clamp_min(0).sum()) > 1:
            lo = mid
        else:
            hi = mid
    return (v - hi).clamp_min(0)


def reference_logits(cfg, sd: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [batch, pos, d_vocab] for token ids [batch, pos] (one sequence at a time)."""
    outs = [_one_sequence(cfg, sd, seq) for seq in tokens]
    return torch.stack(outs)


def _coeffs(cfg, sd, layer, which, head):
    key = f"blocks.{layer}.attn.shift_{which}"
    if key not in sd:
        return None
    c = sd[key][head]
    if cfg.shift_param == "gain_mix":  # a mix on the simplex times a per-head gain
        return sd[f"{key}_gain"][head] * _simplex(c)
    return _simplex(c) if cfg.shift_param == "convex" else c


def _one_sequence(cfg, sd, seq):
    n = seq.shape[0]
    H, KV, dh = cfg.n_heads, cfg.n_key_value_heads, cfg.d_head
    group = H // KV
    x = sd["embed.W_E"][seq]
    pos_type = cfg.positional_embedding_type
    if pos_type == "standard":
        x = x + sd["pos_embed.W_pos"][:n]
    for layer in range(cfg.n_layers):
        pre = f"blocks.{layer}"
        h = _norm(x, sd, pre + ".ln1", cfg.normalization_type, cfg.eps)
        qk_in = h + sd["pos_embed.W_pos"][:n] if pos_type == "shortformer" else h
        gqa = pre + ".attn._W_K" in sd
        wk = sd[pre + (".attn._W_K" if gqa else ".attn.W_K")]
        wv = sd[pre + (".attn._W_V" if gqa else ".attn.W_V")]
        bk = sd[pre + (".attn._b_K" if gqa else ".attn.b_K")]
        bv = sd[pre + (".attn._b_V" if gqa else ".attn.b_V")]
        head_outs = []
        for head in range(H):
            kv = head // group
            q = qk_in @ sd[pre + ".attn.W_Q"][head] + sd[pre + ".attn.b_Q"][head]
            k = qk_in @ wk[kv] + bk[kv]
            v = h @ wv[kv] + bv[kv]
            rot = pos_type == "rotary"
            post = cfg.shift_position == "post_rotary"
            if rot and post:
                q = _rotate(q, range(n), cfg.rotary_dim, cfg.rotary_base)
                k = _rotate(k, range(n), cfg.rotary_dim, cfg.rotary_base)
            cq, ck, cv = (_coeffs(cfg, sd, layer, w, head if w == "q" else kv) for w in "qkv")
            if cq is not None:
                q = _shift(q, cq)
            if ck is not None:
                k = _shift(k, ck)
            if cv is not None:
                v = _shift(v, cv)
            if rot and not post:
                q = _rotate(q, range(n), cfg.rotary_dim, cfg.rotary_base)
                k = _rotate(k, range(n), cfg.rotary_dim, cfg.rotary_base)
            scores = q @ k.T / math.sqrt(dh)
            causal = torch.ones(n, n, dtype=torch.bool).tril()
            pattern = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
            head_outs.append(pattern @ v @ sd[pre + ".attn.W_O"][head])
        x = x + sum(head_outs) + sd[pre + ".attn.b_O"]
        if not cfg.attn_only:
            h2 = _norm(x, sd, pre + ".ln2", cfg.normalization_type, cfg.eps)
            act = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu,
                   "gelu_new": lambda t: F.gelu(t, approximate="tanh")}[cfg.act_fn]
            lin = h2 @ sd[pre + ".mlp.W_in"] + sd[pre + ".mlp.b_in"]
            if cfg.gated_mlp:
                hidden = act(h2 @ sd[pre + ".mlp.W_gate"]) * lin
            else:
                hidden = act(lin)
            x = x + hidden @ sd[pre + ".mlp.W_out"] + sd[pre + ".mlp.b_out"]
    x = _norm(x, sd, "ln_final", cfg.normalization_type, cfg.eps)
    W_U = sd["embed.W_E"].T if cfg.tie_word_embeddings else sd["unembed.W_U"]
    return x @ W_U + sd["unembed.b_U"]
