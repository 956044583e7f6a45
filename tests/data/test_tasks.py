"""Synthetic tasks against brute-force versions of their own definitions (plain Python loops)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvshift_lens.data import (
    BOS_TOKEN,
    IGNORE_INDEX,
    TASKS,
    AssociativeRecallTask,
    Batch,
    InductionTask,
    MultiHopInductionTask,
    NGramTask,
    RepeatedTokensTask,
    induction_accuracy,
    induction_predictions,
    make_task,
)

HYPOTHESIS = settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def as_lists(batch: Batch) -> tuple[list[list[int]], list[list[bool]]]:
    return batch.tokens.tolist(), batch.mask.tolist()


def masked_set(mask_row: list[bool]) -> set[int]:
    return {t for t, m in enumerate(mask_row) if m}


# ---------------------------------------------------------------------------------------------
# Brute-force definitions
# ---------------------------------------------------------------------------------------------


def earlier_occurrences(seq: list[int], t: int) -> list[int]:
    """Every j < t with seq[j] == seq[t]."""
    return [j for j in range(t) if seq[j] == seq[t]]


def sanford_find(seq: list[int], i: int) -> tuple[int, int]:
    """find(i) = max{j <= i : seq[j-1] == seq[i]} (0 when none), and how many j qualified."""
    candidates = [j for j in range(1, i + 1) if seq[j - 1] == seq[i]]
    return (max(candidates) if candidates else 0), len(candidates)


def sanford_hop(seq: list[int], i: int, k: int) -> tuple[int, list[int]]:
    """hop_k(seq)[i] and the number of candidates at each of the k finds."""
    counts = []
    for _ in range(k):
        i, n = sanford_find(seq, i)
        counts.append(n)
    return seq[i], counts


def brute_answers(task, batch: Batch) -> list[dict[int, int]]:
    """Per sequence: {t: the token the task's rule predicts at t+1}, over exactly the positions
    where the task's definition says the next token is predictable, recomputed from scratch."""
    tokens, _ = as_lists(batch)
    out = []
    for b, seq in enumerate(tokens):
        answers: dict[int, int] = {}
        if isinstance(task, InductionTask):
            d, length = int(batch.info["copy_start"][b]), int(batch.info["length"][b])
            for t in range(d, d + length - 1):  # inside the copy, next token inside the copy
                (j,) = earlier_occurrences(seq, t)  # unique by construction
                answers[t] = seq[j + 1]
        elif isinstance(task, RepeatedTokensTask):
            n = task.run_length
            for t in range(len(seq) - 1):
                if t >= task.first_token + n:  # current and next token both in a repeat
                    answers[t] = seq[t + 1 - n]
        elif isinstance(task, AssociativeRecallTask):
            start = task.first_token
            pairs = {seq[start + 2 * i]: seq[start + 2 * i + 1] for i in range(task.n_pairs)}
            for q in range(task.n_queries):
                t = start + 2 * task.n_pairs + 2 * q
                answers[t] = pairs[seq[t]]
        elif isinstance(task, MultiHopInductionTask):
            t = len(seq) - 2
            answers[t], _ = sanford_hop(seq, t, task.hops)
        elif isinstance(task, NGramTask):
            table = ngram_table_dict(task)
            for t in range(task.first_token + 1, len(seq) - 1):
                probs = table[(seq[t - 1], seq[t])]
                answers[t] = max(sorted(probs), key=lambda c: probs[c])  # lowest id on ties
        else:
            raise AssertionError(type(task))
        out.append(answers)
    return out


def ngram_table_dict(task: NGramTask) -> dict[tuple[int, int], dict[int, float]]:
    """{(a, b): {c: p(c | a, b)}} over token ids, from the task's sparse table."""
    first, n = task.first_token, task.n_content
    nxt, probs = task.table.next_tokens.tolist(), task.table.probs.tolist()
    return {
        (a + first, b + first): dict(zip(nxt[a][b], probs[a][b]))
        for a in range(n)
        for b in range(n)
    }


def perfect_logits(task, batch: Batch, answers: list[dict[int, int]]) -> torch.Tensor:
    logits = torch.zeros(*batch.tokens.shape, task.d_vocab)
    for b, per_seq in enumerate(answers):
        for t, token in per_seq.items():
            logits[b, t, token] = 30.0
    return logits


SMALL_TASKS = [
    InductionTask(d_vocab=32, seq_len=40),
    InductionTask(d_vocab=20, seq_len=33, min_length=3, max_length=9, bos=False),
    RepeatedTokensTask(d_vocab=16, run_length=12),
    RepeatedTokensTask(d_vocab=16, run_length=8, n_repeats=3, distinct=True, bos=False),
    AssociativeRecallTask(d_vocab=24, n_pairs=6, n_queries=3),
    MultiHopInductionTask(d_vocab=24, seq_len=32, hops=1),
    MultiHopInductionTask(d_vocab=24, seq_len=32, hops=3),
    NGramTask(d_vocab=12, seq_len=24, support=3),
    NGramTask(d_vocab=12, seq_len=24, support=2, table_seed=5, bos=True),
]
IDS = [repr(t) for t in SMALL_TASKS]


# ---------------------------------------------------------------------------------------------
# Every task: mask, answers, determinism, metrics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", SMALL_TASKS, ids=IDS)
def test_mask_is_exactly_the_predictable_positions(task):
    batch = task.sample(32, gen(0))
    assert batch.tokens.shape == batch.mask.shape == (32, task.seq_len)
    assert batch.tokens.dtype == torch.long and batch.mask.dtype == torch.bool
    assert int(batch.tokens.min()) >= 0 and int(batch.tokens.max()) < task.d_vocab
    tokens, mask = as_lists(batch)
    for seq, mask_row, answers in zip(tokens, mask, brute_answers(task, batch)):
        assert masked_set(mask_row) == set(answers)
        if task.bos:
            assert seq[0] == BOS_TOKEN and BOS_TOKEN not in seq[1:]
        if not isinstance(task, NGramTask):  # deterministic rules: the data follows them
            for t, token in answers.items():
                assert seq[t + 1] == token, (t, seq)


@pytest.mark.parametrize("task", SMALL_TASKS, ids=IDS)
def test_same_seed_same_batch_other_seed_other_batch_global_rng_untouched(task):
    state = torch.get_rng_state()
    first = task.sample(16, gen(7))
    torch.manual_seed(12345)  # the global RNG must not matter
    again = task.sample(16, gen(7))
    other = task.sample(16, gen(8))
    assert torch.equal(first.tokens, again.tokens) and torch.equal(first.mask, again.mask)
    assert first.info.keys() == again.info.keys()
    for key in first.info:
        assert torch.equal(first.info[key], again.info[key])
    assert not torch.equal(first.tokens, other.tokens)
    torch.set_rng_state(state)
    task.sample(4, gen(3))  # sampling neither reads nor advances the global RNG
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("task", SMALL_TASKS, ids=IDS)
def test_metrics_perfect_and_uniform_logits(task):
    batch = task.sample(32, gen(1))
    answers = brute_answers(task, batch)
    perfect = task.metrics(perfect_logits(task, batch, answers), batch)
    assert perfect["n_predictions"] == sum(len(a) for a in answers) == batch.n_predictions
    if isinstance(task, NGramTask):
        # The Bayes predictor is right exactly where the sample took the argmax successor.
        tokens, _ = as_lists(batch)
        hits = [seq[t + 1] == tok for seq, a in zip(tokens, answers) for t, tok in a.items()]
        assert perfect["accuracy"] == pytest.approx(sum(hits) / len(hits))
    else:
        assert perfect["accuracy"] == 1.0 == task.max_accuracy
        assert perfect["loss"] < 1e-6
    uniform = task.metrics(torch.zeros(*batch.tokens.shape, task.d_vocab), batch)
    assert uniform["loss"] == pytest.approx(math.log(task.d_vocab), rel=1e-6)
    # A model vocab larger than the task's is fine: the loss is then log of the larger vocab.
    wide = task.metrics(torch.zeros(*batch.tokens.shape, task.d_vocab + 5), batch)
    assert wide["loss"] == pytest.approx(math.log(task.d_vocab + 5), rel=1e-6)


@pytest.mark.parametrize("task", SMALL_TASKS[:1] + SMALL_TASKS[-1:], ids=IDS[:1] + IDS[-1:])
def test_loss_is_differentiable_and_matches_targets(task):
    batch = task.sample(8, gen(2))
    logits = torch.randn(*batch.tokens.shape, task.d_vocab, generator=gen(3)).requires_grad_()
    loss = task.loss(logits, batch)
    loss.backward()
    assert logits.grad is not None and logits.grad[~batch.mask].abs().max() == 0
    reference = torch.nn.functional.cross_entropy(
        logits.detach().flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX
    )
    torch.testing.assert_close(loss.detach(), reference)
    assert task.metrics(logits, batch)["loss"] == pytest.approx(float(reference), rel=1e-5)
    targets = batch.targets.tolist()
    tokens, mask = as_lists(batch)
    for seq, mask_row, target_row in zip(tokens, mask, targets):
        for t, m in enumerate(mask_row):
            assert target_row[t] == (seq[t + 1] if m else IGNORE_INDEX)


def test_metrics_reject_bad_logits():
    task = InductionTask(d_vocab=32, seq_len=40)
    batch = task.sample(4, gen(0))
    with pytest.raises(ValueError, match=r"\[4, 40, d_vocab\]"):
        task.metrics(torch.zeros(4, 39, 32), batch)
    with pytest.raises(ValueError, match="d_vocab=31"):
        task.metrics(torch.zeros(4, 40, 31), batch)


# ---------------------------------------------------------------------------------------------
# Induction with a random offset and length
# ---------------------------------------------------------------------------------------------


def check_induction_sequence(task: InductionTask, seq: list[int], mask_row, s: int, d: int, L: int):
    first, n_pos = task.first_token, task.seq_len
    assert task.min_length <= L <= task.max_length
    assert first <= s and s + L <= d and d + L <= n_pos  # two non-overlapping copies
    segment = seq[s : s + L]
    assert seq[d : d + L] == segment
    assert len(set(segment)) == L  # distinct
    copies = set(range(s, s + L)) | set(range(d, d + L))
    for t in range(first, n_pos):
        if t not in copies:
            assert seq[t] not in segment  # filler never uses a segment token
    # The definition: mask = positions from the copy's first token to its second to last.
    assert masked_set(mask_row) == set(range(d, d + L - 1))
    for t in masked_set(mask_row):
        (j,) = earlier_occurrences(seq, t)  # exactly one earlier occurrence of the current token
        assert j == s + (t - d)
        assert seq[j + 1] == seq[t + 1]  # induction is right


def test_induction_matches_definition_and_offsets_vary():
    task = InductionTask(d_vocab=64, seq_len=64)
    batch = task.sample(256, gen(0))
    tokens, mask = as_lists(batch)
    src, dst, lengths = (batch.info[k].tolist() for k in ("source_start", "copy_start", "length"))
    for seq, mask_row, s, d, L in zip(tokens, mask, src, dst, lengths):
        check_induction_sequence(task, seq, mask_row, s, d, L)
    offsets = {d - s for s, d in zip(src, dst)}
    assert len(offsets) >= 20 and len(set(lengths)) >= 20 and len(set(dst)) >= 20
    assert min(lengths) == task.min_length and max(lengths) == task.max_length == 31
    assert induction_accuracy(batch) == 1.0


@HYPOTHESIS
@given(
    bos=st.booleans(),
    d_vocab=st.integers(6, 40),
    seq_len=st.integers(8, 48),
    min_length=st.integers(2, 5),
    extra=st.integers(0, 20),
    seed=st.integers(0, 2**31),
)
def test_induction_any_valid_parameters(bos, d_vocab, seq_len, min_length, extra, seed):
    first = int(bos)
    fits = min((seq_len - first) // 2, d_vocab - first - 1)
    if min_length > fits:
        with pytest.raises(ValueError, match="min_length|seq_len"):
            InductionTask(d_vocab, seq_len, min_length, bos=bos)
        return
    task = InductionTask(d_vocab, seq_len, min_length, min(min_length + extra, fits), bos=bos)
    batch = task.sample(8, gen(seed))
    tokens, mask = as_lists(batch)
    for b, (seq, mask_row) in enumerate(zip(tokens, mask)):
        s, d, L = (int(batch.info[k][b]) for k in ("source_start", "copy_start", "length"))
        check_induction_sequence(task, seq, mask_row, s, d, L)


def test_induction_placements_are_uniform():
    # Length fixed at 2 in 7 free positions: slack 3 gives (3+1)(3+2)/2 = 10 placements (s, d).
    task = InductionTask(d_vocab=16, seq_len=8, min_length=2, max_length=2, bos=True)
    batch = task.sample(20000, gen(4))
    pairs = list(zip(batch.info["source_start"].tolist(), batch.info["copy_start"].tolist()))
    expected = {(s, d) for s in range(1, 8) for d in range(s + 2, 7)}
    counts = {p: pairs.count(p) for p in expected}
    assert set(pairs) == expected
    assert all(abs(c / len(pairs) - 0.1) < 0.01 for c in counts.values()), counts


# ---------------------------------------------------------------------------------------------
# Repeated tokens, associative recall, multi-hop
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("distinct", [False, True])
@pytest.mark.parametrize("n_repeats", [2, 3])
def test_repeated_tokens_structure(distinct, n_repeats):
    task = RepeatedTokensTask(d_vocab=20, run_length=10, n_repeats=n_repeats, distinct=distinct)
    batch = task.sample(64, gen(5))
    assert task.seq_len == 1 + 10 * n_repeats
    tokens, mask = as_lists(batch)
    any_repeat_in_run = False
    for seq, mask_row in zip(tokens, mask):
        run = seq[1:11]
        assert seq[1:] == run * n_repeats
        any_repeat_in_run |= len(set(run)) < 10
        if distinct:
            assert len(set(run)) == 10
        assert masked_set(mask_row) == set(range(11, task.seq_len - 1))
    if distinct:
        assert induction_accuracy(batch) == 1.0
    else:
        # Accidental repeats in the run make a pure induction head fall short of the ceiling.
        assert any_repeat_in_run and induction_accuracy(batch) < 1.0 == task.max_accuracy


def test_associative_recall_structure():
    task = AssociativeRecallTask(d_vocab=33, n_pairs=10, n_queries=4)
    assert list(task.key_tokens) == list(range(1, 17))
    assert list(task.value_tokens) == list(range(17, 33))
    batch = task.sample(64, gen(6))
    tokens, mask = as_lists(batch)
    for seq, mask_row in zip(tokens, mask):
        keys, values = seq[1:21:2], seq[2:21:2]
        assert len(set(keys)) == 10 and set(keys) <= set(task.key_tokens)
        assert set(values) <= set(task.value_tokens)
        queries = seq[21::2]
        assert len(set(queries)) == 4 and set(queries) <= set(keys)
        for q_pos in range(21, task.seq_len, 2):
            assert seq[q_pos + 1] == values[keys.index(seq[q_pos])]
        assert masked_set(mask_row) == set(range(21, task.seq_len, 2))
    assert induction_accuracy(batch) == 1.0


@pytest.mark.parametrize("hops", [1, 2, 4])
def test_multi_hop_follows_the_chain_uniquely(hops):
    task = MultiHopInductionTask(d_vocab=32, seq_len=40, hops=hops)
    batch = task.sample(64, gen(hops))
    tokens, mask = as_lists(batch)
    chains = batch.info["chain"].tolist()
    for seq, mask_row, chain in zip(tokens, mask, chains):
        t = task.seq_len - 2
        assert masked_set(mask_row) == {t}
        answer, counts = sanford_hop(seq, t, hops)
        assert answer == seq[t + 1] == chain[hops] and seq[t] == chain[0]
        assert counts == [1] * hops  # every find has exactly one candidate: no tie-breaking
        # Stopping early gives the intermediate chain token, never the answer.
        for h in range(1, hops):
            assert sanford_hop(seq, t, h)[0] == chain[h] != answer
        # Chain tokens: c_0 and c_k twice (bigram + query/answer), the middle ones twice.
        assert all(seq.count(c) == 2 for c in chain)
    starts = batch.info["bigram_starts"]
    assert len(set(starts[:, 0].tolist())) > 5  # the chain is not at a fixed place
    assert induction_accuracy(batch) == (1.0 if hops == 1 else 0.0)


def test_multi_hop_metrics_report_early_stopping():
    task = MultiHopInductionTask(d_vocab=32, seq_len=40, hops=3)
    batch = task.sample(16, gen(0))
    logits = torch.zeros(16, 40, 32)
    chain = batch.info["chain"]
    logits[torch.arange(16), -2, chain[:, 1]] = 10.0  # a model that stops after one hop
    out = task.metrics(logits, batch)
    assert out["accuracy"] == 0.0 and out["predicts_hop_1"] == 1.0 and out["predicts_hop_2"] == 0


# ---------------------------------------------------------------------------------------------
# n-grams
# ---------------------------------------------------------------------------------------------


def test_ngram_table_and_samples_follow_it():
    task = NGramTask(d_vocab=16, seq_len=32, support=3, table_seed=2)
    table = ngram_table_dict(task)
    assert len(table) == 16 * 16
    for probs in table.values():
        assert len(probs) == 3 and all(p > 0 for p in probs.values())
        assert set(probs) <= set(range(16))
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-12)
    batch = task.sample(128, gen(0))
    tokens, _ = as_lists(batch)
    for seq in tokens:
        for t in range(2, len(seq)):
            assert table[(seq[t - 2], seq[t - 1])].get(seq[t], 0.0) > 0
    # Empirical transition frequencies of one frequent context match its probabilities.
    counts: dict[tuple[int, int], dict[int, int]] = {}
    big = task.sample(2048, gen(1)).tokens.tolist()
    for seq in big:
        for t in range(2, len(seq)):
            row = counts.setdefault((seq[t - 2], seq[t - 1]), {})
            row[seq[t]] = row.get(seq[t], 0) + 1
    context, row = max(counts.items(), key=lambda kv: sum(kv[1].values()))
    total = sum(row.values())
    assert total > 200
    for c, p in table[context].items():
        assert row.get(c, 0) / total == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / total))


