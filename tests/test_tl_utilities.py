"""TransformerLens 4 utilities on ``HookedKVShiftTransformer``, checked with numbers.

Every check compares what a TransformerLens utility returns against an independent reference
computed here: a sum that must reproduce a cached activation, a patch done by hand with
``run_with_hooks`` or by calling the modules directly, a head score read off the cached pattern,
a loss before and after training. Models are tiny, use non-identity shift coefficients and random
biases / norm weights (``tests.helpers.randomize``), so no term can hide behind a zero or a one.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close
from torch.utils.data import Dataset
from transformer_lens import evals, patching
from transformer_lens.ActivationCache import ActivationCache
from transformer_lens.head_detector import detect_head
from transformer_lens.tools.training import TrainConfig, train
from transformer_lens.utilities import exploratory_utils, get_act_name, move_to_and_update_config
from transformer_lens.weight_processing import ProcessWeights

from kvshift_lens import HookedKVShiftTransformer, byte_level_tokenizer
from tests.helpers import build, randomize, tiny_config

N_LAYERS = 2
SEQ = 8
BATCH = 2


def make(**overrides) -> HookedKVShiftTransformer:
    """A 2-layer KV-shifted model with MLPs and every parameter random (eval mode)."""
    base = dict(d_model=32, d_head=8, n_layers=N_LAYERS, n_ctx=16, d_vocab=23, d_mlp=48)
    base.update(overrides)
    return build(**base)


def tokens_for(model: HookedKVShiftTransformer, batch: int = BATCH, seq: int = SEQ,
               seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.d_vocab, (batch, seq), generator=g)


def set_random_shift(model: HookedKVShiftTransformer, seed: int = 7) -> None:
    """Random, clearly non-identity shift coefficients in every layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            for name in ("shift_k", "shift_v"):
                p = getattr(block.attn, name)
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


NORMS = ["LN", "RMS"]


# ================================================================== 1. ActivationCache


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("use_attn_result", [False, True])
def test_decompose_resid_sums_to_resid_post(norm, use_attn_result):
    model = make(normalization_type=norm, dtype="float64")
    model.set_use_attn_result(use_attn_result)
    tokens = tokens_for(model)
    logits, cache = model.run_with_cache(tokens)
    assert isinstance(cache, ActivationCache) and cache.has_batch_dim

    stack, labels = cache.decompose_resid(return_labels=True)
    assert labels == ["embed", "pos_embed", "0_attn_out", "0_mlp_out", "1_attn_out", "1_mlp_out"]
    assert stack.shape == (6, BATCH, SEQ, model.cfg.d_model)
    resid_final = cache[f"blocks.{N_LAYERS - 1}.hook_resid_post"]
    assert_close(stack.sum(0), resid_final, atol=1e-12, rtol=1e-12)
    # The decomposed stream, pushed through the real final norm and unembedding, is the output.
    assert_close(model.unembed(model.ln_final(stack.sum(0))), logits, atol=1e-10, rtol=1e-10)

    # Up to the MLP input of the last layer: the stack sums to that layer's resid_mid.
    mid = cache.decompose_resid(layer=N_LAYERS - 1, mlp_input=True)
    assert mid.shape[0] == 2 + 2 * (N_LAYERS - 1) + 1
    assert_close(mid.sum(0), cache[f"blocks.{N_LAYERS - 1}.hook_resid_mid"], atol=1e-12,
                 rtol=1e-12)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("use_attn_result", [False, True])
@pytest.mark.parametrize("n_kv", [None, 2], ids=["mha", "gqa"])
def test_stack_head_results_sum_to_attn_out(norm, use_attn_result, n_kv):
    model = make(normalization_type=norm, n_key_value_heads=n_kv, dtype="float64")
    H = model.cfg.n_heads
    model.set_use_attn_result(use_attn_result)
    tokens = tokens_for(model)
    _, cache = model.run_with_cache(tokens)
    assert ("blocks.0.attn.hook_result" in cache.cache_dict) == use_attn_result

    stack, labels = cache.stack_head_results(return_labels=True)
    assert labels == [f"L{l}H{h}" for l in range(N_LAYERS) for h in range(H)]
    assert stack.shape == (N_LAYERS * H, BATCH, SEQ, model.cfg.d_model)
    for layer in range(N_LAYERS):
        heads = stack[layer * H:(layer + 1) * H]
        # Independent of the cache: z of each head times that head's W_O.
        z = cache[f"blocks.{layer}.attn.hook_z"]
        W_O = model.blocks[layer].attn.W_O
        for h in range(H):
            assert_close(heads[h], z[:, :, h] @ W_O[h], atol=1e-12, rtol=1e-12)
        assert_close(heads.sum(0) + model.blocks[layer].attn.b_O,
                     cache[f"blocks.{layer}.hook_attn_out"], atol=1e-12, rtol=1e-12)

    # The remainder is everything else in the final residual stream.
    with_rest = cache.stack_head_results(incl_remainder=True)
    rest = cache["hook_embed"] + cache["hook_pos_embed"] + sum(
        model.blocks[l].attn.b_O + cache[f"blocks.{l}.hook_mlp_out"] for l in range(N_LAYERS))
    assert_close(with_rest[-1], rest, atol=1e-12, rtol=1e-12)
    assert_close(with_rest.sum(0), cache[f"blocks.{N_LAYERS - 1}.hook_resid_post"], atol=1e-12,
                 rtol=1e-12)


