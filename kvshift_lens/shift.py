"""The KV shift, as a pure function, and how its coefficients are parametrised and initialised.

PAPER.md (Xu et al. 2024), with ``shift(X)_t = X_{t-1}`` and ``shift(X)_0 = 0``::

    K'_t = alpha1 * K_t + alpha2 * K_{t-1}
    V'_t = beta1  * V_t + beta2  * V_{t-1}

Here a head's coefficients are a vector ``c`` over lags, ``c[0]`` for the current position and
``c[l]`` for position ``t - l``; so ``(alpha1, alpha2) = shift_k[head]`` and
``(beta1, beta2) = shift_v[head]``. With ``shift_window`` w > 1 the same formula runs over
``l = 0..w``: a causal depthwise filter, one scalar per head and lag. Positions before the start
of the sequence contribute zero, so position t never reads anything after t.
"""

from __future__ import annotations

from typing import get_args

import torch
from jaxtyping import Float
from torch import Tensor

from kvshift_lens.options import ShiftParam


def shift(
    x: Float[Tensor, "batch pos head d_head"],
    coeffs: Float[Tensor, "head lag"],
    past: Float[Tensor, "batch past head d_head"] | None = None,
) -> Float[Tensor, "batch pos head d_head"]:
    """Mix each position with the ``lag - 1`` positions before it: ``sum_l c[h, l] * x[t - l]``.

    Args:
        x: activations per position and head.
        coeffs: per-head coefficients; ``coeffs[:, 0]`` multiplies ``x_t``, ``coeffs[:, l]``
            multiplies ``x_{t-l}``. Cast to ``x.dtype`` (fp32 coefficients times bf16 activations
            would otherwise promote the whole tensor to fp32).
        past: the raw activations of up to ``lag - 1`` positions immediately before ``x`` (an
            incremental-decoding cache); positions before those count as zero.

    Returns:
        The shifted activations, same shape as ``x``.
    """
    n_lags = coeffs.shape[-1]
    c = coeffs.to(x.dtype)
    if past is None and n_lags > 1:
        return _Shift.apply(x, c)
    out = x * c[:, 0, None]
    if n_lags == 1:
        return out
    n_past = 0 if past is None else past.shape[1]
    full = x if n_past == 0 else torch.cat([past, x], dim=1)
    pos = x.shape[1]
    for lag in range(1, n_lags):
        # out[t] += c[lag] * full[n_past + t - lag] for every t with a source inside `full`.
        first = max(0, lag - n_past)
        if first >= pos:
            break
        src = full[:, n_past + first - lag : n_past + pos - lag]
        out[:, first:].addcmul_(src, c[:, lag, None])
    return out


class _Shift(torch.autograd.Function):
    """The shift with a hand-written backward: the same maths as the slicing code path, without the
    zero-filled gradient buffers that autograd allocates for each slice. Gradients::

        dx[t] = sum_l c_l g[t + l]          dc_l = sum_{batch, t, d_head} g[t] x[t - l]

    Each coefficient is first broadcast to a contiguous ``[head, d_head]`` block, so every
    elementwise pass runs over whole ``head * d_head`` rows (a ``[head, 1]`` operand splits them
    into ``d_head``-long pieces, several times slower on CPU); ``dc`` reduces contiguous products
    over ``(batch, pos)`` first (in at least float32), then over ``d_head``. BENCHMARKS.md has
    the measurements."""

    @staticmethod
    def forward(ctx, x: Tensor, c: Tensor) -> Tensor:
        ctx.save_for_backward(x, c)
        per_lag = _per_lag(c, x.shape[-1])  # [lag, head, d_head]
        out = x * per_lag[0]
        pos = x.shape[1]
        for lag in range(1, min(c.shape[1], pos)):
            out[:, lag:].addcmul_(x[:, : pos - lag], per_lag[lag])
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        x, c = ctx.saved_tensors
        pos, n_lags = x.shape[1], min(c.shape[1], x.shape[1])
        dx = dc = None
        if ctx.needs_input_grad[0]:
            per_lag = _per_lag(c, x.shape[-1])  # [lag, head, d_head]
            dx = g * per_lag[0]
            for lag in range(1, n_lags):
                dx[:, : pos - lag].addcmul_(g[:, lag:], per_lag[lag])
        if ctx.needs_input_grad[1]:
            dc = torch.zeros_like(c)  # lags longer than the sequence get no gradient
            acc = torch.promote_types(x.dtype, torch.float32)  # bf16 activations: float32 sums
            for lag in range(n_lags):
                products = g[:, lag:] * x[:, : pos - lag]  # [batch, pos - lag, head, d_head]
                dc[:, lag] = products.sum((0, 1), dtype=acc).sum(-1)
        return dx, dc


