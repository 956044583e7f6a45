"""kvshift_lens: mechanistic interpretability for KV shifting attention (Xu et al. 2024).

Axis vocabulary, used in every shape annotation and einops pattern:

- ``batch``: sequences in a batch
- ``pos``: positions of this call; ``query_pos`` / ``key_pos`` in attention patterns
- ``head`` (``head_index``): query heads, ``n_heads``; ``kv_head``: key/value heads,
  ``n_key_value_heads`` (equal unless grouped-query attention)
- ``lag``: shift coefficients per head, ``shift_window + 1`` (lag 0 = the position itself)
- ``layer``, ``d_model``, ``d_head``, ``d_mlp``, ``d_vocab``

Importing the package changes no global state.
"""

from kvshift_lens.checkpoint import CheckpointError
from kvshift_lens.config import KVShiftConfig
from kvshift_lens.model import HookedKVShiftTransformer, KVShiftCache, ShiftCoefficients
from kvshift_lens.shift import shift
from kvshift_lens.tokenizer import byte_level_tokenizer

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "HookedKVShiftTransformer",
    "KVShiftCache",
    "KVShiftConfig",
    "ShiftCoefficients",
    "byte_level_tokenizer",
    "shift",
]
