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


def test_corrupt_safetensors(tmp_path):
    _saved(tmp_path)
    path = tmp_path / WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:-100])  # truncated
    with pytest.raises(CheckpointError, match="corrupt or not a safetensors file"):
        HookedKVShiftTransformer.from_pretrained(tmp_path)
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        HookedKVShiftTransformer.from_pretrained(tmp_path)


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
