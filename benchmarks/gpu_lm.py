"""Training throughput of a ~125M-parameter language model on one GPU: KV-shift against vanilla
(and a plain PyTorch GPT of the same shape), bf16, eager and with torch.compile.

    python benchmarks/gpu_lm.py                       # the GPU benchmark (BENCHMARKS.md)
    python benchmarks/gpu_lm.py --tiny --device cpu   # a CPU smoke test of this script

The model: 12 layers, d_model 768, 12 heads of 64, MLP 3072, learned positions, LayerNorm, GELU,
untied unembedding, sequence 1024, on the embedded corpus (Python's standard library) with a BPE
tokenizer trained here (32768 tokens: ~134M parameters). Three models share the shape and the
data: ``plain`` (a textbook GPT: one fused QKV linear, ``scaled_dot_product_attention``, no
hooks), ``vanilla`` (HookedKVShiftTransformer with the shift off) and ``kvshift`` (keys and values
shifted, window 1); ours run with their hooks idle. Each trains with fused AdamW under bf16
autocast (weights fp32).

Timing: every model is warmed up (and compiled) first; then rounds alternate between the models,
``--steps`` steps per model per round, and each model's time per step is the median over
``--rounds`` rounds, so slow drift of the machine hits every model alike. Printed per model and
mode: tokens/s, MFU, and the ratios kvshift/vanilla and vanilla/plain (time per step).

MFU = model FLOPs per token x tokens/s / peak, with model FLOPs per token
``6 * N + 12 * n_layers * seq * d_model`` (N: parameters without the embedding tables, which are
lookups; the second term is attention's QK^T and AV, forward and backward, counted over the full
square as PaLM's appendix does, i.e. without a causal discount), and the peak a bf16 matmul
throughput measured in this run (``--peak-size`` square matrices), not a datasheet number.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kvshift_lens import HookedKVShiftTransformer, KVShiftConfig  # noqa: E402

VARIANTS = ("plain", "vanilla", "kvshift")
MODES = ("eager", "compile")


# ------------------------------------------------------------------------------------ models
class PlainBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_mlp: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.fc_in, self.fc_out = nn.Linear(d_model, d_mlp), nn.Linear(d_mlp, d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, p, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, p, 3, self.n_heads, -1).transpose(1, 3).unbind(2)
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(z.transpose(1, 2).reshape(b, p, d))
        return x + self.fc_out(F.gelu(self.fc_in(self.ln2(x))))


class PlainGPT(nn.Module):
    """The textbook model of the same shape: what a training step should cost."""

    def __init__(self, d_vocab: int, n_ctx: int, n_layers: int, d_model: int, n_heads: int,
                 d_mlp: int):
        super().__init__()
        self.W_E = nn.Embedding(d_vocab, d_model)
        self.W_pos = nn.Embedding(n_ctx, d_model)
        self.blocks = nn.ModuleList(PlainBlock(d_model, n_heads, d_mlp) for _ in range(n_layers))
        self.ln_final = nn.LayerNorm(d_model)
        self.unembed = nn.Linear(d_model, d_vocab)
        for p in self.parameters():
            if p.ndim == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.W_E(tokens) + self.W_pos.weight[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.unembed(self.ln_final(x))


def build(variant: str, args: argparse.Namespace, d_vocab: int, device: str) -> nn.Module:
    d_head = args.d_model // args.heads
    torch.manual_seed(0)
    if variant == "plain":
        return PlainGPT(d_vocab, args.seq, args.layers, args.d_model, args.heads,
                        4 * args.d_model).to(device)
    shifted = variant == "kvshift"
    cfg = KVShiftConfig(n_layers=args.layers, d_model=args.d_model, d_head=d_head,
                        n_heads=args.heads, d_mlp=4 * args.d_model, n_ctx=args.seq,
                        d_vocab=d_vocab, act_fn="gelu", shift_k=shifted, shift_v=shifted,
                        shift_init="uniform" if shifted else "identity", device=device)
    return HookedKVShiftTransformer(cfg)


EMBEDDING_TABLES = ("embed.W_E", "pos_embed.W_pos", "W_E.weight", "W_pos.weight")
"""Token and position tables (ours, plain): lookups, not matmuls."""


def non_embedding_params(model: nn.Module) -> int:
    """Parameters that take part in matmuls: everything but the token and position tables."""
    names = {name for name, _ in model.named_parameters()}
    missing = [n for n in ("embed.W_E", "W_E.weight") if n in names] or None
    if missing is None:
        raise ValueError(f"no token embedding among the parameters {sorted(names)[:5]}...")
    return sum(p.numel() for name, p in model.named_parameters() if name not in EMBEDDING_TABLES)


def flops_per_token(n_params: int, n_layers: int, seq: int, d_model: int) -> int:
    """Training FLOPs per token: ``6 N`` for the matmuls with weights (forward 2N, backward 4N)
    plus attention's score and mixing matmuls, ``12 * n_layers * seq * d_model`` (PaLM)."""
    return 6 * n_params + 12 * n_layers * seq * d_model


