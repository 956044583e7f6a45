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
# # 5. Circuits in a real text model
#
# Notebook 3 found induction circuits in models trained on a synthetic induction task. Here we
# look at two models of the zoo, trained on real text (the Python standard library), that ship
# their weights, so nothing is trained:
#
# - `kvshift-attn-1l`: one attention-only layer with the KV shift. Its card says head L0H3 became
#   an induction head through its key shift.
# - `vanilla-attn-2l`: two attention-only layers without the shift, the same data and budget. Its
#   card says no induction head formed (the two-layer circuit had not appeared after 2.05M tokens).
#
# We do not assume either story: we measure, on repeated random tokens `BOS r r`, the attention
# patterns, the head scores, attribution patching against exact activation patching, and an
# edge-level circuit found by EAP-IG with its faithfulness. The edge graph knows the shift: a
# shifted head's keys read the residual stream at the previous position through a separate
# `k_shift` port, so "L0H3's keys describe the previous token" is the edge
# `L0H3 <- embed via k_shift`.
#
# `KVSHIFT_FAST=1` (CI) uses a small batch and few integration steps: the numbers are noisier but
# the weights are the same, so the pictures already show the circuit.

# %%
import os
from pathlib import Path

from kvshift_lens.viz import setup_notebook

FAST = os.environ.get("KVSHIFT_FAST", "0") == "1"
RUNS = Path("runs") / "notebooks"  # git-ignored; relative to the folder the notebook runs in
# figures that survive HTML export; 1 torch thread, as the times in README.md were measured
print(setup_notebook(threads=1))
print(f"fast mode: {FAST}; tables saved under {RUNS.resolve()}")

# %% [markdown]
# ## The models, by name
#
# `from_pretrained` with a zoo name loads the shipped float16 weights as float32, in eval mode,
# with the shared BPE tokenizer. The cards hold what was measured when the model was built.

# %%
import pandas as pd

from kvshift_lens import HookedKVShiftTransformer, zoo

NAMES = {"KV-shift 1L": "kvshift-attn-1l", "vanilla 2L": "vanilla-attn-2l"}
models = {label: HookedKVShiftTransformer.from_pretrained(name) for label, name in NAMES.items()}
cards = {label: zoo.model_card(name) for label, name in NAMES.items()}
pd.DataFrame([{"model": label, "name": card.name, "layers": card.n_layers, "heads": card.n_heads,
               "KV shift": card.shift, "params": card.n_params, "val loss": card.val_loss,
               "roles (card)": {h: k for h, k in card.roles.items() if k != "other"} or "none"}
              for label, card in cards.items()])

# %% [markdown]
# ## Clean and corrupted inputs
#
# Clean: `BOS r r`, with `r` a run of distinct random tokens (ids 1..2047, never BOS). Corrupted:
# the same, with the first copy replaced by other random tokens (`BOS r' r`), so the second copy
# has nothing earlier to copy from; the two have the same shape, as patching needs. The metric is
# the mean log-probability of the second copy's predictable tokens (positions whose next token
# the first copy gives away), a differentiable scalar as attribution patching needs.

# %%
import torch

from probes import logprob_metric, repeated_random_tokens

BATCH, RUN = (8, 16) if FAST else (32, 50)
D_VOCAB = models["KV-shift 1L"].cfg.d_vocab
clean = repeated_random_tokens(BATCH, RUN, D_VOCAB, first_token=1, prefix_token=0,
                               generator=torch.Generator().manual_seed(0))  # [batch, 1 + 2 * RUN]
other = repeated_random_tokens(BATCH, RUN, D_VOCAB, first_token=1, n_repeats=1,
                               generator=torch.Generator().manual_seed(1))  # [batch, RUN]
corrupted = clean.clone()
corrupted[:, 1:RUN + 1] = other
mask = torch.zeros_like(clean, dtype=torch.bool)
mask[:, RUN + 1:2 * RUN] = True  # position t predicts token t + 1 of the second copy
metric = logprob_metric(clean, mask)