def test_ngram_table_depends_only_on_table_seed():
    a, b = NGramTask(d_vocab=10, table_seed=3), NGramTask(d_vocab=10, table_seed=3, seq_len=9)
    c = NGramTask(d_vocab=10, table_seed=4)
    assert torch.equal(a.table.next_tokens, b.table.next_tokens)
    assert torch.equal(a.table.probs, b.table.probs)
    assert not torch.equal(a.table.probs, c.table.probs)
    dense = a.table.dense(10)
    torch.testing.assert_close(dense.sum(-1), torch.ones(10, 10, dtype=torch.float64))


def test_ngram_bayes_predictor_reaches_the_analytic_ceiling():
    task = NGramTask(d_vocab=12, seq_len=48, support=3, table_seed=1)
    batch = task.sample(512, gen(9))
    answers = brute_answers(task, batch)
    tokens, _ = as_lists(batch)
    hits = [seq[t + 1] == tok for seq, a in zip(tokens, answers) for t, tok in a.items()]
    empirical = sum(hits) / len(hits)
    assert 0.4 < task.max_accuracy < 0.95
    assert empirical == pytest.approx(task.max_accuracy, abs=0.015)
    scored = task.metrics(task.bayes_logits(batch.tokens), batch)
    assert scored["accuracy"] == pytest.approx(empirical)
    assert scored["loss"] == pytest.approx(task.min_loss, abs=0.03)


