"""Retrofitting Hugging Face models: GPT-2, Llama-family and GPT-NeoX weights converted into the hooked
KV-shift model at identity must reproduce the original's logits and greedy generations; unsupported
options must be refused by name; shift-only fine-tuning must touch nothing but the coefficients.

No downloads: every HF model is built from a tiny config with random weights (biases and norm weights
randomised too, so a mis-mapped bias or norm cannot hide behind HF's zero / one initialisation).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
)

from kvshift_lens import HookedKVShiftTransformer, KVShiftConfig  # noqa: E402
from kvshift_lens.convert import (  # noqa: E402
    ModelNotAvailableError,
    freeze_all_but_shift,
    from_hf,
    from_transformer_bridge,
    spec_for_model,
)
from kvshift_lens.train import TrainConfig, train  # noqa: E402

ATOL = 1e-4
VOCAB = 50
SMALL = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=None, pad_token_id=0)


def _llama(**kw):
    base = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                num_hidden_layers=2, max_position_embeddings=64, **SMALL)
    base.update(kw)
    return LlamaForCausalLM, LlamaConfig(**base)


def _neox(**kw):
    base = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2,
                rotary_pct=0.5, use_parallel_residual=True, max_position_embeddings=64, **SMALL)
    base.update(kw)
    return GPTNeoXForCausalLM, GPTNeoXConfig(**base)


def _gpt2(**kw):
    base = dict(n_layer=2, n_embd=32, n_head=4, n_positions=32, **SMALL)
    base.update(kw)
    return GPT2LMHeadModel, GPT2Config(**base)


ARCHS = {
    "gpt2": lambda: _gpt2(),
    "gpt2_untied_relu": lambda: _gpt2(tie_word_embeddings=False, activation_function="relu"),
    "llama_gqa": lambda: _llama(rope_theta=500.0),
    "llama_tied_bias_mha": lambda: _llama(num_key_value_heads=4, attention_bias=True,
                                          tie_word_embeddings=True, rms_norm_eps=1e-5),
    "mistral_mqa": lambda: (MistralForCausalLM, MistralConfig(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=1, intermediate_size=64,
        num_hidden_layers=2, max_position_embeddings=64, sliding_window=None, **SMALL)),
    "neox_parallel": lambda: _neox(),
    "neox_sequential": lambda: _neox(use_parallel_residual=False, rotary_pct=0.25,
                                     rotary_emb_base=1000.0),
}


def hf_model(arch: str, seed: int = 0):
    cls, cfg = ARCHS[arch]()
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(cfg).eval().float()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and ("norm" in name or "ln" in name):
                p.copy_(1 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.3 * noise)
    return model


def tokens(batch: int = 4, pos: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, pos), generator=torch.Generator().manual_seed(seed))


def hf_greedy(model, toks: torch.Tensor, n: int) -> torch.Tensor:
    gen = copy.deepcopy(model.generation_config)
    gen.eos_token_id, gen.pad_token_id, gen.do_sample = None, 0, False
    return model.generate(toks, attention_mask=torch.ones_like(toks), generation_config=gen,
                          max_new_tokens=n)


# ---------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("shift", [(), ("k", "v")], ids=["vanilla", "kv_shift"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_match_hf(arch, shift):
    hf = hf_model(arch)
    toks = tokens()
    with torch.no_grad():
        ref = hf(toks).logits
        model = from_hf(hf, shift=shift)
        assert model.cfg.shift_k == model.cfg.shift_v == bool(shift)
        fast = model(toks)  # scaled_dot_product_attention path
        explicit, cache = model.run_with_cache(toks, names_filter=lambda n: n.endswith("hook_pattern"))
    assert ref.abs().max() > 1  # the comparison is not between near-zero logits
    torch.testing.assert_close(fast, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(explicit, ref, atol=ATOL, rtol=0)
    assert len(cache) == model.cfg.n_layers  # the explicit path really ran
    if shift:
        coeffs = model.shift_coefficients()
        for which in ("k", "v"):
            assert torch.equal(coeffs[which][..., 0], torch.ones_like(coeffs[which][..., 0]))
            assert torch.equal(coeffs[which][..., 1], torch.zeros_like(coeffs[which][..., 1]))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_generation_matches_hf(arch):
    hf = hf_model(arch)
    toks = tokens(batch=3, pos=8, seed=2)
    model = from_hf(hf, shift=("k", "v"))
    ours = model.generate(toks, max_new_tokens=10, do_sample=False)  # incremental KV-shift cache
    theirs = hf_greedy(hf, toks, 10)
    assert ours.shape == theirs.shape == (3, 18)
    assert torch.equal(ours, theirs)


def test_vanilla_generation_and_no_cache_path_match_hf():
    hf = hf_model("llama_gqa")
    toks = tokens(batch=2, pos=6, seed=3)
    theirs = hf_greedy(hf, toks, 10)
    assert torch.equal(from_hf(hf, shift=()).generate(toks, max_new_tokens=10, do_sample=False), theirs)
    shifted = from_hf(hf, shift=("q", "k", "v"), shift_window=2)
    assert torch.equal(shifted.generate(toks, max_new_tokens=10, use_past_kv_cache=False,
                                             do_sample=False), theirs)


def test_config_carries_architecture():
    cfg = from_hf(hf_model("llama_gqa")).cfg
    assert (cfg.positional_embedding_type, cfg.rotary_base, cfg.rotary_dim) == ("rotary", 500.0, 8)
    assert (cfg.normalization_type, cfg.gated_mlp, cfg.act_fn) == ("RMS", True, "silu")
    assert (cfg.n_heads, cfg.n_key_value_heads, cfg.eps) == (4, 2, 1e-6)
    neox = from_hf(hf_model("neox_sequential")).cfg
    assert (neox.rotary_dim, neox.rotary_base, neox.parallel_attn_mlp) == (2, 1000.0, False)
    assert from_hf(hf_model("neox_parallel")).cfg.parallel_attn_mlp
    gpt2 = from_hf(hf_model("gpt2")).cfg
    assert (gpt2.act_fn, gpt2.tie_word_embeddings, gpt2.n_ctx) == ("gelu_new", True, 32)


def test_neox_fused_qkv_is_split_per_head():
    """GPT-NeoX's query_key_value rows are [head, (q|k|v), d_head]; the raw projections must equal
    HF's per-head split exactly (before rotary)."""
    hf = hf_model("neox_parallel")
    toks = tokens(batch=2, pos=5)
    model = from_hf(hf)
    _, cache = model.run_with_cache(toks)
    layer = hf.gpt_neox.layers[0]
    with torch.no_grad():
        x = layer.input_layernorm(hf.gpt_neox.embed_in(toks))
        qkv = layer.attention.query_key_value(x).view(2, 5, 4, 3 * 8)  # [b, p, head, 3 * d_head]
    for i, which in enumerate("qkv"):
        torch.testing.assert_close(cache[f"blocks.0.attn.hook_{which}"], qkv[..., i * 8:(i + 1) * 8],
                                   atol=1e-5, rtol=0)


