"""Edge attribution patching over a component graph whose edges know the KV shift.

**The graph.** The residual stream is a sum of what components write into it, so every component
that reads it reads a sum over the components before it. Nodes:

- senders: ``embed`` (token embedding, plus the learned positional embedding when the model adds
  one to the residual stream), every head ``L{l}H{h}`` (its ``hook_result``), every MLP ``MLP{l}``
  (its ``hook_mlp_out``);
- receivers, each through one or more input *ports*: a head's ``q``, ``k`` and ``v`` (the
  per-head residual inputs ``hook_q_input`` / ``hook_k_input`` / ``hook_v_input``, before the
  norm), an MLP's input (``hook_mlp_in``), and ``logits`` (the final residual stream).

An edge ``u -> d via port`` is the part of port's input that ``u`` wrote. Under grouped-query
attention, keys and values belong to KV heads: their ports sit on nodes ``L{l}KV{g}``.

**The shift edges.** A shifted head reads the residual stream at two positions through its keys:
``K'_t = c_0 K_t + c_1 K_{t-1}`` (window 1; ``c`` = ``hook_shift_k``). So its ``k`` input splits
into two ports: ``k`` (the own-position path, through ``c_0 K_t``) and ``k_shift`` (the path
through the earlier positions' keys, ``sum_{l >= 1} c_l K_{t-l}``); likewise ``v`` / ``v_shift``
and, when queries are shifted, ``q`` / ``q_shift``. With ``g' = dM/dK'``, the gradient reaching
``K_t`` splits as ``dM/dK_t = c_0 g'_t + sum_{l>=1} c_l g'_{t+l}``: the own part and the shift
part, each pulled back through the same norm and projection to the port's input. An edge
``embed -> L0H3 via k_shift`` reads "L0H3's keys describe the previous token".

**Scores** (Syed et al. 2023; the noising convention): for edge ``u -> d via p``,
``score = sum over batch, positions, d_model of (u_corrupted - u_clean) . dM/d(input of p)``
with the gradient on the clean run: the first-order estimate of ``M(clean, edge corrupted) -
M(clean)``. One corrupted forward and one clean forward + backward score every edge (plus, for each
shifted projection, a backward through just its norm and projection to split the gradient).
``method="eap-ig"`` (Hanna et al. 2024) averages the gradient over ``ig_steps`` runs whose input
embeddings move from the corrupted to the clean ones (``corrupted + k/m (clean - corrupted)``,
``k = 1..m``): ``m`` forward + backward passes; it stays informative where attention saturates and
plain gradients vanish.

**Circuits and faithfulness** (Conmy et al. 2023): a circuit is a set of edges; running it means
running the clean input while every edge *outside* it carries its corrupted value: at each port,
``input - sum over removed edges u of (u_this_run - u_corrupted)``. A shifted head whose ``k`` and
``k_shift`` ports keep different edges gets two different key inputs: its ``hook_k_shifted`` is
recomputed as ``c_0 K(own input)_t + sum_{l>=1} c_l K(shift input)_{t-l}`` (the norm and ``W_K``,
``b_K`` applied to the shift port's input). Faithfulness ``(M(circuit) - M(corrupted)) /
(M(clean) - M(corrupted))`` is 1 for the full graph and 0 for the empty graph, by construction.

The graph runs the model with ``use_split_qkv_input``, ``use_attn_result`` and ``use_hook_mlp_in``
on (restored afterwards). Supported: any number of layers, MLPs (sequential or parallel), norms,
grouped-query attention, rotary with the shift before rotation (``shift_position="pre_rotary"``).
Not supported (ValueError): shortformer positions (added after the norm, outside the residual
stream) and shifted projections with ``shift_position="post_rotary"``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from probes._hooks import model_dims, prepare_tokens, require_hooks
from probes.attribution import MetricFn, capture_hooks

logger = logging.getLogger(__name__)

METHODS = ("eap", "eap-ig")
PROJECTIONS = ("q", "k", "v")
SHIFT_PORTS = tuple(f"{w}_shift" for w in PROJECTIONS)


# ------------------------------------------------------------------------------------------ graph
@dataclass(frozen=True)
class Node:
    """A component. ``kind``: "embed", "head", "kv_head" (a key/value head's ports under grouped-
    query attention), "mlp" or "logits"; ``layer`` None for embed and logits; ``index`` the head
    (or KV head) within its layer."""

    name: str
    kind: str
    layer: int | None = None
    index: int | None = None


@dataclass(frozen=True)
class Port:
    """One input of a receiver: ``port`` in q, k, v, q_shift, k_shift, v_shift, mlp, logits."""

    receiver: str
    port: str
    layer: int | None = None
    index: int | None = None

    @property
    def projection(self) -> str | None:
        """"q", "k" or "v" for attention ports, None for MLP and logits inputs."""
        return self.port[0] if self.port[0] in PROJECTIONS else None


@dataclass(frozen=True)
class Edge:
    """``sender -> receiver`` through ``port``."""

    sender: str
    receiver: str
    port: str

    @property
    def label(self) -> str:
        """``"L0H3 <- embed via k_shift"``."""
        return f"{self.receiver} <- {self.sender} via {self.port}"

    @property
    def is_shift(self) -> bool:
        """True for the paths through earlier positions' q/k/v (the shift edges)."""
        return self.port in SHIFT_PORTS


