"""Attention patterns and token views with circuitsvis, rendered to work offline.

circuitsvis' own ``render`` returns HTML that ``str()`` turns into an import from a CDN (unpkg),
and whose inline ("local") form repeats the 1.3 MB JavaScript bundle in every component and opens
its container with ``<div .../>``, which HTML does not close (so whatever follows ends up inside
the component and is wiped when it renders). Here the bundle shipped inside the circuitsvis wheel
(``circuitsvis/dist/cdn/iife.js``, which defines the global ``CircuitsVis``) is inlined once per
page, and each component is a closed ``<div>`` plus a script calling ``CircuitsVis.render``: no
network is needed to view any of it.

Long sequences are windowed: ``max_len`` positions from ``start`` (default: the first ``max_len``),
on both the query and the key axis; attention to keys outside the window is not shown.
"""

from __future__ import annotations

import functools
import html
import itertools
import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

_ids = itertools.count()


@functools.cache
def circuitsvis_js() -> str:
    """The circuitsvis browser bundle, safe to put inside a ``<script>`` element."""
    import circuitsvis

    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    if not path.is_file():
        raise FileNotFoundError(
            f"the circuitsvis JavaScript bundle {path} is missing; reinstall circuitsvis")
    js = path.read_text(encoding="utf-8")
    js = re.sub(r"^//# sourceMappingURL=.*$", "", js, flags=re.M)  # no request for the .map
    return _script_safe(js)


def _script_safe(js: str) -> str:
    # "</script" would end the element early; inside JavaScript strings "<\/" is the same text.
    return re.sub(r"</(script)", r"<\\/\1", js, flags=re.I)


def circuitsvis_script() -> str:
    """A ``<script>`` element defining ``CircuitsVis`` (put it once before any component)."""
    return f'<script type="text/javascript">{circuitsvis_js()}</script>'


