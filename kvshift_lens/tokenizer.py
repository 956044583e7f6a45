"""Tokenizers: a model's tokenizer is always a Hugging Face tokenizer, so TransformerLens code that
reads ``model.tokenizer`` (``bos_token_id``, ``pad_token_id``, ``decode`` of a tensor,
``batch_decode``, ``padding_side``...) runs unchanged.

- :func:`byte_level_tokenizer`: a raw ``tokenizers.Tokenizer`` with one token per byte plus
  ``<|bos|>``; any text, no download, no training.
- :func:`as_hf_tokenizer`: wraps a raw ``tokenizers.Tokenizer`` (the byte-level one, a BPE trained
  by :mod:`kvshift_lens.data.text`, anyone's ``tokenizer.json``) in
  ``transformers.PreTrainedTokenizerFast`` with its special tokens (:func:`special_tokens`);
  Hugging Face tokenizers pass through unchanged.
- :func:`save_tokenizer` / :func:`load_tokenizer`: a tokenizer in a folder (a checkpoint, a run's
  ``final/``), written atomically and read without ever running code from the folder.

Safety: a folder's ``tokenizer_config.json`` may name Python code to run (``auto_map``, loaded by
``AutoTokenizer`` with ``trust_remote_code``) or a tokenizer class that ``transformers`` does not
ship. :func:`load_tokenizer` refuses both with :class:`UnsafeTokenizerError`, never calls
``AutoTokenizer``, and loads only ``transformers``' own fast tokenizer classes from
``tokenizer.json`` with ``trust_remote_code=False`` and ``local_files_only=True``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from kvshift_lens._files import atomic_write

logger = logging.getLogger(__name__)

BYTE_BOS = "<|bos|>"
TOKENIZER_FILE = "tokenizer.json"
"""The ``tokenizers`` serialisation of the tokenizer (vocabulary, merges, pre-tokenizer...)."""
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
"""Hugging Face's settings beside it: the class and the special tokens."""
UNKNOWN_TOKEN = "<|unknown id {}|>"
"""How a model's ``to_str_tokens`` shows an id its tokenizer has no text for (an id below
``d_vocab`` but outside the tokenizer's vocabulary), instead of dropping it."""

TOKENIZER_FILES = (
    TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "vocab.txt",
    "tokenizer.model",
)
"""Files a Hugging Face tokenizer may leave in a folder, which its loader reads together with
``tokenizer.json``. :func:`save_tokenizer` removes those a previous tokenizer left and the new one
did not write, so a re-saved folder never mixes two tokenizers' settings; a folder saved for a
model without a tokenizer should hold none of them."""

_BOS_CANDIDATES = (BYTE_BOS, "<|endoftext|>", "<s>", "[BOS]", "<bos>", "<|begin_of_text|>")
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "[EOS]", "<eos>", "<|eos|>", "<|end_of_text|>")
_PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")
_UNK_CANDIDATES = ("<unk>", "[UNK]", "<|unk|>")


class TokenizerError(ValueError):
    """A tokenizer folder or file is invalid: unreadable JSON, a missing ``tokenizer.json``, a
    tokenizer ``transformers`` cannot build."""


class TokenizerNotFoundError(FileNotFoundError, TokenizerError):
    """A folder holds no tokenizer (or does not exist)."""


class UnsafeTokenizerError(TokenizerError):
    """A folder's tokenizer would need Python code that is not part of ``transformers``
    (``auto_map``, or a ``tokenizer_class`` it does not ship); it is never loaded."""


# ---------------------------------------------------------------------------------------------
# The byte-level tokenizer
# ---------------------------------------------------------------------------------------------


