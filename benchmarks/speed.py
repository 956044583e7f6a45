"""Speed and memory of HookedKVShiftTransformer, as ratios measured side by side in one run.

    .venv/bin/python benchmarks/speed.py            # full run (a few minutes on 2 CPU cores)
    .venv/bin/python benchmarks/speed.py --quick    # smoke test

Every number printed is a ratio of two variants timed in the same process, interleaved: each
round times ``--steps`` consecutive calls of every variant (the order alternates between rounds),
the round's ratio is taken, and the median over ``--repeats`` rounds is reported with its min-max
spread. Absolute times depend on the machine and its load; only the ratios are meant to be read.

What is compared (BENCHMARKS.md has the full story and the goals):

(a) ``ours / plain``: one training step (forward with ``return_type="loss"``, backward, zero grads)
    of our model with no hooks and the shift off, against a plain PyTorch model of the same shape
    and parameter count written below (``PlainTransformer``: pre-LN, fused QKV linear,
    ``F.scaled_dot_product_attention(is_causal=True)``), loaded with the same weights so both
    compute the same loss. Attention-only, and with MLPs.
(b) ``shift on / shift off``: the same training step of our model with the K and V shift on
    (window 1, ``free``, non-identity coefficients) against it with the shift off. For context,
    ``naive shift / shift off``: our model with the library's ``shift`` swapped (at run time, in
    this process only) for a textbook one (``cat`` a zero row, slice, multiply, add).
(c) ``run_with_cache`` (every hook, forward only, ``torch.no_grad``) against a plain forward of the
    same model: time, and peak memory; and the peak memory of
    ``run_with_cache(names_filter="blocks.0.hook_resid_post")`` against the plain forward. Peak
    memory is measured in a fresh subprocess per variant (see ``_mem_worker``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import kvshift_lens.components.attention as attention_module  # noqa: E402
from kvshift_lens import HookedKVShiftTransformer, KVShiftConfig  # noqa: E402

# The benchmark shape (the brief): 4 layers, d_model 256, 8 heads of 32, seq 256, batch 8.
N_LAYERS, D_MODEL, N_HEADS, D_HEAD = 4, 256, 8, 32
SEQ, BATCH, D_VOCAB, D_MLP = 256, 8, 512, 1024
FILTER_NAME = "blocks.0.hook_resid_post"

GOALS = {"train_vs_plain": 1.10, "shift_on_vs_off": 1.05, "filtered_cache_mem": 1.10}


# ---------------------------------------------------------------------------------- models
def make_config(attn_only: bool, shift_on: bool) -> KVShiftConfig:
    return KVShiftConfig(
        n_layers=N_LAYERS, d_model=D_MODEL, d_head=D_HEAD, n_heads=N_HEADS, n_ctx=SEQ,
        d_vocab=D_VOCAB, d_mlp=D_MLP, act_fn="gelu", attn_only=attn_only,
        normalization_type="LN", positional_embedding_type="standard",
        shift_k=shift_on, shift_v=shift_on, shift_window=1, shift_param="free",
        device="cpu", dtype="float32",
    )


def make_ours(attn_only: bool, shift_on: bool, seed: int = 0) -> HookedKVShiftTransformer:
    model = HookedKVShiftTransformer(make_config(attn_only, shift_on),
                                     generator=torch.Generator().manual_seed(seed))
    if shift_on:
        # Non-identity coefficients: every head mixes in a good share of position t - 1.
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for block in model.blocks:
                for which in ("k", "v"):
                    p = getattr(block.attn, f"shift_{which}")
                    p.copy_(torch.tensor([0.7, 0.3]) + 0.1 * torch.randn(p.shape, generator=g))
    return model


class PlainBlock(nn.Module):
    def __init__(self, attn_only: bool):
        super().__init__()
        self.ln1 = nn.LayerNorm(D_MODEL)
        self.qkv = nn.Linear(D_MODEL, 3 * D_MODEL)
        self.out = nn.Linear(D_MODEL, D_MODEL)
        self.attn_only = attn_only
        if not attn_only:
            self.ln2 = nn.LayerNorm(D_MODEL)
            self.fc_in = nn.Linear(D_MODEL, D_MLP)
            self.fc_out = nn.Linear(D_MLP, D_MODEL)

    def forward(self, x: Tensor) -> Tensor:
        b, p, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, p, 3, N_HEADS, D_HEAD).unbind(2)
        z = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True)
        x = x + self.out(z.transpose(1, 2).reshape(b, p, D_MODEL))
        if self.attn_only:
            return x
        return x + self.fc_out(F.gelu(self.fc_in(self.ln2(x))))


class PlainTransformer(nn.Module):
    """The textbook model of the same shape: what a training step should cost."""

    def __init__(self, attn_only: bool):
        super().__init__()
        self.embed = nn.Embedding(D_VOCAB, D_MODEL)
        self.pos = nn.Parameter(torch.zeros(SEQ, D_MODEL))
        self.blocks = nn.ModuleList([PlainBlock(attn_only) for _ in range(N_LAYERS)])
        self.ln_final = nn.LayerNorm(D_MODEL)
        self.unembed = nn.Linear(D_MODEL, D_VOCAB)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        logits = self.unembed(self.ln_final(x))
        return F.cross_entropy(logits[:, :-1].reshape(-1, D_VOCAB), tokens[:, 1:].reshape(-1))

    @torch.no_grad()
    def load_from(self, ours: HookedKVShiftTransformer) -> PlainTransformer:
        """Copy our model's weights, so that both compute the same loss."""
        self.embed.weight.copy_(ours.W_E)
        self.pos.copy_(ours.W_pos)
        for mine, theirs in zip(self.blocks, ours.blocks):
            a = theirs.attn
            w = [W.permute(0, 2, 1).reshape(D_MODEL, D_MODEL) for W in (a.W_Q, a.W_K, a.W_V)]
            mine.qkv.weight.copy_(torch.cat(w))
            mine.qkv.bias.copy_(torch.cat([a.b_Q.flatten(), a.b_K.flatten(), a.b_V.flatten()]))
            mine.out.weight.copy_(a.W_O.flatten(0, 1).T)
            mine.out.bias.copy_(a.b_O)
            mine.ln1.weight.copy_(theirs.ln1.w)
            mine.ln1.bias.copy_(theirs.ln1.b)
            if not mine.attn_only:
                mine.ln2.weight.copy_(theirs.ln2.w)
                mine.ln2.bias.copy_(theirs.ln2.b)
                mine.fc_in.weight.copy_(theirs.mlp.W_in.T)
                mine.fc_in.bias.copy_(theirs.mlp.b_in)
                mine.fc_out.weight.copy_(theirs.mlp.W_out.T)
                mine.fc_out.bias.copy_(theirs.mlp.b_out)
        self.ln_final.weight.copy_(ours.ln_final.w)
        self.ln_final.bias.copy_(ours.ln_final.b)
        self.unembed.weight.copy_(ours.W_U.T)
        self.unembed.bias.copy_(ours.b_U)
        return self


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def naive_shift(x: Tensor, coeffs: Tensor, past: Tensor | None = None) -> Tensor:
    """Textbook window-1 shift: ``c0 * x_t + c1 * x_{t-1}`` (x_{-1} = 0). No decoding cache."""
    assert past is None and coeffs.shape[-1] == 2
    prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
    return x * coeffs[:, 0, None] + prev * coeffs[:, 1, None]


