"""Tokenizers: one small adapter over ``tokenizers.Tokenizer`` and Hugging Face tokenizers, and a
byte-level tokenizer that needs no download.

The model only needs four things from a tokenizer: encode a string to ids, decode ids to a string,
the BOS id (or None) and the pad id (or None). :class:`TokenizerAdapter` provides them for both
kinds, so the rest of the toolkit never branches on the tokenizer's type.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

BYTE_BOS = "<|bos|>"


def byte_level_tokenizer() -> Tokenizer:
    """A tokenizer with one token per byte (ids 0-255, GPT-2's byte-to-unicode alphabet) and a BOS
    token ``<|bos|>`` (id 256): 257 tokens, any text, no download, no training."""
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


_BOS_CANDIDATES = (BYTE_BOS, "<|endoftext|>", "<s>", "[BOS]", "<bos>", "<|begin_of_text|>")


class TokenizerAdapter:
    """Uniform access to a ``tokenizers.Tokenizer`` or a Hugging Face (``transformers``) tokenizer."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.is_hf = hasattr(tokenizer, "convert_tokens_to_ids") and callable(tokenizer)
        if not self.is_hf and not isinstance(tokenizer, Tokenizer):
            raise TypeError(
                "tokenizer must be a tokenizers.Tokenizer or a transformers tokenizer, got "
                f"{type(tokenizer).__name__}"
            )
        if self.is_hf:
            self.bos_token_id = tokenizer.bos_token_id
            self.pad_token_id = tokenizer.pad_token_id
            self.eos_token_id = tokenizer.eos_token_id
            self.vocab_size = len(tokenizer)
        else:
            ids = [tokenizer.token_to_id(t) for t in _BOS_CANDIDATES]
            self.bos_token_id = next((i for i in ids if i is not None), None)
            self.pad_token_id = None
            self.eos_token_id = self.bos_token_id
            self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        if self.is_hf:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def token_str(self, i: int) -> str:
        return self.decode([i])


TOKENIZER_FILE = "tokenizer.json"


def save_tokenizer(tokenizer: Any, folder: str | Path) -> None:
    """Write ``tokenizer`` into ``folder``: a Hugging Face tokenizer's own files, or
    ``tokenizer.json`` for a ``tokenizers.Tokenizer``."""
    folder = Path(folder)
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(folder))
    else:
        tokenizer.save(str(folder / TOKENIZER_FILE))


def load_tokenizer(folder: str | Path):
    """The tokenizer saved in ``folder``, or None when there is none. Never runs code from the
    folder: a ``tokenizer_config.json`` naming custom code (``auto_map``) is refused.

    Raises:
        ValueError: a tokenizer file that is invalid or asks to run code.
    """
    folder = Path(folder)
    config = folder / "tokenizer_config.json"
    if config.is_file():
        try:
            meta = json.loads(config.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{config} is not valid JSON ({e})") from None
        if isinstance(meta, dict) and "auto_map" in meta:
            raise ValueError(
                f"{config} names custom tokenizer code (auto_map); kvshift_lens never runs code "
                "from a checkpoint folder. Remove the auto_map entry if the tokenizer is a "
                "standard one")
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                             trust_remote_code=False)
    if (folder / TOKENIZER_FILE).is_file():
        try:
            return Tokenizer.from_file(str(folder / TOKENIZER_FILE))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"{folder / TOKENIZER_FILE} is not a valid tokenizer ({e})") \
                from None
    return None
