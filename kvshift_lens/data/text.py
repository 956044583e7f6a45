"""Text corpora for language modelling: loading, a train/validation split, tokenizers and
:class:`TextTask`, which serves random windows of a tokenized corpus through the same interface as
the synthetic tasks (:class:`~kvshift_lens.data.tasks.SyntheticTask`).

Corpus sources (:func:`load_documents`, :func:`load_corpus`):

- ``"stdlib"`` (the default): the Python standard library's own ``.py`` sources, code, comments and
  docstrings, read from ``sysconfig.get_paths()["stdlib"]``. It ships with every Python, so it
  exists on every machine without a download. Left out: ``site-packages``/``dist-packages``
  (installed third-party code, which differs between machines), ``test``/``tests`` folders (huge,
  repetitive and full of deliberately odd data), ``idlelib``, ``lib2to3`` and ``__pycache__``.
  Files are taken in sorted order of their path relative to the stdlib folder. Measured on
  CPython 3.11.7 (Linux): 601 files, 11,065,582 bytes of UTF-8; after dropping 3 empty files and
  2 exact duplicates, 596 documents, 11,065,447 bytes and 11,066,043 byte-level tokens (one per
  byte plus one BOS per document). With ``val_fraction=0.05`` the split is 576 training documents
  (10,635,350 byte tokens) and 20 validation documents (430,693 byte tokens). A byte-level BPE
  with vocabulary 4096 trained on that training split encodes the corpus in 3,178,390 tokens
  (3,056,009 train + 122,381 val; 3.5 bytes per token). The corpus is not frozen:
  it varies across Python versions, as modules change, are added and are removed (``distutils``,
  49 of the files above, is gone from 3.12 on), and slightly across platforms, so compare losses
  only between runs on the same Python version. Pass ``max_files``/``max_bytes`` to use part of it.
- a path to a text file (one document, cut into chunks: see below), or a directory (every
  non-hidden regular file below it, recursively, in sorted order; files that contain a NUL byte
  are taken for binary and skipped);
- a glob pattern such as ``"data/*.txt"`` or ``"data/**/*.md"`` (files only, sorted, binary files
  skipped);
- ``"hf:NAME[:SPLIT[:COLUMN]]"``: a Hugging Face dataset by name (needs the optional ``datasets``
  package and network access or a local copy in its cache); ``SPLIT`` defaults to ``train`` and
  ``COLUMN`` to ``text``; a dataset configuration goes after ``#``, as in
  ``"hf:wikitext#wikitext-2-raw-v1:train:text"``. Each row is a document.

Files are read as UTF-8 (undecodable bytes become U+FFFD). Empty documents are dropped, and so are
exact duplicates of an earlier document (the stdlib holds several identical ``__init__.py``
files), so the same text can never land in both splits.

Chunks (:func:`chunk_documents`, the ``chunk_chars`` argument): a corpus that is a single document
(one text file, or a folder or glob with one non-empty file) is cut into pieces of at most
:data:`DEFAULT_CHUNK_CHARS` characters, each ending at a line break where one falls in the second
half of the piece; piece ``i`` of document ``name`` is the document ``"name#i"``. So one file is a
corpus with both splits. Corpora of several documents are not cut unless ``chunk_chars`` is
given (then every document longer than it is), so their document-level split is unchanged.
``chunk_chars=0`` never cuts.

Train/validation split (:func:`split_documents`): per document, by a hash of its *name* (its path
relative to the corpus root, ``"path#i"`` for a chunk, or its row index for Hugging Face
datasets): the document is in the validation split when ``sha1(name)``, read as a fraction in
``[0, 1)``, is below ``val_fraction`` (:func:`is_validation`). The split is deterministic, the same
on every machine, and adding or removing a file moves no other file between the splits, with one
exception: when ``val_fraction > 0`` and the hash leaves one split empty although there are at
least two documents, the document whose hash is nearest the threshold moves there (the lowest
score into validation, or the highest into training), so a small corpus still has both splits.
Token streams are built per split from disjoint documents, so no window of the training stream
contains a token of a validation document (chunks of one file are disjoint pieces of text, though
one file's style is then seen in both splits).

Tokenizers: ``"byte"`` (:func:`kvshift_lens.tokenizer.byte_level_tokenizer`: 257 tokens, one per
byte plus ``<|bos|>`` = 256) or ``"bpe"`` (:func:`train_bpe_tokenizer`, a byte-level BPE trained
locally, on the training split only, with ``<|bos|>`` = 0), or a saved one (a folder, read by
:func:`kvshift_lens.tokenizer.load_tokenizer`, or a ``tokenizer.json`` file). A tokenizer travels
with a model: a :class:`~kvshift_lens.model.HookedKVShiftTransformer` built with ``tokenizer=tok``
holds it as a Hugging Face tokenizer and saves it beside its weights;
:func:`save_tokenizer` and :func:`load_tokenizer` (from :mod:`kvshift_lens.tokenizer`) write and
read the same files on their own (for example before a model exists).

Errors a user can fix are one line naming the source and what is wrong: :class:`CorpusError` (a
``ValueError``) and its subclasses :class:`CorpusNotFoundError` (also a ``FileNotFoundError``:
a missing path, a glob that matches no file), :class:`CorpusUnavailableError` (also an
``OSError``: an unreadable file, a Hugging Face dataset that cannot be loaded) and
:class:`CorpusDependencyError` (also an ``ImportError``: ``datasets`` is not installed).

Nothing is cached on disk: every call reads and tokenizes the corpus again.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import Tensor

from kvshift_lens.data.tasks import (
    Batch,
    SyntheticTask,
    _check_sample_args,
    _randint,
    _require_int,
)
from kvshift_lens.tokenizer import (
    BYTE_BOS,
    TokenizerNotFoundError,
    as_hf_tokenizer,
    byte_level_tokenizer,
    load_tokenizer,
    raw_tokenizer,
    read_tokenizer_file,
    save_tokenizer,
)

STDLIB_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
)
"""Folder names skipped anywhere below the stdlib folder by :func:`stdlib_corpus_files`."""

HF_PREFIX = "hf:"
DEFAULT_CHUNK_CHARS = 8192
"""Characters per piece when a single-document corpus is cut (:func:`chunk_documents`)."""
_GLOB_CHARS = ("*", "?", "[")
_ENCODE_CHUNK = 64  # documents per encode_batch call: bounds the memory of Encoding objects


class CorpusError(ValueError):
    """A corpus source cannot be used: no text in it, a bad argument, an empty split. The
    message is one line naming the source and what is wrong."""


class CorpusNotFoundError(FileNotFoundError, CorpusError):
    """A corpus path does not exist, or a glob pattern matches no file."""


class CorpusUnavailableError(OSError, CorpusError):
    """A corpus exists but cannot be read: a file without read permission, a Hugging Face dataset
    that cannot be loaded (no network access and no cached copy)."""


class CorpusDependencyError(ImportError, CorpusError):
    """A corpus source needs an optional package that is not installed."""


# ---------------------------------------------------------------------------------------------
# Corpora
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Document:
    """One document of a corpus.

    Attributes:
        name: its key for the train/validation split: the path relative to the corpus root (POSIX
            separators), the file name for a single file, or the row index for a Hugging Face
            dataset; ``"name#i"`` for piece ``i`` of a document cut by :func:`chunk_documents`.
        text: its contents.
    """

    name: str
    text: str


def stdlib_root() -> Path:
    """The folder of the running Python's standard library (``sysconfig``'s ``stdlib`` path)."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_corpus_files(max_files: int | None = None) -> list[Path]:
    """The ``.py`` files of the default corpus (see the module docstring), sorted by their path
    relative to :func:`stdlib_root`; the first ``max_files`` of them when given."""
    _check_cap("max_files", max_files)
    root = stdlib_root()
    if not root.is_dir():
        raise CorpusNotFoundError(f"the Python standard library folder {root} does not exist")
    found: list[tuple[str, Path]] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in STDLIB_EXCLUDED_DIRS and not d.startswith(".")]
        for name in files:
            if name.endswith(".py"):
                path = Path(folder) / name
                found.append((path.relative_to(root).as_posix(), path))
    found.sort()
    return [p for _, p in found[:max_files]]


