"""The choices the configs accept, as ``Literal`` types, and type checks of dataclass fields.

Importable without torch or TransformerLens, so the command line can build its parser (and answer
``--help``) without loading either.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

PositionalEmbeddingType = Literal["standard", "rotary", "shortformer", "none"]
NormalizationType = Literal["LN", "RMS", "LNPre", "RMSPre"]
ActFn = Literal["gelu", "gelu_new", "relu", "silu"]
ShiftParam = Literal["free", "convex", "gain_mix"]
ShiftInit = Literal["identity", "uniform", "normal", "induction"]
ShiftPosition = Literal["pre_rotary", "post_rotary"]
AttentionDir = Literal["causal"]


def check_choice(name: str, value: Any, choices: Any, extra: str = "") -> None:
    """ValueError naming ``name``, ``value`` and the allowed values unless ``value`` is one."""
    allowed = get_args(choices)
    if value not in allowed:
        more = f" {extra}" if extra else ""
        raise ValueError(f"{name}={value!r} is not one of {list(allowed)}{more}")


def check_field_types(obj: Any) -> None:
    """Reject values of the wrong Python type (e.g. ``d_model="64"``) with the field's name, and
    NaN or infinite floats (no setting means anything at NaN)."""
    hints = typing.get_type_hints(type(obj))
    for field in dataclasses.fields(obj):
        if field.name in ("dtype", "device"):
            continue
        value = getattr(obj, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{field.name}={value!r} must be a finite number")
        expected = hints.get(field.name)
        if expected is None or _matches(value, expected):
            continue
        raise TypeError(
            f"config field {field.name}={value!r} has type {type(value).__name__}; "
            f"expected {_type_name(expected)}"
        )


def _matches(value: Any, expected: Any) -> bool:
    origin = get_origin(expected)
    if origin in (Union, types.UnionType):
        return any(_matches(value, arg) for arg in get_args(expected))
    if expected is type(None):
        return value is None
    if expected is Any:
        return True
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is tuple:
        return isinstance(value, tuple) and all(_matches(v, get_args(expected)[0]) for v in value)
    if isinstance(expected, type):
        return isinstance(value, expected)
    return True


def _type_name(expected: Any) -> str:
    if get_origin(expected) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(expected))
    return "None" if expected is type(None) else getattr(expected, "__name__", str(expected))
