"""Causality over random configs (hypothesis) and cached generation == full recomputation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from kvshift_lens import HookedKVShiftTransformer, byte_level_tokenizer
from kvshift_lens.generate import sample_next
from tests.helpers import build, randomize, tiny_config

config_strategy = st.fixed_dictionaries({
    "positional_embedding_type": st.sampled_from(["standard", "rotary", "shortformer", "none"]),
    "normalization_type": st.sampled_from(["LN", "RMS", None]),
    "n_key_value_heads": st.sampled_from([1, 2, 4]),
    "shift_window": st.integers(1, 4),
    "shift_q": st.booleans(),
    "shift_param": st.sampled_from(["free", "convex"]),
    "attn_only": st.booleans(),
    "use_sdpa": st.booleans(),
})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(overrides=config_strategy, t=st.integers(0, 11), seed=st.integers(0, 10_000))
def test_changing_token_t_never_changes_earlier_logits(overrides, t, seed):
    model = build(seed=seed % 7, **overrides)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, model.cfg.n_ctx), generator=g)
    changed = tokens.clone()
    changed[:, t] = (changed[:, t] + 1 + seed % 5) % model.cfg.d_vocab
    before, after = model(tokens), model(changed)
    assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-6)
    # ... and the test can fail: the changed position itself does move.
    assert (after[:, t] - before[:, t]).abs().max() > 1e-6


GEN_CASES = [
    dict(),
    dict(positional_embedding_type="rotary", shift_window=3, n_key_value_heads=2, shift_q=True),
    dict(positional_embedding_type="rotary", shift_position="post_rotary"),
    dict(positional_embedding_type="shortformer", normalization_type="RMS", attn_only=True),
    dict(positional_embedding_type="none", shift_k=False, shift_window=2),
]


@pytest.mark.parametrize("overrides", GEN_CASES)
def test_cached_greedy_generation_equals_recomputation(overrides):
    model = build(n_ctx=24, **overrides)
    prompt = torch.randint(0, model.cfg.d_vocab, (3, 5), generator=torch.Generator().manual_seed(2))
    cached = model.generate(prompt, max_new_tokens=15, use_past_kv_cache=True, do_sample=False)
    full = model.generate(prompt, max_new_tokens=15, use_past_kv_cache=False, do_sample=False)
    assert torch.equal(cached, full)
    assert cached.shape == (3, 20) and torch.equal(cached[:, :5], prompt)
    # The logits of the cached path equal a full forward pass at every position.
    cache = model.new_cache()
    step_logits = [model(cached[:, :5], past_kv_cache=cache)]
    for i in range(5, cached.shape[1]):
        step_logits.append(model(cached[:, i : i + 1], past_kv_cache=cache))
    assert_close(torch.cat(step_logits, dim=1), model(cached), rtol=1e-5, atol=1e-5)


def test_chunked_prefill_equals_full_forward():
    model = build(n_ctx=24, shift_window=3, positional_embedding_type="rotary")
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 20), generator=torch.Generator().manual_seed(4))
    cache = model.new_cache()
    chunks = [model(tokens[:, a:b], past_kv_cache=cache) for a, b in [(0, 1), (1, 3), (3, 11),
                                                                       (11, 20)]]
    assert_close(torch.cat(chunks, 1), model(tokens), rtol=1e-5, atol=1e-5)
    assert cache.length == 20


def test_sampling_is_reproducible_and_cache_agnostic():
    model = build(n_ctx=24)
    prompt = torch.randint(0, model.cfg.d_vocab, (2, 4), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=12, do_sample=True, temperature=0.8, top_k=10, top_p=0.9)
    a = model.generate(prompt, generator=torch.Generator().manual_seed(1), **kw)
    b = model.generate(prompt, generator=torch.Generator().manual_seed(1),
                       use_past_kv_cache=False, **kw)
    assert torch.equal(a, b)


def test_sample_next_respects_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, True, top_k=2, generator=g)) for _ in range(200)}
    assert draws == {0, 1}
    draws = {int(sample_next(logits, True, top_p=0.7, generator=g)) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 < 0.7, so the token crossing 0.7 (index 1) is kept
    draws = {int(sample_next(logits, True, top_p=0.5, generator=g)) for _ in range(100)}
    assert draws == {0}
    assert int(sample_next(logits, False)) == 0
    assert int(sample_next(logits, True, temperature=0)) == 0  # temperature 0 is greedy
    with pytest.raises(ValueError, match="temperature=-1"):
        sample_next(logits, True, temperature=-1)


def test_generation_stops_at_n_ctx_with_learned_positions():
    model = build(n_ctx=8)
    with pytest.raises(ValueError, match="exceeds n_ctx=8"):
        model.generate(torch.zeros(1, 4, dtype=torch.long), max_new_tokens=10,
                       do_sample=False)


def test_eos_rows_keep_emitting_eos_and_text_roundtrip():
    model = HookedKVShiftTransformer(tiny_config(d_vocab=257, n_ctx=32),
                                     tokenizer=byte_level_tokenizer())
    randomize(model)
    out = model.generate("ab", max_new_tokens=5, do_sample=False)
    assert isinstance(out, str) and out.startswith("ab")
    prompt = torch.tensor([[1, 2, 3]])
    greedy = model.generate(prompt, max_new_tokens=6, do_sample=False)
    eos = int(greedy[0, 4])  # force "EOS" to be the 2nd generated token
    stopped = model.generate(prompt, max_new_tokens=6, eos_token_id=eos, do_sample=False)
    first = int((stopped[0, 3:] == eos).nonzero()[0])
    assert torch.all(stopped[0, 3 + first :] == eos)