def load_documents(
    source: str | os.PathLike = "stdlib",
    *,
    max_files: int | None = None,
    max_bytes: int | None = None,
    chunk_chars: int | None = None,
) -> list[Document]:
    """Read a corpus as named documents (see the module docstring for the sources).

    Args:
        source: ``"stdlib"``, a file, a directory, a glob pattern or ``"hf:NAME[:SPLIT[:COLUMN]]"``.
        max_files: read at most this many files (rows of a Hugging Face dataset), the first in
            sorted order.
        max_bytes: keep documents, in order, until their UTF-8 size reaches this many bytes; the
            document that crosses the cap is cut short and the rest are dropped.
        chunk_chars: cut documents into pieces of at most this many characters
            (:func:`chunk_documents`). None: cut only a corpus of a single document, at
            :data:`DEFAULT_CHUNK_CHARS`; 0: never cut; N: cut every document longer than N.

    Raises:
        CorpusNotFoundError: ``source`` is neither an existing path nor a glob that matches a
            file, or the stdlib folder is missing (a ``FileNotFoundError``; the message names it).
        CorpusUnavailableError: a file cannot be read, or a Hugging Face dataset cannot be loaded
            (an ``OSError``).
        CorpusError: the source holds no text (only empty or binary files), or a bad argument (a
            ``ValueError``).
    """
    _check_cap("max_files", max_files)
    _check_cap("max_bytes", max_bytes)
    if chunk_chars is not None:
        _check_cap("chunk_chars", chunk_chars, zero_ok=True)
    if isinstance(source, str) and source.startswith(HF_PREFIX):
        docs = _load_hf(source, max_files)
        what = f"the Hugging Face dataset {source!r}"
    elif isinstance(source, str) and source == "stdlib":
        root = stdlib_root()
        docs = (
            Document(p.relative_to(root).as_posix(),
                     _read_bytes(p).decode("utf-8", errors="replace"))
            for p in stdlib_corpus_files(max_files)
        )
        what = f"the standard library folder {root}"
    else:
        docs, what = _load_path(source, max_files)
    out = _clean(docs, max_bytes)
    if not out:
        raise CorpusError(f"{what} holds no text (every document is empty or binary)")
    if chunk_chars is None:
        chunk_chars = DEFAULT_CHUNK_CHARS if len(out) == 1 else 0
    return chunk_documents(out, chunk_chars) if chunk_chars else out


