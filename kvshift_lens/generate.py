"""Greedy and sampled generation, with or without the incremental KV-shift cache."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from kvshift_lens.model import HookedKVShiftTransformer


def sample_next(
    logits: Tensor,
    do_sample: bool,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick the next token per row of ``logits [batch, d_vocab]``: argmax, or a sample from the
    temperature-scaled distribution restricted to the top-k tokens and/or the top-p nucleus."""
    if not do_sample:
        return logits.argmax(-1)
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 when sampling")
    logits = logits.float() / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k={top_k} must be >= 1")
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p={top_p} must be in (0, 1]")
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(logits.device)


@torch.no_grad()
def generate(
    model: HookedKVShiftTransformer,
    input: str | Tensor,
    max_new_tokens: int = 10,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    use_past_kv_cache: bool = True,
    generator: torch.Generator | None = None,
    prepend_bos: bool | None = None,
) -> Tensor | str:
    """See :meth:`HookedKVShiftTransformer.generate`. Rows that emitted ``eos_token_id`` keep
    emitting it; generation stops early once every row has."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    text_input = isinstance(input, str)
    tokens = model.to_tokens(input, prepend_bos=prepend_bos)
    cache = model.new_cache() if use_past_kv_cache else None
    out, step_input = tokens, tokens
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    for _ in range(max_new_tokens):
        if cache is not None:
            logits = model(step_input, past_kv_cache=cache)[:, -1]
        else:
            logits = model(out)[:, -1]
        nxt = sample_next(logits, do_sample, temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            nxt = torch.where(finished, torch.full_like(nxt, eos_token_id), nxt)
            finished |= nxt == eos_token_id
        out = torch.cat([out, nxt[:, None]], dim=1)
        step_input = nxt[:, None]
        if eos_token_id is not None and bool(finished.all()):
            break
    if not text_input:
        return out
    # As TransformerLens: the BOS token to_tokens put before the prompt is not part of the text.
    skip = 1 if model._resolve_prepend_bos(prepend_bos) else 0
    return model.to_string(out[0, skip:])
