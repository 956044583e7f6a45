"""Head scores against known answers: hand-written patterns whose scores are computed here by hand,
TransformerLens' head detector (same definitions, same numbers), brute-force eigenvalues, and the
hand-constructed models of :mod:`tests.probes`."""

from __future__ import annotations

from fractions import Fraction
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from transformer_lens import head_detector
from transformer_lens.head_detector import detect_head
from transformer_lens.hook_points import HookPoint
from transformer_lens.HookedRootModule import HookedRootModule

from kvshift_lens import HookedKVShiftTransformer, byte_level_tokenizer
from kvshift_lens.data.tasks import RepeatedTokensTask
from probes._hooks import get_patterns, head_coefficients
from probes.effective import effective_key_sources, effective_pattern, key_source_weights
from probes.scores import (
    copying_score,
    copying_scores,
    detection_score,
    duplicate_token_detection,
    duplicate_token_score,
    duplicate_token_scores,
    head_scores,
    in_context_learning_score,
    in_context_learning_score_from_losses,
    induction_detection,
    induction_score,
    induction_scores,
    prefix_matching_scores,
    previous_token_detection,
    previous_token_score,
    previous_token_scores,
    repeated_random_tokens,
    source_patterns,
    token_losses,
)
from tests.helpers import randomize, tiny_config
from tests.probes import shift_head_model

R = 5  # run length of the synthetic sequences: [BOS] r r, 11 tokens


def bos_r_r(run: list[int]) -> torch.Tensor:
    return torch.tensor([[0, *run, *run]])


def f(x: Fraction | int) -> float:
    return float(x)


# ================================================================== synthetic patterns


def pure_previous_token(n: int) -> torch.Tensor:
    p = torch.zeros(1, 1, n, n, dtype=torch.float64)
    p[0, 0, 0, 0] = 1
    for i in range(1, n):
        p[0, 0, i, i - 1] = 1
    return p


def pure_induction(n_run: int) -> torch.Tensor:
    """[BOS] r r: the second repeat's token i attends to i - n_run + 1 (the token after its earlier
    occurrence); every other query attends to BOS."""
    n = 1 + 2 * n_run
    p = torch.zeros(1, 1, n, n, dtype=torch.float64)
    p[0, 0, :, 0] = 1
    for i in range(n_run + 1, n):
        p[0, 0, i, 0] = 0
        p[0, 0, i, i - n_run + 1] = 1
    return p


def uniform_causal(n: int) -> torch.Tensor:
    return (torch.ones(n, n, dtype=torch.float64).tril() / torch.arange(1, n + 1)[:, None])[None, None]


def test_detection_patterns_match_transformer_lens():
    tokens = torch.tensor([[0, 3, 1, 3, 3, 2, 1, 3]])
    n = tokens.shape[1]
    assert torch.equal(previous_token_detection(n).float(),
                       head_detector.get_previous_token_head_detection_pattern(tokens))
    assert torch.equal(duplicate_token_detection(tokens)[0].float(),
                       head_detector.get_duplicate_token_head_detection_pattern(tokens))
    assert torch.equal(induction_detection(tokens)[0].float(),
                       head_detector.get_induction_head_detection_pattern(tokens))


def test_pure_previous_token_pattern():
    n = 1 + 2 * R
    p = pure_previous_token(n)
    tokens = bos_r_r([1, 2, 3, 4, 5])
    # every query i >= 1 puts all its attention on i - 1
    assert previous_token_score(p).item() == 1.0
    # detect_head's "mul": sum_{i>=1} 1 / sum of all attention (n rows of 1)
    assert_close(previous_token_score(p, queries="all").item(), f(Fraction(n - 1, n)))
    # i - 1 is never an earlier copy of token i, nor the token after one (R > 2)
    assert duplicate_token_score(p, tokens).item() == 0.0
    assert induction_score(p, tokens).item() == 0.0


def test_pure_induction_pattern():
    n = 1 + 2 * R
    p = pure_induction(R)
    tokens = bos_r_r([1, 2, 3, 4, 5])
    assert induction_score(p, tokens).item() == 1.0
    # detect_head: R rows of the second repeat out of n rows
    assert_close(induction_score(p, tokens, queries="all").item(), f(Fraction(R, n)))
    # only query 1 attends to i - 1 (BOS); rows 1..2R have the previous-token target
    assert_close(previous_token_score(p).item(), f(Fraction(1, 2 * R)))
    assert_close(previous_token_score(p, queries="all").item(), f(Fraction(1, n)))
    assert duplicate_token_score(p, tokens).item() == 0.0
    # excluding BOS removes the first repeat's attention: the induction rows are all that is left
    assert induction_score(p, tokens, queries="all", exclude_bos=True).item() == 1.0


