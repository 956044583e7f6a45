"""The tokenizer module: raw tokenizers wrapped as Hugging Face tokenizers with the right special
tokens (checked against the raw tokenizer and UTF-8 bytes), saving and loading (round trips,
atomic writes), and folders that would run code, which are refused without running anything."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Tokenizer, PreTrainedTokenizerFast

from kvshift_lens import HookedKVShiftTransformer
from kvshift_lens.data.text import train_bpe_tokenizer
from kvshift_lens.tokenizer import (
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    TokenizerError,
    TokenizerNotFoundError,
    UnsafeTokenizerError,
    as_hf_tokenizer,
    byte_level_tokenizer,
    load_tokenizer,
    raw_tokenizer,
    save_tokenizer,
    special_tokens,
)
from tests.helpers import tiny_config

TEXTS = ["héllo wörld", "  two  spaces , and a comma .", "tabs\tand\nlines\r\n", "😀 <|bos|> x", ""]


def bpe() -> Tokenizer:
    rng = random.Random(0)
    words = "the cat sat on a mat and the dog ran after it".split()
    texts = [" ".join(rng.choice(words) for _ in range(60)) for _ in range(20)]
    return train_bpe_tokenizer(texts, vocab_size=300)


def word_level(specials: list[str]) -> Tokenizer:
    vocab = {t: i for i, t in enumerate([*specials, "a", "b", "c"])}
    unk = "<unk>" if "<unk>" in vocab else None
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.add_special_tokens(specials)
    return raw


def encodes_like(hf, raw: Tokenizer) -> None:
    """hf encodes and decodes every text exactly as the raw tokenizer does."""
    for text in TEXTS:
        ids = raw.encode(text, add_special_tokens=False).ids
        assert hf(text, add_special_tokens=False)["input_ids"] == ids
        assert hf.decode(ids) == raw.decode(ids, skip_special_tokens=False)


# ---------------------------------------------------------------------------------------------
# Wrapping
# ---------------------------------------------------------------------------------------------


def test_byte_level_tokenizer_as_a_hugging_face_tokenizer():
    raw = byte_level_tokenizer()
    before = raw.to_str()
    hf = as_hf_tokenizer(raw)
    assert raw.to_str() == before  # the argument is not modified
    assert isinstance(hf, PreTrainedTokenizerFast) and len(hf) == 257
    assert hf.bos_token == hf.eos_token == hf.pad_token == "<|bos|>"
    assert hf.bos_token_id == hf.eos_token_id == hf.pad_token_id == 256
    assert hf.unk_token_id is None
    for text in TEXTS:
        ids = list(text.encode("utf-8"))
        if "<|bos|>" not in text:
            assert hf(text, add_special_tokens=False)["input_ids"] == ids
        assert hf.decode(ids) == text  # exact: no clean-up of spaces before punctuation
    assert hf("ab")["input_ids"] == [97, 98]  # no special tokens added by the tokenizer itself
    # what TransformerLens code calls
    assert hf.decode(torch.tensor(5)) == "\x05" and hf.decode(torch.tensor(104)) == "h"
    assert hf.decode(torch.tensor([256, 104, 105])) == "<|bos|>hi"
    assert hf.batch_decode(torch.tensor([[104], [105]])) == ["h", "i"]
    assert hf.convert_ids_to_tokens(256) == "<|bos|>"
    assert hf.padding_side == "right"


def test_bpe_tokenizer_as_a_hugging_face_tokenizer():
    raw = bpe()
    hf = as_hf_tokenizer(raw)
    assert len(hf) == raw.get_vocab_size() > 257
    assert hf.bos_token_id == hf.eos_token_id == hf.pad_token_id == raw.token_to_id("<|bos|>") == 0
    assert hf.unk_token_id is None
    encodes_like(hf, raw)


@pytest.mark.parametrize(
    "specials,expected",
    [
        (["<s>", "</s>", "<pad>", "<unk>"],
         {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}),
        (["<|endoftext|>"], {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                             "pad_token": "<|endoftext|>"}),
        (["[BOS]", "[PAD]"], {"bos_token": "[BOS]", "eos_token": "[BOS]", "pad_token": "[PAD]"}),
        (["</s>"], {"eos_token": "</s>", "pad_token": "</s>"}),
        ([], {}),
    ],
)
def test_special_tokens_found_by_name(specials, expected):
    raw = word_level(specials)
    assert special_tokens(raw) == expected
    hf = as_hf_tokenizer(raw)
    for role in ("bos_token", "eos_token", "pad_token", "unk_token"):
        token = expected.get(role)
        assert getattr(hf, role) == token
        assert getattr(hf, f"{role}_id") == (None if token is None else raw.token_to_id(token))


def test_hugging_face_tokenizers_pass_through_and_others_are_refused():
    hf = as_hf_tokenizer(byte_level_tokenizer())
    assert as_hf_tokenizer(hf) is hf
    assert raw_tokenizer(hf) is hf.backend_tokenizer
    raw = byte_level_tokenizer()
    assert raw_tokenizer(raw) is raw
    with pytest.raises(TypeError, match="tokenizers.Tokenizer or a transformers tokenizer, got str"):
        as_hf_tokenizer("byte")
    with pytest.raises(TypeError, match="backend_tokenizer"):
        raw_tokenizer(object())


def test_model_holds_a_hugging_face_tokenizer():
    raw = byte_level_tokenizer()
    model = HookedKVShiftTransformer(tiny_config(d_vocab=300), tokenizer=raw)
    assert isinstance(model.tokenizer, PreTrainedTokenizerFast)
    assert model.tokenizer.bos_token_id == 256 and model.tokenizer.decode(torch.tensor(5)) == "\x05"
    hf = as_hf_tokenizer(bpe())
    assert HookedKVShiftTransformer(tiny_config(d_vocab=300), tokenizer=hf).tokenizer is hf
    n = len(hf)
    with pytest.raises(ValueError, match=f"tokenizer has {n} tokens but d_vocab={n - 1}"):
        HookedKVShiftTransformer(tiny_config(d_vocab=n - 1), tokenizer=hf)
    with pytest.raises(TypeError, match="got dict"):
        HookedKVShiftTransformer(tiny_config(d_vocab=300), tokenizer={"a": 1})


# ---------------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [byte_level_tokenizer, bpe])
def test_raw_tokenizers_round_trip(tmp_path, make):
    raw = make()
    path = save_tokenizer(raw, tmp_path / "tok")
    assert path == tmp_path / "tok" / TOKENIZER_FILE
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == [TOKENIZER_FILE,
                                                                    TOKENIZER_CONFIG_FILE]
    loaded = load_tokenizer(tmp_path / "tok")
    assert isinstance(loaded, PreTrainedTokenizerFast)
    encodes_like(loaded, raw)
    wrapped = as_hf_tokenizer(raw)
    for role in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(loaded, role) == getattr(wrapped, role)
    assert len(loaded) == len(wrapped)


def test_hugging_face_tokenizer_keeps_its_class(tmp_path):
    from kvshift_lens.tokenizer import _bytes_to_unicode

    b2u = _bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)} | {"<|endoftext|>": 256, "Ġt": 257}
    gpt2 = GPT2Tokenizer(vocab=vocab, merges=[("Ġ", "t")])
    save_tokenizer(gpt2, tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert type(loaded) is GPT2Tokenizer
    assert loaded(" tot", add_special_tokens=False)["input_ids"] == [257, 111, 116]
    assert loaded.bos_token_id == loaded.eos_token_id == 256


def test_legacy_folder_with_only_tokenizer_json(tmp_path):
    raw = bpe()
    raw.save(str(tmp_path / TOKENIZER_FILE))  # what checkpoints held before tokenizer_config.json
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, PreTrainedTokenizerFast) and loaded.bos_token_id == 0
    encodes_like(loaded, raw)


def test_resaving_replaces_the_previous_tokenizer_files(tmp_path):
    gpt2_like = as_hf_tokenizer(word_level(["<s>", "</s>", "<pad>", "<unk>"]))
    save_tokenizer(gpt2_like, tmp_path)
    # a file an older save (or another library) left, which the loader would read
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"bos_token": "a"}))
    (tmp_path / "unrelated.txt").write_text("keep me")
    save_tokenizer(byte_level_tokenizer(), tmp_path)
    assert not (tmp_path / "special_tokens_map.json").exists()
    assert (tmp_path / "unrelated.txt").read_text() == "keep me"
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files or folders left behind
    loaded = load_tokenizer(tmp_path)
    assert len(loaded) == 257 and loaded.bos_token_id == 256


def test_failed_save_leaves_the_old_files(tmp_path, monkeypatch):
    save_tokenizer(byte_level_tokenizer(), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        save_tokenizer(bpe(), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_tokenizer_that_could_not_be_loaded_back_is_not_saved(tmp_path):
    save_tokenizer(byte_level_tokenizer(), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    custom = as_hf_tokenizer(bpe())
    custom._auto_map = {"AutoTokenizer": ["evil.EvilTokenizer", None]}  # as remote code sets it
    with pytest.raises(UnsafeTokenizerError, match="auto_map") as e:
        save_tokenizer(custom, tmp_path)
    assert "PreTrainedTokenizerFast" in str(e.value) or "TokenizersBackend" in str(e.value)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_missing_and_broken_folders(tmp_path):
    with pytest.raises(TokenizerNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    assert isinstance(TokenizerNotFoundError("x"), FileNotFoundError)
    with pytest.raises(TokenizerNotFoundError, match="holds no tokenizer"):
        load_tokenizer(tmp_path)
    assert load_tokenizer(tmp_path, missing_ok=True) is None
    (tmp_path / TOKENIZER_FILE).write_text("{not json")
    with pytest.raises(TokenizerError, match=f"{TOKENIZER_FILE} is not a valid tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / TOKENIZER_CONFIG_FILE).write_text("{not json")
    with pytest.raises(TokenizerError, match=f"{TOKENIZER_CONFIG_FILE} is not valid JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / TOKENIZER_CONFIG_FILE).write_text("[]")
    with pytest.raises(TokenizerError, match="must hold a JSON object"):
        load_tokenizer(tmp_path)
    (tmp_path / TOKENIZER_FILE).unlink()
    (tmp_path / TOKENIZER_CONFIG_FILE).write_text("{}")
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(NotADirectoryError):
        save_tokenizer(byte_level_tokenizer(), tmp_path / TOKENIZER_CONFIG_FILE)


# ---------------------------------------------------------------------------------------------
# Folders that would run code
# ---------------------------------------------------------------------------------------------

EVIL_MODULE = """
from pathlib import Path
Path({sentinel!r}).write_text("custom code ran")
from transformers import PreTrainedTokenizerFast
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def evil_folder(folder: Path, **config) -> Path:
    """A saved byte-level tokenizer whose tokenizer_config.json asks for ``evil.py``, a module
    that writes a sentinel file when imported."""
    save_tokenizer(byte_level_tokenizer(), folder)
    sentinel = folder.parent / f"{folder.name}_SENTINEL"
    (folder / "evil.py").write_text(EVIL_MODULE.format(sentinel=str(sentinel)))
    path = folder / TOKENIZER_CONFIG_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return sentinel


