"""What one attention layer keeps between incremental-decoding steps (DESIGN.md: the cache of
K'/V' plus the previous positions' raw K/V, which the next position's shift mixes in)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor


@dataclass
class LayerKVCache:
    """One layer's decoding state.

    Attributes:
        k, v: the keys and values attention consumed (shifted, and rotated for keys) at every
            position so far, ``[batch, key_pos, kv_head, d_head]``; None before the first call.
        tails: for each shifted projection ("q", "k", "v"), its last ``shift_window`` *raw*
            (unshifted) positions ``[batch, shift_window, head_index | kv_head, d_head]``: the
            past that the next call's first positions mix in.
    """

    k: Tensor | None = None
    v: Tensor | None = None
    tails: dict[str, Tensor] = field(default_factory=dict)

    @property
    def length(self) -> int:
        """Positions cached so far (the next call's first position)."""
        return 0 if self.k is None else self.k.shape[1]

    def extend(
        self,
        k: Float[Tensor, "batch pos kv_head d_head"],
        v: Float[Tensor, "batch pos kv_head d_head"],
    ) -> tuple[Float[Tensor, "batch key_pos kv_head d_head"],
               Float[Tensor, "batch key_pos kv_head d_head"]]:
        """Append this call's K' and V'; return them for every position so far."""
        if self.k is not None:
            k = torch.cat([self.k, k], dim=1)  # [batch, key_pos, kv_head, d_head]
            v = torch.cat([self.v, v], dim=1)
        self.k, self.v = k, v
        return k, v

    def remember_tail(
        self,
        which: str,
        x: Float[Tensor, "batch pos head d_head"],
        past: Float[Tensor, "batch past head d_head"] | None,
        window: int,
    ) -> None:
        """Keep the last ``window`` raw positions of ``past`` followed by ``x``."""
        full = x if past is None else torch.cat([past, x], dim=1)  # [batch, past + pos, ...]
        self.tails[which] = full[:, -window:]
