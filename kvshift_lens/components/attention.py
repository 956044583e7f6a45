"""Causal self-attention with KV shifting (PAPER.md), in TransformerLens' named sub-steps.

:meth:`Attention.forward` runs the steps of DESIGN.md's diagram in order. Each is a public method
that applies its own hooks, so a reader can call one alone or override it (axis names: the
package docstring)::

    calculate_qkv_matrices      x -> hook_q [batch pos head_index d_head],
                                     hook_k / hook_v [batch pos kv_head d_head]    raw projections
    apply_shift                 hook_shift_{q,k,v} [head_index | kv_head, lag]     coefficients
                                -> hook_{q,k,v}_shifted       K'_t = sum_l c_l K_{t-l} (shift.py)
    apply_rotary                -> hook_rot_q / hook_rot_k    after the shift (before it with
                                                              shift_position="post_rotary")
    calculate_attention_scores  -> hook_attn_scores [batch head_index query_pos key_pos], masked
    calculate_pattern           -> hook_pattern     [batch head_index query_pos key_pos]
    calculate_z_scores          -> hook_z [batch query_pos head_index d_head]
    calculate_output            -> hook_result [batch query_pos head_index d_model]
                                   (use_attn_result) -> [batch query_pos d_model]

Scores and pattern are materialised only when something reads them: a hook (a cache counts) on
``hook_attn_scores`` or ``hook_pattern``, or ``use_sdpa=False``. Otherwise
:meth:`Attention.calculate_z_scores_fused` goes from Q, K', V' to z with
``scaled_dot_product_attention``. Both paths give the same numbers.

When Q, K and V read one ``[batch, pos, d_model]`` input (``use_split_qkv_input`` and
``use_attn_in`` off, no shortformer positions), the three projections run as one matmul;
``hook_q`` / ``hook_k`` / ``hook_v`` see views of its output, the same values as three separate
projections.
"""

from __future__ import annotations

import math

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from kvshift_lens.components.kv_cache import LayerKVCache
from kvshift_lens.components.parameters import normal, zeros
from kvshift_lens.components.rotary import Rotary
from kvshift_lens.config import KVShiftConfig
from kvshift_lens.shift import constrain, init_coefficients, init_gain, shift

__all__ = ["Attention", "GroupedQueryAttention", "LayerKVCache", "make_attention"]

QueryInput = Float[Tensor, "batch pos d_model"] | Float[Tensor, "batch pos head_index d_model"]
KeyValueInput = Float[Tensor, "batch pos d_model"] | Float[Tensor, "batch pos kv_head d_model"]
Queries = Float[Tensor, "batch pos head_index d_head"]
KeysValues = Float[Tensor, "batch pos kv_head d_head"]
Pattern = Float[Tensor, "batch head_index query_pos key_pos"]


def _hook_point(pos_dim: int | None) -> HookPoint:
    """A HookPoint that records which axis is the position (None: it has none), for caching
    with a ``pos_slice``."""
    hp = HookPoint()
    hp.pos_dim = pos_dim
    return hp


