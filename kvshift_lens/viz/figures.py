"""Plotly figures for shift coefficients, training curves, loss landscapes and probe results.

Every function takes plain data (tensors, lists, dicts: a model's :class:`ShiftCoefficients`, the
records of a run's ``metrics.jsonl``, a sweep's ``summary.json``) and returns a
``plotly.graph_objects.Figure``; none reads files or runs a model. Axis names as in the package:
``layer``, ``head`` (key/value heads for the K and V coefficients), ``lag``.

Coefficient names follow PAPER.md: ``alpha_{l+1}`` multiplies the key ``l`` positions back
(``K'_t = alpha1 K_t + alpha2 K_{t-1}``), ``beta_{l+1}`` the value, ``gamma_{l+1}`` the query when
queries are shifted. In the (alpha1, beta1) plane the paper's one-layer induction head sits at
(0, 1) and vanilla attention (``alpha1 = beta1 = 1``, the identity shift) at (1, 1).

Coefficients are shown by default as a *gain* times a *mix* over lags
(:func:`kvshift_lens.shift.gain_and_mix`: ``gain = sum_l |c_l|``, ``mix = c / gain``), because
free coefficients trained at a high learning rate grow into gains (alpha2 of 4 is a mix of about
0.9 at gain 4.5) and raw values then compare scales, not roles. The mix coordinates of the plane
and the landscape are each projection's *current share* ``c_0 / sum_l |c_l|`` (1: the position
sees only itself, 0: only the previous position), where the induction point and vanilla attention
are again (0, 1) and (1, 1). ``view="raw"`` shows the raw values.

Traces carry ``meta`` dicts (e.g. ``{"which": "k", "lag": 0}``, ``{"layer": 0, "head": 1}``) so
code and tests can find the trace that shows a given quantity.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.colors import qualitative
from plotly.subplots import make_subplots

SYMBOLS = {"k": "α", "v": "β", "q": "γ"}
"""Greek letter of each shifted projection's coefficients (the paper's alpha for keys, beta for
values; gamma is ours, for shifted queries)."""

PROJECTIONS = {"k": "key", "v": "value", "q": "query"}
INDUCTION_POINT = (0.0, 1.0)
"""(alpha1, beta1) of the paper's ideal one-layer induction head."""
VANILLA_POINT = (1.0, 1.0)
"""(alpha1, beta1) of vanilla attention: the identity shift, alpha2 = beta2 = 0."""

TEMPLATE = "plotly_white"
PALETTE = qualitative.D3 + qualitative.Set2


VIEWS = ("mix", "raw")


def _check_view(view: str) -> str:
    if view not in VIEWS:
        raise ValueError(f"view={view!r}: expected one of {VIEWS} ('mix': gain and mix over lags; "
                         "'raw': the coefficients as stored)")
    return view


