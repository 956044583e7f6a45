"""Linear probes for the identity of the previous token.

At every position ``t >= start`` the probe reads one activation ``x_t`` (a residual stream
``blocks.{l}.hook_resid_pre`` / ``hook_resid_post`` ``[batch, pos, d_model]``, or a per-head hook
such as ``blocks.{l}.attn.hook_k_shifted`` ``[batch, pos, head, d_head]``, heads flattened or one
head) and predicts ``tokens[t - 1]``: multinomial logistic regression on standardised features,
fitted full-batch with Adam from zero weights for ``steps`` steps (deterministic: the only
randomness is the seeded train/test split and the label shuffle).

Sequences, not positions, are split into train and test (``train_frac`` of the sequences train),
so no test sequence is seen in training. The **shuffled-label baseline** is the same probe trained
on the training labels permuted across examples and scored on the true test labels: what the
probe gets from class frequencies and chance alone. ``majority_accuracy`` is the test frequency of
the most common training label.

What to expect: ``hook_resid_pre`` of layer 0 is the token and position embedding of ``t`` alone,
so nothing linear in it reveals ``tokens[t - 1]`` beyond what ``tokens[t]`` implies about its
neighbour (≈ chance on random tokens). A key-shifted head's ``hook_k_shifted`` is
``a1 K_t + a2 K_{t-1}``: the previous token's key sits in it by construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from probes._hooks import model_dims, prepare_tokens, require_hooks

Site = str | tuple[str, int]
"""A probe site: a full hook name, or ``(hook_name, head)`` for one head of a per-head hook."""


@dataclass(frozen=True)
class ProbeResult:
    """One probe's scores (accuracies on held-out sequences unless named ``train_``)."""

    site: str
    head: int | None
    train_accuracy: float
    test_accuracy: float
    shuffled_accuracy: float
    majority_accuracy: float
    n_train: int
    n_test: int
    n_classes: int
    n_features: int

    @property
    def label(self) -> str:
        return self.site if self.head is None else f"{self.site}[{self.head}]"

    @property
    def above_shuffled(self) -> float:
        """``test_accuracy - shuffled_accuracy``."""
        return self.test_accuracy - self.shuffled_accuracy


