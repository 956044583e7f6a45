"""The model zoo: names, specs, loading by name offline, and the cards' numbers recomputed from the
shipped weights, with references written here (losses from logits by hand, attention scores
read straight off ``hook_pattern``)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from kvshift_lens import zoo
from kvshift_lens.checkpoint import CheckpointError
from kvshift_lens.config import KVShiftConfig
from kvshift_lens.model import HookedKVShiftTransformer
from kvshift_lens.train import RunSpec
from kvshift_lens.zoo import card as zoo_card
from kvshift_lens.zoo.build import main as zoo_main

PAIRS = [("kvshift-attn-1l", "vanilla-attn-1l"), ("kvshift-attn-2l", "vanilla-attn-2l"),
         ("kvshift-gelu-2l", "vanilla-gelu-2l")]
SHIFT_FIELDS = {"shift_k", "shift_v", "shift_q", "shift_init"}
BUILT = [n for n in zoo.list_models() if (zoo.MODELS_DIR / n / "model.safetensors").is_file()]
# Same weights, same float32 arithmetic as when the card was measured; only the order of
# floating-point reductions may differ (threads, BLAS), which moves means by ~1e-6.
ATOL = 1e-3


def test_list_models_names_the_specs():
    names = zoo.list_models()
    assert names == sorted(p.stem for p in zoo.SPECS_DIR.glob("*.json"))
    for pair in PAIRS:
        assert set(pair) <= set(names)


@pytest.mark.parametrize("kv,vanilla", PAIRS)
def test_pairs_differ_only_in_the_shift(kv, vanilla):
    a, b = zoo.spec(kv), zoo.spec(vanilla)
    assert a["task"] == b["task"] and a["train"] == b["train"]  # same tokens, same budget
    diff = {k for k in a["model"] if a["model"][k] != b["model"].get(k)}
    assert diff == {"shift_k", "shift_v", "shift_init"}
    assert a["model"]["shift_k"] and a["model"]["shift_v"]
    assert not b["model"]["shift_k"] and not b["model"]["shift_v"]


@pytest.mark.parametrize("name", zoo.list_models())
def test_specs_are_complete_and_point_at_the_shared_tokenizer(name):
    raw = json.loads((zoo.SPECS_DIR / f"{name}.json").read_text())
    assert raw["task"]["tokenizer"] == "tokenizer.json"  # relative to the zoo folder
    spec = zoo.spec(name)
    assert spec["task"]["tokenizer"] == str(zoo.TOKENIZER_FILE)
    parsed = RunSpec.from_dict(spec)  # every train setting known and valid
    assert parsed.to_dict()["train"] == spec["train"]
    KVShiftConfig.from_dict({**spec["model"], "device": "cpu"})  # every model field valid
    # pinned, not left to defaults that may change
    for key in ("shift_param", "shift_init", "seed", "n_ctx", "d_vocab"):
        assert key in spec["model"]
    for key in ("seed", "shift_lr_scale", "lr", "steps", "batch_size"):
        assert key in spec["train"]


@pytest.mark.slow
@pytest.mark.parametrize("name", zoo.list_models())
def test_specs_resolve_with_the_shipped_tokenizer(name):
    from kvshift_lens.train import resolve_run_spec

    run = resolve_run_spec(zoo.spec(name))
    assert run.model.d_vocab == run.task.d_vocab == 2048
    assert run.task.bos_id == 0


def test_unknown_names_give_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist: it is neither a checkpoint folder nor a zoo model.*kvshift-attn-1l"):
        HookedKVShiftTransformer.from_pretrained("kvshift-attn-9l")
    with pytest.raises(ValueError, match="unknown zoo model 'nope'.*vanilla-attn-1l"):
        zoo.load("nope")
    with pytest.raises(ValueError, match="unknown zoo model"):
        zoo.model_card("nope")
    with pytest.raises(SystemExit):
        zoo_main(["build", "nope"])


def test_a_folder_wins_over_a_zoo_name(tmp_path, monkeypatch):
    """An existing folder is always read as a folder, even when it carries a zoo name."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "kvshift-attn-1l").mkdir()
    with pytest.raises(CheckpointError) as err:
        HookedKVShiftTransformer.from_pretrained("kvshift-attn-1l")
    assert "zoo" not in str(err.value)