class Attention(nn.Module):
    """Multi-head causal self-attention whose queries, keys and values can be shifted.

    Parameters (TransformerLens names): ``W_Q [head_index, d_model, d_head]``,
    ``b_Q [head_index, d_head]``, ``W_K`` / ``W_V`` and ``b_K`` / ``b_V`` likewise,
    ``W_O [head_index, d_head, d_model]``, ``b_O [d_model]``; for each shifted projection its raw
    coefficients ``shift_q [head_index, lag]``, ``shift_k`` / ``shift_v [kv_head, lag]`` (None when
    that projection is not shifted; :meth:`coefficients` gives the constrained values) and, with
    ``shift_param="gain_mix"``, its per-head gain ``shift_{q,k,v}_gain [head_index | kv_head]``
    (then ``shift_{q,k,v}`` holds the mix; None otherwise).
    Each starts as :mod:`~kvshift_lens.components.parameters` says, coefficients by
    ``cfg.shift_init``.

    Args:
        cfg: the model config (``n_key_value_heads == n_heads``; grouped-query attention is
            :class:`GroupedQueryAttention`, and :func:`make_attention` picks the class).
        generator: draws the initial weights (None: torch's global RNG).
    """

    grouped = False  # whether K/V heads are shared among query heads

    def __init__(self, cfg: KVShiftConfig, generator: torch.Generator | None = None):
        super().__init__()
        if (cfg.n_key_value_heads != cfg.n_heads) != self.grouped:
            raise ValueError(
                f"{type(self).__name__} cannot take n_key_value_heads={cfg.n_key_value_heads} "
                f"with n_heads={cfg.n_heads}; make_attention(cfg) picks Attention (equal counts) "
                "or GroupedQueryAttention (fewer key/value heads)"
            )
        self.cfg = cfg
        H, KV, dm, dh = cfg.n_heads, cfg.n_key_value_heads, cfg.d_model, cfg.d_head
        self.W_Q = normal((H, dm, dh), cfg, generator)
        self.b_Q = zeros((H, dh), cfg)
        self._declare_key_value_weights(generator)
        self.W_O = normal((H, dh, dm), cfg, generator)
        self.b_O = zeros((dm,), cfg)
        self.shift_q = self._declare_coefficients("q", H, generator) if cfg.shift_q else None
        self.shift_k = self._declare_coefficients("k", KV, generator) if cfg.shift_k else None
        self.shift_v = self._declare_coefficients("v", KV, generator) if cfg.shift_v else None
        gains = cfg.shift_param == "gain_mix"
        self.shift_q_gain = self._declare_gain(H) if cfg.shift_q and gains else None
        self.shift_k_gain = self._declare_gain(KV) if cfg.shift_k and gains else None
        self.shift_v_gain = self._declare_gain(KV) if cfg.shift_v and gains else None
        if cfg.shift_q:
            self.hook_shift_q = _hook_point(None)  # [head_index, lag]
            self.hook_q_shifted = _hook_point(1)  # [batch, pos, head_index, d_head]
        if cfg.shift_k:
            self.hook_shift_k = _hook_point(None)  # [kv_head, lag]
            self.hook_k_shifted = _hook_point(1)  # [batch, pos, kv_head, d_head]
        if cfg.shift_v:
            self.hook_shift_v = _hook_point(None)  # [kv_head, lag]
            self.hook_v_shifted = _hook_point(1)  # [batch, pos, kv_head, d_head]
        self.rotary = Rotary(cfg) if cfg.positional_embedding_type == "rotary" else None
        self.scale = 1.0 / math.sqrt(dh)

        self.hook_q = _hook_point(1)  # [batch, pos, head_index, d_head]
        self.hook_k = _hook_point(1)  # [batch, pos, kv_head, d_head]
        self.hook_v = _hook_point(1)  # [batch, pos, kv_head, d_head]
        if self.rotary is not None:
            self.hook_rot_q = _hook_point(1)  # [batch, pos, head_index, d_head]
            self.hook_rot_k = _hook_point(1)  # [batch, pos, kv_head, d_head]
        self.hook_attn_scores = _hook_point(2)  # [batch, head_index, query_pos, key_pos]
        self.hook_pattern = _hook_point(2)  # [batch, head_index, query_pos, key_pos]
        self.hook_z = _hook_point(1)  # [batch, pos, head_index, d_head]
        self.hook_result = _hook_point(1)  # [batch, pos, head_index, d_model]

    def _declare_key_value_weights(self, generator: torch.Generator | None) -> None:
        cfg = self.cfg
        H, dm, dh = cfg.n_heads, cfg.d_model, cfg.d_head
        self.W_K = normal((H, dm, dh), cfg, generator)
        self.W_V = normal((H, dm, dh), cfg, generator)
        self.b_K = zeros((H, dh), cfg)
        self.b_V = zeros((H, dh), cfg)

    def _declare_coefficients(self, which: str, n_heads: int,
                              generator: torch.Generator | None) -> nn.Parameter:
        cfg = self.cfg
        return nn.Parameter(init_coefficients(
            n_heads, cfg.n_lags, cfg.shift_init, which, cfg.shift_init_std, generator,
            dtype=cfg.dtype, param=cfg.shift_param))

    def _declare_gain(self, n_heads: int) -> nn.Parameter:
        """The per-head gain of ``shift_param="gain_mix"`` (``[head]``, starting at 1)."""
        return nn.Parameter(init_gain(n_heads, dtype=self.cfg.dtype))

    def key_value_weights(self) -> tuple[
        Float[Tensor, "kv_head d_model d_head"], Float[Tensor, "kv_head d_head"],
        Float[Tensor, "kv_head d_model d_head"], Float[Tensor, "kv_head d_head"],
    ]:
        """``(W_K, b_K, W_V, b_V)`` as stored, one per key/value head."""
        return self.W_K, self.b_K, self.W_V, self.b_V

    def coefficients(self, which: str) -> Float[Tensor, "head lag"] | None:
        """The effective (constrained) coefficients of projection ``which`` ("q", "k" or "v"),
        ``[head_index | kv_head, lag]``, or None when it is not shifted."""
        if which not in ("q", "k", "v"):
            raise ValueError(f"which={which!r} is not one of ['q', 'k', 'v']")
        raw = {"q": self.shift_q, "k": self.shift_k, "v": self.shift_v}[which]
        if raw is None:
            return None
        gain = {"q": self.shift_q_gain, "k": self.shift_k_gain, "v": self.shift_v_gain}[which]
        return constrain(raw, self.cfg.shift_param, gain)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        query_input: QueryInput,
        key_input: KeyValueInput,
        value_input: KeyValueInput,
        cache: LayerKVCache | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """Attend causally from every position of this call.

        Args:
            query_input, key_input, value_input: the normalised residual stream,
                ``[batch, pos, d_model]``, or one copy per head ``[batch, pos, head_index |
                kv_head, d_model]`` (``use_split_qkv_input`` / ``use_attn_in``).
            cache: incremental-decoding state; this call's positions follow the cached ones and
                are appended to it.

        Returns:
            The attention output written to the residual stream, ``[batch, pos, d_model]``.
        """
        offset = 0 if cache is None else cache.length
        q, k, v = self.calculate_qkv_matrices(query_input, key_input, value_input)
        if self.cfg.shift_position == "post_rotary":
            q, k = self.apply_rotary(q, k, offset)
            q, k, v = self.apply_shift(q, k, v, cache)
        else:
            q, k, v = self.apply_shift(q, k, v, cache)
            q, k = self.apply_rotary(q, k, offset)
        if cache is not None:
            k, v = cache.extend(k, v)
        if self.needs_pattern():
            pattern = self.calculate_pattern(self.calculate_attention_scores(q, k, offset))
            z = self.calculate_z_scores(v, pattern)
        else:
            z = self.calculate_z_scores_fused(q, k, v, offset)
        return self.calculate_output(z)

    def calculate_qkv_matrices(
        self, query_input: QueryInput, key_input: KeyValueInput, value_input: KeyValueInput
    ) -> tuple[Queries, KeysValues, KeysValues]:
        """The raw projections ``x W + b`` of each head, through ``hook_q`` / ``hook_k`` /
        ``hook_v``. One matmul for all three when they read the same ``[batch, pos, d_model]``
        tensor; q, k and v are then views of its output.

        Returns:
            ``q [batch, pos, head_index, d_head]``, ``k`` and ``v [batch, pos, kv_head, d_head]``.
        """
        W_K, b_K, W_V, b_V = self.key_value_weights()
        if query_input.ndim == 3 and query_input is key_input and key_input is value_input:
            H, KV = self.cfg.n_heads, self.cfg.n_key_value_heads
            # One copy of the weights, already in F.linear's [out, in] layout.
            W = torch.cat([w.transpose(1, 2) for w in (self.W_Q, W_K, W_V)])  # [H+2KV, dh, dm]
            b = torch.cat([self.b_Q, b_K, b_V])  # [H + 2 KV, d_head]
            qkv = F.linear(query_input, W.flatten(0, 1), b.flatten())  # [b, p, (H + 2 KV) d_head]
            qkv = qkv.unflatten(-1, (H + 2 * KV, -1))  # [batch, pos, H + 2 KV, d_head]
            # unsafe_split: the same views as split, but a hook may edit them in place (as
            # TransformerLens ablations do) with autograd on; safe because nothing edits qkv.
            q, k, v = qkv.unsafe_split_with_sizes([H, KV, KV], dim=2)
        else:
            q = _project(query_input, self.W_Q, self.b_Q)
            k = _project(key_input, W_K, b_K)
            v = _project(value_input, W_V, b_V)
        return self.hook_q(q), self.hook_k(k), self.hook_v(v)

    def apply_shift(
        self, q: Queries, k: KeysValues, v: KeysValues, cache: LayerKVCache | None = None
    ) -> tuple[Queries, KeysValues, KeysValues]:
        """Shift each shifted projection (PAPER.md): ``K'_t = sum_l c[kv_head, l] K_{t-l}``, and
        V' and Q' likewise; a projection that is not shifted passes through unchanged.

        The coefficients pass through ``hook_shift_{q,k,v}`` and the results through
        ``hook_{q,k,v}_shifted``. With a decoding cache the first positions mix in the raw
        positions the previous call left in it, and this call leaves its own.
        """
        if self.shift_q is not None:
            coeffs = self.hook_shift_q(self.coefficients("q"))
            q = self.hook_q_shifted(self._shift("q", q, coeffs, cache))
        if self.shift_k is not None:
            coeffs = self.hook_shift_k(self.coefficients("k"))
            k = self.hook_k_shifted(self._shift("k", k, coeffs, cache))
        if self.shift_v is not None:
            coeffs = self.hook_shift_v(self.coefficients("v"))
            v = self.hook_v_shifted(self._shift("v", v, coeffs, cache))
        return q, k, v

    def _shift(self, which: str, x: Tensor, coeffs: Tensor,
               cache: LayerKVCache | None) -> Tensor:
        if cache is None:
            return shift(x, coeffs)
        past = cache.tails.get(which)
        cache.remember_tail(which, x, past, self.cfg.shift_window)
        return shift(x, coeffs, past)

    def apply_rotary(self, q: Queries, k: KeysValues, offset: int) -> tuple[Queries, KeysValues]:
        """Rotate queries and keys by their absolute positions (``offset`` onwards), through
        ``hook_rot_q`` / ``hook_rot_k``; unchanged without rotary positions."""
        if self.rotary is None:
            return q, k
        return self.hook_rot_q(self.rotary(q, offset)), self.hook_rot_k(self.rotary(k, offset))

    def needs_pattern(self) -> bool:
        """Whether scores and pattern must be materialised: ``use_sdpa`` is off, or a hook (a
        cache counts) sits on ``hook_attn_scores`` or ``hook_pattern``."""
        if not self.cfg.use_sdpa:
            return True
        s, p = self.hook_attn_scores, self.hook_pattern
        return bool(s.fwd_hooks or s.bwd_hooks or p.fwd_hooks or p.bwd_hooks)

    def calculate_attention_scores(
        self, q: Queries, k: Float[Tensor, "batch key_pos kv_head d_head"], offset: int = 0
    ) -> Float[Tensor, "batch head_index query_pos key_pos"]:
        """``q . k / sqrt(d_head)`` with future keys masked to -inf, through
        ``hook_attn_scores``. Query i sits at absolute position ``offset + i``."""
        n_q, n_k = q.shape[1], k.shape[1]
        # The causal mask, added by the product itself: (q.k + 0) * scale is bit for bit
        # q.k * scale, and -inf stays -inf; one [batch, head_index, query_pos, key_pos] buffer.
        mask = torch.zeros(n_q, n_k, dtype=q.dtype, device=q.device).masked_fill_(
            _future(n_q, n_k, offset, q.device), float("-inf"))  # [query_pos, key_pos]
        qh = q.transpose(1, 2)  # [batch, head_index, query_pos, d_head]
        kh = self._per_query_head(k).permute(0, 2, 3, 1)  # [batch, head_index, d_head, key_pos]
        scores = _per_head_matmul(qh, kh, mask).mul_(self.scale)
        return self.hook_attn_scores(scores)

    def calculate_pattern(self, scores: Pattern) -> Pattern:
        """The attention pattern: softmax over keys, through ``hook_pattern``."""
        return self.hook_pattern(scores.softmax(-1))

    def calculate_z_scores(
        self, v: Float[Tensor, "batch key_pos kv_head d_head"], pattern: Pattern
    ) -> Float[Tensor, "batch query_pos head_index d_head"]:
        """Each head's pattern-weighted sum of the (shifted) values, through ``hook_z``."""
        vh = self._per_query_head(v).transpose(1, 2)  # [batch, head_index, key_pos, d_head]
        z = _per_head_matmul(pattern, vh)  # [batch, head_index, query_pos, d_head]
        return self.hook_z(z.transpose(1, 2))

    def calculate_z_scores_fused(
        self,
        q: Queries,
        k: Float[Tensor, "batch key_pos kv_head d_head"],
        v: Float[Tensor, "batch key_pos kv_head d_head"],
        offset: int = 0,
    ) -> Float[Tensor, "batch query_pos head_index d_head"]:
        """:meth:`calculate_attention_scores`, :meth:`calculate_pattern` and
        :meth:`calculate_z_scores` in one ``scaled_dot_product_attention`` call, through
        ``hook_z`` only (the pattern is never materialised)."""
        # [batch, head_index | kv_head, pos, d_head] views
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        mask = None
        if offset > 0:  # decoding: query i may read keys 0..offset + i
            mask = ~_future(q.shape[1], k.shape[1], offset, q.device)
        z = F.scaled_dot_product_attention(
            qh, kh, vh, attn_mask=mask, is_causal=mask is None, scale=self.scale,
            enable_gqa=self.grouped,
        )  # [batch, head_index, query_pos, d_head]
        return self.hook_z(z.transpose(1, 2))

    def calculate_output(
        self, z: Float[Tensor, "batch pos head_index d_head"]
    ) -> Float[Tensor, "batch pos d_model"]:
        """``sum_h z_h W_O[h] + b_O``; with ``use_attn_result`` each head's term passes
        through ``hook_result [batch, pos, head_index, d_model]`` first."""
        if self.cfg.use_attn_result:
            result = self.hook_result(einops.einsum(
                z, self.W_O,
                "batch pos head_index d_head, head_index d_head d_model "
                "-> batch pos head_index d_model"))
            return result.sum(-2) + self.b_O
        return F.linear(z.flatten(-2), self.W_O.flatten(0, 1).T, self.b_O)

    def _per_query_head(
        self, x: Float[Tensor, "batch pos kv_head d_head"]
    ) -> Float[Tensor, "batch pos head_index d_head"]:
        return x