@pytest.mark.parametrize("norm", NORMS)
def test_apply_ln_to_stack_matches_final_norm(norm):
    model = make(normalization_type=norm)
    tokens = tokens_for(model)

    # Unfolded: the cached scale (and centring for LN) only, without ln_final's w and b.
    _, cache = model.run_with_cache(tokens)
    stack = cache.decompose_resid()
    scaled = cache.apply_ln_to_stack(stack, layer=-1)
    w = model.ln_final.w
    b = model.ln_final.b if norm == "LN" else 0.0
    assert_close(scaled.sum(0) * w + b, cache["ln_final.hook_normalized"], atol=1e-5, rtol=1e-5)

    # Folded: w = 1, b = 0, so the stack sums to the final norm's output exactly.
    model.fold_layer_norm_()
    assert_close(model.ln_final.w, torch.ones_like(model.ln_final.w), atol=0, rtol=0)
    if norm == "LN":
        assert_close(model.ln_final.b, torch.zeros_like(model.ln_final.b), atol=0, rtol=0)
    _, cache = model.run_with_cache(tokens)
    stack = cache.decompose_resid()
    scaled = cache.apply_ln_to_stack(stack, layer=-1)
    normalized = cache["ln_final.hook_normalized"]
    assert_close(scaled.sum(0), normalized, atol=1e-5, rtol=1e-5)
    # decompose_resid(apply_ln=True) is the same computation.
    assert_close(cache.decompose_resid(apply_ln=True), scaled, atol=0, rtol=0)
    # Inside the model: the inputs of layer 1's ln1 and ln2, from their own cached scales.
    for mlp_input, ln in ((False, "ln1"), (True, "ln2")):
        inner = cache.decompose_resid(layer=1, mlp_input=mlp_input, apply_ln=True)
        assert_close(inner.sum(0), cache[f"blocks.1.{ln}.hook_normalized"], atol=1e-5, rtol=1e-5)
    # Reference for the norm itself, from the residual stream: no hook involved.
    x = cache[f"blocks.{N_LAYERS - 1}.hook_resid_post"]
    if norm == "LN":
        x = x - x.mean(-1, keepdim=True)
    ref = x / (x.pow(2).mean(-1, keepdim=True) + model.cfg.eps).sqrt()
    assert_close(normalized, ref, atol=1e-5, rtol=1e-5)


