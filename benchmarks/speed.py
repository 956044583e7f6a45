"""Speed and memory of HookedKVShiftTransformer, as ratios measured side by side in one run.

    .venv/bin/python benchmarks/speed.py            # full run (a few minutes, 1 torch thread)
    .venv/bin/python benchmarks/speed.py --quick    # smoke test

Every number printed is a ratio of two variants timed in the same process, interleaved: each
round runs every variant ``--steps`` times (the order rotates from round to round), the round's
ratio is taken, and the median over ``--repeats`` rounds is reported with its quartiles, the ratio
of the two variants' fastest rounds, and the median ratio of CPU time. Absolute times depend on
the machine and its load; only the ratios are meant to be read. The run ends by saying how busy
other processes kept the CPUs meanwhile; above 10% the timing ratios are not to be trusted.
``KVSHIFT_BENCH_THREADS`` (or ``--threads``) sets torch's thread count, 1 by default: on a shared
machine one thread never waits for another, so a busy neighbour disturbs the ratios least.

What is compared (BENCHMARKS.md has the full story and the goals):

(a) ``ours / plain``: one training step (forward with ``return_type="loss"``, backward, zero grads)
    of our model with no hooks and the shift off, against a plain PyTorch model of the same shape
    and parameter count written below (``PlainTransformer``: pre-LN, fused QKV linear,
    ``F.scaled_dot_product_attention(is_causal=True)``), loaded with the same weights so both
    compute the same loss. Attention-only, and with MLPs. Goal <= 1.03.
(b) ``shift on / shift off``: the same training step of our model with the K and V shift on
    (window 1, ``free``, non-identity coefficients) against it with the shift off (goal
    <= 1.03). For context,
    ``naive shift / shift off``: our model with the library's ``shift`` swapped (at run time, in
    this process only) for a textbook one (``cat`` a zero row, slice, multiply, add).
(c) ``run_with_cache`` (every hook, forward only, ``torch.no_grad``) against a plain forward of the
    same model: time (goal <= 1.6), and peak memory; and the peak memory of
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

TIMING_GROUPS = ("attn-only", "mlp", "forward")
GOALS = {"train_vs_plain": 1.03, "shift_on_vs_off": 1.03, "cache_all_time": 1.6,
         "filtered_cache_mem": 1.10}


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
            for p in model.shift_parameters():  # blocks.0.attn.shift_k, shift_v, blocks.1...
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
                      warmup: int) -> dict[str, dict[str, list[float]]]:
    """Seconds per call of each variant, one entry per round, as wall-clock time (``"wall"``)
    and as this process' CPU time (``"cpu"``, all threads). Each round runs every variant
    ``steps`` times; the order rotates from round to round so no variant always goes first."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    names = list(variants)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    gc_was_enabled = gc.isenabled()
    try:
        for r in range(repeats):
            k = r % len(names)
            order = names[k:] + names[:k]
            if (r // len(names)) % 2:
                order = order[::-1]
            for name in order:
                fn = variants[name]
                gc.collect()
                gc.disable()
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(steps):
                    fn()
                wall[name].append((time.perf_counter() - t0) / steps)
                cpu[name].append((time.process_time() - c0) / steps)
                gc.enable()
    finally:
        if gc_was_enabled:
            gc.enable()
    return {"wall": wall, "cpu": cpu}


def ratio_stats(times: dict[str, dict[str, list[float]]], num: str,
                den: str) -> tuple[float, float, float, float, float]:
    """Wall-clock ratio num / den: median over rounds of the per-round ratio, its lower and upper
    quartiles, and the ratio of the two variants' fastest rounds (the least disturbed by other
    load); then the median per-round ratio of CPU time."""
    wall, cpu = times["wall"], times["cpu"]
    rs = sorted(a / b for a, b in zip(wall[num], wall[den]))
    q1, _, q3 = statistics.quantiles(rs, n=4, method="inclusive") if len(rs) > 1 else rs * 3
    cpu_ratio = statistics.median(a / b for a, b in zip(cpu[num], cpu[den]))
    return statistics.median(rs), q1, q3, min(wall[num]) / min(wall[den]), cpu_ratio


# ---------------------------------------------------------------------------------- memory
def _proc_status_bytes(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (resident high-water mark) of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current resident set (Linux >= 4.0); False where that is refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


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
    # Every allocation and free, signed, in time order (kineto's raw "[memory]" events; the
    # aggregated prof.events() folds allocations into the op that made them).
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]"]
    live = peak = 0
    for _, nbytes in sorted(events):
        live += nbytes
        peak = max(peak, live)
    return peak


def _mem_worker(variant: str, attn_only: bool, threads: int) -> None:
    """Run in a fresh process: build the model, run the call once to warm it up, reset the
    resident-set high-water mark, and measure how far the resident set rises above its pre-call
    level during one more call. Prints one JSON line."""
    torch.set_num_threads(threads)
    model = make_ours(attn_only, shift_on=True)
    tokens = tokens_for()
    can_reset = _reset_peak_rss()
    with torch.no_grad():
        # Warm-up: at the measured size when the high-water mark can be reset afterwards; else on
        # a tiny input, so that the warm-up's own peak stays below the measured call's.
        warm = _forward_call(model, variant, tokens if can_reset else tokens_for(1, 8))
        del warm
        gc.collect()
        if can_reset:
            _reset_peak_rss()
        base, hw_before = _proc_status_bytes("VmRSS"), _proc_status_bytes("VmHWM")
        result = _forward_call(model, variant, tokens)
        hw_after = _proc_status_bytes("VmHWM")
        cached = _cached_bytes(result[1]) if isinstance(result, tuple) else 0
        del result
        gc.collect()
        prof_peak = _profiler_peak(lambda: _forward_call(model, variant, tokens))
    print(json.dumps({
        "rss_peak_increase": hw_after - base,
        # Without a reset, a call that never rose above the earlier high-water mark gives only an
        # upper bound; the parent says so.
        "rss_valid": can_reset or hw_after > hw_before,
        "profiler_peak": prof_peak,
        "cached_bytes": cached,
    }))


def _cached_bytes(cache) -> int:
    """Bytes of the distinct storages behind a cache's tensors (what it keeps alive)."""
    storages = {}
    for t in cache.cache_dict.values():
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


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
        "cached": statistics.median(r["cached_bytes"] for r in runs),
    }