def test_parallel_block_has_no_resid_mid():
    model = from_hf(hf_model("neox_parallel"))
    assert "blocks.0.hook_resid_mid" not in model.hook_dict
    assert "blocks.0.hook_resid_mid" in from_hf(hf_model("neox_sequential")).hook_dict
    with pytest.raises(ValueError, match="parallel_attn_mlp"):
        KVShiftConfig(d_model=8, d_head=4, n_layers=1, n_ctx=4, d_vocab=5, attn_only=True,
                      parallel_attn_mlp=True)


@pytest.mark.parametrize("arch", ["gpt2", "llama_gqa", "neox_parallel"])
def test_state_dict_and_config_dict_inputs(arch):
    hf = hf_model(arch)
    toks = tokens(batch=2, pos=8)
    ref = from_hf(hf)(toks)
    config_dict = json.loads(hf.config.to_json_string())
    for source, config in ((hf.state_dict(), hf.config), (hf.state_dict(), config_dict)):
        torch.testing.assert_close(from_hf(source, hf_config=config)(toks), ref, atol=0, rtol=0)


def test_dtype_and_overrides():
    hf = hf_model("gpt2")
    toks = tokens(batch=2, pos=8)
    model = from_hf(hf, dtype="float64", use_sdpa=False, shift_param="convex")
    assert model.W_E.dtype == torch.float64 and model.cfg.shift_param == "convex"
    torch.testing.assert_close(model(toks).float(), hf(toks).logits, atol=ATOL, rtol=0)
    assert from_hf(hf_model("llama_gqa"), n_ctx=16).cfg.n_ctx == 16  # rotary: n_ctx is free