@pytest.fixture(scope="module")
def val_task():
    return zoo_card.val_task(zoo.list_models()[0])


@pytest.fixture(scope="module")
def repeats():
    return zoo_card.repeated_tokens(2048, 0)


def _loss_by_hand(model, tokens):
    return _loss_by_hand_logits(model(tokens), tokens)


def _loss_by_hand_logits(logits, tokens):
    logp = logits[:, :-1].float().log_softmax(-1)
    return -logp.gather(-1, tokens[:, 1:, None])[..., 0]


@pytest.mark.skipif(not BUILT, reason="no zoo model has been built (python -m kvshift_lens.zoo build all)")
@pytest.mark.parametrize("name", BUILT)
def test_shipped_model_matches_its_card(name, repeats, val_task):
    card = zoo.model_card(name)
    model = HookedKVShiftTransformer.from_pretrained(name, device="cpu")
    assert next(model.parameters()).dtype == torch.float32
    stored = {v.dtype for v in load_file(zoo.model_dir(name) / "model.safetensors").values()}
    assert stored == {torch.float16}
    # the same weights as zoo.load, and the tokenizer came along
    other = zoo.load(name, device="cpu")
    for (k, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), k
    tok = model.tokenizer
    assert tok is not None and tok.bos_token_id == 0 and len(tok) == model.cfg.d_vocab
    assert tok.decode(tok.encode("def f(x):\n    return x")) .endswith("def f(x):\n    return x")

    spec = zoo.spec(name)["model"]
    for key in ("n_layers", "d_model", "n_heads", "d_head", "attn_only", "shift_k", "shift_v"):
        assert getattr(model.cfg, key) == spec[key], key
    assert card.n_params == sum(p.numel() for p in model.parameters())
    train = zoo.spec(name)["train"]
    assert card.tokens_seen == train["steps"] * train["batch_size"] * zoo.spec(name)["task"]["seq_len"]
    assert card.command == f"python -m kvshift_lens.zoo build {name} --out runs/zoo"

    # repeated-token losses, by hand
    m = card.metrics
    n = m["repeated_tokens"]["run_length"]
    with torch.no_grad():
        loss = _loss_by_hand(model, repeats)
    assert float(loss[:, 1:n].mean()) == pytest.approx(m["repeated_tokens"]["loss_first_repeat"], abs=ATOL)
    assert float(loss[:, n + 1:].mean()) == pytest.approx(m["repeated_tokens"]["loss_second_repeat"], abs=ATOL)

    # attention scores read off hook_pattern: prefix matching = attention from the second run's
    # token i to i - n + 1 (the token after its first occurrence); previous token = P[i, i-1]
    with torch.no_grad():
        _, cache = model.run_with_cache(repeats, names_filter=lambda h: h.endswith("hook_pattern"))
    heads = {h["head"]: h for h in m["heads"]}
    q = torch.arange(n + 1, 2 * n + 1)
    for layer in range(model.cfg.n_layers):
        pat = cache[f"blocks.{layer}.attn.hook_pattern"]  # [batch, head, q, k]
        prefix = pat[:, :, q, q - n + 1].mean((0, 2))
        prev = pat[:, :, torch.arange(1, pat.shape[-1]), torch.arange(0, pat.shape[-1] - 1)].mean((0, 2))
        for h in range(model.cfg.n_heads):
            rec = heads[f"L{layer}H{h}"]
            assert float(prefix[h]) == pytest.approx(rec["prefix_matching"], abs=ATOL)
            assert float(prev[h]) == pytest.approx(rec["previous_token_plain"], abs=ATOL)
    # zeroing one head's output (hook_z) by hand: the card's ablated second-run losses
    for key, rec in heads.items():
        layer, h = int(key[1]), int(key[3:])

        def zero(z, hook, h=h):
            z = z.clone()
            z[:, :, h] = 0
            return z

        with torch.no_grad():
            abl = _loss_by_hand_logits(model.run_with_hooks(
                repeats, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", zero)]), repeats)
        assert float(abl[:, n + 1:].mean()) == pytest.approx(rec["loss_second_repeat_ablated"], abs=ATOL)
    # roles and the value-source scores, recomputed through the probes
    again = {h["head"]: h for h in zoo_card.head_records(model, repeats, copying=False)}
    for key, rec in heads.items():
        assert again[key]["kind"] == rec["kind"], key
        for score in ("induction", "previous_token", "duplicate_token", "key_match"):
            assert again[key][score] == pytest.approx(rec[score], abs=ATOL), (key, score)

    # validation loss on the first windows (only on the corpus the card was measured on)
    if zoo_card.tokens_digest(val_task.tokens) != m["val_tokens_sha256"]:
        pytest.skip("this Python's standard library is not the corpus the card was measured on")
    k = m["val_first_windows"]
    batch = next(val_task.eval_batches(k, 1))
    with torch.no_grad():
        val = _loss_by_hand(model, batch.tokens)
    assert float(val.mean()) == pytest.approx(m["val_loss_first"], abs=ATOL)
    # float16 storage costs under 0.01 nats/token against the float32 model it was exported from
    assert abs(card.val_loss - m["val_loss_fp32"]) < 0.01


@pytest.mark.slow
def test_build_trains_exports_and_measures_a_card(tmp_path, monkeypatch):
    """The builder end to end on a 3-step budget: train with the project trainer, export float16
    weights, measure and write the card; a second build reuses the finished run."""
    from kvshift_lens.zoo import build as zoo_build

    real = zoo.spec

    def short(name):
        d = real(name)
        d["train"].update(steps=3, eval_every=3, eval_batches=1)
        return d

    monkeypatch.setattr(zoo, "spec", short)
    dest = tmp_path / "export"
    card = zoo_build.build("kvshift-attn-1l", tmp_path / "runs", dest=dest)
    assert card["steps"] == 3 and card["tokens_seen"] == 3 * 16 * 256
    loaded = HookedKVShiftTransformer.from_pretrained(dest, device="cpu")
    assert next(loaded.parameters()).dtype == torch.float16
    assert json.loads((dest / "card.json").read_text())["val_loss"] == card["val_loss"]
    assert (dest / "card.md").read_text().startswith("# kvshift-attn-1l")
    stamp = (tmp_path / "runs" / "kvshift-attn-1l" / "final" / "model.safetensors").stat().st_mtime_ns
    zoo_build.build("kvshift-attn-1l", tmp_path / "runs", dest=dest)  # reused, not retrained
    assert (tmp_path / "runs" / "kvshift-attn-1l" / "final" / "model.safetensors").stat().st_mtime_ns == stamp
    monkeypatch.setattr(zoo, "spec", real)  # the run no longer matches the (real) spec
    with pytest.raises(ValueError, match="differs from the spec.*train.steps.*--retrain"):
        zoo_build.build("kvshift-attn-1l", tmp_path / "runs", dest=dest)


@pytest.mark.skipif(not {"kvshift-attn-1l", "vanilla-attn-1l"} <= set(BUILT),
                    reason="the 1-layer pair has not been built")
def test_the_one_layer_story_the_readme_tells():
    """What the zoo's README reports (the cards' numbers are tied to the weights above): the
    1-layer KV-shift model copies from context through one shifted induction head, the 1-layer
    vanilla model cannot."""
    kv, van = zoo.model_card("kvshift-attn-1l"), zoo.model_card("vanilla-attn-1l")
    r_kv, r_van = kv.metrics["repeated_tokens"], van.metrics["repeated_tokens"]
    assert r_kv["in_context_drop"] > 1.0
    assert abs(r_van["in_context_drop"]) < 0.5
    induction = [h for h in kv.metrics["heads"] if h["kind"] == "induction_via_shift"]
    assert induction
    for h in induction:  # zeroing it removes most of the copying
        assert h["loss_second_repeat_ablated"] - r_kv["loss_second_repeat"] > 1.0
    assert not [h for h in van.metrics["heads"] if h["kind"].startswith("induction")]
    assert kv.val_loss < van.val_loss
