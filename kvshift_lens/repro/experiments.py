"""The paper's toy experiments as sweep specs (PAPER.md "Claims"), one sweep per experiment.

Each experiment is an ordinary sweep (:mod:`kvshift_lens.train.sweep`): ``kvshift repro run``
writes its spec to ``OUT/<experiment>/sweep.json`` and runs it, so any result folder can be rerun
or extended with ``kvshift sweep OUT/<experiment>/sweep.json --out OUT/<experiment>``.
``kvshift repro spec NAME`` prints a spec without running anything.

``quick=True`` gives the same experiments, variants and analysis on a budget of seconds: a handful
of steps, one seed and at most two sizes, with small text. Its numbers mean nothing; it exists so
the whole pipeline (training, summaries, figures, report) is exercised in the test suite.

The full set takes about 80 minutes on 2 CPU cores with ``--jobs 2`` (BENCHMARKS.md has the
measured wall times).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# The induction setting of the demo and of benchmarks/induction_steps.py.
INDUCTION_TASK = {"name": "induction", "d_vocab": 64, "seq_len": 64}
# Published runs trained free coefficients: pinned, so these specs reproduce them exactly whatever
# train.config.DEFAULT_SHIFT_PARAM (what a spec that names none gets) becomes.
PUBLISHED_SHIFT_PARAM = {"shift_param": "free"}
INDUCTION_MODEL = {"d_model": 64, "d_head": 16, "attn_only": True, **PUBLISHED_SHIFT_PARAM}
INDUCTION_TRAIN = {"batch_size": 64, "lr": 1e-3, "eval_every": 25, "eval_batches": 4,
                   "target_accuracy": 0.9}
KV = {"shift_k": True, "shift_v": True}
VANILLA = {"shift_k": False, "shift_v": False}


@dataclass(frozen=True)
class Experiment:
    """One reproduction: the claim it checks (PAPER.md "Claims" item) and its sweep spec."""

    name: str
    title: str
    claim: str
    paper_item: int
    build: Callable[[bool], dict[str, Any]]

    def spec(self, quick: bool = False) -> dict[str, Any]:
        """The sweep spec (a fresh dict); ``quick`` for the smoke-test budget."""
        return copy.deepcopy(self.build(quick))


def _induction_base(steps: int, quick: bool, **train: Any) -> dict[str, Any]:
    return {"model": dict(INDUCTION_MODEL), "task": dict(INDUCTION_TASK),
            "train": {**INDUCTION_TRAIN, "steps": 6 if quick else steps,
                      **({"eval_every": 3} if quick else {}), **train}}


def _seeds(n: int, quick: bool) -> list[int]:
    return [0] if quick else list(range(n))


def _sizes(sizes: dict[str, Any], quick: bool, keep: int = 2) -> dict[str, Any]:
    return dict(list(sizes.items())[:keep]) if quick else sizes


def depth(quick: bool) -> dict[str, Any]:
    """Fig. 1 left: accuracy over training for 1-layer KV-shift, 1- and 2-layer vanilla. Full
    curves (no early stop), five seeds."""
    return {
        "base": _induction_base(1200, quick),
        "variants": {"kvshift_1L": {"model": {"n_layers": 1, **KV}},
                     "vanilla_1L": {"model": {"n_layers": 1, **VANILLA}},
                     "vanilla_2L": {"model": {"n_layers": 2, **VANILLA}}},
        "seeds": _seeds(5, quick),
    }


WIDTHS = {"d8": {"model": {"d_model": 8, "d_head": 4}},
          "d16": {"model": {"d_model": 16, "d_head": 4}},
          "d32": {"model": {"d_model": 32, "d_head": 8}},
          "d64": {"model": {"d_model": 64, "d_head": 16}},
          "d128": {"model": {"d_model": 128, "d_head": 32}}}


def width(quick: bool) -> dict[str, Any]:
    """Fig. 1 right: final induction accuracy against d_model (1-layer KV-shift vs 2-layer
    vanilla), a fixed number of steps."""
    return {
        "base": _induction_base(1000, quick),
        "variants": {"kvshift_1L": {"model": {"n_layers": 1, **KV}},
                     "vanilla_2L": {"model": {"n_layers": 2, **VANILLA}}},
        "sizes": _sizes(WIDTHS, quick),
        "seeds": _seeds(3, quick),
    }


NGRAM_TASK = {"name": "ngram", "d_vocab": 16, "seq_len": 32, "support": 2}
NGRAM_SIZES = {
    # ~1.3K parameters, 1 layer (the paper's smallest: 0.8K, 1 layer)
    "1K": {"model": {"n_layers": 1, "d_model": 8, "d_head": 4, "d_mlp": 32},
           "train": {"steps": 3000, "lr": 3e-3}},
    # ~0.4M parameters, 2 layers (the paper's 0.4M, 2 layers)
    "0.4M": {"model": {"n_layers": 2, "d_model": 128, "d_head": 32},
             "train": {"steps": 800}},
    # ~1.3M parameters, 4 layers (the paper's largest is 50M, 4 layers: beyond 2 CPU cores)
    "1.3M": {"model": {"n_layers": 4, "d_model": 160, "d_head": 40},
             "train": {"steps": 500}},
}


def ngram(quick: bool) -> dict[str, Any]:
    """Fig. 3: 3-gram accuracy (against the exact Bayes ceiling) for vanilla and KV-shift at
    three sizes."""
    sizes = _sizes(NGRAM_SIZES, quick)
    if quick:
        sizes = {k: {"model": v["model"], "train": {"steps": 6}} for k, v in sizes.items()}
    return {
        "base": {"model": {"attn_only": False, **PUBLISHED_SHIFT_PARAM}, "task": dict(NGRAM_TASK),
                 "train": {"batch_size": 64, "lr": 1e-3, "eval_every": 3 if quick else 100,
                           "eval_batches": 4, "target_accuracy": 0.7}},
        "variants": {"vanilla": {"model": VANILLA}, "kvshift": {"model": KV}},
        "sizes": sizes,
        "seeds": _seeds(2, quick),
    }


def multihop(quick: bool) -> dict[str, Any]:
    """Multi-hop induction: 1, 2 and 3 hops (sizes) x depth 1-3 x vanilla / KV-shift
    (variants), 1500 steps, and 2 hops again with 6000 steps. Stops at 90% to save time; runs that
    never get there use every step."""
    depths = (1, 2) if quick else (1, 2, 3)
    variants = {}
    for kind, shift in (("vanilla", VANILLA), ("kvshift", KV)):
        for n in depths:
            variants[f"{kind}_{n}L"] = {"model": {"n_layers": n, **shift}}
    hops = {f"hop{h}": {"task": {"hops": h}} for h in (1, 2, 3)}
    # Nothing learned two hops in 1500 steps: the same task with four times the budget.
    hops["hop2-long"] = {"task": {"hops": 2}, "train": {"steps": 6000}}
    return {
        "base": {"model": dict(INDUCTION_MODEL),
                 "task": {"name": "multi_hop", "d_vocab": 32, "seq_len": 32},
                 "train": {**INDUCTION_TRAIN, "steps": 6 if quick else 1500,
                           "eval_every": 3 if quick else 50, "stop_at_target": True}},
        "variants": variants,
        "sizes": _sizes(hops, quick),
        "seeds": _seeds(2, quick),
    }


def hop2_deep(quick: bool) -> dict[str, Any]:
    """A follow-up to ``multihop``: two hops, three layers, 6000 steps, six seeds (in the
    multi-hop set one of two KV-shift seeds learned two hops and neither vanilla seed did)."""
    base = multihop(quick)["base"]
    base["task"]["hops"] = 2
    base["train"]["steps"] = 6 if quick else 6000
    return {"base": base,
            "variants": {"vanilla_3L": {"model": {"n_layers": 3, **VANILLA}},
                         "kvshift_3L": {"model": {"n_layers": 3, **KV}}},
            "seeds": _seeds(6, quick)}


def ablation(quick: bool) -> dict[str, Any]:
    """Which variants of the shift learn one-layer induction, and how fast (steps to 90%, stop
    there, at most 1000 steps)."""
    one = {"n_layers": 1}
    variants = {
        "kv": {"model": {**one, **KV}},
        "k_only": {"model": {**one, "shift_k": True, "shift_v": False}},
        "v_only": {"model": {**one, "shift_k": False, "shift_v": True}},
        "convex": {"model": {**one, **KV, "shift_param": "convex"}},
        "window2": {"model": {**one, **KV, "shift_window": 2}},
        "window4": {"model": {**one, **KV, "shift_window": 4}},
        "init_identity": {"model": {**one, **KV, "shift_init": "identity"}},
        "init_normal": {"model": {**one, **KV, "shift_init": "normal"}},
        "init_induction": {"model": {**one, **KV, "shift_init": "induction"}},
        "kv_equal_lr": {"model": {**one, **KV}, "train": {"shift_lr_scale": 1.0}},
    }
    return {"base": _induction_base(1000, quick, stop_at_target=True), "variants": variants,
            "seeds": _seeds(3, quick)}


TEXT_TASK = {"name": "text", "tokenizer": "byte", "seq_len": 128, "max_files": 400}
TEXT_SIZES = {"d32": {"model": {"d_model": 32, "d_head": 8}},
              "d64": {"model": {"d_model": 64, "d_head": 16}},
              "d128": {"model": {"d_model": 128, "d_head": 32}},
              # the same d64 models on BPE tokens (2048, trained on the training split): closer to
              # the paper's setting than bytes, where the previous byte is worth a lot
              "d64-bpe": {"model": {"d_model": 64, "d_head": 16},
                          "task": {"tokenizer": "bpe", "bpe_vocab_size": 2048}}}


def text(quick: bool) -> dict[str, Any]:
    """Validation loss and in-context-learning score on the embedded corpus (bytes), 2-layer
    models at three widths, the same token budget for both variants."""
    task = dict(TEXT_TASK)
    if quick:
        task.update(seq_len=32, max_files=30, val_fraction=0.3)
    return {
        "base": {"model": {"n_layers": 2, **PUBLISHED_SHIFT_PARAM}, "task": task,
                 "train": {"batch_size": 8 if quick else 32, "lr": 1e-3,
                           "steps": 6 if quick else 1000, "eval_every": 3 if quick else 100,
                           "eval_batches": 2 if quick else 8}},
        "variants": {"vanilla": {"model": VANILLA}, "kvshift": {"model": KV}},
        "sizes": _sizes(TEXT_SIZES, quick, keep=1),
        "seeds": _seeds(2, quick),
    }


EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in [
    Experiment("depth", "Depth: one shifted layer against one and two vanilla layers",
               "On an induction task a 1-layer KV-shift model learns induction, a 1-layer vanilla "
               "model does not, and a 2-layer vanilla model learns it later.", 1, depth),
    Experiment("width", "Width: accuracy against hidden size",
               "1-layer KV shifting reaches the induction accuracy of 2-layer vanilla at a "
               "smaller hidden size.", 2, width),
    Experiment("ngram", "n-grams: no help, no harm",
               "KV shifting neither helps nor hurts learning 3-grams, at every model size.", 3,
               ngram),
    Experiment("multihop", "Multi-hop induction",
               "KV shifting does at least as well as vanilla on chained (hop-k) induction at "
               "every depth (the paper compares the two; it states no margin).", 4, multihop),
    Experiment("hop2_deep", "Two hops, three layers, six seeds",
               "With three layers and a long budget, KV shifting learns two-hop induction more "
               "often than vanilla (a follow-up to the multi-hop runs, not a claim of the "
               "paper's own).", 4, hop2_deep),
    Experiment("ablation", "Ablations: which shifts learn one-layer induction",
               "Removing either the key or the value shift loses part of the gain; the "
               "coefficients constrained to [0, 1] still work (paper's ablations).", 8, ablation),
    Experiment("text", "Text: validation loss and in-context learning",
               "KV shifting trains to a lower loss than vanilla on language modelling at the "
               "same token budget (the paper's claim at 1.5B-19B, checked here at toy scale).",
               6, text),
]}
"""Every experiment by name, in the order ``kvshift repro run`` runs them. The landscape
(experiment 6) needs no training of its own: the report computes it on the ablation's ``convex``
runs, whose heads live on the paper's plane."""


def experiment(name: str) -> Experiment:
    """The experiment called ``name``; ValueError naming the choices otherwise."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose from {list(EXPERIMENTS)}")
    return EXPERIMENTS[name]


__all__ = ["EXPERIMENTS", "Experiment", "experiment"]