@pytest.fixture
def no_auto_tokenizer(monkeypatch):
    """Fail the test if anything asks AutoTokenizer to load (it could run remote code)."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("AutoTokenizer.from_pretrained was called")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)


@pytest.mark.parametrize("auto_map", [{"AutoTokenizer": ["evil.EvilTokenizer", None]},
                                      ["evil.EvilTokenizer", None]])
def test_auto_map_is_refused_without_running_anything(tmp_path, auto_map, no_auto_tokenizer):
    folder = tmp_path / "ckpt"
    sentinel = evil_folder(folder, auto_map=auto_map, tokenizer_class="EvilTokenizer")
    with pytest.raises(UnsafeTokenizerError) as e:
        load_tokenizer(folder)
    message = str(e.value)
    assert str(folder / TOKENIZER_CONFIG_FILE) in message and "'auto_map'" in message
    assert "\n" not in message
    assert not sentinel.exists() and "evil" not in sys.modules
    # the data layer's tokenizer argument goes through the same loader
    from kvshift_lens.data.text import resolve_tokenizer

    with pytest.raises(UnsafeTokenizerError, match="auto_map"):
        resolve_tokenizer(folder)
    assert not sentinel.exists() and "evil" not in sys.modules


def test_sentinel_module_would_run_if_imported(tmp_path, monkeypatch):
    """The check above can fail: importing the folder's module does write the sentinel."""
    folder = tmp_path / "ckpt"
    sentinel = evil_folder(folder)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "evil", raising=False)
    __import__("evil")
    monkeypatch.delitem(sys.modules, "evil")
    assert sentinel.read_text() == "custom code ran"


