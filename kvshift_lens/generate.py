"""Sampled and greedy generation, with or without the incremental KV-shift cache, with
HookedTransformer's ``generate`` arguments and defaults (sampling at temperature 1 by default,
temperature 0 is greedy, stop at EOS)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

if TYPE_CHECKING:
    from kvshift_lens.model import HookedKVShiftTransformer

logger = logging.getLogger(__name__)

GenerateReturnType = Literal["input", "str", "tokens"]


def check_sampling(do_sample: bool, temperature: float, top_k: int | None,
                   top_p: float | None, freq_penalty: float) -> None:
    """Raise ValueError for a sampling option out of range, or one given with
    ``do_sample=False`` (greedy decoding would ignore it)."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 is greedy)")
    if freq_penalty < 0:
        raise ValueError(f"freq_penalty={freq_penalty} must be >= 0")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if not do_sample:
        unused = {k: v for k, v in (("temperature", temperature if temperature not in (0, 1)
                                     else None), ("top_k", top_k), ("top_p", top_p),
                                    ("freq_penalty", freq_penalty or None)) if v is not None}
        if unused:
            raise ValueError(
                f"{unused} only apply when sampling, and do_sample=False is greedy; pass "
                "do_sample=True (or temperature=0 for greedy decoding)")


def sample_next(
    logits: Float[Tensor, "batch d_vocab"],
    do_sample: bool,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    freq_penalty: float = 0.0,
    tokens: Int[Tensor, "batch pos"] | None = None,
) -> Int[Tensor, " batch"]:
    """Pick the next token per row of ``logits``.

    Args:
        logits: the last position's logits.
        do_sample: sample (else argmax, and the other arguments must keep their defaults).
        temperature: divides the logits before sampling; 0 is greedy (argmax), as in
            TransformerLens.
        top_k: sample among the k most likely tokens only.
        top_p: sample within the nucleus: the most likely tokens whose probabilities sum to at
            least ``top_p`` (the token crossing ``top_p`` is kept).
        generator: the random generator of the draw (None: torch's global RNG).
        freq_penalty: subtracted from a token's logit once per occurrence in ``tokens``
            (TransformerLens' ``freq_penalty``).
        tokens: the sequences so far, for ``freq_penalty``.

    Returns:
        The chosen token ids.

    Raises:
        ValueError: a negative temperature or freq_penalty, ``top_k < 1``, ``top_p`` outside
            (0, 1], or sampling options given with ``do_sample=False``.
    """
    check_sampling(do_sample, temperature, top_k, top_p, freq_penalty)
    if not do_sample:
        return logits.argmax(-1)
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if freq_penalty > 0:
        if tokens is None:
            raise ValueError("freq_penalty needs the tokens generated so far (tokens=...)")
        counts = torch.zeros_like(logits).scatter_add_(
            -1, tokens.to(logits.device), torch.ones_like(tokens, dtype=logits.dtype,
                                                          device=logits.device))
        logits = logits - freq_penalty * counts  # [batch, d_vocab]
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop_sorted = probs.cumsum(-1) - probs >= top_p  # keep the token that crosses top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(logits.device)


def _eos_id(model: HookedKVShiftTransformer, stop_at_eos: bool,
            eos_token_id: int | list[int] | None) -> list[int] | None:
    """The EOS ids generation stops at (None: it does not stop early)."""
    if not stop_at_eos:
        if eos_token_id is not None:
            raise ValueError(f"eos_token_id={eos_token_id} is given but stop_at_eos=False; "
                             "pass stop_at_eos=True to stop at it")
        return None
    if eos_token_id is None:
        tok = model.tokenizer
        if tok is None or tok.eos_token_id is None:
            # A model on integer tokens (or a tokenizer without EOS) has no EOS to stop at.
            logger.debug("generate: no EOS token known; generating max_new_tokens tokens")
            return None
        return [int(tok.eos_token_id)]
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids or not all(isinstance(i, int) and 0 <= i < model.cfg.d_vocab for i in ids):
        raise ValueError(f"eos_token_id={eos_token_id!r} must be a token id (or a non-empty list "
                         f"of them) in [0, d_vocab={model.cfg.d_vocab})")
    return ids


@torch.no_grad()
def generate(
    model: HookedKVShiftTransformer,
    input: str | list[str] | Tensor = "",
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
    return_type: GenerateReturnType = "input",
    verbose: bool = True,
    generator: torch.Generator | None = None,
) -> Int[Tensor, "batch pos_plus_new"] | str | list[str]:
    """See :meth:`HookedKVShiftTransformer.generate`."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 0")
    if return_type not in ("input", "str", "tokens"):
        raise ValueError(f"return_type={return_type!r} is not one of ['input', 'str', 'tokens']")
    check_sampling(do_sample, temperature, top_k, top_p, freq_penalty)
    eos = _eos_id(model, stop_at_eos, eos_token_id)
    is_text = isinstance(input, str) or (isinstance(input, list) and bool(input)
                                         and all(isinstance(t, str) for t in input))
    if is_text:
        tokens = model.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)
        lengths = {len(model.to_tokens(t, prepend_bos=prepend_bos, move_to_device=False)[0])
                   for t in ([input] if isinstance(input, str) else input)}
        if len(lengths) > 1:
            raise ValueError(
                f"the prompts encode to different lengths {sorted(lengths)}; this model has no "
                "attention mask, so padded prompts would attend to the padding. Generate them one "
                "at a time (or pass equal-length token ids)")
    else:
        if prepend_bos is not None or padding_side is not None:
            raise ValueError("prepend_bos and padding_side apply to text input only; the input "
                             "is token ids")
        tokens = model.to_tokens(input)
    if return_type == "str" and model.tokenizer is None:
        raise ValueError("return_type='str' needs a tokenizer; this model has none")
    cache = model.new_cache() if use_past_kv_cache else None
    out, step_input = tokens, tokens
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    steps = range(max_new_tokens)
    if verbose:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="generate")
    for _ in steps:
        if cache is not None:
            logits = model(step_input, past_kv_cache=cache)[:, -1]
        else:
            logits = model(out)[:, -1]
        nxt = sample_next(logits, do_sample, temperature, top_k, top_p, generator,
                          freq_penalty, out)
        if eos is not None:
            # Finished rows keep emitting EOS, as in TransformerLens.
            nxt = torch.where(finished, torch.full_like(nxt, eos[0]), nxt)
            finished |= torch.isin(nxt, torch.tensor(eos, device=nxt.device))
        out = torch.cat([out, nxt[:, None]], dim=1)
        step_input = nxt[:, None]
        if eos is not None and bool(finished.all()):
            break
    if return_type == "tokens" or (return_type == "input" and not is_text):
        return out
    # As TransformerLens: the BOS token to_tokens put before the prompt is not part of the text.
    skip = 1 if is_text and model._resolve_prepend_bos(prepend_bos) else 0
    texts = model.to_string(out[:, skip:])
    if isinstance(input, str) or (not is_text and len(texts) == 1):
        return texts[0]
    return texts
