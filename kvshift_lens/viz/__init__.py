"""Pictures of KV-shift models: plotly figures, circuitsvis views, the loss landscape and static
image export. Nothing here reads run folders or trains: the run report
(:mod:`kvshift_lens.report`) composes these pictures.

- :mod:`~kvshift_lens.viz.figures`: functions from plain data (coefficients, metrics records,
  scores) to ``plotly`` figures; no I/O.
- :mod:`~kvshift_lens.viz.landscape`: the loss over the (alpha1, beta1) plane and its gradient
  (PAPER.md item 5), through the coefficient hooks.
- :mod:`~kvshift_lens.viz.patterns`: circuitsvis attention patterns (plain and effective) and
  tokens coloured by loss, as offline HTML.
- :mod:`~kvshift_lens.viz.export`: PNG/SVG files of plotly figures (kaleido + Chromium).
- :mod:`~kvshift_lens.viz.notebook`: :func:`setup_notebook`, for figures that survive
  ``nbconvert --to html`` and static viewers, and an explicit torch thread count.

Importing this package imports plotly but neither circuitsvis' bundle nor kaleido.
"""

from kvshift_lens.viz.export import export_static
from kvshift_lens.viz.figures import (
    ablation_bars,
    coefficient_heatmaps,
    coefficient_plane,
    coefficient_trajectories,
    landscape_figure,
    loss_curves,
    phase_change_step,
    score_heatmap,
    steps_to_accuracy,
)
from kvshift_lens.viz.landscape import Landscape, loss_landscape
from kvshift_lens.viz.notebook import setup_notebook
from kvshift_lens.viz.patterns import (
    attention_heads,
    attention_patterns,
    colored_tokens,
    loss_tokens,
    plain_and_effective,
)

__all__ = [
    "Landscape",
    "ablation_bars",
    "attention_heads",
    "attention_patterns",
    "coefficient_heatmaps",
    "coefficient_plane",
    "coefficient_trajectories",
    "colored_tokens",
    "export_static",
    "landscape_figure",
    "loss_curves",
    "loss_landscape",
    "loss_tokens",
    "phase_change_step",
    "plain_and_effective",
    "score_heatmap",
    "setup_notebook",
    "steps_to_accuracy",
]
