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
