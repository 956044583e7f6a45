"""One self-contained HTML report of a training run (``kvshift report RUN_DIR``): application code
beside the command line, composing the run folder, the model, probes and the figures of
:mod:`kvshift_lens.viz`.

The report reads the run folder (run.json, metrics.jsonl, the final/ model or the latest
checkpoint) and shows:

- a text summary: steps to the target accuracy (90% unless the run set another), the induction
  phase change (:func:`~kvshift_lens.viz.figures.phase_change_step`), final accuracy and loss, and
  the learned coefficients of every head, read as a gain times a mix over lags
  (:func:`kvshift_lens.shift.gain_and_mix`; raw values beside them) with each head's measured
  induction score (:func:`probes.classify_heads` on repeated random tokens of the run's task);
- training loss and evaluation accuracy with the phase change marked;
- the final model's coefficients (heatmaps of gain and mix), their trajectories, the heads in the
  plane of the keys' and values' share of the current position;
- for a one-layer model with shifted keys and values (window 1), the loss landscape of PAPER.md
  item 5 for each head of the layer (all heads moved together when there are more than
  :data:`MAX_LANDSCAPE_HEADS`) in mix coordinates at the head's own gains, with the gradient
  directions, the head's path during training and its final position;
- circuitsvis views of a repeated random sequence: the layer's attention patterns plain and
  effective side by side, and the tokens coloured by the model's loss.

Everything is inlined (plotly.js once, the circuitsvis bundle once, the figures' data): the page
makes no network request. With ``static=True`` each plotly figure is also written as PNG and SVG
beside the report (``<report stem>_figures/``) through kaleido, which needs a Chrome or Chromium
binary (found on PATH, or named by ``BROWSER_PATH``); when that is not possible the report says why
and nothing fails.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import torch

import kvshift_lens
from kvshift_lens._files import atomic_write_text
from kvshift_lens.data.tasks import InductionTask, RepeatedTokensTask
from kvshift_lens.model import HookedKVShiftTransformer
from kvshift_lens.run_folder import METRICS_FILE, REPORT_FILE, RUN_FILE, model_folder, read_metrics
from kvshift_lens.train.tasks import build_task
from kvshift_lens.viz import figures as F
from kvshift_lens.viz import patterns as P
from kvshift_lens.viz.export import StaticExport, export_static
from kvshift_lens.viz.landscape import current_share, loss_landscape
from probes import INDUCTION_THRESHOLD, classify_heads

logger = logging.getLogger(__name__)

DEFAULT_TARGET = 0.9
MAX_LANDSCAPE_HEADS = 4
"""Up to this many key/value heads the report maps one landscape per head; beyond it, one with
every head of the layer moved together."""


class ReportError(ValueError):
    """The folder is not a run folder the report can read."""


# ---------------------------------------------------------------------------------------------
# Reading a run
# ---------------------------------------------------------------------------------------------


@dataclass
class RunData:
    """What the report reads from a run folder."""

    run_dir: Path
    spec: dict[str, Any]
    records: list[dict[str, Any]]
    model: Any = None
    model_dir: Path | None = None

    @property
    def evals(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("kind") == "eval"]

    @property
    def target_accuracy(self) -> float:
        return float(self.spec.get("train", {}).get("target_accuracy", DEFAULT_TARGET))


def load_run(run_dir: str | Path, load_model: bool = True) -> RunData:
    """Read a run folder: run.json, metrics.jsonl and (with ``load_model``) the final model, or
    the latest checkpoint when training has not finished.

    Raises:
        ReportError: the folder is missing, or has neither run.json nor metrics.jsonl.
    """
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise ReportError(f"run folder {run_dir} does not exist")
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a folder (expected a run folder)")
    if not (run_dir / METRICS_FILE).is_file():
        raise ReportError(f"{run_dir} has no {METRICS_FILE}: not a run folder written by "
                          "`kvshift train`")
    spec: dict[str, Any] = {}
    if (run_dir / RUN_FILE).is_file():
        try:
            spec = json.loads((run_dir / RUN_FILE).read_text())
        except json.JSONDecodeError as e:
            raise ReportError(f"{run_dir / RUN_FILE} is not valid JSON ({e})") from None
        if not isinstance(spec, dict):
            raise ReportError(f"{run_dir / RUN_FILE} must hold a JSON object")
    records = read_metrics(run_dir / METRICS_FILE)
    if not any(r.get("kind") in ("train", "eval") for r in records):
        raise ReportError(f"{run_dir / METRICS_FILE} has no training or evaluation records yet")
    run = RunData(run_dir=run_dir, spec=spec, records=records)
    if load_model:
        model_dir = model_folder(run_dir)
        if model_dir is not None:
            run.model = HookedKVShiftTransformer.from_pretrained(model_dir, device="cpu").eval()
            run.model_dir = Path(model_dir)
    return run


# ---------------------------------------------------------------------------------------------
# The text summary
# ---------------------------------------------------------------------------------------------


@dataclass
class RunSummary:
    """The numbers the report (and ``kvshift report``) states about a run."""

    name: str
    description: str
    steps: int
    target_accuracy: float
    steps_to_target: float | None
    phase_change: float | None
    final_accuracy: float | None
    final_loss: float | None
    coefficients: dict[str, list] = field(default_factory=dict)
    """``{which: [layer][head][lag]}``: the final model's (or the last evaluation's), raw."""
    head_kinds: dict[str, str] = field(default_factory=dict)
    """``{"L0H1": "induction_via_shift", ...}``: the probes' class of every head (needs the
    model)."""
    induction_scores: dict[str, float] = field(default_factory=dict)
    """``{"L0H1": 0.95, ...}``: each head's measured induction score (the attention, on value
    sources, that the second copy of a repeated random sequence pays to the token after the
    current token's first copy; :func:`probes.head_scores`), in [0, 1]."""
    induction_threshold: float = 0.4
    """The score from which the probes call a head an induction head."""

    def head_rows(self) -> list[tuple[str, dict[str, float]]]:
        """``[("L0H1", {"α1": ..., "α2": ..., "β1": ..., ...}), ...]``."""
        if not self.coefficients:
            return []
        first = next(iter(self.coefficients.values()))
        rows = []
        for layer, heads in enumerate(first):
            for head in range(len(heads)):
                values = {}
                for which, c in self.coefficients.items():
                    for lag, v in enumerate(c[layer][head]):
                        values[F.coefficient_label(which, lag)] = float(v)
                rows.append((F.head_label(layer, head), values))
        return rows

    def mix_rows(self) -> list[tuple[str, dict[str, float]]]:
        """Per head its gain and mix: ``[("L0H1", {"α gain": ..., "α mix, current": ...,
        "α mix, previous": ..., "β gain": ..., ...}), ...]`` (``c = gain * mix``)."""
        if not self.coefficients:
            return []
        arrays = {w: F.gain_mix_arrays(c) for w, c in self.coefficients.items()}
        first = next(iter(arrays.values()))[0]
        rows = []
        for layer in range(first.shape[0]):
            for head in range(first.shape[1]):
                values = {}
                for which, (gain, mix) in arrays.items():
                    values[f"{F.SYMBOLS[which]} gain"] = float(gain[layer, head])
                    for lag in range(mix.shape[-1]):
                        values[F.mix_label(which, lag)] = float(mix[layer, head, lag])
                rows.append((F.head_label(layer, head), values))
        return rows

    def induction_head(self) -> str | None:
        """The head nearest the paper's induction point in mix coordinates (key's share of the
        current position 0, value's 1: keys read the previous token, values the current one)
        among the heads the probes measured as induction heads (score at least
        :attr:`induction_threshold`); None when no head is one or nothing was measured."""
        rows = [(label, v) for label, v in self.mix_rows()
                if "α mix, current" in v and "β mix, current" in v
                and self.induction_scores.get(label, -1.0) >= self.induction_threshold]
        if not rows:
            return None
        ax, by = F.INDUCTION_POINT
        return min(rows, key=lambda r: math.hypot(r[1]["α mix, current"] - ax,
                                                  r[1]["β mix, current"] - by))[0]

    def to_text(self) -> str:
        def fmt(x: float | None, spec: str = ".4f") -> str:
            return "n/a" if x is None else format(x, spec)

        reached = (f"step {self.steps_to_target:g}" if self.steps_to_target is not None
                   else f"not reached in {self.steps} steps")
        lines = [
            f"run: {self.name} ({self.description})",
            f"steps to {self.target_accuracy:.0%} accuracy: {reached}",
            "induction phase change: " + (f"~ step {self.phase_change:g}"
                                          if self.phase_change is not None else "none seen"),
            f"final (step {self.steps}): accuracy {fmt(self.final_accuracy)}, "
            f"loss {fmt(self.final_loss)}",
        ]
        rows = self.head_rows()
        if rows:
            mixes = dict(self.mix_rows())
            symbols = [F.SYMBOLS[w] for w in self.coefficients]
            lines.append("learned shift coefficients, read as gain x mix (gain = sum of |c|, mix "
                         "= c / gain: the share of each lag, current then previous; raw c = "
                         "gain x mix):")
            header = "  head  " + "".join(f"{s + ' gain':>8}  {s + ' mix':<15}" for s in symbols)
            header += f"{'induction':>10}  {'class':<26}  raw"
            lines.append(header)
            best = self.induction_head()
            for label, values in rows:
                mix = mixes[label]
                line = f"  {label:<6}"
                for s in symbols:
                    parts = [v for k, v in mix.items() if k.startswith(f"{s} mix")]
                    shown = "(" + ", ".join(f"{v:.2f}" for v in parts) + ")"
                    line += f"{mix[s + ' gain']:8.3f}  {shown:<15}"
                score = self.induction_scores.get(label)
                line += f"{score:10.3f}" if score is not None else f"{'n/a':>10}"
                line += f"  {self.head_kinds.get(label, ''):<26}  "
                line += " ".join(f"{k} {v:.3f}" for k, v in values.items())
                if label == best:
                    line += "  <- nearest the induction point"
                lines.append(line)
            lines.append(
                "  induction: the head's measured induction score (probes, repeated random tokens;"
                f" an induction head from {self.induction_threshold:g}). The induction point is "
                "keys all on the previous position, values all on the current one: α mix (0, 1),"
                " β mix (1, 0). The marked head is the one nearest it by mix among the heads "
                "measured as induction heads" + (" (none is)." if best is None else "."))
        else:
            lines.append("shift coefficients: none (vanilla attention)")
        return "\n".join(lines)