def test_uniform_causal_pattern():
    n = 1 + 2 * R
    p = uniform_causal(n)
    tokens = bos_r_r([1, 2, 3, 4, 5])
    # previous token: query i (of i + 1 keys) gives 1 / (i + 1) to i - 1
    prev_rows = [Fraction(1, i + 1) for i in range(1, n)]
    assert_close(previous_token_score(p).item(), f(sum(prev_rows) / len(prev_rows)))
    assert_close(previous_token_score(p, queries="all").item(), f(sum(prev_rows) / n))
    # the second repeat's rows i = R+1 .. 2R each have exactly one duplicate (i - R) and one
    # induction target (i - R + 1), each getting 1 / (i + 1)
    rows = [Fraction(1, i + 1) for i in range(R + 1, n)]
    assert_close(duplicate_token_score(p, tokens).item(), f(sum(rows) / R))
    assert_close(induction_score(p, tokens).item(), f(sum(rows) / R))
    assert_close(induction_score(p, tokens, queries="all").item(), f(sum(rows) / n))


def test_batch_is_the_mean_of_sequences_and_leading_dims_are_kept():
    n = 1 + 2 * R
    p = torch.cat([pure_induction(R), uniform_causal(n)])  # batch of 2, 1 head
    tokens = torch.cat([bos_r_r([1, 2, 3, 4, 5]), bos_r_r([5, 4, 3, 2, 1])])
    each = [induction_score(p[b : b + 1], tokens[b : b + 1]).item() for b in range(2)]
    assert_close(induction_score(p, tokens).item(), sum(each) / 2)
    # [layer, batch, head, q, k] -> [layer, head]
    stacked = torch.stack([p, p.flip(0)]).repeat(1, 1, 3, 1, 1)
    out = induction_score(stacked, tokens)
    assert out.shape == (2, 3)
    assert_close(out, torch.full((2, 3), sum(each) / 2, dtype=torch.float64))


def test_sequences_without_a_target_are_left_out_and_none_at_all_is_an_error():
    n = 1 + 2 * R
    p = uniform_causal(n).repeat(2, 1, 1, 1)
    tokens = torch.cat([bos_r_r([1, 2, 3, 4, 5]), torch.arange(n)[None]])  # 2nd: no repeats
    assert_close(induction_score(p, tokens), induction_score(p[:1], tokens[:1]))
    with pytest.raises(ValueError, match="no query position has a target"):
        induction_score(p[1:], tokens[1:])
    assert induction_score(p[1:], tokens[1:], queries="all").item() == 0.0


