"""Measure a zoo model's card: validation loss, in-context loss on repeated random tokens, head
scores and head roles (:mod:`probes`), and the training record of its run folder.

Every number is measured on the *shipped* weights (float16, upcast to float32), except
``val_loss_fp32``, the same validation loss of the run's float32 model before export, which says
what the storage costs.

Repeated random tokens (:func:`repeated_tokens`): ``BOS r r`` with ``r`` a run of
:data:`RUN_LENGTH` distinct non-BOS ids, :data:`REPEAT_BATCH` sequences from a generator seeded
with :data:`REPEAT_SEED`. ``loss_first_repeat`` is the mean next-token loss on tokens 2..n of the
first run (token 1 follows only BOS), ``loss_second_repeat`` the mean on tokens 2..n of the second
run (its token 1 follows the last token of the first run, which never occurred before, so it is
unpredictable too). A model that copies from context predicts the second run; one that only
uses bigram statistics cannot (the runs are random).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from kvshift_lens import zoo
from kvshift_lens.zoo.registry import EXPORT_DTYPE, TRAIN_INFO, build_command

RUN_LENGTH = 50
REPEAT_BATCH = 32
REPEAT_SEED = 0
VAL_BATCH = 32
VAL_FIRST_WINDOWS = 16
"""The test recomputes the validation loss on this many first windows (``val_loss_first``)."""
ICL_EARLY, ICL_LATE = 50, 250
"""Token indices of the in-context-learning score on validation windows (Olsson et al.'s score,
at the distances our 256-token windows allow)."""

DATA = ("the Python standard library's .py sources embedded in CPython (kvshift_lens.data.text, "
        "source 'stdlib', 95% of documents by hash for training), byte-level BPE of 2048 tokens "
        "(kvshift_lens/zoo/tokenizer.json, trained on the training split)")


def repeated_tokens(d_vocab: int, bos: int) -> Int[Tensor, "batch pos"]:
    """``BOS r r`` (see the module docstring), ``[REPEAT_BATCH, 1 + 2 * RUN_LENGTH]``, on CPU."""
    if bos != 0:
        raise ValueError(f"the zoo's tokenizer has BOS 0, got {bos}")
    from probes import repeated_random_tokens

    return repeated_random_tokens(REPEAT_BATCH, RUN_LENGTH, d_vocab, first_token=1, prefix_token=bos,
                                  generator=torch.Generator().manual_seed(REPEAT_SEED))


def token_losses(model: Any, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos_minus_1"]:
    """Next-token loss per position (entry t: the loss on token t + 1), float32 on CPU."""
    from probes.scores import token_losses as losses

    with torch.no_grad():
        return losses(model(tokens), tokens).float().cpu()


def repeat_losses(model: Any, tokens: Int[Tensor, "batch pos"]) -> dict[str, Any]:
    """Losses on the first and second run of ``BOS r r`` tokens (module docstring)."""
    n = (tokens.shape[1] - 1) // 2
    loss = token_losses(model, tokens)  # [batch, 2n]: entry t predicts token t + 1
    first = loss[:, 1:n].mean()  # tokens 2..n
    second = loss[:, n + 1: 2 * n].mean()  # tokens n+2..2n
    return {"loss_first_repeat": float(first), "loss_second_repeat": float(second),
            "in_context_drop": float(first - second),
            "loss_by_position": [round(float(x), 4) for x in loss.mean(0)]}


def ablated_repeat_losses(model: Any, tokens: Int[Tensor, "batch pos"]) -> dict[str, dict[str, float]]:
    """Per head ``"L{l}H{h}"``: the first- and second-run losses of ``BOS r r`` with that head's
    output zeroed (:func:`probes.zero_ablate_head`): the heads whose removal raises the
    second-run loss are the ones that copy from context."""
    from probes import zero_ablate_head
    from probes.scores import token_losses as losses

    n = (tokens.shape[1] - 1) // 2
    out = {}
    for layer in range(model.cfg.n_layers):
        for head in range(model.cfg.n_heads):
            with torch.no_grad():
                logits = model.run_with_hooks(
                    tokens, fwd_hooks=[zero_ablate_head(model, layer, head).fwd_hook])
            loss = losses(logits, tokens).float().cpu()
            out[f"L{layer}H{head}"] = {"loss_first_repeat_ablated": float(loss[:, 1:n].mean()),
                                       "loss_second_repeat_ablated": float(loss[:, n + 1:].mean())}
    return out


def val_task(name: str):
    """The validation split of model ``name``'s corpus, tokenized with the zoo tokenizer."""
    from kvshift_lens.data.text import TextTask

    task = {k: v for k, v in zoo.spec(name)["task"].items() if k not in ("name", "split")}
    return TextTask.from_corpus(**task, split="val")


def tokens_digest(tokens: Tensor) -> str:
    """sha256 of a token stream (int64, little-endian): says whether a corpus is the card's."""
    return hashlib.sha256(tokens.to(torch.int64).cpu().numpy().astype("<i8").tobytes()).hexdigest()