def _gather(logits: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
    return logits.gather(-1, tok[..., None])[..., 0]


@pytest.mark.parametrize("norm", NORMS)
def test_logit_attrs_sum_to_logit_difference(norm):
    model = make(normalization_type=norm)
    tokens = tokens_for(model)
    logits_unfolded = model(tokens)
    model.fold_layer_norm_()
    logits, cache = model.run_with_cache(tokens)

    g = torch.Generator().manual_seed(3)
    right = torch.randint(0, model.cfg.d_vocab, (BATCH, SEQ), generator=g)
    wrong = (right + 1 + torch.randint(0, model.cfg.d_vocab - 1, (BATCH, SEQ), generator=g)) % (
        model.cfg.d_vocab)
    diff = _gather(logits, right) - _gather(logits, wrong)
    # Centring the unembedding shifts every logit of a position by one constant: differences stay.
    assert_close(diff, _gather(logits_unfolded, right) - _gather(logits_unfolded, wrong),
                 atol=1e-4, rtol=1e-4)
    b_U = model.b_U.detach()
    bias_diff = b_U[right] - b_U[wrong]  # not part of the residual stream

    stack = cache.decompose_resid()
    attrs = cache.logit_attrs(stack, tokens=right, incorrect_tokens=wrong)
    assert attrs.shape == (stack.shape[0], BATCH, SEQ)
    assert_close(attrs.sum(0) + bias_diff, diff, atol=1e-4, rtol=1e-4)

    heads = cache.stack_head_results(incl_remainder=True)
    head_attrs = cache.logit_attrs(heads, tokens=right, incorrect_tokens=wrong)
    assert_close(head_attrs.sum(0) + bias_diff, diff, atol=1e-4, rtol=1e-4)

    # One token pair for every position.
    t, u = 3, 5
    attrs_tu = cache.logit_attrs(stack, tokens=t, incorrect_tokens=u)
    assert_close(attrs_tu.sum(0) + (b_U[t] - b_U[u]), logits[..., t] - logits[..., u],
                 atol=1e-4, rtol=1e-4)


# ================================================================== 2. Folding


def _logprobs(model, tokens):
    with torch.no_grad():
        return model(tokens).log_softmax(-1)


def _assert_folded(model):
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "w":
            assert torch.equal(p, torch.ones_like(p)), name
        elif leaf == "b" and "ln" in name:
            assert torch.equal(p, torch.zeros_like(p)), name


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("n_kv", [None, 2], ids=["mha", "gqa"])
def test_fold_layer_norm_keeps_logprobs(norm, tied, n_kv):
    """Folding norms is exact under the shift. The ``tied`` cases also check that untying the
    unembedding keeps ``b_U`` (the folded b_U is ``center(b_U + ln_final.b @ W_U)`` for LN,
    ``center(b_U)`` for RMS)."""
    model = make(normalization_type=norm, tie_word_embeddings=tied, n_key_value_heads=n_kv)
    set_random_shift(model)
    assert model.b_U.abs().min() > 0
    tokens = tokens_for(model)
    logits_before = model(tokens).detach()
    before = _logprobs(model, tokens)
    with torch.no_grad():
        b_U_ref = model.b_U.clone()
        if norm == "LN":
            b_U_ref = b_U_ref + model.ln_final.b @ model.W_U
        b_U_ref = b_U_ref - b_U_ref.mean()
    model.fold_layer_norm_()
    _assert_folded(model)
    assert not model.cfg.tie_word_embeddings and "W_U" in model.unembed._parameters
    assert_close(model.b_U.detach(), b_U_ref, atol=1e-5, rtol=1e-5,
                 msg=lambda m: f"fold_layer_norm_ did not keep unembed.b_U: {m}")
    after = _logprobs(model, tokens)
    assert_close(after, before, atol=1e-5, rtol=1e-5)
    # Logits move by one constant per position (centred unembedding), nothing else.
    delta = model(tokens).detach() - logits_before
    assert_close(delta, delta[..., :1].expand_as(delta), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm", NORMS)
def test_fold_layer_norm_float64_is_exact(norm):
    """Folding is exact algebra; in float64 it must keep log-probs to float64 precision.

    Exposes a TransformerLens bug: ``ProcessWeights.process_weights`` "upcasts" every
    floating tensor whose dtype is not float32 to float32, float64 included, so every weight of
    a float64 model is rounded to float32 precision (errors ~1e-7 instead of ~1e-15).
    """
    model = make(normalization_type=norm, dtype="float64")
    set_random_shift(model)
    tokens = tokens_for(model)
    untouched = {k: v.clone() for k, v in model.state_dict().items()}
    before = _logprobs(model, tokens)
    model.fold_layer_norm_()
    # Parameters folding never touches (the shift coefficients) must come back bit for bit.
    for name in untouched:
        if name.endswith(("shift_k", "shift_v")):
            assert torch.equal(model.state_dict()[name], untouched[name]), (
                f"{name} changed by fold_layer_norm_ (rounded through float32?)")
    assert_close(_logprobs(model, tokens), before, atol=1e-10, rtol=1e-10)


def _with_value_biases(model, seed=11):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            name = "_b_V" if "_b_V" in block.attn._parameters else "b_V"
            p = block.attn._parameters[name]
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


def _fold_all(model):
    sd = ProcessWeights.process_weights(dict(model.state_dict()), model.cfg, fold_ln=True,
                                        center_writing_weights=True, center_unembed=True,
                                        fold_value_biases=True)
    model.load_state_dict(sd)
    return model


def _b_V_params(model):
    return [p for b in model.blocks for n, p in b.attn._parameters.items()
            if n.lstrip("_") == "b_V"]


_TL_MHA_VALUE_BIAS_BUG = pytest.mark.xfail(
    strict=True,
    reason="TransformerLens 4.3 fold_value_biases looks for `_b_V` whenever cfg.n_key_value_heads "
    "is set (we always set it); on a model storing `b_V` it silently folds nothing",
)


@pytest.mark.parametrize("n_kv", [2, pytest.param(None, marks=_TL_MHA_VALUE_BIAS_BUG)],
                         ids=["gqa", "mha"])
def test_fold_value_biases_is_exact_only_without_shift(n_kv):
    """Why ``fold_layer_norm_`` never folds value biases.

    Vanilla (shift off): folding b_V into b_O is exact (attention rows sum to 1). Shifted: the
    value bias reaching position t is ``(beta1 + beta2) * b_V`` (``beta1 * b_V`` at t = 0), so
    TransformerLens' fold changes the log-probs. Both halves first check that b_V really was
    folded (zeroed): on the ``mha`` case this exposes a TransformerLens bug, where
    ``fold_value_biases`` looks for ``_b_V`` whenever ``cfg.n_key_value_heads`` is not None and so
    silently folds nothing on a model whose config states n_key_value_heads == n_heads.
    """
    vanilla = make(n_key_value_heads=n_kv, shift_k=False, shift_v=False)
    _with_value_biases(vanilla)
    shifted = make(n_key_value_heads=n_kv)
    set_random_shift(shifted)
    _with_value_biases(shifted)
    tokens = tokens_for(shifted)
    for model in (vanilla, shifted):
        assert all(p.abs().min() > 0 for p in _b_V_params(model))

    before_vanilla = _logprobs(vanilla, tokens)
    before_shifted = _logprobs(shifted, tokens)
    _fold_all(vanilla)
    _fold_all(shifted)
    for model in (vanilla, shifted):
        for p in _b_V_params(model):
            assert torch.equal(p, torch.zeros_like(p)), (
                "process_weights(fold_value_biases=True) left b_V unfolded")
    assert_close(_logprobs(vanilla, tokens), before_vanilla, atol=1e-5, rtol=1e-5)
    change = (_logprobs(shifted, tokens) - before_shifted).abs().max().item()
    assert change > 1e-2, f"folding value biases under the shift changed log-probs by only {change}"


# ================================================================== 3. Patching


def _patching_setup():
    model = make(shift_init="normal")
    set_random_shift(model)
    model.eval()
    g = torch.Generator().manual_seed(5)
    clean = torch.randint(0, model.cfg.d_vocab, (BATCH, SEQ), generator=g)
    corrupted = clean.clone()
    j = 3  # the only position where the prompts differ
    corrupted[:, j] = (clean[:, j] + 7) % model.cfg.d_vocab
    answer, other = 4, 9

    def metric(logits):
        return (logits[:, -1, answer] - logits[:, -1, other]).mean()

    return model, clean, corrupted, j, metric


def test_get_act_patch_resid_pre_matches_manual_patches():
    model, clean, corrupted, j, metric = _patching_setup()
    clean_logits, clean_cache = model.run_with_cache(clean)
    corrupted_logits = model(corrupted)
    clean_m, corrupted_m = metric(clean_logits).item(), metric(corrupted_logits).item()
    assert abs(clean_m - corrupted_m) > 1e-3  # the patch has something to recover

    result = patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric)
    assert result.shape == (N_LAYERS, SEQ)

    # Manual patches with run_with_hooks.
    for layer, pos in [(0, j), (0, 0), (1, j), (1, SEQ - 1), (1, j + 1)]:
        name = f"blocks.{layer}.hook_resid_pre"

        def hook(act, hook, pos=pos, name=name):
            act = act.clone()
            act[:, pos] = clean_cache[name][:, pos]
            return act

        manual = metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, hook)])).item()
        assert result[layer, pos].item() == pytest.approx(manual, abs=1e-5)

    # Independent of hooks: layer 0's residual differs only at position j (the token embedding),
    # so patching it there gives the clean run and anywhere else changes nothing; in later layers
    # positions before j are identical in both runs (the shift only reads backwards).
    expected_l0 = torch.full((SEQ,), corrupted_m)
    expected_l0[j] = clean_m
    assert_close(result[0], expected_l0, atol=1e-5, rtol=1e-5)
    assert_close(result[1, :j], torch.full((j,), corrupted_m), atol=1e-5, rtol=1e-5)