def _per_lag(c: Float[Tensor, "head lag"], d_head: int) -> Float[Tensor, "lag head d_head"]:
    return c.t()[:, :, None].expand(-1, -1, d_head).contiguous()


def project_to_simplex(v: Float[Tensor, "... lag"]) -> Float[Tensor, "... lag"]:
    """Euclidean projection of each row onto the probability simplex (Duchi et al. 2008)."""
    n = v.shape[-1]
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = u.cumsum(-1) - 1
    ind = torch.arange(1, n + 1, device=v.device, dtype=v.dtype)
    cond = (u - css / ind) > 0
    rho = cond.to(v.dtype).cumsum(-1).argmax(-1, keepdim=True)  # last index where cond holds
    theta = css.gather(-1, rho) / (rho + 1).to(v.dtype)
    return (v - theta).clamp_min(0)


SHIFT_PARAMS: tuple[str, ...] = get_args(ShiftParam)


def constrain(raw: Tensor, param: str, gain: Tensor | None = None) -> Tensor:
    """Coefficients from their stored parameters.

    ``free``: the parameter is the coefficient (the paper). ``convex``: the forward value is the
    projection onto the simplex (each coefficient in [0, 1], summing to 1 over lags), with a
    straight-through gradient, so identity is exactly representable and gradients still reach
    coefficients sitting at 0; :meth:`HookedKVShiftTransformer.constrain_shift_` projects the
    stored parameters after an optimiser step (projected gradient descent). ``gain_mix``: ``raw``
    is the mix, constrained to the simplex exactly as ``convex``, and ``gain [head]`` a separate
    free per-head scale; the coefficients are ``gain[:, None] * mix``, so what a head mixes and how
    much it scales are two parameters rather than one reading of the other.

    Args:
        raw: the stored ``[head, lag]`` parameter.
        param: one of :data:`SHIFT_PARAMS`.
        gain: ``[head]``, required by ``gain_mix`` and rejected otherwise.

    Returns:
        The effective ``[head, lag]`` coefficients.
    """
    if param not in SHIFT_PARAMS:
        raise ValueError(f"shift_param={param!r} is not one of {list(SHIFT_PARAMS)}")
    if (gain is not None) != (param == "gain_mix"):
        raise ValueError(f"shift_param={param!r} takes a gain only for 'gain_mix'; "
                         f"got gain={'None' if gain is None else tuple(gain.shape)}")
    if param == "free":
        return raw
    mix = raw + (project_to_simplex(raw.detach()) - raw.detach())
    if param == "convex":
        return mix
    return gain[:, None] * mix


def init_coefficients(
    n_heads: int,
    n_lags: int,
    scheme: str,
    which: str,
    std: float = 0.1,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    param: str = "free",
) -> Float[Tensor, "head lag"]:
    """Initial coefficients for one shifted projection.

    Args:
        n_heads: heads sharing this projection (KV heads for K and V, query heads for Q).
        n_lags: ``shift_window + 1``.
        scheme: ``identity`` (1 at lag 0, exactly vanilla), ``uniform`` (``1 / n_lags`` each),
            ``normal`` (identity plus N(0, std) noise, ``n_heads * n_lags`` float32 draws from
            ``generator``, or torch's global RNG when it is None), ``induction`` (keys read the
            previous token, values and queries the current one: the paper's one-layer
            induction point).
        which: "q", "k" or "v" (only ``induction`` depends on it).
        dtype: of the result; the values are computed in float32 and then cast.
        param: the parametrisation (see :func:`constrain`); ``convex`` and ``gain_mix`` project
            the initial values onto the simplex, so the stored parameter starts feasible (for
            ``gain_mix`` this is the mix; its gain starts at 1, :func:`init_gain`).

    Returns:
        ``[head, lag]`` coefficients; ``[:, 0]`` multiplies the current position.
    """
    out = torch.zeros(n_heads, n_lags)
    if scheme == "identity":
        out[:, 0] = 1
    elif scheme == "uniform":
        out[:] = 1.0 / n_lags
    elif scheme == "normal":
        out[:, 0] = 1
        out = out + std * torch.randn(n_heads, n_lags, generator=generator, dtype=torch.float32)
    elif scheme == "induction":
        out[:, 1 if which == "k" else 0] = 1
    else:
        raise ValueError(
            f"shift_init={scheme!r} is not one of ['identity', 'uniform', 'normal', 'induction']"
        )
    if param in ("convex", "gain_mix"):
        out = project_to_simplex(out)
    elif param != "free":
        raise ValueError(f"shift_param={param!r} is not one of {list(SHIFT_PARAMS)}")
    return out.to(dtype)