def byte_level_tokenizer() -> Tokenizer:
    """A tokenizer with one token per byte (ids 0-255, GPT-2's byte-to-unicode alphabet) and a BOS
    token ``<|bos|>`` (id 256): 257 tokens, any text, no download, no training.

    Returns a raw ``tokenizers.Tokenizer``; a model given it holds it as a Hugging Face tokenizer
    (:func:`as_hf_tokenizer`: BOS, EOS and pad are all ``<|bos|>``, no unknown token)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # Order the 256 symbols by the byte each one stands for, so id == byte value.
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    vocab[BYTE_BOS] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BYTE_BOS])
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


# ---------------------------------------------------------------------------------------------
# Hugging Face tokenizers
# ---------------------------------------------------------------------------------------------


def special_tokens(tokenizer: Tokenizer) -> dict[str, str]:
    """The special tokens of a raw ``tokenizers.Tokenizer``, as ``PreTrainedTokenizerFast``
    keyword arguments (only the roles it has a token for).

    - ``bos_token``: the first of ``<|bos|>``, ``<|endoftext|>``, ``<s>``, ``[BOS]``, ``<bos>``,
      ``<|begin_of_text|>`` in its vocabulary;
    - ``eos_token``: the first of ``<|endoftext|>``, ``</s>``, ``[EOS]``, ``<eos>``, ``<|eos|>``,
      ``<|end_of_text|>``; else the BOS token (documents are separated by BOS in
      :mod:`kvshift_lens.data.text`, as GPT-2 separates them by ``<|endoftext|>``);
    - ``pad_token``: ``<pad>``, ``[PAD]``, ``<|pad|>`` or ``<|padding|>``; else the EOS token
      (what TransformerLens does for a tokenizer without one);
    - ``unk_token``: the model's own unknown token (BPE, WordPiece, WordLevel) when it is in the
      vocabulary, else ``<unk>``, ``[UNK]`` or ``<|unk|>``; none for byte-level tokenizers,
      which cover every input.

    So the byte-level tokenizer and the BPE of ``data/text.py`` get BOS = EOS = pad =
    ``<|bos|>`` and no unknown token.
    """
    def first(candidates: tuple[str, ...]) -> str | None:
        return next((t for t in candidates if tokenizer.token_to_id(t) is not None), None)

    out: dict[str, str] = {}
    bos = first(_BOS_CANDIDATES)
    eos = first(_EOS_CANDIDATES) or bos
    pad = first(_PAD_CANDIDATES) or eos
    model_unk = getattr(tokenizer.model, "unk_token", None)
    unk = model_unk if model_unk and tokenizer.token_to_id(model_unk) is not None else None
    unk = unk or first(_UNK_CANDIDATES)
    for role, token in (("bos_token", bos), ("eos_token", eos), ("pad_token", pad),
                        ("unk_token", unk)):
        if token is not None:
            out[role] = token
    return out


def as_hf_tokenizer(tokenizer: Any) -> PreTrainedTokenizerBase:
    """A Hugging Face tokenizer for ``tokenizer``.

    Args:
        tokenizer: a raw ``tokenizers.Tokenizer``, wrapped (a copy: the argument is not changed)
            in ``transformers.PreTrainedTokenizerFast`` with :func:`special_tokens` and
            ``clean_up_tokenization_spaces=False`` (so ``decode`` gives back exactly the text that
            was encoded); or a ``transformers`` tokenizer, returned as it is.

    Returns:
        The Hugging Face tokenizer.

    Raises:
        TypeError: anything else.
    """
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    if isinstance(tokenizer, Tokenizer):
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer,
                                       clean_up_tokenization_spaces=False,
                                       **special_tokens(tokenizer))
    raise TypeError(
        "tokenizer must be a tokenizers.Tokenizer or a transformers tokenizer, got "
        f"{type(tokenizer).__name__}"
    )


def raw_tokenizer(tokenizer: Any) -> Tokenizer:
    """The ``tokenizers.Tokenizer`` behind ``tokenizer`` (itself when it is one, the backend of a
    fast Hugging Face tokenizer). Raises TypeError for a tokenizer without one (a slow one)."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(backend, Tokenizer):
        return backend
    raise TypeError(
        f"{type(tokenizer).__name__} is not a tokenizers.Tokenizer nor a fast transformers "
        "tokenizer (one with a backend_tokenizer)"
    )


# ---------------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------------


def save_tokenizer(tokenizer: Any, directory: str | os.PathLike) -> Path:
    """Write ``tokenizer`` into ``directory`` (created if needed) as Hugging Face writes it:
    ``tokenizer.json`` plus ``tokenizer_config.json`` (class and special tokens), the format
    :func:`load_tokenizer` reads back.

    Args:
        tokenizer: a raw ``tokenizers.Tokenizer`` (saved as :func:`as_hf_tokenizer` wraps it) or
            a ``transformers`` tokenizer.
        directory: the folder, for example a checkpoint folder.

    Returns:
        The path of ``tokenizer.json``.

    Every file is written under a temporary name and renamed into place, so an interrupted save
    leaves no half-written file; tokenizer files a previous tokenizer left in the folder and this
    one did not write (``special_tokens_map.json``, ``vocab.json``...) are removed.

    Raises:
        NotADirectoryError: ``directory`` exists and is not a folder.
        TypeError: ``tokenizer`` is not a tokenizer.
        UnsafeTokenizerError: the tokenizer needs code outside ``transformers`` (``auto_map``, a
            custom class), so :func:`load_tokenizer` would refuse it; nothing is written.
        TokenizerError: it is a slow tokenizer (no ``tokenizer.json``); nothing is written.
    """
    hf = as_hf_tokenizer(tokenizer)
    folder = Path(directory)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} exists and is not a directory")
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=".tokenizer.", suffix=".tmp"))
    try:
        hf.save_pretrained(str(staging))
        written = sorted(p.name for p in staging.iterdir() if p.is_file())
        # Nothing in the folder changes unless load_tokenizer will read the result back.
        what = f"{type(hf).__name__} (saving to {folder})"
        if TOKENIZER_FILE not in written:
            raise TokenizerError(
                f"{what} writes no {TOKENIZER_FILE}: only fast tokenizers (backed by the "
                "tokenizers library) can be saved")
        if TOKENIZER_CONFIG_FILE in written:
            _tokenizer_class(staging / TOKENIZER_CONFIG_FILE,
                             label=f"the {TOKENIZER_CONFIG_FILE} of {what}")
        for name in written:
            atomic_write(folder / name, lambda tmp, n=name: shutil.copyfile(staging / n, tmp))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for name in TOKENIZER_FILES:
        if name not in written and (folder / name).is_file():
            (folder / name).unlink()
    return folder / TOKENIZER_FILE


