"""Retrofit pretrained Hugging Face models: load GPT-2, Llama-family or GPT-NeoX (Pythia) weights into a
:class:`~kvshift_lens.HookedKVShiftTransformer` whose shift coefficients start at identity, so the
converted model computes exactly what the original does until the shift is trained.

Only options our model reproduces exactly are accepted; anything else (RoPE scaling, a sliding
window, biases the model has no slot for, a head that is not tied as the config says, ...) raises
``NotImplementedError`` (an unsupported option) or ``ValueError`` (a state dict that does not match
its config), naming the option or key.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from kvshift_lens.config import _DTYPES, KVShiftConfig
from kvshift_lens.convert import gpt2, llama, neox
from kvshift_lens.convert._common import StateDictReader
from kvshift_lens.model import HookedKVShiftTransformer
from kvshift_lens.shift import is_shift_parameter

logger = logging.getLogger(__name__)

_CONVERTERS = {t: mod for mod in (gpt2, llama, neox) for t in mod.MODEL_TYPES}

# Config fields that define the architecture: they come from the HF config and cannot be overridden
# (the weights would no longer fit, or would compute something else).
_ARCHITECTURE_FIELDS = frozenset({
    "d_model", "d_head", "n_heads", "n_layers", "d_mlp", "d_vocab", "n_key_value_heads",
    "normalization_type", "act_fn", "gated_mlp", "attn_only", "positional_embedding_type",
    "rotary_dim", "rotary_base", "tie_word_embeddings", "parallel_attn_mlp", "eps",
    "uses_rms_norm", "final_rms", "layer_norm_folding", "num_experts", "experts_per_token",
})
# Set through from_hf's own arguments.
_ARGUMENT_FIELDS = {"shift_q": "shift", "shift_k": "shift", "shift_v": "shift",
                    "shift_window": "shift_window", "device": "device", "dtype": "dtype"}


class ModelNotAvailableError(OSError):
    """A model name could not be loaded (no network access and no local copy)."""


def supported_model_types() -> list[str]:
    """The ``config.model_type`` values :func:`from_hf` converts."""
    return sorted(_CONVERTERS)


def load_hf_model(name: str, **from_pretrained_kwargs: Any) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(name, trust_remote_code=False)``, with a clear error
    when it cannot be had. Code shipped with a model (``auto_map``) is never run."""
    from transformers import AutoModelForCausalLM

    if from_pretrained_kwargs.pop("trust_remote_code", False):
        raise ValueError("trust_remote_code=True is not supported: kvshift_lens never runs code "
                         f"shipped with a model ({name!r}); convert a model transformers ships")
    try:
        return AutoModelForCausalLM.from_pretrained(name, trust_remote_code=False,
                                                    **from_pretrained_kwargs)
    except OSError as e:
        raise ModelNotAvailableError(
            f"could not load the Hugging Face model {name!r}: it is not a local folder and could not "
            "be downloaded (no network access, or not in the local Hugging Face cache, or the name "
            "does not exist / needs a token). Loading by name needs network access or a cached "
            "copy; otherwise load the model yourself and pass it (or its state_dict() with "
            f"hf_config=...) to from_hf. Original error: {e}"
        ) from e


def module_weights(module: nn.Module, prefix: str = "") -> dict[str, Tensor]:
    """The parameters of a HF model by state-dict name, seen through TransformerLens bridge
    wrappers: a ``TransformerBridge`` replaces HF submodules in place by components that hold the
    original as ``_original_component`` next to aliases (e.g. GPT-2's ``attn.q`` viewing
    ``c_attn``); here only the original is followed, so the names are the plain HF ones."""
    original = module._modules.get("_original_component")
    if original is not None:
        return module_weights(original, prefix)
    out = {prefix + n: p for n, p in module._parameters.items() if p is not None}
    for n, child in module._modules.items():
        if child is not None:
            out.update(module_weights(child, prefix + n + "."))
    return out