def test_get_act_patch_attn_head_out_all_pos_matches_manual_patches():
    model, clean, corrupted, j, metric = _patching_setup()
    H = model.cfg.n_heads
    _, clean_cache = model.run_with_cache(clean)
    _, corrupted_cache = model.run_with_cache(corrupted)

    result = patching.get_act_patch_attn_head_out_all_pos(model, corrupted, clean_cache, metric)
    assert result.shape == (N_LAYERS, H)

    for layer, head in [(0, 0), (0, H - 1), (1, 1), (1, H - 1)]:
        name = f"blocks.{layer}.attn.hook_z"

        def hook(z, hook, head=head, name=name):
            z = z.clone()
            z[:, :, head] = clean_cache[name][:, :, head]
            return z

        manual = metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, hook)])).item()
        assert result[layer, head].item() == pytest.approx(manual, abs=1e-5)

    # Independent of hooks for the last layer: swapping head h's z adds
    # (z_clean - z_corrupted)[h] @ W_O[h] to attn_out; then the MLP, final norm and unembedding.
    last = model.blocks[-1]
    name_z = f"blocks.{N_LAYERS - 1}.attn.hook_z"
    with torch.no_grad():
        for head in range(H):
            dz = clean_cache[name_z][:, :, head] - corrupted_cache[name_z][:, :, head]
            mid = corrupted_cache[f"blocks.{N_LAYERS - 1}.hook_resid_mid"]
            mid = mid + dz @ last.attn.W_O[head]
            post = mid + last.mlp(last.ln2(mid))
            logits = model.unembed(model.ln_final(post))
            assert result[-1, head].item() == pytest.approx(metric(logits).item(), abs=1e-5)


def test_patching_requires_eval_mode():
    model, clean, corrupted, _, metric = _patching_setup()
    _, clean_cache = model.run_with_cache(clean)
    model.train()
    with pytest.raises(ValueError, match="evaluation"):
        patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric)


