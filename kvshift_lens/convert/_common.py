"""Shared pieces of the Hugging Face converters: reading a state dict key by key (so that a missing,
misshapen or left-over weight is reported by name) and checking config options."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

# HF activation names whose maths our MLP reproduces exactly.
ACT_FNS = {
    "gelu": "gelu",
    "gelu_new": "gelu_new",
    "gelu_pytorch_tanh": "gelu_new",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}


def act_fn(arch: str, option: str, value: str) -> str:
    if value not in ACT_FNS:
        raise NotImplementedError(
            f"{arch}: {option}={value!r} is not supported; supported activations: {sorted(ACT_FNS)}"
        )
    return ACT_FNS[value]


def require(arch: str, hf_config: Any, option: str, expected: Any, why: str = "") -> None:
    """Raise NotImplementedError naming ``option`` unless the config's value equals ``expected``
    (an option the config does not have counts as its expected value)."""
    value = getattr(hf_config, option, expected)
    if value != expected:
        more = f" ({why})" if why else ""
        raise NotImplementedError(
            f"{arch}: {option}={value!r} is not supported; only {option}={expected!r} "
            f"converts exactly{more}"
        )


def rope_settings(arch: str, hf_config: Any) -> tuple[float, float]:
    """``(rope_theta, partial_rotary_factor)`` from ``rope_parameters`` (transformers 5) or the
    4.x attributes, rejecting every RoPE variant other than the default one."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    scaling = getattr(hf_config, "rope_scaling", None)
    if scaling and scaling is not params:
        params = {**params, **dict(scaling)}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise NotImplementedError(
            f"{arch}: rope_scaling / rope_parameters with rope_type={rope_type!r} "
            f"({params}) is not supported; only default (unscaled) RoPE converts exactly"
        )
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    if theta is None:
        theta = getattr(hf_config, "rotary_emb_base", 10000.0)
    partial = params.get("partial_rotary_factor")
    if partial is None:
        partial = getattr(hf_config, "partial_rotary_factor", None)
    if partial is None:
        partial = getattr(hf_config, "rotary_pct", 1.0)
    return float(theta), float(partial)


class StateDictReader:
    """Takes HF tensors by key, checking shapes, and reports whatever was never taken."""

    def __init__(self, arch: str, state_dict: Mapping[str, Tensor], prefixes: Iterable[str],
                 ignore_suffixes: Iterable[str] = ()):
        self.arch = arch
        self.sd: dict[str, Tensor] = {}
        for key, value in state_dict.items():
            for prefix in prefixes:
                if key.startswith(prefix):
                    key = key[len(prefix):]
                    break
            self.sd[key] = value
        self.ignore_suffixes = tuple(ignore_suffixes)
        self.used: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.sd

    def take(self, key: str, shape: tuple[int, ...]) -> Tensor:
        if key not in self.sd:
            near = sorted(k for k in self.sd if k.rsplit(".", 1)[0] == key.rsplit(".", 1)[0])
            hint = f"; keys with that prefix: {near}" if near else ""
            raise ValueError(
                f"{self.arch}: the state dict has no {key!r}, which this config needs{hint}")
        t = self.sd[key]
        if tuple(t.shape) != tuple(shape):
            raise ValueError(
                f"{self.arch}: {key!r} has shape {tuple(t.shape)}, but the config implies "
                f"{tuple(shape)}; the state dict and hf_config do not match"
            )
        self.used.add(key)
        return t

    def take_optional(self, key: str, shape: tuple[int, ...]) -> Tensor | None:
        return self.take(key, shape) if key in self.sd else None

    def finish(self) -> None:
        left = sorted(k for k in self.sd if k not in self.used
                      and not k.endswith(self.ignore_suffixes))
        if left:
            shown = left[:8] + (["..."] if len(left) > 8 else [])
            raise ValueError(
                f"{self.arch}: the state dict has weights this converter does not understand: "
                f"{shown}. The model may not be a plain causal LM of this architecture (e.g. a "
                "classification head, cross-attention, or an option the converter does not "
                "support)"
            )


def tied_unembed(reader: StateDictReader, key: str, W_E: Tensor, tied: bool,
                 shape: tuple[int, ...]) -> Tensor | None:
    """The unembedding ``[d_vocab, d_model]`` HF weight, or None when tied. A tied config whose
    head differs from the embedding is a mismatch; an untied one must have a head."""
    if tied:
        head = reader.take_optional(key, shape)
        if head is not None and not torch.equal(head, W_E):
            raise ValueError(
                f"{reader.arch}: tie_word_embeddings=True but {key!r} differs from the token "
                "embedding; set tie_word_embeddings=False in hf_config if the head is separate"
            )
        return None
    if key not in reader:
        raise ValueError(
            f"{reader.arch}: tie_word_embeddings=False but the state dict has no {key!r} (a base "
            "model without a language-model head?); pass the *ForCausalLM / *LMHeadModel model "
            "or set tie_word_embeddings=True in hf_config if the head is the embedding"
        )
    return reader.take(key, shape)
