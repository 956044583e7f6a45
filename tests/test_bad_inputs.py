"""Inputs that used to be accepted silently or fail deep inside torch: each is a clear error
naming the value, or (int32 token ids) gives exactly what int64 ids give."""

from __future__ import annotations

import math

import pytest
import torch

from kvshift_lens import KVShiftConfig
from kvshift_lens.train import TrainConfig
from tests.helpers import build, tiny_config


@pytest.mark.parametrize("field, value, match", [
    ("init_range", math.nan, "init_range=nan must be a finite number"),
    ("shift_init_std", math.nan, "shift_init_std=nan must be a finite number"),
    ("eps", -1.0, "eps=-1.0 must be > 0"),
    ("rotary_base", 0.0, "rotary_base=0.0 must be > 0"),
    ("attention_dir", "bidirectional", "attention_dir='bidirectional' is not one of"),
])
def test_model_config_rejects(field, value, match):
    extra = {"positional_embedding_type": "rotary"} if field == "rotary_base" else {}
    with pytest.raises(ValueError, match=match):
        tiny_config(**{field: value, **extra})


@pytest.mark.parametrize("field, value, match", [
    ("grad_clip", math.nan, "grad_clip=nan must be a finite number"),
    ("weight_decay", math.nan, "weight_decay=nan must be a finite number"),
    ("lr", math.inf, "lr=inf must be a finite number"),
    ("betas", (1.5, 0.9), r"betas=\[1.5, 0.9\] must be two numbers in \[0, 1\)"),
])
def test_train_config_rejects(field, value, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{field: value})


def test_int32_token_ids_give_what_int64_ids_give():
    model = build()
    ids = torch.randint(0, model.cfg.d_vocab, (2, 7))
    for fn in (lambda t: model(t), lambda t: model(t, return_type="loss"),
               lambda t: model.run_with_cache(t)[1]["blocks.1.attn.hook_k_shifted"]):
        assert torch.equal(fn(ids.to(torch.int32)), fn(ids))
    g = torch.Generator().manual_seed(0)
    out32 = model.generate(ids.to(torch.int32), max_new_tokens=3, do_sample=False, verbose=False)
    out64 = model.generate(ids, max_new_tokens=3, do_sample=False, verbose=False, generator=g)
    assert out32.dtype == torch.long and torch.equal(out32, out64)


def test_empty_batches_are_clear_errors():
    model = build()
    empty = torch.zeros(0, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"empty batch axis \(shape \(0, 5\)\)"):
        model(empty)
    with pytest.raises(ValueError, match="empty batch axis"):
        model.generate(empty, max_new_tokens=2, verbose=False)
    with pytest.raises(ValueError, match="empty position axis"):
        model(torch.zeros(2, 0, dtype=torch.long))


def test_a_kv_cache_of_another_batch_size_is_refused():
    model = build()
    cache = model.new_cache()
    model(torch.randint(0, 23, (2, 5)), past_kv_cache=cache)
    with pytest.raises(ValueError, match="past_kv_cache holds 2 sequences but the input has batch "
                                         "size 3"):
        model(torch.randint(0, 23, (3, 1)), past_kv_cache=cache)
    other = build(n_layers=1).new_cache()
    with pytest.raises(ValueError, match="past_kv_cache has 1 layers but the model has 2"):
        model(torch.randint(0, 23, (2, 1)), past_kv_cache=other)


def test_config_from_dict_rejects_nan_strings_from_json():
    with pytest.raises(ValueError, match="must be a finite number"):
        KVShiftConfig.from_dict({**tiny_config().to_dict(), "init_range": float("nan")})
