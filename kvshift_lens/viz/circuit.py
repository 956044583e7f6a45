"""A circuit drawn as a graph: components left to right by layer, edges sized and coloured by score.

Plain data in, a ``plotly`` figure out (nothing here reads a model or runs a probe):

- ``nodes``: mappings with ``name`` and optionally ``column`` (x position), ``kind`` ("embed",
  "head", "kv_head", "mlp", "logits"), ``layer`` and ``index`` (the head within its layer). Without
  ``nodes`` (or without a ``column``) a node is placed from its name: ``embed`` at 0, ``L{l}H{h}``
  at ``2l + 1``, ``L{l}KV{g}`` (a key/value head under grouped-query attention) just left of it,
  ``MLP{l}`` at ``2l + 2``, ``logits`` after the last layer.
- ``edges``: mappings with ``sender``, ``receiver``, ``port`` ("q", "k", "v", "mlp", "logits", or a
  shift port "q_shift" / "k_shift" / "v_shift": the path through the previous positions' queries,
  keys or values of a KV-shift head), ``score`` (a float, or None) and optionally ``label``.

Edge width grows with ``|score|``; colour runs from red (negative) through white to blue
(positive) on a scale centred on 0 (a colour bar shows it). Edges between the same two nodes
through different ports are drawn as separate curves; shift edges are dashed and labelled with
their port at the middle of the curve, so "L0H3 reads the previous token through its key shift"
is visible at a glance. Every edge trace carries ``meta = {"label", "sender", "receiver", "port",
"shift", "score"}``; the node trace carries ``meta = {"nodes": [names]}``.

``probes.eap.Circuit.plot_data()`` returns exactly these two lists:
``circuit_figure(**circuit.plot_data())``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.colors import sample_colorscale

TEMPLATE = "plotly_white"
COLORSCALE = "RdBu"
SHIFT_PORTS = ("q_shift", "k_shift", "v_shift")
# Sideways bend of each port's curve (as a fraction of the edge length), so that parallel edges
# through different ports of one head stay apart.
PORT_BEND = {"q": 0.22, "q_shift": 0.32, "k": 0.0, "k_shift": 0.1, "v": -0.22, "v_shift": -0.12,
             "mlp": 0.0, "logits": 0.0}
NODE_COLORS = {"embed": "#4c78a8", "head": "#f58518", "kv_head": "#e45756", "mlp": "#54a24b",
               "logits": "#b279a2"}
_NAME_PATTERNS = [
    (re.compile(r"L(\d+)H(\d+)"), "head"),
    (re.compile(r"L(\d+)KV(\d+)"), "kv_head"),
    (re.compile(r"MLP(\d+)"), "mlp"),
]


def _parse_name(name: str) -> dict[str, Any]:
    if name in ("embed", "logits"):
        return {"name": name, "kind": name, "layer": None, "index": None}
    for pattern, kind in _NAME_PATTERNS:
        m = pattern.fullmatch(name)
        if m:
            groups = [int(g) for g in m.groups()]
            return {"name": name, "kind": kind, "layer": groups[0],
                    "index": groups[1] if len(groups) > 1 else None}
    raise ValueError(f"cannot place node {name!r} from its name (expected embed, logits, L<l>H<h>, "
                     "L<l>KV<g> or MLP<l>); pass nodes=[{'name': ..., 'column': ...}, ...]")


def _default_column(node: Mapping[str, Any], n_layers: int) -> float:
    kind, layer = node.get("kind"), node.get("layer")
    if kind == "embed":
        return 0.0
    if kind == "logits":
        return 2.0 * n_layers + 1
    if layer is None:
        raise ValueError(f"node {node['name']!r} of kind {kind!r} needs a layer or a column")
    return {"mlp": 2.0 * layer + 2, "kv_head": 2.0 * layer + 0.6}.get(kind, 2.0 * layer + 1)


def _layout_nodes(nodes: Sequence[Mapping[str, Any]] | None,
                  edges: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{name: node dict with x and y}``."""
    if nodes is None:
        names = list(dict.fromkeys(n for e in edges for n in (e["sender"], e["receiver"])))
        nodes = [_parse_name(n) for n in names]
    out: dict[str, dict[str, Any]] = {}
    for n in nodes:
        if not isinstance(n, Mapping) or "name" not in n:
            raise ValueError(f"every node must be a mapping with a 'name', got {n!r}")
        if n["name"] in out:
            raise ValueError(f"node {n['name']!r} is listed twice")
        merged = dict(n)
        if merged.get("kind") is None and merged.get("column") is None:
            merged = {**_parse_name(n["name"]), **{k: v for k, v in n.items() if v is not None}}
        out[n["name"]] = merged
    layers = [n["layer"] for n in out.values() if isinstance(n.get("layer"), int)]
    n_layers = max(layers) + 1 if layers else 0
    indices = [n["index"] for n in out.values() if isinstance(n.get("index"), int)]
    middle = (max(indices) / 2) if indices else 0.0
    for n in out.values():
        column = n.get("column")
        x = _default_column(n, n_layers) if column is None else float(column)
        if not math.isfinite(x):
            raise ValueError(f"node {n['name']!r} has a non-finite column {column!r}")
        n["x"] = x
        n["y"] = -float(n["index"]) if isinstance(n.get("index"), int) else -middle
    return out