def val_losses(model: Any, task: Any, n_windows: int | None = None) -> Float[Tensor, "window pos"]:
    """Per-token losses ``[window, seq_len - 1]`` on the fixed validation windows
    (``task.eval_batches``: every token of the split predicted once), the first ``n_windows``."""
    n_batches = None if n_windows is None else math.ceil(n_windows / VAL_BATCH)
    out = []
    for batch in task.eval_batches(VAL_BATCH, n_batches):
        out.append(token_losses(model, batch.tokens.to(model.cfg.device)))
    loss = torch.cat(out)
    return loss if n_windows is None else loss[:n_windows]


def head_records(model: Any, tokens: Int[Tensor, "batch pos"], copying: bool = True) -> list[dict]:
    """One dict per head: its role (:func:`probes.classify_from_scores`), the scores it was
    decided from and its shift coefficients."""
    from probes import classify_from_scores, head_scores

    tax = classify_from_scores(head_scores(model, tokens, copying=copying))
    out = []
    for h in tax.heads:
        rec = {"head": f"L{h.layer}H{h.head}", "layer": h.layer, "index": h.head,
               "kind": h.kind.value, "reason": h.reason}
        for key in ("induction", "prefix_matching", "previous_token", "previous_token_plain",
                    "duplicate_token", "duplicate_token_plain", "key_match", "copying",
                    "key_past_weight"):
            value = float(getattr(h, key))
            rec[key] = None if math.isnan(value) else value
        rec["key_coeffs"] = list(h.key_coeffs)
        rec["value_coeffs"] = list(h.value_coeffs)
        out.append(rec)
    return out


def _history(run_dir: Path) -> list[dict[str, float]]:
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("kind") == "eval":
            out.append({"step": rec["step"], "val_loss": rec.get("eval/loss"),
                        "icl_score": rec.get("eval/icl_score")})
    return out


def measure_card(name: str, folder: str | os.PathLike, run_dir: str | os.PathLike) -> dict[str, Any]:
    """Measure the card of zoo model ``name`` from its exported checkpoint ``folder`` and its run
    folder ``run_dir`` (``run.json``, ``metrics.jsonl``, ``final/``, the builder's
    ``zoo_train.json``)."""
    from kvshift_lens.model import HookedKVShiftTransformer

    folder, run_dir = Path(folder), Path(run_dir)
    model = HookedKVShiftTransformer.from_pretrained(folder, device="cpu").to(torch.float32)
    cfg = model.cfg
    run = json.loads((run_dir / "run.json").read_text())
    info = json.loads((run_dir / TRAIN_INFO).read_text())
    train = run["train"]
    task = val_task(name)
    val = val_losses(model, task)
    full = HookedKVShiftTransformer.from_pretrained(run_dir / "final", device="cpu")
    val32 = val_losses(full, task)
    reps = repeated_tokens(cfg.d_vocab, task.bos_id)
    heads = head_records(model, reps)
    ablated = ablated_repeat_losses(model, reps)
    for h in heads:
        h.update(ablated[h["head"]])
    shift = bool(cfg.shift_k or cfg.shift_v)
    roles: dict[str, list[str]] = {}
    for h in heads:
        roles.setdefault(h["kind"], []).append(h["head"])
    from probes.scores import in_context_learning_score_from_losses

    return {
        "name": name,
        "data": DATA,
        "n_layers": cfg.n_layers, "d_model": cfg.d_model, "n_heads": cfg.n_heads,
        "d_head": cfg.d_head, "d_mlp": None if cfg.attn_only else cfg.d_mlp,
        "attn_only": bool(cfg.attn_only), "shift": shift,
        "n_params": sum(p.numel() for p in model.parameters()),
        "steps": train["steps"],
        "tokens_seen": train["steps"] * train["batch_size"] * run["task"]["seq_len"],
        "wall_seconds": round(info["wall_seconds"], 1),
        "command": build_command(name),
        "val_loss": float(val.mean()),
        "metrics": {
            "stored_dtype": EXPORT_DTYPE,
            "train_machine": info,
            "batch_size": train["batch_size"], "seq_len": run["task"]["seq_len"],
            "val_windows": int(val.shape[0]),
            "val_tokens_sha256": tokens_digest(task.tokens),
            "val_loss_first": float(val[:VAL_FIRST_WINDOWS].mean()),
            "val_first_windows": VAL_FIRST_WINDOWS,
            "val_loss_fp32": float(val32.mean()),
            "val_icl_score": in_context_learning_score_from_losses(val, ICL_EARLY, ICL_LATE),
            "val_icl_tokens": [ICL_EARLY, ICL_LATE],
            "repeated_tokens": {"batch": REPEAT_BATCH, "run_length": RUN_LENGTH,
                                "seed": REPEAT_SEED, "prefix": "BOS",
                                **repeat_losses(model, reps)},
            "heads": heads,
            "roles": roles,
            "history": _history(run_dir),
        },
    }


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.2f}" if isinstance(x, float) else str(x)


