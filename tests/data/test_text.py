"""Text corpora, the document-level split, tokenizers and TextTask, each against an independent
check (hashlib for the split, UTF-8 bytes for the byte tokenizer, plain-list searches for windows)."""

from __future__ import annotations

import hashlib
import json
import random
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvshift_lens import HookedKVShiftTransformer, byte_level_tokenizer
from kvshift_lens.data import (
    DEFAULT_CHUNK_CHARS,
    Batch,
    CorpusError,
    CorpusNotFoundError,
    CorpusUnavailableError,
    Document,
    SyntheticTask,
    TextTask,
    chunk_documents,
    encode_documents,
    load_corpus,
    load_documents,
    load_tokenizer,
    save_tokenizer,
    split_documents,
    stdlib_corpus_files,
    stdlib_root,
    train_bpe_tokenizer,
    validation_score,
)
from kvshift_lens.tokenizer import as_hf_tokenizer
from tests.helpers import tiny_config

HYPOTHESIS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
BYTE_BOS_ID = 256
WORDS = (
    "the model attends to the previous token and copies what followed it when the pattern "
    "repeats induction heads form after a phase change shift keys and values by one position"
).split()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def in_val(name: str, fraction: float) -> bool:
    """The split's definition, written out independently with hashlib."""
    return int(hashlib.sha1(name.encode()).hexdigest()[:16], 16) / 2**64 < fraction


