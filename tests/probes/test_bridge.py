"""The model-agnostic probes on a TransformerLens 4 ``TransformerBridge`` built locally (a random
tiny GPT-2, no download): they run, and agree with ``head_detector.detect_head``."""

from __future__ import annotations

import pytest
import torch

import probes
from tests.convert.test_hf import _word_level_tokenizer, hf_model


@pytest.fixture(scope="module")
def bridge(tmp_path_factory):
    bridge_mod = pytest.importorskip("transformer_lens.model_bridge")
    import huggingface_hub.constants
    from transformers import AutoTokenizer

    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    folder = tmp_path_factory.mktemp("tok")
    _word_level_tokenizer(bos=True).save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    model = bridge_mod.TransformerBridge.boot_transformers("gpt2", hf_model=hf_model("gpt2"),
                                                           tokenizer=tok, device="cpu")
    yield model.eval()
    mp.undo()


@pytest.mark.parametrize("name,fn", [
    ("previous_token_head", probes.previous_token_scores),
    ("duplicate_token_head", probes.duplicate_token_scores),
    ("induction_head", probes.induction_scores),
])
def test_probes_agree_with_detect_head_on_a_bridge(bridge, name, fn):
    from transformer_lens.head_detector import detect_head

    words = [f"w{i}" for i in (3, 14, 15, 9, 2, 6, 5, 3, 14, 15, 9, 2)]
    text = " ".join(words)
    expected = detect_head(bridge, text, name, error_measure="mul")
    tokens = bridge.to_tokens(text)
    got = fn(bridge, tokens, effective=False, queries="all")
    torch.testing.assert_close(got.to(expected.dtype), expected, rtol=1e-5, atol=1e-6)
    assert got.shape == (2, 4)


def test_bridge_has_no_shift_so_effective_equals_plain(bridge):
    tokens = probes.repeated_random_tokens(2, 6, 40, first_token=1,
                                           generator=torch.Generator().manual_seed(0))
    plain = probes.induction_scores(bridge, tokens, effective=False)
    eff = probes.induction_scores(bridge, tokens, effective=True)
    torch.testing.assert_close(plain, eff)