def _word_level_tokenizer(bos: bool):
    """A HF tokenizer over the tiny vocabulary, built in memory: word ``w{i}`` is id i."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = dict(bos_token="w0", eos_token="w0") if bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="w0", **special)


def test_tokenizer_is_carried_over():
    tok = _word_level_tokenizer(bos=False)
    hf = hf_model("gpt2")
    model = from_hf(hf, tokenizer=tok)
    assert model.tokenizer is tok
    text = "w3 w14 w15 w9 w2"
    ids = torch.tensor([tok(text)["input_ids"]])
    assert torch.equal(model.to_tokens(text), ids)
    torch.testing.assert_close(model(text), hf(ids).logits, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------- refusals
def _state_dict_without(arch: str, key: str):
    hf = hf_model(arch)
    return {k: v for k, v in hf.state_dict().items() if k != key}, hf.config


UNSUPPORTED = {
    "llama_mlp_bias": (lambda: hf_model_of(_llama(mlp_bias=True)), NotImplementedError, "mlp_bias"),
    "llama_rope_scaling": (lambda: hf_model_of(_llama(rope_scaling={"rope_type": "linear", "factor": 2.0})),
                           NotImplementedError, "rope_type='linear'"),
    "llama_head_dim": (lambda: hf_model_of(_llama(head_dim=16)), NotImplementedError, "head_dim=16"),
    "llama_act": (lambda: hf_model_of(_llama(hidden_act="gelu_fast")), NotImplementedError, "hidden_act"),
    "mistral_sliding_window": (lambda: hf_model_of((MistralForCausalLM, MistralConfig(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        num_hidden_layers=1, sliding_window=8, **SMALL))), NotImplementedError, "sliding_window"),
    "gpt2_layer_scaling": (lambda: hf_model_of(_gpt2(scale_attn_by_inverse_layer_idx=True)),
                           NotImplementedError, "scale_attn_by_inverse_layer_idx"),
    "gpt2_unscaled": (lambda: hf_model_of(_gpt2(scale_attn_weights=False)), NotImplementedError,
                      "scale_attn_weights"),
    "gpt2_cross_attention": (lambda: hf_model_of(_gpt2(add_cross_attention=True)), NotImplementedError,
                             "add_cross_attention"),
    "neox_no_rotary_dims": (lambda: hf_model_of(_neox(rotary_pct=0.1)), NotImplementedError, "rotary"),
    "opt_architecture": (lambda: ({}, OPTConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1)),
                         NotImplementedError, "'opt'"),
    "gpt2_classifier": (lambda: hf_model_of((GPT2ForSequenceClassification, _gpt2()[1])), ValueError,
                        "score.weight"),
    "tie_mismatch": (lambda: _untie("gpt2"), ValueError, "tie_word_embeddings=True but 'lm_head.weight'"),
    "missing_head": (lambda: _state_dict_without("llama_gqa", "lm_head.weight"), ValueError,
                     "tie_word_embeddings=False"),
    "shape_mismatch": (lambda: (hf_model("gpt2").state_dict(), _gpt2(n_embd=64)[1]), ValueError,
                       "shape"),
}


def hf_model_of(spec):
    cls, cfg = spec
    return cls(cfg).eval()


def _untie(arch):
    hf = hf_model(arch)
    sd = dict(hf.state_dict())
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1
    return sd, hf.config


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_unsupported_options_are_named(case):
    build, error, match = UNSUPPORTED[case]
    source = build()
    args = (source,) if not isinstance(source, tuple) else (source[0],)
    kwargs = {} if not isinstance(source, tuple) else {"hf_config": source[1]}
    with pytest.raises(error) as info:
        from_hf(*args, **kwargs)
    assert match in str(info.value)


@pytest.mark.parametrize("override, match", [
    (dict(d_model=64), "d_model"),
    (dict(tie_word_embeddings=False), "tie_word_embeddings"),
    (dict(n_ctx=16), "n_ctx"),
    (dict(shift_k=False), "shift"),
])
def test_architecture_overrides_are_refused(override, match):
    with pytest.raises(ValueError, match=match):
        from_hf(hf_model("gpt2"), **override)


def test_bad_shift_and_missing_config():
    hf = hf_model("gpt2")
    with pytest.raises(ValueError, match="'x'"):
        from_hf(hf, shift=("k", "x"))
    with pytest.raises(ValueError, match="hf_config"):
        from_hf(hf.state_dict())


def test_by_name_offline_gives_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotAvailableError) as info:
        from_hf("nonexistent-model-name")
    assert isinstance(info.value, OSError)
    msg = str(info.value)
    assert "'nonexistent-model-name'" in msg and "network" in msg and "cache" in msg


def test_by_name_loads_a_local_folder_with_its_tokenizer(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    hf = hf_model("neox_parallel")
    hf.save_pretrained(tmp_path)
    _word_level_tokenizer(bos=False).save_pretrained(tmp_path)
    model = from_hf(str(tmp_path))
    assert model.tokenizer is not None and model.cfg.tokenizer_name == str(tmp_path)
    text = "w3 w14 w15 w9 w2"
    ids = torch.tensor([[3, 14, 15, 9, 2]])
    assert torch.equal(model.to_tokens(text), ids)
    torch.testing.assert_close(model(text), hf(ids).logits, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------- TransformerBridge
def test_from_transformer_bridge(tmp_path, monkeypatch):
    bridge_mod = pytest.importorskip("transformer_lens.model_bridge")
    import huggingface_hub.constants
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    _word_level_tokenizer(bos=True).save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)  # the bridge reloads it by name_or_path

    toks = tokens(batch=2, pos=8)
    for arch in ("gpt2", "llama_gqa"):
        hf = hf_model(arch)
        with torch.no_grad():
            ref = hf(toks).logits
        bridge = bridge_mod.TransformerBridge.boot_transformers(arch, hf_model=hf, tokenizer=tok,
                                                                device="cpu")
        model = from_transformer_bridge(bridge)
        assert model.tokenizer is bridge.tokenizer
        torch.testing.assert_close(model(toks), ref, atol=ATOL, rtol=0)
        # The bridge rewired the HF model in place; from_hf sees through its wrappers too.
        torch.testing.assert_close(from_hf(hf)(toks), ref, atol=ATOL, rtol=0)
    bridge.enable_compatibility_mode(disable_warnings=True)
    with pytest.raises(ValueError, match="processed"):
        from_transformer_bridge(bridge)


# ---------------------------------------------------------------------------- shift-only tuning
def test_freeze_all_but_shift_trains_only_coefficients(tmp_path):
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=32, initializer_range=0.2,
                                    **SMALL)).eval()
    model = from_hf(hf)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = freeze_all_but_shift(model)
    assert trainable == [f"blocks.{l}.attn.shift_{w}" for l in range(2) for w in "kv"]
    spec = spec_for_model(model, dict(name="induction", d_vocab=VOCAB, seq_len=32), TrainConfig(
        steps=60, batch_size=16, lr=0.1, warmup_steps=0, eval_every=60, eval_batches=2,
        progress=False, device="cpu", shift_lr_scale=1.0))  # lr already sized for the coefficients
    assert spec.model == model.cfg.to_dict()
    result = train(spec, tmp_path / "run", model=model)
    after = result.model.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == sorted(trainable)
    first, last = result.evals[0]["eval/loss"], result.evals[-1]["eval/loss"]
    assert last < first - 0.05, (first, last)
    # The saved run reloads with the trained coefficients.
    reloaded = HookedKVShiftTransformer.from_pretrained(tmp_path / "run" / "final", device="cpu")
    assert torch.equal(reloaded.blocks[0].attn.shift_k, after["blocks.0.attn.shift_k"])


def test_freeze_needs_a_shift():
    with pytest.raises(ValueError, match="no shift coefficients"):
        freeze_all_but_shift(from_hf(hf_model("gpt2"), shift=()))


def test_retrofit_example_runs(tmp_path, monkeypatch, capsys):
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "examples" / "retrofit.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--steps", "3", "--run-dir", str(tmp_path / "run")])
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "max |logits - HF logits| at identity" in out and "L0H0 k" in out
    assert "previous share" in out and "max |c| before fine-tuning 1.000" in out
    assert (tmp_path / "run" / "final" / "config.json").is_file()