@pytest.mark.parametrize("kind", ["previous_token_head", "duplicate_token_head", "induction_head"])
@pytest.mark.parametrize("exclude_bos,exclude_current", [(False, False), (True, False), (False, True)])
def test_all_queries_equals_transformer_lens_similarity_score(kind, exclude_bos, exclude_current):
    """queries="all" is detect_head's "mul" score, on random patterns and tokens with repeats."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 4, (1, 9), generator=g)
    scores = torch.randn(3, 9, 9, generator=g, dtype=torch.float64)
    p = scores.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    det = getattr(head_detector, f"get_{kind}_detection_pattern")(tokens)
    ours = detection_score(p[None], det.bool(), queries="all", exclude_bos=exclude_bos,
                           exclude_current_token=exclude_current)
    theirs = [head_detector.compute_head_attention_similarity_score(
        p[h], det.double(), exclude_bos=exclude_bos, exclude_current_token=exclude_current,
        error_measure="mul") for h in range(3)]
    assert_close(ours, torch.tensor(theirs, dtype=torch.float64), rtol=1e-12, atol=1e-12)


# ================================================================== effective / key sources


def test_value_shift_turns_a_self_attending_head_into_a_previous_token_head():
    """beta = (0, 1) on a head that attends to its own position: it reads the previous token."""
    n = 8
    p = torch.eye(n, dtype=torch.float64)[None, None]
    tokens = torch.arange(n)[None]
    assert previous_token_score(p).item() == 0.0
    eff = effective_pattern(p, torch.tensor([[0.0, 1.0]]))
    assert previous_token_score(eff).item() == 1.0
    # row 0 read position -1, i.e. nothing
    assert eff[0, 0, 0].abs().sum() == 0
    assert duplicate_token_score(eff, tokens.repeat(1, 1), queries="all").item() == 0.0


def test_key_sources_formula_gqa_and_none():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(2, 4, 6, 6, generator=g).tril()
    alpha = torch.tensor([[0.5, -1.5], [2.0, 0.0]])  # 2 KV heads for 4 query heads
    w = key_source_weights(alpha)
    assert_close(w, torch.tensor([[0.25, 0.75], [1.0, 0.0]]))
    out = effective_key_sources(p, alpha)
    for h in range(4):
        kv = h // 2
        expected = w[kv, 0] * p[:, h].clone()
        expected[..., :-1] += w[kv, 1] * p[:, h, :, 1:]
        assert_close(out[:, h], expected)
    assert torch.equal(effective_key_sources(p, None), p)
    assert torch.equal(effective_pattern(p, None), p)
    # value coefficients per KV head are repeated to query heads the same way
    beta = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert_close(effective_pattern(p, beta), effective_pattern(p, beta.repeat_interleave(2, 0)))
    with pytest.raises(ValueError, match="key_coeffs has 3 heads, pattern has 4"):
        effective_key_sources(p, torch.ones(3, 2))


def test_source_patterns_reproduce_the_heads_output():
    """On a random shifted model: value sources @ raw values == hook_z, and the key sources of a
    head whose key is one lag are that lag's shifted pattern."""
    model = HookedKVShiftTransformer(tiny_config(shift_window=2, n_key_value_heads=2,
                                                 dtype="float64"))
    randomize(model, seed=3)
    model.eval()
    tokens = torch.randint(0, model.cfg.d_vocab, (3, 10))
    pats = source_patterns(model, tokens)
    _, cache = model.run_with_cache(tokens)
    for layer in range(model.cfg.n_layers):
        v = cache["v", layer].repeat_interleave(2, dim=2)
        z = torch.einsum("bhqk,bkhd->bqhd", pats.value[layer], v)
        assert_close(z, cache["z", layer])
        assert_close(pats.position[layer], cache["pattern", layer])
    assert_close(pats.logits, model(tokens))
    with torch.no_grad():
        model.blocks[0].attn.shift_k.copy_(torch.tensor([[0.0, 0.0, 2.0], [0.0, -1.0, 0.0]]))
    pats = source_patterns(model, tokens)
    p = pats.position[0]
    assert_close(pats.key[0, :, :2, :, :-2], p[:, :2, :, 2:])  # KV head 0: two back
    assert_close(pats.key[0, :, 2:, :, :-1], p[:, 2:, :, 1:])  # KV head 1: one back
    assert head_coefficients(model, "k")[0, :, 2].tolist() == [2.0, 2.0, 0.0, 0.0]


# ================================================================== copying


def test_copying_score_known_circuits_and_brute_force_eigenvalues():
    V, d = 6, 4
    eye = torch.eye(V)
    W_V = torch.zeros(2, V, d)
    W_V[:, :d, :d] = torch.eye(d)
    W_O = torch.zeros(2, d, V)
    W_O[0, :d, :d] = 3 * torch.eye(d)  # copies (positive eigenvalues)
    W_O[1, :d, :d] = -torch.eye(d)  # anti-copies
    assert_close(copying_score(eye, W_V, W_O, eye), torch.tensor([1.0, -1.0]))
    # random weights: against the eigenvalues of the full [d_vocab, d_vocab] circuit
    g = torch.Generator().manual_seed(0)
    W_E, W_U = torch.randn(V, 8, generator=g), torch.randn(8, V, generator=g)
    W_V, W_O = torch.randn(3, 8, d, generator=g), torch.randn(3, d, 8, generator=g)
    for h in range(3):
        full = (W_E @ W_V[h] @ W_O[h] @ W_U).double()
        lam = torch.linalg.eigvals(full)
        expected = float(lam.sum().real / lam.abs().sum())
        assert_close(copying_score(W_E, W_V, W_O, W_U)[h].item(), expected, rtol=1e-5, atol=1e-6)