class GroupedQueryAttention(Attention):
    """Attention whose ``n_key_value_heads`` key/value heads are each shared by
    ``heads_per_kv`` consecutive query heads.

    As in TransformerLens, the shared weights are stored as ``_W_K``, ``_W_V``
    ``[kv_head, d_model, d_head]`` and ``_b_K``, ``_b_V`` ``[kv_head, d_head]``; ``W_K``, ``W_V``,
    ``b_K`` and ``b_V`` are them repeated once per query head (``[head_index, ...]``, read-only),
    for the tools that read per-head weights. K and V coefficients are per key/value head (the
    paper counts them per KV pair).
    """

    grouped = True

    def _declare_key_value_weights(self, generator: torch.Generator | None) -> None:
        cfg = self.cfg
        KV, dm, dh = cfg.n_key_value_heads, cfg.d_model, cfg.d_head
        self._W_K = normal((KV, dm, dh), cfg, generator)
        self._W_V = normal((KV, dm, dh), cfg, generator)
        self._b_K = zeros((KV, dh), cfg)
        self._b_V = zeros((KV, dh), cfg)

    def key_value_weights(self) -> tuple[
        Float[Tensor, "kv_head d_model d_head"], Float[Tensor, "kv_head d_head"],
        Float[Tensor, "kv_head d_model d_head"], Float[Tensor, "kv_head d_head"],
    ]:
        return self._W_K, self._b_K, self._W_V, self._b_V

    @property
    def W_K(self) -> Float[Tensor, "head_index d_model d_head"]:
        return self._W_K.repeat_interleave(self.cfg.heads_per_kv, dim=0)

    @property
    def W_V(self) -> Float[Tensor, "head_index d_model d_head"]:
        return self._W_V.repeat_interleave(self.cfg.heads_per_kv, dim=0)

    @property
    def b_K(self) -> Float[Tensor, "head_index d_head"]:
        return self._b_K.repeat_interleave(self.cfg.heads_per_kv, dim=0)

    @property
    def b_V(self) -> Float[Tensor, "head_index d_head"]:
        return self._b_V.repeat_interleave(self.cfg.heads_per_kv, dim=0)

    def _per_query_head(
        self, x: Float[Tensor, "batch pos kv_head d_head"]
    ) -> Float[Tensor, "batch pos head_index d_head"]:
        return x.repeat_interleave(self.cfg.heads_per_kv, dim=2)