# ================================================================== 4. Head detector


def _detector_model():
    cfg = tiny_config(d_model=32, d_head=8, n_layers=N_LAYERS, n_ctx=16, d_vocab=257, d_mlp=48,
                      shift_k=False, shift_v=False)
    model = HookedKVShiftTransformer(cfg, tokenizer=byte_level_tokenizer(),
                                     generator=torch.Generator().manual_seed(0))
    randomize(model, seed=2, scale=0.5)
    return model.eval()


def _mul_score(pattern: torch.Tensor, detection: torch.Tensor, exclude_bos=False) -> float:
    p = pattern.clone()
    if exclude_bos:
        p[:, 0] = 0
    return float((p * detection).sum() / p.sum())


def test_detect_head_scores_match_cached_pattern():
    model = _detector_model()
    text = "abcab cabxab"  # repeated tokens so duplicate / induction patterns are non-empty
    tokens = model.to_tokens(text)
    n = tokens.shape[1]
    assert 1 < n < model.cfg.n_ctx
    _, cache = model.run_with_cache(tokens)
    patterns = cache["blocks.0.attn.hook_pattern"], cache["blocks.1.attn.hook_pattern"]
    tok = tokens[0].tolist()

    # Detection patterns written out from their definitions.
    prev = torch.zeros(n, n)
    dup = torch.zeros(n, n)
    ind = torch.zeros(n, n)
    for i in range(n):
        for k in range(i + 1):
            prev[i, k] = float(k == i - 1)
            dup[i, k] = float(k < i and tok[k] == tok[i])
            ind[i, k] = float(1 <= k <= i and tok[k - 1] == tok[i] and k - 1 < i)
    assert dup.sum() > 0 and ind.sum() > 0

    for name, det in [("previous_token_head", prev), ("duplicate_token_head", dup),
                      ("induction_head", ind)]:
        for exclude_bos in (False, True):
            scores = detect_head(model, text, name, exclude_bos=exclude_bos)
            assert scores.shape == (N_LAYERS, model.cfg.n_heads)
            for layer in range(N_LAYERS):
                for h in range(model.cfg.n_heads):
                    ref = _mul_score(patterns[layer][0, h], det, exclude_bos)
                    assert scores[layer, h].item() == pytest.approx(ref, abs=1e-6), (
                        name, exclude_bos, layer, h)

    # Previous-token score = mean attention on the sub-diagonal (rows of the pattern sum to 1).
    scores = detect_head(model, text, "previous_token_head")
    for layer in range(N_LAYERS):
        direct = patterns[layer][0].diagonal(offset=-1, dim1=-2, dim2=-1).sum(-1) / n
        assert_close(scores[layer].float(), direct.float(), atol=1e-6, rtol=1e-6)

    # A subset of heads: the rest are -1. A passed cache (batch dim removed) gives the same.
    some = detect_head(model, text, "previous_token_head", heads=[(1, 2)])
    expected = -torch.ones_like(scores)
    expected[1, 2] = scores[1, 2]
    assert_close(some, expected)
    _, cache1 = model.run_with_cache(tokens, remove_batch_dim=True)
    pattern_copy = cache1["blocks.0.attn.hook_pattern"].clone()
    assert_close(detect_head(model, text, "previous_token_head", cache=cache1, exclude_bos=True),
                 detect_head(model, text, "previous_token_head", exclude_bos=True))
    assert torch.equal(cache1["blocks.0.attn.hook_pattern"], pattern_copy)  # cache not mutated


# ================================================================== 5. Training


class _RepeatedSequence(Dataset):
    def __init__(self, n_rows: int, seq: torch.Tensor):
        self.rows = seq[None].expand(n_rows, -1).clone()

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"tokens": self.rows[i]}


def test_tools_training_train_reduces_loss():
    model = build(d_model=32, d_head=8, n_layers=N_LAYERS, n_ctx=16, d_vocab=23, d_mlp=48,
                  randomize_weights=False, shift_init="normal")
    seq = torch.tensor([1, 5, 2, 7, 1, 5, 2, 7, 1, 5, 2, 7])
    data = _RepeatedSequence(16, seq)
    with torch.no_grad():
        logits0 = model(seq[None])
    initial = F.cross_entropy(logits0[0, :-1], seq[1:]).item()
    shift_before = model.blocks[0].attn.shift_k.detach().clone()

    cfg = TrainConfig(num_epochs=5, batch_size=4, lr=1e-2, print_every=None, device="cpu",
                      seed=0)
    out = train(model, cfg, data)  # 5 epochs x 4 batches = 20 Adam steps
    assert out is model
    assert model.cfg.device == "cpu"
    model.eval()
    with torch.no_grad():
        logits1 = model(seq[None])
    final = F.cross_entropy(logits1[0, :-1], seq[1:]).item()
    assert final < 0.25 * initial, (initial, final)
    assert model(seq[None], return_type="loss").item() == pytest.approx(final, rel=1e-5)
    # The shift coefficients are parameters like the rest: training moved them.
    assert not torch.equal(model.blocks[0].attn.shift_k.detach(), shift_before)