def test_copying_scores_of_a_model_read_its_weights():
    model = shift_head_model(d_vocab=7, n_ctx=16)
    assert_close(copying_scores(model), torch.ones(1, 1))
    with torch.no_grad():
        model.blocks[0].attn.W_O.neg_()
    assert_close(copying_scores(model), -torch.ones(1, 1))


# ================================================================== in-context learning


def test_icl_score_from_losses():
    losses = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0], [5.0, 5.0, 5.0, 4.0, 0.0]])  # tokens 1..5
    # token 5 minus token 2: rows (1 - 4), (0 - 5)
    assert in_context_learning_score_from_losses(losses, early=2, late=5) == -4.0
    for early, late in [(0, 3), (3, 3), (2, 6)]:
        with pytest.raises(ValueError, match="early < late"):
            in_context_learning_score_from_losses(losses, early=early, late=late)


def test_icl_score_of_an_induction_model_and_token_losses_convention():
    task = RepeatedTokensTask(d_vocab=16, run_length=10, distinct=True, bos=True)
    tokens = task.sample(4, torch.Generator().manual_seed(0)).tokens  # 21 tokens
    model = shift_head_model(16, 32)
    with torch.no_grad():
        losses = token_losses(model(tokens), tokens)
        assert_close(losses, model(tokens, return_type="loss", loss_per_token=True))
    # token 5 (first run: unpredictable) vs token 15 (second run: copied)
    score = in_context_learning_score(model, tokens, early=5, late=15)
    assert_close(score, float((losses[:, 14] - losses[:, 4]).mean()))
    assert score < -1.0


# ================================================================== TransformerLens agreement


def byte_model(shift: bool) -> HookedKVShiftTransformer:
    cfg = tiny_config(d_vocab=257, n_ctx=48, d_model=32, d_head=8, shift_k=shift, shift_v=shift,
                      dtype="float64")
    model = HookedKVShiftTransformer(cfg, tokenizer=byte_level_tokenizer())
    randomize(model, seed=1)
    return model.eval()


TEXTS = ["the cat sat on the mat. the cat sat", "one two one two three one two three."]


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("exclude_bos", [False, True])
def test_plain_scores_equal_detect_head(shift, exclude_bos):
    """Same definition, same numbers: queries="all" on hook_pattern is detect_head("mul"), on one
    prompt and on a list of prompts (detect_head's mean over prompts = our batch mean)."""
    model = byte_model(shift)
    texts = [TEXTS[0], TEXTS[1][: len(TEXTS[0])]]
    tokens = model.to_tokens(texts)
    ours = {
        "previous_token_head": previous_token_scores(model, tokens, effective=False, queries="all",
                                                     exclude_bos=exclude_bos),
        "duplicate_token_head": duplicate_token_scores(model, tokens, effective=False,
                                                       queries="all", exclude_bos=exclude_bos),
        "induction_head": induction_scores(model, tokens, effective=False, queries="all",
                                           exclude_bos=exclude_bos),
    }
    for name, score in ours.items():
        theirs = detect_head(model, texts, name, exclude_bos=exclude_bos, error_measure="mul")
        assert_close(score.double(), theirs, rtol=1e-12, atol=1e-12)
        one = detect_head(model, texts[0], name, exclude_bos=exclude_bos, error_measure="mul")
        mine = {"previous_token_head": previous_token_scores,
                "duplicate_token_head": duplicate_token_scores,
                "induction_head": induction_scores}[name](model, tokens[:1], effective=False,
                                                          queries="all", exclude_bos=exclude_bos)
        assert_close(mine.double(), one, rtol=1e-12, atol=1e-12)
    # prefix matching is the plain induction score; on an unshifted model effective == plain
    if not exclude_bos:
        assert_close(prefix_matching_scores(model, tokens, queries="all"), ours["induction_head"])
    if not shift:
        assert_close(induction_scores(model, tokens, queries="all", exclude_bos=exclude_bos),
                     ours["induction_head"])


def test_head_scores_fields_agree_with_the_single_score_functions():
    model = byte_model(shift=True)
    tokens = repeated_random_tokens(3, 10, 257, generator=torch.Generator().manual_seed(2))
    hs = head_scores(model, tokens)
    assert hs.shape == (2, 4)
    assert_close(hs.induction, induction_scores(model, tokens).float())
    assert_close(hs.prefix_matching, prefix_matching_scores(model, tokens).float())
    assert_close(hs.previous_token, previous_token_scores(model, tokens).float())
    assert_close(hs.previous_token_plain, previous_token_scores(model, tokens, effective=False).float())
    assert_close(hs.duplicate_token_plain, duplicate_token_scores(model, tokens, effective=False).float())
    assert_close(hs.copying, copying_scores(model))
    assert_close(hs.key_coeffs, model.shift_coefficients()["k"].float())
    assert not torch.equal(hs.induction, hs.prefix_matching)  # the shift matters here


