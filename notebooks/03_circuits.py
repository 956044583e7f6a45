# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 3. Circuits: how one shifted layer does what two vanilla layers do
#
# Induction needs two facts at once: at position j, *which token came before* (to match the
# current token against), and *which token is here* (to copy). Vanilla attention can only look at
# each position's own token, so it needs two layers: a **previous-token head** in layer 0 writes
# "token j-1" into the residual stream at j, and an **induction head** in layer 1 matches its
# query against that (K-composition) and copies token j.
#
# A KV-shift head builds the first fact into its key, `K'_j = α1·K_j + α2·K_{j-1}`: with `α2` large
# the key at j already describes token j-1, and with `β1` large the value still carries token j.
# One layer is enough.
#
# We check that story on the models of notebook 1 (1-layer KV-shift, 2-layer vanilla) with
# attention patterns, probes (head taxonomy, scores, a linear probe), ablations (remove a head's
# key or value shift; mean-ablate heads) and activation patching on the shift hooks.
#
# `KVSHIFT_FAST=1` (CI) trains for a few steps only: the models have learned nothing and the
# pictures are noise. Run the full mode (the default) to see the circuits.

# %%
import os
from pathlib import Path

from kvshift_lens.viz import setup_notebook

FAST = os.environ.get("KVSHIFT_FAST", "0") == "1"
RUNS = Path("runs") / "notebooks"  # git-ignored; relative to the folder the notebook runs in
# figures that survive HTML export; 1 torch thread, as the times in README.md were measured
print(setup_notebook(threads=1))
print(f"fast mode: {FAST}; run folders under {RUNS.resolve()}")

# %% [markdown]
# ## The models
#
# Notebook 1's sweep: the same spec and folder, so its finished runs are reused (run first, this
# notebook trains all three models of that sweep). Two of them are compared here.

# %%
from kvshift_lens.demo import demo_spec
from kvshift_lens.model import HookedKVShiftTransformer
from kvshift_lens.train.sweep import run_sweep

spec = demo_spec()
spec["base"]["train"].update(steps=2000, stop_at_target=False)
if FAST:
    spec["base"]["train"].update(steps=30, batch_size=8, eval_every=10, eval_batches=1)
sweep_dir = RUNS / ("induction_fast" if FAST else "induction")
summary = run_sweep(spec, sweep_dir, jobs=1 if FAST else 2)
kv, v2 = (HookedKVShiftTransformer.from_pretrained(sweep_dir / f"{v}__seed0" / "final",
                                                   device="cpu").eval()
          for v in ("kvshift_1L", "vanilla_2L"))
print({r.variant: round(r.final_accuracy, 3) for r in summary.runs
       if r.status == "finished" and r.variant in ("kvshift_1L", "vanilla_2L")})

# %% [markdown]
# Probe data: the training task (for ablations), and the classic induction sequence `BOS r r`
# with `r` a run of 20 distinct random tokens (for patterns, scores and patching).

# %%
import torch

from kvshift_lens.data.tasks import RepeatedTokensTask
from kvshift_lens.demo import TASK
from kvshift_lens.train.tasks import build_task

task = build_task(TASK)
RUN = 20
repeats = RepeatedTokensTask(d_vocab=TASK["d_vocab"], run_length=RUN, distinct=True)
tokens = repeats.sample(16, torch.Generator().manual_seed(0)).tokens  # [16, 1 + 2 * RUN]

# %% [markdown]
# ## Attention patterns
#
# Left: where each head attends (positions). Right: the **effective** pattern, whose *values*
# it reads once the value shift mixes each position with the one before
# (`A_eff[i, j] = β1·A[i, j] + β2·A[i, j+1]`). With the paper's free coefficients the rows of the
# effective pattern sum to `β1 + β2`, not 1 (about 5 after full training here), so the right
# panel looks darker. On the second copy of `r`, an induction head attends one position after the
# earlier copy of the current token. That is a stripe parallel to the diagonal, `RUN - 1`
# positions to its left. Click a thumbnail to enlarge a head.

# %%
from kvshift_lens.viz import plain_and_effective
from kvshift_lens.viz.patterns import token_strings

strs = token_strings(tokens[0], bos_token=0)
plain_and_effective(kv, tokens[0], layer=0, token_strs=strs)

# %% [markdown]
# The vanilla model needs both layers: layer 0 has a head on the sub-diagonal (each token attends
# to the one before: the previous-token head), layer 1 the induction stripe.