rows = []
for label, model in models.items():
    with torch.no_grad():
        logp_clean, logp_corrupted = float(metric(model(clean))), float(metric(model(corrupted)))
    rows.append({"model": label, "log-prob, clean": logp_clean,
                 "log-prob, corrupted": logp_corrupted, "gap": logp_clean - logp_corrupted})
gaps = pd.DataFrame(rows).set_index("model")
print(f"{BATCH} sequences of BOS + 2 x {RUN} tokens; log-prob of the repeats on the second copy:")
gaps.round(3)

# %% [markdown]
# The gap is what a circuit must explain. The KV-shift model predicts the second copy far better
# when the first copy is there. The vanilla model barely does (under a tenth of a nat): it has
# almost no in-context copying to find a circuit for, so its patching numbers below measure noise
# around a tiny effect, and its faithfulness fractions divide by that tiny gap.

# %% [markdown]
# ## Attention patterns, plain and effective
#
# Left: attention over positions. Right: over *source tokens* once the value shift is applied
# (`A_eff[i, j] = β1·A[i, j] + β2·A[i, j+1]`; the same as the left for a vanilla head). An
# induction head draws a stripe `RUN - 1` positions left of the diagonal on the second copy:
# it attends to the position just after the earlier copy of the current token. Click a
# thumbnail to enlarge a head.

# %%
from kvshift_lens.viz import plain_and_effective
from kvshift_lens.viz.patterns import token_strings

kv, v2 = models["KV-shift 1L"], models["vanilla 2L"]
strs = token_strings(clean[0], kv)
plain_and_effective(kv, clean[0], layer=0, token_strs=strs)

# %%
plain_and_effective(v2, clean[0], layer=0, token_strs=strs) + \
    plain_and_effective(v2, clean[0], layer=1, token_strs=strs)

# %% [markdown]
# ## Head scores and roles
#
# `classify_heads` scores each head on the clean batch: `induction` on the effective pattern (what
# is read), `prefix_matching` on the plain pattern (what TransformerLens' `detect_head` sees),
# `previous_token`, and `key_past_weight`, the share of a head's key taken from the previous
# position (`> 0.5`: the head's keys describe the token before).

# %%
from probes import classify_heads

taxonomy = {label: classify_heads(model, clean) for label, model in models.items()}
columns = ["model", "layer", "head", "kind", "induction", "prefix_matching", "previous_token",
           "duplicate_token", "key_past_weight"]
heads_table = pd.DataFrame([{"model": m, **r} for m, t in taxonomy.items() for r in t.records()])
heads_table[columns].round(3)

# %%
from IPython.display import display

from kvshift_lens.viz import score_heatmap

for label, t in taxonomy.items():
    display(score_heatmap(t.scores.induction, f"{label}: induction score (effective pattern)",
                          zmin=0, zmax=1))
display(score_heatmap(taxonomy["vanilla 2L"].scores.previous_token,
                      "vanilla 2L: previous-token score", zmin=0, zmax=1))
for label, t in taxonomy.items():
    roles = [f"L{h.layer}H{h.head} {h.kind.value}" for h in t.heads if h.kind.value != "other"]
    print(f"{label}: heads with a role: {roles or 'none'}")

# %% [markdown]
# ## Attribution patching against activation patching, per head
#
# Noising: corrupt one head's output (`hook_z`, every position) in the clean run and measure how
# much the metric falls. **Exact** patching runs the model once per head; **attribution**
# patching estimates all heads from one clean forward + backward and one corrupted forward
# (gradient x activation difference). For the KV-shift model we also attribute its shifted keys
# and values per head (`hook_k_shifted`, `hook_v_shifted`: what attention consumes).
#
# Agreement: Spearman rank correlation over the cells, and the top-k overlap (the share of the
# k cells with the largest exact effect that attribution also ranks in its top k).

# %%
from probes import agreement, attribution_patch, exact_patching_effects