def describe_model(spec: Mapping[str, Any], model: Any = None) -> str:
    """``"1 layer, d_model 64, 4 heads, shift kv (window 1), attention only"``."""
    m = dict(spec.get("model", {}))
    if model is not None:
        cfg = model.cfg
        m.update(n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads,
                 shift_k=cfg.shift_k, shift_v=cfg.shift_v, shift_q=cfg.shift_q,
                 shift_window=cfg.shift_window, attn_only=cfg.attn_only)
    layers = m.get("n_layers", "?")
    shifted = "".join(w for w in "qkv" if m.get(f"shift_{w}", w in "kv"))
    parts = [f"{layers} layer{'s' if layers != 1 else ''}", f"d_model {m.get('d_model', '?')}"]
    if m.get("n_heads") not in (None, -1):
        parts.append(f"{m['n_heads']} heads")
    parts.append(f"shift {shifted} (window {m.get('shift_window', 1)})" if shifted
                 else "vanilla attention")
    if m.get("attn_only"):
        parts.append("attention only")
    task = spec.get("task", {}).get("name")
    if task:
        parts.append(f"task {task}")
    return ", ".join(parts)


def summarize_run(run: RunData) -> RunSummary:
    """The text summary of a run (see :class:`RunSummary`)."""
    evals = [r for r in run.evals if "eval/accuracy" in r]
    steps = [r["step"] for r in evals]
    acc = [r["eval/accuracy"] for r in evals]
    last_step = max((int(r.get("step", 0)) for r in run.records), default=0)
    coeffs: dict[str, list] = {}
    kinds: dict[str, str] = {}
    scores: dict[str, float] = {}
    if run.model is not None:
        coeffs = {k: v.tolist() for k, v in run.model.shift_coefficients().values.items()}
        for h in classify_run_heads(run):
            label = F.head_label(h.layer, h.head)
            kinds[label] = h.kind.value
            scores[label] = float(h.induction)
    elif run.evals and run.evals[-1].get("coefficients"):
        coeffs = run.evals[-1]["coefficients"]
    return RunSummary(
        name=run.run_dir.name,
        description=describe_model(run.spec, run.model),
        steps=last_step,
        target_accuracy=run.target_accuracy,
        steps_to_target=F.first_step_reaching(steps, acc, run.target_accuracy) if acc else None,
        phase_change=F.phase_change_step(steps, acc) if acc else None,
        final_accuracy=acc[-1] if acc else None,
        final_loss=evals[-1].get("eval/loss") if evals else None,
        coefficients=coeffs,
        head_kinds=kinds,
        induction_scores=scores,
        induction_threshold=INDUCTION_THRESHOLD,
    )