def _load_tokenizer(name: str) -> Any:
    """The name's tokenizer, or None (with a warning) when it has none or it cannot be loaded."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    except Exception as e:  # a model without a usable tokenizer still converts
        logger.warning("no tokenizer loaded for %r (%s); pass tokenizer=... to carry one over", name, e)
        return None


def _as_hf_config(hf_config: Any) -> Any:
    if isinstance(hf_config, Mapping):
        from transformers import AutoConfig

        cfg = dict(hf_config)
        if "model_type" not in cfg:
            raise ValueError("hf_config given as a dict needs a 'model_type' key (as in config.json)")
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    if not hasattr(hf_config, "model_type"):
        raise TypeError(
            f"hf_config must be a transformers PretrainedConfig or a config.json dict, got "
            f"{type(hf_config).__name__}")
    return hf_config


def _shift_flags(shift: Iterable[str] | str | None) -> dict[str, bool]:
    which = set() if shift is None else set(shift)
    unknown = sorted(which - {"q", "k", "v"})
    if unknown:
        raise ValueError(f"shift={shift!r}: {unknown} not among 'q', 'k', 'v'")
    return {f"shift_{w}": w in which for w in "qkv"}


def _resolve_dtype(dtype: Any, state_dict: Mapping[str, Tensor]) -> torch.dtype:
    if dtype is None:
        floats = [t.dtype for t in state_dict.values() if torch.is_tensor(t) and t.is_floating_point()]
        dtype = floats[0] if floats else torch.float32
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r} is not one of {sorted(_DTYPES)}")
        dtype = _DTYPES[dtype]
    if dtype not in _DTYPES.values():
        raise ValueError(f"dtype={dtype} is not supported; expected one of {sorted(_DTYPES)}")
    return dtype


def from_hf(
    model_or_name_or_state_dict: nn.Module | str | os.PathLike | Mapping[str, Tensor],
    hf_config: Any = None,
    tokenizer: Any = None,
    shift: Iterable[str] | str | None = ("k", "v"),
    shift_window: int = 1,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    **config_overrides: Any,
) -> HookedKVShiftTransformer:
    """Convert a Hugging Face causal LM into a :class:`HookedKVShiftTransformer`.

    Args:
        model_or_name_or_state_dict: a ``transformers`` model (``GPT2LMHeadModel``,
            ``LlamaForCausalLM``, ``MistralForCausalLM`` without sliding window,
            ``GPTNeoXForCausalLM``, or their base models when the head is tied), its
            ``state_dict()`` (then ``hf_config`` is required), or a name / local folder, loaded with
            ``AutoModelForCausalLM.from_pretrained`` (needs network access or a local cache).
        hf_config: the HF config (``PretrainedConfig`` or a ``config.json`` dict); defaults to the
            model's own.
        tokenizer: a HF tokenizer to carry over (``model.tokenizer``); when loading by name the
            name's tokenizer is tried.
        shift: which projections get a KV shift, any of "q", "k", "v" (``()`` = vanilla).
        shift_window: positions mixed per shift (1 = the paper).
        device, dtype: where and in what precision to build the model (``dtype`` None: the HF
            weights' dtype).
        config_overrides: other :class:`KVShiftConfig` fields, e.g. ``shift_param="convex"``,
            ``use_sdpa=False``, hook flags, ``n_ctx`` (rotary models only). ``shift_init`` other
            than "identity" makes the model differ from the original by design. Fields that define
            the architecture cannot be overridden.

    Returns:
        The converted model in eval mode. With the default ``shift_init="identity"`` its logits
        equal the original's up to float rounding.

    Raises:
        ModelNotAvailableError: a name could not be loaded (an ``OSError``).
        NotImplementedError: the architecture or one of its options is not supported.
        ValueError: the state dict does not match the config, or a bad override.
    """
    source = model_or_name_or_state_dict
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        source = load_hf_model(name)
        if tokenizer is None:
            tokenizer = _load_tokenizer(name)
    if isinstance(source, nn.Module):
        if hf_config is None:
            hf_config = getattr(source, "config", None)
            if hf_config is None:
                raise TypeError(f"{type(source).__name__} has no .config; pass hf_config=...")
        state_dict = module_weights(source)
    elif isinstance(source, Mapping):
        if hf_config is None:
            raise ValueError("converting a state dict needs hf_config= (the model's HF config)")
        state_dict = source
    else:
        raise TypeError(
            "from_hf takes a transformers model, a state dict or a model name, got "
            f"{type(source).__name__}")
    hf_config = _as_hf_config(hf_config)

    model_type = getattr(hf_config, "model_type", None)
    conv = _CONVERTERS.get(model_type)
    if conv is None:
        archs = getattr(hf_config, "architectures", None) or [type(hf_config).__name__]
        raise NotImplementedError(
            f"architecture {model_type!r} ({', '.join(archs)}) is not supported; from_hf converts "
            f"model_type in {supported_model_types()} (GPT-2, Llama, Mistral without sliding "
            "window, GPT-NeoX / Pythia)"
        )

    bad = sorted(set(config_overrides) & _ARCHITECTURE_FIELDS)
    if bad:
        raise ValueError(
            f"cannot override {bad}: these define the architecture and come from hf_config "
            "(the converted weights would not fit or would compute something else)")
    bad = sorted(set(config_overrides) & set(_ARGUMENT_FIELDS))
    if bad:
        raise ValueError(f"set {bad} through from_hf's arguments "
                         f"{sorted({_ARGUMENT_FIELDS[b] for b in bad})}, not as config overrides")

    cfg_dict = conv.config_from_hf(hf_config)
    if "n_ctx" in config_overrides and cfg_dict["positional_embedding_type"] == "standard":
        raise ValueError(
            "cannot override n_ctx for a model with learned positional embeddings: it is the "
            "number of rows of W_pos")
    name_or_path = getattr(hf_config, "_name_or_path", None) or getattr(hf_config, "name_or_path", None)
    if name_or_path:
        cfg_dict["tokenizer_name"] = str(name_or_path)
    cfg_dict.update(_shift_flags(shift))
    cfg_dict.update(config_overrides)
    cfg = KVShiftConfig.from_dict({**cfg_dict, "shift_window": shift_window, "device": str(device),
                                   "dtype": _resolve_dtype(dtype, state_dict)})

    reader = StateDictReader(conv.ARCH, state_dict, conv.PREFIXES, conv.IGNORE_SUFFIXES)
    weights = conv.weights_from_hf(reader, cfg, hf_config)
    reader.finish()

    model = HookedKVShiftTransformer(cfg, tokenizer=tokenizer)
    _load_weights(model, weights)
    return model.eval()


@torch.no_grad()
def _load_weights(model: HookedKVShiftTransformer, weights: dict[str, Tensor]) -> None:
    params = dict(model.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:  # a converter bug, never the user's input
        raise RuntimeError(f"converter produced weights the model does not have: {unknown}")
    # Biases an architecture lacks stay at their zero initialisation, norms at one; every weight
    # matrix must come from the checkpoint.
    missing = sorted(n for n in params if n not in weights
                     and n.rsplit(".", 1)[-1].lstrip("_").startswith("W_"))
    if missing:
        raise RuntimeError(f"converter left weight matrices uninitialised: {missing}")
    for name, p in params.items():
        if name in weights:
            p.copy_(weights[name].to(device=p.device, dtype=p.dtype))
        elif not is_shift_parameter(name):
            leaf = name.rsplit(".", 1)[-1]
            p.fill_(1.0 if leaf == "w" else 0.0)


def from_transformer_bridge(bridge: Any, **kwargs: Any) -> HookedKVShiftTransformer:
    """Convert the Hugging Face model inside a TransformerLens 4 ``TransformerBridge``.

    The bridge wraps the HF model (``bridge.original_model``) without changing its weights unless
    weight processing ran (``enable_compatibility_mode()`` with processing, or
    ``process_weights()``), which folds and centres them in place; such a bridge is refused, since
    its weights are no longer the checkpoint's. The bridge's tokenizer is carried over. Keyword
    arguments go to :func:`from_hf`.
    """
    if getattr(bridge, "_weights_processed", False):
        raise ValueError(
            "this TransformerBridge's weights were processed (fold_ln / centering / value-bias "
            "folding by enable_compatibility_mode() or process_weights()), so they are no longer "
            "the checkpoint's; boot a fresh bridge, or use enable_compatibility_mode("
            "no_processing=True), or convert the HF model directly with from_hf")
    try:
        hf_model = bridge.original_model
    except AttributeError as e:
        raise NotImplementedError(
            "this bridge exposes no local torch module (e.g. a vLLM or remote driver), so its "
            "weights cannot be read") from e
    kwargs.setdefault("tokenizer", getattr(bridge, "tokenizer", None))
    return from_hf(hf_model, **kwargs)
