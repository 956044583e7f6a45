"""Config validation: every bad value names the field, the value and what was expected."""

from __future__ import annotations

import pytest
import torch
from transformer_lens.config import TransformerLensConfig

from kvshift_lens import KVShiftConfig

BASE = dict(d_model=16, d_head=4, n_layers=1, n_ctx=8, d_vocab=10, device="cpu")


def test_is_a_transformer_lens_config_with_derived_fields():
    cfg = KVShiftConfig(**BASE)
    assert isinstance(cfg, TransformerLensConfig)
    assert cfg.n_heads == 4 and cfg.n_key_value_heads == 4 and cfg.d_mlp == 64
    assert cfg.n_lags == 2 and cfg.any_shift
    rms = KVShiftConfig(**BASE, normalization_type="RMS")
    assert rms.uses_rms_norm and rms.final_rms
    rot = KVShiftConfig(**BASE, positional_embedding_type="rotary")
    assert rot.rotary_dim == 4


def test_dict_round_trip():
    cfg = KVShiftConfig(**BASE, dtype="float64", shift_window=3)
    again = KVShiftConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict() and again.dtype == torch.float64


@pytest.mark.parametrize("overrides,err,match", [
    (dict(n_heads=3), ValueError, r"n_heads \* d_head must equal d_model, got 3 \* 4 = 12"),
    (dict(d_head=5), ValueError, r"d_model=16 is not divisible by d_head=5"),
    (dict(n_key_value_heads=3), ValueError, r"n_heads=4 must be a multiple of n_key_value_heads=3"),
    (dict(positional_embedding_type="alibi"), ValueError,
     r"positional_embedding_type='alibi' is not one of \['standard', 'rotary', 'shortformer', 'none'\]"),
    (dict(normalization_type="BN"), ValueError, r"normalization_type='BN' is not one of .*or None"),
    (dict(act_fn="tanh"), ValueError, r"act_fn='tanh' is not one of"),
    (dict(shift_param="sigmoid"), ValueError, r"shift_param='sigmoid' is not one of \['free', 'convex', 'gain_mix'\]"),
    (dict(shift_init="zeros"), ValueError, r"shift_init='zeros' is not one of"),
    (dict(shift_window=0), ValueError, r"shift_window=0 must be >= 1"),
    (dict(shift_init="induction", shift_window=2), ValueError, r"induction.*shift_window=1"),
    (dict(shift_position="post_rotary"), ValueError, r"post_rotary.*needs positional_embedding_type='rotary'"),
    (dict(positional_embedding_type="rotary", rotary_dim=3), ValueError, r"rotary_dim=3 must be even"),
    (dict(d_vocab=-1), ValueError, r"d_vocab=-1 must be set"),
    (dict(n_ctx=0), ValueError, r"n_ctx=0 must be >= 1"),
    (dict(d_model="16"), TypeError, r"d_model='16' has type str; expected int"),
    (dict(shift_k="yes"), TypeError, r"shift_k='yes' has type str; expected bool"),
    (dict(shift_window=1.5), TypeError, r"shift_window=1.5 has type float; expected int"),
    (dict(n_key_value_heads="2"), TypeError, r"n_key_value_heads='2'.*expected int or None"),
    (dict(dtype="float8"), ValueError, r"dtype='float8' is not supported"),
])
def test_bad_values_raise_clear_errors(overrides, err, match):
    with pytest.raises(err, match=match):
        KVShiftConfig(**{**BASE, **overrides})


def test_unknown_keys_listed():
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['nlayers'\]"):
        KVShiftConfig.from_dict({**BASE, "nlayers": 2})
