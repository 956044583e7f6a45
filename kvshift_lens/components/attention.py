"""Causal self-attention with KV shifting (PAPER.md), hooked at every named sub-step.

Axis names: batch, pos (query positions of this call), key_pos (all positions attended to,
including cached ones), head (query heads, ``n_heads``), kv_head (``n_key_value_heads``), lag
(``shift_window + 1``), d_head, d_model.

Sub-steps and their hooks (DESIGN.md)::

    x -> hook_q [b,p,head,d_head], hook_k / hook_v [b,p,kv_head,d_head]   raw projections
      -> hook_shift_{q,k,v} [head|kv_head, lag]                          coefficients
      -> hook_{q,k,v}_shifted                                            K' = sum_l c_l K_{t-l}
      -> hook_rot_q / hook_rot_k                                         rotary, after the shift
      -> hook_attn_scores / hook_pattern [b,head,pos,key_pos]            only on the explicit path
      -> hook_z [b,p,head,d_head] -> hook_result [b,p,head,d_model]      (use_attn_result)

Nothing needs the pattern unless a hook (or a cache) sits on the scores or pattern; then the
explicit path runs, otherwise ``scaled_dot_product_attention``. Both give the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from kvshift_lens.config import KVShiftConfig
from kvshift_lens.shift import constrain, init_coefficients, shift


@dataclass
class LayerKVCache:
    """What one attention layer keeps between decoding steps.

    ``k`` / ``v``: the keys and values attention consumed (shifted, and rotated for keys), over
    all cached positions, ``[batch, key_pos, kv_head, d_head]``. ``tail_*``: the last
    ``shift_window`` *unshifted* inputs to the shift, which the next position's shift mixes in.
    """

    k: Tensor | None = None
    v: Tensor | None = None
    tail_q: Tensor | None = None
    tail_k: Tensor | None = None
    tail_v: Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[1]


def _hook_point(pos_dim: int | None) -> HookPoint:
    hp = HookPoint()
    hp.pos_dim = pos_dim
    return hp


class Rotary(nn.Module):
    """GPT-NeoX / Llama style rotary embedding ("rotate half") on the first ``rotary_dim`` dims."""

    def __init__(self, cfg: KVShiftConfig):
        super().__init__()
        self.dim = cfg.rotary_dim
        inv_freq = 1.0 / (cfg.rotary_base ** (torch.arange(0, self.dim, 2).double() / self.dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(
        self, x: Float[Tensor, "batch pos head d_head"], offset: int
    ) -> Float[Tensor, "batch pos head d_head"]:
        pos = torch.arange(offset, offset + x.shape[1], device=x.device, dtype=torch.float64)
        freqs = torch.outer(pos, self.inv_freq.to(x.device))  # [pos, dim/2]
        emb = torch.cat([freqs, freqs], dim=-1)[None, :, None, :]  # [1, pos, 1, dim]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        rot, rest = x[..., : self.dim], x[..., self.dim :]
        half = self.dim // 2
        rotated_half = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
        out = rot * cos + rotated_half * sin
        return out if rest.shape[-1] == 0 else torch.cat([out, rest], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: KVShiftConfig):
        super().__init__()
        self.cfg = cfg
        H, KV, dm, dh = cfg.n_heads, cfg.n_key_value_heads, cfg.d_model, cfg.d_head
        self.gqa = KV != H
        self.W_Q = nn.Parameter(torch.empty(H, dm, dh, dtype=cfg.dtype))
        self.b_Q = nn.Parameter(torch.zeros(H, dh, dtype=cfg.dtype))
        kv = "_" if self.gqa else ""  # TransformerLens stores shared K/V weights as _W_K / _W_V
        setattr(self, f"{kv}W_K", nn.Parameter(torch.empty(KV, dm, dh, dtype=cfg.dtype)))
        setattr(self, f"{kv}W_V", nn.Parameter(torch.empty(KV, dm, dh, dtype=cfg.dtype)))
        setattr(self, f"{kv}b_K", nn.Parameter(torch.zeros(KV, dh, dtype=cfg.dtype)))
        setattr(self, f"{kv}b_V", nn.Parameter(torch.zeros(KV, dh, dtype=cfg.dtype)))
        self.W_O = nn.Parameter(torch.empty(H, dh, dm, dtype=cfg.dtype))
        self.b_O = nn.Parameter(torch.zeros(dm, dtype=cfg.dtype))
        for which, n in (("q", H), ("k", KV), ("v", KV)):
            if getattr(cfg, f"shift_{which}"):
                coeffs = init_coefficients(n, cfg.n_lags, "identity", which, dtype=cfg.dtype)
                setattr(self, f"shift_{which}", nn.Parameter(coeffs))
                setattr(self, f"hook_shift_{which}", _hook_point(None))  # [head|kv_head, lag]
                setattr(self, f"hook_{which}_shifted", _hook_point(1))  # [b, p, head, d_head]
        self.rotary = Rotary(cfg) if cfg.positional_embedding_type == "rotary" else None
        self.scale = 1.0 / math.sqrt(dh)

        self.hook_q = _hook_point(1)  # [batch, pos, head, d_head]
        self.hook_k = _hook_point(1)  # [batch, pos, kv_head, d_head]
        self.hook_v = _hook_point(1)  # [batch, pos, kv_head, d_head]
        if self.rotary is not None:
            self.hook_rot_q = _hook_point(1)  # [batch, pos, head, d_head]
            self.hook_rot_k = _hook_point(1)  # [batch, pos, kv_head, d_head]
        self.hook_attn_scores = _hook_point(2)  # [batch, head, pos, key_pos]
        self.hook_pattern = _hook_point(2)  # [batch, head, pos, key_pos]
        self.hook_z = _hook_point(1)  # [batch, pos, head, d_head]
        self.hook_result = _hook_point(1)  # [batch, pos, head, d_model]

    # TransformerLens' names for the K/V weights: the parameter itself, or under grouped-query
    # attention a view of the shared `_W_K` etc. repeated once per query head.
    def _per_head(self, name: str) -> Tensor:
        p = self.__dict__["_parameters"]
        if name in p:
            return p[name]
        if "_" + name in p:
            return p["_" + name].repeat_interleave(self.cfg.heads_per_kv, 0)
        raise AttributeError(name)

    W_K = property(lambda self: self._per_head("W_K"))
    W_V = property(lambda self: self._per_head("W_V"))
    b_K = property(lambda self: self._per_head("b_K"))
    b_V = property(lambda self: self._per_head("b_V"))

    def _kv_weights(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        p = self._parameters
        if self.gqa:
            return p["_W_K"], p["_b_K"], p["_W_V"], p["_b_V"]
        return p["W_K"], p["b_K"], p["W_V"], p["b_V"]

    def coefficients(self, which: str) -> Float[Tensor, "head lag"] | None:
        """The effective (constrained) coefficients of one projection, or None when unshifted."""
        raw = self._parameters.get(f"shift_{which}")
        return None if raw is None else constrain(raw, self.cfg.shift_param)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        q_input: Tensor,
        k_input: Tensor,
        v_input: Tensor,
        cache: LayerKVCache | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """Inputs are ``[batch, pos, d_model]``, or ``[batch, pos, head|kv_head, d_model]`` when
        split per head (``use_split_qkv_input`` / ``use_attn_in``)."""
        cfg = self.cfg
        W_K, b_K, W_V, b_V = self._kv_weights()
        q = self.hook_q(_project(q_input, self.W_Q, self.b_Q))
        k = self.hook_k(_project(k_input, W_K, b_K))
        v = self.hook_v(_project(v_input, W_V, b_V))
        offset = 0 if cache is None else cache.length

        post_rotary = cfg.shift_position == "post_rotary"
        if self.rotary is not None and post_rotary:
            q = self.hook_rot_q(self.rotary(q, offset))
            k = self.hook_rot_k(self.rotary(k, offset))
        q = self._shift("q", q, cache)
        k = self._shift("k", k, cache)
        v = self._shift("v", v, cache)
        if self.rotary is not None and not post_rotary:
            q = self.hook_rot_q(self.rotary(q, offset))
            k = self.hook_rot_k(self.rotary(k, offset))

        if cache is not None:
            if cache.k is not None:
                k = torch.cat([cache.k, k], dim=1)
                v = torch.cat([cache.v, v], dim=1)
            cache.k, cache.v = k, v

        z = self.hook_z(self._attend(q, k, v, offset))
        if cfg.use_attn_result:
            result = self.hook_result(torch.einsum("bphd,hdm->bphm", z, self.W_O))
            return result.sum(-2) + self.b_O
        b, p = z.shape[:2]
        return F.linear(z.reshape(b, p, -1), self.W_O.flatten(0, 1).T, self.b_O)

    def _shift(self, which: str, x: Tensor, cache: LayerKVCache | None) -> Tensor:
        raw = self._parameters.get(f"shift_{which}")
        if raw is None:
            return x
        coeffs = getattr(self, f"hook_shift_{which}")(constrain(raw, self.cfg.shift_param))
        past = None if cache is None else getattr(cache, f"tail_{which}")
        out = getattr(self, f"hook_{which}_shifted")(shift(x, coeffs, past))
        if cache is not None:
            full = x if past is None else torch.cat([past, x], dim=1)
            setattr(cache, f"tail_{which}", full[:, -self.cfg.shift_window :])
        return out

    def _needs_pattern(self) -> bool:
        if not self.cfg.use_sdpa:
            return True
        s, p = self.hook_attn_scores, self.hook_pattern
        return bool(s.fwd_hooks or s.bwd_hooks or p.fwd_hooks or p.bwd_hooks)

    def _attend(
        self,
        q: Float[Tensor, "batch pos head d_head"],
        k: Float[Tensor, "batch key_pos kv_head d_head"],
        v: Float[Tensor, "batch key_pos kv_head d_head"],
        offset: int,
    ) -> Float[Tensor, "batch pos head d_head"]:
        n_q, n_k = q.shape[1], k.shape[1]
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, head, pos, d]
        # Query i sits at absolute position offset + i and may read keys 0..offset + i.
        mask = None
        if offset > 0:
            mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(diagonal=offset)
        if not self._needs_pattern():
            z = F.scaled_dot_product_attention(
                qh, kh, vh, attn_mask=mask, is_causal=mask is None, scale=self.scale,
                enable_gqa=self.gqa,
            )
            return z.transpose(1, 2)
        if self.gqa:
            kh = kh.repeat_interleave(self.cfg.heads_per_kv, 1)
            vh = vh.repeat_interleave(self.cfg.heads_per_kv, 1)
        scores = (qh @ kh.transpose(-1, -2)) * self.scale  # [b, head, pos, key_pos]
        if mask is None:
            mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril()
        scores = self.hook_attn_scores(scores.masked_fill(~mask, float("-inf")))
        pattern = self.hook_pattern(scores.softmax(-1))
        return (pattern @ vh).transpose(1, 2)


def _project(
    x: Float[Tensor, "batch pos d_model"] | Float[Tensor, "batch pos head d_model"],
    W: Float[Tensor, "head d_model d_head"],
    b: Float[Tensor, "head d_head"],
) -> Float[Tensor, "batch pos head d_head"]:
    if x.ndim == 4:  # one input per head
        return torch.einsum("bphm,hmd->bphd", x, W) + b
    n, dm, dh = W.shape
    flat = F.linear(x, W.permute(0, 2, 1).reshape(n * dh, dm), b.reshape(-1))
    return flat.view(*x.shape[:-1], n, dh)