def probe_tokens(run: RunData, batch_size: int = 8, seed: int = 0) -> torch.Tensor:
    """``[batch, pos]`` repeated random tokens for the probes, in the run's own format: a BOS
    first when the task has one, ids from the task's vocabulary, a run as long as fits twice."""
    cfg = run.model.cfg
    task = _synthetic_task(run)
    d_vocab = task.d_vocab if task is not None else cfg.d_vocab
    bos = bool(getattr(task, "bos", False))
    run_length = max(2, min(32, (cfg.n_ctx - bos) // 2, d_vocab - bos))
    seq_task = RepeatedTokensTask(d_vocab=d_vocab, run_length=run_length, n_repeats=2,
                                  distinct=True, bos=bos)
    return seq_task.sample(batch_size, torch.Generator().manual_seed(seed)).tokens


def classify_run_heads(run: RunData):
    """The probes' taxonomy (:func:`probes.classify_heads`) of the run's model on
    :func:`probe_tokens`."""
    return classify_heads(run.model, probe_tokens(run))


# ---------------------------------------------------------------------------------------------
# Figures and views
# ---------------------------------------------------------------------------------------------


@dataclass
class Item:
    """One entry of the report: a plotly figure or a circuitsvis view, with its caption."""

    name: str
    title: str
    caption: str
    figure: go.Figure | None = None
    view: P.CircuitsVisHTML | None = None
    html: str | None = None
    """Ready HTML (e.g. a table), escaped by whoever built it."""


def _synthetic_task(run: RunData):
    task_spec = run.spec.get("task")
    if not isinstance(task_spec, dict) or task_spec.get("name") in (None, "text"):
        return None
    try:
        return build_task(dict(task_spec))
    except (ValueError, TypeError):
        return None


def _landscape_task(run: RunData):
    task = _synthetic_task(run)
    if task is not None and getattr(task, "name", None) == "induction":
        return task, "the run's induction task"
    cfg = run.model.cfg
    seq_len = min(cfg.n_ctx, 64)
    return (InductionTask(d_vocab=min(cfg.d_vocab, 64), seq_len=seq_len),
            f"an induction task (d_vocab {min(cfg.d_vocab, 64)}, seq_len {seq_len})")


def landscape_items(run: RunData, grid: int = 15, n_sequences: int = 16,
                    seed: int = 0) -> tuple[list[Item], list[str]]:
    """The loss-landscape figures of a one-layer model with shifted keys and values, or notes
    saying why there are none."""
    model = run.model
    if model is None:
        return [], ["no model in the run folder, so no loss landscape"]
    cfg = model.cfg
    if not (cfg.n_layers == 1 and cfg.shift_k and cfg.shift_v and cfg.shift_window == 1):
        return [], ["the loss landscape is drawn for one-layer models with shifted keys and "
                    "values (window 1); this model is: " + describe_model(run.spec, model)]
    task, task_note = _landscape_task(run)
    steps, coeffs = F.eval_coefficients(run.evals) if run.evals else ([], {})
    n_kv = cfg.n_key_value_heads
    groups = [[h] for h in range(n_kv)] if n_kv <= MAX_LANDSCAPE_HEADS else [list(range(n_kv))]
    items = []
    for heads in groups:
        t0 = time.perf_counter()
        land = loss_landscape(model, task, layer=0, heads=heads, grid=grid,
                              n_sequences=n_sequences, seed=seed)
        paths = {}
        if "k" in coeffs and "v" in coeffs:
            for h in heads:
                paths[F.head_label(0, h)] = (current_share(coeffs["k"][:, 0, h]).tolist(),
                                             current_share(coeffs["v"][:, 0, h]).tolist())
        name = f"landscape_L0H{heads[0]}" if len(heads) == 1 else "landscape_L0"
        which = (f"head {heads[0]}" if len(heads) == 1 else "all heads together")
        lo, hi = land.argmin()
        gains = "; ".join(f"{k}: key gain {gk:.2f}, value gain {gv:.2f}"
                          for k, (gk, gv) in land.gains.items())
        items.append(Item(
            name=name, title=f"Loss landscape, layer 0, {which}",
            caption=(f"Masked loss on {land.n_sequences} sequences of {task_note}, in mix "
                     f"coordinates: x is the key's share of the current position a = α1 / (|α1| "
                     f"+ |α2|), y the value's b = β1 / (|β1| + |β2|); 1 reads only the current "
                     f"position, 0 only the previous one. At each grid point the coefficient "
                     f"hooks set {which} to the head's own gain times that mix, (α1, α2) = "
                     f"g_α (a, 1 - |a|), (β1, β2) = g_β (b, 1 - |b|) (the lag-1 term keeps the "
                     f"head's sign), other heads keep their learned coefficients; so a trained "
                     f"head lies on the surface whatever its gain ({gains}). Arrows point down "
                     f"the gradient in (a, b). A head's marker is its learned mix, its line the "
                     f"path of its mix during training. The star (0, 1) is the paper's induction "
                     f"head, the square (1, 1) vanilla attention. Lowest loss on the grid: "
                     f"{float(land.loss.min()):.3f} at (a, b) = ({lo:.2f}, {hi:.2f}); the trained "
                     f"model's loss is {land.model_loss:.3f}. Computed in "
                     f"{time.perf_counter() - t0:.1f} s."),
            figure=F.landscape_figure(land, paths=paths)))
    return items, []


def _pattern_sequence(run: RunData, seed: int):
    cfg = run.model.cfg
    task = _synthetic_task(run)
    d_vocab = task.d_vocab if task is not None else cfg.d_vocab
    bos = bool(getattr(task, "bos", False))
    n_content = d_vocab - bos
    run_length = max(2, min(16, (cfg.n_ctx - bos) // 2))
    distinct = run_length <= n_content
    seq_task = RepeatedTokensTask(d_vocab=d_vocab, run_length=run_length, n_repeats=2,
                                  distinct=distinct, bos=bos)
    tokens = seq_task.sample(1, torch.Generator().manual_seed(seed)).tokens[0]
    return tokens, (0 if bos else None), run_length


def circuit_items(run: RunData, seed: int = 0, max_len: int = 64) -> tuple[list[Item], list[str]]:
    """circuitsvis views on a repeated random sequence: plain and effective attention patterns of
    every layer, and the tokens coloured by the model's loss."""
    model = run.model
    if model is None:
        return [], ["no model in the run folder, so no attention patterns"]
    tokens, bos, run_length = _pattern_sequence(run, seed)
    strs = P.token_strings(tokens, model, bos_token=bos)
    items = []
    described = (f"a random run of {run_length} tokens written twice"
                 + (" after a BOS token" if bos is not None else ""))
    for layer in range(model.cfg.n_layers):
        items.append(Item(
            name=f"patterns_L{layer}", title=f"Attention patterns, layer {layer}",
            caption=(f"On {described}. Left: attention over positions (hook_pattern). Right: the "
                     "effective pattern over source tokens, A_eff[i, j] = β1 A[i, j] + β2 "
                     "A[i, j+1] (values only; absent when values are not shifted). Click a "
                     "thumbnail to enlarge a head; hover a cell for the tokens."),
            view=P.plain_and_effective(model, tokens, layer=layer, token_strs=strs,
                                       max_len=max_len)))
    with torch.no_grad():
        per_token = model(tokens[None], return_type="loss", loss_per_token=True)[0]
    second = per_token[len(tokens) - run_length - 1:]
    items.append(Item(
        name="loss_tokens", title="Tokens coloured by loss",
        caption=(f"The same sequence; each token is shaded by the loss of predicting it (darker: "
                 f"higher, up to {float(per_token.max()):.2f} nats). An induction model predicts "
                 f"the repeat: mean loss {float(per_token[: len(tokens) - run_length - 1].mean()):.2f}"
                 f" on the first run, {float(second.mean()):.2f} on the second."),
        view=P.loss_tokens(strs if model.tokenizer is not None else [f" {s}" for s in strs],
                           per_token, max_len=max_len)))
    return items, []


def run_items(run: RunData, landscape: bool = True, landscape_grid: int = 15,
              n_sequences: int = 16, seed: int = 0) -> tuple[list[Item], list[str]]:
    """Every figure and view of the report, and notes on what was left out."""
    items: list[Item] = []
    notes: list[str] = []
    target = run.target_accuracy
    items.append(Item(
        name="loss_accuracy", title="Training loss and accuracy",
        caption=("Training loss (solid), evaluation loss (dotted) and evaluation accuracy (red, "
                 "right axis). Dashed green: the induction phase change, the middle of the "
                 "evaluation interval where accuracy rises fastest (none is drawn when accuracy "
                 f"never rises by 0.2). Dotted purple: the first evaluation at {target:.0%}."),
        figure=F.loss_curves(run.records, target=target)))
    coefficients = None
    if run.model is not None and run.model.shift_coefficients().values:
        coefficients = run.model.shift_coefficients()
    elif run.evals and run.evals[-1].get("coefficients"):
        coefficients = run.evals[-1]["coefficients"]
    if coefficients is not None:
        items.append(Item(
            name="coefficients", title="Learned shift coefficients",
            caption=("Every head's coefficients at the end of training, layer × head, read as a "
                     "gain times a mix: α multiplies keys, β values; lag 1 (α1, β1) is the "
                     "current position, lag 2 the previous one. Gain = |α1| + |α2| (grey, how "
                     "much the shift scales the keys; free coefficients trained at a high "
                     "learning rate grow it well above 1), mix = α / gain (red-blue, in [-1, 1]: "
                     "what the key is made of). Compare heads by their mix, not by raw values. "
                     "Vanilla attention is mix (1, 0) for keys and values; the paper's one-layer "
                     "induction head key mix (0, 1), value mix (1, 0). Hover a cell for the raw "
                     "values."),
            figure=F.coefficient_heatmaps(coefficients,
                                          title="Shift coefficients of the final model")))
        if any(r.get("coefficients") for r in run.evals):
            items.append(Item(
                name="trajectories", title="Coefficients during training",
                caption=("Each head's gain (first column) and mix (current, previous) of keys "
                         "(α) and values (β) at every evaluation; the raw coefficient is gain × "
                         "mix."),
                figure=F.coefficient_trajectories(run.evals)))
            logged = F.as_coefficient_arrays(
                next(r for r in run.evals if r.get("coefficients"))["coefficients"])
            if "k" in logged and "v" in logged:
                items.append(Item(
                    name="plane", title="Heads by their keys' and values' current share",
                    caption=("Each head at every evaluation, from the open circle (first "
                             "evaluation) to the large marker (last): x is the key's share of the "
                             "current position α1 / (|α1| + |α2|), y the value's β1 / (|β1| + "
                             "|β2|), so heads of any gain compare. The star is the induction point "
                             "(0, 1): keys read the previous token, values the current one; the "
                             "square vanilla attention (1, 1). Hover for the raw α and β."),
                    figure=F.coefficient_plane(run.evals)))
    else:
        notes.append("the model has no shifted projection, so there are no coefficient figures")
    if landscape and coefficients is not None:
        more, why = landscape_items(run, grid=landscape_grid, n_sequences=n_sequences, seed=seed)
        items += more
        notes += why
    more, why = circuit_items(run, seed=seed)
    items += more
    notes += why
    return items, notes


# ---------------------------------------------------------------------------------------------
# The HTML page
# ---------------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #222;
       background: #fafafa; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 32px 64px; background: white; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
h4 { margin: 0.4em 0; font-weight: 600; }
p.caption { color: #555; font-size: 0.92em; max-width: 60em; }
pre.summary { background: #f4f4f4; padding: 12px 16px; border-radius: 4px; overflow-x: auto; }
table.coeffs { border-collapse: collapse; font-variant-numeric: tabular-nums; }
table.coeffs td, table.coeffs th { border: 1px solid #ddd; padding: 3px 10px; text-align: right; }
table.coeffs tr.induction { background: #fff3cd; }
table.coeffs .raw { color: #777; }
.note { color: #8a5a00; }
.static a { margin-right: 0.8em; }
"""


def _plotly_js() -> str:
    from plotly.offline import get_plotlyjs

    return P._script_safe(get_plotlyjs())


def _figure_html(item: Item) -> str:
    return item.figure.to_html(
        full_html=False, include_plotlyjs=False, div_id=f"fig-{item.name}",
        default_width="100%", config={"displaylogo": False, "responsive": True})


def _coefficient_table(summary: RunSummary) -> str:
    rows = summary.head_rows()
    if not rows:
        return ""
    mixes = dict(summary.mix_rows())
    mix_names = list(mixes[rows[0][0]])
    raw_names = list(rows[0][1])
    best = summary.induction_head()
    head = ("".join(f"<th>{html.escape(n)}</th>" for n in mix_names)
            + "<th>induction score</th><th>class</th>"
            + "".join(f"<th class=raw>{html.escape(n)} (raw)</th>" for n in raw_names))

    def score(label: str) -> str:
        value = summary.induction_scores.get(label)
        return "n/a" if value is None else f"{value:.3f}"

    body = "".join(
        f'<tr{" class=induction" if label == best else ""}><th>{label}</th>'
        + "".join(f"<td>{mixes[label][n]:.3f}</td>" for n in mix_names)
        + f"<td>{score(label)}</td><td>{html.escape(summary.head_kinds.get(label, ''))}</td>"
        + "".join(f"<td class=raw>{values[n]:.3f}</td>" for n in raw_names) + "</tr>"
        for label, values in rows)
    if best:
        note = (f"Highlighted: {best}, measured induction score {score(best)}, the head nearest "
                "the induction point by mix (key mix (0, 1): keys read only the previous "
                "position; value mix (1, 0): values only the current one) among the heads the "
                f"probes measure as induction heads (score ≥ {summary.induction_threshold:g}).")
    elif summary.induction_scores:
        note = ("No head is highlighted: none has a measured induction score of at least "
                f"{summary.induction_threshold:g}.")
    else:
        note = "No head is highlighted: induction scores need the model, which was not found."
    note += (" Gain = sum of |c| over lags, mix = c / gain (the share of each lag, current then "
             "previous); the raw coefficients are gain × mix. Induction score: the attention the "
             "second copy of a repeated random sequence pays (through the value shift when there "
             "is one) to the token after the current token's first copy, in [0, 1]. Class: the "
             "probes' taxonomy (probes.classify_heads).")
    return (f"<table class=coeffs><tr><th>head</th>{head}</tr>{body}</table>"
            f"<p class=caption>{html.escape(note)}</p>")


def render_html(run: RunData, summary: RunSummary, items: Sequence[Item], notes: Sequence[str],
                static: StaticExport | None, out_path: Path) -> str:
    """The report page: one HTML document with every script inlined."""
    sections = []
    for item in items:
        if item.figure is not None:
            content = _figure_html(item)
        elif item.html is not None:
            content = item.html
        else:
            content = item.view.body
        links = ""
        if static is not None and static.directory is not None:
            here = [p for p in static.files if p.stem == item.name and p.is_file()]
            if here:
                links = "<p class=static>" + "".join(
                    f'<a href="{html.escape(os.path.relpath(p, out_path.parent))}">'
                    f"{p.suffix[1:].upper()}</a>" for p in here) + "</p>"
        sections.append(f'<section id="{item.name}"><h2>{html.escape(item.title)}</h2>'
                        f"<p class=caption>{html.escape(item.caption)}</p>{content}{links}"
                        "</section>")
    if static is None:
        static_text = "Static export (PNG/SVG) was not asked for (--no-static)."
    else:
        static_text = f"Static export: {static.status}: {static.message}."
        if static.status == "written" and static.directory is not None:
            static_text += f" Folder: {os.path.relpath(static.directory, out_path.parent)}/"
    static_class = "note" if static is not None and static.status != "written" else ""
    notes_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    model_note = (f"Model: {run.model_dir}" if run.model_dir is not None
                  else "No model was found in the run folder.")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>kvshift report: {html.escape(summary.name)}</title>
<style>{_CSS}</style>
<script type="text/javascript">{_plotly_js()}</script>
{P.circuitsvis_script()}
</head>
<body>
<main>
<h1>Run report: {html.escape(summary.name)}</h1>
<p class=caption>{html.escape(summary.description)}. {html.escape(model_note)}</p>
<section id="summary"><h2>Summary</h2>
<pre class=summary>{html.escape(summary.to_text())}</pre>
{_coefficient_table(summary)}
</section>
{"".join(sections)}
<section id="notes"><h2>Notes</h2>
<ul><li class="{static_class}">{html.escape(static_text)}</li>
{notes_html}</ul>
<p class=caption>Generated by kvshift_lens {kvshift_lens.__version__}. Every script is inlined: the page works
offline.</p>
</section>
</main>
</body>
</html>
"""


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table class=coeffs><tr>{head}</tr>{body}</table>"


def comparison_items(run_dirs: Mapping[str, str | Path], batch_size: int = 128,
                     seed: int = 0) -> tuple[list[Item], dict[str, Any]]:
    """Sections comparing several runs of one task (the demo's KV-shift and vanilla models): their
    evaluation accuracy and loss together, each model's head taxonomy with every head's
    zero-ablation effect, and for shifted models the effect of removing the key or the value
    shift of its induction heads.

    Args:
        run_dirs: ``{name: run folder}``; each needs a model.
        batch_size: sequences of each run's own task the ablations are measured on.
        seed: seed of those sequences.

    Returns:
        ``(items, data)``: report items, and per run ``{"heads": [...], "shift_ablations":
        [...], "accuracy": ...}`` with the numbers shown.
    """
    from probes.ablation import ablate_each_head, ablation_effect, remove_key_shift, remove_value_shift

    runs = {name: load_run(d) for name, d in run_dirs.items()}
    fig = make_comparison_curves({n: r.records for n, r in runs.items()})
    items = [Item(name="compare_curves", title="The models compared: accuracy and loss",
                  caption=("Evaluation accuracy (solid, right axis) and evaluation loss (dotted, "
                           "left axis) of every model on the same task, one colour per model."),
                  figure=fig)]
    data: dict[str, Any] = {}
    taxonomy_rows, shift_rows = [], []
    for name, run in runs.items():
        if run.model is None:
            raise ReportError(f"run {name} ({run.run_dir}) has no model to probe")
        task = _synthetic_task(run)
        if task is None:
            raise ReportError(f"run {name} has no synthetic task to measure ablations on")
        heads = classify_run_heads(run)
        table = ablate_each_head(run.model, task, batch_size=batch_size, seed=seed)
        rows = []
        for h in heads:
            after = float(table.accuracy[h.layer, h.head])
            rows.append({"layer": h.layer, "head": h.head, "kind": h.kind.value,
                         "previous_token": round(float(h.previous_token), 3),
                         "induction": round(float(h.induction), 3),
                         "accuracy_zero_ablated": round(after, 3)})
            taxonomy_rows.append([name, F.head_label(h.layer, h.head), h.kind.value,
                                  f"{h.previous_token:.3f}", f"{h.induction:.3f}",
                                  f"{table.accuracy_before:.3f}", f"{after:.3f}"])
        entry: dict[str, Any] = {"accuracy": round(float(table.accuracy_before), 4),
                                 "heads": rows, "shift_ablations": []}
        cfg = run.model.cfg
        induction = [h for h in heads if h.kind.value == "induction_via_shift"]
        if cfg.shift_k or cfg.shift_v:
            for h in induction:
                for what, make, on in (("key shift", remove_key_shift, cfg.shift_k),
                                       ("value shift", remove_value_shift, cfg.shift_v)):
                    if not on:
                        continue
                    eff = ablation_effect(run.model, task, [make(run.model, h.layer, h.head)],
                                          batch_size=batch_size, seed=seed)
                    entry["shift_ablations"].append({
                        "head": F.head_label(h.layer, h.head), "removed": what,
                        "accuracy_before": round(eff.accuracy_before, 4),
                        "accuracy_after": round(eff.accuracy_after, 4)})
                    shift_rows.append([name, F.head_label(h.layer, h.head), what,
                                       f"{eff.accuracy_before:.3f}", f"{eff.accuracy_after:.3f}"])
            if len(induction) > 1:
                for what, make, on in (("key shift", remove_key_shift, cfg.shift_k),
                                       ("value shift", remove_value_shift, cfg.shift_v)):
                    if not on:
                        continue
                    eff = ablation_effect(run.model, task,
                                          [make(run.model, h.layer, h.head) for h in induction],
                                          batch_size=batch_size, seed=seed)
                    entry["shift_ablations"].append({
                        "head": "all induction heads", "removed": what,
                        "accuracy_before": round(eff.accuracy_before, 4),
                        "accuracy_after": round(eff.accuracy_after, 4)})
                    shift_rows.append([name, "all induction heads", what,
                                       f"{eff.accuracy_before:.3f}", f"{eff.accuracy_after:.3f}"])
        data[name] = entry
    items.append(Item(
        name="compare_heads", title="Every model's heads: taxonomy and zero ablation",
        caption=(f"Class: the probes' taxonomy (probes.classify_heads) on repeated random tokens "
                 f"in each run's format. Previous-token and induction scores: the head's "
                 f"attention (on value sources) to the previous token, and from a repeated "
                 f"token to the token after its first copy, in [0, 1]; a head gets a class from "
                 f"{INDUCTION_THRESHOLD:g}. Accuracy: on {batch_size} sequences of the run's "
                 f"task, as trained and with the head's output (hook_z) set to zero. A head "
                 f"classed 'other' whose ablation costs accuracy does a job no single score "
                 f"names, for example a previous-token role shared by several heads each below "
                 f"the threshold."),
        html=_table(["model", "head", "class", "previous-token score", "induction score",
                     "accuracy", "accuracy, head zeroed"], taxonomy_rows)))
    if shift_rows:
        items.append(Item(
            name="compare_shift_ablations", title="Removing the shift of the induction heads",
            caption=("For each head classed induction_via_shift (and all of them at once): "
                     "accuracy as trained and with its key shift removed (its α set to the "
                     "identity (1, 0), so K' = K: probes.remove_key_shift) or its value shift "
                     "removed (β = (1, 0), V' = V: probes.remove_value_shift)."),
            html=_table(["model", "head", "removed", "accuracy", "accuracy after"],
                        shift_rows)))
    return items, data


def make_comparison_curves(records: Mapping[str, Sequence[Mapping[str, Any]]]) -> go.Figure:
    """Evaluation accuracy and loss of several runs on one figure (``{name: records}``)."""
    fig = go.Figure()
    for i, (name, recs) in enumerate(records.items()):
        evals = [r for r in recs if r.get("kind") == "eval" and "eval/accuracy" in r]
        steps = [r["step"] for r in evals]
        color = F.PALETTE[i % len(F.PALETTE)]
        fig.add_trace(go.Scatter(x=steps, y=[r["eval/accuracy"] for r in evals], name=
                                 f"{name} accuracy", yaxis="y2", line=dict(color=color, width=2),
                                 meta={"run": name, "metric": "accuracy"}))
        fig.add_trace(go.Scatter(x=steps, y=[r.get("eval/loss") for r in evals],
                                 name=f"{name} loss", line=dict(color=color, dash="dot"),
                                 meta={"run": name, "metric": "loss"}))
    fig.update_layout(template=F.TEMPLATE, height=460, xaxis=dict(title="step"),
                      yaxis=dict(title="evaluation loss"),
                      yaxis2=dict(title="evaluation accuracy", overlaying="y", side="right",
                                  range=[0, 1.02]),
                      legend=dict(orientation="h", y=-0.2))
    return fig


@dataclass
class ReportOutcome:
    """What :func:`generate_report` wrote."""

    path: Path
    summary: RunSummary
    static: StaticExport | None
    items: list[str]
    notes: list[str]


def generate_report(
    run_dir: str | Path,
    out_path: str | Path | None = None,
    static: bool = True,
    landscape: bool = True,
    landscape_grid: int = 15,
    n_sequences: int = 16,
    seed: int = 0,
    extra_items: Sequence[Item] = (),
) -> ReportOutcome:
    """Write the report of a run folder (see the module docstring) and say what was written.

    Args:
        run_dir: the run folder.
        out_path: the HTML file (default ``RUN_DIR/report.html``).
        static: also write PNG/SVG of each plotly figure to ``<out stem>_figures/``.
        landscape: compute the loss landscape (one-layer K+V-shifted models).
        landscape_grid: grid points per axis of the landscape.
        n_sequences: induction sequences the landscape's loss averages over.
        seed: seed of the landscape batch and the example sequence.
        extra_items: more sections, placed after the training curves (e.g.
            :func:`comparison_items`).

    Raises:
        ReportError: ``run_dir`` is not a readable run folder.
    """
    run = load_run(run_dir)
    out = Path(out_path) if out_path is not None else run.run_dir / REPORT_FILE
    if out.exists() and out.is_dir():
        raise ReportError(f"--out {out} is a folder; give a file name such as report.html")
    t0 = time.perf_counter()
    summary = summarize_run(run)
    items, notes = run_items(run, landscape=landscape, landscape_grid=landscape_grid,
                             n_sequences=n_sequences, seed=seed)
    items[1:1] = list(extra_items)
    logger.info("built %d report items in %.1f s", len(items), time.perf_counter() - t0)
    out.parent.mkdir(parents=True, exist_ok=True)
    exported = None
    if static:
        exported = export_static({i.name: i.figure for i in items if i.figure is not None},
                                 out.parent / f"{out.stem}_figures")
    page = render_html(run, summary, items, notes, exported, out)
    atomic_write_text(out, page)
    logger.info("wrote %s (%.1f MB)", out, out.stat().st_size / 1e6)
    return ReportOutcome(path=out, summary=summary, static=exported,
                         items=[i.name for i in items], notes=notes)


def write_report(run_dir: str | Path, out_path: str | Path | None = None, static: bool = True,
                 **kwargs: Any) -> Path:
    """Write the report of a run folder; returns the HTML file's path (see
    :func:`generate_report` for the options)."""
    return generate_report(run_dir, out_path, static=static, **kwargs).path


__all__ = [
    "ReportError",
    "ReportOutcome",
    "RunData",
    "RunSummary",
    "comparison_items",
    "generate_report",
    "load_run",
    "summarize_run",
    "write_report",
]