@pytest.mark.parametrize("bos", [False, True])
def test_ngram_ceiling_is_exact_by_enumeration(bos):
    # Tiny language: enumerate every sequence with its probability, average over masked positions.
    task = NGramTask(d_vocab=3 + bos, seq_len=6 + bos, support=2, table_seed=11, bos=bos)
    table = ngram_table_dict(task)
    content = list(range(task.first_token, task.d_vocab))
    n_body = task.seq_len - task.first_token
    accuracy = entropy = 0.0
    for seq in itertools.product(content, repeat=n_body):
        p = 1.0 / len(content) ** 2  # the first two content tokens are uniform
        for t in range(2, n_body):
            p *= table[(seq[t - 2], seq[t - 1])].get(seq[t], 0.0)
        for t in range(2, n_body):  # each generated token, predicted from its context
            probs = table[(seq[t - 2], seq[t - 1])]
            accuracy += p * max(probs.values())
            entropy += p * -sum(q * math.log(q) for q in probs.values())
    n_predicted = n_body - 2
    assert task.max_accuracy == pytest.approx(accuracy / n_predicted, rel=1e-12)
    assert task.min_loss == pytest.approx(entropy / n_predicted, rel=1e-12)


def test_ngram_with_support_one_is_deterministic():
    task = NGramTask(d_vocab=9, seq_len=20, support=1)
    assert task.max_accuracy == pytest.approx(1.0) and task.min_loss == pytest.approx(0.0)
    batch = task.sample(8, gen(0))
    assert task.metrics(task.bayes_logits(batch.tokens), batch)["accuracy"] == 1.0