# %%
plain_and_effective(v2, tokens[0], layer=0, token_strs=strs) + \
    plain_and_effective(v2, tokens[0], layer=1, token_strs=strs)

# %% [markdown]
# ## Probes: what every head does
#
# `classify_heads` scores each head on `BOS r r` and applies the taxonomy of `probes.taxonomy`: an
# induction head whose keys weigh the previous position more than its own (`key_past_weight > 0.5`)
# is **induction via the shift**; one in a later layer without that is **induction via
# composition**. `prefix_matching` is the induction score on the plain pattern (what
# TransformerLens' `detect_head` sees); `induction` on the effective pattern (what is read).

# %%
import pandas as pd

from probes import classify_heads

taxonomy = {"kvshift_1L": classify_heads(kv, tokens), "vanilla_2L": classify_heads(v2, tokens)}
columns = ["model", "layer", "head", "kind", "induction", "prefix_matching", "previous_token",
           "key_past_weight", "key_coeffs", "value_coeffs"]
pd.DataFrame([{"model": m, **r} for m, t in taxonomy.items() for r in t.records()])[columns].round(3)

# %%
from IPython.display import display

from kvshift_lens.viz import score_heatmap

kv_scores, v2_scores = taxonomy["kvshift_1L"].scores, taxonomy["vanilla_2L"].scores
for title, scores in [("KV-shift 1L: prefix matching (plain pattern)", kv_scores.prefix_matching),
                      ("KV-shift 1L: induction (effective pattern)", kv_scores.induction),
                      ("Vanilla 2L: previous token", v2_scores.previous_token),
                      ("Vanilla 2L: induction", v2_scores.induction)]:
    display(score_heatmap(scores, title, zmin=0, zmax=1))

# %% [markdown]
# **Where does "the previous token" live?** A linear probe decodes `tokens[t-1]` from an activation
# at `t` (held-out sequences; `shuffled` is the same probe trained on shuffled labels). In the
# vanilla model it appears only after layer 0 (`blocks.0.hook_resid_post`), written by the
# previous-token head; in the KV-shift model it is in layer 0's shifted keys
# (`attn.hook_k_shifted`) by construction, with no earlier layer involved.

# %%
from probes.linear import previous_token_probe

probe_tokens = task.sample(16 if FAST else 64, torch.Generator().manual_seed(1)).tokens
pd.DataFrame([{"model": m, "site": r.label, "test accuracy": r.test_accuracy,
               "shuffled labels": r.shuffled_accuracy}
              for m, model in (("kvshift_1L", kv), ("vanilla_2L", v2))
              for r in previous_token_probe(model, probe_tokens, start=2,
                                            steps=20 if FAST else 200).values()]).round(3)

# %% [markdown]
# ## Ablations: which parts are necessary
#
# Each ablation is a hook (no weight is edited): `remove k-shift` sets a head's key coefficients to
# the identity (`K' = K`: the head keeps everything but its look-back), `remove v-shift` the same
# for values (for the paper's free coefficients this also resets their scale), `mean` replaces a
# head's output by its average over the batch. Measured as the drop in induction accuracy on the
# training task, one head at a time and for every head of a layer at once: heads that learned the
# same job stand in for each other, so one head alone may show nothing.

# %%
from kvshift_lens.viz import ablation_bars
from probes.ablation import (
    ablate_each_head,
    ablate_each_shift,
    ablation_effect,
    head_means,
    mean_ablate_head,
    remove_key_shift,
    remove_value_shift,
)

n = 32 if FAST else 256
heads = range(kv.cfg.n_heads)
each = [ablate_each_shift(kv, task, "k", batch_size=n), ablate_each_shift(kv, task, "v", batch_size=n)]
together = {"remove k-shift, every head": [remove_key_shift(kv, 0, h) for h in heads],
            "remove v-shift, every head": [remove_value_shift(kv, 0, h) for h in heads]}
together = {name: ablation_effect(kv, task, ablations, n) for name, ablations in together.items()}
e = together["remove k-shift, every head"]
print(f"removing the key shift of every head: induction accuracy {e.accuracy_before:.3f} -> "
      f"{e.accuracy_after:.3f}, loss {e.loss_before:.3f} -> {e.loss_after:.3f}")
ablation_bars({**{name: e.accuracy_drop for name, e in together.items()},
               **{f"{t.kind} L{l}H{h}": d for t in each for l, h, d in t.ranked()}},
              title="KV-shift 1L: accuracy lost per ablation", y_title="accuracy drop")

