"""Checkpoints: bit-identical round trips and clear errors for every kind of bad folder."""

from __future__ import annotations

import json

import pytest
import torch

from kvshift_lens import CheckpointError, HookedKVShiftTransformer, byte_level_tokenizer
from kvshift_lens.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from tests.helpers import build, randomize, tiny_config


@pytest.mark.parametrize("overrides", [
    dict(), dict(tie_word_embeddings=True, n_key_value_heads=2, shift_q=True, shift_window=2),
    dict(positional_embedding_type="rotary", normalization_type="RMS", gated_mlp=True,
         act_fn="silu", shift_param="convex"),
])
def test_round_trip_is_bit_identical(tmp_path, overrides):
    model = build(**overrides)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = HookedKVShiftTransformer.from_pretrained(tmp_path / "ckpt", device="cpu")
    assert loaded.cfg.to_dict() == model.cfg.to_dict()
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 8))
    assert torch.equal(model(tokens), loaded.eval()(tokens))
    assert not list((tmp_path / "ckpt").glob("*.tmp"))  # no temporary files left behind
    # No pickle anywhere: the weights file is safetensors (8-byte header length, then JSON).
    raw = (tmp_path / "ckpt" / WEIGHTS_FILE).read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert json.loads(raw[8 : 8 + header_len])["__metadata__"]["format"] == "kvshift_lens"


def test_tokenizer_travels_with_checkpoint(tmp_path):
    model = HookedKVShiftTransformer(tiny_config(d_vocab=257), tokenizer=byte_level_tokenizer())
    model.save_pretrained(tmp_path)
    loaded = HookedKVShiftTransformer.from_pretrained(tmp_path, device="cpu")
    assert torch.equal(loaded.to_tokens("héllo"), model.to_tokens("héllo"))
    assert loaded.to_string(loaded.to_tokens("héllo")[0]) == "<|bos|>héllo"  # BOS first, as in TL


def _saved(tmp_path):
    model = build()
    model.save_pretrained(tmp_path)
    return model


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        HookedKVShiftTransformer.from_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="config.json is missing"):
        HookedKVShiftTransformer.from_pretrained(tmp_path)
    _saved(tmp_path)
    (tmp_path / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        HookedKVShiftTransformer.from_pretrained(tmp_path)


def _drop_checksum(folder):
    """Make the checkpoint look like one written before checksums existed."""
    meta = json.loads((folder / CONFIG_FILE).read_text())
    del meta["weights_sha256"]
    (folder / CONFIG_FILE).write_text(json.dumps(meta))


def test_corrupt_safetensors(tmp_path):
    _saved(tmp_path)
    path = tmp_path / WEIGHTS_FILE
    good = path.read_bytes()
    path.write_bytes(good[:-100])  # truncated
    with pytest.raises(CheckpointError, match="does not match the checksum in .*config.json"):
        HookedKVShiftTransformer.from_pretrained(tmp_path)
    _drop_checksum(tmp_path)  # without a checksum, safetensors itself notices
    with pytest.raises(CheckpointError, match="corrupt or not a safetensors file"):
        HookedKVShiftTransformer.from_pretrained(tmp_path)
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        HookedKVShiftTransformer.from_pretrained(tmp_path)


def test_a_flipped_bit_is_refused_not_loaded(tmp_path):
    """A single bit flipped inside a tensor's bytes still parses as safetensors, so only the
    checksum can catch it."""
    model = _saved(tmp_path)
    path = tmp_path / WEIGHTS_FILE
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x10  # inside the last tensor's data
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="does not match the checksum"):
        HookedKVShiftTransformer.from_pretrained(tmp_path)
    _drop_checksum(tmp_path)  # what loading without the check would have given: wrong weights
    loaded = HookedKVShiftTransformer.from_pretrained(tmp_path)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                      loaded.state_dict().values()))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_weights_are_refused_unless_asked_for(tmp_path, bad):
    model = build()
    with torch.no_grad():
        model.blocks[1].attn.W_O[0, 1, 2] = bad
    model.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"tensor blocks.1.attn.W_O holds 1 non-finite"):
        HookedKVShiftTransformer.from_pretrained(tmp_path)
    loaded = HookedKVShiftTransformer.from_pretrained(tmp_path, allow_nonfinite=True)
    assert torch.equal(loaded.blocks[1].attn.W_O.isnan(), model.blocks[1].attn.W_O.isnan())