def _props_json(props: dict[str, Any]) -> str:
    def convert(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x.detach().cpu().tolist()
        if hasattr(x, "tolist"):
            return x.tolist()
        return x

    text = json.dumps({k: convert(v) for k, v in props.items() if v is not None})
    # Token strings may contain "</script>" or "<!--": escape them as JSON unicode escapes.
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


@dataclass(frozen=True)
class CircuitsVisHTML:
    """A rendered circuitsvis component (or several, laid out).

    ``body`` is the markup without the JavaScript library; :meth:`to_html` adds the library
    (``include_js``) for a standalone snippet. Notebooks display it through ``_repr_html_``.
    """

    body: str

    def to_html(self, include_js: bool = True) -> str:
        return (circuitsvis_script() + "\n" if include_js else "") + self.body

    def _repr_html_(self) -> str:
        return self.to_html(include_js=True)

    def __str__(self) -> str:
        return self.to_html(include_js=True)

    def __add__(self, other: CircuitsVisHTML) -> CircuitsVisHTML:
        return CircuitsVisHTML(self.body + "\n" + other.body)


def render_component(component: str, **props: Any) -> CircuitsVisHTML:
    """Render any circuitsvis React component (``"AttentionHeads"``, ``"ColoredTokens"``, ...)
    with camelCase ``props``, as a closed ``<div class="kvshift-cv">`` and its render call."""
    if not component.isidentifier():
        raise ValueError(f"component={component!r} is not a circuitsvis component name")
    uid = f"kvshift-cv-{next(_ids)}-{uuid.uuid4().hex[:8]}"
    body = (f'<div id="{uid}" class="kvshift-cv" data-component="{component}"></div>\n'
            f'<script type="text/javascript">CircuitsVis.render("{uid}", '
            f"CircuitsVis.{component}, {_props_json(props)});</script>")
    return CircuitsVisHTML(body)


def window(n: int, max_len: int | None, start: int | None = None) -> slice:
    """The positions shown of a sequence of length ``n``: all of them when ``n <= max_len``,
    else ``max_len`` from ``start`` (default 0)."""
    if max_len is None or n <= max_len:
        return slice(0, n)
    if max_len < 1:
        raise ValueError(f"max_len={max_len} must be >= 1")
    s = 0 if start is None else min(max(0, start), n - max_len)
    return slice(s, s + max_len)


def _check_pattern(pattern: Tensor, tokens: Sequence[str]) -> Tensor:
    p = torch.as_tensor(pattern).detach().cpu().float()
    if p.ndim == 2:
        p = p[None]
    if p.ndim != 3 or p.shape[1] != p.shape[2]:
        raise ValueError(f"pattern must be [head, query_pos, key_pos] with query_pos == key_pos, "
                         f"got shape {tuple(p.shape)}")
    if p.shape[-1] != len(tokens):
        raise ValueError(f"pattern covers {p.shape[-1]} positions but {len(tokens)} tokens were "
                         "given")
    return p


def attention_heads(
    pattern: Float[Tensor, "head query_pos key_pos"],
    tokens: Sequence[str],
    head_names: Sequence[str] | None = None,
    max_len: int | None = 64,
    start: int | None = None,
    max_value: float | None = None,
) -> CircuitsVisHTML:
    """circuitsvis' ``AttentionHeads``: a thumbnail per head, the selected one in full.

    Args:
        pattern: ``[head, query_pos, key_pos]`` (or one head ``[query_pos, key_pos]``).
        tokens: a string per position.
        head_names: a label per head (default ``"Head 0"``, ...).
        max_len, start: the window shown (see :func:`window`).
        max_value: the weight drawn darkest (default: circuitsvis' own, 1).
    """
    p = _check_pattern(pattern, tokens)
    w = window(p.shape[-1], max_len, start)
    names = list(head_names) if head_names is not None else [f"Head {h}" for h in range(len(p))]
    if len(names) != len(p):
        raise ValueError(f"{len(names)} head_names for {len(p)} heads")
    return render_component("AttentionHeads", attention=p[:, w, w], tokens=list(tokens[w]),
                            attentionHeadNames=names, maxValue=max_value, maskUpperTri=True)


def attention_patterns(
    pattern: Float[Tensor, "head query_pos key_pos"],
    tokens: Sequence[str],
    max_len: int | None = 64,
    start: int | None = None,
) -> CircuitsVisHTML:
    """circuitsvis' ``AttentionPatterns``: every head's pattern, hover a token to see where it
    attends. ``pattern`` is ``[head, query_pos, key_pos]``; see :func:`window`."""
    p = _check_pattern(pattern, tokens)
    w = window(p.shape[-1], max_len, start)
    return render_component("AttentionPatterns", attention=p[:, w, w], tokens=list(tokens[w]))


def colored_tokens(
    tokens: Sequence[str],
    values: Sequence[float] | Tensor,
    max_len: int | None = None,
    start: int | None = None,
    min_value: float | None = None,
    max_value: float | None = None,
) -> CircuitsVisHTML:
    """circuitsvis' ``ColoredTokens``: each token shaded by its value."""
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if v.numel() != len(tokens):
        raise ValueError(f"{v.numel()} values for {len(tokens)} tokens")
    w = window(len(tokens), max_len, start)
    return render_component("ColoredTokens", tokens=list(tokens[w]), values=v[w],
                            minValue=min_value, maxValue=max_value)


def loss_tokens(
    tokens: Sequence[str],
    per_token_loss: Float[Tensor, " pos_minus_1"],
    max_len: int | None = None,
    start: int | None = None,
) -> CircuitsVisHTML:
    """Tokens coloured by the loss of predicting them: token ``t + 1`` gets ``loss[t]`` (the
    model's loss at position t), the first token (never predicted) 0. Darker is worse."""
    loss = torch.as_tensor(per_token_loss, dtype=torch.float64).reshape(-1)
    if loss.numel() != len(tokens) - 1:
        raise ValueError(f"per_token_loss has {loss.numel()} values; {len(tokens)} tokens need "
                         f"{len(tokens) - 1} (position t predicts token t + 1)")
    values = torch.cat([torch.zeros(1, dtype=torch.float64), loss])
    return colored_tokens(tokens, values, max_len=max_len, start=start, min_value=0.0,
                          max_value=max(float(loss.max()), 1e-6))


def token_strings(
    tokens: Int[Tensor, " pos"], model=None, bos_token: int | None = None
) -> list[str]:
    """A display string per token: the model's tokenizer's when it has one, else the id (and
    ``"BOS"`` for ``bos_token``; circuitsvis shows some token strings as HTML, so no ``<bos>``)."""
    ids = torch.as_tensor(tokens).reshape(-1).tolist()
    if model is not None and getattr(model, "tokenizer", None) is not None:
        return model.to_str_tokens(torch.as_tensor(ids))
    return ["BOS" if bos_token is not None and i == bos_token else str(i) for i in ids]


def value_coefficients_per_head(model, layer: int) -> Float[Tensor, "head lag"] | None:
    """The value-shift coefficients of ``layer`` per query head (key/value heads repeated under
    grouped-query attention), or None when values are not shifted."""
    c = model.blocks[layer].attn.coefficients("v")
    if c is None:
        return None
    return c.detach().repeat_interleave(model.cfg.heads_per_kv, 0)


@torch.no_grad()
def layer_patterns(
    model, tokens: Int[Tensor, " pos"], layer: int = 0
) -> tuple[Float[Tensor, "head query_pos key_pos"], Float[Tensor, "head query_pos key_pos"] | None]:
    """``(plain, effective)`` attention patterns of one sequence at ``layer``: the pattern over
    positions (``hook_pattern``) and, when values are shifted, the effective pattern over source
    tokens (``probes.effective_pattern``); effective is None for an unshifted value."""
    if not 0 <= layer < model.cfg.n_layers:
        raise ValueError(f"layer={layer} is out of range: the model has n_layers={model.cfg.n_layers}")
    name = f"blocks.{layer}.attn.hook_pattern"
    _, cache = model.run_with_cache(torch.as_tensor(tokens).reshape(1, -1), names_filter=name)
    plain = cache[name][0].float().cpu()
    coeffs = value_coefficients_per_head(model, layer)
    if coeffs is None:
        return plain, None
    from probes.effective import effective_pattern  # the application layer composes probes

    return plain, effective_pattern(plain, coeffs.float().cpu())


def plain_and_effective(
    model,
    tokens: Int[Tensor, " pos"],
    layer: int = 0,
    token_strs: Sequence[str] | None = None,
    max_len: int | None = 64,
    start: int | None = None,
) -> CircuitsVisHTML:
    """A layer's attention patterns side by side: plain (weights over positions) and effective
    (weights over source tokens once the value shift mixes each position with the one before).

    For a value-shifted head these differ: position j's value mixes token j (beta1) and token
    j - 1 (beta2), so weight on position j is weight on both tokens; the effective pattern
    (``probes.effective_pattern``) shows which tokens are read. The paper's induction head
    (alpha2 = beta1 = 1) attends to the position after the earlier copy of the current token and
    reads that position's own token: there the two agree.
    """
    plain, effective = layer_patterns(model, tokens, layer)
    strs = list(token_strs) if token_strs is not None else token_strings(tokens, model)
    heads = [f"L{layer}H{h}" for h in range(plain.shape[0])]
    left = attention_heads(plain, strs, head_names=heads, max_len=max_len, start=start)
    panels = [("attention pattern (over positions)", left)]
    if effective is not None:
        right = attention_heads(effective, strs, head_names=heads, max_len=max_len, start=start)
        panels.append(("effective pattern (over source tokens, value shift applied)", right))
    cells = "".join(
        f'<div class="kvshift-cv-panel" style="flex: 1 1 420px; min-width: 0;">'
        f"<h4>{html.escape(title)}</h4>{part.body}</div>" for title, part in panels)
    return CircuitsVisHTML(f'<div class="kvshift-cv-row" style="display: flex; gap: 24px; '
                           f'flex-wrap: wrap;">{cells}</div>')


__all__ = [
    "CircuitsVisHTML",
    "attention_heads",
    "attention_patterns",
    "circuitsvis_js",
    "circuitsvis_script",
    "colored_tokens",
    "layer_patterns",
    "loss_tokens",
    "plain_and_effective",
    "render_component",
    "token_strings",
    "value_coefficients_per_head",
    "window",
]