def load_tokenizer(
    directory: str | os.PathLike, *, missing_ok: bool = False
) -> PreTrainedTokenizerFast | None:
    """The tokenizer saved in ``directory`` (by :func:`save_tokenizer`, a checkpoint, or
    ``save_pretrained`` of a Hugging Face fast tokenizer), as a Hugging Face tokenizer. Never runs
    code from the folder.

    - With ``tokenizer_config.json``: refused when it has an ``auto_map`` key (custom code) or a
      ``tokenizer_class`` that is not a fast tokenizer class of ``transformers``; otherwise that
      class (``PreTrainedTokenizerFast`` when none is named) reads ``tokenizer.json`` with
      ``local_files_only=True, trust_remote_code=False``. ``AutoTokenizer`` is never called.
    - With only ``tokenizer.json`` (checkpoints written before ``tokenizer_config.json`` was
      saved): read with ``tokenizers`` and wrapped by :func:`as_hf_tokenizer`.

    Args:
        directory: the folder.
        missing_ok: return None, instead of raising, when the folder holds neither file.

    Raises:
        TokenizerNotFoundError: the folder does not exist, or holds no tokenizer (a
            ``FileNotFoundError``).
        UnsafeTokenizerError: the tokenizer would need code that is not part of ``transformers``.
        TokenizerError: a file is not valid JSON or not a valid tokenizer; the message names it.
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise TokenizerNotFoundError(f"tokenizer folder {folder} does not exist")
    config_path, tok_path = folder / TOKENIZER_CONFIG_FILE, folder / TOKENIZER_FILE
    if config_path.is_file():
        cls = _tokenizer_class(config_path)
        if not tok_path.is_file():
            raise TokenizerError(
                f"{folder} has {TOKENIZER_CONFIG_FILE} but no {TOKENIZER_FILE}: only fast "
                "tokenizers (saved with tokenizer.json) are loaded")
        try:
            return cls.from_pretrained(str(folder), local_files_only=True,
                                       trust_remote_code=False)
        except Exception as e:  # transformers and tokenizers raise many kinds
            raise TokenizerError(
                f"{folder}: {cls.__name__} could not load the tokenizer "
                f"({type(e).__name__}: {e})") from None
    if tok_path.is_file():
        return as_hf_tokenizer(read_tokenizer_file(tok_path))
    if missing_ok:
        return None
    raise TokenizerNotFoundError(
        f"{folder} holds no tokenizer ({TOKENIZER_FILE} is missing)")


def read_tokenizer_file(path: str | os.PathLike) -> Tokenizer:
    """A ``tokenizer.json`` file as a raw ``tokenizers.Tokenizer`` (data only: no code runs).

    Raises:
        TokenizerNotFoundError: the file does not exist.
        TokenizerError: it is not a valid tokenizer file.
    """
    path = Path(path)
    if not path.is_file():
        raise TokenizerNotFoundError(f"tokenizer file {path} does not exist")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise TokenizerError(f"{path} is not a valid tokenizer file ({e})") from None


def _tokenizer_class(config_path: Path, label: str | None = None) -> type[PreTrainedTokenizerFast]:
    """The class ``tokenizer_config.json`` asks for, if it is one of transformers' fast
    tokenizers; refuses ``auto_map`` and anything else. ``label`` names the file in errors
    (default: its path)."""
    label = label or str(config_path)
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{label} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise TokenizerError(f"{label} must hold a JSON object, got {type(config).__name__}")
    if "auto_map" in config:
        raise UnsafeTokenizerError(
            f"{label} has an 'auto_map' key: the tokenizer needs Python code shipped with it, "
            "which kvshift_lens never runs (no trust_remote_code). Remove the key if the "
            "tokenizer is a standard one, or use a tokenizer transformers ships")
    name = config.get("tokenizer_class")
    if name is None:
        return PreTrainedTokenizerFast
    cls = None
    if isinstance(name, str) and name.isidentifier():
        try:
            cls = getattr(transformers, name, None)
        except Exception:  # a lazily imported class whose optional dependency is missing
            cls = None
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedTokenizerFast)):
        raise UnsafeTokenizerError(
            f"{label}: 'tokenizer_class' is {name!r}, which is not a fast tokenizer class "
            "of transformers; only transformers' own fast tokenizers are loaded (no custom "
            "tokenizer code)")
    return cls


__all__ = [
    "BYTE_BOS",
    "TOKENIZER_CONFIG_FILE",
    "TOKENIZER_FILE",
    "TOKENIZER_FILES",
    "TokenizerError",
    "TokenizerNotFoundError",
    "UNKNOWN_TOKEN",
    "UnsafeTokenizerError",
    "as_hf_tokenizer",
    "byte_level_tokenizer",
    "load_tokenizer",
    "raw_tokenizer",
    "read_tokenizer_file",
    "save_tokenizer",
    "special_tokens",
]