HOOKS = {"KV-shift 1L": ["blocks.0.attn.hook_z", "blocks.0.attn.hook_k_shifted",
                         "blocks.0.attn.hook_v_shifted"],
         "vanilla 2L": ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"]}
head_rows, agreements, attributions = [], [], {}
for label, model in models.items():
    hooks = HOOKS[label]
    est = attribution_patch(model, clean, corrupted, metric, hooks)
    exact = exact_patching_effects(model, clean, corrupted, metric, hooks, index="head")
    attributions[label] = est
    for name in hooks:
        layer, site = int(name.split(".")[1]), name.rsplit(".", 1)[1]
        for h, (a, x) in enumerate(zip(est.reduce(name, "head").tolist(), exact[name].tolist())):
            head_rows.append({"model": label, "hook": site, "head": f"L{layer}H{h}",
                              "attribution": a, "exact": x})
    cells = [r for r in head_rows if r["model"] == label]
    ag = agreement(torch.tensor([r["attribution"] for r in cells]),
                   torch.tensor([r["exact"] for r in cells]), top_k=3)
    agreements.append({"model": label, "cells": f"{ag.n} (head x hook)", "spearman": ag.spearman,
                       "pearson": ag.pearson, "top-3 overlap": ag.top_k_overlap,
                       "max |error|": ag.max_abs_error, "max |exact|": ag.exact_scale})
head_patching = pd.DataFrame(head_rows)
head_patching.round(4)

# %%
import plotly.graph_objects as go

fig = go.Figure()
for label in models:
    part = head_patching[head_patching.model == label]
    fig.add_trace(go.Scatter(x=part.exact, y=part.attribution, mode="markers+text", name=label,
                             text=part["head"] + " " + part["hook"].str.replace("hook_", ""),
                             textposition="top center"))
lo = float(min(head_patching.exact.min(), head_patching.attribution.min()))
fig.add_trace(go.Scatter(x=[lo, 0], y=[lo, 0], mode="lines", name="y = x",
                         line={"dash": "dot", "color": "#888"}))
fig.update_layout(title="Attribution patching vs exact activation patching (noising, per head)",
                  xaxis_title="exact change of the metric", yaxis_title="attribution estimate",
                  template="plotly_white")
fig

# %% [markdown]
# Per position and head (`hook_z`): the same comparison over many more cells, where a head's
# effect is spread over the positions of the second copy.

# %%
for label, model in models.items():
    hooks = [f"blocks.{layer}.attn.hook_z" for layer in range(model.cfg.n_layers)]
    exact = exact_patching_effects(model, clean, corrupted, metric, hooks, index="pos_head")
    est = torch.cat([attributions[label].reduce(n, "pos_head").flatten() for n in hooks])
    ag = agreement(est, torch.cat([exact[n].flatten() for n in hooks]), top_k=10)
    agreements.append({"model": label, "cells": f"{ag.n} (pos x head)", "spearman": ag.spearman,
                       "pearson": ag.pearson, "top-10 overlap": ag.top_k_overlap,
                       "max |error|": ag.max_abs_error, "max |exact|": ag.exact_scale})
agreement_table = pd.DataFrame(agreements)
print("agreement of attribution with activation patching:")
agreement_table.round(3)

# %% [markdown]
# ## Edges: EAP, EAP-IG and exact edge patching
#
# The component graph has one node per head (its output), `embed` and `logits`; a head receives
# through ports `q`, `k`, `v`, and, where the KV shift is on, `k_shift` and `v_shift` (the path
# through the previous position's key or value). The KV-shift model's graph has 25 edges, the
# vanilla one's 81 (layer-1 heads also read layer-0 heads).
#
# An edge's score estimates `M(clean, that edge corrupted) - M(clean)`. EAP uses the gradient at
# the clean run; EAP-IG averages it over inputs interpolated from corrupted to clean embeddings,
# which helps where attention saturates. Both are compared here with **exact edge patching** (one
# forward pass per edge, affordable at this size).

# %%
from probes import CircuitRunner, edge_attribution

IG_STEPS = 2 if FAST else 10
edge_scores, runners, edge_tables, edge_rows = {}, {}, {}, []
for label, model in models.items():
    eap = edge_attribution(model, clean, corrupted, metric, method="eap")
    eap_ig = edge_attribution(model, clean, corrupted, metric, method="eap-ig", ig_steps=IG_STEPS)
    runner = CircuitRunner(model, clean, corrupted, metric, eap_ig.graph)
    exact = runner.edge_effects()
    edge_scores[label], runners[label] = eap_ig, runner
    k = 3 if label == "KV-shift 1L" else 5
    for method, scores in (("EAP", eap.scores), (f"EAP-IG ({IG_STEPS} steps)", eap_ig.scores)):
        ag = agreement(scores, exact, top_k=k)
        edge_rows.append({"model": label, "method": method, "edges": ag.n,
                          "spearman": ag.spearman, "top-k overlap": ag.top_k_overlap, "k": k,
                          "max |error|": ag.max_abs_error, "max |exact|": ag.exact_scale})
    table = eap_ig.to_pandas().assign(eap=eap.scores.tolist(), exact=exact.tolist())
    (RUNS / "05_zoo_circuits").mkdir(parents=True, exist_ok=True)
    table.to_csv(RUNS / "05_zoo_circuits" / f"edges_{NAMES[label]}.csv", index=False)
    edge_tables[label] = table
print("edge attribution vs exact edge patching:")
pd.DataFrame(edge_rows).round(3)

# %%
for label, table in edge_tables.items():
    top = table.reindex(table.score.abs().sort_values(ascending=False).index).head(8)
    print(f"{label}: the 8 edges with the largest |EAP-IG score|")
    display(top[["label", "is_shift", "score", "eap", "exact"]].round(4).reset_index(drop=True))

# %% [markdown]
# ## Circuits and their faithfulness
#
# A circuit keeps its edges clean and corrupts every other edge. Faithfulness
# `(M(circuit) - M(corrupted)) / (M(clean) - M(corrupted))` is 1 for the full graph and 0 for the
# empty one. An edge-level circuit needs a *path*: a head whose input edges are all corrupted
# computes on the corrupted input, so "logits <- L0H3" alone keeps nothing.

# %%
SIZES = [1, 2, 3, 4, 5, 8, 12, 20]
faith_rows = []
for label, scores in edge_scores.items():
    for k in SIZES + [scores.graph.n_edges]:
        f = runners[label].faithfulness(scores.circuit(top_k=k))
        faith_rows.append({"model": label, "edges kept": k, "of": f.n_total,
                           "faithfulness": f.fraction, "metric": f.circuit_value})
faith = pd.DataFrame(faith_rows)
fig = go.Figure([go.Scatter(x=part["edges kept"], y=part.faithfulness, mode="lines+markers",
                            name=label) for label, part in faith.groupby("model")])
fig.update_layout(title="Faithfulness of the top-k EAP-IG edges", xaxis_title="edges kept (top k)",
                  yaxis_title="faithfulness", xaxis_type="log", template="plotly_white")
display(fig)
faith.pivot(index="edges kept", columns="model", values="faithfulness").round(3)

# %% [markdown]
# ## The circuit graphs
#
# The smallest top-k circuit of the KV-shift model that keeps at least 90% of the gap, and the
# top-5 edges of the vanilla model (it has no small faithful circuit to show; see above: its
# largest edges go straight to the logits and form no path from `embed`). Shift
# edges are dashed and labelled with their port; colour and width give the EAP-IG score (negative:
# corrupting the edge lowers the log-prob of the repeats, i.e. the edge helps).

# %%
from kvshift_lens.viz.circuit import circuit_figure

kv_faith = faith[(faith.model == "KV-shift 1L") & (faith.faithfulness >= 0.9)]
k_kv = int(kv_faith["edges kept"].min()) if len(kv_faith) else 5
circuits = {"KV-shift 1L": edge_scores["KV-shift 1L"].circuit(top_k=k_kv),
            "vanilla 2L": edge_scores["vanilla 2L"].circuit(top_k=5)}
for label, circuit in circuits.items():
    f = runners[label].faithfulness(circuit).fraction
    display(circuit_figure(**circuit.plot_data(),
                           title=f"{label}: top {len(circuit)} EAP-IG edges (faithfulness {f:.2f})"))
    print(f"{label}: circuit edges: {circuit.labels}")
shift_edge = "L0H3 <- embed via k_shift"
print(f"KV-shift 1L: is '{shift_edge}' in the top-{k_kv} circuit? {shift_edge in circuits['KV-shift 1L']}; "
      f"its rank by |EAP-IG score|: "
      f"{[e.label for e, _ in edge_scores['KV-shift 1L'].ranked()].index(shift_edge) + 1}")

# %% [markdown]
# **Each edge of the KV-shift circuit is needed.** Remove one edge at a time from the circuit
# above (the rest of the circuit kept) and measure faithfulness again.

# %%
kv_circuit = circuits["KV-shift 1L"]
pd.DataFrame([{"removed edge": e, "faithfulness without it":
               runners["KV-shift 1L"].faithfulness(kv_circuit.without(e)).fraction}
              for e in kv_circuit.labels]).round(3)

# %% [markdown]
# ## What the numbers show
#
# Measured in full mode (32 sequences, runs of 50 tokens, EAP-IG with 10 steps) on a CPU; fast mode
# uses fewer, shorter sequences, so its numbers differ in detail.
#
# - **KV-shift 1L has one induction circuit, and it goes through the key shift.** L0H3 is the only
#   head with a role (`induction_via_shift`: induction score 0.59, prefix matching 0.62, 99% of
#   its key from the previous position). Corrupting the first copy costs 2.67 nats of log-prob on
#   the second copy; corrupting L0H3's output alone costs 2.66, any other head's output at most 0.02.
#   The top three EAP-IG edges are `logits <- L0H3`, `L0H3 <- embed via k_shift` (its keys read
#   the previous token: where to look) and `L0H3 <- embed via v` (its values read the current
#   token: what to copy). Those three keep 0.99 of the gap; the top two keep 0.13 and the top one
#   nothing. Without the shift edge the three-edge circuit keeps 0.04, without the value edge
#   0.13. The shift edge ranks second of 25.
# - **Attribution patching ranks heads well and underestimates the induction head.** Per head
#   and hook, Spearman 0.90 with the top 3 identical; per position and head, Spearman 0.89 (404
#   cells). Attribution gives L0H3's output 1.87 of the exact 2.66: the log-prob bends between
#   the clean and corrupted runs (attention is a softmax), and a gradient taken at the clean run
#   sees only the start of it. On edges this matters more. Plain EAP scores the value edge
#   `L0H3 <- embed via v` at +0.01 where exact edge patching gives -2.31, and the shift edge at
#   -0.59 against -2.56 (Spearman 0.54 over 25 edges). EAP-IG gives -0.81 and -1.84 (Spearman
#   0.78, top 3 identical to the exact ones).
# - **Vanilla 2L has no induction circuit to find.** No head has a role (every induction and
#   previous-token score is at most 0.05), and the clean-corrupted gap is 0.07 nats. Per-head
#   effects are of that size, with both signs (Spearman 0.74 between attribution and exact
#   patching). The largest edges are heads writing straight to the logits, so the top-5 circuit
#   has no path from `embed`, every head in it computes on corrupted input, and its faithfulness
#   is 0. Larger circuits swing from 1.16 (8 edges) to -0.47 (12): fractions of a gap this small
#   say nothing. This is the card's "before the phase change" model. At the same budget, one
#   KV-shift layer has a clean three-edge induction circuit and two vanilla layers have none.
#
# The tables above hold the exact numbers of the run you are looking at.