def forward_variants(model: HookedKVShiftTransformer,
                     tokens: Tensor) -> dict[str, Callable[[], None]]:
    """(c): a plain forward and two ``run_with_cache`` calls, each under ``torch.no_grad``."""

    def no_grad(variant: str) -> Callable[[], None]:
        def call() -> None:
            with torch.no_grad():
                _forward_call(model, variant, tokens)

        return call

    return {v: no_grad(v) for v in ("forward", "cache_all", "cache_filtered")}


class OtherLoad:
    """How busy the machine was with *other* processes while this one ran: CPU time all CPUs
    spent busy (/proc/stat) less this process' own (and its children's), over the CPUs' time."""

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        ticks = os.sysconf("SC_CLK_TCK")
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / ticks  # all but idle and iowait
        t = os.times()
        return time.monotonic(), busy, t.user + t.system + t.children_user + t.children_system

    def fraction(self) -> float:
        (w0, b0, o0), (w1, b1, o1) = self.start, self._sample()
        return max(0.0, ((b1 - b0) - (o1 - o0)) / ((w1 - w0) * (os.cpu_count() or 1)))


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
    ap.add_argument("--steps", type=int, default=None,
                    help="calls per variant per round (default 1)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="rounds; ratios are medians over rounds (default 40, --quick 3)")
    ap.add_argument("--threads", type=int,
                    default=int(os.environ.get("KVSHIFT_BENCH_THREADS", "1")),
                    help="torch threads (default: $KVSHIFT_BENCH_THREADS or 1)")
    ap.add_argument("--skip-memory", action="store_true", help="leave out the memory subprocesses")
    ap.add_argument("--only", action="append", choices=TIMING_GROUPS, default=None,
                    help="time only this group (repeatable; default: all): training steps of the "
                         "attention-only or the MLP model, or the no-grad forwards of (c)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--_mem-worker", dest="mem_worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--with-mlp", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.mem_worker is not None:
        _mem_worker(args.mem_worker, attn_only=not args.with_mlp, threads=args.threads)
        return

    torch.set_num_threads(args.threads)
    steps = args.steps or 1
    repeats = args.repeats or (3 if args.quick else 40)
    warmup = 1 if args.quick else 2
    mem_repeats = 1 if args.quick else 2
    t_start = time.perf_counter()
    other = OtherLoad()

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs "
          f"({cpu}); python {platform.python_version()}")
    print(f"shape: {N_LAYERS} layers, d_model {D_MODEL}, {N_HEADS} heads x {D_HEAD}, seq {SEQ}, "
          f"batch {BATCH}, d_vocab {D_VOCAB}; d_mlp {D_MLP} (gelu) in the MLP config")
    print(f"timing: {repeats} rounds x {steps} calls per variant, variants interleaved\n")

    rows: list[tuple[str, tuple[float, ...], float | None]] = []
    tokens = tokens_for()

    # (a) + (b): one interleaved group per config, training steps.
    groups = args.only or list(TIMING_GROUPS)
    for attn_only in [a for a, g in ((True, "attn-only"), (False, "mlp")) if g in groups]:
        label = "attn-only" if attn_only else "MLP"
        n_ours, _ = check_equivalence(attn_only)
        off = make_ours(attn_only, shift_on=False)
        plain = PlainTransformer(attn_only).load_from(off)
        on = make_ours(attn_only, shift_on=True)
        step_on = train_step(on, tokens, ours=True)
        variants = {"plain": train_step(plain, tokens, ours=False),
                    "off": train_step(off, tokens, ours=True),
                    "on": step_on}
        if attn_only:
            def step_naive(step_on=step_on) -> None:
                with swapped_shift(naive_shift):
                    step_on()

            variants["naive"] = step_naive
        t0 = time.perf_counter()
        times = time_side_by_side(variants, steps, repeats, warmup)
        print(f"[{label}: {n_ours:,} parameters in ours and in plain, same loss; "
              f"{time.perf_counter() - t0:.0f}s]")
        rows.append((f"(a) train step: ours, shift off, no hooks / plain SDPA [{label}]",
                     ratio_stats(times, "off", "plain"), GOALS["train_vs_plain"]))
        rows.append((f"(b) train step: shift on / shift off [{label}]",
                     ratio_stats(times, "on", "off"), GOALS["shift_on_vs_off"]))
        if attn_only:
            rows.append((f"    context: naive shift on / shift off [{label}]",
                         ratio_stats(times, "naive", "off"), None))
        rows.append((f"    context: ours, shift on / plain SDPA [{label}]",
                     ratio_stats(times, "on", "plain"), None))
        del off, plain, on, variants, times

    # (c) time: run_with_cache vs plain forward, no_grad, our model with the shift on.
    if "forward" in groups:
        variants = forward_variants(make_ours(True, shift_on=True), tokens)
        t0 = time.perf_counter()
        times = time_side_by_side(variants, steps, repeats, warmup)
        print(f"[forward, no_grad, shift on, attn-only: {time.perf_counter() - t0:.0f}s]")
        rows.append(("(c) time: run_with_cache, all hooks / forward [attn-only]",
                     ratio_stats(times, "cache_all", "forward"), GOALS["cache_all_time"]))
        rows.append(("(c) time: run_with_cache, one hook / forward [attn-only]",
                     ratio_stats(times, "cache_filtered", "forward"), None))
        del variants, times

    # (c) memory: one fresh process per variant and repeat.
    mem_lines = []
    if not args.skip_memory:
        t0 = time.perf_counter()
        for attn_only in (True,) if args.quick else (True, False):
            label = "attn-only" if attn_only else "MLP"
            mem = {v: measure_memory(v, attn_only, args.threads, mem_repeats)
                   for v in ("forward", "cache_all", "cache_filtered")}
            for v, m in mem.items():
                note = "" if m["rss_valid"] else "  (rss: upper bound only)"
                mem_lines.append(
                    f"  {label:9s} {v:15s} rss rise {m['rss'] / 2**20:6.1f} MiB, torch "
                    f"allocator peak {m['profiler'] / 2**20:6.1f} MiB, cache keeps "
                    f"{m['cached'] / 2**20:6.1f} MiB{note}")
            fwd, filt = mem["forward"], mem["cache_filtered"]
            rows.append((f"(c) peak mem: run_with_cache, all hooks / forward [{label}]",
                         (mem["cache_all"]["rss"] / fwd["rss"],), None))
            rows.append((f"(c) peak mem: run_with_cache, one hook / forward [{label}]",
                         (filt["rss"] / fwd["rss"],), GOALS["filtered_cache_mem"]))
            rows.append((f"    same, torch allocator peak instead of rss [{label}]",
                         (filt["profiler"] / fwd["profiler"],), None))
            rows.append((f"    same, less the cached tensor itself (allocator) [{label}]",
                         ((filt["profiler"] - filt["cached"]) / fwd["profiler"],), None))
        print(f"[memory, {mem_repeats} fresh process(es) per variant: "
              f"{time.perf_counter() - t0:.0f}s]")
        print(f"peak memory of one call, no_grad, shift on ({FILTER_NAME} for 'one hook'):")
        print("\n".join(mem_lines))

    # The table.
    print()
    width = max(len(r[0]) for r in rows)
    head = (f"{'measure':{width}s}  {'ratio':>6s}  {'IQR':>13s}  {'min/min':>7s}  {'cpu':>6s}  "
            f"{'goal':>7s}  met")
    print(head)
    print("-" * len(head))
    results = []
    for name, stats, goal in rows:
        med = stats[0]
        iqr = f"[{stats[1]:.3f}-{stats[2]:.3f}]" if len(stats) > 1 else ""
        mins = f"{stats[3]:.3f}" if len(stats) > 1 else ""
        cpu_s = f"{stats[4]:.3f}" if len(stats) > 1 else ""
        goal_s = f"<= {goal:.2f}" if goal is not None else ""
        met = "" if goal is None else ("yes" if med <= goal else "NO")
        print(f"{name:{width}s}  {med:6.3f}  {iqr:>13s}  {mins:>7s}  {cpu_s:>6s}  {goal_s:>7s}  "
              f"{met}")
        results.append({"measure": name.strip(), "ratio": med, "stats": list(stats),
                        "goal": goal, "met": None if goal is None else med <= goal})
    print("\nratio: wall-clock, median over rounds of the per-round ratio; IQR: its quartiles; "
          "min/min: ratio of the two\nvariants' fastest rounds; cpu: median per-round ratio of "
          "process CPU time. Memory ratios: no spread\n(the allocator peak is exact; rss is the "
          "median of the fresh processes).")
    load = other.fraction()
    print(f"total {time.perf_counter() - t_start:.0f}s; other processes kept {load:.0%} of the "
          f"CPUs busy meanwhile")
    if load > 0.1:
        advice = "" if args.threads == 1 else (
            ", or with --threads 1, which suffers less from a busy neighbour")
        print("WARNING: the machine was busy with other work: timing ratios are unreliable "
              f"(memory ratios are not affected). Rerun on a quiet machine{advice}.")
    if args.json is not None:
        args.json.write_text(json.dumps({"steps": steps, "repeats": repeats,
                                         "threads": args.threads, "cpu": cpu,
                                         "other_load": load, "results": results}, indent=2))


if __name__ == "__main__":
    main()
