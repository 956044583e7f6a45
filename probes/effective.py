"""The effective source pattern of a value-shifted head (DESIGN.md, PAPER.md).

A shifted head's value at position j is ``V'_j = sum_l beta_l V_{j-l}``, so the weight with which
query i reads *token* s is ``A_eff[i, s] = sum_l beta_l A[i, s + l]`` (window 1:
``beta1 * A[i, s] + beta2 * A[i, s + 1]``). Positions past the end contribute nothing.
"""

from __future__ import annotations

from jaxtyping import Float
from torch import Tensor


def effective_pattern(
    pattern: Float[Tensor, "... head query_pos key_pos"],
    value_coeffs: Float[Tensor, "head lag"],
) -> Float[Tensor, "... head query_pos key_pos"]:
    """Weight each query puts on each source *token* once the value shift is accounted for.

    Args:
        pattern: attention pattern (``hook_pattern``), heads on dim -3.
        value_coeffs: per-head value coefficients (query heads: repeat KV-head coefficients for
            grouped-query attention), lag 0 first.
    """
    if value_coeffs.shape[0] != pattern.shape[-3]:
        raise ValueError(
            f"value_coeffs has {value_coeffs.shape[0]} heads, pattern has {pattern.shape[-3]}"
        )
    c = value_coeffs.to(pattern.dtype)
    out = pattern * c[:, 0, None, None]
    k = pattern.shape[-1]
    for lag in range(1, c.shape[1]):
        if lag >= k:
            break
        out[..., : k - lag] += pattern[..., lag:] * c[:, lag, None, None]
    return out


__all__ = ["effective_pattern"]