def prose(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + ".\n"


def write_corpus(folder: Path, n_files: int, seed: int = 0, words: int = 30) -> dict[str, str]:
    """``n_files`` distinct text files ``doc_XX.txt`` in ``folder``; returns name -> text."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for i in range(n_files):
        name = f"doc_{i:02d}.txt"
        text = f"# document {i}: ünïcødé ✓\n" + prose(rng, words)
        (folder / name).write_text(text, encoding="utf-8")
        out[name] = text
    return out


def byte_stream(texts: list[str]) -> list[int]:
    """The byte-level stream by definition: BOS, then the UTF-8 bytes, per document."""
    out: list[int] = []
    for t in texts:
        out += [BYTE_BOS_ID, *t.encode("utf-8")]
    return out


def occurrences(stream: list[int], window: list[int]) -> list[int]:
    n = len(window)
    return [i for i in range(len(stream) - n + 1) if stream[i : i + n] == window]


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def test_load_directory_sorted_recursive_skips_hidden_binary_empty_and_duplicates(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / ".hidden_dir").mkdir()
    (root / "b.txt").write_text("bee\n")
    (root / "a.md").write_text("ay ✓\n")
    (root / "sub" / "c.py").write_text("print('c')\n")
    (root / "sub" / "copy_of_b.txt").write_text("bee\n")  # exact duplicate of b.txt
    (root / "empty.txt").write_text("")
    (root / ".secret").write_text("hidden file")
    (root / ".hidden_dir" / "x.txt").write_text("hidden folder")
    (root / "image.bin").write_bytes(b"\x89PNG\x00\x01\x02")
    docs = load_documents(root)
    assert [(d.name, d.text) for d in docs] == [
        ("a.md", "ay ✓\n"),
        ("b.txt", "bee\n"),
        ("sub/c.py", "print('c')\n"),
    ]
    assert load_corpus(str(root)) == ["ay ✓\n", "bee\n", "print('c')\n"]
    assert load_corpus(root, max_files=2) == ["ay ✓\n", "bee\n"]


def test_load_file_and_globs(tmp_path):
    texts = write_corpus(tmp_path / "data", 5)
    (tmp_path / "data" / "notes.md").write_text("markdown\n")
    (tmp_path / "data" / "deep").mkdir()
    (tmp_path / "data" / "deep" / "z.txt").write_text("deep text\n")
    one = tmp_path / "data" / "doc_03.txt"
    assert load_documents(one) == [Document("doc_03.txt", texts["doc_03.txt"])]
    got = load_documents(str(tmp_path / "data" / "*.txt"))
    assert [d.name for d in got] == sorted(texts)
    assert [d.text for d in got] == [texts[n] for n in sorted(texts)]
    deep = load_documents(str(tmp_path / "data" / "**" / "*.txt"))
    assert [d.name for d in deep] == ["deep/z.txt", *sorted(texts)]


def test_max_bytes_cuts_at_a_character_boundary(tmp_path):
    (tmp_path / "a.txt").write_text("ab")
    (tmp_path / "b.txt").write_text("ééé")  # 6 bytes
    (tmp_path / "c.txt").write_text("never read")
    assert load_corpus(tmp_path, max_bytes=5) == ["ab", "é"]  # 2 + 2 bytes: the 3rd byte is half a char
    assert load_corpus(tmp_path, max_bytes=8) == ["ab", "ééé"]
    assert load_corpus(tmp_path, max_bytes=1) == ["a"]


def test_errors_name_the_bad_source(tmp_path):
    missing = tmp_path / "no_such_dir" / "corpus.txt"
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        load_corpus(missing)
    pattern = str(tmp_path / "nothing_here_*.txt")
    with pytest.raises(FileNotFoundError, match="nothing_here_"):
        load_corpus(pattern)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty_dir"):
        load_corpus(empty)
    blank = tmp_path / "blank_dir"
    blank.mkdir()
    (blank / "a.txt").write_text("")
    with pytest.raises(ValueError, match="blank_dir"):
        load_corpus(blank)
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x00\x01")
    with pytest.raises(ValueError, match="blob.bin"):
        load_corpus(binary)
    with pytest.raises(ValueError, match="hf:NAME"):
        load_corpus("hf:")
    with pytest.raises(ValueError, match="max_files"):
        load_corpus(tmp_path, max_files=0)


def one_line(e: BaseException) -> str:
    message = str(e)
    assert "\n" not in message and len(message) < 300, message
    return message


def test_missing_sources_are_one_line_errors_naming_them(tmp_path):
    pattern = str(tmp_path / "corpus" / "*.txt")
    with pytest.raises(CorpusNotFoundError) as e:
        load_documents(pattern)
    assert pattern in one_line(e.value) and "matches no file" in str(e.value)
    # both a FileNotFoundError (what it is) and a ValueError (bad input), as the CLI expects
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, ValueError)
    missing = tmp_path / "data" / "corpus.txt"
    with pytest.raises(CorpusNotFoundError) as e:
        load_documents(missing)
    assert str(missing) in one_line(e.value) and f"{tmp_path / 'data'} is missing" in str(e.value)
    (tmp_path / "folder_only.txt").mkdir()
    with pytest.raises(CorpusNotFoundError, match="matches no file .1 folders only"):
        load_documents(str(tmp_path / "folder_only*"))


def test_unreadable_file_is_a_one_line_error(tmp_path, monkeypatch):
    good = tmp_path / "c" / "a.txt"
    good.parent.mkdir()
    good.write_text("text\n")

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    for source in (good, good.parent, str(good.parent / "*.txt")):
        with pytest.raises(CorpusUnavailableError) as e:
            load_documents(source)
        assert str(good) in one_line(e.value) and "Permission denied" in str(e.value)
        assert isinstance(e.value, OSError) and isinstance(e.value, ValueError)


def test_cli_reports_a_bad_corpus_in_one_line(tmp_path, capsys):
    from kvshift_lens.cli import main

    pattern = str(tmp_path / "nothing_*.txt")
    for source in (pattern, str(tmp_path / "missing.txt")):
        code = main(["train", "--task", "text", "--task-arg", f"source={json.dumps(source)}",
                     "--steps", "1", "--out", str(tmp_path / "run")])
        out, err = capsys.readouterr()
        assert code != 0 and len(err.strip().splitlines()) == 1, err
        assert source in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def long_text(n_lines: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(prose(rng, rng.randint(1, 25)) for _ in range(n_lines))


@HYPOTHESIS
@given(text=st.text(alphabet="ab \n", max_size=400), size=st.integers(1, 50))
def test_chunks_are_whole_lines_where_possible_and_join_to_the_text(text, size):
    pieces = chunk_documents([Document("f.txt", text)], size) if text else []
    if len(text) <= size:
        assert pieces == ([Document("f.txt", text)] if text else [])
        return
    assert [d.name for d in pieces] == [f"f.txt#{i}" for i in range(len(pieces))]
    assert "".join(d.text for d in pieces) == text
    start = 0
    for d in pieces[:-1]:
        n = len(d.text)
        assert 1 <= n <= size
        window = text[start : start + size]
        if d.text.endswith("\n") and n > size // 2:
            assert "\n" not in window[n:]  # the last line break of the window's second half
        else:
            assert n == size and "\n" not in window[size // 2 :]
        start += n
    assert 1 <= len(pieces[-1].text) <= size


def test_single_file_corpus_is_cut_into_chunks_with_both_splits(tmp_path):
    text = long_text(4000, seed=5)  # ~270 kB: ~33 chunks
    path = tmp_path / "book.txt"
    path.write_text(text, encoding="utf-8")
    docs = load_documents(path)
    # every piece but the last holds more than half of DEFAULT_CHUNK_CHARS
    assert len(text) / DEFAULT_CHUNK_CHARS <= len(docs) < 2 * len(text) / DEFAULT_CHUNK_CHARS + 1
    assert [d.name for d in docs] == [f"book.txt#{i}" for i in range(len(docs))]
    assert "".join(d.text for d in docs) == text
    assert all(d.text.endswith("\n") and len(d.text) <= DEFAULT_CHUNK_CHARS for d in docs)
    train, val = TextTask.splits(path, seq_len=32, val_fraction=0.1)
    val_docs = [d for d in docs if in_val(d.name, 0.1)]
    assert val_docs  # the hash alone gives this file a validation split
    assert val.tokens.tolist() == byte_stream([d.text for d in val_docs])
    assert train.tokens.tolist() == byte_stream([d.text for d in docs if not in_val(d.name, 0.1)])
    assert train.n_documents + val.n_documents == len(docs) and val.n_documents == len(val_docs)
    # chunk_chars=0 keeps the file whole (one document: no validation split)
    assert load_documents(path, chunk_chars=0) == [Document("book.txt", text)]
    with pytest.raises(CorpusError, match="chunk_chars"):
        load_documents(path, chunk_chars=-1)


def test_multi_file_corpora_are_not_cut_unless_asked(tmp_path):
    long = long_text(400, seed=6)
    assert len(long) > DEFAULT_CHUNK_CHARS
    (tmp_path / "a.txt").write_text(long)
    (tmp_path / "b.txt").write_text("short\n")
    assert load_documents(tmp_path) == [Document("a.txt", long), Document("b.txt", "short\n")]
    cut = load_documents(tmp_path, chunk_chars=5000)
    assert [d.name for d in cut][-1] == "b.txt" and cut[0].name == "a.txt#0"
    assert "".join(d.text for d in cut[:-1]) == long


def test_single_file_trains_and_evaluates(tmp_path):
    from kvshift_lens.train import RunSpec, TrainConfig, train

    path = tmp_path / "one_file.txt"
    path.write_text(long_text(1500, seed=7))
    task = {"name": "text", "source": str(path), "seq_len": 16}
    spec = RunSpec(model=dict(d_model=16, d_head=4, n_layers=1, attn_only=True), task=task,
                   train=TrainConfig(steps=2, batch_size=4, eval_every=2, eval_batches=1,
                                     progress=False, device="cpu"))
    result = train(spec, tmp_path / "run")
    _, val = TextTask.splits(path, seq_len=16)
    assert val.n_documents >= 1
    batch = next(iter(val.eval_batches(4, 1)))
    with torch.no_grad():
        expected = val.metrics(result.model.eval()(batch.tokens), batch)["loss"]
    assert result.final_metrics["loss"] == pytest.approx(expected, rel=1e-5)


def test_split_never_leaves_a_split_empty_when_it_can_avoid_it(tmp_path):
    write_corpus(tmp_path, 5)
    docs = load_documents(tmp_path)
    scores = {d.name: validation_score(d.name) for d in docs}
    train, val = split_documents(docs, 1e-9)  # the hash puts nothing in validation
    assert not any(in_val(d.name, 1e-9) for d in docs)
    assert [d.name for d in val] == [min(scores, key=scores.get)]
    assert [d.name for d in train] == [d.name for d in docs if d.name != val[0].name]
    train, val = split_documents(docs, 1 - 1e-9)  # ... everything
    assert [d.name for d in train] == [max(scores, key=scores.get)]
    assert split_documents(docs, 0.0) == (docs, [])  # no validation asked for: none made
    assert split_documents(docs[:1], 0.5) in ((docs[:1], []), ([], docs[:1]))


# ---------------------------------------------------------------------------------------------
# The stdlib corpus
# ---------------------------------------------------------------------------------------------


def test_stdlib_corpus_is_python_sources_without_tests_or_site_packages():
    root = stdlib_root()
    files = stdlib_corpus_files()
    assert len(files) > 100
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel)
    assert all(f.suffix == ".py" and f.is_file() for f in files)
    excluded = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
    assert not any(excluded & set(Path(r).parts[:-1]) for r in rel)
    assert {"os.py", "json/__init__.py", "collections/__init__.py"} <= set(rel)
    assert stdlib_corpus_files(max_files=7) == files[:7]


def test_stdlib_task_builds_from_a_few_files():
    docs = load_documents("stdlib", max_files=20)
    assert len(docs) >= 15 and all(d.name.endswith(".py") for d in docs)
    task = TextTask.from_corpus("stdlib", seq_len=64, max_files=20)
    train_docs, _ = split_documents(docs, 0.05)
    assert task.tokens.tolist() == byte_stream([d.text for d in train_docs])
    assert task.d_vocab == 257 and task.bos_token == BYTE_BOS_ID and task.n_documents == len(train_docs)
    assert task.max_accuracy is None and task.min_loss is None
    assert isinstance(task, SyntheticTask)


# ---------------------------------------------------------------------------------------------
# Split
# ---------------------------------------------------------------------------------------------


def test_split_follows_the_hash_definition_and_is_disjoint(tmp_path):
    write_corpus(tmp_path, 60)
    docs = load_documents(tmp_path)
    train, val = split_documents(docs, 0.3)
    assert [d.name for d in val] == [d.name for d in docs if in_val(d.name, 0.3)]
    assert [d.name for d in train] == [d.name for d in docs if not in_val(d.name, 0.3)]
    assert not {d.name for d in train} & {d.name for d in val}
    assert not {d.text for d in train} & {d.text for d in val}
    assert 0 < len(val) < len(docs)
    again = split_documents(load_documents(tmp_path), 0.3)
    assert again == (train, val)
    assert split_documents(docs, 0.0) == (docs, [])


def test_split_is_stable_when_files_are_added(tmp_path):
    write_corpus(tmp_path, 40)
    before = {d.name: d in split_documents(load_documents(tmp_path), 0.25)[1]
              for d in load_documents(tmp_path)}
    (tmp_path / "000_first.txt").write_text("a new file that sorts first\n")
    (tmp_path / "zzz_last.txt").write_text("a new file that sorts last\n")
    train, val = split_documents(load_documents(tmp_path), 0.25)
    after = {d.name: False for d in train} | {d.name: True for d in val}
    assert {name: after[name] for name in before} == before


def test_train_and_val_streams_are_built_from_disjoint_documents(tmp_path):
    texts = write_corpus(tmp_path, 30, words=60)
    train, val = TextTask.splits(tmp_path, seq_len=32, val_fraction=0.3)
    names = sorted(texts)
    train_texts = [texts[n] for n in names if not in_val(n, 0.3)]
    val_texts = [texts[n] for n in names if in_val(n, 0.3)]
    assert train.tokens.tolist() == byte_stream(train_texts)
    assert val.tokens.tolist() == byte_stream(val_texts)
    assert train.n_documents + val.n_documents == 30
    # no validation document's bytes appear anywhere in the training stream
    train_bytes = bytes(b for b in train.tokens.tolist() if b != BYTE_BOS_ID)
    assert not any(t.encode() in train_bytes for t in val_texts)
    # separately built splits agree with the pair
    alone = TextTask.from_corpus(tmp_path, seq_len=32, split="val", val_fraction=0.3)
    assert torch.equal(alone.tokens, val.tokens)


def test_empty_split_and_short_stream_errors(tmp_path):
    write_corpus(tmp_path, 3)
    with pytest.raises(ValueError, match="val split .* is empty: val_fraction=0"):
        TextTask.from_corpus(tmp_path, split="val", val_fraction=0.0)
    short = tmp_path / "short" / "one.txt"
    short.parent.mkdir()
    short.write_text("a single line that is too short to cut\n")
    with pytest.raises(ValueError, match="split .* is empty: the corpus is a single document"):
        TextTask.splits(short, seq_len=4)
    with pytest.raises(ValueError, match="seq_len"):
        TextTask.from_corpus(tmp_path, seq_len=100_000, val_fraction=0.0)
    with pytest.raises(ValueError, match="split"):
        TextTask.from_corpus(tmp_path, split="test")
    with pytest.raises(ValueError, match="val_fraction"):
        TextTask.from_corpus(tmp_path, val_fraction=1.0)


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------

TEXT = st.lists(
    st.one_of(
        st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20),
        st.sampled_from(["<|bos|>", "<|endoftext|>", "\x00", "\r\n", "  ", "😀", "é"]),
    ),
    max_size=6,
).map("".join)


@HYPOTHESIS
@given(text=TEXT)
def test_byte_tokenizer_round_trips_any_text(text):
    tok = byte_level_tokenizer()
    expected = list(text.encode("utf-8"))
    assert encode_documents([text], tok).tolist() == [BYTE_BOS_ID, *expected]
    assert tok.decode(expected) == text
    if "<|bos|>" not in text:  # the fast path matches the tokenizer's own encode
        assert tok.encode(text, add_special_tokens=False).ids == expected


def make_texts(n_docs: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [prose(rng, 80) for _ in range(n_docs)]


def test_bpe_is_deterministic_round_trips_and_compresses():
    texts = make_texts(40, seed=1)
    tok = train_bpe_tokenizer(texts, vocab_size=300)
    assert train_bpe_tokenizer(texts, vocab_size=300).to_str() == tok.to_str()
    assert 257 < tok.get_vocab_size() <= 300
    hf = as_hf_tokenizer(tok)
    assert hf.bos_token_id == hf.eos_token_id == hf.pad_token_id == 0
    assert tok.token_to_id("<|bos|>") == 0
    held_out = make_texts(3, seed=2) + ["ünïcødé ✓ 😀 \t\r\n tabs\tand \x00 bytes", "def f(x):\n    return x\n"]
    for text in held_out:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
        assert all(0 < i < tok.get_vocab_size() for i in ids)
    english = "".join(held_out[:3])
    assert len(tok.encode(english, add_special_tokens=False).ids) < 0.6 * len(english.encode())
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(texts, vocab_size=256)


def test_bpe_stream_has_bos_only_at_document_starts():
    tok = train_bpe_tokenizer(make_texts(10, seed=3), vocab_size=280)
    docs = ["the model <|bos|> copies", "second <|bos|>"]
    stream = encode_documents(docs, tok).tolist()
    assert [i for i, t in enumerate(stream) if t == 0] == [0, stream.index(0, 1)]
    second = stream.index(0, 1)
    assert tok.decode(stream[1:second]) == docs[0] and tok.decode(stream[second + 1 :]) == docs[1]


def test_bpe_task_trains_on_train_split_only_and_splits_share_it(tmp_path):
    write_corpus(tmp_path, 20, words=40)
    train, val = TextTask.splits(tmp_path, tokenizer="bpe", seq_len=16, val_fraction=0.3, bpe_vocab_size=320)
    train_texts = [d.text for d in split_documents(load_documents(tmp_path), 0.3)[0]]
    assert train.tokenizer.to_str() == train_bpe_tokenizer(train_texts, vocab_size=320).to_str()
    assert val.tokenizer is train.tokenizer
    alone = TextTask.from_corpus(tmp_path, tokenizer="bpe", seq_len=16, split="val", val_fraction=0.3,
                                 bpe_vocab_size=320)
    assert alone.tokenizer.to_str() == train.tokenizer.to_str()
    assert torch.equal(alone.tokens, val.tokens)
    assert train.d_vocab == train.tokenizer.get_vocab_size() <= 320 and train.bos_token == 0
    assert train.n_tokens < sum(len(t.encode()) for t in train_texts)


def same_tokenizer(hf, raw) -> bool:
    """Whether a (loaded, Hugging Face) tokenizer encodes and decodes as the raw one does."""
    texts = make_texts(3, seed=9) + ["ünïcødé ✓ <|bos|> 😀\n\t x"]
    return (len(hf) == raw.get_vocab_size() and hf.bos_token_id == raw.token_to_id("<|bos|>")
            and all(hf(t, add_special_tokens=False)["input_ids"]
                    == raw.encode(t, add_special_tokens=False).ids for t in texts)
            and all(hf.decode(raw.encode(t).ids) == t for t in texts))


def test_tokenizer_saved_alone_and_with_a_checkpoint(tmp_path):
    tok = train_bpe_tokenizer(make_texts(10, seed=4), vocab_size=290)
    path = save_tokenizer(tok, tmp_path / "tok")
    assert path.name == "tokenizer.json"
    assert same_tokenizer(load_tokenizer(tmp_path / "tok"), tok)
    model = HookedKVShiftTransformer(tiny_config(d_vocab=tok.get_vocab_size()), tokenizer=tok)
    model.save_pretrained(tmp_path / "ckpt")
    assert same_tokenizer(load_tokenizer(tmp_path / "ckpt"), tok)
    task = TextTask.from_corpus(tmp_path / "tok" / "tokenizer.json", tokenizer=tmp_path / "ckpt",
                                seq_len=4, val_fraction=0.0)
    assert same_tokenizer(task.tokenizer, tok) and task.bos_token == 0
    direct = TextTask.from_corpus(tmp_path / "tok" / "tokenizer.json", tokenizer=tok, seq_len=4,
                                  val_fraction=0.0)
    assert torch.equal(task.tokens, direct.tokens)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(FileNotFoundError, match="nothing"):
        load_tokenizer(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="no_such_tokenizer"):
        TextTask.from_corpus(tmp_path / "tok" / "tokenizer.json",
                             tokenizer=tmp_path / "no_such_tokenizer", seq_len=4)


# ---------------------------------------------------------------------------------------------
# TextTask
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def task(tmp_path) -> TextTask:
    write_corpus(tmp_path, 12, words=20)
    return TextTask.from_corpus(tmp_path, seq_len=24, val_fraction=0.0)


def test_sample_windows_are_slices_of_the_stream(task):
    stream = task.tokens.tolist()
    state = torch.get_rng_state()
    batch = task.sample(16, gen(0))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    assert batch.tokens.shape == (16, 24) and batch.tokens.dtype == torch.long
    for row, start in zip(batch.tokens.tolist(), batch.info["start"].tolist()):
        assert start in occurrences(stream, row)
    assert batch.mask[:, :-1].all() and not batch.mask[:, -1].any()
    again = task.sample(16, gen(0))
    assert torch.equal(again.tokens, batch.tokens)
    assert not torch.equal(task.sample(16, gen(1)).tokens, batch.tokens)


def test_sample_reaches_every_offset():
    stream = torch.tensor([256, 1, 2, 3, 4, 5, 6, 7], dtype=torch.long)
    task = TextTask(tokens=stream, seq_len=5, d_vocab=257, bos_id=256)
    starts = task.sample(500, gen(0)).info["start"]
    assert sorted(set(starts.tolist())) == [0, 1, 2, 3]


def test_metrics_and_loss_score_every_next_token(task):
    batch = task.sample(4, gen(2))
    logits = torch.randn(4, 24, task.d_vocab, generator=gen(3))
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, task.d_vocab), batch.tokens[:, 1:].reshape(-1))
    assert torch.allclose(task.loss(logits, batch), expected)
    m = task.metrics(logits, batch)
    assert m["n_predictions"] == 4 * 23 and m["loss"] == pytest.approx(float(expected), rel=1e-5)


def test_icl_score_is_late_minus_early_token_loss(task):
    """The metric against Olsson et al.'s definition (probes' from-losses score, one token at a
    time) averaged over the two bands, and on a hand-made model that only gets better with
    context."""
    from probes.scores import in_context_learning_score_from_losses, token_losses

    batch = task.sample(6, gen(4))
    logits = torch.randn(6, 24, task.d_vocab, generator=gen(5))
    early, late = task.icl_positions()
    assert (early, late) == (slice(2, 3), slice(23, 24))  # seq_len 24: b = 1, early = 2
    losses = token_losses(logits, batch.tokens)
    want = sum(in_context_learning_score_from_losses(losses, e, lt)
               for e, lt in zip(range(early.start, early.stop), range(late.start, late.stop),
                                strict=True)) / (early.stop - early.start)
    assert task.metrics(logits, batch)["icl_score"] == pytest.approx(want, rel=1e-5)
    # A model whose confidence in the right token grows along the window: negative score.
    sharp = torch.zeros(6, 24, task.d_vocab)
    for t in range(23):
        sharp[:, t].scatter_(1, batch.tokens[:, t + 1, None], float(t) / 4)
    assert task.metrics(sharp, batch)["icl_score"] < -1.0
    long = TextTask(tokens=torch.arange(300) % 50, seq_len=128, d_vocab=50, bos_id=0)
    assert long.icl_positions() == (slice(12, 16), slice(124, 128))
    short = TextTask(tokens=torch.arange(30) % 5, seq_len=19, d_vocab=5, bos_id=0)
    assert short.icl_positions() is None
    assert "icl_score" not in short.metrics(torch.zeros(1, 19, 5), short.sample(1, gen(0)))


def test_eval_batches_walk_the_stream_in_order(task):
    stream = task.tokens.tolist()
    s = task.seq_len - 1
    batches = list(task.eval_batches(5))
    assert all(isinstance(b, Batch) for b in batches)
    assert [b.tokens.tolist() for b in task.eval_batches(5)] == [b.tokens.tolist() for b in batches]
    windows = [row for b in batches for row in b.tokens.tolist()]
    assert [b.tokens.shape[0] for b in batches[:-1]] == [5] * (len(batches) - 1)
    assert len(windows) == task.n_eval_windows == (len(stream) - 1) // s
    covered = windows[0] + [t for w in windows[1:] for t in w[1:]]
    assert covered == stream[: 1 + len(windows) * s]
    assert len(stream) - len(covered) < s  # only a tail too short for a window is left out
    starts = torch.cat([b.info["start"] for b in batches]).tolist()
    assert starts == [i * s for i in range(len(windows))]
    assert all(b.mask[:, :-1].all() and not b.mask[:, -1].any() for b in batches)
    capped = list(task.eval_batches(5, n_batches=2))
    assert len(capped) == 2 and all(torch.equal(a.tokens, b.tokens) for a, b in zip(capped, batches))


def test_task_rejects_bad_streams():
    ok = torch.tensor([256, 1, 2], dtype=torch.long)
    with pytest.raises(ValueError, match="int64"):
        TextTask(tokens=ok.int(), seq_len=2, d_vocab=257, bos_id=256)
    with pytest.raises(ValueError, match="d_vocab"):
        TextTask(tokens=ok, seq_len=2, d_vocab=100, bos_id=0)
    with pytest.raises(ValueError, match="seq_len"):
        TextTask(tokens=ok, seq_len=4, d_vocab=257, bos_id=256)


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets (a stand-in module: no network)
# ---------------------------------------------------------------------------------------------


class _FakeDataset:
    def __init__(self, rows: list):
        self.rows = rows
        self.column_names = ["text", "label"]

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, indices):
        return _FakeDataset([self.rows[i] for i in indices])

    def __getitem__(self, column: str) -> list:
        return [r[column] for r in self.rows]


def test_hf_source_plumbing(monkeypatch):
    calls = []

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        if name == "offline/ds":
            raise ConnectionError("no network")
        return _FakeDataset([{"text": "row zero", "label": 0}, {"text": None, "label": 1},
                             {"text": "row two", "label": 2}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    docs = load_documents("hf:some/ds")
    assert docs == [Document("0", "row zero"), Document("2", "row two")]
    assert load_corpus("hf:some/ds#cfg:validation:text", max_files=1) == ["row zero"]
    assert calls[-1] == ("some/ds", "cfg", "validation")
    with pytest.raises(ValueError, match="no column 'body'.*text, label"):
        load_corpus("hf:some/ds:train:body")
    with pytest.raises(OSError, match="offline/ds.*network"):
        load_corpus("hf:offline/ds")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets"):
        load_corpus("hf:some/ds")