def load_corpus(
    source: str | os.PathLike = "stdlib",
    *,
    max_files: int | None = None,
    max_bytes: int | None = None,
    chunk_chars: int | None = None,
) -> list[str]:
    """The texts of :func:`load_documents` (same arguments and errors), in order."""
    return [d.text for d in load_documents(source, max_files=max_files, max_bytes=max_bytes,
                                           chunk_chars=chunk_chars)]


def chunk_documents(docs: Sequence[Document], chunk_chars: int) -> list[Document]:
    """Cut every document longer than ``chunk_chars`` characters into consecutive pieces.

    Each piece holds at most ``chunk_chars`` characters and ends just after the last line break
    in the second half of that span (after exactly ``chunk_chars`` characters when the span has
    none there), so pieces are whole lines where the text allows. Piece ``i`` of document
    ``name`` is named ``"name#i"`` (its key for :func:`split_documents`); the pieces of a document,
    joined, are its text. Shorter documents are kept as they are, with their names.

    Args:
        docs: the documents, in order.
        chunk_chars: the largest piece, in characters (>= 1).

    Returns:
        The documents with long ones replaced by their pieces, in order.
    """
    _check_cap("chunk_chars", chunk_chars)
    out: list[Document] = []
    for doc in docs:
        if len(doc.text) <= chunk_chars:
            out.append(doc)
            continue
        out += [Document(f"{doc.name}#{i}", piece)
                for i, piece in enumerate(_pieces(doc.text, chunk_chars))]
    return out


