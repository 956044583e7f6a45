"""kvshift_lens: mechanistic interpretability for KV shifting attention (Xu et al. 2024).

Axis vocabulary: the one set of names used in every shape annotation, shape comment and einops
pattern of the package (TransformerLens' words where TransformerLens has one):

- ``batch``: sequences in a batch
- ``pos``: positions of this call (the residual stream's position axis); in attention,
  ``query_pos`` for the reading positions and ``key_pos`` for the positions read (with a
  decoding cache, every position so far)
- ``head_index``: query heads (``n_heads``); ``kv_head``: key/value heads
  (``n_key_value_heads``, equal to ``n_heads`` unless grouped-query attention); ``head``: either,
  where one function serves both (the shift runs over Q's ``head_index`` or K's ``kv_head``)
- ``lag``: shift coefficients per head, ``shift_window + 1`` (lag 0 = the position itself)
- ``layer``; sizes ``d_model``, ``d_head``, ``d_mlp``, ``d_vocab``

Importing the package changes no global state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvshift_lens._lazy import lazy_exports

__version__ = "0.1.0"

# Public names and the module each lives in. They are imported on first use, so that
# ``import kvshift_lens`` (and the ``kvshift`` command line's --help) does not pay for torch and
# TransformerLens until something needs them.
_EXPORTS = {
    "CheckpointError": "kvshift_lens.checkpoint",
    "HookedKVShiftTransformer": "kvshift_lens.model",
    "KVShiftCache": "kvshift_lens.model",
    "KVShiftConfig": "kvshift_lens.config",
    "ShiftCoefficients": "kvshift_lens.model",
    "byte_level_tokenizer": "kvshift_lens.tokenizer",
    "shift": "kvshift_lens.shift",
}

__all__ = [
    "CheckpointError",
    "HookedKVShiftTransformer",
    "KVShiftCache",
    "KVShiftConfig",
    "ShiftCoefficients",
    "byte_level_tokenizer",
    "shift",
]

if TYPE_CHECKING:  # pragma: no cover
    from kvshift_lens.checkpoint import CheckpointError
    from kvshift_lens.config import KVShiftConfig
    from kvshift_lens.model import HookedKVShiftTransformer, KVShiftCache, ShiftCoefficients
    from kvshift_lens.shift import shift
    from kvshift_lens.tokenizer import byte_level_tokenizer


__getattr__, __dir__ = lazy_exports('kvshift_lens', _EXPORTS, globals())