# ================================================================== 6. get_act_name and shapes


def test_get_act_name_resolves_and_shapes_match_contract():
    H, KV = 4, 2
    model = make(n_key_value_heads=KV)
    model.set_use_attn_result(True)
    cfg = model.cfg
    b, p, dm, dh, dmlp = BATCH, SEQ, cfg.d_model, cfg.d_head, cfg.d_mlp
    assert cfg.n_heads == H
    tokens = tokens_for(model)
    _, cache = model.run_with_cache(tokens)

    expected = {
        ("embed",): (b, p, dm),
        ("pos_embed",): (b, p, dm),
        ("scale",): (b, p, 1),  # ln_final
        ("normalized",): (b, p, dm),
    }
    for layer in range(N_LAYERS):
        expected.update({
            ("resid_pre", layer): (b, p, dm),
            ("resid_mid", layer): (b, p, dm),
            ("resid_post", layer): (b, p, dm),
            ("attn_out", layer): (b, p, dm),
            ("mlp_out", layer): (b, p, dm),
            ("q", layer): (b, p, H, dh),
            ("k", layer): (b, p, KV, dh),  # grouped-query: K/V per KV head, as TL's GQA
            ("v", layer): (b, p, KV, dh),
            ("z", layer): (b, p, H, dh),
            ("result", layer): (b, p, H, dm),
            ("pattern", layer): (b, H, p, p),
            ("attn_scores", layer): (b, H, p, p),
            ("scale", layer, "ln1"): (b, p, 1),
            ("scale", layer, "ln2"): (b, p, 1),
            ("normalized", layer, "ln1"): (b, p, dm),
            ("pre", layer): (b, p, dmlp),
            ("post", layer): (b, p, dmlp),
        })
    for key, shape in expected.items():
        name = get_act_name(*key)
        assert name in model.hook_dict, (key, name)
        assert name in cache.cache_dict, (key, name)
        assert tuple(cache[name].shape) == shape, (key, name, tuple(cache[name].shape))
        assert torch.equal(cache[key if len(key) > 1 else key[0]], cache[name])
    assert get_act_name("scale", 1, "ln1") == "blocks.1.ln1.hook_scale"
    assert get_act_name("scale") == "ln_final.hook_scale"
    # Values, not only shapes: pattern rows are distributions, scores causal, z = pattern @ V'.
    assert_close(cache["pattern", 0].sum(-1), torch.ones(b, H, p))
    assert torch.isinf(cache["attn_scores", 0][..., 0, 1]).all()
    v_shifted = cache["blocks.0.attn.hook_v_shifted"].repeat_interleave(H // KV, dim=2)
    z_ref = torch.einsum("bhqk,bkhd->bqhd", cache["pattern", 0], v_shifted)
    assert_close(cache["z", 0], z_ref, atol=1e-6, rtol=1e-5)

    # Split per-head inputs (block-level hooks, as HookedTransformer's TransformerBlock).
    model.set_use_split_qkv_input(True)
    _, split = model.run_with_cache(tokens)
    for key, shape in {("q_input", 0): (b, p, H, dm), ("k_input", 1): (b, p, KV, dm),
                       ("v_input", 1): (b, p, KV, dm)}.items():
        name = get_act_name(*key)
        assert name in model.hook_dict, (key, name)
        assert tuple(split[name].shape) == shape, (key, name)
        assert_close(split[name], cache["resid_pre", key[1]][:, :, None].expand(shape))


# ================================================================== 7. pos_slice, remove_batch_dim

# Position axis of each hook with a batch dim; None: no position axis (never sliced).
def _pos_dim(name: str) -> int | None:
    leaf = name.rsplit(".", 1)[-1]
    if leaf.startswith("hook_shift_"):
        return None
    if leaf in ("hook_pattern", "hook_attn_scores"):
        return 2  # [b, head, q_pos, k_pos]: the query axis
    return 1


@pytest.mark.parametrize("pos_slice", [3, (2, 6), [0, 4, 5]], ids=["int", "range", "list"])
@pytest.mark.parametrize("remove_batch_dim", [False, True])
def test_run_with_cache_pos_slice(pos_slice, remove_batch_dim):
    model = make(n_key_value_heads=2)
    set_random_shift(model)
    tokens = tokens_for(model, batch=1 if remove_batch_dim else BATCH)
    _, full = model.run_with_cache(tokens)
    _, sliced = model.run_with_cache(tokens, pos_slice=pos_slice,
                                     remove_batch_dim=remove_batch_dim)
    assert set(sliced.cache_dict) == set(full.cache_dict)
    assert sliced.has_batch_dim == (not remove_batch_dim)
    index = torch.tensor({"int": [3], "range": [2, 3, 4, 5], "list": [0, 4, 5]}[
        "list" if isinstance(pos_slice, list) else "range" if isinstance(pos_slice, tuple)
        else "int"])
    assert "blocks.0.attn.hook_k_shifted" in full.cache_dict
    assert tuple(full["blocks.0.attn.hook_k_shifted"].shape) == (tokens.shape[0], SEQ, 2, 8)
    assert tuple(full["blocks.0.attn.hook_shift_k"].shape) == (2, 2)
    for name, got in sliced.items():
        ref = full[name]
        dim = _pos_dim(name)
        if dim is not None:
            if remove_batch_dim:
                ref = ref[0]
                dim -= 1
            ref = ref.index_select(dim, index)
        assert got.shape == ref.shape, (name, got.shape, ref.shape)
        assert torch.equal(got, ref), name


def test_remove_batch_dim_batch_one():
    model = make()
    set_random_shift(model)
    tokens = tokens_for(model, batch=1)
    _, full = model.run_with_cache(tokens)
    _, nob = model.run_with_cache(tokens, remove_batch_dim=True)
    assert not nob.has_batch_dim
    for name, got in nob.items():
        expected = full[name] if _pos_dim(name) is None else full[name][0]
        assert torch.equal(got, expected), name
    assert tuple(nob["blocks.0.attn.hook_shift_v"].shape) == (model.cfg.n_key_value_heads, 2)
    assert tuple(nob["blocks.1.attn.hook_v_shifted"].shape) == (SEQ, model.cfg.n_key_value_heads,
                                                               model.cfg.d_head)
    # ActivationCache.remove_batch_dim on a full batch-1 cache agrees.
    _, later = model.run_with_cache(tokens)
    later.remove_batch_dim()
    for name in ("blocks.0.attn.hook_k_shifted", "blocks.1.hook_resid_post", "ln_final.hook_scale"):
        assert torch.equal(later[name], nob[name]), name
    with pytest.raises(AssertionError):
        model.run_with_cache(tokens_for(model, batch=2), remove_batch_dim=True)


def test_remove_batch_dim_keeps_a_single_kv_heads_coefficients():
    """TransformerLens squeezes every entry whose first axis is 1; the coefficient hooks'
    first axis is the KV head, so a model with one KV head would lose it. Ours keeps it, and
    every other entry matches run_with_cache(remove_batch_dim=True)."""
    model = make(n_key_value_heads=1)
    set_random_shift(model)
    tokens = tokens_for(model, batch=1)
    _, later = model.run_with_cache(tokens)
    later.remove_batch_dim()
    _, nob = model.run_with_cache(tokens, remove_batch_dim=True)
    assert tuple(later["blocks.0.attn.hook_shift_k"].shape) == (1, 2)
    assert torch.equal(later["blocks.0.attn.hook_shift_k"],
                       model.blocks[0].attn.coefficients("k").detach())
    assert set(later.keys()) == set(nob.keys())
    for name in nob.keys():
        assert torch.equal(later[name], nob[name]), name
    with pytest.raises(AssertionError, match="batch size 2"):
        model.run_with_cache(tokens_for(model, batch=2))[1].remove_batch_dim()


# ================================================================== 8. device / dtype


def test_cfg_device_and_dtype_follow_to():
    model = make()
    tokens = tokens_for(model)
    logits32 = model(tokens).detach()
    assert model.cfg.dtype == torch.float32

    model.to("cpu")
    assert model.cfg.device == "cpu"
    model.to(torch.device("cpu"))
    assert model.cfg.device == "cpu"

    model.to(torch.float64)
    assert model.cfg.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in model.parameters())
    logits64 = model(tokens)
    assert logits64.dtype == torch.float64
    assert_close(logits64.float(), logits32, atol=1e-5, rtol=1e-5)
    # Tools allocate with cfg.dtype / cfg.device (e.g. detect_head's score matrix).
    _, cache = model.run_with_cache(tokens)
    assert cache["blocks.0.attn.hook_k_shifted"].dtype == torch.float64

    move_to_and_update_config(model, torch.float32, print_details=False)
    assert model.cfg.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    move_to_and_update_config(model, "cpu", print_details=False)
    assert model.cfg.device == "cpu"
    model.double()
    assert model.cfg.dtype == torch.float64