def card_markdown(card: dict[str, Any]) -> str:
    """``card.md``: the card in words and tables."""
    m = card["metrics"]
    r = m["repeated_tokens"]
    shape = (f"{card['n_layers']} layer(s), d_model {card['d_model']}, {card['n_heads']} heads of "
             f"{card['d_head']}, " + ("attention only" if card["attn_only"]
                                      else f"GELU MLPs of {card['d_mlp']}"))
    lines = [
        f"# {card['name']}", "",
        f"{'KV-shift' if card['shift'] else 'Vanilla'} language model: {shape}; "
        f"{card['n_params']:,} parameters, stored in {m['stored_dtype']}.", "",
        f"- Data: {card['data']}.",
        f"- Training: {card['steps']} steps x {m['batch_size']} windows x {m['seq_len']} tokens = "
        f"{card['tokens_seen']:,} tokens, {card['wall_seconds']:.0f} s on "
        f"{m['train_machine']['torch_threads']} CPU thread(s).",
        f"- Rebuild: `{card['command']}` (spec: `kvshift_lens/zoo/specs/{card['name']}.json`).",
        f"- Validation loss: {card['val_loss']:.4f} nats/token over {m['val_windows']} windows "
        f"(float32 weights before export: {m['val_loss_fp32']:.4f}); in-context-learning score "
        f"(loss at token {m['val_icl_tokens'][1]} minus token {m['val_icl_tokens'][0]}): "
        f"{m['val_icl_score']:.3f}.",
        f"- Repeated random tokens (BOS + {r['run_length']} tokens twice, {r['batch']} sequences): "
        f"loss {r['loss_first_repeat']:.3f} on the first run, {r['loss_second_repeat']:.3f} on "
        f"the second (drop {r['in_context_drop']:.3f}).",
        "- Head roles (probes.classify_heads): "
        + "; ".join(f"{k}: {', '.join(v)}" for k, v in sorted(m["roles"].items())) + ".", "",
        "| head | role | induction | prefix matching | previous token | previous token (plain) "
        "| duplicate | copying | 2nd-run loss, head zeroed | key coeffs | value coeffs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for h in m["heads"]:
        coeffs = [", ".join(f"{c:.2f}" for c in h[k]) for k in ("key_coeffs", "value_coeffs")]
        lines.append(
            f"| {h['head']} | {h['kind']} | {_fmt(h['induction'])} | {_fmt(h['prefix_matching'])} "
            f"| {_fmt(h['previous_token'])} | {_fmt(h['previous_token_plain'])} "
            f"| {_fmt(h['duplicate_token'])} | {_fmt(h['copying'])} "
            f"| {_fmt(h['loss_second_repeat_ablated'])} | {coeffs[0]} | {coeffs[1]} |")
    lines += ["", "Scores are measured on the repeated random tokens above; 'plain' and prefix "
              "matching read the attention pattern, the others the value sources (the effective "
              "pattern of a shifted head, probes.effective).", ""]
    return "\n".join(lines)


def zoo_table() -> str:
    """A markdown table of every built zoo model (from the cards), and their total size on disk."""
    lines = ["| name | layers | d_model | heads | MLP | params | tokens | val loss | 1st / 2nd run "
             "loss | induction heads (score) | previous-token heads |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    total = 0
    for name in zoo.list_models():
        folder = zoo.MODELS_DIR / name
        if not (folder / zoo.CARD_FILE).is_file():
            continue
        total += sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        c = zoo.model_card(name)
        r = c.metrics["repeated_tokens"]
        ind = [f"{h['head']} ({h['induction']:.2f})" for h in c.metrics["heads"]
               if h["kind"].startswith("induction")]
        prev = [h["head"] for h in c.metrics["heads"] if h["kind"] == "previous_token"]
        lines.append(
            f"| {name} | {c.n_layers} | {c.d_model} | {c.n_heads} | "
            f"{'-' if c.attn_only else c.d_mlp} | {c.n_params / 1e6:.2f}M | "
            f"{c.tokens_seen / 1e6:.2f}M | {c.val_loss:.3f} | "
            f"{r['loss_first_repeat']:.2f} / {r['loss_second_repeat']:.2f} | "
            f"{', '.join(ind) or 'none'} | {', '.join(prev) or 'none'} |")
    shared = zoo.TOKENIZER_FILE.stat().st_size + sum(
        f.stat().st_size for f in zoo.SPECS_DIR.glob("*.json"))
    lines += ["", f"Total on disk: {(total + shared) / 1e6:.1f} MB (weights in "
              f"{EXPORT_DTYPE}, tokenizer, cards and specs)."]
    return "\n".join(lines) + "\n"


def write_card(card: dict[str, Any], folder: str | os.PathLike) -> None:
    """Write ``card.json`` and ``card.md`` into ``folder``."""
    folder = Path(folder)
    (folder / zoo.CARD_FILE).write_text(json.dumps(card, indent=1) + "\n")
    (folder / zoo.CARD_MD).write_text(card_markdown(card))


__all__ = ["ablated_repeat_losses", "card_markdown", "head_records", "measure_card", "repeat_losses",
           "repeated_tokens", "token_losses", "val_losses", "val_task", "write_card", "zoo_table"]
