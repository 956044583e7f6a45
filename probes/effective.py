"""Source patterns of a shifted head: which *tokens* it reads values from, and which tokens its keys
are built from (DESIGN.md, PAPER.md).

A KV-shifted head attends over positions with ``A = softmax(Q K'^T / sqrt(d_head))``, but
``K'_j = sum_l alpha_l K_{j-l}`` and ``V'_j = sum_l beta_l V_{j-l}`` mix the projections of tokens
``j, j-1, ..., j-w`` (window w; lag 0 first). So ``hook_pattern`` says which *positions* a query
attends to, not which tokens it reads. Two source patterns over tokens, ``[..., head, query_pos,
source_pos]``:

- **Value sources** (:func:`effective_pattern`): ``A_eff[i, s] = sum_l beta_l A[i, s + l]``
  (window 1: ``beta1 * A[i, s] + beta2 * A[i, s + 1]``). Exact: ``pattern @ V' == A_eff @ V``, so
  ``A_eff`` is the weight with which query i reads the value of token s.
- **Key sources** (:func:`effective_key_sources`): the key at j is built from
  ``alpha1 * tok_j + alpha2 * tok_{j-1} + ...``; attributing the attention on j to those tokens in
  proportion ``|alpha_l| / sum_m |alpha_m|`` gives ``K_src[i, s] = sum_l w_l A[i, s + l]``, which says
  which tokens the attended keys *describe* (what the query matched on). This is an attribution,
  not an identity: scores are a softmax of ``Q . K'``, which no per-token split reproduces exactly
  when several lags carry weight. It is exact in the cases the taxonomy cares about (one dominant
  lag, e.g. the ideal one-layer induction head ``alpha = (0, 1)``: the key at j *is* token j-1).

Positions before the start of the sequence contribute nothing: a value that mixes in "position -1"
mixes in zero, so rows of ``A_eff`` sum to ``sum_l beta_l`` minus what fell off the start.

Coefficients come per query head (``[head, lag]``) or per KV head (``[kv_head, lag]`` under
grouped-query attention, repeated to the query heads that share them, query head h using KV head
``h // (n_heads // n_kv_heads)`` as TransformerLens does). ``None`` means unshifted: the source
pattern is the pattern itself.
"""

from __future__ import annotations

from jaxtyping import Float
from torch import Tensor


def _per_query_head(coeffs: Tensor, n_heads: int, what: str) -> Tensor:
    if coeffs.ndim != 2:
        raise ValueError(f"{what} must have shape [head, lag], got {tuple(coeffs.shape)}")
    n = coeffs.shape[0]
    if n == n_heads:
        return coeffs
    if n > 0 and n < n_heads and n_heads % n == 0:  # grouped-query attention: KV heads
        return coeffs.repeat_interleave(n_heads // n, dim=0)
    raise ValueError(f"{what} has {n} heads, pattern has {n_heads}")


def _mix_lags(
    pattern: Float[Tensor, "... head query_pos key_pos"], c: Float[Tensor, "head lag"]
) -> Float[Tensor, "... head query_pos key_pos"]:
    """``out[..., s] = sum_l c[:, l] * pattern[..., s + l]`` (terms past the end are zero)."""
    c = c.to(device=pattern.device, dtype=pattern.dtype)
    out = pattern * c[:, 0, None, None]
    k = pattern.shape[-1]
    for lag in range(1, c.shape[1]):
        if lag >= k:
            break
        out[..., : k - lag] += pattern[..., lag:] * c[:, lag, None, None]
    return out


def effective_pattern(
    pattern: Float[Tensor, "... head query_pos key_pos"],
    value_coeffs: Float[Tensor, "head lag"] | None,
) -> Float[Tensor, "... head query_pos key_pos"]:
    """Weight each query puts on each source *token's value* once the value shift is accounted for:
    ``A_eff[..., h, i, s] = sum_l beta[h, l] * A[..., h, i, s + l]``.

    Args:
        pattern: attention pattern (``hook_pattern``), heads on dim -3.
        value_coeffs: value coefficients per query head, or per KV head under grouped-query
            attention (repeated to the query heads); lag 0 first. None: unshifted (returns a copy
            of ``pattern``).

    Returns:
        The value-source pattern, same shape as ``pattern``.
    """
    if value_coeffs is None:
        return pattern.clone()
    c = _per_query_head(value_coeffs, pattern.shape[-3], "value_coeffs")
    return _mix_lags(pattern, c)


def key_source_weights(key_coeffs: Float[Tensor, "head lag"]) -> Float[Tensor, "head lag"]:
    """``w_l = |alpha_l| / sum_m |alpha_m|`` per head: the share of each lag in the key (uniform
    for a head whose coefficients are all zero, which attends uniformly anyway)."""
    a = key_coeffs.abs().float()
    total = a.sum(-1, keepdim=True)
    uniform = a.new_full(a.shape, 1.0 / a.shape[-1])
    return (a / total.clamp_min(1e-30)).where(total > 0, uniform)


def effective_key_sources(
    pattern: Float[Tensor, "... head query_pos key_pos"],
    key_coeffs: Float[Tensor, "head lag"] | None,
) -> Float[Tensor, "... head query_pos key_pos"]:
    """Which tokens the keys a query attends to are built from:
    ``K_src[..., h, i, s] = sum_l w[h, l] * A[..., h, i, s + l]`` with
    ``w = key_source_weights(alpha)`` (see the module docstring: an attribution, exact when one lag
    carries the key).

    Args:
        pattern: attention pattern (``hook_pattern``), heads on dim -3.
        key_coeffs: key coefficients per query head or per KV head, lag 0 first; None: unshifted.

    Returns:
        The key-source pattern, same shape as ``pattern``; each row sums to the row's attention
        minus the share that fell off the start of the sequence.
    """
    if key_coeffs is None:
        return pattern.clone()
    c = _per_query_head(key_coeffs, pattern.shape[-3], "key_coeffs")
    return _mix_lags(pattern, key_source_weights(c))


__all__ = ["effective_key_sources", "effective_pattern", "key_source_weights"]