def head_name(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def _cfg(model: Any, name: str, default: Any = None) -> Any:
    return getattr(model.cfg, name, default)


def _n_kv(model: Any) -> int:
    _, n_heads = model_dims(model)
    n_kv = _cfg(model, "n_key_value_heads")
    return n_heads if n_kv is None else int(n_kv)


@dataclass(frozen=True)
class ComponentGraph:
    """Nodes, receiver ports and every edge from a sender to a port downstream of it.

    ``senders`` and ``ports`` fix the order of the ``[sender, port]`` score matrix; ``edges`` lists
    the allowed (sender, port) pairs in port order, then sender order; ``edge_index`` is
    ``[edge, 2]`` (sender index, port index).
    """

    nodes: tuple[Node, ...]
    senders: tuple[str, ...]
    ports: tuple[Port, ...]
    edges: tuple[Edge, ...]
    edge_index: Int[Tensor, "edge 2"]
    n_layers: int
    n_heads: int
    n_kv_heads: int
    shifted: dict[int, tuple[str, ...]]
    has_mlp: bool
    parallel_mlp: bool
    pos_in_residual: bool
    _edge_pos: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_model(cls, model: Any) -> ComponentGraph:
        """The component graph of a TransformerLens-style model (see the module docstring).

        Raises:
            ValueError: for a configuration the graph cannot represent (named).
        """
        n_layers, n_heads = model_dims(model)
        n_kv = _n_kv(model)
        pos_type = _cfg(model, "positional_embedding_type", "standard")
        if pos_type == "shortformer":
            raise ValueError("positional_embedding_type='shortformer' adds positions after the norm, "
                             "outside the residual stream; the component graph needs them in it "
                             "('standard', 'rotary' or 'none')")
        has_mlp = not _cfg(model, "attn_only", False)
        parallel = bool(_cfg(model, "parallel_attn_mlp", False))
        shifted: dict[int, tuple[str, ...]] = {}
        for layer in range(n_layers):
            shifted[layer] = tuple(w for w in PROJECTIONS
                                   if f"blocks.{layer}.attn.hook_shift_{w}" in model.hook_dict)
        if any(shifted.values()) and pos_type == "rotary" and \
                _cfg(model, "shift_position", "pre_rotary") == "post_rotary":
            raise ValueError("shift_position='post_rotary' shifts rotated keys; the shift ports are "
                             "recomputed from unrotated projections, so only 'pre_rotary' is supported")
        pos_in_residual = pos_type == "standard" and "hook_pos_embed" in model.hook_dict
        gqa = n_kv != n_heads

        def kv_name(layer: int, g: int) -> str:
            return f"L{layer}KV{g}" if gqa else head_name(layer, g)

        nodes = [Node("embed", "embed")]
        senders = ["embed"]
        ports: list[Port] = []
        stage_of_sender = [0]
        stage_of_port: list[int] = []
        for layer in range(n_layers):
            heads = [Node(head_name(layer, h), "head", layer, h) for h in range(n_heads)]
            nodes += heads
            if gqa:
                nodes += [Node(kv_name(layer, g), "kv_head", layer, g) for g in range(n_kv)]
            for w in PROJECTIONS:
                n = n_heads if w == "q" else n_kv
                for suffix in ("",) + (("_shift",) if w in shifted[layer] else ()):
                    for i in range(n):
                        name = head_name(layer, i) if w == "q" else kv_name(layer, i)
                        ports.append(Port(name, w + suffix, layer, i))
                        stage_of_port.append(2 * layer + 1)
            senders += [n.name for n in heads]
            stage_of_sender += [2 * layer + 1] * n_heads
            if has_mlp:
                nodes.append(Node(f"MLP{layer}", "mlp", layer))
                ports.append(Port(f"MLP{layer}", "mlp", layer))
                stage_of_port.append(2 * layer + (1 if parallel else 2))
                senders.append(f"MLP{layer}")
                stage_of_sender.append(2 * layer + 2)
        nodes.append(Node("logits", "logits"))
        ports.append(Port("logits", "logits"))
        stage_of_port.append(2 * n_layers + 1)

        edges, index = [], []
        for p, (port, p_stage) in enumerate(zip(ports, stage_of_port)):
            for s, (sender, s_stage) in enumerate(zip(senders, stage_of_sender)):
                if s_stage < p_stage:
                    edges.append(Edge(sender, port.receiver, port.port))
                    index.append((s, p))
        graph = cls(tuple(nodes), tuple(senders), tuple(ports), tuple(edges),
                    torch.tensor(index, dtype=torch.long).reshape(-1, 2), n_layers, n_heads, n_kv,
                    shifted, has_mlp, parallel, pos_in_residual)
        graph._edge_pos.update({e.label: i for i, e in enumerate(edges)})
        return graph

    @property
    def n_edges(self) -> int:
        return len(self.edges)

    def edge_id(self, label: str | Edge) -> int:
        """The index of an edge given its label (``"L0H3 <- embed via k_shift"``) or an Edge."""
        key = label.label if isinstance(label, Edge) else label
        if key not in self._edge_pos:
            raise KeyError(f"no edge {key!r} in this graph (labels look like "
                           f"{self.edges[0].label!r}; {self.n_edges} edges)")
        return self._edge_pos[key]

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node {name!r} in this graph")

    def ports_of(self, layer: int | None, port: str) -> list[int]:
        """Indices into ``ports`` of the given layer and port name, in head order."""
        return [i for i, p in enumerate(self.ports) if p.layer == layer and p.port == port]

    def removed_matrix(self, kept: Bool[Tensor, " edge"]) -> Bool[Tensor, "sender port"]:
        """``[sender, port]``: True where an allowed edge is not kept."""
        out = torch.zeros(len(self.senders), len(self.ports), dtype=torch.bool)
        idx = self.edge_index[~kept]
        out[idx[:, 0], idx[:, 1]] = True
        return out

    def node_columns(self) -> dict[str, float]:
        """A left-to-right position per node: embed 0, layer l's heads 2l + 1 (KV ports just left
        of them), its MLP 2l + 2, logits 2 * n_layers + 1."""
        out = {}
        for n in self.nodes:
            if n.kind == "embed":
                out[n.name] = 0.0
            elif n.kind == "logits":
                out[n.name] = 2.0 * self.n_layers + 1
            elif n.kind == "mlp":
                out[n.name] = 2.0 * n.layer + 2
            elif n.kind == "kv_head":
                out[n.name] = 2.0 * n.layer + 0.6
            else:
                out[n.name] = 2.0 * n.layer + 1
        return out


# ------------------------------------------------------------------------------------- hook names
def _sender_hooks(graph: ComponentGraph) -> list[str]:
    names = ["hook_embed"] + (["hook_pos_embed"] if graph.pos_in_residual else [])
    for layer in range(graph.n_layers):
        names.append(f"blocks.{layer}.attn.hook_result")
        if graph.has_mlp:
            names.append(f"blocks.{layer}.hook_mlp_out")
    return names


def _input_hook(layer: int | None, port: str, graph: ComponentGraph) -> str:
    if port == "logits":
        return f"blocks.{graph.n_layers - 1}.hook_resid_post"
    if port == "mlp":
        return f"blocks.{layer}.hook_mlp_in"
    return f"blocks.{layer}.hook_{port[0]}_input"


def _receiver_hooks(graph: ComponentGraph) -> list[str]:
    names = []
    for layer in range(graph.n_layers):
        names += [f"blocks.{layer}.hook_{w}_input" for w in PROJECTIONS]
        if graph.has_mlp:
            names.append(f"blocks.{layer}.hook_mlp_in")
    names.append(f"blocks.{graph.n_layers - 1}.hook_resid_post")
    return names


def _shift_hooks(graph: ComponentGraph) -> list[str]:
    names = []
    for layer, ws in graph.shifted.items():
        for w in ws:
            a = f"blocks.{layer}.attn"
            names += [f"{a}.hook_{w}", f"{a}.hook_shift_{w}", f"{a}.hook_{w}_shifted"]
    return names


@contextlib.contextmanager
def graph_mode(model: Any) -> Iterator[None]:
    """Turn on the hook flags the graph reads (split q/k/v inputs, per-head results, the MLP input
    hook; ``use_attn_in`` off) and restore the model's own settings afterwards."""
    cfg = model.cfg
    flags = ("use_split_qkv_input", "use_attn_result", "use_hook_mlp_in", "use_attn_in")
    saved = {f: getattr(cfg, f) for f in flags if hasattr(cfg, f)}
    try:
        cfg.use_split_qkv_input = True
        cfg.use_attn_result = True
        if not getattr(cfg, "attn_only", False):
            cfg.use_hook_mlp_in = True
        if hasattr(cfg, "use_attn_in"):
            cfg.use_attn_in = False
        yield
    finally:
        for f, v in saved.items():
            setattr(cfg, f, v)


def _prepare(model: Any, graph: ComponentGraph | None) -> ComponentGraph:
    if getattr(model, "training", False):
        raise ValueError("edge attribution needs the model in eval mode: call model.eval() first")
    graph = ComponentGraph.from_model(model) if graph is None else graph
    if graph.n_layers != model_dims(model)[0] or graph.n_heads != model_dims(model)[1]:
        raise ValueError(f"the graph has {graph.n_layers} layers x {graph.n_heads} heads, the model "
                         f"{model_dims(model)[0]} x {model_dims(model)[1]}: build it from this model")
    return graph


# ------------------------------------------------------------------------------------------ scores
def _sender_outputs(graph: ComponentGraph, acts: Mapping[str, Tensor]) -> list[Tensor]:
    """Each sender's output ``[batch, pos, d_model]``, in ``graph.senders`` order."""
    embed = acts["hook_embed"]
    if graph.pos_in_residual:
        embed = embed + acts["hook_pos_embed"]
    out = [embed]
    for layer in range(graph.n_layers):
        result = acts[f"blocks.{layer}.attn.hook_result"]
        out += [result[:, :, h] for h in range(graph.n_heads)]
        if graph.has_mlp:
            out.append(acts[f"blocks.{layer}.hook_mlp_out"])
    return out


def _port_gradients(
    graph: ComponentGraph, acts: Mapping[str, Tensor], value: Tensor
) -> dict[tuple[int | None, str], Tensor]:
    """Gradients of ``value`` at every port's input, ``{(layer, port): [batch, pos, n, d_model]}``
    (``n`` heads, KV heads, or 1 for MLP and logits), the shifted projections split into their own
    and shift parts."""
    receivers = _receiver_hooks(graph)
    shifted = [(layer, w) for layer, ws in graph.shifted.items() for w in ws]
    outs = [f"blocks.{layer}.attn.hook_{w}_shifted" for layer, w in shifted]
    wrt = [acts[n] for n in receivers + outs]
    grads = torch.autograd.grad(value, wrt, allow_unused=True, retain_graph=bool(shifted))
    grads = [torch.zeros_like(a) if g is None else g for a, g in zip(wrt, grads)]
    by_name = dict(zip(receivers + outs, grads))
    out: dict[tuple[int | None, str], Tensor] = {}
    for layer in range(graph.n_layers):
        for w in PROJECTIONS:
            out[(layer, w)] = by_name[f"blocks.{layer}.hook_{w}_input"]
        if graph.has_mlp:
            out[(layer, "mlp")] = by_name[f"blocks.{layer}.hook_mlp_in"][:, :, None]
    out[(None, "logits")] = by_name[receivers[-1]][:, :, None]
    for i, (layer, w) in enumerate(shifted):
        a = f"blocks.{layer}.attn"
        coeffs = acts[f"{a}.hook_shift_{w}"].detach()  # [head | kv_head, lag]
        own = by_name[f"{a}.hook_{w}_shifted"] * coeffs[:, 0, None].to(value.dtype)  # [b, p, n, d_head]
        (own_input,) = torch.autograd.grad(acts[f"{a}.hook_{w}"], acts[f"blocks.{layer}.hook_{w}_input"],
                                           grad_outputs=own, retain_graph=i < len(shifted) - 1)
        total = out[(layer, w)]
        out[(layer, w)] = own_input
        out[(layer, w + "_shift")] = total - own_input
    return out


def _score_matrix(
    graph: ComponentGraph, deltas: Sequence[Tensor], grads: Mapping[tuple[int | None, str], Tensor]
) -> Float[Tensor, "sender port"]:
    """``[sender, port]``: ``sum_{batch, pos, d_model} delta_sender * grad_port``."""
    dtype = torch.promote_types(deltas[0].dtype, torch.float32)  # float64 models stay float64
    delta = torch.stack([d.to(dtype).flatten() for d in deltas])  # [sender, batch * pos * d_model]
    out = torch.zeros(len(graph.senders), len(graph.ports), dtype=dtype)
    for (layer, port), g in grads.items():
        cols = graph.ports_of(layer, port)
        g = g.to(dtype).permute(2, 0, 1, 3).flatten(1)  # [n, batch * pos * d_model]
        out[:, cols] = (delta @ g.T).cpu()
    return out


@dataclass(frozen=True)
class EdgeScores:
    """EAP scores of every edge of a graph.

    Attributes:
        graph: the component graph.
        scores: ``[edge]``, in ``graph.edges`` order: the estimated ``M(clean, edge corrupted) -
            M(clean)``.
        method: "eap" or "eap-ig" (with ``ig_steps``).
        clean_value, corrupted_value: the metric on the clean and corrupted runs.
    """

    graph: ComponentGraph
    scores: Float[Tensor, " edge"]
    method: str
    ig_steps: int
    clean_value: float
    corrupted_value: float

    def __getitem__(self, label: str | Edge) -> float:
        return float(self.scores[self.graph.edge_id(label)])

    def ranked(self, absolute: bool = True) -> list[tuple[Edge, float]]:
        """Edges from the largest score to the smallest (by ``|score|`` when ``absolute``)."""
        key = self.scores.abs() if absolute else self.scores
        order = key.argsort(descending=True, stable=True).tolist()
        return [(self.graph.edges[i], float(self.scores[i])) for i in order]

    def circuit(self, top_k: int | None = None, threshold: float | None = None,
                absolute: bool = True) -> Circuit:
        """The edges with the ``top_k`` largest scores, or those with score >= ``threshold``
        (``|score|`` when ``absolute``; pass exactly one)."""
        if (top_k is None) == (threshold is None):
            raise ValueError("pass exactly one of top_k and threshold")
        key = self.scores.abs() if absolute else self.scores
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= len(key):
                raise ValueError(f"top_k={top_k!r} must be an int in [0, {len(key)}]")
            kept_ids = key.argsort(descending=True, stable=True)[:top_k]
        else:
            if not math.isfinite(threshold):
                raise ValueError(f"threshold={threshold!r} must be finite")
            kept_ids = (key >= threshold).nonzero().flatten()
        kept = torch.zeros(self.graph.n_edges, dtype=torch.bool)
        kept[kept_ids] = True
        return Circuit.from_mask(self.graph, kept, self.scores)

    def to_pandas(self) -> pd.DataFrame:
        """One row per edge: sender, receiver, port, is_shift, label, score."""
        return pd.DataFrame.from_records([
            {"sender": e.sender, "receiver": e.receiver, "port": e.port, "is_shift": e.is_shift,
             "label": e.label, "score": float(s)} for e, s in zip(self.graph.edges, self.scores)])


def edge_attribution(
    model: Any,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    metric: MetricFn,
    method: str = "eap",
    ig_steps: int = 5,
    graph: ComponentGraph | None = None,
) -> EdgeScores:
    """EAP (or EAP-IG) scores for every edge of the model's component graph.

    Args:
        model: a TransformerLens-style model in eval mode.
        clean_tokens, corrupted_tokens: ``[batch, pos]`` token ids of the same shape.
        metric: logits ``[batch, pos, d_vocab]`` -> differentiable scalar.
        method: "eap" (one clean forward + backward, one corrupted forward) or "eap-ig"
            (``ig_steps`` forward + backward passes along the embeddings from corrupted to clean,
            plus one corrupted forward; ``ig_steps=1`` is "eap").
        graph: a graph built from this model (default: :meth:`ComponentGraph.from_model`).

    Returns:
        :class:`EdgeScores`.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} must be one of {METHODS}")
    if isinstance(ig_steps, bool) or not isinstance(ig_steps, int) or ig_steps < 1:
        raise ValueError(f"ig_steps={ig_steps!r} must be a positive int")
    steps = ig_steps if method == "eap-ig" else 1
    graph = _prepare(model, graph)
    clean_tokens = prepare_tokens(model, clean_tokens)
    corrupted_tokens = prepare_tokens(model, corrupted_tokens)
    if clean_tokens.shape != corrupted_tokens.shape:
        raise ValueError(f"clean tokens {tuple(clean_tokens.shape)} and corrupted tokens "
                         f"{tuple(corrupted_tokens.shape)} must have the same shape")
    senders, receivers, shifts = _sender_hooks(graph), _receiver_hooks(graph), _shift_hooks(graph)
    require_hooks(model, senders + receivers + shifts)
    embeds = senders[: 2 if graph.pos_in_residual else 1]
    with graph_mode(model):
        corrupted: dict[str, Tensor] = {}
        with torch.no_grad(), model.hooks(fwd_hooks=capture_hooks(senders, corrupted)):
            corrupted_value = float(metric(model(corrupted_tokens)))
        corrupted_out = _sender_outputs(graph, corrupted)

        total, deltas, clean_value = None, None, math.nan
        for k in range(steps, 0, -1):  # alpha = 1 (the clean run) first: it gives the deltas
            alpha = k / steps
            acts: dict[str, Tensor] = {}
            hooks = capture_hooks(list(dict.fromkeys(senders + receivers + shifts)), acts)
            if alpha < 1:
                hooks = [(n, _interpolate(corrupted[n], alpha)) for n in embeds] + hooks
            with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
                value = metric(model(clean_tokens))
            if not isinstance(value, Tensor) or value.numel() != 1 or not value.requires_grad:
                raise ValueError("metric must return a scalar tensor that depends on the logits")
            value = value.reshape(())
            if alpha == 1:
                clean_value = float(value.detach())
                clean_out = _sender_outputs(graph, {n: a.detach() for n, a in acts.items()})
                deltas = [c - x for c, x in zip(corrupted_out, clean_out)]
            grads = _port_gradients(graph, acts, value)
            step = _score_matrix(graph, deltas, grads)
            total = step if total is None else total + step
    matrix = total / steps
    scores = matrix[graph.edge_index[:, 0], graph.edge_index[:, 1]]
    if not torch.isfinite(scores).all():
        raise ValueError("edge scores are not finite on these inputs")
    return EdgeScores(graph, scores, method, steps, clean_value, corrupted_value)


def _interpolate(corrupted: Tensor, alpha: float) -> Callable:
    def hook(act: Tensor, hook: Any) -> Tensor:
        return corrupted + alpha * (act - corrupted)

    return hook


# ----------------------------------------------------------------------------------------- circuits
@dataclass(frozen=True)
class Circuit:
    """A set of edges of a graph (the rest are corrupted when the circuit runs).

    Attributes:
        graph: the component graph.
        kept: ``[edge]`` bool, True for the circuit's edges.
        scores: ``[edge]`` scores the circuit was chosen by (None for a hand-made circuit).
    """

    graph: ComponentGraph
    kept: Bool[Tensor, " edge"]
    scores: Float[Tensor, " edge"] | None = None

    @classmethod
    def from_mask(cls, graph: ComponentGraph, kept: Tensor, scores: Tensor | None = None) -> Circuit:
        kept = torch.as_tensor(kept, dtype=torch.bool).cpu()
        if kept.shape != (graph.n_edges,):
            raise ValueError(f"kept must have shape ({graph.n_edges},), got {tuple(kept.shape)}")
        return cls(graph, kept, scores)

    @classmethod
    def from_labels(cls, graph: ComponentGraph, labels: Sequence[str | Edge]) -> Circuit:
        """A hand-made circuit from edge labels (``"L1H0 <- L0H0 via k"``); KeyError on an
        unknown label."""
        kept = torch.zeros(graph.n_edges, dtype=torch.bool)
        for label in labels:
            kept[graph.edge_id(label)] = True
        return cls(graph, kept)

    @classmethod
    def full(cls, graph: ComponentGraph) -> Circuit:
        return cls(graph, torch.ones(graph.n_edges, dtype=torch.bool))

    @classmethod
    def empty(cls, graph: ComponentGraph) -> Circuit:
        return cls(graph, torch.zeros(graph.n_edges, dtype=torch.bool))

    @property
    def edges(self) -> list[Edge]:
        return [e for e, k in zip(self.graph.edges, self.kept.tolist()) if k]

    @property
    def labels(self) -> list[str]:
        return [e.label for e in self.edges]

    @property
    def nodes(self) -> list[str]:
        """Nodes touched by the circuit's edges, in graph order."""
        used = {n for e in self.edges for n in (e.sender, e.receiver)}
        return [n.name for n in self.graph.nodes if n.name in used]

    def __len__(self) -> int:
        return int(self.kept.sum())

    def __contains__(self, label: str | Edge) -> bool:
        return bool(self.kept[self.graph.edge_id(label)])

    def without(self, *labels: str | Edge) -> Circuit:
        """This circuit minus the given edges."""
        kept = self.kept.clone()
        for label in labels:
            kept[self.graph.edge_id(label)] = False
        return Circuit(self.graph, kept, self.scores)

    def plot_data(self) -> dict[str, list[dict[str, Any]]]:
        """Plain data for ``kvshift_lens.viz.circuit.circuit_figure(**data)``: ``nodes`` (name,
        kind, layer, index, column) and ``edges`` (sender, receiver, port, shift, label, score)."""
        columns = self.graph.node_columns()
        used = set(self.nodes)
        nodes = [{"name": n.name, "kind": n.kind, "layer": n.layer, "index": n.index,
                  "column": columns[n.name]} for n in self.graph.nodes if n.name in used]
        edges = []
        for i in self.kept.nonzero().flatten().tolist():
            e = self.graph.edges[i]
            edges.append({"sender": e.sender, "receiver": e.receiver, "port": e.port,
                          "shift": e.is_shift, "label": e.label,
                          "score": None if self.scores is None else float(self.scores[i])})
        return {"nodes": nodes, "edges": edges}


# -------------------------------------------------------------------------------- patched forward
def _lagged(x: Float[Tensor, "batch pos n d_head"], coeffs: Float[Tensor, "n lag"]) -> Tensor:
    """``sum_{l >= 1} coeffs[:, l] * x[t - l]`` (zero before the start): the shift part of ``x``."""
    out = torch.zeros_like(x)
    c = coeffs.to(x.dtype)
    for lag in range(1, min(c.shape[1], x.shape[1])):
        out[:, lag:] += x[:, :-lag] * c[:, lag, None]
    return out


def _projection_weights(model: Any, layer: int, w: str, n: int) -> tuple[Tensor, Tensor]:
    """``W_{Q|K|V}`` ``[n, d_model, d_head]`` and its bias ``[n, d_head]`` per KV head (for k/v
    under grouped-query attention TransformerLens' names repeat each KV head per query head)."""
    attn = model.blocks[layer].attn
    W, b = getattr(attn, f"W_{w.upper()}"), getattr(attn, f"b_{w.upper()}")
    stride = W.shape[0] // n
    return W[::stride], b[::stride]


class _PatchedRun:
    """Forward hooks that run the clean input with the edges in ``removed`` carrying their
    corrupted values (see the module docstring)."""

    def __init__(self, model: Any, graph: ComponentGraph, corrupted_out: Sequence[Tensor],
                 removed: Bool[Tensor, "sender port"]):
        self.model, self.graph, self.removed = model, graph, removed
        self.corrupted_out = corrupted_out
        self.acts: dict[str, Tensor] = {}
        self.shift_inputs: dict[tuple[int, str], Tensor] = {}

    def _current_outputs(self, n_up: int) -> list[Tensor]:
        return _sender_outputs_partial(self.graph, self.acts, n_up)

    def _patched_input(self, act: Tensor, layer: int | None, port: str) -> Tensor | None:
        cols = self.graph.ports_of(layer, port)
        mask = self.removed[:, cols]  # [sender, n]
        up = mask.any(1).nonzero().flatten().tolist()
        if not up:
            return None
        current = self._current_outputs(max(up) + 1)
        delta = torch.stack([current[s] - self.corrupted_out[s] for s in up], dim=2)  # [b, p, s, d]
        m = mask[up].to(device=act.device, dtype=act.dtype)
        correction = torch.einsum("bpsd,sn->bpnd", delta, m)
        return act - (correction if act.ndim == 4 else correction[:, :, 0])

    def _differs(self, layer: int, w: str) -> bool:
        """Whether the own and shift ports of projection ``w`` keep different edges."""
        own = self.removed[:, self.graph.ports_of(layer, w)]
        shift = self.removed[:, self.graph.ports_of(layer, w + "_shift")]
        return not torch.equal(own, shift)

    def hooks(self) -> list[tuple[str, Callable]]:
        g = self.graph
        out = capture_hooks(_sender_hooks(g), self.acts)
        for layer in range(g.n_layers):
            for w in PROJECTIONS:
                out.append((f"blocks.{layer}.hook_{w}_input", self._input_hook(layer, w)))
            if g.has_mlp:
                out.append((f"blocks.{layer}.hook_mlp_in", self._simple_hook(layer, "mlp")))
            for w in g.shifted[layer]:
                a = f"blocks.{layer}.attn"
                out += capture_hooks([f"{a}.hook_{w}", f"{a}.hook_shift_{w}"], self.acts)
                out.append((f"{a}.hook_{w}_shifted", self._shifted_hook(layer, w)))
        out.append((f"blocks.{g.n_layers - 1}.hook_resid_post", self._simple_hook(None, "logits")))
        return out

    def _simple_hook(self, layer: int | None, port: str) -> Callable:
        def hook(act: Tensor, hook: Any) -> Tensor | None:
            return self._patched_input(act, layer, port)
        return hook

    def _input_hook(self, layer: int, w: str) -> Callable:
        def hook(act: Tensor, hook: Any) -> Tensor | None:
            own = self._patched_input(act, layer, w)
            if w in self.graph.shifted[layer] and self._differs(layer, w):
                shift = self._patched_input(act, layer, w + "_shift")
                self.shift_inputs[(layer, w)] = act if shift is None else shift
            return own
        return hook

    def _shifted_hook(self, layer: int, w: str) -> Callable:
        def hook(act: Tensor, hook: Any) -> Tensor | None:
            shift_in = self.shift_inputs.pop((layer, w), None)
            if shift_in is None:
                return None
            a = f"blocks.{layer}.attn"
            own = self.acts[f"{a}.hook_{w}"]  # [b, p, n, d_head]: the projection of the own input
            W, b = _projection_weights(self.model, layer, w, own.shape[2])
            normed = self.model.blocks[layer].ln1(shift_in)
            from_shift = torch.einsum("bpnm,nmd->bpnd", normed, W) + b  # [b, p, n, d_head]
            return act + _lagged(from_shift - own, self.acts[f"{a}.hook_shift_{w}"])
        return hook


def _sender_outputs_partial(graph: ComponentGraph, acts: Mapping[str, Tensor], n_up: int) -> list[Tensor]:
    """The first ``n_up`` senders' outputs in this run (those hooks have fired by then)."""
    out: list[Tensor] = []
    embed = acts["hook_embed"]
    out.append(embed + acts["hook_pos_embed"] if graph.pos_in_residual else embed)
    for layer in range(graph.n_layers):
        if len(out) >= n_up:
            break
        result = acts[f"blocks.{layer}.attn.hook_result"]
        out += [result[:, :, h] for h in range(graph.n_heads)]
        if graph.has_mlp and len(out) < n_up:
            out.append(acts[f"blocks.{layer}.hook_mlp_out"])
    return out


@dataclass(frozen=True)
class Faithfulness:
    """How much of the clean-vs-corrupted metric gap a circuit keeps.

    ``fraction = (circuit_value - corrupted_value) / (clean_value - corrupted_value)``: 1 for the
    full graph, 0 for the empty graph.
    """

    circuit_value: float
    clean_value: float
    corrupted_value: float
    n_edges: int
    n_total: int

    @property
    def fraction(self) -> float:
        gap = self.clean_value - self.corrupted_value
        if gap == 0:
            raise ValueError("clean and corrupted metrics are equal; faithfulness is undefined")
        return (self.circuit_value - self.corrupted_value) / gap


class CircuitRunner:
    """Runs circuits of one graph on one clean/corrupted pair: the corrupted senders are computed
    once, each circuit then costs one forward pass.

    Args:
        model, clean_tokens, corrupted_tokens, metric: as in :func:`edge_attribution`.
        graph: the graph the circuits come from (default: built from the model).
    """

    def __init__(self, model: Any, clean_tokens: Tensor, corrupted_tokens: Tensor, metric: MetricFn,
                 graph: ComponentGraph | None = None):
        self.model, self.metric = model, metric
        self.graph = _prepare(model, graph)
        self.clean_tokens = prepare_tokens(model, clean_tokens)
        corrupted_tokens = prepare_tokens(model, corrupted_tokens)
        if self.clean_tokens.shape != corrupted_tokens.shape:
            raise ValueError(f"clean tokens {tuple(self.clean_tokens.shape)} and corrupted tokens "
                             f"{tuple(corrupted_tokens.shape)} must have the same shape")
        senders = _sender_hooks(self.graph)
        require_hooks(model, senders + _receiver_hooks(self.graph) + _shift_hooks(self.graph))
        acts: dict[str, Tensor] = {}
        with graph_mode(model), torch.no_grad(), model.hooks(fwd_hooks=capture_hooks(senders, acts)):
            self.corrupted_value = float(metric(model(corrupted_tokens)))
        self.corrupted_out = _sender_outputs(self.graph, acts)
        self.clean_value = self.value(Circuit.full(self.graph))

    @torch.no_grad()
    def logits(self, circuit: Circuit) -> Float[Tensor, "batch pos d_vocab"]:
        """The clean input's logits with every edge outside ``circuit`` corrupted."""
        if circuit.graph is not self.graph and circuit.graph.edges != self.graph.edges:
            raise ValueError("the circuit comes from another graph")
        removed = self.graph.removed_matrix(circuit.kept)
        run = _PatchedRun(self.model, self.graph, self.corrupted_out, removed)
        with graph_mode(self.model), self.model.hooks(fwd_hooks=run.hooks()):
            return self.model(self.clean_tokens)

    def value(self, circuit: Circuit) -> float:
        return float(self.metric(self.logits(circuit)))

    def faithfulness(self, circuit: Circuit) -> Faithfulness:
        return Faithfulness(self.value(circuit), self.clean_value, self.corrupted_value,
                            len(circuit), self.graph.n_edges)

    def edge_effects(self, edges: Sequence[str | Edge] | None = None) -> Float[Tensor, " edge"]:
        """Exact edge patching: ``M(clean, one edge corrupted) - M(clean)`` for each edge (all of
        the graph's by default, in graph order; one forward pass each) -- what EAP estimates."""
        ids = range(self.graph.n_edges) if edges is None else [self.graph.edge_id(e) for e in edges]
        full = Circuit.full(self.graph)
        out = torch.empty(len(ids), dtype=torch.float64)
        for j, i in enumerate(ids):
            out[j] = self.value(full.without(self.graph.edges[i])) - self.clean_value
        return out


def faithfulness(
    model: Any,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    metric: MetricFn,
    circuit: Circuit,
) -> Faithfulness:
    """Run ``circuit`` (every edge outside it corrupted) and report how much of the metric survives
    (:class:`Faithfulness`; ``.fraction`` is 1 for the full graph and 0 for the empty one)."""
    return CircuitRunner(model, clean_tokens, corrupted_tokens, metric, circuit.graph).faithfulness(circuit)


__all__ = [
    "METHODS",
    "Circuit",
    "CircuitRunner",
    "ComponentGraph",
    "Edge",
    "EdgeScores",
    "Faithfulness",
    "Node",
    "Port",
    "edge_attribution",
    "faithfulness",
    "graph_mode",
]