# ================================================================== 9. evals and exploratory helpers

SUBSEQ = 8


def _text_model(tokenizer, d_vocab: int) -> HookedKVShiftTransformer:
    cfg = tiny_config(d_model=16, d_head=4, n_layers=2, n_ctx=2 * SUBSEQ, d_vocab=d_vocab, d_mlp=24)
    model = HookedKVShiftTransformer(cfg, tokenizer=tokenizer,
                                     generator=torch.Generator().manual_seed(0))
    randomize(model, seed=3)
    return model.eval()


def _bpe():
    from kvshift_lens.data.text import train_bpe_tokenizer

    return train_bpe_tokenizer(["the cat sat on the mat and the dog sat on the log\n"] * 20,
                               vocab_size=300)


@pytest.mark.parametrize("make_tokenizer", [byte_level_tokenizer, _bpe], ids=["byte", "bpe"])
def test_induction_loss_runs_unchanged(make_tokenizer):
    """``transformer_lens.evals.induction_loss`` reads ``model.tokenizer.bos_token_id`` and
    ``cfg.default_prepend_bos``; its number equals the loss written out here on the same random
    tokens (ids in [100, 20000), so d_vocab covers them and the tokenizer is smaller)."""
    raw = make_tokenizer()
    bos = raw.token_to_id("<|bos|>")  # 256 for bytes, 0 for the BPE
    model = _text_model(raw, d_vocab=20000)

    def run(seed: int, **kwargs) -> torch.Tensor:
        with torch.random.fork_rng(), torch.no_grad():
            torch.manual_seed(seed)
            return evals.induction_loss(model, batch_size=3, subseq_len=SUBSEQ, device="cpu",
                                        **kwargs)

    with torch.random.fork_rng():
        torch.manual_seed(11)
        half = torch.randint(100, 20000, (3, SUBSEQ))
    tokens = torch.cat([half, half], dim=1)

    def reference(tokens: torch.Tensor) -> torch.Tensor:
        """Mean loss on the second copy's tokens from its third on (t = SUBSEQ+2 .. 2*SUBSEQ-1),
        each predicted from the logits one position earlier."""
        with torch.no_grad():
            logp = F.log_softmax(model(tokens), dim=-1)
        losses = [-logp[b, t - 1, tokens[b, t]] for b in range(3)
                  for t in range(SUBSEQ + 2, 2 * SUBSEQ)]
        return torch.stack(losses).mean()

    with_bos = tokens.clone()
    with_bos[:, 0] = bos
    got = run(11)
    assert_close(got, reference(with_bos), atol=1e-5, rtol=1e-5)
    assert_close(run(11, prepend_bos=False), reference(tokens), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, run(11, prepend_bos=False))  # the BOS really went in