def make_attention(cfg: KVShiftConfig, generator: torch.Generator | None = None) -> Attention:
    """:class:`GroupedQueryAttention` when ``n_key_value_heads < n_heads``, else
    :class:`Attention`."""
    grouped = cfg.n_key_value_heads != cfg.n_heads
    return (GroupedQueryAttention if grouped else Attention)(cfg, generator)


def _future(n_queries: int, n_keys: int, offset: int,
            device: torch.device) -> Bool[Tensor, "query_pos key_pos"]:
    """True where query i (at absolute position ``offset + i``) would read a later key."""
    return torch.ones(n_queries, n_keys, dtype=torch.bool, device=device).triu(offset + 1)


def _per_head_matmul(
    x: Float[Tensor, "batch head n m"],
    y: Float[Tensor, "batch head m k"],
    add: Float[Tensor, "n k"] | None = None,
) -> Float[Tensor, "batch head n k"]:
    """``x @ y (+ add)`` for every batch element and head, for the explicit attention path.

    q, k and v are strided views (of the fused projection, transposed to head-major), which a
    single batched product must first copy whole. On CPU without autograd (caching, patching),
    one product per batch element copies and multiplies a slice at a time into one output;
    otherwise the batched product. Both multiply the same layouts.
    """
    b, h, n, k = x.shape[0], x.shape[1], x.shape[2], y.shape[3]
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)
    if needs_grad or x.device.type != "cpu":
        x3, y3 = x.reshape(b * h, n, -1), y.reshape(b * h, -1, k)  # [batch * head, ...] copies
        out = torch.bmm(x3, y3) if add is None else torch.baddbmm(add, x3, y3)
        return out.view(b, h, n, k)
    out = torch.empty(b, h, n, k, dtype=x.dtype, device=x.device)
    for i in range(b):
        # Small per-element copies, in the layout the batched path multiplies (same kernel,
        # same bits), reuse memory where full-size copies would need fresh pages.
        xi, yi = x[i].contiguous(), y[i].contiguous()
        if add is None:
            torch.bmm(xi, yi, out=out[i])
        else:
            torch.baddbmm(add, xi, yi, out=out[i])
    return out


def _project(
    x: Float[Tensor, "batch pos d_model"] | Float[Tensor, "batch pos head d_model"],
    W: Float[Tensor, "head d_model d_head"],
    b: Float[Tensor, "head d_head"],
) -> Float[Tensor, "batch pos head d_head"]:
    """One projection, from a shared input or from one input per head."""
    if x.ndim == 4:
        return einops.einsum(
            x, W, "batch pos head d_model, head d_model d_head -> batch pos head d_head") + b
    flat = F.linear(x, W.transpose(1, 2).flatten(0, 1), b.flatten())  # [batch, pos, head d_head]
    return flat.unflatten(-1, (W.shape[0], W.shape[2]))  # [batch, pos, head, d_head]