@pytest.mark.parametrize("cls", ["EvilTokenizer", "AutoTokenizer", "os.system", 3, "PythonBackend"])
def test_tokenizer_class_outside_transformers_fast_tokenizers_is_refused(tmp_path, cls,
                                                                          no_auto_tokenizer):
    sentinel = evil_folder(tmp_path / "ckpt", tokenizer_class=cls)
    with pytest.raises(UnsafeTokenizerError, match=f"'tokenizer_class' is {cls!r}"):
        load_tokenizer(tmp_path / "ckpt")
    assert not sentinel.exists()


def test_checkpoint_with_auto_map_is_refused(tmp_path, no_auto_tokenizer):
    """A checkpoint whose tokenizer_config.json was edited to ask for custom code is refused
    without running anything: by the checksum its config.json keeps, and, in a checkpoint saved
    before checksums existed, by the auto_map check itself."""
    import json

    from kvshift_lens import CheckpointError

    model = HookedKVShiftTransformer(tiny_config(d_vocab=257), tokenizer=byte_level_tokenizer())
    model.save_pretrained(tmp_path / "ckpt")
    sentinel = evil_folder(tmp_path / "ckpt", auto_map={"AutoTokenizer": ["evil.EvilTokenizer",
                                                                          None]})
    with pytest.raises(CheckpointError, match="tokenizer_config.json does not match the checksum"):
        HookedKVShiftTransformer.from_pretrained(tmp_path / "ckpt", device="cpu")
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    del meta["tokenizer_files"]
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="auto_map"):
        HookedKVShiftTransformer.from_pretrained(tmp_path / "ckpt", device="cpu")
    assert not sentinel.exists()