# ================================================================== shifted heads, by hand


def test_plain_scores_misread_shifted_heads_effective_scores_do_not():
    """Hand-constructed one-layer heads on [BOS] r r (see tests.probes):

    - window 2, alpha = (0, 0, 1), beta = (0, 1, 0): an induction head (it solves the task) that
      attends one position past the induction stripe: detect_head says ~0, value sources say 1;
    - window 1, alpha = (0, 1), beta = (0, 1): attends on the stripe, so detect_head says
      induction ~1, but reads the earlier copy of the current token (it fails the task): value
      sources say duplicate 1, induction 0.
    """
    task = RepeatedTokensTask(d_vocab=16, run_length=8, distinct=True, bos=True)
    batch = task.sample(6, torch.Generator().manual_seed(0))
    late = shift_head_model(16, 24, key_coeffs=(0.0, 0.0, 1.0), value_coeffs=(0.0, 1.0, 0.0))
    fake = shift_head_model(16, 24, key_coeffs=(0.0, 1.0), value_coeffs=(0.0, 1.0))
    assert task.metrics(late(batch.tokens), batch)["accuracy"] == 1.0
    assert task.metrics(fake(batch.tokens), batch)["accuracy"] == 0.0

    det_late = detect_head(late, batch.tokens[:1], "induction_head")
    det_fake = detect_head(fake, batch.tokens[:1], "induction_head")
    assert det_late.item() < 0.01 and det_fake.item() > 0.45  # max is 8 / 17 (all rows count)

    assert induction_scores(late, batch.tokens, effective=False).item() < 0.01
    assert induction_scores(late, batch.tokens).item() > 0.99
    assert induction_scores(fake, batch.tokens, effective=False).item() > 0.99
    assert induction_scores(fake, batch.tokens).item() < 0.01
    assert duplicate_token_scores(fake, batch.tokens).item() > 0.99
    assert duplicate_token_scores(fake, batch.tokens, effective=False).item() < 0.01


# ================================================================== batches, devices, errors


def test_batch_of_one_and_many_and_1d_tokens():
    model = shift_head_model(16, 24)
    tokens = RepeatedTokensTask(d_vocab=16, run_length=8, distinct=True).sample(
        5, torch.Generator().manual_seed(4)).tokens
    each = torch.stack([induction_scores(model, tokens[b]) for b in range(5)])
    assert_close(induction_scores(model, tokens), each.mean(0))
    assert get_patterns(model, tokens).shape == (1, 5, 1, 17, 17)


class NoPatternModel(HookedRootModule):
    """A HookedRootModule with a config but no attention-pattern hook."""

    def __init__(self):
        super().__init__()
        self.cfg = SimpleNamespace(n_layers=1, n_heads=1, device="cpu")
        self.hook_embed = HookPoint()
        self.setup()

    def forward(self, tokens):
        return self.hook_embed(tokens.float())


def test_models_without_the_hooks_get_a_clear_error():
    tokens = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.hook_pattern"):
        induction_scores(nn.Linear(3, 3), tokens)
    with pytest.raises(ValueError, match=r"lacks the hook\(s\) \['blocks\.0\.attn\.hook_pattern'\]"):
        previous_token_scores(NoPatternModel(), tokens)
    with pytest.raises(ValueError, match="do not match pattern"):
        induction_score(torch.ones(1, 1, 4, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="queries"):
        previous_token_score(torch.ones(1, 1, 4, 4), queries="some")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_scores_on_cuda_match_cpu():
    model = shift_head_model(16, 24)
    tokens = RepeatedTokensTask(d_vocab=16, run_length=8, distinct=True).sample(
        3, torch.Generator().manual_seed(0)).tokens
    cpu = head_scores(model, tokens)
    gpu = head_scores(model.to("cuda"), tokens)  # tokens on CPU: moved to the model's device
    for name in ("previous_token", "duplicate_token", "induction", "prefix_matching", "key_match"):
        assert_close(getattr(gpu, name), getattr(cpu, name), rtol=1e-4, atol=1e-5)