def test_test_prompt_runs_unchanged(capsys):
    """TransformerLens' ``test_prompt`` (to_tokens, to_str_tokens, to_string of a 0-d tensor):
    its tokenized prompt is ours and its answer rank is the rank computed here."""
    model = _text_model(byte_level_tokenizer(), d_vocab=257)
    exploratory_utils.test_prompt("abcab", "c", model, prepend_space_to_answer=False, top_k=3)
    out = capsys.readouterr().out
    assert "Tokenized prompt: ['<|bos|>', 'a', 'b', 'c', 'a', 'b']" in out
    with torch.no_grad():
        probs = model(torch.tensor([[256, 97, 98, 99, 97, 98]]))[0, -1].softmax(-1)
    rank = int((probs > probs[99]).sum())
    assert f"Ranks of the answer tokens: [('c', {rank})]" in " ".join(out.split())
    top = int(probs.argmax())
    assert f"Token: |{model.to_string(torch.tensor(top))}|" in out


# ================================================================== what differs under the shift


@pytest.mark.parametrize("window", [1, 2])
def test_patching_hook_v_moves_shifted_values_at_j_to_j_plus_w(window):
    """Patching hook_v at position j changes V' at j..j+w (README, "Coming from TransformerLens
    3"); patching hook_v_shifted changes it at j alone."""
    model = make(shift_window=window, dtype="float64")
    tokens = tokens_for(model)
    clean = tokens_for(model, seed=5)
    _, clean_cache = model.run_with_cache(clean)
    j = 3

    def changed_positions(name):
        def patch(v, hook):
            v = v.clone()
            v[:, j] = clean_cache[name][:, j]
            return v
        _, base = model.run_with_cache(tokens)
        with model.hooks(fwd_hooks=[(name, patch)]):
            _, patched = model.run_with_cache(tokens)
        diff = (patched["v_shifted", 0] - base["v_shifted", 0]).abs().amax(dim=(0, 2, 3))
        return [int(p) for p in (diff > 1e-12).nonzero().flatten()]

    assert changed_positions("blocks.0.attn.hook_v") == list(range(j, j + window + 1))
    assert changed_positions("blocks.0.attn.hook_v_shifted") == [j]


def test_pattern_is_softmax_of_shifted_queries_and_keys():
    model = make(shift_q=True, dtype="float64")
    _, cache = model.run_with_cache(tokens_for(model))
    d_head = model.cfg.d_head
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()

    def softmax_scores(q, k):
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / d_head**0.5
        return scores.masked_fill(~causal, float("-inf")).softmax(-1)

    for layer in range(N_LAYERS):
        pattern = cache["pattern", layer]
        shifted = softmax_scores(cache["q_shifted", layer], cache["k_shifted", layer])
        assert_close(shifted, pattern, atol=1e-12, rtol=1e-12)
        raw = softmax_scores(cache["q", layer], cache["k", layer])
        assert (raw - pattern).abs().max() > 1e-3