# %%
means = head_means(v2, task.sample(n, torch.Generator().manual_seed(0)).tokens)
layers = {f"mean layer {layer}, every head": ablation_effect(
    v2, task, [mean_ablate_head(v2, layer, h, means=means) for h in heads], n) for layer in (0, 1)}
ablation_bars({**{name: e.accuracy_drop for name, e in layers.items()},
               **{f"mean L{l}H{h}": d for l, h, d in ablate_each_head(v2, task, "mean", n).ranked()}},
              title="Vanilla 2L: accuracy lost per mean ablation", y_title="accuracy drop")

# %% [markdown]
# ## Activation patching on the shift hooks
#
# Corrupt the input by replacing the first copy of `r` with other tokens (`BOS r' r`): induction
# on the second copy then has nothing to find. Then patch ("noise") an activation from the
# corrupted run into the clean run and measure the mean log-probability of the second copy's
# tokens. The bars show the share of the full damage that one patch does (1: this activation
# carries everything induction needs from the first copy).
#
# For the KV-shift model we patch layer 0's shifted keys and shifted values (`hook_k_shifted`,
# `hook_v_shifted`: what attention consumes, after the shift). For the vanilla model we patch the
# heads' outputs (`hook_z`) of each layer. Every patch covers all heads and positions of its hook
# (`index="all"`). `index="head"` or `"pos"` patch one head or one position at a time. Patching
# *raw* keys or values at one position j would change the shifted ones at j and j+1: see
# `probes.patching`.

# %%
from probes.patching import patch_by_name
from probes.scores import token_losses

clean = tokens
corrupted = clean.clone()
corrupted[:, 1:RUN + 1] = repeats.sample(16, torch.Generator().manual_seed(1)).tokens[:, 1:RUN + 1]


def metric(logits):  # mean log-probability of the second copy's predictable tokens
    return -token_losses(logits, clean)[:, RUN + 1:].mean()


# Noising: activations come from the corrupted run ("clean_tokens" = the source) into the clean run.
kv_patch = patch_by_name(kv, clean_tokens=corrupted, corrupted_tokens=clean, metric=metric,
                         hook_names=["blocks.0.attn.hook_k_shifted", "blocks.0.attn.hook_v_shifted"])
v2_patch = patch_by_name(v2, clean_tokens=corrupted, corrupted_tokens=clean, metric=metric,
                         hook_names=["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"])
print(f"log-prob of the repeats (KV-shift): clean run {kv_patch.corrupted_value:.3f}, "
      f"corrupted run {kv_patch.clean_value:.3f}")
results = {"KV-shift": kv_patch, "vanilla": v2_patch}
ablation_bars({f"{label}: {name}": float(r.normalized(name))
               for label, r in results.items() for name in r.values},
              title="Share of the damage done by one corrupted activation (every head of a layer)",
              y_title="normalized damage", sort=False)

# %% [markdown]
# ## The story
#
# Full mode, seed 0, on a CPU. Your numbers may differ in detail.
#
# - **Vanilla, two layers.** Layer 0 holds previous-token heads: their patterns sit on the
#   sub-diagonal. A linear probe decodes `tokens[t-1]` from the residual stream only after layer 0
#   (about 0.66 test accuracy, against 0.02 before it). Layer 1 holds the induction heads ("via
#   composition"). Mean-ablating all of layer 0 removes induction almost as completely as
#   ablating layer 1 (accuracy drops of 0.96 and 0.99). Patching in layer 0's corrupted outputs
#   does about 90% of the damage, although layer 0 carries no token that is copied.
# - **KV-shift, one layer.** Every head moved its keys onto the previous token (`α2 ≫ α1`) and
#   kept its values on the current one (`β1 ≫ β2`). The taxonomy calls each of them
#   `induction_via_shift`. The previous token is decodable from layer 0's own `hook_k_shifted`
#   (1.00), with no earlier layer. Removing the key shift of every head, all else as trained, takes
#   accuracy from 1.00 to 0.00. The heads are redundant, so removing it from one head changes
#   nothing. Removing the value shift changes nothing either: the values already read their own
#   token. Corrupted shifted keys ("where to look") and corrupted shifted values ("what to copy")
#   each do about all of the damage.
#
# The key shift does the previous-token head's job inside the induction head's own layer.
