"""Circuit maths that stays true under the KV shift: per-lag QK and OV circuits, full circuits, an
exact decomposition of attention scores, and composition scores that include the shift path.

A shifted head mixes the keys and values of earlier positions into its own (PAPER.md; lag 0 first,
positions before the start count as zero)::

    K'_j = sum_l a_l K_{j-l}        V'_j = sum_l b_l V_{j-l}

With ``x_t`` what the head reads at position t (ln1's output), ``K_t = x_t W_K + b_K``,
``Q_i = x_i W_Q + b_Q`` and ``scale = 1 / sqrt(d_head)``, the score and the head's output are::

    score(i, j) = scale * sum_l a_l (x_i W_Q + b_Q) . (x_{j-l} W_K + b_K)          [j - l >= 0]
                = scale * sum_l ( x_i QK_l x_{j-l}^T + x_i q_l + k_l . x_{j-l} + c_l )
    result_i    = sum_j A[i, j] sum_l ( x_{j-l} OV_l + o_l )                           [j - l >= 0]

    QK_l = a_l W_Q W_K^T    q_l = a_l W_Q b_K    k_l = a_l W_K b_Q    c_l = a_l b_Q . b_K
    OV_l = b_l W_V W_O      o_l = b_l b_V W_O

So the QK circuit of a shifted head is one matrix *per lag*, each reading the key side ``l``
positions back, and the OV circuit likewise. The plain circuits (TransformerLens' ``model.QK`` /
``model.OV``, ARENA's ``W_E W_OV W_U`` and ``W_E W_QK W_E^T``, composition scores) are the lag-0
term with ``a_0 = b_0 = 1``: exact for a vanilla head, and for a shifted head an answer to another
question. A one-layer induction head made by the shift (``a = (0, 1)``) has a plain ``W_E W_QK
W_E^T`` whose diagonal says "duplicate-token head", while its lag-1 circuit says "attends to the
token after an earlier copy of me", which is what it does.

- :func:`lagged_qk_circuit` / :func:`lagged_ov_circuit`: ``FactoredMatrix [lag, d_model,
  d_model]`` plus the bias terms, with ``scores`` / ``result`` methods that rebuild the model's
  ``hook_attn_scores`` / the head's output from them (rotary positions are not part of a weight-
  space QK circuit: the scores are then the model's only without rotary).
- :func:`full_qk_circuit` / :func:`full_ov_circuit`: ``W_E QK_l W_E^T`` and ``W_E OV_l W_U``
  ``[lag, d_vocab, d_vocab]``.
- :func:`decompose_attn_scores`: ``hook_attn_scores`` of one head split into query-side component
  x key-side component x lag terms (embedding, positions, each earlier head, attention biases, MLPs,
  the Q/K biases), which sum to the model's scores exactly, rotary and query shifts included.
- :func:`lagged_composition_scores`: Q/K/V composition per lag of the earlier head's values and of
  the later head's shifted projection.

Norms: the weight-space circuits read ln1's output, as TransformerLens' do; fold norms first
(``model.fold_layer_norm_()``) so that they read the residual stream up to the per-position scale.
The decomposition needs no fold: it divides every component by the cached ``ln1.hook_scale``
(centring it for LayerNorm), multiplies by ln1's weight and counts ln1's bias with the Q/K biases.

Models are read through TransformerLens names (``blocks[l].attn.W_Q`` ... ``b_O``, ``W_E``,
``W_pos``, ``W_U``), hooks, ``cfg`` and ``model.shift_coefficients()``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from transformer_lens.FactoredMatrix import FactoredMatrix

from probes._hooks import head_coefficients, model_dims, prepare_tokens, require_hooks
from probes.composition import _check_mode, all_composition_scores

# ------------------------------------------------------------------ reading the model


def _check_head(model: Any, layer: int, head: int) -> None:
    n_layers, n_heads = model_dims(model)
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer={layer} is out of range: the model has {n_layers} layers")
    if not 0 <= head < n_heads:
        raise ValueError(f"head={head} is out of range: the model has {n_heads} heads per layer")


def _coefficients(model: Any, which: str, layer: int) -> Float[Tensor, "head lag"] | None:
    """Layer ``layer``'s coefficients of projection ``which`` per *query* head, in the model's
    dtype (KV-head coefficients repeated under grouped-query attention); None when unshifted."""
    c = head_coefficients(model, which, keep_precision=True)
    return None if c is None else c[layer]


def _head_coefficients(model: Any, which: str, layer: int, head: int, like: Tensor) -> Tensor:
    """``[lag]`` coefficients of one head (``[1.]`` when unshifted), dtype/device of ``like``."""
    c = _coefficients(model, which, layer)
    c = torch.ones(1) if c is None else c[head]
    return c.to(device=like.device, dtype=like.dtype)


def _shifts_queries(model: Any, layer: int) -> bool:
    c = _coefficients(model, "q", layer)
    if c is None:
        return False
    identity = torch.zeros_like(c)
    identity[:, 0] = 1
    return not torch.equal(c, identity)


def _rotary(model: Any) -> bool:
    return getattr(model.cfg, "positional_embedding_type", "standard") == "rotary"


def _scale(model: Any) -> float:
    return 1.0 / math.sqrt(model.cfg.d_head)


def _lag_shift(x: Tensor, coeffs: Tensor, dim: int) -> Tensor:
    """``out[t] = sum_l coeffs[l] * x[t - l]`` along ``dim`` (terms before the start are 0)."""
    x = x.movedim(dim, -1)
    out = x * coeffs[0]
    n = x.shape[-1]
    for lag in range(1, min(coeffs.shape[0], n)):
        out[..., lag:] += coeffs[lag] * x[..., : n - lag]
    return out.movedim(-1, dim)


def _lagged(x: Tensor, coeffs: Tensor, dim: int) -> Tensor:
    """``out[l, ..., t] = coeffs[l] * x[..., t - l]`` along ``dim`` of x: a new leading lag axis."""
    x = x.movedim(dim, -1)
    n = x.shape[-1]
    out = x.new_zeros(coeffs.shape[0], *x.shape)
    for lag in range(min(coeffs.shape[0], n)):
        out[lag, ..., lag:] = coeffs[lag] * x[..., : n - lag]
    d = dim if dim < 0 else dim + 1
    return out.movedim(-1, d)


def _rotate(x: Float[Tensor, "... pos d_head"], model: Any) -> Float[Tensor, "... pos d_head"]:
    """Rotary embedding of position t (GPT-NeoX / Llama "rotate half", on the first
    ``cfg.rotary_dim`` dimensions, base ``cfg.rotary_base``) applied to ``x[..., t, :]``."""
    cfg = model.cfg
    if getattr(cfg, "rotary_adjacent_pairs", False):
        raise ValueError("rotary_adjacent_pairs=True (GPT-J style rotary) is not supported; "
                         "the decomposition implements rotate-half rotary")
    dim, base = cfg.rotary_dim, getattr(cfg, "rotary_base", 10000)
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    pos = torch.arange(x.shape[-2], dtype=torch.float64)
    freqs = torch.outer(pos, inv_freq)  # [pos, dim / 2]
    emb = torch.cat([freqs, freqs], dim=-1).to(x.device)  # [pos, dim]
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    rot, rest = x[..., :dim], x[..., dim:]
    half = dim // 2
    out = rot * cos + torch.cat([-rot[..., half:], rot[..., :half]], dim=-1) * sin
    return torch.cat([out, rest], dim=-1)


def _causal(n: int, device: torch.device) -> Bool[Tensor, "query_pos key_pos"]:
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


# ------------------------------------------------------------------ per-lag circuits


@dataclass(frozen=True)
class LaggedQK:
    """The QK circuit of one head, one term per key lag (module docstring)::

        score(i, j) = scale * sum_l [j-l >= 0] ( x_i QK[l] x_{j-l}^T + x_i . query_term[l]
                                                 + key_term[l] . x_{j-l} + constant[l] )

    Attributes:
        layer, head: the head.
        coefficients: ``[lag]`` its key coefficients ``a_l`` (``[1.]`` when keys are unshifted).
        QK: ``FactoredMatrix [lag, d_model, d_model]``, ``a_l W_Q W_K^T`` (unscaled, as
            TransformerLens' ``model.QK``); ``QK[0]`` with ``a_0 = 1`` is the plain circuit.
        query_term: ``[lag, d_model]`` ``a_l W_Q b_K``: what the query side reads of the key bias.
        key_term: ``[lag, d_model]`` ``a_l W_K b_Q``: what the key side reads of the query bias.
        constant: ``[lag]`` ``a_l b_Q . b_K``.
        scale: ``1 / sqrt(d_head)``.
        rotary: whether the model rotates queries and keys, which the weights above leave out.
    """

    layer: int
    head: int
    coefficients: Float[Tensor, " lag"]
    QK: FactoredMatrix
    query_term: Float[Tensor, "lag d_model"]
    key_term: Float[Tensor, "lag d_model"]
    constant: Float[Tensor, " lag"]
    scale: float
    rotary: bool

    def scores(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch query_pos key_pos"]:
        """The head's attention scores rebuilt from these terms, ``-inf`` above the diagonal.

        Args:
            x: what the head's queries and keys read: ``blocks.{layer}.ln1.hook_normalized`` (the
                residual stream for a model without norms; plus the positional embedding for
                shortformer positions).

        Returns:
            ``[batch, query_pos, key_pos]``: the model's ``hook_attn_scores`` for this head,
            exactly, unless the model uses rotary positions (see ``rotary``).
        """
        A, B = self.QK.A[:, None], self.QK.B[:, None]  # [lag, 1, d_model, d_head], [lag, 1, d_head, d_model]
        q = x[None] @ A  # [lag, batch, pos, d_head]
        k = x[None] @ B.transpose(-2, -1)  # [lag, batch, pos, d_head]
        t = q @ k.transpose(-2, -1)  # [lag, batch, query_pos, source_pos]
        t = t + (x[None] @ self.query_term[:, None, :, None])  # [lag, batch, pos, 1]
        t = t + (x[None] @ self.key_term[:, None, :, None]).transpose(-2, -1)
        t = t + self.constant[:, None, None, None]
        n = x.shape[1]
        out = torch.zeros_like(t[0])
        for lag in range(min(t.shape[0], n)):
            # key j reads source j - lag: out[..., j] += t[lag, ..., j - lag]
            out[..., lag:] += t[lag, ..., : n - lag]
        out = out * self.scale
        return out.masked_fill(~_causal(n, x.device), float("-inf"))


@dataclass(frozen=True)
class LaggedOV:
    """The OV circuit of one head, one term per value lag (module docstring)::

        result_i = sum_j A[i, j] sum_l [j-l >= 0] ( x_{j-l} OV[l] + bias[l] )

    Attributes:
        layer, head: the head.
        coefficients: ``[lag]`` its value coefficients ``b_l`` (``[1.]`` when values are unshifted).
        OV: ``FactoredMatrix [lag, d_model, d_model]``, ``b_l W_V W_O``; ``OV[l]`` maps what the
            head reads at position ``j - l`` to what it writes when it attends to ``j``.
        bias: ``[lag, d_model]`` ``b_l b_V W_O``.
    """

    layer: int
    head: int
    coefficients: Float[Tensor, " lag"]
    OV: FactoredMatrix
    bias: Float[Tensor, "lag d_model"]

    def result(
        self,
        pattern: Float[Tensor, "batch query_pos key_pos"],
        x: Float[Tensor, "batch pos d_model"],
    ) -> Float[Tensor, "batch pos d_model"]:
        """The head's output (its ``hook_result``, ``z @ W_O``) rebuilt from these terms.

        Args:
            pattern: the head's attention pattern (``hook_pattern[:, head]``).
            x: what its values read (``blocks.{layer}.ln1.hook_normalized``).
        """
        v = x[None] @ self.OV.A[:, None] @ self.OV.B[:, None]  # [lag, batch, pos, d_model]
        v = v + self.bias[:, None, None, :]
        n = x.shape[1]
        mixed = torch.zeros_like(v[0])
        for lag in range(min(v.shape[0], n)):
            mixed[:, lag:] += v[lag, :, : n - lag]
        return pattern @ mixed


def lagged_qk_circuit(model: Any, layer: int, head: int) -> LaggedQK:
    """The QK circuit of head ``(layer, head)`` per key lag (:class:`LaggedQK`).

    Warns for rotary positions (the weight-space circuit leaves the rotation out, as
    TransformerLens' ``model.QK`` does).

    Raises:
        ValueError: for a bad layer or head, or a model that shifts queries (scores then mix query
            lags too; :func:`decompose_attn_scores` handles that).
    """
    _check_head(model, layer, head)
    if _shifts_queries(model, layer):
        raise ValueError(
            f"layer {layer} shifts its queries (shift_q): a per-key-lag QK circuit does not "
            "describe its scores; use probes.circuits.decompose_attn_scores, which does")
    rotary = _rotary(model)
    if rotary:
        warnings.warn("rotary positions: the per-lag QK circuit leaves out the position-dependent "
                      "rotation between query and key", stacklevel=2)
    attn = model.blocks[layer].attn
    W_Q, W_K = attn.W_Q[head].detach(), attn.W_K[head].detach()  # [d_model, d_head]
    b_Q, b_K = attn.b_Q[head].detach(), attn.b_K[head].detach()  # [d_head]
    a = _head_coefficients(model, "k", layer, head, W_Q)
    QK = FactoredMatrix(a[:, None, None] * W_Q, W_K.T)  # [lag, d_model, d_model]
    return LaggedQK(
        layer=layer, head=head, coefficients=a, QK=QK,
        query_term=a[:, None] * (W_Q @ b_K)[None],
        key_term=a[:, None] * (W_K @ b_Q)[None],
        constant=a * (b_Q @ b_K),
        scale=_scale(model), rotary=rotary,
    )


def lagged_ov_circuit(model: Any, layer: int, head: int) -> LaggedOV:
    """The OV circuit of head ``(layer, head)`` per value lag (:class:`LaggedOV`)."""
    _check_head(model, layer, head)
    attn = model.blocks[layer].attn
    W_V, W_O = attn.W_V[head].detach(), attn.W_O[head].detach()  # [d_model, d_head], [d_head, d_model]
    b_V = attn.b_V[head].detach()
    b = _head_coefficients(model, "v", layer, head, W_V)
    return LaggedOV(layer=layer, head=head, coefficients=b,
                    OV=FactoredMatrix(b[:, None, None] * W_V, W_O),
                    bias=b[:, None] * (b_V @ W_O)[None])


def full_qk_circuit(model: Any, layer: int, head: int) -> FactoredMatrix:
    """``W_E QK_l W_E^T``: ``FactoredMatrix [lag, d_vocab (query token), d_vocab (source token)]``.

    Entry ``[l, t, s]`` is the (unscaled) score a query on token t gives key position j through
    lag l when the token at ``j - l`` is s. Like the plain full QK circuit (``W_E W_Q W_K^T
    W_E^T``, which is lag 0 with ``a_0 = 1``) it leaves out positions, biases and norm scales:
    meaningful for a layer-0 head of a norm-folded model. For a shifted induction head the
    signal sits on the diagonal of lag 1, not lag 0.
    """
    qk = lagged_qk_circuit(model, layer, head).QK
    W_E = model.W_E.detach()  # [d_vocab, d_model]
    return W_E @ qk @ W_E.T


def full_ov_circuit(model: Any, layer: int, head: int) -> FactoredMatrix:
    """``W_E OV_l W_U``: ``FactoredMatrix [lag, d_vocab (source token), d_vocab (logit)]``.

    Entry ``[l, s, t]`` is how much the head raises logit t per unit of attention on a position
    j whose token ``l`` steps back is s (the direct path, ignoring norm scales and biases; the
    plain ``W_E W_OV W_U`` is lag 0 with ``b_0 = 1``). A copying head shows its diagonal at the
    lags its value coefficients weight.
    """
    ov = lagged_ov_circuit(model, layer, head).OV
    return model.W_E.detach() @ ov @ model.W_U.detach()


# ------------------------------------------------------------------ score decomposition


@dataclass(frozen=True)
class ScoreDecomposition:
    """One head's attention scores split into query-component x key-component x key-lag terms.

    ``terms[c, d, l, b, i, j]`` is the part of ``score(i, j)`` that the query side gets from
    component c at position i (after the query shift, if any) and the key side from component d
    at position ``j - l`` through key lag l. Components (``labels``): ``embed``, ``pos_embed``
    (learned positions; for shortformer positions, the ones added after ln1), ``L{l}H{h}`` (each
    earlier head's output), ``{l}_attn_bias`` (each earlier layer's ``b_O``), ``{l}_mlp_out``, and
    ``qk_bias`` (``b_Q`` / ``b_K`` plus ln1's bias read through W_Q / W_K).

    Attributes:
        layer, head: the head.
        labels: component names, the same on both sides.
        terms: ``[q_component, k_component, lag, batch, query_pos, key_pos]``, 0 above the
            diagonal (masked) and where ``j - l < 0``.
        scores: the model's ``hook_attn_scores[:, head]``, ``[batch, query_pos, key_pos]``.
    """

    layer: int
    head: int
    labels: list[str]
    terms: Float[Tensor, "q_component k_component lag batch query_pos key_pos"]
    scores: Float[Tensor, "batch query_pos key_pos"]

    @property
    def mask(self) -> Bool[Tensor, "query_pos key_pos"]:
        """True where a query may attend (``key_pos <= query_pos``)."""
        return _causal(self.terms.shape[-1], self.terms.device)

    def total(self) -> Float[Tensor, "batch query_pos key_pos"]:
        """The sum of all terms, ``-inf`` above the diagonal: equals ``scores``."""
        return self.terms.sum((0, 1, 2)).masked_fill(~self.mask, float("-inf"))

    def by_lag(self) -> Float[Tensor, "lag batch query_pos key_pos"]:
        """Terms summed over components: what each key lag contributes."""
        return self.terms.sum((0, 1))

    def magnitude(self) -> Float[Tensor, "q_component k_component lag"]:
        """Root mean square of each term over the unmasked (batch, query, key) entries: which
        component pairs and lags move the scores (ARENA plots the standard deviation)."""
        m = self.mask
        vals = self.terms[..., m]  # [q_component, k_component, lag, batch, n_unmasked]
        return vals.pow(2).mean((-2, -1)).sqrt()

    def index(self, label: str) -> int:
        if label not in self.labels:
            raise KeyError(f"no component {label!r}; components: {self.labels}")
        return self.labels.index(label)


def _residual_components(
    model: Any, cache: Any, layer: int
) -> tuple[list[str], list[Tensor]]:
    """The terms of ``blocks.{layer}.hook_resid_pre``: embed, positions, heads, biases, MLPs."""
    cfg = model.cfg
    labels, parts = ["embed"], [cache["hook_embed"]]
    if cfg.positional_embedding_type == "standard":
        labels.append("pos_embed")
        parts.append(cache["hook_pos_embed"])
    for l in range(layer):
        attn = model.blocks[l].attn
        z = cache[f"blocks.{l}.attn.hook_z"]  # [batch, pos, head, d_head]
        result = torch.einsum("bphd,hdm->hbpm", z, attn.W_O.detach())  # [head, batch, pos, d_model]
        labels += [f"L{l}H{h}" for h in range(cfg.n_heads)]
        parts += list(result)
        labels.append(f"{l}_attn_bias")
        parts.append(attn.b_O.detach().expand_as(parts[0]))
        if not cfg.attn_only:
            labels.append(f"{l}_mlp_out")
            parts.append(cache[f"blocks.{l}.hook_mlp_out"])
    return labels, parts


def _tolerance(t: Tensor) -> float:
    return math.sqrt(torch.finfo(t.dtype).eps) * max(1.0, float(t.abs().max()))


@torch.no_grad()
def decompose_attn_scores(model: Any, tokens: Tensor, layer: int, head: int) -> ScoreDecomposition:
    """Split head ``(layer, head)``'s attention scores on ``tokens`` into per-component, per-lag
    terms that sum to the model's ``hook_attn_scores`` (:class:`ScoreDecomposition`).

    Unlike a decomposition against the raw keys (``hook_k``), whose terms sum to ``Q . K`` rather
    than to the scores a shifted head computes (``Q . K'``), every term here goes through the
    key shift (one term per lag), the query shift if there is one, rotary positions (before or
    after the shift, as ``cfg.shift_position`` says) and ln1 (from its cached ``hook_scale``).

    Memory: ``terms`` holds ``n_components^2 * n_lags * batch * pos^2`` numbers (n_components =
    2 + layer * (n_heads + 2) + 1 or so); decompose a few sequences at a time.

    Args:
        model: a TransformerLens-style model with HookedTransformer's hooks.
        tokens: ``[batch, pos]`` (or ``[pos]``) token ids.
        layer, head: the head.

    Returns:
        The decomposition, with the model's own scores in ``.scores``.

    Raises:
        ValueError: bad layer / head / tokens, missing hooks, or a residual stream or score that
            the components do not add up to (a component this function does not know about).
    """
    _check_head(model, layer, head)
    cfg = model.cfg
    tokens = prepare_tokens(model, tokens)
    norm = cfg.normalization_type
    names = ["hook_embed", f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.attn.hook_attn_scores"]
    if cfg.positional_embedding_type in ("standard", "shortformer"):
        names.append("hook_pos_embed")
    if norm is not None:
        names.append(f"blocks.{layer}.ln1.hook_scale")
    for l in range(layer):
        names.append(f"blocks.{l}.attn.hook_z")
        if not cfg.attn_only:
            names.append(f"blocks.{l}.hook_mlp_out")
    require_hooks(model, names)
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)

    labels, parts = _residual_components(model, cache, layer)
    resid = torch.stack(parts)  # [component, batch, pos, d_model]
    expected = cache[f"blocks.{layer}.hook_resid_pre"]
    err = float((resid.sum(0) - expected).abs().max())
    if err > _tolerance(expected):
        raise ValueError(
            f"blocks.{layer}.hook_resid_pre is not the sum of {labels} (max error {err:.3g}): the "
            "model's residual stream has a component this decomposition does not know about")

    ln1 = model.blocks[layer].ln1
    if norm is not None:
        if norm in ("LN", "LNPre"):
            resid = resid - resid.mean(-1, keepdim=True)
        resid = resid / cache[f"blocks.{layer}.ln1.hook_scale"][None]
        w = getattr(ln1, "w", None)
        if w is not None:
            resid = resid * w.detach()
    attn = model.blocks[layer].attn
    W_Q, W_K = attn.W_Q[head].detach(), attn.W_K[head].detach()  # [d_model, d_head]
    q = resid @ W_Q  # [component, batch, pos, d_head]
    k = resid @ W_K
    if cfg.positional_embedding_type == "shortformer":
        pos = cache["hook_pos_embed"]  # added after ln1, read by W_Q and W_K
        labels.append("pos_embed")
        q = torch.cat([q, (pos @ W_Q)[None]])
        k = torch.cat([k, (pos @ W_K)[None]])
    ln_b = getattr(ln1, "b", None)
    b_Q, b_K = attn.b_Q[head].detach(), attn.b_K[head].detach()
    if ln_b is not None:
        b_Q, b_K = b_Q + ln_b.detach() @ W_Q, b_K + ln_b.detach() @ W_K
    labels.append("qk_bias")
    q = torch.cat([q, b_Q.expand_as(q[0])[None]])
    k = torch.cat([k, b_K.expand_as(k[0])[None]])

    rotary, post = _rotary(model), getattr(cfg, "shift_position", "pre_rotary") == "post_rotary"
    if rotary and post:
        q, k = _rotate(q, model), _rotate(k, model)
    if _coefficients(model, "q", layer) is not None:
        q = _lag_shift(q, _head_coefficients(model, "q", layer, head, q), dim=-2)
    k = _lagged(k, _head_coefficients(model, "k", layer, head, k), dim=-2)  # [lag, comp, b, pos, d]
    if rotary and not post:
        q, k = _rotate(q, model), _rotate(k, model)

    terms = torch.einsum("cbid,lebjd->celbij", q, k) * _scale(model)
    n = tokens.shape[1]
    terms = terms.masked_fill(~_causal(n, terms.device), 0.0)
    scores = cache[f"blocks.{layer}.attn.hook_attn_scores"][:, head]
    out = ScoreDecomposition(layer=layer, head=head, labels=labels, terms=terms, scores=scores)
    mask = out.mask
    err = float((out.total() - scores)[:, mask].abs().max())
    if err > _tolerance(scores[:, mask]):
        raise ValueError(
            f"the decomposed scores of L{layer}H{head} miss the model's hook_attn_scores by {err:.3g}:"
            " the model computes scores in a way this decomposition does not know about")
    return out


# ------------------------------------------------------------------ composition


@dataclass(frozen=True)
class LaggedComposition:
    """Composition scores split by the lags of the shift.

    ``scores[l1, h1, l2, h2, s, l]``: how much the later head ``(l2, h2)``'s shifted projection at
    lag ``l`` (keys for K-, values for V-, queries for Q-composition) reads what the earlier head
    ``(l1, h1)`` writes through its value lag ``s``::

        ||OV_s(h1) M_l(h2)||_F / (sum_s' ||OV_s'(h1)||_F * sum_l' ||M_l'(h2)||_F)
          = plain[l1, h1, l2, h2] * |b_s(h1)| / sum|b(h1)| * |c_l(h2)| / sum|c(h2)|

    with ``OV_s = b_s W_V W_O`` and ``M_l`` the per-lag ``W_QK^T`` / ``W_QK`` / ``W_OV`` of h2
    weighted by its coefficient ``c_l``. They sum, over both lag axes, to the plain score
    (``plain``). What the plain score cannot say is *where* the later head reads: K-composition
    at ``l = 1`` means that h2's key at j reads what h1 wrote at ``j - 1`` (the key's previous-
    position term); with value lag s, what h1 wrote there came from s positions before the
    position h1 attended to. So for an h1 attending to its own position, h2's key at j describes
    position ``j - (s + l)``: :meth:`by_offset` sums the scores by ``offset = s + l``.
    """

    mode: str
    scores: Float[Tensor, "layer1 head1 layer2 head2 source_lag lag"]

    @property
    def plain(self) -> Float[Tensor, "layer1 head1 layer2 head2"]:
        """Summed over both lag axes: the plain (lag-blind) composition score."""
        return self.scores.sum((-2, -1))

    def by_lag(self) -> Float[Tensor, "layer1 head1 layer2 head2 lag"]:
        """Summed over the earlier head's value lags: per lag of the later head."""
        return self.scores.sum(-2)

    def by_offset(self) -> Float[Tensor, "layer1 head1 layer2 head2 offset"]:
        """Summed over ``source_lag + lag = offset``."""
        n_s, n_l = self.scores.shape[-2:]
        out = self.scores.new_zeros(*self.scores.shape[:-2], n_s + n_l - 1)
        for s in range(n_s):
            out[..., s : s + n_l] += self.scores[..., s, :]
        return out


def _lag_weights(model: Any, which: str, n_layers: int, n_heads: int) -> Tensor:
    """``|c_l| / sum_m |c_m|`` per layer and head, ``[layer, head, lag]`` (``[..., 1]`` of ones
    when unshifted; zeros for a head whose coefficients are all zero: it reads nothing)."""
    per_layer = [_coefficients(model, which, layer) for layer in range(n_layers)]
    if per_layer[0] is None:
        return torch.ones(n_layers, n_heads, 1)
    a = torch.stack(per_layer).abs().double().cpu()
    total = a.sum(-1, keepdim=True)
    return (a / total.clamp_min(1e-300)).where(total > 0, torch.zeros_like(a))


def lagged_composition_scores(model: Any, mode: str = "K") -> LaggedComposition:
    """Composition scores that include the shift path: :func:`probes.composition.all_composition_scores`
    split by the earlier head's value lag and the later head's lag on the composing projection
    (:class:`LaggedComposition`).

    Args:
        model: a model with stacked ``W_Q``, ``W_K``, ``W_V``, ``W_O`` and at least 2 layers.
        mode: "Q", "K" or "V".
    """
    _check_mode(mode)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="weight-based composition scores ignore")
        plain = all_composition_scores(model, mode).detach().double().cpu()
    n_layers, n_heads = plain.shape[:2]
    src = _lag_weights(model, "v", n_layers, n_heads)  # [layer, head, source_lag]
    dst = _lag_weights(model, {"Q": "q", "K": "k", "V": "v"}[mode], n_layers, n_heads)
    scores = (plain[..., None, None] * src[:, :, None, None, :, None]
              * dst[None, None, :, :, None, :])  # [l1, h1, l2, h2, source_lag, lag]
    return LaggedComposition(mode=mode, scores=scores.to(torch.float32))


__all__ = [
    "LaggedComposition",
    "LaggedOV",
    "LaggedQK",
    "ScoreDecomposition",
    "decompose_attn_scores",
    "full_ov_circuit",
    "full_qk_circuit",
    "lagged_composition_scores",
    "lagged_ov_circuit",
    "lagged_qk_circuit",
]