def test_from_pretrained_returns_eval_mode(tmp_path):
    build().train().save_pretrained(tmp_path)
    assert not HookedKVShiftTransformer.from_pretrained(tmp_path).training


@pytest.mark.parametrize("failing", ["weights", "config"])
def test_a_save_that_fails_halfway_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failing):
    """The write of the weights or of the config raises after writing part of its file: the
    previous checkpoint still loads bit-identically, and no temporary file is left."""
    import kvshift_lens.checkpoint as ckpt_module

    old = build(seed=1)
    old.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    new = build(seed=2)
    randomize(new, 7)

    class DiskFull(OSError):
        pass

    real_save = ckpt_module.save_file

    def half_written_weights(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(100)
        raise DiskFull("no space left on device")

    real_write_text = ckpt_module.Path.write_text

    def half_written_config(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise DiskFull("no space left on device")

    if failing == "weights":
        monkeypatch.setattr(ckpt_module, "save_file", half_written_weights)
    else:
        monkeypatch.setattr(ckpt_module.Path, "write_text", half_written_config)
    with pytest.raises(DiskFull):
        new.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing else left
    loaded = HookedKVShiftTransformer.from_pretrained(tmp_path, device="cpu")
    for k, v in old.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_corrupt_or_foreign_config(tmp_path):
    _saved(tmp_path)
    cfg_path = tmp_path / CONFIG_FILE
    meta = json.loads(cfg_path.read_text())
    cfg_path.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        HookedKVShiftTransformer.from_pretrained(tmp_path)
    cfg_path.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format_version=99"):
        HookedKVShiftTransformer.from_pretrained(tmp_path)
    cfg_path.write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="not a kvshift_lens config"):
        HookedKVShiftTransformer.from_pretrained(tmp_path)
    cfg_path.write_text(json.dumps({**meta, "config": {**meta["config"], "d_model": "16"}}))
    with pytest.raises(CheckpointError, match="d_model='16' has type str; expected int"):
        HookedKVShiftTransformer.from_pretrained(tmp_path)
    cfg_path.write_text(json.dumps({**meta, "config": {**meta["config"], "n_layer": 2}}))
    with pytest.raises(CheckpointError, match=r"unknown config field\(s\) \['n_layer'\]"):
        HookedKVShiftTransformer.from_pretrained(tmp_path)


def test_weights_that_do_not_match_the_config(tmp_path):
    _saved(tmp_path)
    cfg_path = tmp_path / CONFIG_FILE
    meta = json.loads(cfg_path.read_text())
    meta["config"]["n_layers"] = 3
    cfg_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"does not match its config: missing \['blocks.2"):
        HookedKVShiftTransformer.from_pretrained(tmp_path)
    meta["config"]["n_layers"] = 2
    meta["config"]["d_vocab"] = 30
    cfg_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"embed.W_E has shape \(23, 16\), config expects"):
        HookedKVShiftTransformer.from_pretrained(tmp_path)


def test_save_over_a_file_raises(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match="is not a directory"):
        build().save_pretrained(tmp_path / "f")


def test_resave_over_existing_checkpoint_replaces_it(tmp_path):
    a = build(seed=1)
    a.save_pretrained(tmp_path)
    b = build(seed=2)
    randomize(b, 9)
    b.save_pretrained(tmp_path)
    loaded = HookedKVShiftTransformer.from_pretrained(tmp_path, device="cpu")
    assert torch.equal(loaded.W_E, b.W_E)