# ------------------------------------------------------------------------------------ timing
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(device: str, n: int, dtype: torch.dtype, repeats: int = 20) -> float:
    """Measured FLOP/s of an ``n x n @ n x n`` matmul in ``dtype`` (best of 3 timings)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = math.inf
    for _ in range(3):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t0) / repeats)
    return 2 * n**3 / best


def make_step(model: nn.Module, opt: torch.optim.Optimizer, ours: bool, autocast):
    def step(tokens: Tensor) -> None:
        with autocast():
            logits = model(tokens)
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32768, help="BPE vocabulary size")
    parser.add_argument("--max-files", type=int, default=None,
                        help="cap on corpus files (default: the whole embedded corpus)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--modes", default="eager,compile")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--peak-size", type=int, default=8192)
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny model and corpus: a smoke test of the script, on any device")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.tiny:
        args.layers, args.d_model, args.heads, args.seq, args.batch = 2, 64, 4, 64, 2
        args.vocab, args.max_files, args.steps, args.rounds, args.warmup = 300, 20, 2, 2, 1
        args.peak_size = 256
    modes = [m for m in args.modes.split(",") if m]
    variants = [v for v in args.variants.split(",") if v]
    for m in modes:
        if m not in MODES:
            parser.error(f"--modes: {m!r} is not one of {list(MODES)}")
    for v in variants:
        if v not in VARIANTS:
            parser.error(f"--variants: {v!r} is not one of {list(VARIANTS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu for a smoke test)")
    device = args.device
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    from kvshift_lens.data.text import TextTask

    t0 = time.perf_counter()
    task = TextTask.from_corpus("stdlib", tokenizer="bpe", seq_len=args.seq,
                                bpe_vocab_size=args.vocab, max_files=args.max_files)
    print(f"corpus: {task.n_tokens:,} tokens, vocabulary {task.d_vocab} "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)
    gen = torch.Generator().manual_seed(0)
    n_batches = args.warmup + args.steps * args.rounds
    batches = [task.sample(args.batch, gen).tokens.to(device, non_blocking=True)
               for _ in range(n_batches)]

    peak = matmul_peak(device, args.peak_size, dtype)
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}; measured "
          f"{str(dtype).split('.')[-1]} matmul peak {peak / 1e12:.3g} TFLOP/s", flush=True)

    def autocast():
        return (torch.autocast("cuda", dtype=torch.bfloat16) if cuda
                else torch.autocast("cpu", enabled=False))

    steps, info = {}, {}
    for variant in variants:
        model = build(variant, args, task.d_vocab, device)
        n = non_embedding_params(model)
        info[variant] = {"params": sum(p.numel() for p in model.parameters()),
                         "non_embedding_params": n,
                         "flops_per_token": flops_per_token(n, args.layers, args.seq,
                                                            args.d_model)}
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=cuda)
        for mode in modes:
            runner = torch.compile(model) if mode == "compile" else model
            step = make_step(runner, opt, variant != "plain", autocast)
            t0 = time.perf_counter()
            for i in range(args.warmup):
                step(batches[i])
            sync(device)
            print(f"{variant:8s} {mode:8s} warm-up {time.perf_counter() - t0:.0f}s", flush=True)
            steps[(variant, mode)] = step
    times: dict[tuple[str, str], list[float]] = {k: [] for k in steps}
    for r in range(args.rounds):
        keys = list(steps)
        keys = keys[r % len(keys):] + keys[: r % len(keys)]  # rotate who goes first
        for key in keys:
            base = args.warmup + r * args.steps
            sync(device)
            t0 = time.perf_counter()
            for i in range(args.steps):
                steps[key](batches[base + i])
            sync(device)
            times[key].append((time.perf_counter() - t0) / args.steps)

    tokens_per_step = args.batch * args.seq
    results = {"device": torch.cuda.get_device_name() if cuda else "cpu",
               "peak_flops": peak, "shape": {k: getattr(args, k) for k in
                                             ("layers", "d_model", "heads", "seq", "batch")},
               "d_vocab": task.d_vocab, "models": info, "runs": {}}
    print(f"\n{'model':8s} {'mode':8s} {'ms/step':>9s} {'tokens/s':>11s} {'MFU':>6s}")
    for (variant, mode), ts in times.items():
        t = statistics.median(ts)
        tps = tokens_per_step / t
        mfu = info[variant]["flops_per_token"] * tps / peak
        results["runs"][f"{variant}/{mode}"] = {"seconds_per_step": t, "tokens_per_second": tps,
                                                "mfu": mfu, "rounds": ts}
        print(f"{variant:8s} {mode:8s} {t * 1e3:9.1f} {tps:11,.0f} {mfu:6.1%}")
    ratios = {}
    for mode in modes:
        for num, den in (("kvshift", "vanilla"), ("vanilla", "plain"), ("kvshift", "plain")):
            if (num, mode) in times and (den, mode) in times:
                per_round = [a / b for a, b in zip(times[(num, mode)], times[(den, mode)],
                                                   strict=True)]
                ratios[f"{num}/{den} {mode}"] = statistics.median(per_round)
    print()
    for k, v in ratios.items():
        print(f"time per step {k}: {v:.3f}")
    results["ratios"] = ratios
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
