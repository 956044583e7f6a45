"""``HookedKVShiftTransformer``: a decoder-only transformer whose attention can shift keys and values,
built as a TransformerLens 4 ``HookedRootModule`` with HookedTransformer's names and shapes, so
``ActivationCache``, ``patching``, ``head_detector``, ``tools.training`` and ``ProcessWeights`` take
it unchanged (TL4_CONTRACT.md).

Axis names: the package docstring's vocabulary (:mod:`kvshift_lens`).
"""

from __future__ import annotations

import logging
import operator
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.ActivationCache import ActivationCache
from transformer_lens.hook_points import HookPoint
from transformer_lens.HookedRootModule import HookedRootModule
from transformer_lens.utilities import Slice
from transformers import PreTrainedTokenizerBase

from kvshift_lens import generate as generation
from kvshift_lens.checkpoint import (
    CheckpointError,
    check_state_dict,
    read_checkpoint,
    save_checkpoint_files,
)
from kvshift_lens.components import Embed, PosEmbed, TransformerBlock, Unembed, make_norm
from kvshift_lens.components.attention import LayerKVCache
from kvshift_lens.config import KVShiftConfig
from kvshift_lens.hooked_transformer import (
    check_refactorable,
    get_act_name,
    hooked_transformer_state_dict,
)
from kvshift_lens.hooked_transformer import (
    refactor_factored_attn_matrices as refactor_state_dict,
)
from kvshift_lens.processing import _center_writer, fold_layer_norm
from kvshift_lens.shift import (
    gain_and_mix,
    is_gain_parameter,
    is_shift_parameter,
    previous_share,
    project_to_simplex,
)
from kvshift_lens.tokenizer import UNKNOWN_TOKEN, as_hf_tokenizer

logger = logging.getLogger(__name__)

ReturnType = Literal["logits", "loss", "both"] | None


@dataclass
class KVShiftCache:
    """Incremental-decoding state: per layer, the shifted K/V seen so far plus the last
    ``shift_window`` raw inputs of each shifted projection (see :class:`LayerKVCache`)."""

    layers: list[LayerKVCache]

    @classmethod
    def empty(cls, n_layers: int) -> KVShiftCache:
        return cls([LayerKVCache() for _ in range(n_layers)])

    @property
    def length(self) -> int:
        return self.layers[0].length

    @property
    def batch_size(self) -> int | None:
        """The batch size of the cached sequences (None while the cache is empty)."""
        k = self.layers[0].k
        return None if k is None else k.shape[0]

    def check_fits(self, tokens: Tensor, n_layers: int) -> None:
        """Raise ValueError unless ``tokens`` can continue the cached sequences."""
        if len(self.layers) != n_layers:
            raise ValueError(f"past_kv_cache has {len(self.layers)} layers but the model has "
                             f"{n_layers}; make it with model.new_cache()")
        if self.batch_size is not None and tokens.shape[0] != self.batch_size:
            raise ValueError(
                f"past_kv_cache holds {self.batch_size} sequences but the input has batch size "
                f"{tokens.shape[0]}; continue the same batch, or start a new cache with "
                "model.new_cache()")


@dataclass
class ShiftCoefficients:
    """All shift coefficients of a model, labelled.

    ``values[which]`` is ``[layer, head, lag]`` for each shifted projection ``which`` in
    ``("q", "k", "v")`` (heads are KV heads for k and v, query heads for q); lag 0 multiplies the
    current position, lag l the position l steps back. For the paper's window 1:
    ``alpha1, alpha2 = values["k"][..., 0], values["k"][..., 1]`` and ``beta1, beta2`` likewise from
    ``values["v"]``.
    """

    values: dict[str, Tensor]

    def __getitem__(self, which: str) -> Tensor:
        if which not in self.values:
            raise KeyError(f"{which!r} is not shifted in this model; shifted: {list(self.values)}")
        return self.values[which]

    @property
    def shifted(self) -> list[str]:
        return list(self.values)

    def gain(self, which: str) -> Float[Tensor, "layer head"]:
        """``sum_l |c_l|`` per head (see :func:`kvshift_lens.shift.gain_and_mix`)."""
        return gain_and_mix(self[which])[0]

    def mix(self, which: str) -> Float[Tensor, "layer head lag"]:
        """The coefficients over their gain: what a head mixes, whatever its scale."""
        return gain_and_mix(self[which])[1]

    def previous_share(self, which: str) -> Float[Tensor, "layer head"]:
        """Share of each head's mix on earlier positions, in [0, 1]
        (:func:`kvshift_lens.shift.previous_share`)."""
        return previous_share(self[which])

    def records(self) -> list[dict[str, Any]]:
        """Long format: one dict per (layer, head, which, lag) with its raw value, the head's gain
        and its mix at that lag."""
        out = []
        for which, t in self.values.items():
            gain, mix = gain_and_mix(t)
            rows = zip(_index_grid(t.shape), t.flatten().tolist(), mix.flatten().tolist())
            for (layer, head, lag), v, m in rows:
                out.append({"layer": layer, "head": head, "which": which, "lag": lag, "value": v,
                            "gain": float(gain[layer, head]), "mix": m})
        return out

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame.from_records(self.records())


def _index_grid(shape: torch.Size) -> list[tuple[int, ...]]:
    return [tuple(int(i) for i in idx) for idx in torch.cartesian_prod(
        *[torch.arange(n) for n in shape]).reshape(-1, len(shape)).tolist()]


def is_coefficient_hook(name: str) -> bool:
    """Whether a hook name is a shift-coefficient hook (``hook_shift_{q,k,v}``: ``[head, lag]``,
    no batch or position axis)."""
    return name.split(".")[-1].startswith("hook_shift_")


class KVShiftActivationCache(ActivationCache):
    """TransformerLens' ActivationCache, except that :meth:`remove_batch_dim` leaves the
    coefficient hooks alone: they have no batch axis, and TransformerLens would squeeze the head
    axis of a model with a single key/value head; and short names know the shift's hooks:
    ``cache["k_shifted", 0]``, ``cache["v_shifted", 0]``, ``cache["shift_k", 0]``
    (:func:`kvshift_lens.hooked_transformer.get_act_name`)."""

    def __getitem__(self, key) -> Tensor:
        if isinstance(key, str) or key in self.cache_dict:
            return super().__getitem__(key if key in self.cache_dict else get_act_name(key))
        if len(key) > 1 and key[1] is not None and key[1] < 0:
            key = (key[0], self.model.cfg.n_layers + key[1], *key[2:])
        return self.cache_dict[get_act_name(*key)]

    def remove_batch_dim(self, batch_size: int | None = None) -> ActivationCache:
        if not self.has_batch_dim:
            return super().remove_batch_dim(batch_size)
        kept = {k: v for k, v in self.cache_dict.items() if is_coefficient_hook(k)}
        if batch_size is None:
            others = [v for k, v in self.cache_dict.items() if k not in kept and v.ndim > 0]
            batch_size = others[0].shape[0] if others else 1
        super().remove_batch_dim(batch_size)
        self.cache_dict.update(kept)
        return self


