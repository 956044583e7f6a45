"""The model config: a ``TransformerLensConfig`` with the KV-shift options, validated when built.

Every field has a default except the four sizes TransformerLens requires (``d_model``, ``d_head``,
``n_layers``, ``n_ctx``) and ``d_vocab``, which a model on integer tokens must state. Validation runs
in ``__post_init__`` and raises ``ValueError`` / ``TypeError`` naming the field, the bad value and
what was expected, so a bad config never reaches a forward pass.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from transformer_lens.config import TransformerLensConfig

from kvshift_lens.options import (  # noqa: F401 - the choices, re-exported
    ActFn,
    AttentionDir,
    NormalizationType,
    PositionalEmbeddingType,
    ShiftInit,
    ShiftParam,
    ShiftPosition,
    check_choice,
    check_field_types,
)

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def _dtype_name(dtype: torch.dtype) -> str:
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"dtype {dtype} is not supported; expected one of {sorted(_DTYPES)}")


@dataclass
class KVShiftConfig(TransformerLensConfig):
    """Configuration of a :class:`~kvshift_lens.HookedKVShiftTransformer`.

    Sizes (TransformerLens names): ``d_model``, ``d_head``, ``n_layers``, ``n_ctx``, ``n_heads``
    (derived from ``d_model // d_head`` when left at -1), ``d_mlp`` (default ``4 * d_model``),
    ``d_vocab`` (required), ``n_key_value_heads`` (grouped-query attention; ``None`` = ``n_heads``).

    Architecture: ``positional_embedding_type`` standard | rotary | shortformer | none;
    ``normalization_type`` "LN" | "RMS" | None (and "LNPre" / "RMSPre": normalisation without
    weights, as after folding); ``act_fn`` gelu | gelu_new | relu | silu with ``gated_mlp`` for
    GLU variants (SwiGLU = ``gated_mlp=True, act_fn="silu"``); ``attn_only``;
    ``tie_word_embeddings`` (unembedding is ``W_E.T``); ``parallel_attn_mlp`` (GPT-J / GPT-NeoX
    parallel residual: ``resid_post = resid_pre + attn(ln1(resid_pre)) + mlp(ln2(resid_pre))``,
    no ``hook_resid_mid``); ``eps`` the norms' epsilon.

    KV shift (PAPER.md): ``shift_k`` / ``shift_v`` / ``shift_q`` choose the shifted projections;
    ``shift_window`` w mixes positions t..t-w (w = 1 is the paper); ``shift_param`` "free" (the
    paper, and this config's default, for retrofitting), "convex" (coefficients on the simplex:
    in [0, 1], summing to 1 over lags) or "gain_mix" (a mix on the simplex, stored in
    ``shift_{q,k,v}``, times a free per-head gain ``shift_{q,k,v}_gain`` starting at 1: what a
    head mixes and how much it scales are separate parameters). Whatever the parametrisation, read
    coefficients as gain x mix (:func:`kvshift_lens.shift.gain_and_mix`) and compare heads by
    their mix, never by raw values: free coefficients trained fast grow into gains;
    ``shift_init`` identity (exactly vanilla) | uniform (1/(w+1) per lag) | normal (identity plus
    N(0, ``shift_init_std``)) | induction (the paper's one-layer induction point: keys read the
    previous token, values the current one); ``shift_position`` pre_rotary (the shifted key is
    treated as belonging to position t, then rotated) or post_rotary.

    ``seed``: when set, the model's initial weights are drawn from a generator seeded with it
    (unless a generator is passed to the model); ``attention_dir`` is always "causal" (accepted
    for HookedTransformer configs).

    Hook flags (TransformerLens meanings): ``use_attn_result``, ``use_split_qkv_input``,
    ``use_attn_in``, ``use_hook_mlp_in``. ``use_sdpa`` lets attention use
    ``scaled_dot_product_attention`` when nothing hooks or caches the scores or pattern.
    """

    d_vocab: int = -1
    normalization_type: str | None = "LN"
    act_fn: str = "gelu"
    positional_embedding_type: str = "standard"
    rotary_dim: int | None = None
    rotary_base: float = 10000.0
    tie_word_embeddings: bool = False
    parallel_attn_mlp: bool = False
    init_range: float = 0.02
    tokenizer_name: str | None = None
    # As in TransformerLens: text given to to_tokens / forward / generate starts with the
    # tokenizer's BOS token unless prepend_bos=False (skipped for a tokenizer without one).
    default_prepend_bos: bool = True

    shift_k: bool = True
    shift_v: bool = True
    shift_q: bool = False
    shift_window: int = 1
    shift_param: str = "free"
    shift_init: str = "identity"
    shift_init_std: float = 0.1
    shift_position: str = "pre_rotary"

    use_attn_in: bool = False
    use_hook_mlp_in: bool = False
    use_sdpa: bool = True

    seed: int | None = None
    attention_dir: str = "causal"

    def __post_init__(self) -> None:
        if isinstance(self.dtype, str):
            if self.dtype not in _DTYPES:
                raise ValueError(
                    f"dtype={self.dtype!r} is not supported; expected one of {sorted(_DTYPES)}"
                )
            self.dtype = _DTYPES[self.dtype]
        check_field_types(self)
        for name in ("d_model", "d_head", "n_layers", "n_ctx"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.d_vocab < 1:
            raise ValueError(
                f"d_vocab={self.d_vocab} must be set to the vocabulary size (>= 1); "
                "a model on integer tokens states it explicitly"
            )
        if self.n_heads == -1:
            if self.d_model % self.d_head:
                raise ValueError(
                    f"n_heads was not given and d_model={self.d_model} is not divisible by "
                    f"d_head={self.d_head}; set n_heads or choose d_head dividing d_model"
                )
            self.n_heads = self.d_model // self.d_head
        if self.n_heads < 1:
            raise ValueError(f"n_heads={self.n_heads} must be >= 1")
        if self.n_heads * self.d_head != self.d_model:
            raise ValueError(
                f"n_heads * d_head must equal d_model, got {self.n_heads} * {self.d_head} = "
                f"{self.n_heads * self.d_head} != d_model={self.d_model}"
            )
        if self.n_key_value_heads is None:
            self.n_key_value_heads = self.n_heads
        if self.n_key_value_heads < 1 or self.n_heads % self.n_key_value_heads:
            raise ValueError(
                f"n_heads={self.n_heads} must be a multiple of n_key_value_heads="
                f"{self.n_key_value_heads} (grouped-query attention shares each KV head "
                "among n_heads // n_key_value_heads query heads)"
            )
        if self.d_mlp is None:
            self.d_mlp = 4 * self.d_model
        if not self.attn_only and self.d_mlp < 1:
            raise ValueError(f"d_mlp={self.d_mlp} must be >= 1 (or set attn_only=True)")
        if self.parallel_attn_mlp and self.attn_only:
            raise ValueError("parallel_attn_mlp=True needs an MLP; it cannot be combined with "
                             "attn_only=True")
        check_choice("positional_embedding_type", self.positional_embedding_type,
                      PositionalEmbeddingType)
        if self.normalization_type is not None:
            check_choice("normalization_type", self.normalization_type, NormalizationType,
                          extra="or None")
        check_choice("act_fn", self.act_fn, ActFn)
        check_choice("shift_param", self.shift_param, ShiftParam)
        check_choice("shift_init", self.shift_init, ShiftInit)
        check_choice("shift_position", self.shift_position, ShiftPosition)
        if self.shift_window < 1:
            raise ValueError(
                f"shift_window={self.shift_window} must be >= 1 (1 mixes t and t-1, as in the "
                "paper; turn the shift off with shift_k=shift_v=shift_q=False)"
            )
        if self.shift_init == "normal" and self.shift_init_std < 0:
            raise ValueError(f"shift_init_std={self.shift_init_std} must be >= 0")
        if self.shift_init == "induction" and self.shift_window != 1:
            raise ValueError(
                f"shift_init='induction' is defined for shift_window=1, got {self.shift_window}"
            )
        if self.positional_embedding_type == "rotary":
            if self.rotary_dim is None:
                self.rotary_dim = self.d_head
            if self.rotary_dim < 2 or self.rotary_dim % 2 or self.rotary_dim > self.d_head:
                raise ValueError(
                    f"rotary_dim={self.rotary_dim} must be even, >= 2 and <= d_head={self.d_head}"
                )
        elif self.shift_position == "post_rotary":
            raise ValueError(
                "shift_position='post_rotary' needs positional_embedding_type='rotary', got "
                f"{self.positional_embedding_type!r}"
            )
        if self.init_range <= 0:
            raise ValueError(f"init_range={self.init_range} must be > 0")
        if self.eps <= 0:
            raise ValueError(f"eps={self.eps} must be > 0 (the norms divide by sqrt(var + eps))")
        if self.rotary_base <= 0:
            raise ValueError(f"rotary_base={self.rotary_base} must be > 0")
        check_choice("attention_dir", self.attention_dir, AttentionDir,
                     extra="(a KV-shift model is a causal decoder)")
        # Derived flags TransformerLens utilities read.
        self.uses_rms_norm = self.normalization_type in ("RMS", "RMSPre")
        self.final_rms = self.uses_rms_norm
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = str(self.device)

    # ------------------------------------------------------------------ derived sizes
    @property
    def any_shift(self) -> bool:
        """True when at least one of Q, K, V is shifted."""
        return self.shift_k or self.shift_v or self.shift_q

    @property
    def n_lags(self) -> int:
        """Number of coefficients per head and shifted projection: ``shift_window + 1``."""
        return self.shift_window + 1

    @property
    def heads_per_kv(self) -> int:
        return self.n_heads // self.n_key_value_heads

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (dtype as its name; device omitted)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["dtype"] = _dtype_name(self.dtype)
        out.pop("device")
        return out

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> KVShiftConfig:
        """Build a config from a dict, rejecting unknown keys by name."""
        if not isinstance(config_dict, dict):
            raise TypeError(f"config must be a dict, got {type(config_dict).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config_dict) - known)
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**config_dict)