def _curve(x0: float, y0: float, x1: float, y1: float, bend: float,
           n: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """A quadratic Bezier from (x0, y0) to (x1, y1) whose control point sits ``bend`` x the chord
    length to the left of the chord's middle."""
    dx, dy = x1 - x0, y1 - y0
    length = math.hypot(dx, dy) or 1.0
    cx, cy = (x0 + x1) / 2 - bend * dy, (y0 + y1) / 2 + bend * dx
    if length == 0:
        cx, cy = x0 + 0.3, y0 + 0.3
    t = np.linspace(0.0, 1.0, n)
    xs = (1 - t) ** 2 * x0 + 2 * (1 - t) * t * cx + t ** 2 * x1
    ys = (1 - t) ** 2 * y0 + 2 * (1 - t) * t * cy + t ** 2 * y1
    return xs, ys


def _score(edge: Mapping[str, Any]) -> float | None:
    s = edge.get("score")
    if s is None:
        return None
    try:
        s = float(s)
    except (TypeError, ValueError):
        raise ValueError(f"edge {edge.get('label', edge)!r} has a score {s!r} that is not a number") from None
    if not math.isfinite(s):
        raise ValueError(f"edge {edge.get('label', edge)!r} has a non-finite score {s}")
    return s


def circuit_figure(
    edges: Sequence[Mapping[str, Any]],
    nodes: Sequence[Mapping[str, Any]] | None = None,
    title: str = "Circuit",
    max_width: float = 8.0,
    min_width: float = 1.0,
) -> go.Figure:
    """Draw a circuit (see the module docstring for the data).

    Args:
        edges: the circuit's edges (``sender``, ``receiver``, ``port``, ``score``; ``label``
            optional, default ``"receiver <- sender via port"``; ``shift`` optional, default: the
            port is a shift port).
        nodes: the nodes to draw (default: every edge end, placed from its name). Nodes without
            edges are drawn too.
        title: the figure title.
        max_width, min_width: line widths for the largest ``|score|`` and for a score of 0 (an
            edge without a score gets the mean of the two).

    Returns:
        a ``plotly`` figure: one line trace per edge, one marker trace for the nodes, and a hidden
        trace that holds the colour bar (when any edge has a score).

    Raises:
        ValueError: an edge without sender/receiver/port, an edge whose end is not among
            ``nodes``, a score that is not a finite number, or a node that cannot be placed.
    """
    if not 0 < min_width <= max_width:
        raise ValueError(f"need 0 < min_width <= max_width, got {min_width} and {max_width}")
    edges = list(edges)
    for e in edges:
        if not isinstance(e, Mapping) or any(k not in e for k in ("sender", "receiver", "port")):
            raise ValueError(f"every edge must be a mapping with sender, receiver and port, got {e!r}")
    placed = _layout_nodes(nodes, edges)
    for e in edges:
        for end in ("sender", "receiver"):
            if e[end] not in placed:
                raise ValueError(f"edge {e.get('label', e)!r}: its {end} {e[end]!r} is not among the "
                                 f"nodes {sorted(placed)}")
    scores = [_score(e) for e in edges]
    bound = max([abs(s) for s in scores if s is not None] + [0.0])
    scale = bound if bound > 0 else 1.0

    fig = go.Figure()
    for e, s in zip(edges, scores):
        a, b = placed[e["sender"]], placed[e["receiver"]]
        port = str(e["port"])
        shift = bool(e.get("shift", port in SHIFT_PORTS))
        label = e.get("label") or f"{e['receiver']} <- {e['sender']} via {port}"
        xs, ys = _curve(a["x"], a["y"], b["x"], b["y"], PORT_BEND.get(port, 0.05))
        if s is None:
            width, color = (min_width + max_width) / 2, "#888888"
        else:
            width = min_width + (max_width - min_width) * abs(s) / scale
            color = sample_colorscale(COLORSCALE, [0.5 + 0.5 * s / scale])[0]
        score_text = "no score" if s is None else f"score {s:+.4g}"
        fig.add_trace(go.Scatter(
            x=xs.tolist(), y=ys.tolist(), mode="lines", name=port, legendgroup=port,
            showlegend=False, line={"width": width, "color": color, "dash": "dash" if shift else "solid"},
            hoverinfo="text", text=[f"{label}<br>{score_text}"] * len(xs),
            meta={"label": label, "sender": e["sender"], "receiver": e["receiver"], "port": port,
                  "shift": shift, "score": s},
        ))
        if shift:
            mid = len(xs) // 2
            fig.add_annotation(x=float(xs[mid]), y=float(ys[mid]), text=port, showarrow=False,
                               font={"size": 10, "color": "#333"}, bgcolor="rgba(255,255,255,0.8)")

    names = list(placed)
    fig.add_trace(go.Scatter(
        x=[placed[n]["x"] for n in names], y=[placed[n]["y"] for n in names], mode="markers+text",
        text=names, textposition="top center", hoverinfo="text", showlegend=False,
        marker={"size": 16, "color": [NODE_COLORS.get(placed[n].get("kind"), "#999") for n in names],
                "line": {"width": 1, "color": "#333"}},
        meta={"nodes": names},
    ))
    if any(s is not None for s in scores):
        fig.add_trace(go.Scatter(
            x=[None], y=[None], mode="markers", showlegend=False, hoverinfo="skip",
            marker={"colorscale": COLORSCALE, "cmin": -scale, "cmax": scale, "color": [0.0],
                    "showscale": True, "colorbar": {"title": {"text": "score"}}},
            meta={"colorbar": True},
        ))
    columns = sorted({placed[n]["x"] for n in names})
    fig.update_layout(
        title=title, template=TEMPLATE, hovermode="closest",
        xaxis={"showgrid": False, "zeroline": False, "tickvals": columns,
               "ticktext": [_column_label(c, placed) for c in columns]},
        yaxis={"showgrid": False, "zeroline": False, "showticklabels": False},
    )
    return fig


def _column_label(x: float, placed: Mapping[str, Mapping[str, Any]]) -> str:
    kinds = {n.get("kind") for n in placed.values() if n["x"] == x}
    layers = {n.get("layer") for n in placed.values() if n["x"] == x and n.get("layer") is not None}
    if kinds <= {"embed"}:
        return "embed"
    if kinds <= {"logits"}:
        return "logits"
    what = "MLP" if kinds <= {"mlp"} else "K/V heads" if kinds <= {"kv_head"} else "heads"
    return f"L{min(layers)} {what}" if layers else what


__all__ = ["circuit_figure"]