def _pieces(text: str, size: int) -> list[str]:
    pieces = []
    start = 0
    while len(text) - start > size:
        newline = text.rfind("\n", start + size // 2, start + size)
        end = newline + 1 if newline >= 0 else start + size
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return pieces


def _check_cap(name: str, value: int | None, zero_ok: bool = False) -> None:
    if value is None:
        return
    low = 0 if zero_ok else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        what = "a non-negative int" if zero_ok else "a positive int"
        raise CorpusError(f"{name} must be {what} or None, got {value!r}")


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise CorpusUnavailableError(
            f"cannot read the corpus file {path}: {e.strerror or e}") from None


def _is_binary(data: bytes) -> bool:
    return b"\x00" in data


def _load_path(source: str | os.PathLike, max_files: int | None) -> tuple[Iterator[Document], str]:
    if not isinstance(source, (str, os.PathLike)):
        raise CorpusError(f"the corpus source must be 'stdlib', a path, a glob or 'hf:NAME', got "
                          f"{type(source).__name__}")
    raw = os.fspath(source)
    if not raw:
        raise CorpusError("the corpus source is an empty string; give 'stdlib', a path or a glob")
    path = Path(raw).expanduser()
    if path.is_file():
        data = _read_bytes(path)
        if _is_binary(data):
            raise CorpusError(
                f"the corpus file {path} looks like a binary file (it contains NUL bytes), not text")
        return iter([Document(path.name, data.decode("utf-8", errors="replace"))]), str(path)
    if path.is_dir():
        files = sorted(
            (p.relative_to(path).as_posix(), p)
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise CorpusError(f"the corpus directory {path} holds no files")
        return _read_files(files[:max_files]), f"the directory {path}"
    if not any(c in raw for c in _GLOB_CHARS):
        missing = next((p for p in reversed(path.parents) if not p.exists()), path)
        raise CorpusNotFoundError(
            f"corpus source {raw!r} does not exist ({missing} is missing); expected 'stdlib', an "
            "existing file or directory, a glob pattern or 'hf:NAME'")
    pattern = os.path.expanduser(raw)
    matches = [Path(m) for m in glob.glob(pattern, recursive=True)]
    base = _glob_base(pattern)
    files = sorted((_relative_name(p, base), p) for p in matches if p.is_file())
    if not files:
        raise CorpusNotFoundError(
            f"the corpus glob pattern {raw!r} matches no file"
            + (f" ({len(matches)} folders only)" if matches else ""))
    return _read_files(files[:max_files]), f"the files matching {raw!r}"


def _glob_base(pattern: str) -> Path:
    """The literal folder a glob pattern starts from (``data`` for ``data/**/*.txt``)."""
    parts = Path(pattern).parts
    literal = list(itertools.takewhile(lambda s: not any(c in s for c in _GLOB_CHARS), parts))
    return Path(*literal[: len(parts) - 1]) if literal else Path(".")


def _relative_name(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.as_posix()


def _read_files(files: Sequence[tuple[str, Path]]) -> Iterator[Document]:
    for name, path in files:
        data = _read_bytes(path)
        if not _is_binary(data):
            yield Document(name, data.decode("utf-8", errors="replace"))


def _clean(docs: Iterable[Document], max_bytes: int | None) -> list[Document]:
    """Drop empty documents and exact duplicates; apply the byte cap."""
    out: list[Document] = []
    seen: set[bytes] = set()
    budget = max_bytes
    for doc in docs:
        if not doc.text:
            continue
        data = doc.text.encode("utf-8")
        digest = hashlib.sha1(data).digest()
        if digest in seen:
            continue
        seen.add(digest)
        if budget is not None and len(data) >= budget:
            text = data[:budget].decode("utf-8", errors="ignore")
            if text:
                out.append(Document(doc.name, text))
            break
        out.append(doc)
        if budget is not None:
            budget -= len(data)
    return out


def _load_hf(spec: str, max_files: int | None) -> Iterator[Document]:
    parts = spec[len(HF_PREFIX) :].split(":")
    if not parts[0] or len(parts) > 3:
        raise CorpusError(
            f"bad Hugging Face corpus {spec!r}: expected 'hf:NAME[:SPLIT[:COLUMN]]', for example "
            "'hf:roneneldan/TinyStories:train:text' or 'hf:wikitext#wikitext-2-raw-v1'"
        )
    name, _, config = parts[0].partition("#")
    split = parts[1] if len(parts) > 1 and parts[1] else "train"
    column = parts[2] if len(parts) > 2 and parts[2] else "text"
    try:
        import datasets
    except ImportError:
        raise CorpusDependencyError(
            f"loading {spec!r} needs the optional 'datasets' package (pip install datasets); "
            "without it use 'stdlib', local files or a glob"
        ) from None
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # network, cache, unknown name or split: all end up here
        raise CorpusUnavailableError(
            f"could not load the Hugging Face dataset {name!r}"
            f"{f' (configuration {config!r})' if config else ''}, split {split!r}: "
            f"{type(e).__name__}: {e}. Loading a dataset by name needs network access, or a copy "
            "in the local Hugging Face cache (HF_HOME / HF_DATASETS_CACHE; HF_DATASETS_OFFLINE=1 "
            "uses only the cache). Without either, use 'stdlib', local files or a glob."
        ) from e
    columns = list(getattr(ds, "column_names", None) or [])
    if column not in columns:
        raise CorpusError(
            f"the Hugging Face dataset {name!r} split {split!r} has no column {column!r}; its "
            f"columns are: {', '.join(columns) or '(none)'}"
        )
    rows = ds[column] if max_files is None else ds.select(range(min(max_files, len(ds))))[column]
    return (Document(str(i), text) for i, text in enumerate(rows) if isinstance(text, str))


# ---------------------------------------------------------------------------------------------
# Train / validation split
# ---------------------------------------------------------------------------------------------


def validation_score(name: str) -> float:
    """``sha1(name)``'s first 8 bytes as a fraction in ``[0, 1)``: a document is in the validation
    split when its score is below ``val_fraction``."""
    digest = hashlib.sha1(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def is_validation(name: str, val_fraction: float) -> bool:
    """Whether the hash puts the document called ``name`` in the validation split
    (:func:`split_documents` overrides it only to keep a split from being empty)."""
    return validation_score(name) < val_fraction


def split_documents(
    docs: Sequence[Document], val_fraction: float = 0.05
) -> tuple[list[Document], list[Document]]:
    """``(train, val)``: the documents split by :func:`is_validation`, each in corpus order.

    Every document lands in exactly one split, so the two never share a document; ``val_fraction``
    is the expected share of documents (not of tokens) in the validation split. When
    ``val_fraction > 0`` and there are at least two documents but the hash leaves a split empty,
    the training document with the lowest :func:`validation_score` moves to validation (or the
    validation document with the highest to training), so both splits are non-empty.
    """
    _check_fraction(val_fraction)
    train: list[Document] = []
    val: list[Document] = []
    for doc in docs:
        (val if is_validation(doc.name, val_fraction) else train).append(doc)
    if val_fraction > 0 and len(docs) >= 2:
        if not val:
            val.append(train.pop(min(range(len(train)),
                                     key=lambda i: validation_score(train[i].name))))
        elif not train:
            train.append(val.pop(max(range(len(val)),
                                     key=lambda i: validation_score(val[i].name))))
    return train, val


def _check_fraction(val_fraction: float) -> None:
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)):
        raise CorpusError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise CorpusError(f"val_fraction must be in [0, 1), got {val_fraction!r}")


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------

_BYTE_VOCAB = 256


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2
) -> Tokenizer:
    """A byte-level BPE tokenizer (GPT-2 style) trained on ``texts``, with no download.

    Token 0 is ``<|bos|>`` (the BOS, EOS and pad token of the Hugging Face tokenizer a model
    wraps it in: :func:`kvshift_lens.tokenizer.special_tokens`), ids 1-256 are the 256 single
    bytes (GPT-2's byte alphabet), then come the merges.
    Any text round-trips through ``encode``/``decode``. Training is deterministic: the same texts
    in the same order give the same tokenizer.

    Args:
        texts: the training documents (use the training split only, so validation stays unseen).
        vocab_size: the largest vocabulary wanted, ``<|bos|>`` and the 256 bytes included (so at
            least 257). The result can be smaller when the texts run out of pairs seen
            ``min_frequency`` times.
        min_frequency: the fewest occurrences a pair needs to be merged.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < _BYTE_VOCAB + 1:
        raise CorpusError(
            f"vocab_size must be an int >= {_BYTE_VOCAB + 1} (the 256 bytes and <|bos|>), "
            f"got {vocab_size!r}"
        )
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise CorpusError(f"min_frequency must be a positive int, got {min_frequency!r}")
    texts = list(texts)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[BYTE_BOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return tok


def resolve_tokenizer(
    tokenizer: str | os.PathLike | Any,
    train_texts: Sequence[str] = (),
    *,
    bpe_vocab_size: int = 4096,
    bpe_min_frequency: int = 2,
) -> Any:
    """Turn :meth:`TextTask.from_corpus`'s ``tokenizer`` argument into a tokenizer object:
    ``"byte"`` or ``"bpe"`` (trained on ``train_texts``) give a ``tokenizers.Tokenizer``; a
    tokenizer object (``tokenizers`` or ``transformers``) is returned as it is; a folder (a
    checkpoint, a run's ``final/``) is read by :func:`kvshift_lens.tokenizer.load_tokenizer` (a
    Hugging Face tokenizer, never running code from the folder); a ``tokenizer.json`` file by
    ``tokenizers``.

    Raises:
        TokenizerNotFoundError: the path does not exist or holds no tokenizer (a
            ``FileNotFoundError``).
        TokenizerError: the saved tokenizer is invalid or unsafe (a ``ValueError``).
        TypeError: ``tokenizer`` is none of the above.
    """
    if isinstance(tokenizer, str) and tokenizer == "byte":
        return byte_level_tokenizer()
    if isinstance(tokenizer, str) and tokenizer == "bpe":
        if not train_texts:
            raise CorpusError("training a BPE tokenizer needs at least one training document")
        return train_bpe_tokenizer(train_texts, bpe_vocab_size, bpe_min_frequency)
    if isinstance(tokenizer, (str, os.PathLike)):
        path = Path(tokenizer).expanduser()
        if path.is_dir():
            return load_tokenizer(path)
        if path.is_file():
            return read_tokenizer_file(path)
        raise TokenizerNotFoundError(
            f"tokenizer {os.fspath(tokenizer)!r} is not 'byte', 'bpe', a tokenizer folder or a "
            f"tokenizer.json file ({path} does not exist)"
        )
    as_hf_tokenizer(tokenizer)  # raises TypeError for anything else
    return tokenizer


def encode_documents(texts: Sequence[str], tokenizer: Any) -> Int[Tensor, " n_tokens"]:
    """One int64 stream: for each text, the tokenizer's BOS id then the text's tokens.

    Args:
        texts: the documents.
        tokenizer: a ``tokenizers.Tokenizer`` or a ``transformers`` tokenizer with a BOS token
            (for a raw tokenizer, the one :func:`kvshift_lens.tokenizer.special_tokens` finds).

    Special-token strings inside a text (a literal ``"<|bos|>"``) are encoded as plain text, so
    BOS ids appear only at document starts (for a slow Hugging Face tokenizer, which has no
    ``tokenizers`` backend, they are encoded as it encodes them). The byte-level tokenizer takes
    a fast path (its ids are the UTF-8 bytes) with the same result as its ``encode``.
    """
    bos = as_hf_tokenizer(tokenizer).bos_token_id
    if bos is None:
        raise CorpusError(
            "the tokenizer has no BOS token to separate documents (looked for "
            "<|bos|>, <|endoftext|>, <s>, [BOS], <bos>, <|begin_of_text|>); add one with "
            "tokenizer.add_special_tokens(['<|bos|>'])"
        )
    try:
        backend = raw_tokenizer(tokenizer)
    except TypeError:  # a slow transformers tokenizer
        backend = None
    if backend is not None and _is_byte_level(backend):
        pieces = [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]
    elif backend is not None:
        plain = Tokenizer.from_str(backend.to_str())  # a copy, so the caller's is not modified
        plain.encode_special_tokens = True
        encode = getattr(plain, "encode_batch_fast", plain.encode_batch)
        pieces = []
        for i in range(0, len(texts), _ENCODE_CHUNK):
            chunk = encode(list(texts[i : i + _ENCODE_CHUNK]), add_special_tokens=False)
            pieces += [np.asarray(e.ids, dtype=np.int64) for e in chunk]
    else:
        pieces = [np.asarray(tokenizer(t, add_special_tokens=False)["input_ids"], dtype=np.int64)
                  for t in texts]
    out = np.empty(sum(len(p) + 1 for p in pieces), dtype=np.int64)
    at = 0
    for p in pieces:
        out[at] = bos
        out[at + 1 : at + 1 + len(p)] = p
        at += 1 + len(p)
    return torch.from_numpy(out)


# What makes a tokenizer the byte-level one (a Hugging Face wrapper adds its own post-processor
# and may set padding or truncation, which do not change the ids).
_BYTE_LEVEL_KEYS = ("added_tokens", "normalizer", "pre_tokenizer", "model", "decoder")
_BYTE_LEVEL_PARTS: dict[str, Any] | None = None


def _is_byte_level(tokenizer: Tokenizer) -> bool:
    global _BYTE_LEVEL_PARTS
    if tokenizer.get_vocab_size(with_added_tokens=True) != _BYTE_VOCAB + 1:
        return False
    if _BYTE_LEVEL_PARTS is None:
        reference = json.loads(byte_level_tokenizer().to_str())
        _BYTE_LEVEL_PARTS = {k: reference.get(k) for k in _BYTE_LEVEL_KEYS}
    parts = json.loads(tokenizer.to_str())
    return {k: parts.get(k) for k in _BYTE_LEVEL_KEYS} == _BYTE_LEVEL_PARTS


# ---------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, kw_only=True)
class TextTask(SyntheticTask):
    """Language modelling on a tokenized corpus: windows of ``seq_len`` consecutive tokens.

    The corpus is one token stream, ``tokens``: every document of the split, each preceded by the
    tokenizer's BOS token (:func:`encode_documents`). Windows ignore document boundaries; a BOS in
    the middle of a window marks where the next document starts.

    - :meth:`sample` draws ``batch_size`` windows at independent uniform start offsets in
      ``[0, len(tokens) - seq_len]``, using only the passed generator (for training).
    - :meth:`eval_batches` walks the stream in order (for validation): the same batches on every
      call, so validation losses are comparable across evaluations.

    Mask: every position but the last (``tokens[t + 1]`` is a target for every ``t < seq_len - 1``).
    ``Batch.info["start"]`` (``[batch]``) holds each window's offset in the stream.

    Perfect model: unknown for natural text, so ``max_accuracy`` and ``min_loss`` are ``None``.

    Build one with :meth:`from_corpus` (or both splits at once with :meth:`splits`).

    Fields:
        tokens: the 1-D int64 stream (CPU); at least ``seq_len`` long.
        seq_len: window length.
        d_vocab: the tokenizer's vocabulary size, added tokens included; every token is below it.
        bos_id: the id that starts every document (the tokenizer's BOS token).
        tokenizer: the tokenizer that made ``tokens`` (give it to the model so it is saved with
            checkpoints), or None.
        split: ``"train"`` or ``"val"`` (a label; it changes no behaviour).
        n_documents: how many documents the stream holds.
    """

    name: ClassVar[str] = "text"

    tokens: Int[Tensor, " n_tokens"] = field(repr=False)
    seq_len: int = 128
    d_vocab: int
    bos_id: int
    tokenizer: Any = field(default=None, repr=False)
    split: str = "train"
    n_documents: int = 0
    bos: bool = field(default=True, init=False, repr=False)

    def __post_init__(self) -> None:
        t = self.tokens
        if not isinstance(t, Tensor) or t.ndim != 1 or t.dtype != torch.long:
            raise ValueError(
                "TextTask.tokens must be a 1-D int64 tensor, got "
                + (f"dtype {t.dtype} and shape {tuple(t.shape)}" if isinstance(t, Tensor)
                   else type(t).__name__)
            )
        _require_int(self, "seq_len", 2, "a window needs a token and its successor")
        _require_int(self, "d_vocab", 1, "the vocabulary cannot be empty")
        _require_int(self, "bos_id", 0, "token ids are non-negative")
        if self.bos_id >= self.d_vocab:
            raise ValueError(f"TextTask: bos_id={self.bos_id} must be below d_vocab={self.d_vocab}")
        if t.numel() < self.seq_len:
            raise ValueError(
                f"TextTask: the {self.split} stream holds {t.numel()} tokens, fewer than "
                f"seq_len={self.seq_len}; use a shorter seq_len or more text"
            )
        if t.device.type != "cpu":
            object.__setattr__(self, "tokens", t.cpu())
        low, high = int(t.min()), int(t.max())
        if low < 0 or high >= self.d_vocab:
            raise ValueError(
                f"TextTask: token ids span [{low}, {high}], outside range(d_vocab={self.d_vocab})"
            )

    def __repr__(self) -> str:
        return (
            f"TextTask(split={self.split!r}, seq_len={self.seq_len}, d_vocab={self.d_vocab}, "
            f"n_tokens={self.n_tokens}, n_documents={self.n_documents}, bos_id={self.bos_id})"
        )

    # --- SyntheticTask interface -------------------------------------------------------------

    @property
    def bos_token(self) -> int:
        """The tokenizer's BOS id (not necessarily :data:`~kvshift_lens.data.tasks.BOS_TOKEN`)."""
        return self.bos_id

    @property
    def first_token(self) -> int:
        """The smallest id that is not BOS: 1 when BOS is id 0 (BPE), else 0 (bytes)."""
        return 1 if self.bos_id == 0 else 0

    @property
    def n_content(self) -> int:
        """How many ids are not BOS: ``d_vocab - 1``."""
        return self.d_vocab - 1

    @property
    def max_accuracy(self) -> None:
        """Unknown for natural text: None."""
        return None

    @property
    def min_loss(self) -> None:
        """Unknown for natural text (the entropy of the source is not known): None."""
        return None

    def icl_positions(self) -> tuple[slice, slice] | None:
        """The token indices compared by the ``icl_score`` metric: ``(early, late)`` bands of
        ``b = max(1, seq_len // 32)`` tokens each, the early band starting at token
        ``max(1, seq_len // 10)`` and the late band ending at the window's last token. None when
        the window is too short for two disjoint bands (fewer than 20 tokens)."""
        if self.seq_len < 20:
            return None
        b = max(1, self.seq_len // 32)
        early = max(1, self.seq_len // 10)
        return slice(early, early + b), slice(self.seq_len - b, self.seq_len)

    def metrics(
        self, logits: Float[Tensor, "batch pos d_vocab"], batch: Batch
    ) -> dict[str, float]:
        """``accuracy``, ``loss``, ``n_predictions`` (every position but the last), plus
        ``icl_score`` when the window has at least 20 tokens: Olsson et al.'s in-context-learning
        score scaled to the window, the mean loss on the late band of tokens minus the mean loss
        on the early band (:meth:`icl_positions`; Olsson et al. compare token 500 with token 50).
        Negative means the model predicts better with more context."""
        out = super().metrics(logits, batch)
        bands = self.icl_positions()
        if bands is not None:
            with torch.no_grad():
                logp = F.log_softmax(logits.detach()[:, :-1, : self.d_vocab].float(), dim=-1)
                losses = -logp.gather(-1, batch.tokens[:, 1:, None].to(logp.device))[..., 0]
                # losses[:, t] is the loss on token t + 1
                early, late = bands
                out["icl_score"] = float(
                    losses[:, late.start - 1 : late.stop - 1].mean()
                    - losses[:, early.start - 1 : early.stop - 1].mean())
        return out

    @property
    def n_tokens(self) -> int:
        """Length of the token stream."""
        return int(self.tokens.numel())

    @property
    def n_eval_windows(self) -> int:
        """How many windows :meth:`eval_batches` walks: windows start every ``seq_len - 1``
        tokens and must fit in the stream."""
        return (self.n_tokens - 1) // (self.seq_len - 1)

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        """``batch_size`` windows at uniform random offsets, drawn from ``generator`` only (on its
        device; the batch is made there too). ``info["start"]``: the offsets."""
        _check_sample_args(batch_size, generator)
        starts = _randint(self.n_tokens - self.seq_len + 1, (batch_size,), generator)
        return self._windows(starts, generator.device)

    def eval_batches(
        self, batch_size: int, n_batches: int | None = None, device: torch.device | str = "cpu"
    ) -> Iterator[Batch]:
        """Deterministic validation batches: the windows starting at ``0, s, 2s, ...`` with
        ``s = seq_len - 1``, in order, ``batch_size`` per batch (the last may be smaller).

        Consecutive windows share one token, so with the mask of every position but the last,
        each token of the stream after the first is predicted exactly once, from the tokens before
        it in its window, until the windows run out (the final ``< seq_len - 1`` tokens, too few for
        a window, are left out). Every call yields the same batches.

        Args:
            batch_size: windows per batch.
            n_batches: stop after this many batches (None: walk the whole stream).
            device: where the batches go.
        """
        _check_cap("batch_size", batch_size)
        _check_cap("n_batches", n_batches)
        n = self.n_eval_windows
        if n_batches is not None:
            n = min(n, n_batches * batch_size)
        step = self.seq_len - 1
        for first in range(0, n, batch_size):
            starts = torch.arange(first, min(first + batch_size, n)) * step
            yield self._windows(starts, torch.device(device))

    def _windows(self, starts: Tensor, device: torch.device) -> Batch:
        index = starts.cpu()[:, None] + torch.arange(self.seq_len)
        tokens = self.tokens[index].to(device)
        mask = torch.ones_like(tokens, dtype=torch.bool)
        mask[:, -1] = False
        return Batch(tokens=tokens, mask=mask, info={"start": starts.to(device)})

    # --- construction --------------------------------------------------------------------------

    @classmethod
    def splits(
        cls,
        source: str | os.PathLike = "stdlib",
        tokenizer: str | os.PathLike | Any = "byte",
        seq_len: int = 128,
        val_fraction: float = 0.05,
        bpe_vocab_size: int = 4096,
        bpe_min_frequency: int = 2,
        max_files: int | None = None,
        max_bytes: int | None = None,
        chunk_chars: int | None = None,
    ) -> tuple[TextTask, TextTask]:
        """``(train, val)`` tasks from one corpus, sharing one tokenizer; the arguments are those
        of :meth:`from_corpus`. Raises ValueError if either split is too small for a window."""
        train, val = cls._build(
            source, tokenizer, seq_len, val_fraction, bpe_vocab_size, bpe_min_frequency,
            max_files, max_bytes, chunk_chars, ("train", "val"),
        )
        return train, val

    @classmethod
    def from_corpus(
        cls,
        source: str | os.PathLike = "stdlib",
        tokenizer: str | os.PathLike | Any = "byte",
        seq_len: int = 128,
        split: str = "train",
        val_fraction: float = 0.05,
        bpe_vocab_size: int = 4096,
        bpe_min_frequency: int = 2,
        max_files: int | None = None,
        max_bytes: int | None = None,
        chunk_chars: int | None = None,
    ) -> TextTask:
        """The ``split`` of a corpus as a task.

        Args:
            source: the corpus (see :func:`load_documents`): ``"stdlib"`` (default), a file, a
                directory, a glob or ``"hf:NAME[:SPLIT[:COLUMN]]"``.
            tokenizer: ``"byte"``, ``"bpe"`` (trained here on the *training* documents, so a
                ``"val"`` task built separately with the same arguments gets the same tokenizer),
                a ``tokenizers.Tokenizer`` or ``transformers`` tokenizer, a saved tokenizer's
                folder (a checkpoint) or a ``tokenizer.json`` file (:func:`resolve_tokenizer`).
            seq_len: window length.
            split: ``"train"`` or ``"val"``.
            val_fraction: expected share of documents in the validation split
                (:func:`split_documents`). Use the same value, source and caps for both splits.
            bpe_vocab_size, bpe_min_frequency: for ``tokenizer="bpe"``
                (:func:`train_bpe_tokenizer`).
            max_files, max_bytes: caps on the corpus, applied before the split.
            chunk_chars: how documents are cut into pieces before the split
                (:func:`load_documents`): None cuts only a single-document corpus (one file), at
                :data:`DEFAULT_CHUNK_CHARS` characters; 0 never cuts; N cuts every document
                longer than N characters.

        Raises:
            CorpusError: (a ``ValueError``; :class:`CorpusNotFoundError` is also a
                ``FileNotFoundError``) the corpus is missing or unusable, or a split is empty;
                one line naming the source.
            ValueError: a split is too short for one window of ``seq_len`` tokens.
        """
        if split not in ("train", "val"):
            raise CorpusError(f"split must be 'train' or 'val', got {split!r}")
        (task,) = cls._build(
            source, tokenizer, seq_len, val_fraction, bpe_vocab_size, bpe_min_frequency,
            max_files, max_bytes, chunk_chars, (split,),
        )
        return task

    @classmethod
    def _build(
        cls,
        source: str | os.PathLike,
        tokenizer: str | os.PathLike | Any,
        seq_len: int,
        val_fraction: float,
        bpe_vocab_size: int,
        bpe_min_frequency: int,
        max_files: int | None,
        max_bytes: int | None,
        chunk_chars: int | None,
        which: tuple[str, ...],
    ) -> list[TextTask]:
        _check_fraction(val_fraction)
        docs = load_documents(source, max_files=max_files, max_bytes=max_bytes,
                              chunk_chars=chunk_chars)
        parts = dict(zip(("train", "val"), split_documents(docs, val_fraction)))
        tok = resolve_tokenizer(
            tokenizer,
            [d.text for d in parts["train"]],
            bpe_vocab_size=bpe_vocab_size,
            bpe_min_frequency=bpe_min_frequency,
        )
        hf = as_hf_tokenizer(tok)  # what a model given this tokenizer holds
        out = []
        for split in which:
            chosen = parts[split]
            if not chosen:
                raise CorpusError(
                    f"the {split} split of {os.fspath(source)!r} is empty: "
                    + ("val_fraction=0 puts every document in training" if not val_fraction else
                       f"the corpus is a single document ({len(docs[0].text)} characters, not "
                       f"cut with chunk_chars={chunk_chars!r}); use more text or a smaller "
                       "chunk_chars")
                )
            stream = encode_documents([d.text for d in chosen], tok)
            assert hf.bos_token_id is not None  # encode_documents checked
            out.append(
                cls(
                    tokens=stream,
                    seq_len=seq_len,
                    d_vocab=len(hf),
                    bos_id=hf.bos_token_id,
                    tokenizer=tok,
                    split=split,
                    n_documents=len(chosen),
                )
            )
        return out


__all__ = [
    "DEFAULT_CHUNK_CHARS",
    "HF_PREFIX",
    "STDLIB_EXCLUDED_DIRS",
    "CorpusDependencyError",
    "CorpusError",
    "CorpusNotFoundError",
    "CorpusUnavailableError",
    "Document",
    "TextTask",
    "chunk_documents",
    "encode_documents",
    "is_validation",
    "load_corpus",
    "load_documents",
    "load_tokenizer",
    "resolve_tokenizer",
    "save_tokenizer",
    "split_documents",
    "stdlib_corpus_files",
    "stdlib_root",
    "train_bpe_tokenizer",
    "validation_score",
]