# ---------------------------------------------------------------------------------------------
# The induction oracle
# ---------------------------------------------------------------------------------------------


def test_induction_predictions_match_brute_force():
    tokens = torch.randint(0, 6, (16, 24), generator=gen(0))
    predictions, found = induction_predictions(tokens)
    for seq, pred_row, found_row in zip(tokens.tolist(), predictions.tolist(), found.tolist()):
        for t in range(len(seq)):
            js = earlier_occurrences(seq, t)
            assert found_row[t] == bool(js)
            if js:
                assert pred_row[t] == seq[max(js) + 1]


# ---------------------------------------------------------------------------------------------
# Validation, registry, batches
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "kwargs", "field"),
    [
        (InductionTask, {"d_vocab": 3}, "d_vocab"),
        (InductionTask, {"seq_len": 4}, "seq_len"),
        (InductionTask, {"min_length": 1}, "min_length"),
        (InductionTask, {"min_length": 5, "max_length": 4}, "max_length"),
        (InductionTask, {"seq_len": 20, "max_length": 10}, "max_length"),
        (InductionTask, {"d_vocab": 8, "max_length": 8}, "max_length"),
        (InductionTask, {"d_vocab": 8, "min_length": 7}, "min_length"),
        (InductionTask, {"seq_len": 64.0}, "seq_len"),
        (InductionTask, {"bos": 1}, "bos"),
        (RepeatedTokensTask, {"run_length": 1}, "run_length"),
        (RepeatedTokensTask, {"n_repeats": 1}, "n_repeats"),
        (RepeatedTokensTask, {"d_vocab": 10, "distinct": True, "run_length": 10}, "run_length"),
        (AssociativeRecallTask, {"d_vocab": 9, "n_pairs": 5}, "n_pairs"),
        (AssociativeRecallTask, {"n_pairs": 2, "n_queries": 3}, "n_queries"),
        (AssociativeRecallTask, {"n_queries": 0}, "n_queries"),
        (MultiHopInductionTask, {"hops": 0}, "hops"),
        (MultiHopInductionTask, {"seq_len": 10, "hops": 4}, "seq_len"),
        (MultiHopInductionTask, {"d_vocab": 6, "hops": 4}, "hops"),
        (NGramTask, {"support": 0}, "support"),
        (NGramTask, {"d_vocab": 5, "support": 6}, "support"),
        (NGramTask, {"seq_len": 2}, "seq_len"),
        (NGramTask, {"table_seed": -1}, "table_seed"),
        (NGramTask, {"d_vocab": True}, "d_vocab"),
    ],
)
def test_bad_parameters_name_the_field(cls, kwargs, field):
    with pytest.raises(ValueError, match=rf"{cls.__name__}: {field}="):
        cls(**kwargs)