def gain_mix_arrays(values: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(gain [...], mix [..., lag])`` of coefficients ``[..., lag]`` as numpy arrays (see
    :func:`kvshift_lens.shift.gain_and_mix`)."""
    from kvshift_lens.shift import gain_and_mix

    gain, mix = gain_and_mix(torch.as_tensor(_as_array(values, "coefficients")))
    return gain.numpy(), mix.numpy()


def mix_label(which: str, lag: int) -> str:
    """``"α mix, current"`` / ``"β mix, previous"``: the share of lag ``lag`` in the mix."""
    where = "current" if lag == 0 else ("previous" if lag == 1 else f"{lag} back")
    return f"{coefficient_label(which, lag)[0]} mix, {where}"


def coefficient_label(which: str, lag: int) -> str:
    """``"α1"`` for keys at lag 0, ``"β2"`` for values at lag 1, and so on."""
    if which not in SYMBOLS:
        raise ValueError(f"which={which!r} is not one of {list(SYMBOLS)}")
    return f"{SYMBOLS[which]}{lag + 1}"


def head_label(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def _color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _as_array(x: Any, name: str, ndim: int | None = None) -> np.ndarray:
    """A float64 numpy copy of a tensor, array or nested list (exact for float32 input)."""
    if isinstance(x, torch.Tensor):
        arr = x.detach().cpu().to(torch.float64).numpy()
    else:
        arr = np.asarray(x, dtype=np.float64)
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(arr.shape)}")
    return arr


def as_coefficient_arrays(coefficients: Any) -> dict[str, np.ndarray]:
    """``{which: [layer, head, lag] array}`` from a :class:`~kvshift_lens.ShiftCoefficients`, a
    mapping of tensors / arrays / nested lists (e.g. an eval record's ``"coefficients"``)."""
    values = coefficients if isinstance(coefficients, Mapping) else getattr(
        coefficients, "values", None)  # a ShiftCoefficients keeps its mapping in .values
    if not isinstance(values, Mapping) or not values:
        raise ValueError(
            "coefficients must be a ShiftCoefficients or a non-empty mapping "
            "{'k'|'v'|'q': [layer, head, lag]}; got "
            f"{type(coefficients).__name__}" + (" (empty: is the model shifted at all?)"
                                                 if isinstance(values, Mapping) else ""))
    out = {}
    for which in ("k", "v", "q"):
        if which in values:
            out[which] = _as_array(values[which], f"coefficients[{which!r}]", ndim=3)
    unknown = sorted(set(values) - set(out))
    if unknown:
        raise ValueError(f"unknown shifted projection(s) {unknown}; expected some of ['k', 'v', 'q']")
    return out


def _select(coeffs: dict[str, np.ndarray], which: Sequence[str] | None) -> list[str]:
    chosen = list(coeffs) if which is None else list(which)
    missing = [w for w in chosen if w not in coeffs]
    if missing:
        raise ValueError(f"{missing} not shifted here; shifted: {list(coeffs)}")
    return chosen


# ---------------------------------------------------------------------------------------------
# Shift coefficients
# ---------------------------------------------------------------------------------------------


def _lag_title(which: str, lag: int) -> str:
    where = "current token" if lag == 0 else ("previous token" if lag == 1 else f"{lag} back")
    return f"{coefficient_label(which, lag)}: {PROJECTIONS[which]}, {where}"


def coefficient_heatmaps(
    coefficients: Any,
    which: Sequence[str] | None = None,
    title: str = "Shift coefficients",
    view: str = "mix",
) -> go.Figure:
    """Heatmaps layer x head of every shift coefficient: one row per shifted projection (keys,
    values, queries).

    ``view="mix"`` (default): per projection a gain panel (``sum_l |c_l|``, its own colour scale
    from 0) and one mix panel per lag (``c_l / gain``, in [-1, 1]). ``view="raw"``: one panel per
    lag with the stored values (alpha1 and alpha2 for the paper's window 1).

    Args:
        coefficients: a model's ``shift_coefficients()`` or ``{which: [layer, head, lag]}``.
        which: the projections to show (default: every shifted one).
        view: ``"mix"`` or ``"raw"``.

    Returns:
        A figure whose heatmap traces have ``z[layer][head]`` equal to the shown quantity and
        ``meta = {"which": ..., "lag": ..., "quantity": "raw" | "gain" | "mix"}`` (``lag`` None
        for the gain); raw and mix panels share one colour scale centred on 0.
    """
    coeffs = as_coefficient_arrays(coefficients)
    rows = _select(coeffs, which)
    if _check_view(view) == "mix":
        return _gain_mix_heatmaps(coeffs, rows, title)
    n_lags = max(coeffs[w].shape[2] for w in rows)
    titles = [_lag_title(w, lag) if lag < coeffs[w].shape[2] else "" for w in rows
              for lag in range(n_lags)]
    fig = make_subplots(rows=len(rows), cols=n_lags, subplot_titles=titles,
                        horizontal_spacing=0.08, vertical_spacing=0.18 if len(rows) > 1 else 0.1)
    bound = max([1.0] + [float(np.abs(coeffs[w]).max()) for w in rows])  # 1: identity
    for r, w in enumerate(rows, start=1):
        values = coeffs[w]
        n_layers, n_heads, _ = values.shape
        for lag in range(values.shape[2]):
            fig.add_trace(go.Heatmap(
                z=values[:, :, lag].tolist(), x=list(range(n_heads)), y=list(range(n_layers)),
                coloraxis="coloraxis", texttemplate="%{z:.2f}", name=coefficient_label(w, lag),
                meta={"which": w, "lag": lag, "quantity": "raw"},
                hovertemplate=(f"{coefficient_label(w, lag)}<br>layer %{{y}}, head %{{x}}"
                               "<br>%{z:.4f}<extra></extra>")),
                row=r, col=lag + 1)
            fig.update_xaxes(title_text="head", dtick=1, row=r, col=lag + 1)
            fig.update_yaxes(title_text="layer", dtick=1, autorange="reversed", row=r,
                             col=lag + 1)
    fig.update_layout(
        title=title, template=TEMPLATE, height=260 * len(rows) + 80,
        coloraxis=dict(colorscale="RdBu_r", cmin=-bound, cmax=bound,
                       colorbar=dict(title="value")))
    return fig


def _gain_mix_heatmaps(coeffs: dict[str, np.ndarray], rows: list[str], title: str) -> go.Figure:
    n_lags = max(coeffs[w].shape[2] for w in rows)
    titles = []
    for w in rows:
        titles.append(f"{SYMBOLS[w]} gain: {PROJECTIONS[w]} (sum of |{SYMBOLS[w]}|)")
        titles += [mix_label(w, lag) if lag < coeffs[w].shape[2] else ""
                   for lag in range(n_lags)]
    fig = make_subplots(rows=len(rows), cols=n_lags + 1, subplot_titles=titles,
                        horizontal_spacing=0.07, vertical_spacing=0.18 if len(rows) > 1 else 0.1)
    gain_max = 1.0
    for r, w in enumerate(rows, start=1):
        gain, mix = gain_mix_arrays(coeffs[w])  # [layer, head], [layer, head, lag]
        gain_max = max(gain_max, float(gain.max()))
        n_layers, n_heads = gain.shape
        raw = coeffs[w]
        panels = [(None, "gain", gain, "coloraxis2")] + [
            (lag, "mix", mix[:, :, lag], "coloraxis") for lag in range(mix.shape[2])]
        for col, (lag, quantity, z, axis) in enumerate(panels, start=1):
            name = (f"{SYMBOLS[w]} gain" if lag is None else mix_label(w, lag))
            raw_text = [[", ".join(f"{coefficient_label(w, lg)} {raw[i, j, lg]:.3f}"
                                   for lg in range(raw.shape[2])) for j in range(n_heads)]
                        for i in range(n_layers)]
            fig.add_trace(go.Heatmap(
                z=z.tolist(), x=list(range(n_heads)), y=list(range(n_layers)), coloraxis=axis,
                texttemplate="%{z:.2f}", name=name, customdata=raw_text,
                meta={"which": w, "lag": lag, "quantity": quantity},
                hovertemplate=(f"{name}<br>layer %{{y}}, head %{{x}}<br>%{{z:.4f}}"
                               "<br>raw: %{customdata}<extra></extra>")),
                row=r, col=col)
            fig.update_xaxes(title_text="head", dtick=1, row=r, col=col)
            fig.update_yaxes(title_text="layer", dtick=1, autorange="reversed", row=r, col=col)
    fig.update_layout(
        title=title, template=TEMPLATE, height=260 * len(rows) + 80,
        coloraxis=dict(colorscale="RdBu_r", cmin=-1, cmax=1,
                       colorbar=dict(title="mix", x=1.02)),
        coloraxis2=dict(colorscale="Greys", cmin=0, cmax=gain_max,
                        colorbar=dict(title="gain", x=1.12)))
    return fig


def eval_coefficients(
    evals: Sequence[Mapping[str, Any]],
) -> tuple[list[int], dict[str, np.ndarray]]:
    """Steps and ``{which: [eval, layer, head, lag]}`` arrays from the evaluation records that
    carry ``"coefficients"``."""
    rows = [r for r in evals if r.get("coefficients")]
    if not rows:
        raise ValueError("no evaluation record has 'coefficients' (a run of a shifted model "
                         "logs them with every evaluation)")
    steps = [int(r["step"]) for r in rows]
    per_eval = [as_coefficient_arrays(r["coefficients"]) for r in rows]
    keys = list(per_eval[0])
    return steps, {w: np.stack([c[w] for c in per_eval]) for w in keys}


def eval_records(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The evaluation records (``kind == "eval"``) of a metrics.jsonl, in order; records without
    a ``kind`` are taken to be evaluations (a plain list of ``{"step", "coefficients"}``)."""
    return [r for r in records if r.get("kind", "eval") == "eval"]


def coefficient_trajectories(
    records: Sequence[Mapping[str, Any]],
    which: Sequence[str] | None = None,
    title: str = "Shift coefficients during training",
    view: str = "mix",
) -> go.Figure:
    """Every head's coefficients over training, one line per head (rows: projections).

    ``view="mix"`` (default): columns are the gain (``sum_l |c_l|``) and the mix of each lag
    (``c_l / gain``); ``view="raw"``: one column per lag with the logged values.

    Args:
        records: metrics.jsonl records (evaluation records carry ``"coefficients"``
            ``{which: [layer][head][lag]}``); other kinds are ignored.
        which: the projections to show (default: every logged one).
        view: ``"mix"`` or ``"raw"``.

    Returns:
        A figure with one line per (projection, panel, layer, head): ``x`` the steps, ``y`` the
        shown values, ``meta = {"which", "lag", "layer", "head", "quantity"}`` (``quantity``
        ``"raw"``, ``"gain"`` (``lag`` None) or ``"mix"``).
    """
    steps, coeffs = eval_coefficients(eval_records(records))
    rows = _select(coeffs, which)
    n_lags = max(coeffs[w].shape[3] for w in rows)
    mixed = _check_view(view) == "mix"
    if mixed:
        titles = []
        for w in rows:
            titles.append(f"{SYMBOLS[w]} gain ({PROJECTIONS[w]})")
            titles += [mix_label(w, lag) if lag < coeffs[w].shape[3] else ""
                       for lag in range(n_lags)]
    else:
        titles = [_lag_title(w, lag) if lag < coeffs[w].shape[3] else "" for w in rows
                  for lag in range(n_lags)]
    fig = make_subplots(rows=len(rows), cols=n_lags + mixed, subplot_titles=titles,
                        shared_xaxes=True, horizontal_spacing=0.07, vertical_spacing=0.12)
    for r, w in enumerate(rows, start=1):
        values = coeffs[w]
        _, n_layers, n_heads, lags = values.shape
        if mixed:
            gain, mix = gain_mix_arrays(values)  # [eval, layer, head], [eval, layer, head, lag]
            panels = [(None, "gain", gain)] + [(lag, "mix", mix[..., lag]) for lag in range(lags)]
        else:
            panels = [(lag, "raw", values[..., lag]) for lag in range(lags)]
        for col, (lag, quantity, shown) in enumerate(panels, start=1):
            name = (f"{SYMBOLS[w]} gain" if lag is None else
                    mix_label(w, lag) if mixed else coefficient_label(w, lag))
            for layer in range(n_layers):
                for head in range(n_heads):
                    label = head_label(layer, head)
                    fig.add_trace(go.Scatter(
                        x=steps, y=shown[:, layer, head].tolist(), mode="lines",
                        name=label, legendgroup=label,
                        showlegend=(r == 1 and col == 1),
                        line=dict(color=_color(layer * n_heads + head), width=2),
                        meta={"which": w, "lag": lag, "layer": layer, "head": head,
                              "quantity": quantity},
                        hovertemplate=(f"{label} {name}<br>step %{{x}}: "
                                       "%{y:.3f}<extra></extra>")),
                        row=r, col=col)
            fig.update_yaxes(title_text=coefficient_label(w, 0)[0], row=r, col=1)
    for c in range(1, n_lags + mixed + 1):
        fig.update_xaxes(title_text="step", row=len(rows), col=c)
    fig.update_layout(title=title, template=TEMPLATE, height=280 * len(rows) + 90,
                      legend=dict(title="head"))
    return fig


def _reference_points(fig: go.Figure, text_color: str = "#333") -> None:
    for (x, y), name, symbol, color in (
            (INDUCTION_POINT, "induction (0, 1)", "star", "#d62728"),
            (VANILLA_POINT, "vanilla / identity (1, 1)", "square", "#7f7f7f")):
        fig.add_trace(go.Scatter(
            x=[x], y=[y], mode="markers+text", name=name, text=[name.split(" ")[0]],
            textposition="top center", meta={"reference": name.split(" ")[0]},
            textfont=dict(color=text_color),
            marker=dict(symbol=symbol, size=16, color=color, line=dict(color="white", width=1)),
            hovertemplate=f"{name}<extra></extra>"))


def _axis_titles(coords: str) -> tuple[str, str]:
    if coords == "mix":
        return ("key's share of the current position, α1 / (|α1| + |α2|)",
                "value's share of the current position, β1 / (|β1| + |β2|)")
    return "α1 (key weight on its own token)", "β1 (value weight on its own token)"


def coefficient_plane(
    records: Sequence[Mapping[str, Any]],
    layers: Sequence[int] | None = None,
    title: str | None = None,
    view: str = "mix",
) -> go.Figure:
    """Every head as a point moving through the plane of its key's and value's own-position
    weight over training.

    ``view="mix"`` (default): x is the key's current share ``alpha1 / (|alpha1| + |alpha2|)``,
    y the value's ``beta1 / (|beta1| + |beta2|)`` (scale-free, in [-1, 1]); ``view="raw"``: x is
    alpha1, y beta1, the key's and value's weight on its own position (lag 0). Each head is a
    line with markers from its first to its last evaluation; its final position is a large
    marker (the ``"final"`` trace). The induction point (0, 1) and vanilla attention (1, 1) are
    marked.

    Args:
        records: metrics.jsonl records whose evaluations carry both ``k`` and ``v``
            coefficients.
        layers: the layers to show (default: all).
        view: ``"mix"`` or ``"raw"``.

    Returns:
        A figure with one path per head (``meta = {"layer", "head"}``), a ``"final"`` trace whose
        ``x``/``y`` are the final coordinates of the shown heads in (layer, head) order, and a
        ``"start"`` trace likewise for the first evaluation; raw alpha and beta are in the hover.
    """
    steps, coeffs = eval_coefficients(eval_records(records))
    if "k" not in coeffs or "v" not in coeffs:
        raise ValueError("the (α1, β1) plane needs both keys and values shifted; logged: "
                         f"{list(coeffs)}")
    mixed = _check_view(view) == "mix"
    if mixed:
        alpha1 = gain_mix_arrays(coeffs["k"])[1][..., 0]  # [eval, layer, kv_head]
        beta1 = gain_mix_arrays(coeffs["v"])[1][..., 0]  # [eval, layer, kv_head]
        xn, yn = "key share α1/Σ|α|", "value share β1/Σ|β|"
    else:
        alpha1, beta1 = coeffs["k"][..., 0], coeffs["v"][..., 0]  # [eval, layer, kv_head]
        xn, yn = "α1", "β1"
    n_layers, n_heads = alpha1.shape[1:]
    shown = list(range(n_layers)) if layers is None else list(layers)
    bad = [layer for layer in shown if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {n_layers} layers")
    fig = go.Figure()
    final_x, final_y, final_text, final_color = [], [], [], []
    start_x, start_y = [], []
    for layer in shown:
        for head in range(n_heads):
            label, color = head_label(layer, head), _color(layer * n_heads + head)
            x, y = alpha1[:, layer, head].tolist(), beta1[:, layer, head].tolist()
            raw = [[s_, ", ".join(f"{v:.3f}" for v in coeffs["k"][e, layer, head]),
                    ", ".join(f"{v:.3f}" for v in coeffs["v"][e, layer, head])]
                   for e, s_ in enumerate(steps)]
            fig.add_trace(go.Scatter(
                x=x, y=y, mode="lines+markers", name=label, legendgroup=label,
                line=dict(color=color, width=2), marker=dict(size=5, color=color),
                customdata=raw, meta={"layer": layer, "head": head},
                hovertemplate=(f"{label}<br>step %{{customdata[0]}}<br>{xn} %{{x:.3f}}, "
                               f"{yn} %{{y:.3f}}<br>raw α (%{{customdata[1]}}), "
                               "β (%{customdata[2]})<extra></extra>")))
            final_x.append(x[-1])
            final_y.append(y[-1])
            final_text.append(label)
            final_color.append(color)
            start_x.append(x[0])
            start_y.append(y[0])
    fig.add_trace(go.Scatter(
        x=start_x, y=start_y, mode="markers", name=f"start (step {steps[0]})",
        marker=dict(symbol="circle-open", size=11, color="black"), meta={"role": "start"},
        hovertemplate=f"start<br>{xn} %{{x:.3f}}, {yn} %{{y:.3f}}<extra></extra>"))
    fig.add_trace(go.Scatter(
        x=final_x, y=final_y, mode="markers+text", name=f"final (step {steps[-1]})",
        text=final_text, textposition="bottom right", meta={"role": "final"},
        marker=dict(size=15, color=final_color, line=dict(color="black", width=2)),
        hovertemplate=f"%{{text}} final<br>{xn} %{{x:.3f}}, {yn} %{{y:.3f}}<extra></extra>"))
    _reference_points(fig)
    if title is None:
        title = ("Heads by their keys' and values' share of the current position during training"
                 if mixed else "Heads in the (α1, β1) plane during training")
    xt, yt = _axis_titles("mix" if mixed else "raw")
    fig.update_layout(title=title, template=TEMPLATE, height=560,
                      xaxis=dict(title=xt, zeroline=True),
                      yaxis=dict(title=yt, zeroline=True, scaleanchor="x", scaleratio=1))
    return fig


# ---------------------------------------------------------------------------------------------
# Training curves and comparisons
# ---------------------------------------------------------------------------------------------


def phase_change_step(
    steps: Sequence[float],
    accuracy: Sequence[float],
    method: str = "steepest",
    threshold: float = 0.5,
    min_rise: float = 0.2,
) -> float | None:
    """Where the induction phase change happens in an accuracy curve.

    Methods:
        ``"steepest"`` (default): the middle of the interval between consecutive evaluations
        where accuracy rises fastest per step (the sudden jump of an induction bump).
        ``"threshold"``: the first evaluated step with accuracy >= ``threshold``.

    Returns None when nothing happened: accuracy never rose by ``min_rise`` above its first
    value (``"steepest"``) or never reached the threshold.
    """
    s = np.asarray(steps, dtype=np.float64)
    a = np.asarray(accuracy, dtype=np.float64)
    if s.shape != a.shape or s.ndim != 1:
        raise ValueError(f"steps and accuracy must be 1-D of equal length, got {s.shape} and "
                         f"{a.shape}")
    if method == "threshold":
        above = np.flatnonzero(a >= threshold)
        return float(s[above[0]]) if above.size else None
    if method != "steepest":
        raise ValueError(f"method={method!r} is not one of ['steepest', 'threshold']")
    if s.size < 2 or a.max() - a[0] < min_rise:
        return None
    rate = np.diff(a) / np.maximum(np.diff(s), 1e-12)
    i = int(np.argmax(rate))
    return float((s[i] + s[i + 1]) / 2)


def first_step_reaching(steps: Sequence[float], accuracy: Sequence[float],
                        target: float) -> float | None:
    """The first evaluated step whose accuracy is >= ``target`` (None if never)."""
    return phase_change_step(steps, accuracy, method="threshold", threshold=target)


def loss_curves(
    records: Sequence[Mapping[str, Any]],
    target: float | None = 0.9,
    phase_change: str | None = "steepest",
    title: str = "Training loss and evaluation accuracy",
) -> go.Figure:
    """Training loss and evaluation loss (left axis) and evaluation accuracy (right axis) over
    steps, with the induction phase change (:func:`phase_change_step`) as a dashed vertical line
    and the first step reaching ``target`` accuracy as a dotted one.

    Args:
        records: metrics.jsonl records (``kind`` "train" with ``train/loss``, "eval" with
            ``eval/loss`` and ``eval/accuracy``).
        target: accuracy target to mark (None: none).
        phase_change: ``"steepest"``, ``"threshold"`` (first step >= 50%) or None.
    """
    train = [r for r in records if r.get("kind") == "train" and "train/loss" in r]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not train and not evals:
        raise ValueError("no 'train' or 'eval' records to plot")
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    if train:
        fig.add_trace(go.Scatter(x=[r["step"] for r in train], y=[r["train/loss"] for r in train],
                                 mode="lines", name="train loss", meta={"series": "train/loss"},
                                 line=dict(color="#1f77b4", width=1.5)), secondary_y=False)
    eval_steps = [r["step"] for r in evals if "eval/accuracy" in r]
    accuracy = [r["eval/accuracy"] for r in evals if "eval/accuracy" in r]
    if any("eval/loss" in r for r in evals):
        fig.add_trace(go.Scatter(x=[r["step"] for r in evals if "eval/loss" in r],
                                 y=[r["eval/loss"] for r in evals if "eval/loss" in r],
                                 mode="lines+markers", name="eval loss", meta={"series": "eval/loss"},
                                 line=dict(color="#1f77b4", dash="dot"), marker=dict(size=4)),
                      secondary_y=False)
    if accuracy:
        fig.add_trace(go.Scatter(x=eval_steps, y=accuracy, mode="lines+markers",
                                 name="eval accuracy", meta={"series": "eval/accuracy"},
                                 line=dict(color="#d62728", width=2.5), marker=dict(size=5)),
                      secondary_y=True)
        if phase_change is not None:
            step = phase_change_step(eval_steps, accuracy, method=phase_change)
            if step is not None:
                fig.add_vline(x=step, line=dict(color="#2ca02c", dash="dash", width=2),
                              annotation_text=f"phase change ≈ step {step:g}",
                              annotation_position="top left")
                fig.layout.meta = {**(fig.layout.meta or {}), "phase_change": step}
        if target is not None:
            reached = first_step_reaching(eval_steps, accuracy, target)
            fig.add_hline(y=target, line=dict(color="#999", dash="dot", width=1), secondary_y=True)
            if reached is not None:
                fig.add_vline(x=reached, line=dict(color="#9467bd", dash="dot", width=1.5),
                              annotation_text=f"{target:.0%} at step {reached:g}",
                              annotation_position="bottom right")
            fig.layout.meta = {**(fig.layout.meta or {}), "steps_to_target": reached}
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(title_text="loss (nats)", secondary_y=False, rangemode="tozero")
    fig.update_yaxes(title_text="accuracy", secondary_y=True, range=[0, 1.02], tickmode="linear",
                     tick0=0, dtick=0.2, showgrid=False)
    fig.update_layout(title=title, template=TEMPLATE, height=420,
                      legend=dict(orientation="h", y=-0.2))
    return fig


def _steps_from_summary(summary: Mapping[str, Any]) -> tuple[dict[str, list], dict[str, list]]:
    """``(reached, censored)`` per group label from a sweep's summary.json dict: finished runs'
    steps to target, and the last step of finished runs that never reached it."""
    reached: dict[str, list] = {}
    censored: dict[str, list] = {}
    for g in summary.get("groups", []):
        label = g.get("label") or g["variant"]
        reached[label], censored[label] = [], []
    for r in summary.get("runs", []):
        if r.get("status") != "finished":
            continue
        label = r["variant"] if r.get("size") is None else f"{r['variant']}__{r['size']}"
        reached.setdefault(label, [])
        censored.setdefault(label, [])
        if r.get("steps_to_target") is not None:
            reached[label].append(r["steps_to_target"])
        else:
            censored[label].append(r.get("steps"))
    return reached, censored


def steps_to_accuracy(
    data: Mapping[str, Any],
    target: float | None = None,
    title: str | None = None,
) -> go.Figure:
    """Steps to the target accuracy per variant: a box with every run as a point.

    Args:
        data: ``{variant: [steps, ...]}`` (None for a run that never reached the target), or a
            sweep's summary.json dict (``{"groups": ..., "runs": ...}``), where runs that never
            reached the target are drawn at their last step as crosses ("> N").
        target: the accuracy, for the title.

    Returns:
        A figure with one box per variant (``name`` the variant, ``y`` its runs' steps to target)
        and one ``"not reached"`` trace per variant with censored runs.
    """
    if "groups" in data and "runs" in data:
        reached, censored = _steps_from_summary(data)
        if target is None:
            targets = {g.get("target_accuracy") for g in data["groups"]} - {None}
            target = targets.pop() if len(targets) == 1 else None
    else:
        reached = {k: [v for v in vals if v is not None] for k, vals in data.items()}
        censored = {k: [None for v in vals if v is None] for k, vals in data.items()}
    if not reached:
        raise ValueError("no variants to compare")
    fig = go.Figure()
    for i, (variant, values) in enumerate(reached.items()):
        n_cens = len(censored.get(variant, []))
        label = variant if not n_cens else f"{variant} ({n_cens} not reached)"
        fig.add_trace(go.Box(
            y=[float(v) for v in values], name=label, boxpoints="all", jitter=0.35, pointpos=0,
            marker=dict(color=_color(i), size=8), line=dict(color=_color(i)),
            meta={"variant": variant}, hovertemplate="%{y} steps<extra></extra>"))
        known = [c for c in censored.get(variant, []) if c is not None]
        if known:
            fig.add_trace(go.Scatter(
                x=[label] * len(known), y=[float(c) for c in known], mode="markers",
                name=f"{variant}: not reached (> last step)", showlegend=False,
                marker=dict(symbol="x", size=11, color=_color(i)),
                meta={"variant": variant, "censored": True},
                hovertemplate="not reached in %{y} steps<extra></extra>"))
    what = f"{target:.0%} accuracy" if target is not None else "the target accuracy"
    fig.update_layout(title=title or f"Steps to {what}", template=TEMPLATE, height=440,
                      showlegend=False, yaxis=dict(title="steps", rangemode="tozero"))
    return fig


# ---------------------------------------------------------------------------------------------
# Generic probe results
# ---------------------------------------------------------------------------------------------


def score_heatmap(
    scores: Any,
    title: str,
    zmin: float | None = None,
    zmax: float | None = None,
    colorscale: str = "Blues",
    colorbar_title: str = "score",
) -> go.Figure:
    """A layer x head heatmap of per-head scores (previous-token, induction, ... plain or
    effective), ``z[layer][head]`` equal to ``scores``, values written in each cell.

    Args:
        scores: ``[layer, head]`` tensor, array or nested list.
        zmin, zmax: colour range (default: the data's; pass 0 and 1 for scores in [0, 1]).
    """
    z = _as_array(scores, "scores", ndim=2)
    n_layers, n_heads = z.shape
    fig = go.Figure(go.Heatmap(
        z=z.tolist(), x=list(range(n_heads)), y=list(range(n_layers)), zmin=zmin, zmax=zmax,
        colorscale=colorscale, texttemplate="%{z:.2f}", colorbar=dict(title=colorbar_title),
        hovertemplate="layer %{y}, head %{x}: %{z:.4f}<extra></extra>"))
    fig.update_layout(title=title, template=TEMPLATE, height=max(260, 60 * n_layers + 160),
                      xaxis=dict(title="head", dtick=1),
                      yaxis=dict(title="layer", dtick=1, autorange="reversed"))
    return fig


def ablation_bars(
    drops: Mapping[str, float],
    title: str = "Effect of ablations",
    y_title: str = "loss increase (nats)",
    sort: bool = True,
) -> go.Figure:
    """One bar per ablation (``{name: effect}``, e.g. ``{"L0H1": 1.3}``), largest first when
    ``sort``; increases are red, decreases blue."""
    if not drops:
        raise ValueError("no ablations to plot")
    items = list(drops.items())
    if sort:
        items.sort(key=lambda kv: -float(kv[1]))
    names = [str(k) for k, _ in items]
    values = [float(v) for _, v in items]
    fig = go.Figure(go.Bar(
        x=names, y=values, marker_color=["#d62728" if v >= 0 else "#1f77b4" for v in values],
        texttemplate="%{y:.3g}", textposition="outside",
        hovertemplate="%{x}: %{y:.4f}<extra></extra>"))
    fig.update_layout(title=title, template=TEMPLATE, height=400,
                      xaxis=dict(title="ablation"), yaxis=dict(title=y_title))
    return fig


# ---------------------------------------------------------------------------------------------
# The loss landscape (PAPER.md item 5, Fig. 2)
# ---------------------------------------------------------------------------------------------


def landscape_figure(
    landscape: Any,
    points: Mapping[str, tuple[float, float]] | None = None,
    paths: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
    arrow_stride: int = 1,
    title: str | None = None,
) -> go.Figure:
    """The loss landscape as contours, arrows along the negative gradient (the direction gradient
    descent moves, all of one length: directions, as in the paper's Fig. 2), and the trained heads.

    The axes follow ``landscape.coords``: ``"mix"`` (the key's and value's share of the current
    position, at each head's own gain: see :mod:`kvshift_lens.viz.landscape`) or ``"raw"`` (alpha1
    with alpha2 = 1 - alpha1, beta likewise). ``points`` and ``paths`` must be in the same
    coordinates (:func:`kvshift_lens.viz.landscape.current_share` converts raw coefficients).

    Args:
        landscape: a :class:`~kvshift_lens.viz.landscape.Landscape` (or anything with ``a1``
            ``[n_a]``, ``b1`` ``[n_b]``, ``loss`` ``[n_a, n_b]`` and ``grad`` ``[n_a, n_b, 2]`` or
            None, plus optionally ``positions`` and ``layer``/``heads``).
        points: ``{label: (a, b)}`` to mark (default: ``landscape.positions``, the moved heads'
            own coefficients in the landscape's coordinates).
        paths: ``{label: (as, bs)}`` trajectories to draw (e.g. over training).
        arrow_stride: draw an arrow at every n-th grid point along each axis.

    Returns:
        A figure whose contour trace has ``z[j][i] = loss[i, j]`` (rows are beta1), a
        ``"descent direction"`` trace of arrow segments, and a ``"heads"`` trace with the points.
    """
    import plotly.figure_factory as ff

    coords = getattr(landscape, "coords", "raw")
    xn, yn = ("key share", "value share") if coords == "mix" else ("α1", "β1")

    a1 = _as_array(landscape.a1, "a1", ndim=1)
    b1 = _as_array(landscape.b1, "b1", ndim=1)
    loss = _as_array(landscape.loss, "loss", ndim=2)
    if loss.shape != (a1.size, b1.size):
        raise ValueError(f"loss must be [len(a1), len(b1)] = [{a1.size}, {b1.size}], got "
                         f"{loss.shape}")
    fig = go.Figure(go.Contour(
        x=a1.tolist(), y=b1.tolist(), z=loss.T.tolist(), colorscale="Viridis", ncontours=24,
        contours=dict(coloring="heatmap", showlabels=True, labelfont=dict(size=9, color="white")),
        colorbar=dict(title="loss"), name="loss", meta={"role": "loss"},
        hovertemplate=f"{xn} %{{x:.2f}}, {yn} %{{y:.2f}}<br>loss %{{z:.4f}}<extra></extra>"))
    grad = getattr(landscape, "grad", None)
    if grad is not None:
        g = _as_array(grad, "grad", ndim=3)[::arrow_stride, ::arrow_stride]
        ga, gb = np.meshgrid(a1[::arrow_stride], b1[::arrow_stride], indexing="ij")
        norm = np.hypot(g[..., 0], g[..., 1])
        ok = norm > 0
        step = min(np.ptp(a1), np.ptp(b1)) / max(len(a1[::arrow_stride]), 2) * 0.8
        u = np.where(ok, -g[..., 0] / np.where(ok, norm, 1), 0) * step
        v = np.where(ok, -g[..., 1] / np.where(ok, norm, 1), 0) * step
        quiver = ff.create_quiver(ga[ok].ravel(), gb[ok].ravel(), u[ok].ravel(), v[ok].ravel(),
                                  scale=1.0, arrow_scale=0.3, line=dict(color="white", width=1))
        arrows = quiver.data[0]
        arrows.update(name="descent direction", meta={"role": "arrows"}, hoverinfo="skip",
                      showlegend=True)
        fig.add_trace(arrows)
    for i, (label, (xs, ys)) in enumerate((paths or {}).items()):
        fig.add_trace(go.Scatter(
            x=list(xs), y=list(ys), mode="lines+markers", name=f"{label} during training",
            line=dict(color=_color(i), width=2), marker=dict(size=4), meta={"path": label},
            hovertemplate=f"{label}<br>{xn} %{{x:.3f}}, {yn} %{{y:.3f}}<extra></extra>"))
    if points is None:
        points = getattr(landscape, "positions", None) or {}
    if points:
        labels = list(points)
        fig.add_trace(go.Scatter(
            x=[float(points[k][0]) for k in labels], y=[float(points[k][1]) for k in labels],
            mode="markers+text", text=labels, textposition="top right", name="trained heads",
            textfont=dict(color="white"), meta={"role": "heads"},
            marker=dict(size=14, color=[_color(i) for i in range(len(labels))],
                        line=dict(color="white", width=2)),
            hovertemplate=f"%{{text}}<br>{xn} %{{x:.3f}}, {yn} %{{y:.3f}}<extra></extra>"))
    _reference_points(fig, text_color="white")
    if title is None:
        heads = getattr(landscape, "heads", None)
        layer = getattr(landscape, "layer", None)
        what = "" if heads is None else (
            f": layer {layer}, head{'s' if len(heads) > 1 else ''} "
            + ", ".join(str(h) for h in heads))
        title = (f"Loss landscape over the keys' and values' share of the current position, at "
                 f"each head's own gain{what}" if coords == "mix" else
                 f"Loss landscape over (α1, β1), α2 = 1 - α1, β2 = 1 - β1{what}")
    pad_a, pad_b = 0.02 * np.ptp(a1), 0.02 * np.ptp(b1)
    xt, yt = _axis_titles(coords)
    fig.update_layout(
        title=dict(text=title, font=dict(size=14)), template=TEMPLATE, height=640, width=820,
        legend=dict(orientation="h", y=-0.15),
        xaxis=dict(title=xt, constrain="domain",
                   range=[a1.min() - pad_a, a1.max() + pad_a]),
        yaxis=dict(title=yt, constrain="domain",
                   range=[b1.min() - pad_b, b1.max() + pad_b], scaleanchor="x", scaleratio=1))
    return fig


# ---------------------------------------------------------------------------------------------
# Several seeds at once (the reproductions)
# ---------------------------------------------------------------------------------------------


def seed_band_curves(
    series: Mapping[str, tuple[Sequence[float], Any]],
    title: str,
    y_title: str,
    y_range: Sequence[float] | None = None,
    hline: float | None = None,
) -> go.Figure:
    """One median line per series with a shaded band from the minimum to the maximum over seeds.

    Args:
        series: ``{label: (steps, values)}`` with ``values`` ``[n_seeds, len(steps)]`` (NaN where
            a seed has no value at that step; such entries are ignored).
        hline: a horizontal reference line (e.g. the accuracy target), or None.
    """
    if not series:
        raise ValueError("no series to plot")
    fig = go.Figure()
    for i, (label, (steps, values)) in enumerate(series.items()):
        v = _as_array(values, f"values of {label!r}", ndim=2)
        x = [float(s) for s in steps]
        if v.shape[1] != len(x):
            raise ValueError(f"values of {label!r} have {v.shape[1]} steps, steps has {len(x)}")
        ok = ~np.isnan(v).all(axis=0)
        x = [s for s, keep in zip(x, ok, strict=True) if keep]
        v = v[:, ok]
        med, lo, hi = (np.nanmedian(v, 0), np.nanmin(v, 0), np.nanmax(v, 0))
        color = _color(i)
        fig.add_trace(go.Scatter(x=x + x[::-1], y=hi.tolist() + lo[::-1].tolist(), fill="toself",
                                 fillcolor=color, opacity=0.18, line=dict(width=0),
                                 hoverinfo="skip", showlegend=False, meta={"band": label}))
        fig.add_trace(go.Scatter(x=x, y=med.tolist(), mode="lines",
                                 name=f"{label} (median of {v.shape[0]})",
                                 line=dict(color=color, width=2.5), meta={"series": label}))
    if hline is not None:
        fig.add_hline(y=hline, line=dict(color="#999", dash="dot", width=1))
    fig.update_layout(title=title, template=TEMPLATE, height=420, width=820,
                      xaxis=dict(title="step"), yaxis=dict(title=y_title),
                      legend=dict(orientation="h", y=-0.2))
    if y_range is not None:
        fig.update_yaxes(range=list(y_range))
    return fig


def seed_points(
    groups: Mapping[str, Mapping[str, Sequence[float]]],
    title: str,
    x_title: str,
    y_title: str,
    y_range: Sequence[float] | None = None,
    hline: float | None = None,
) -> go.Figure:
    """Medians with min-max error bars and every seed as a faint dot, over categories.

    Args:
        groups: ``{series: {category: [value per seed]}}``; categories keep their order.
    """
    if not groups:
        raise ValueError("no groups to plot")
    fig = go.Figure()
    for i, (label, cats) in enumerate(groups.items()):
        color = _color(i)
        xs, med, lo, hi, dots_x, dots_y = [], [], [], [], [], []
        for cat, vals in cats.items():
            vals = [float(v) for v in vals if v is not None and np.isfinite(v)]
            if not vals:
                continue
            m = float(np.median(vals))
            xs.append(cat)
            med.append(m)
            lo.append(m - min(vals))
            hi.append(max(vals) - m)
            dots_x += [cat] * len(vals)
            dots_y += vals
        fig.add_trace(go.Scatter(
            x=xs, y=med, mode="lines+markers", name=label, meta={"series": label},
            line=dict(color=color, width=2), marker=dict(size=9),
            error_y=dict(type="data", symmetric=False, array=hi, arrayminus=lo, thickness=1.2)))
        fig.add_trace(go.Scatter(x=dots_x, y=dots_y, mode="markers", showlegend=False,
                                 marker=dict(color=color, size=5, opacity=0.45),
                                 hoverinfo="y", meta={"seeds": label}))
    if hline is not None:
        fig.add_hline(y=hline, line=dict(color="#999", dash="dot", width=1))
    fig.update_layout(title=title, template=TEMPLATE, height=420, width=820,
                      xaxis=dict(title=x_title, type="category"), yaxis=dict(title=y_title),
                      legend=dict(orientation="h", y=-0.2))
    if y_range is not None:
        fig.update_yaxes(range=list(y_range))
    return fig


__all__ = [
    "INDUCTION_POINT",
    "VANILLA_POINT",
    "ablation_bars",
    "as_coefficient_arrays",
    "coefficient_heatmaps",
    "coefficient_label",
    "coefficient_plane",
    "coefficient_trajectories",
    "eval_coefficients",
    "eval_records",
    "first_step_reaching",
    "head_label",
    "landscape_figure",
    "loss_curves",
    "phase_change_step",
    "score_heatmap",
    "seed_band_curves",
    "seed_points",
    "steps_to_accuracy",
]
