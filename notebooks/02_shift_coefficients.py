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
# # 2. Shift coefficients: where the heads go, and why
#
# Every KV-shift head has four learned scalars: `α1, α2` for its keys (`K'_t = α1·K_t + α2·K_{t-1}`)
# and `β1, β2` for its values. Vanilla attention is `α1 = β1 = 1, α2 = β2 = 0`. The paper's
# one-layer induction head is `α1 = 0, α2 = 1` (the key at position t describes token t-1, so a
# query for `A` finds the position right *after* an earlier `A`) with `β1 = 1, β2 = 0` (the value
# read there is that position's own token, the `B` to copy).
#
# This notebook trains one 1-layer KV-shift model on induction and shows its coefficients: at the
# end (heatmaps), over training (trajectories), as points in the (α1, β1) plane, and on the loss
# landscape of the paper's Fig. 2 with its gradient field.

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
# ## Train (or reuse) a 1-layer KV-shift model
#
# The demo's model and task, with the paper's "0 to 1" variant of the coefficients
# (`shift_param="convex"`: `α1 + α2 = 1` and `β1 + β2 = 1`, each in [0, 1]), so every head lives on
# the plane of the loss landscape below. With the default free coefficients (notebooks 1 and 3)
# the heads end at the same place up to scale: `α2` and `β1` grow to about 5 there, off the plane.
# The coefficients are logged at every evaluation (`metrics.jsonl`).

# %%
from kvshift_lens.demo import MODEL, TASK
from kvshift_lens.train import RunSpec, TrainConfig, train

spec = RunSpec(
    model={**MODEL, "n_layers": 1, "shift_k": True, "shift_v": True, "shift_init": "uniform",
           "shift_param": "convex"},
    task=TASK,
    train=TrainConfig(steps=30 if FAST else 600, batch_size=8 if FAST else 64,
                      eval_every=5 if FAST else 25, eval_batches=1 if FAST else 4,
                      progress=not FAST),
)
run_dir = RUNS / ("coefficients_fast" if FAST else "coefficients")
if not (run_dir / "final").is_dir():
    train(spec, run_dir, overwrite=True)

# %%
from kvshift_lens.report import load_run, summarize_run

run = load_run(run_dir)  # run.json, metrics.jsonl and the final model (on CPU)
summary = summarize_run(run)
print(summary.to_text())

# %% [markdown]
# ## The final coefficients
#
# One panel per coefficient, layer × head. Look for the head whose `α2` (key, previous token) is
# large and `α1` small while `β1` stays large: that is the induction head.

# %%
from kvshift_lens.viz import coefficient_heatmaps

coefficient_heatmaps(run.model.shift_coefficients(), title="Shift coefficients after training")

# %% [markdown]
# ## Over training
#
# Each head's coefficients at every evaluation. With the `uniform` initialisation every head starts
# at 0.5 / 0.5; around the induction phase change the keys swing towards the previous token
# (`α2` up, `α1` down) while the values stay on the current one.

# %%
from kvshift_lens.viz import coefficient_plane, coefficient_trajectories

coefficient_trajectories(run.records)

# %% [markdown]
# The same, as paths in the (α1, β1) plane: the star is the paper's induction point (0, 1), the
# square vanilla attention (1, 1). With convex coefficients a point fixes the whole shift
# (`α2 = 1 - α1`, `β2 = 1 - β1`); with free ones it would not.

# %%
coefficient_plane(run.records)

# %% [markdown]
# ## The loss landscape (the paper's Fig. 2), from this model
#
# Put the heads at `(α1, α2) = (a, 1 - a)` and `(β1, β2) = (b, 1 - b)` through the coefficient
# hooks (no weight is edited). Every other parameter stays as trained. Then measure the induction
# loss over a grid of (a, b). Arrows point down the gradient, where training would push the
# heads. The lines are the heads' own paths during training, the large markers their learned
# (α1, β1). All heads of the layer move together (`heads=None`). The heads learned the same job,
# so moving one alone (`heads=2`) barely changes the loss: the others still do it.

# %%
from kvshift_lens.train.tasks import build_task
from kvshift_lens.viz import landscape_figure, loss_landscape
from kvshift_lens.viz.figures import eval_coefficients
from kvshift_lens.viz.landscape import current_share

land = loss_landscape(run.model, build_task(TASK), layer=0, heads=None, grid=7 if FAST else 21,
                      n_sequences=8 if FAST else 32)
steps, logged = eval_coefficients(run.evals)  # logged[which]: [eval, layer, head, lag]
# the landscape is in mix coordinates (each head's share of the current position, at its own gain)
paths = {f"L0H{h}": (current_share(logged["k"][:, 0, h]), current_share(logged["v"][:, 0, h]))
         for h in land.heads}
a1, b1 = land.argmin()
print(f"lowest loss on the grid at (key share, value share) = ({a1:.2f}, {b1:.2f}); "
      f"trained model: {land.model_loss:.3f}")
landscape_figure(land, paths=paths)

# %% [markdown]
# In full mode (seed 0, CPU) the heads reach 90% accuracy at step 225 and end at the induction
# point itself. The landscape has a low valley at small `α1` and large `β1`, and its lowest grid
# point is (0, 1). Vanilla attention at (1, 1) sits on a plateau about 10 nats higher. Moving the
# keys onto the previous token is what makes one layer enough. Notebook 3 checks that causally: it
# removes the shift and watches induction accuracy collapse.
