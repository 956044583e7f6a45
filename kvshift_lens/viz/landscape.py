"""The loss landscape of a head's shift coefficients, computed from a real model (PAPER.md item 5,
the paper's Fig. 2), in mix coordinates (the default) or over the raw (alpha1, beta1) plane.

For the chosen key/value heads of one layer the coefficient hooks
(``blocks.{layer}.attn.hook_shift_k`` / ``hook_shift_v``, shape ``[kv_head, lag]``) replace the
model's coefficients, for one forward pass, and every other head keeps its own.

``coords="mix"`` (default): the axes are the key's and the value's share of the *current*
position, ``a = alpha1 / (|alpha1| + |alpha2|)`` and ``b = beta1 / (|beta1| + |beta2|)``, in
[-1, 1]. Coefficients are read as a gain times a mix (:func:`kvshift_lens.shift.gain_and_mix`), and
each moved head is set to its *own* gain times the mix with that current share::

    (alpha1, alpha2) = g_k * (a, s_k (1 - |a|))      (beta1, beta2) = g_v * (b, s_v (1 - |b|))

where ``g_k = |alpha1| + |alpha2|`` is the head's key gain and ``s_k`` the sign of its alpha2 (+1
when 0), likewise for values, read from the coefficients the hook receives. So every head lies on
the surface (its own point is its own coefficients, whatever their scale: trained free
coefficients grow into gains of 3-5), 1 is a position that only sees itself (vanilla attention:
(1, 1)) and 0 one that only sees the previous position (the paper's induction head: key 0,
value 1).

``coords="raw"``: the paper's plane, ``(alpha1, alpha2) = (a, 1 - a)``, ``(beta1, beta2) = (b,
1 - b)``, gain 1 for ``a, b`` in [0, 1]; heads whose gains are not 1 lie off this surface.

The loss is the masked next-token cross-entropy on an induction batch (only the positions the
task's rule predicts). ``a`` and ``b`` are 0-d leaf tensors that require grad, so autograd through
the hook gives the gradient ``(d loss / d a, d loss / d b)`` of the loss restricted to that surface
at every grid point (in mix coordinates the gains and signs are held fixed). No weight is changed.

Each grid point is one forward (and backward) pass over the whole batch: the hooks set one set of
coefficients per pass, and replicating the batch across grid points measured no faster on CPU (the
work is the same, the model is compute-bound), so only the data are batched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from kvshift_lens.data.tasks import Batch, masked_cross_entropy

logger = logging.getLogger(__name__)


@dataclass
class Landscape:
    """The loss over a grid of (key, value) coordinates for some heads of one layer.

    Attributes:
        a1: ``[n_a]`` the key axis: the key's current share ``alpha1 / (|alpha1| + |alpha2|)``
            (``coords="mix"``) or alpha1 with alpha2 = 1 - alpha1 (``coords="raw"``).
        b1: ``[n_b]`` the value axis, likewise with beta.
        loss: ``[n_a, n_b]``; ``loss[i, j]`` is the loss at ``(a1[i], b1[j])``.
        grad: ``[n_a, n_b, 2]`` gradient (d loss / d a, d loss / d b) along the surface, or None
            when not computed.
        layer: the layer whose coefficients were set.
        heads: the key/value heads that were moved together (the others keep their own).
        positions: ``{"L0H1": (a, b)}``: the moved heads' own coefficients in these coordinates
            (mix: their current shares, which lie on the surface; raw: their alpha1 and beta1,
            whose alpha2 and beta2 need not be 1 - alpha1 and 1 - beta1).
        model_loss: the loss of the unhooked model on the same batch.
        n_sequences: sequences in the batch.
        coords: ``"mix"`` or ``"raw"``.
        gains: ``{"L0H1": (key gain, value gain)}`` of the moved heads' own coefficients (the
            gains the mix surface is drawn at; ``|c1| + |c2|``).
    """

    a1: Float[Tensor, " n_a"]
    b1: Float[Tensor, " n_b"]
    loss: Float[Tensor, "n_a n_b"]
    grad: Float[Tensor, "n_a n_b 2"] | None
    layer: int
    heads: list[int]
    positions: dict[str, tuple[float, float]]
    model_loss: float
    n_sequences: int
    coords: str = "raw"
    gains: dict[str, tuple[float, float]] = field(default_factory=dict)

    def argmin(self) -> tuple[float, float]:
        """(a, b) of the lowest loss on the grid, in the landscape's coordinates."""
        i = int(self.loss.argmin())
        n_b = self.loss.shape[1]
        return float(self.a1[i // n_b]), float(self.b1[i % n_b])


def _check_model(model, layer: int) -> None:
    cfg = model.cfg
    if not (cfg.shift_k and cfg.shift_v):
        raise ValueError(
            f"the (alpha1, beta1) landscape needs keys and values shifted; this model has "
            f"shift_k={cfg.shift_k}, shift_v={cfg.shift_v}")
    if cfg.shift_window != 1:
        raise ValueError(f"the (alpha1, beta1) landscape is defined for shift_window=1 (alpha2 = "
                         f"1 - alpha1); this model has shift_window={cfg.shift_window}")
    if not 0 <= layer < cfg.n_layers:
        raise ValueError(f"layer={layer} is out of range: the model has n_layers={cfg.n_layers}")


def _resolve_heads(model, heads: int | Sequence[int] | None) -> list[int]:
    n = model.cfg.n_key_value_heads
    chosen = list(range(n)) if heads is None else ([heads] if isinstance(heads, int) else
                                                   [int(h) for h in heads])
    bad = [h for h in chosen if not 0 <= h < n]
    if bad or not chosen:
        raise ValueError(f"heads={heads!r}: key/value heads must be in [0, {n}) (the model has "
                         f"n_key_value_heads={n}) and at least one must be given")
    return sorted(set(chosen))


COORDS = ("mix", "raw")


def _check_coords(coords: str) -> str:
    if coords not in COORDS:
        raise ValueError(f"coords={coords!r}: expected one of {COORDS} ('mix': the current "
                         "share at each head's own gain; 'raw': alpha1 with alpha2 = 1 - alpha1)")
    return coords


def plane_hooks(
    model,
    layer: int,
    heads: int | Sequence[int] | None,
    a1: Tensor | float,
    b1: Tensor | float,
    coords: str = "raw",
) -> list[tuple[str, Callable]]:
    """Forward hooks putting the given key/value heads of ``layer`` at the point ``(a1, b1)``;
    other heads keep their coefficients.

    ``coords="raw"``: alpha = (a1, 1 - a1), beta = (b1, 1 - b1). ``coords="mix"``: each head keeps
    its own gain and the sign of its lag-1 coefficient, and gets the current share ``a1`` (keys)
    and ``b1`` (values); see the module docstring. ``a1`` and ``b1`` may be 0-d tensors requiring
    grad: the hooks build the coefficients from them, so the loss is differentiable in them. Use
    with ``model.run_with_hooks`` or ``model.hooks``.
    """
    _check_model(model, layer)
    _check_coords(coords)
    chosen = _resolve_heads(model, heads)
    if coords == "mix":
        for name, x in (("a1", a1), ("b1", b1)):
            if not -1 <= float(x) <= 1:
                raise ValueError(f"{name}={float(x)} is not a current share: expected [-1, 1]")
    point = {"a": torch.as_tensor(a1), "b": torch.as_tensor(b1)}
    attn = f"blocks.{layer}.attn"
    return [(f"{attn}.hook_shift_k", _setter(point, "a", chosen, coords)),
            (f"{attn}.hook_shift_v", _setter(point, "b", chosen, coords))]


def current_share(coeffs: Float[Tensor, "... lag"]) -> Float[Tensor, "..."]:
    """The mix's weight on the current position, ``c_0 / sum_l |c_l|`` (signed, in [-1, 1]): the
    landscape's mix coordinate. 1 for vanilla attention, 0 for a key or value that reads only the
    previous position. A head with all-zero coefficients reads 1 (the identity mix of
    :func:`kvshift_lens.shift.gain_and_mix`)."""
    from kvshift_lens.shift import gain_and_mix

    coeffs = torch.as_tensor(coeffs, dtype=torch.float64)
    return gain_and_mix(coeffs)[1][..., 0]


def _batch_of(batch_or_task, n_sequences: int, seed: int) -> Batch:
    if isinstance(batch_or_task, Batch):
        return batch_or_task
    if hasattr(batch_or_task, "sample"):
        return batch_or_task.sample(n_sequences, torch.Generator().manual_seed(seed))
    raise TypeError("batch_or_task must be a Batch or a task with .sample(batch_size, generator), "
                    f"got {type(batch_or_task).__name__}")


def _axis(span: tuple[float, float], n: int, name: str, coords: str) -> Tensor:
    lo, hi = (float(x) for x in span)
    if not lo < hi:
        raise ValueError(f"{name}={span!r} must be (low, high) with low < high")
    if coords == "mix" and not -1 <= lo < hi <= 1:
        raise ValueError(f"{name}={span!r}: in mix coordinates the axis is a current share, "
                         "so the span must lie within [-1, 1]")
    return torch.linspace(lo, hi, n, dtype=torch.float64)


def loss_landscape(
    model,
    batch_or_task,
    layer: int = 0,
    heads: int | Sequence[int] | None = None,
    grid: int | tuple[int, int] = 21,
    a_range: tuple[float, float] | None = None,
    b_range: tuple[float, float] | None = None,
    n_sequences: int = 32,
    seed: int = 0,
    gradient: bool = True,
    coords: str = "mix",
) -> Landscape:
    """The induction loss over a grid of (key, value) coordinates, with its gradient field.

    Args:
        model: a :class:`~kvshift_lens.HookedKVShiftTransformer` with keys and values shifted,
            window 1.
        batch_or_task: a :class:`~kvshift_lens.data.tasks.Batch`, or a task (e.g.
            ``InductionTask``) to draw ``n_sequences`` from with a generator seeded ``seed``.
        layer: the layer whose coefficients are set.
        heads: one key/value head, several (moved together), or None for every head of the layer.
        grid: points per axis (or ``(n_a, n_b)``), at least 2.
        a_range, b_range: the key and value axes' spans (endpoints included). Default: raw
            (-0.5, 1.5); mix from min(-0.25, lowest moved head's share - 0.1) (at least -1) to 1,
            so every moved head is inside the grid.
        gradient: also compute the gradient at every grid point (about 3x the time).
        coords: ``"mix"`` (the current shares at each head's own gain; see the module
            docstring) or ``"raw"`` (alpha1 with alpha2 = 1 - alpha1, beta likewise).

    Returns:
        A :class:`Landscape`.
    """
    _check_model(model, layer)
    _check_coords(coords)
    chosen = _resolve_heads(model, heads)
    n_a, n_b = (grid, grid) if isinstance(grid, int) else grid
    if n_a < 2 or n_b < 2:
        raise ValueError(f"grid={grid!r} must have at least 2 points per axis")
    own = model.shift_coefficients()
    k_own = own["k"][layer, chosen].detach().double()  # [head, lag]
    v_own = own["v"][layer, chosen].detach().double()  # [head, lag]
    labels = [f"L{layer}H{h}" for h in chosen]
    if coords == "mix":
        k_pos, v_pos = current_share(k_own), current_share(v_own)
    else:
        k_pos, v_pos = k_own[:, 0], v_own[:, 0]
    positions = {lab: (float(k_pos[i]), float(v_pos[i])) for i, lab in enumerate(labels)}
    gains = {lab: (float(k_own[i].abs().sum()), float(v_own[i].abs().sum()))
             for i, lab in enumerate(labels)}

    def default_span(pos: Tensor) -> tuple[float, float]:
        if coords == "raw":
            return (-0.5, 1.5)
        return (max(-1.0, min(-0.25, float(pos.min()) - 0.1)), 1.0)

    a_range = default_span(k_pos) if a_range is None else a_range
    b_range = default_span(v_pos) if b_range is None else b_range
    a1s = _axis(a_range, n_a, "a_range", coords)
    b1s = _axis(b_range, n_b, "b_range", coords)
    device = torch.device(model.cfg.device)
    batch = _batch_of(batch_or_task, n_sequences, seed).to(device)
    if batch.n_predictions == 0:
        raise ValueError("the batch has no masked positions, so there is no loss to map")

    point: dict[str, Tensor] = {}  # the current grid point, read by the hooks
    loss = torch.empty(n_a, n_b, dtype=torch.float64)
    grad = torch.empty(n_a, n_b, 2, dtype=torch.float64) if gradient else None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model_loss = float(masked_cross_entropy(model(batch.tokens), batch))
        hooks = [(f"blocks.{layer}.attn.hook_shift_k", _setter(point, "a", chosen, coords)),
                 (f"blocks.{layer}.attn.hook_shift_v", _setter(point, "b", chosen, coords))]
        with model.hooks(fwd_hooks=hooks), torch.set_grad_enabled(gradient):
            for i, a in enumerate(a1s.tolist()):
                for j, b in enumerate(b1s.tolist()):
                    point["a"] = torch.tensor(a, dtype=torch.float64, requires_grad=gradient)
                    point["b"] = torch.tensor(b, dtype=torch.float64, requires_grad=gradient)
                    here = masked_cross_entropy(model(batch.tokens), batch)
                    loss[i, j] = float(here.detach())
                    if grad is not None:
                        ga, gb = torch.autograd.grad(here, (point["a"], point["b"]))
                        grad[i, j, 0], grad[i, j, 1] = float(ga), float(gb)
    finally:
        model.train(was_training)
    logger.debug("landscape layer %d heads %s: %d x %d points, loss %.4f..%.4f", layer, chosen,
                 n_a, n_b, float(loss.min()), float(loss.max()))
    return Landscape(a1=a1s, b1=b1s, loss=loss, grad=grad, layer=layer, heads=chosen,
                     positions=positions, model_loss=model_loss,
                     n_sequences=int(batch.tokens.shape[0]), coords=coords, gains=gains)


def _set(coeffs: Float[Tensor, "kv_head lag"], value: Tensor, heads: list[int],
         coords: str = "raw") -> Float[Tensor, "kv_head lag"]:
    """``coeffs`` with the rows of ``heads`` replaced by ``(value, 1 - value)`` (raw) or by
    ``gain * (value, sign * (1 - |value|))`` at each row's own gain and lag-1 sign (mix), out of
    place so that gradients flow to ``value``."""
    sel = torch.zeros(coeffs.shape[0], 1, dtype=torch.bool, device=coeffs.device)
    sel[heads] = True
    value = value.to(coeffs.device)
    if coords == "raw":
        row = torch.stack([value, 1 - value]).to(coeffs.dtype)  # [lag]
    else:
        own = coeffs.detach()
        gain = own.abs().sum(-1, keepdim=True)  # [kv_head, 1]
        sign = torch.where(own[:, 1:2] < 0, -1.0, 1.0).to(own.dtype)  # [kv_head, 1]
        mix = torch.stack([value, 1 - value.abs()]).to(coeffs.dtype)  # [lag]
        row = gain * torch.cat([mix[:1].expand_as(sign), sign * mix[1:]], dim=-1)  # [kv_head, lag]
    return torch.where(sel, row, coeffs)


def _setter(point: dict[str, Tensor], name: str, heads: list[int], coords: str = "raw") -> Callable:
    def hook(coeffs: Float[Tensor, "kv_head lag"], hook) -> Float[Tensor, "kv_head lag"]:
        return _set(coeffs, point[name], heads, coords)

    return hook


__all__ = ["COORDS", "Landscape", "current_share", "loss_landscape", "plane_hooks"]