@contextlib.contextmanager
def swapped_shift(fn: Callable):
    """Make attention call ``fn`` instead of the library's ``shift`` (this process only)."""
    original = attention_module.shift
    attention_module.shift = fn
    try:
        yield
    finally:
        attention_module.shift = original


# ---------------------------------------------------------------------------------- timing
def tokens_for(batch: int = BATCH, seq: int = SEQ, seed: int = 0) -> Tensor:
    return torch.randint(0, D_VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def train_step(model: nn.Module, tokens: Tensor, ours: bool) -> Callable[[], None]:
    def step() -> None:
        loss = model(tokens, return_type="loss") if ours else model(tokens)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def time_side_by_side(variants: dict[str, Callable[[], None]], steps: int, repeats: int,
                      warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each variant, one entry per round; variants interleaved per round,
    in an order that is reversed every other round."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    names = list(variants)
    out: dict[str, list[float]] = {n: [] for n in names}
    gc_was_enabled = gc.isenabled()
    try:
        for r in range(repeats):
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                fn = variants[name]
                gc.collect()
                gc.disable()
                t0 = time.perf_counter()
                for _ in range(steps):
                    fn()
                out[name].append((time.perf_counter() - t0) / steps)
                gc.enable()
    finally:
        if gc_was_enabled:
            gc.enable()
    return out


def ratio_stats(times: dict[str, list[float]], num: str, den: str) -> tuple[float, float, float]:
    """Median, min and max over rounds of the per-round ratio num / den."""
    rs = [a / b for a, b in zip(times[num], times[den])]
    return statistics.median(rs), min(rs), max(rs)


# ---------------------------------------------------------------------------------- memory
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _forward_call(model: HookedKVShiftTransformer, variant: str, tokens: Tensor):
    if variant == "forward":
        return model(tokens)
    if variant == "cache_all":
        return model.run_with_cache(tokens)
    if variant == "cache_filtered":
        return model.run_with_cache(tokens, names_filter=FILTER_NAME)
    raise ValueError(variant)


def _profiler_peak(fn: Callable[[], object]) -> int:
    """Peak of the bytes torch's CPU allocator holds for tensors allocated during ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    del result
    events = [e for e in prof.events() if e.name == "[memory]"]
    events.sort(key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.cpu_memory_usage
        peak = max(peak, live)
    return peak


def _mem_worker(variant: str, attn_only: bool, threads: int) -> None:
    """Run in a fresh process: build the model, warm the code path up on a tiny input, then
    measure how far the process' resident set rises above its pre-call level during one call."""
    torch.set_num_threads(threads)
    model = make_ours(attn_only, shift_on=True)
    tokens = tokens_for()
    with torch.no_grad():
        _forward_call(model, variant, tokens_for(1, 8))  # lazy init, not the measured size
        gc.collect()
        base, hw_before = _rss_bytes(), _maxrss_bytes()
        result = _forward_call(model, variant, tokens)
        hw_after = _maxrss_bytes()
        del result
        gc.collect()
        prof_peak = _profiler_peak(lambda: _forward_call(model, variant, tokens))
    print(json.dumps({
        "rss_peak_increase": hw_after - base,
        # If the call never rose above the earlier high-water mark, the rss number is only an
        # upper bound; the parent reports that.
        "rss_valid": hw_after > hw_before,
        "profiler_peak": prof_peak,
    }))


def measure_memory(variant: str, attn_only: bool, threads: int, repeats: int) -> dict:
    env = dict(os.environ)
    # A fixed mmap threshold makes glibc map every big tensor separately and unmap it when freed,
    # so the resident set follows live tensor memory instead of a heap that never shrinks.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))
    env.setdefault("MALLOC_TRIM_THRESHOLD_", str(128 * 1024))
    runs = []
    for _ in range(repeats):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_mem-worker", variant,
               "--threads", str(threads)] + (["--with-mlp"] if not attn_only else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"memory worker {variant} failed:\n{proc.stderr}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {
        "rss": statistics.median(r["rss_peak_increase"] for r in runs),
        "rss_valid": all(r["rss_valid"] for r in runs),
        "profiler": statistics.median(r["profiler_peak"] for r in runs),
    }


# ---------------------------------------------------------------------------------- main
def check_equivalence(attn_only: bool) -> tuple[int, int]:
    ours = make_ours(attn_only, shift_on=False)
    plain = PlainTransformer(attn_only).load_from(ours)
    if n_params(ours) != n_params(plain):
        raise AssertionError(f"parameter counts differ: {n_params(ours)} vs {n_params(plain)}")
    tokens = tokens_for(2, 64)
    with torch.no_grad():
        a, b = ours(tokens, return_type="loss"), plain(tokens)
    if not torch.allclose(a, b, atol=1e-5, rtol=1e-5):
        raise AssertionError(f"plain model disagrees with ours: loss {b.item()} vs {a.item()}")
    return n_params(ours), n_params(plain)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="few rounds: a smoke test")
    ap.add_argument("--steps", type=int, default=None, help="calls per variant per round")
    ap.add_argument("--repeats", type=int, default=None, help="rounds (ratios: median of these)")
    ap.add_argument("--threads", type=int,
                    default=int(os.environ.get("KVSHIFT_BENCH_THREADS", "2")),
                    help="torch threads (default: $KVSHIFT_BENCH_THREADS or 2)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--_mem-worker", dest="mem_worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--with-mlp", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.mem_worker is not None:
        _mem_worker(args.mem_worker, attn_only=not args.with_mlp, threads=args.threads)
        return

    torch.set_num_threads(args.threads)
    steps = args.steps or (2 if args.quick else 4)
    repeats = args.repeats or (3 if args.quick else 9)
    warmup = 1 if args.quick else 2
    mem_repeats = 1 if args.quick else 3
    t_start = time.perf_counter()

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs "
          f"({cpu}); python {platform.python_version()}")
    print(f"shape: {N_LAYERS} layers, d_model {D_MODEL}, {N_HEADS} heads x {D_HEAD}, seq {SEQ}, "
          f"batch {BATCH}, d_vocab {D_VOCAB}, d_mlp {D_MLP} (gelu) when MLPs are on")
    print(f"timing: {repeats} rounds x {steps} calls per variant, interleaved; ratio = median of "
          f"per-round ratios [min-max]\n")

    rows: list[tuple[str, tuple[float, float, float] | float, float | None, str]] = []
    tokens = tokens_for()

    # (a) + (b), attention-only: one interleaved group of four variants.
    for attn_only in (True, False):
        label = "attn-only" if attn_only else "with MLP"
        n_ours, n_plain = check_equivalence(attn_only)
        off = make_ours(attn_only, shift_on=False)
        plain = PlainTransformer(attn_only).load_from(off)
        on = make_ours(attn_only, shift_on=True)
        step_on = train_step(on, tokens, ours=True)

        def step_naive(step_on=step_on) -> None:
            with swapped_shift(naive_shift):
                step_on()

        variants = {"plain": train_step(plain, tokens, ours=False),
                    "off": train_step(off, tokens, ours=True),
                    "on": step_on, "naive": step_naive}
        t0 = time.perf_counter()
        times = time_side_by_side(variants, steps, repeats, warmup)
        print(f"[{label}: {n_ours:,} parameters in ours and in plain; "
              f"{time.perf_counter() - t0:.0f}s]")
        rows.append((f"(a) train step, ours (shift off, no hooks) / plain SDPA  [{label}]",
                     ratio_stats(times, "off", "plain"), GOALS["train_vs_plain"], "x"))
        rows.append((f"(b) train step, shift on / shift off  [{label}]",
                     ratio_stats(times, "on", "off"), GOALS["shift_on_vs_off"], "x"))
        rows.append((f"    context: naive shift on / shift off  [{label}]",
                     ratio_stats(times, "naive", "off"), None, "x"))
        rows.append((f"    context: ours shift on / plain SDPA  [{label}]",
                     ratio_stats(times, "on", "plain"), None, "x"))
        del off, plain, on, variants

    # (c) time: run_with_cache vs plain forward, no_grad, our model with the shift on.
    model = make_ours(True, shift_on=True)

    def no_grad(fn: Callable[[], object]) -> Callable[[], None]:
        def call() -> None:
            with torch.no_grad():
                fn()

        return call

    variants = {
        "forward": no_grad(lambda: model(tokens)),
        "cache_all": no_grad(lambda: model.run_with_cache(tokens)),
        "cache_filtered": no_grad(lambda: model.run_with_cache(tokens, names_filter=FILTER_NAME)),
    }
    t0 = time.perf_counter()
    times = time_side_by_side(variants, steps, repeats, warmup)
    print(f"[forward timing: {time.perf_counter() - t0:.0f}s]")
    rows.append(("(c) time, run_with_cache (all hooks) / forward  [attn-only, no_grad]",
                 ratio_stats(times, "cache_all", "forward"), None, "x"))
    rows.append((f"(c) time, run_with_cache({FILTER_NAME}) / forward",
                 ratio_stats(times, "cache_filtered", "forward"), None, "x"))
    del model, variants

    # (c) memory: one fresh process per variant and repeat.
    t0 = time.perf_counter()
    mem_notes = []
    for attn_only in (True, False):
        label = "attn-only" if attn_only else "with MLP"
        mem = {v: measure_memory(v, attn_only, args.threads, mem_repeats)
               for v in ("forward", "cache_all", "cache_filtered")}
        for v, m in mem.items():
            note = "" if m["rss_valid"] else "  (rss did not pass the warm-up high-water mark)"
            mem_notes.append(f"  {label:9s} {v:15s} rss peak increase {m['rss'] / 2**20:7.1f} "
                             f"MiB, torch allocator peak {m['profiler'] / 2**20:7.1f} MiB{note}")
        for key, what in (("rss", "rss"), ("profiler", "allocator")):
            f = mem["forward"][key]
            rows.append((f"(c) peak mem ({what}), run_with_cache (all) / forward  [{label}]",
                         mem["cache_all"][key] / f, None, "x"))
            rows.append((f"(c) peak mem ({what}), run_with_cache({FILTER_NAME}) / forward"
                         f"  [{label}]",
                         mem["cache_filtered"][key] / f, GOALS["filtered_cache_mem"], "x"))
    print(f"[memory: {time.perf_counter() - t0:.0f}s]")
    print("\n".join(mem_notes))

    # The table.
    print()
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':{width}s}  {'ratio':>7s}  {'[min-max]':>13s}  {'goal':>7s}  met")
    print("-" * (width + 40))
    results = []
    for name, value, goal, _unit in rows:
        if isinstance(value, tuple):
            med, lo, hi = value
            spread = f"[{lo:.3f}-{hi:.3f}]"
        else:
            med, lo, hi, spread = value, value, value, ""
        goal_s = f"<= {goal:.2f}" if goal is not None else ""
        met = "" if goal is None else ("yes" if med <= goal else "NO")
        print(f"{name:{width}s}  {med:7.3f}  {spread:>13s}  {goal_s:>7s}  {met}")
        results.append({"measure": name.strip(), "ratio": med, "min": lo, "max": hi,
                        "goal": goal, "met": None if goal is None else med <= goal})
    total = time.perf_counter() - t_start
    print(f"\ntotal {total:.0f}s")
    if args.json is not None:
        args.json.write_text(json.dumps({"steps": steps, "repeats": repeats,
                                         "threads": args.threads, "results": results}, indent=2))


if __name__ == "__main__":
    main()