def default_sites(model: Any) -> list[str]:
    """``hook_resid_pre`` and ``hook_resid_post`` of every layer, and every layer's
    ``attn.hook_k_shifted`` where the model has it."""
    n_layers, _ = model_dims(model)
    hook_dict = getattr(model, "hook_dict", {})
    sites = []
    for layer in range(n_layers):
        sites += [f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.hook_resid_post"]
        if f"blocks.{layer}.attn.hook_k_shifted" in hook_dict:
            sites.append(f"blocks.{layer}.attn.hook_k_shifted")
    return sites


def _split_site(site: Site) -> tuple[str, int | None]:
    if isinstance(site, str):
        return site, None
    if isinstance(site, tuple) and len(site) == 2 and isinstance(site[0], str) and isinstance(site[1], int):
        return site
    raise TypeError(f"a probe site is a hook name or (hook_name, head), got {site!r}")


def _features(act: Tensor, name: str, head: int | None, start: int) -> Float[Tensor, "batch n feat"]:
    if name.rsplit(".", 1)[-1].startswith("hook_shift_") or act.ndim not in (3, 4):
        raise ValueError(
            f"{name} has shape {tuple(act.shape)}: a probe needs a per-position activation "
            "[batch, pos, d] or [batch, pos, head, d] (coefficient and pattern hooks have none)")
    if head is not None:
        if act.ndim != 4:
            raise ValueError(f"{name} has no head axis (shape {tuple(act.shape)}); drop the head")
        if not 0 <= head < act.shape[2]:
            raise ValueError(f"head={head} is out of range for {name} with {act.shape[2]} heads")
        act = act[:, :, head]
    x = act[:, start:].float()
    return x.reshape(x.shape[0], x.shape[1], -1)


def fit_logistic(
    x: Float[Tensor, "n feat"], y: Int[Tensor, " n"], n_classes: int, steps: int = 300,
    lr: float = 0.05, weight_decay: float = 1e-4,
) -> tuple[Float[Tensor, "feat class"], Float[Tensor, " class"], Float[Tensor, " feat"],
           Float[Tensor, " feat"]]:
    """Multinomial logistic regression, full batch, Adam from zero weights (deterministic).

    Returns ``(W, b, mean, std)``: predict with ``((x - mean) / std) @ W + b``.
    """
    mean = x.mean(0)
    std = x.std(0).clamp_min(1e-6)
    xs = (x - mean) / std
    W = torch.zeros(x.shape[1], n_classes, device=x.device, requires_grad=True)
    b = torch.zeros(n_classes, device=x.device, requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = F.cross_entropy(xs @ W + b, y) + weight_decay * W.square().sum()
            loss.backward()
            opt.step()
    return W.detach(), b.detach(), mean, std


def _accuracy(x: Tensor, y: Tensor, fit: tuple) -> float:
    W, b, mean, std = fit
    return float(((((x - mean) / std) @ W + b).argmax(-1) == y).float().mean())


@torch.no_grad()
def previous_token_probe(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    sites: Sequence[Site] | None = None,
    start: int = 1,
    train_frac: float = 0.5,
    steps: int = 300,
    lr: float = 0.05,
    seed: int = 0,
) -> dict[str, ProbeResult]:
    """Fit one probe per site that decodes ``tokens[t - 1]`` from the site's activation at ``t``.

    Args:
        model: a TransformerLens-style model.
        tokens: ``[batch, pos]`` (batch >= 2: train and test are whole sequences).
        sites: full hook names, or ``(hook_name, head)`` for one head of a
            ``[batch, pos, head, d]`` hook (a name alone flattens its heads); default
            :func:`default_sites`.
        start: the first position probed (``t - 1 >= start - 1``); 2 skips a BOS token at 0 as a
            label.
        train_frac: fraction of sequences used for training.
        steps, lr: Adam steps and learning rate of :func:`fit_logistic`.
        seed: seeds the sequence split and the label shuffle.

    Returns:
        ``{label: ProbeResult}``, with label the hook name or ``"name[head]"``.

    Raises:
        ValueError: a site the model lacks (named), a site without a per-position activation, too
            few sequences or positions.
    """
    pairs = [_split_site(s) for s in (default_sites(model) if sites is None else sites)]
    if not pairs:
        raise ValueError("no probe sites given")
    names = sorted({name for name, _ in pairs})
    require_hooks(model, names)
    tokens = prepare_tokens(model, tokens)
    n_seq, n_pos = tokens.shape
    if not 1 <= start < n_pos:
        raise ValueError(f"start={start} must be in [1, pos={n_pos})")
    if n_seq < 2:
        raise ValueError("a probe needs at least 2 sequences (train and test are split by sequence)")
    if not 0 < train_frac < 1:
        raise ValueError(f"train_frac={train_frac} must be in (0, 1)")
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)

    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_seq, generator=gen)
    n_train = min(max(1, round(train_frac * n_seq)), n_seq - 1)
    train_idx, test_idx = order[:n_train].to(tokens.device), order[n_train:].to(tokens.device)
    labels = tokens[:, start - 1 : -1]  # [batch, n]: tokens[t - 1] for t = start .. pos - 1
    y_train = labels[train_idx].reshape(-1)
    y_test = labels[test_idx].reshape(-1)
    n_classes = max(int(getattr(model.cfg, "d_vocab", 0) or 0), int(labels.max()) + 1)
    shuffled = y_train[torch.randperm(y_train.numel(), generator=gen).to(y_train.device)]
    counts = torch.bincount(y_train, minlength=n_classes)
    majority = float((y_test == counts.argmax()).float().mean())

    out = {}
    for name, head in pairs:
        feats = _features(cache[name], name, head, start)
        x_train = feats[train_idx].reshape(-1, feats.shape[-1])
        x_test = feats[test_idx].reshape(-1, feats.shape[-1])
        fit = fit_logistic(x_train, y_train, n_classes, steps=steps, lr=lr)
        fit_shuffled = fit_logistic(x_train, shuffled, n_classes, steps=steps, lr=lr)
        result = ProbeResult(
            site=name, head=head,
            train_accuracy=_accuracy(x_train, y_train, fit),
            test_accuracy=_accuracy(x_test, y_test, fit),
            shuffled_accuracy=_accuracy(x_test, y_test, fit_shuffled),
            majority_accuracy=majority,
            n_train=int(y_train.numel()), n_test=int(y_test.numel()),
            n_classes=n_classes, n_features=int(feats.shape[-1]),
        )
        out[result.label] = result
    return out


__all__ = ["ProbeResult", "Site", "default_sites", "fit_logistic", "previous_token_probe"]