def test_make_task_and_registry():
    assert set(TASKS) == {"induction", "repeated_tokens", "associative_recall", "multi_hop", "ngram"}
    for name, cls in TASKS.items():
        task = make_task(name)
        assert isinstance(task, cls) and task.name == name
        assert task.sample(2, gen(0)).tokens.shape == (2, task.seq_len)
    assert make_task("induction", d_vocab=32, seq_len=16) == InductionTask(32, 16)
    with pytest.raises(ValueError, match="associative_recall, induction, multi_hop, ngram"):
        make_task("inductoin")
    with pytest.raises(ValueError, match="'vocab'.*d_vocab, seq_len"):
        make_task("induction", vocab=10)


def test_tasks_are_frozen_and_max_length_is_resolved():
    task = InductionTask(d_vocab=10, seq_len=64)
    assert task.max_length == 8  # limited by the vocabulary: 9 content tokens, one kept for filler
    with pytest.raises(AttributeError):
        task.seq_len = 3  # type: ignore[misc]


def test_sample_and_batch_validation():
    task = RepeatedTokensTask(d_vocab=8, run_length=4)
    with pytest.raises(ValueError, match="batch_size"):
        task.sample(0, gen(0))
    with pytest.raises(TypeError, match="torch.Generator"):
        task.sample(2, 0)  # type: ignore[arg-type]
    tokens = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="last position"):
        Batch(tokens, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="int64"):
        Batch(tokens.int(), torch.zeros(2, 5, dtype=torch.bool))
    batch = task.sample(2, gen(0)).to("cpu")
    assert batch.n_predictions == 2 * 3
