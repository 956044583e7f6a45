"""The circuit figure on plain data with known content: every edge drawn once, where its nodes are,
sized and coloured by its score, shift edges dashed and labelled."""

from __future__ import annotations

import json

import plotly.graph_objects as go
import pytest
import torch
from plotly.colors import sample_colorscale

from kvshift_lens.viz.circuit import circuit_figure

EDGES = [
    {"sender": "embed", "receiver": "L0H3", "port": "k_shift", "score": -2.0},
    {"sender": "embed", "receiver": "L0H3", "port": "v", "score": -4.0},
    {"sender": "L0H3", "receiver": "L1H1", "port": "k", "score": 1.0},
    {"sender": "MLP0", "receiver": "L1H1", "port": "q", "score": 0.0},
    {"sender": "L1H1", "receiver": "logits", "port": "logits", "score": -3.0},
]


def _edge_traces(fig: go.Figure) -> dict[str, go.Scatter]:
    return {t.meta["label"]: t for t in fig.data if isinstance(t.meta, dict) and "label" in t.meta}


def _node_trace(fig: go.Figure) -> go.Scatter:
    (trace,) = [t for t in fig.data if isinstance(t.meta, dict) and "nodes" in t.meta]
    return trace


def test_every_edge_once_between_its_nodes_with_width_and_colour_by_score():
    fig = circuit_figure(EDGES)
    traces = _edge_traces(fig)
    assert set(traces) == {f"{e['receiver']} <- {e['sender']} via {e['port']}" for e in EDGES}
    nodes = _node_trace(fig)
    xy = {n: (x, y) for n, x, y in zip(nodes.meta["nodes"], nodes.x, nodes.y)}
    # left to right by layer: embed 0, L0 heads 1, MLP0 2, L1 heads 3, logits after the last layer
    assert {n: x for n, (x, _) in xy.items()} == {"embed": 0, "L0H3": 1, "MLP0": 2, "L1H1": 3, "logits": 5}
    assert xy["L0H3"][1] == -3 and xy["L1H1"][1] == -1  # heads top to bottom by index
    for e in EDGES:
        t = traces[f"{e['receiver']} <- {e['sender']} via {e['port']}"]
        assert (t.x[0], t.y[0]) == xy[e["sender"]] and (t.x[-1], t.y[-1]) == xy[e["receiver"]]
        assert t.meta["score"] == e["score"]
    widths = {label: t.line.width for label, t in traces.items()}
    by_magnitude = sorted(EDGES, key=lambda e: abs(e["score"]))
    ordered = [widths[f"{e['receiver']} <- {e['sender']} via {e['port']}"] for e in by_magnitude]
    assert ordered == sorted(ordered) and ordered[0] == 1.0 and ordered[-1] == 8.0
    # colour: the scale is centred on 0 and reaches the largest |score|
    assert traces["L0H3 <- embed via v"].line.color == sample_colorscale("RdBu", [0.0])[0]
    assert traces["L1H1 <- MLP0 via q"].line.color == sample_colorscale("RdBu", [0.5])[0]
    assert traces["L1H1 <- L0H3 via k"].line.color == sample_colorscale("RdBu", [0.625])[0]
    (bar,) = [t for t in fig.data if isinstance(t.meta, dict) and t.meta.get("colorbar")]
    assert (bar.marker.cmin, bar.marker.cmax) == (-4.0, 4.0)
    json.loads(fig.to_json())  # serialisable


def test_shift_edges_are_dashed_labelled_and_apart_from_the_own_path():
    edges = [{"sender": "embed", "receiver": "L0H0", "port": p, "score": 1.0}
             for p in ("k", "k_shift", "v", "v_shift")]
    fig = circuit_figure(edges)
    traces = _edge_traces(fig)
    dashes = {t.meta["port"]: t.line.dash for t in traces.values()}
    assert dashes == {"k": "solid", "k_shift": "dash", "v": "solid", "v_shift": "dash"}
    assert sorted(a.text for a in fig.layout.annotations) == ["k_shift", "v_shift"]
    # four distinct curves between the same two nodes
    middles = {t.meta["port"]: t.y[len(t.y) // 2] for t in traces.values()}
    assert len(set(middles.values())) == 4


def test_given_nodes_and_columns_are_used_and_isolated_nodes_drawn():
    nodes = [{"name": "embed", "column": 0}, {"name": "A", "column": 4, "kind": "head", "index": 2},
             {"name": "logits", "column": 9}]
    edges = [{"sender": "embed", "receiver": "logits", "port": "logits", "score": None}]
    fig = circuit_figure(edges, nodes=nodes, title="hand-made")
    trace = _node_trace(fig)
    assert dict(zip(trace.meta["nodes"], trace.x)) == {"embed": 0, "A": 4, "logits": 9}
    (edge,) = _edge_traces(fig).values()
    assert edge.meta["score"] is None and edge.line.color == "#888888"
    assert not [t for t in fig.data if isinstance(t.meta, dict) and t.meta.get("colorbar")]
    assert fig.layout.title.text == "hand-made"


def test_a_circuit_from_edge_attribution_draws():
    from probes.eap import edge_attribution
    from tests.probes import shift_head_model

    g = torch.Generator().manual_seed(0)
    first = torch.stack([torch.randperm(12, generator=g)[:6] for _ in range(2)])
    clean = torch.cat([first, first], 1)
    corrupted = clean.clone()
    corrupted[:, :6] = torch.stack([torch.randperm(12, generator=g)[:6] for _ in range(2)])
    model = shift_head_model(12, 12)
    with torch.no_grad():
        model.blocks[0].attn.W_Q.mul_(0.1)
    scores = edge_attribution(model, clean, corrupted, lambda logits: logits[:, 6:-1].gather(
        -1, clean[:, 7:, None])[..., 0].mean())
    circuit = scores.circuit(top_k=3)
    fig = circuit_figure(**circuit.plot_data())
    traces = _edge_traces(fig)
    assert set(traces) == set(circuit.labels)
    assert "L0H0 <- embed via k_shift" in traces and traces["L0H0 <- embed via k_shift"].line.dash == "dash"


def test_bad_data_is_named():
    with pytest.raises(ValueError, match="'L9H0' is not among the nodes"):
        circuit_figure([{"sender": "embed", "receiver": "L9H0", "port": "q", "score": 1.0}],
                       nodes=[{"name": "embed", "column": 0}])
    with pytest.raises(ValueError, match="non-finite score"):
        circuit_figure([{"sender": "embed", "receiver": "L0H0", "port": "q", "score": float("nan")}])
    with pytest.raises(ValueError, match="not a number"):
        circuit_figure([{"sender": "embed", "receiver": "L0H0", "port": "q", "score": "big"}])
    with pytest.raises(ValueError, match="sender, receiver and port"):
        circuit_figure([{"sender": "embed", "port": "q"}])
    with pytest.raises(ValueError, match="cannot place node 'resid'"):
        circuit_figure([{"sender": "resid", "receiver": "L0H0", "port": "q", "score": 1.0}])
    with pytest.raises(ValueError, match="listed twice"):
        circuit_figure([], nodes=[{"name": "embed"}, {"name": "embed"}])
    with pytest.raises(ValueError, match="min_width"):
        circuit_figure(EDGES, min_width=0)