class HookedKVShiftTransformer(HookedRootModule):
    """A hooked decoder-only transformer with KV shifting attention.

    Args:
        cfg: the model config (a :class:`KVShiftConfig` or a dict of its fields).
        tokenizer: optional ``tokenizers.Tokenizer`` (held as ``model.tokenizer`` wrapped in
            ``transformers.PreTrainedTokenizerFast``, see
            :func:`~kvshift_lens.tokenizer.as_hf_tokenizer`) or ``transformers`` tokenizer (held
            as it is); models on integer tokens need none.
        generator: a ``torch.Generator`` for the initial weights (None: one seeded with
            ``cfg.seed`` when the config sets it, else torch's global RNG).
    """

    def __init__(
        self,
        cfg: KVShiftConfig | dict,
        tokenizer: Any = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if isinstance(cfg, dict):
            cfg = KVShiftConfig.from_dict(cfg)
        if not isinstance(cfg, KVShiftConfig):
            raise TypeError(f"cfg must be a KVShiftConfig or dict, got {type(cfg).__name__}")
        self.cfg = cfg
        # Always a Hugging Face tokenizer (a raw tokenizers.Tokenizer is wrapped), as
        # TransformerLens code reading model.tokenizer expects.
        self.tokenizer = None if tokenizer is None else as_hf_tokenizer(tokenizer)
        if self.tokenizer is not None and len(self.tokenizer) > cfg.d_vocab:
            raise ValueError(
                f"tokenizer has {len(self.tokenizer)} tokens but d_vocab={cfg.d_vocab}; "
                "set d_vocab >= the tokenizer's vocabulary size"
            )

        # Each part initialises its own parameters; one generator, passed down in declaration
        # order, draws them all (cfg.seed makes one when none is given).
        if generator is None and cfg.seed is not None:
            generator = torch.Generator().manual_seed(cfg.seed)
        self.embed = Embed(cfg, generator)
        self.hook_embed = HookPoint()  # [batch, pos, d_model]
        if cfg.positional_embedding_type in ("standard", "shortformer"):
            self.pos_embed = PosEmbed(cfg, generator)
            self.hook_pos_embed = HookPoint()  # [batch, pos, d_model]
        self.blocks = nn.ModuleList(
            [TransformerBlock(cfg, i, generator) for i in range(cfg.n_layers)])
        self.ln_final = make_norm(cfg)
        self.unembed = Unembed(cfg, self.embed, generator)
        self.setup()
        self.to(cfg.device)

    # ------------------------------------------------------------------ caching
    def get_caching_hooks(self, names_filter=None, incl_bwd=False, device=None,
                          remove_batch_dim=False, cache=None, pos_slice=None):
        """As HookedRootModule's, but slices each hook on its own position axis (``pos_dim``):
        per-head hooks such as ``attn.hook_k_shifted`` on dim 1 of ``[b, p, head, d]``, and never
        the coefficient hooks, which have no position axis."""
        cache = {} if cache is None else cache
        pos_slice = Slice.unwrap(pos_slice)
        if names_filter is None:
            names_filter = lambda name: True  # noqa: E731
        elif isinstance(names_filter, str):
            wanted = names_filter
            names_filter = lambda name: name == wanted  # noqa: E731
        elif isinstance(names_filter, list):
            wanted_list = names_filter
            names_filter = lambda name: name in wanted_list  # noqa: E731
        elif not callable(names_filter):
            raise ValueError(
                f"names_filter must be a string, list of strings or function, got "
                f"{type(names_filter).__name__}"
            )
        self.is_caching = True

        def save_hook(tensor: Tensor, hook: HookPoint, is_backward: bool = False):
            name = hook.name + ("_grad" if is_backward else "")
            x = tensor.detach().to(device)
            pos_dim = getattr(hook, "pos_dim", None)
            has_pos = not is_coefficient_hook(name)
            if remove_batch_dim and has_pos:
                x = x[0]
            if has_pos and pos_slice.slice is not None:
                dim = (1 if pos_dim is None else pos_dim) - (1 if remove_batch_dim else 0)
                x = pos_slice.apply(x, dim=dim)
            cache[name] = x

        fwd, bwd = [], []
        for name in self.hook_dict:
            if names_filter(name):
                fwd.append((name, lambda t, hook: save_hook(t, hook, False)))
                if incl_bwd:
                    bwd.append((name, lambda t, hook: save_hook(t, hook, True)))
        return cache, fwd, bwd

    def run_with_cache(self, *model_args, return_cache_object: bool = True,
                       remove_batch_dim: bool = False, **kwargs):
        """Run the model and return ``(output, ActivationCache)`` (or a plain dict with
        ``return_cache_object=False``). ``names_filter`` limits what is stored: hooks it excludes
        cost nothing, and unless it includes a pattern or score hook attention runs on the fast
        path."""
        out, cache_dict = super().run_with_cache(*model_args, remove_batch_dim=remove_batch_dim,
                                                 **kwargs)
        if return_cache_object:
            return out, KVShiftActivationCache(cache_dict, self,
                                               has_batch_dim=not remove_batch_dim)
        return out, cache_dict

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input: str | list[str] | Int[Tensor, "batch pos"] | Int[Tensor, " pos"]
        | Float[Tensor, "batch pos d_model"],
        return_type: ReturnType = "logits",
        loss_per_token: bool = False,
        prepend_bos: bool | None = None,
        past_kv_cache: KVShiftCache | None = None,
        stop_at_layer: int | None = None,
        start_at_layer: int | None = None,
        tokens: Int[Tensor, "batch pos"] | None = None,
        shortformer_pos_embed: Float[Tensor, "batch pos d_model"] | None = None,
    ) -> Any:
        """Run the model.

        Args:
            input: token ids ``[batch, pos]`` (or ``[pos]``), or text when the model has a
                tokenizer; with ``start_at_layer``, the residual stream before that block
                ``[batch, pos, d_model]``.
            return_type: "logits" ``[batch, pos, d_vocab]``, "loss" (mean next-token cross
                entropy, or ``[batch, pos - 1]`` with ``loss_per_token``), "both" (logits, loss),
                or None.
            past_kv_cache: incremental-decoding state, extended in place.
            stop_at_layer: return the residual stream before this block (no unembedding).
            start_at_layer: run blocks ``start_at_layer:stop_at_layer`` only, on ``input`` as the
                residual stream before block ``start_at_layer`` (as HookedTransformer; negative
                indices count from the end). The embedding hooks do not fire.
            tokens: with ``start_at_layer``, the token ids ``[batch, pos]`` the loss is computed
                on (needed for return_type "loss" / "both").
            shortformer_pos_embed: with ``start_at_layer`` on a shortformer model, the positional
                embedding ``[batch, pos, d_model]`` the attention layers add to their queries and
                keys (``cache["pos_embed"]``); required there, refused elsewhere.
        """
        if return_type not in ("logits", "loss", "both", None):
            raise ValueError(
                f"return_type={return_type!r} is not one of ['logits', 'loss', 'both', None]"
            )
        start = self._layer_index("start_at_layer", start_at_layer)
        stop = self._layer_index("stop_at_layer", stop_at_layer)
        if start is None:
            if tokens is not None or shortformer_pos_embed is not None:
                raise ValueError("tokens= and shortformer_pos_embed= go with start_at_layer (the "
                                 "input is then a residual stream); pass the tokens as input")
            is_text = isinstance(input, str) or (
                isinstance(input, list) and all(isinstance(t, str) for t in input))
            tokens = self.to_tokens(input, prepend_bos=prepend_bos) if is_text else \
                self._check_tokens(input)
            offset = 0
            if past_kv_cache is not None:
                past_kv_cache.check_fits(tokens, self.cfg.n_layers)
                offset = past_kv_cache.length
            self._check_length(tokens.shape[1] + offset)
            residual = self.hook_embed(self.embed(tokens))
            shortformer = None
            if self.cfg.positional_embedding_type == "standard":
                residual = residual + self.hook_pos_embed(self.pos_embed(tokens, offset))
            elif self.cfg.positional_embedding_type == "shortformer":
                shortformer = self.hook_pos_embed(self.pos_embed(tokens, offset))
            layers = range(self.cfg.n_layers if stop is None else stop)
        else:
            residual, shortformer = self._check_residual_input(
                input, past_kv_cache, prepend_bos, tokens, shortformer_pos_embed, return_type,
                stop)
            layers = range(start, self.cfg.n_layers if stop is None else stop)
            if tokens is not None:
                tokens = self._check_tokens(tokens)
        for i in layers:
            layer_cache = None if past_kv_cache is None else past_kv_cache.layers[i]
            residual = self.blocks[i](residual, shortformer, cache=layer_cache)
        if stop is not None:
            return residual
        if return_type is None:
            return None
        logits = self.unembed(self.ln_final(residual))
        if return_type == "logits":
            return logits
        loss = self.loss_fn(logits, tokens, per_token=loss_per_token)
        return loss if return_type == "loss" else (logits, loss)

    def loss_fn(
        self,
        logits: Float[Tensor, "batch pos d_vocab"],
        tokens: Int[Tensor, "batch pos"],
        per_token: bool = False,
    ) -> Float[Tensor, ""] | Float[Tensor, "batch pos_minus_1"]:
        """Next-token cross entropy, as HookedTransformer's ``loss_fn``: position t predicts
        token t + 1.

        Args:
            logits: the model's logits.
            tokens: the token ids they were computed on.
            per_token: return the loss at each position ``[batch, pos - 1]`` instead of the mean.

        Returns:
            The mean loss (a scalar), or the per-token losses.
        """
        if logits.ndim != 3 or tokens.ndim != 2 or logits.shape[:2] != tokens.shape:
            raise ValueError(f"loss_fn takes logits [batch, pos, d_vocab] and tokens [batch, pos] "
                             f"of the same batch and pos, got {tuple(logits.shape)} and "
                             f"{tuple(tokens.shape)}")
        return lm_cross_entropy(logits, tokens.to(logits.device), per_token=per_token)

    def _layer_index(self, name: str, value: int | None) -> int | None:
        """A block index for start_at_layer / stop_at_layer in [0, n_layers] (negative values
        count from the end, as Python slices)."""
        if value is None:
            return None
        n = self.cfg.n_layers
        if isinstance(value, bool) or not isinstance(value, int) or not -n <= value <= n:
            raise ValueError(f"{name}={value!r} must be an int in [-{n}, {n}] "
                             f"(n_layers={n})")
        return value + n if value < 0 else value

    def _check_residual_input(self, input: Any, past_kv_cache: KVShiftCache | None,
                              prepend_bos: bool | None, tokens: Tensor | None,
                              shortformer_pos_embed: Tensor | None, return_type: ReturnType,
                              stop: int | None) -> tuple[Tensor, Tensor | None]:
        """Validate the arguments of a forward pass that starts inside the model."""
        if past_kv_cache is not None or prepend_bos is not None:
            raise ValueError("start_at_layer takes a residual stream: past_kv_cache and "
                             "prepend_bos are not supported with it")
        d_model = self.cfg.d_model
        if not isinstance(input, Tensor) or input.ndim != 3 or input.shape[-1] != d_model \
                or not input.is_floating_point():
            got = (f"shape {tuple(input.shape)}, dtype {input.dtype}"
                   if isinstance(input, Tensor) else type(input).__name__)
            raise ValueError(f"with start_at_layer, input is the residual stream [batch, pos, "
                             f"d_model={d_model}] (floating point), got {got}")
        if return_type in ("loss", "both") and stop is None and tokens is None:
            raise ValueError(f"return_type={return_type!r} with start_at_layer needs the token "
                             "ids: pass tokens=...")
        if tokens is not None and tuple(tokens.shape) != tuple(input.shape[:2]):
            raise ValueError(f"tokens has shape {tuple(tokens.shape)}, the residual stream "
                             f"{tuple(input.shape[:2])} positions")
        if self.cfg.positional_embedding_type == "shortformer":
            if shortformer_pos_embed is None:
                raise ValueError(
                    "a shortformer model adds the positional embedding inside every attention "
                    "layer: pass shortformer_pos_embed=cache['pos_embed'] with start_at_layer")
            if shortformer_pos_embed.shape != input.shape:
                raise ValueError(f"shortformer_pos_embed has shape "
                                 f"{tuple(shortformer_pos_embed.shape)}, expected "
                                 f"{tuple(input.shape)} like the residual stream")
        elif shortformer_pos_embed is not None:
            raise ValueError(f"shortformer_pos_embed is for shortformer models; this one's "
                             f"positional_embedding_type is "
                             f"{self.cfg.positional_embedding_type!r}")
        return input.to(self.cfg.device), shortformer_pos_embed

    def _check_tokens(self, tokens: Any) -> Int[Tensor, "batch pos"]:
        if not isinstance(tokens, Tensor):
            raise TypeError(
                f"input must be a LongTensor of token ids, a string or a list of strings, got "
                f"{type(tokens).__name__}"
            )
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise TypeError(f"token ids must be an integer tensor, got dtype {tokens.dtype}")
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2:
            raise ValueError(
                f"tokens must have shape [batch, pos] or [pos], got {tuple(tokens.shape)}"
            )
        if tokens.shape[1] == 0:
            raise ValueError("tokens has an empty position axis (shape "
                             f"{tuple(tokens.shape)}); need at least one token")
        if tokens.shape[0] == 0:
            raise ValueError(f"tokens has an empty batch axis (shape {tuple(tokens.shape)}); "
                             "need at least one sequence")
        # (Skipped inside torch.compile, where reading the values would break the graph; an
        # out-of-range id then fails in the embedding lookup instead.)
        if tokens.numel() and not torch.compiler.is_compiling():
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= self.cfg.d_vocab:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"token id {bad} is out of range: ids must be in [0, d_vocab={self.cfg.d_vocab})"
                )
        return tokens.to(device=self.cfg.device, dtype=torch.long)

    def _check_length(self, length: int) -> None:
        if length > self.cfg.n_ctx and self.cfg.positional_embedding_type in (
                "standard", "shortformer"):
            raise ValueError(
                f"sequence length {length} exceeds n_ctx={self.cfg.n_ctx}, the number of learned "
                f"positions ({self.cfg.positional_embedding_type} positional embedding)"
            )

    # ------------------------------------------------------------------ tokens
    # As TransformerLens' HookedTransformer: text goes through model.tokenizer (a Hugging Face
    # tokenizer), cfg.default_prepend_bos decides whether a BOS token goes first.
    def _require_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            raise ValueError(
                "this model has no tokenizer: pass token ids (a LongTensor), or build the model "
                "with tokenizer=... (e.g. kvshift_lens.byte_level_tokenizer())"
            )
        return self.tokenizer

    def _resolve_prepend_bos(self, prepend_bos: bool | None) -> bool:
        """Whether :meth:`to_tokens` puts a BOS token first: ``prepend_bos``, or when None
        ``cfg.default_prepend_bos`` if the tokenizer has a BOS token (a tokenizer without one
        gets none by default; an explicit True then raises)."""
        tok = self._require_tokenizer()
        if prepend_bos is None:
            return bool(self.cfg.default_prepend_bos) and tok.bos_token_id is not None
        if not isinstance(prepend_bos, bool):
            raise TypeError(f"prepend_bos must be True, False or None, got {prepend_bos!r}")
        if prepend_bos and tok.bos_token_id is None:
            raise ValueError("prepend_bos=True but the tokenizer has no BOS token "
                             "(bos_token_id is None); pass prepend_bos=False")
        return prepend_bos

    def to_tokens(
        self,
        input: str | list[str] | Tensor,
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
        move_to_device: bool = True,
        truncate: bool = True,
    ) -> Int[Tensor, "batch pos"]:
        """Text to token ids, as TransformerLens' ``to_tokens``.

        Args:
            input: a string or a list of strings (token ids pass through, checked, on
                ``cfg.device``).
            prepend_bos: put the tokenizer's BOS token first. None: ``cfg.default_prepend_bos``
                (True unless the config says otherwise, as in TransformerLens), skipped for a
                tokenizer without a BOS token.
            padding_side: where strings shorter than the longest are padded, "left" or "right",
                with the pad token (else BOS, else 0). None: the tokenizer's ``padding_side``.
            move_to_device: put the result on ``cfg.device`` (else the CPU).
            truncate: cut every row to ``n_ctx`` tokens.

        Returns:
            int64 ids ``[batch, pos]``.
        """
        if isinstance(input, Tensor):
            return self._check_tokens(input)
        tok = self._require_tokenizer()
        texts = [input] if isinstance(input, str) else input
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("to_tokens takes a string, a non-empty list of strings or a tensor of "
                            f"ids, got {type(input).__name__}")
        side = tok.padding_side if padding_side is None else padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        rows = [list(r) for r in tok(texts, add_special_tokens=False)["input_ids"]]
        if self._resolve_prepend_bos(prepend_bos):
            rows = [[tok.bos_token_id, *r] for r in rows]
        if truncate:
            rows = [r[: self.cfg.n_ctx] for r in rows]
        width = max(len(r) for r in rows)
        if width == 0:
            raise ValueError("input text encodes to zero tokens")
        pad = next((p for p in (tok.pad_token_id, tok.bos_token_id) if p is not None), 0)
        padded = [
            ([pad] * (width - len(r)) + r) if side == "left" else (r + [pad] * (width - len(r)))
            for r in rows
        ]
        out = torch.tensor(padded, dtype=torch.long)
        return out.to(self.cfg.device) if move_to_device else out

    def _token_ids(self, tokens: Any) -> Tensor:
        """Token ids as an int64 CPU tensor (from a tensor, a numpy array or a list)."""
        t = torch.as_tensor(tokens).detach().cpu()
        if t.numel() == 0:
            return t.long()
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"token ids must be integers, got dtype {t.dtype}")
        return t.long()

    def _undecodable(self, ids: Tensor) -> list[int]:
        """The ids among ``ids`` that the tokenizer has no text for (outside its vocabulary,
        which can be smaller than d_vocab, or negative), sorted; Hugging Face's decode would
        silently drop them."""
        tok = self._require_tokenizer()
        unique = torch.unique(ids).tolist()
        n = len(tok)
        inside = [i for i in unique if 0 <= i < n]
        bad = [i for i in unique if not 0 <= i < n]
        bad += [i for i, s in zip(inside, tok.convert_ids_to_tokens(inside)) if s is None]
        return sorted(bad)

    def to_string(
        self, tokens: Int[Tensor, "batch pos"] | Int[Tensor, " pos"] | list[int] | Any
    ) -> str | list[str]:
        """Token ids to text, as TransformerLens' ``to_string``: ``[pos]`` ids (a 1-D or 0-d
        tensor, a list, a numpy array) give a string, ``[batch, pos]`` a list of strings. Special
        tokens (BOS) are kept as their text.

        An id the tokenizer has no text for (below ``d_vocab`` but outside the tokenizer's
        vocabulary, or negative), which Hugging Face's ``decode`` would silently drop, is written
        as ``"<|unknown id N|>"`` (:data:`kvshift_lens.tokenizer.UNKNOWN_TOKEN`) in its place; the
        ids around it are decoded as usual.
        """
        t = self._token_ids(tokens)
        if t.ndim > 2:
            raise ValueError(f"to_string takes ids [pos] or [batch, pos], got shape "
                             f"{tuple(t.shape)}")
        bad = set(self._undecodable(t))
        if t.ndim == 2:
            return [self._decode(row, bad) for row in t.tolist()]
        return self._decode(t.reshape(-1).tolist(), bad)

    def _decode(self, ids: list[int], bad: set[int]) -> str:
        """Decode ids, writing UNKNOWN_TOKEN for those in ``bad`` and decoding each run of other
        ids in one piece (a character split over several byte tokens stays whole)."""
        tok = self._require_tokenizer()
        if not bad:
            return tok.decode(ids, clean_up_tokenization_spaces=False)
        out, run = [], []
        for i in [*ids, None]:
            if i is None or i in bad:
                if run:
                    out.append(tok.decode(run, clean_up_tokenization_spaces=False))
                    run = []
                if i is not None:
                    out.append(UNKNOWN_TOKEN.format(i))
            else:
                run.append(i)
        return "".join(out)

    def to_str_tokens(
        self,
        input: str | list | Tensor | Any,
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
    ) -> list[str] | list[list[str]]:
        """Each token as a string, as TransformerLens' ``to_str_tokens``.

        Args:
            input: a string (tokenized by :meth:`to_tokens` with ``prepend_bos`` and
                ``padding_side``); token ids ``[pos]`` or ``[1, pos]`` (a tensor, a numpy array, a
                list of ints; a 0-d tensor is one token); or a list of strings or of id sequences,
                which gives a list of lists.
            prepend_bos, padding_side: as in :meth:`to_tokens`, for strings only.

        Returns:
            One string per token (special tokens as their text), or a list of such lists. An id
            the tokenizer has no text for (below ``d_vocab`` but outside the tokenizer's
            vocabulary) is shown as ``"<|unknown id N|>"``
            (:data:`kvshift_lens.tokenizer.UNKNOWN_TOKEN`), never dropped.

        Raises:
            ValueError: ids of several sequences in one tensor.
        """
        if isinstance(input, list) and input and (
            all(isinstance(x, str) for x in input)
            or all(isinstance(x, (list, tuple, Tensor, np.ndarray)) for x in input)
        ):
            return [self.to_str_tokens(x, prepend_bos, padding_side) for x in input]
        tok = self._require_tokenizer()
        if isinstance(input, str):
            ids = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side,
                                 move_to_device=False)[0]
        else:
            ids = self._token_ids(input).squeeze()
            if ids.ndim == 0:
                ids = ids[None]
            if ids.ndim != 1:
                raise ValueError(
                    f"to_str_tokens takes one sequence of ids ([pos] or [1, pos]), got shape "
                    f"{tuple(self._token_ids(input).shape)}; pass a list of sequences for several")
        ids_list = ids.tolist()
        bad = set(self._undecodable(ids))
        strs = tok.batch_decode([[i] for i in ids_list if i not in bad],
                                clean_up_tokenization_spaces=False)
        decoded = iter(strs)
        return [UNKNOWN_TOKEN.format(i) if i in bad else next(decoded) for i in ids_list]

    def to_single_token(self, string: str) -> int:
        """The id of a string that is exactly one token (no BOS). Raises ValueError otherwise."""
        tokens = self.to_tokens(string, prepend_bos=False).reshape(-1)
        if tokens.numel() != 1:
            raise ValueError(f"{string!r} is {tokens.numel()} tokens, not one")
        return int(tokens.item())

    def to_single_str_token(self, int_token: int) -> str:
        """The string of one token id (an int, a numpy integer or a one-element tensor)."""
        if isinstance(int_token, bool):
            raise TypeError("to_single_str_token takes a token id (an int), got a bool")
        try:
            index = operator.index(int_token)
        except TypeError:
            raise TypeError(
                f"to_single_str_token takes a token id (an int), got {type(int_token).__name__}"
            ) from None
        return self.to_str_tokens(torch.tensor([index]))[0]

    def get_token_position(
        self,
        single_token: str | int | Tensor,
        input: str | Int[Tensor, " pos"] | Int[Tensor, "1 pos"],
        mode: Literal["first", "last"] = "first",
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
    ) -> int:
        """The position of a token in a string or a sequence of ids, as TransformerLens'
        ``get_token_position``.

        Args:
            single_token: the token: its id, or a string that is exactly one token.
            input: a string (tokenized by :meth:`to_tokens`: with the default ``prepend_bos``
                the BOS token is position 0) or ids ``[pos]`` / ``[1, pos]``.
            mode: "first" or "last" occurrence.
            prepend_bos, padding_side: as in :meth:`to_tokens`, for a string ``input``.

        Returns:
            The position (an int).

        Raises:
            ValueError: the token does not occur, ``mode`` is not "first"/"last", ``input`` holds
                several sequences, or ``single_token`` is a string of several tokens.
        """
        if mode not in ("first", "last"):
            raise ValueError(f"mode must be 'first' or 'last', got {mode!r}")
        if isinstance(input, str):
            tokens = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side,
                                    move_to_device=False)
        else:
            tokens = self._token_ids(input)
        if tokens.ndim == 2 and tokens.shape[0] == 1:
            tokens = tokens[0]
        if tokens.ndim != 1:
            raise ValueError(f"input must be a string or ids [pos] or [1, pos], got shape "
                             f"{tuple(tokens.shape)}")
        if isinstance(single_token, str):
            token = self.to_single_token(single_token)
        else:
            t = self._token_ids(single_token)
            if t.numel() != 1:
                raise ValueError(f"single_token must be one token id, got shape {tuple(t.shape)}")
            token = int(t.item())
        hits = (tokens == token).nonzero().flatten()
        if hits.numel() == 0:
            raise ValueError(f"token {single_token!r} (id {token}) does not occur in the input")
        return int(hits[0] if mode == "first" else hits[-1])

    def tokens_to_residual_directions(
        self, tokens: str | int | Tensor
    ) -> Float[Tensor, "... d_model"]:
        """The unembedding directions ``W_U[:, token]`` of tokens (d_model last)."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        if isinstance(tokens, int):
            return self.W_U[:, tokens]
        t = torch.as_tensor(tokens, device=self.W_U.device)
        return self.W_U[:, t.reshape(-1)].T.reshape(*t.shape, self.cfg.d_model)

    # ------------------------------------------------------------------ weights, TL-style
    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.unembed.W_U

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"]:
        return self.unembed.b_U

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        return self.embed.W_E

    @property
    def W_pos(self) -> Float[Tensor, "n_ctx d_model"]:
        if not hasattr(self, "pos_embed"):
            raise AttributeError(
                f"{self.cfg.positional_embedding_type!r} positional embedding has no W_pos")
        return self.pos_embed.W_pos

    def _stack_attn(self, name: str) -> Tensor:
        return torch.stack([getattr(b.attn, name) for b in self.blocks])

    @property
    def W_Q(self) -> Float[Tensor, "layer head d_model d_head"]:
        return self._stack_attn("W_Q")

    @property
    def W_K(self) -> Float[Tensor, "layer head d_model d_head"]:
        return self._stack_attn("W_K")

    @property
    def W_V(self) -> Float[Tensor, "layer head d_model d_head"]:
        return self._stack_attn("W_V")

    @property
    def W_O(self) -> Float[Tensor, "layer head d_head d_model"]:
        return self._stack_attn("W_O")

    @property
    def b_Q(self) -> Float[Tensor, "layer head d_head"]:
        return self._stack_attn("b_Q")

    @property
    def b_K(self) -> Float[Tensor, "layer head d_head"]:
        """Per query head (a grouped-query model's shared key biases repeated), as in TL."""
        return self._stack_attn("b_K")

    @property
    def b_V(self) -> Float[Tensor, "layer head d_head"]:
        return self._stack_attn("b_V")

    @property
    def b_O(self) -> Float[Tensor, "layer d_model"]:
        return self._stack_attn("b_O")

    def _stack_mlp(self, name: str) -> Tensor:
        if self.cfg.attn_only:
            raise AttributeError(f"an attention-only model has no MLP, so no {name}")
        if name == "W_gate" and not self.cfg.gated_mlp:
            raise AttributeError("W_gate exists only with gated_mlp=True")
        return torch.stack([getattr(b.mlp, name) for b in self.blocks])

    @property
    def W_in(self) -> Float[Tensor, "layer d_model d_mlp"]:
        return self._stack_mlp("W_in")

    @property
    def W_gate(self) -> Float[Tensor, "layer d_model d_mlp"]:
        return self._stack_mlp("W_gate")

    @property
    def W_out(self) -> Float[Tensor, "layer d_mlp d_model"]:
        return self._stack_mlp("W_out")

    @property
    def b_in(self) -> Float[Tensor, "layer d_mlp"]:
        return self._stack_mlp("b_in")

    @property
    def b_out(self) -> Float[Tensor, "layer d_model"]:
        return self._stack_mlp("b_out")

    @property
    def W_E_pos(self) -> Float[Tensor, "d_vocab_plus_n_ctx d_model"]:
        """``W_E`` and ``W_pos`` concatenated along the first axis, as in TL."""
        return torch.cat([self.W_E, self.W_pos], dim=0)

    def all_head_labels(self) -> list[str]:
        """``["L0H0", "L0H1", ...]``: one label per (layer, query head), layer-major."""
        return [f"L{layer}H{head}" for layer in range(self.cfg.n_layers)
                for head in range(self.cfg.n_heads)]

    @property
    def QK(self):
        from transformer_lens.FactoredMatrix import FactoredMatrix

        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self):
        from transformer_lens.FactoredMatrix import FactoredMatrix

        return FactoredMatrix(self.W_V, self.W_O)

    def accumulated_bias(
        self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True
    ) -> Float[Tensor, " d_model"]:
        """Sum of the output biases written to the residual stream before ``layer`` (plus
        ``layer``'s attention bias when ``mlp_input``)."""
        out = torch.zeros(self.cfg.d_model, device=self.cfg.device, dtype=self.cfg.dtype)
        for block in self.blocks[:layer]:
            out = out + block.attn.b_O
            if include_mlp_biases and not self.cfg.attn_only:
                out = out + block.mlp.b_out
        if mlp_input:
            if layer >= self.cfg.n_layers:
                raise ValueError(f"mlp_input needs layer < n_layers={self.cfg.n_layers}")
            out = out + self.blocks[layer].attn.b_O
        return out

    # ------------------------------------------------------------------ hook flags
    def set_use_attn_result(self, use_attn_result: bool) -> None:
        self.cfg.use_attn_result = use_attn_result

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        self.cfg.use_split_qkv_input = use_split_qkv_input

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        if self.cfg.attn_only:
            raise ValueError("an attention-only model has no MLP input to hook")
        self.cfg.use_hook_mlp_in = use_hook_mlp_in

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        self.cfg.use_attn_in = use_attn_in

    # ------------------------------------------------------------------ the shift
    def shift_coefficients(self) -> ShiftCoefficients:
        """Every layer's effective coefficients, ``[layer, head, lag]`` per shifted projection
        (detached copies; for gradients use ``blocks[l].attn.coefficients(which)``)."""
        values = {}
        for which in ("q", "k", "v"):
            per_layer = [b.attn.coefficients(which) for b in self.blocks]
            if per_layer and per_layer[0] is not None:
                values[which] = torch.stack(per_layer).detach().clone()
        return ShiftCoefficients(values)

    def shift_parameters(self) -> list[nn.Parameter]:
        """The raw shift parameters (``blocks.{l}.attn.shift_{q,k,v}``, and with ``gain_mix`` the
        gains ``shift_{q,k,v}_gain``), in ``parameters()`` order, as ``parameters()`` gives them:
        what an optimiser's coefficient group takes. Empty when nothing is shifted. Names:
        ``named_parameters()`` filtered by :func:`kvshift_lens.shift.is_shift_parameter`."""
        return [p for name, p in self.named_parameters() if is_shift_parameter(name)]

    @torch.no_grad()
    def constrain_shift_(self) -> None:
        """Project stored coefficients onto their constraint set: the simplex for ``convex``, and
        the mix (not the gain) for ``gain_mix``; a no-op for ``free``. A trainer calls this after
        each optimiser step."""
        if self.cfg.shift_param == "free":
            return
        for name, p in self.named_parameters():
            if is_shift_parameter(name) and not is_gain_parameter(name):
                p.copy_(project_to_simplex(p))

    # ------------------------------------------------------------------ devices
    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        first = next(self.parameters(), None)
        if first is not None:
            self.cfg.device = str(first.device)
            if first.is_floating_point():
                self.cfg.dtype = first.dtype
        return out

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        input: str | list[str] | Int[Tensor, "batch pos"] = "",
        max_new_tokens: int = 10,
        stop_at_eos: bool = True,
        eos_token_id: int | list[int] | None = None,
        do_sample: bool = True,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float = 1.0,
        freq_penalty: float = 0.0,
        use_past_kv_cache: bool = True,
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
        return_type: Literal["input", "str", "tokens"] = "input",
        verbose: bool = True,
        generator: torch.Generator | None = None,
    ) -> Int[Tensor, "batch pos_plus_new"] | str | list[str]:
        """Continue a prompt, as HookedTransformer's ``generate`` (same arguments and defaults:
        it samples at temperature 1 unless told otherwise).

        With ``use_past_kv_cache`` each step feeds only the new token and the cache (shifted K/V
        plus the raw K/V tail the next shift mixes in) supplies the rest; without it every step
        recomputes the whole prefix. Both give the same tokens.

        Args:
            input: a string, a list of strings that encode to the same length (the model has
                no attention mask to hide padding), or token ids ``[batch, pos]``.
            max_new_tokens: how many tokens to add.
            stop_at_eos: stop a row at its EOS token (``eos_token_id``, else the tokenizer's; a
                model with neither never stops early); finished rows keep emitting EOS, and
                generation ends when every row has finished.
            eos_token_id: the EOS id, or several.
            do_sample: sample; False is greedy (argmax), and then temperature, top_k, top_p and
                freq_penalty must keep their defaults.
            top_k, top_p: restrict sampling to the k most likely tokens / the top-p nucleus.
            temperature: divides the logits; 0 is greedy.
            freq_penalty: subtracted from a token's logit per earlier occurrence (prompt
                included).
            use_past_kv_cache: decode incrementally.
            prepend_bos, padding_side: as in :meth:`to_tokens`, for text input only.
            return_type: "input" (text for text input, ids for ids), "str" or "tokens".
            verbose: show a progress bar.
            generator: the random generator for sampling (None: torch's global RNG).

        Returns:
            Token ids ``[batch, pos + new]`` (prompt included), or the text: one string for a
            string (without the BOS token to_tokens put first), a list for a list.

        Raises:
            ValueError: a bad option (named), prompts of different lengths, or a sequence longer
                than ``n_ctx`` with learned positions.
        """
        return generation.generate(
            self, input, max_new_tokens=max_new_tokens, stop_at_eos=stop_at_eos,
            eos_token_id=eos_token_id, do_sample=do_sample, top_k=top_k, top_p=top_p,
            temperature=temperature, freq_penalty=freq_penalty,
            use_past_kv_cache=use_past_kv_cache, prepend_bos=prepend_bos,
            padding_side=padding_side, return_type=return_type, verbose=verbose,
            generator=generator)

    def new_cache(self) -> KVShiftCache:
        return KVShiftCache.empty(self.cfg.n_layers)

    # ------------------------------------------------------------------ weights processing
    def fold_layer_norm_(self, center_writing_weights: bool = True,
                         center_unembed: bool = True) -> HookedKVShiftTransformer:
        """Fold norms into the weights that read them: ``ProcessWeights``' steps with fixed axes
        (``kvshift_lens.processing``; exact for square shapes such as ``d_vocab == d_model``).

        Value biases are never folded: under the shift the value bias reaching position t is
        ``(beta1 + beta2) * b_V`` everywhere but position 0, so folding it into ``b_O`` is not
        exact. A tied unembedding is untied (folding ``ln_final`` changes ``W_U`` alone).
        """
        fold_layer_norm(self, center_writing_weights=center_writing_weights,
                        center_unembed=center_unembed)
        return self

    def refactor_factored_attn_matrices(
        self, state_dict: dict[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """HookedTransformer's refactoring of each head's ``W_Q W_K^T`` and ``W_V W_O`` into an
        even SVD factorisation, exact under the shift (the model's logits do not change).

        Unlike TransformerLens, ``b_V`` is not folded into ``b_O`` (not exact under the shift);
        it is re-expressed so that ``b_V' W_O' = b_V W_O``. See
        :func:`kvshift_lens.hooked_transformer.refactor_factored_attn_matrices`.

        Args:
            state_dict: a state dict of this model (default: ``self.state_dict()``); not
                modified. To change the model in place, use
                ``process_weights_(refactor_factored_attn_matrices=True)``.

        Returns:
            The refactored state dict.

        Raises:
            ValueError: rotary positions or grouped-query attention.
        """
        state = self.state_dict() if state_dict is None else state_dict
        return refactor_state_dict({k: v.detach() for k, v in state.items()}, self.cfg)

    @torch.no_grad()
    def process_weights_(
        self,
        fold_ln: bool = True,
        center_writing_weights: bool = True,
        center_unembed: bool = True,
        fold_value_biases: bool = False,
        refactor_factored_attn_matrices: bool = False,
    ) -> HookedKVShiftTransformer:
        """HookedTransformer's ``process_weights_``, in place, keeping every log-prob.

        Args:
            fold_ln: fold the norms' weights into the weights that read them
                (:meth:`fold_layer_norm_`).
            center_writing_weights: remove the mean over d_model of every weight writing to the
                residual stream (LayerNorm models only; exact because every reader centres).
            center_unembed: remove the mean over d_vocab of ``W_U`` and ``b_U``.
            fold_value_biases: must be False: under the shift the value bias reaching position
                t is ``(beta1 + beta2) * b_V`` except at position 0, so no fold into ``b_O`` is
                exact.
            refactor_factored_attn_matrices: then refactor Q/K and V/O
                (:meth:`refactor_factored_attn_matrices`).

        Returns:
            The model.

        Raises:
            ValueError: ``fold_value_biases=True``, or a refactoring the model cannot take (before
                anything changes).
        """
        if fold_value_biases:
            raise ValueError(
                "fold_value_biases=True is not exact under the KV shift: the value at position t "
                "is sum_l beta_l V_{t-l}, whose bias is (sum_l beta_l) * b_V except near the start "
                "of the sequence (positions before it contribute zero), so moving b_V into b_O "
                "changes the outputs. Pass fold_value_biases=False")
        if refactor_factored_attn_matrices:
            check_refactorable(self.cfg)  # fail before changing anything
        if fold_ln:
            fold_layer_norm(self, center_writing_weights=center_writing_weights,
                            center_unembed=center_unembed)
        elif center_writing_weights or center_unembed:
            self._center_weights(center_writing_weights, center_unembed)
        if refactor_factored_attn_matrices:
            self.load_state_dict(self.refactor_factored_attn_matrices())
        return self

    def _center_weights(self, center_writing_weights: bool, center_unembed: bool) -> None:
        """The centring steps of :func:`~kvshift_lens.processing.fold_layer_norm`, without the
        fold (writing weights only for LayerNorm models, whose every reader removes the mean)."""
        cfg = self.cfg
        if center_unembed and cfg.tie_word_embeddings:
            raise ValueError("center_unembed on a tied unembedding would change W_E too; fold "
                             "first (fold_ln=True unties it) or pass center_unembed=False")
        state = {k: v.clone() for k, v in self.state_dict().items()}
        if center_writing_weights and cfg.normalization_type in ("LN", "LNPre"):
            _center_writer(state, "embed.W_E", None, cfg.d_model)
            if cfg.positional_embedding_type == "standard":
                _center_writer(state, "pos_embed.W_pos", None, cfg.d_model)
            for layer in range(cfg.n_layers):
                p = f"blocks.{layer}."
                _center_writer(state, p + "attn.W_O", p + "attn.b_O", cfg.d_model)
                if not cfg.attn_only:
                    _center_writer(state, p + "mlp.W_out", p + "mlp.b_out", cfg.d_model)
        if center_unembed:
            state["unembed.W_U"] = state["unembed.W_U"] - state["unembed.W_U"].mean(-1, keepdim=True)
            state["unembed.b_U"] = state["unembed.b_U"] - state["unembed.b_U"].mean()
        self.load_state_dict(state)

    # ------------------------------------------------------------------ HookedTransformer weights
    @torch.no_grad()
    def load_hooked_transformer_state_dict(
        self, state_dict: dict[str, Tensor], keep_shift: bool = False
    ) -> HookedKVShiftTransformer:
        """Load a state dict in HookedTransformer's format, accepting exactly its differences.

        A HookedTransformer's state dict holds attention buffers this model does not keep
        (``blocks.{l}.attn.mask``, ``IGNORE``, ``rotary_sin``, ``rotary_cos``) and no shift
        coefficients. Those are the only differences allowed: every other key must match (names
        and shapes), as with a strict ``load_state_dict``.

        Args:
            state_dict: the HookedTransformer state dict (its mask must be causal).
            keep_shift: keep this model's current shift coefficients. False (default) sets
                them to the identity (lag 0 weight 1, the others 0), so the model computes
                exactly what the HookedTransformer did.

        Returns:
            The model.

        Raises:
            ValueError: a non-causal mask, or any other key missing, unexpected or of the wrong
                shape (named).
        """
        state, missing = hooked_transformer_state_dict(state_dict, self.cfg,
                                                       list(self.state_dict()))
        own = self.state_dict()
        wrong = [f"{k}: {tuple(v.shape)} (expected {tuple(own[k].shape)})"
                 for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
        if wrong:
            raise ValueError(f"state dict shapes do not match the model: {wrong}")
        for key in missing:
            value = own[key] if keep_shift else torch.zeros_like(own[key])
            if not keep_shift:
                value[..., 0] = 1  # identity: [head, lag] with weight 1 on lag 0
            state[key] = value.clone()
        self.load_state_dict(state)
        return self

    @classmethod
    def from_hooked_transformer_state_dict(
        cls,
        state_dict: dict[str, Tensor],
        cfg: KVShiftConfig | dict,
        tokenizer: Any = None,
    ) -> HookedKVShiftTransformer:
        """A model with a HookedTransformer's weights and identity shift coefficients, so it
        computes what that HookedTransformer computed (see
        :meth:`load_hooked_transformer_state_dict`); ``cfg`` chooses which projections are
        shifted (training can then move the coefficients). In eval mode.

        Args:
            state_dict: the HookedTransformer state dict.
            cfg: this model's config (sizes as the HookedTransformer's).
            tokenizer: as for the constructor.
        """
        model = cls(cfg, tokenizer=tokenizer)
        return model.load_hooked_transformer_state_dict(state_dict).eval()

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write the model to a checkpoint folder (``config.json`` + ``model.safetensors`` and the
        tokenizer), atomically and with a checksum; see :mod:`kvshift_lens.checkpoint`."""
        return save_checkpoint_files(directory, self.state_dict(), self.cfg, self.tokenizer)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        device: str | None = None,
        allow_nonfinite: bool = False,
    ) -> HookedKVShiftTransformer:
        """Load a checkpoint folder written by :meth:`save_pretrained`, or a model of the zoo by
        name (:mod:`kvshift_lens.zoo`, e.g. ``"kvshift-attn-1l"``: float16 weights, upcast to
        float32), in eval mode.

        Args:
            directory: the checkpoint folder, or a zoo name when no such folder exists.
            device: where to put the model (default: CUDA when available, else CPU).
            allow_nonfinite: load weights holding NaN/inf instead of refusing them (to inspect
                a diverged run).

        Raises:
            CheckpointError: the folder is missing, corrupt, does not match its config, holds
                non-finite weights or a tokenizer that would run code.
        """
        if not Path(directory).exists():
            import kvshift_lens.zoo.registry as zoo

            if zoo.is_zoo_name(directory):
                model = cls.from_pretrained(zoo.model_dir(str(directory)), device, allow_nonfinite)
                return model.to(torch.float32)
            raise CheckpointError(
                f"{os.fspath(directory)!r} does not exist: it is neither a checkpoint folder nor "
                f"a zoo model; the zoo has {zoo.list_models()}")
        cfg, state, tokenizer = read_checkpoint(directory, allow_nonfinite=allow_nonfinite)
        cfg.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = cls(cfg, tokenizer=tokenizer)
        check_state_dict(model.state_dict(), state, Path(directory) / "model.safetensors")
        model.load_state_dict(state)
        return model.eval()


def lm_cross_entropy(
    logits: Float[Tensor, "batch pos d_vocab"],
    tokens: Int[Tensor, "batch pos"],
    per_token: bool = False,
) -> Float[Tensor, ""] | Float[Tensor, "batch pos_minus_1"]:
    """Next-token cross entropy: position t predicts token t + 1."""
    if tokens.shape[1] < 2:
        raise ValueError("a loss needs at least 2 positions (position t predicts token t + 1)")
    logits = logits[:, :-1]
    # Half-precision logits are upcast; float64 stays float64.
    logprobs = F.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)
    nll = -logprobs.gather(-1, tokens[:, 1:, None])[..., 0]
    return nll if per_token else nll.mean()