def init_gain(n_heads: int, dtype: torch.dtype = torch.float32) -> Float[Tensor, " head"]:
    """The initial per-head gain of ``shift_param="gain_mix"``: 1, the gain of every init scheme
    but ``normal`` (whose gain-1 mix is its projection onto the simplex, as for ``convex``), so
    ``identity`` stays exactly vanilla."""
    return torch.ones(n_heads, dtype=dtype)


SHIFT_PARAMETER_NAMES = ("shift_q", "shift_k", "shift_v")
GAIN_PARAMETER_NAMES = ("shift_q_gain", "shift_k_gain", "shift_v_gain")


def is_shift_parameter(name: str) -> bool:
    """Whether a parameter name is a shift parameter: a coefficient (or, for ``gain_mix``, mix)
    parameter ``shift_q``, ``shift_k`` or ``shift_v``, or a ``gain_mix`` gain ``shift_q_gain``,
    ``shift_k_gain`` or ``shift_v_gain``, alone or with its module path
    (``blocks.0.attn.shift_k``).

    The one place that says so: optimiser groups and freezing for coefficient-only fine-tuning
    ask here (the simplex projection asks :func:`is_gain_parameter` which ones to leave alone).
    """
    return name.rsplit(".", 1)[-1] in SHIFT_PARAMETER_NAMES + GAIN_PARAMETER_NAMES


def is_gain_parameter(name: str) -> bool:
    """Whether a parameter name is a ``gain_mix`` per-head gain (``shift_{q,k,v}_gain``)."""
    return name.rsplit(".", 1)[-1] in GAIN_PARAMETER_NAMES


def gain_and_mix(
    coeffs: Float[Tensor, "... lag"],
) -> tuple[Float[Tensor, "..."], Float[Tensor, "... lag"]]:
    """Read coefficients as a gain times a mix over lags: ``c = gain * mix``.

    ``gain = sum_l |c_l|`` (how much the shift scales the keys or values it mixes: 1 for vanilla
    and for every convex coefficient vector) and ``mix = c / gain`` (what it mixes: on the simplex
    when every coefficient is >= 0, with ``sum_l |mix_l| = 1`` always). Free coefficients trained
    at a high learning rate grow into gains (alpha2 of 4 is a mix of about 0.9 at a gain of 4.5),
    so compare heads by their mix, never by raw values. A head whose coefficients are all zero has
    gain 0 and, by convention, the identity mix (all weight at lag 0).

    Returns:
        ``(gain [...], mix [..., lag])``.
    """
    gain = coeffs.abs().sum(-1)
    identity = torch.zeros_like(coeffs)
    identity[..., 0] = 1
    safe = torch.where(gain > 0, gain, torch.ones_like(gain))
    mix = torch.where((gain > 0)[..., None], coeffs / safe[..., None], identity)
    return gain, mix


def previous_share(coeffs: Float[Tensor, "... lag"]) -> Float[Tensor, "..."]:
    """The share of a head's mix on earlier positions, ``sum_{l >= 1} |c_l| / sum_l |c_l|``, in
    [0, 1]: 0 for vanilla attention, 1 for a key that describes only the previous token (the
    paper's one-layer induction key). Scale-free, so it compares heads whatever their gains."""
    _, mix = gain_and_mix(coeffs)
    return mix[..., 1:].abs().sum(-1)
