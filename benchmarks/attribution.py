"""Cost of attribution patching and edge attribution patching, in passes and in time.

    .venv/bin/python benchmarks/attribution.py            # full run (a few minutes on 2 CPU cores)
    .venv/bin/python benchmarks/attribution.py --quick    # smoke test
    .venv/bin/python benchmarks/attribution.py --agreement   # estimates vs exact patching
    .venv/bin/python benchmarks/attribution.py --zoo         # the zoo's two-layer text models

(1) **Passes.** Forward passes are counted by a hook on ``hook_embed`` (it fires once per forward
pass of the model), backward passes by a gradient hook the metric puts on the logits (it fires once
per backward pass that starts at the metric). Counted for: one forward + backward of the metric
(the unit); ``attribution_patch`` over every head and position of the attention hooks, the shifted
keys and values, the patterns, the coefficients and the residual stream; exact activation patching
(``patch_by_name``) of ``hook_z`` per head, scaled to every (position, head) cell; EAP; EAP-IG;
one faithfulness run (a circuit of the graph, the corrupted senders computed beforehand); exact
patching of a sample of edges (one forward pass each; the time scaled to the whole graph).

(2) **Time**, as ratios to one forward + backward of the same model on the same batch
(``metric(model(tokens)).backward()``), measured side by side: each round runs every variant
once, the order rotating between rounds; the median over rounds of the per-round ratio is
printed with its quartiles, for this process' CPU time (the steadier measure on a shared
machine) and for wall-clock time. Two models, both with K and V shifted: the 2-layer CI fixture shape
(d_model 32, 4 heads, attention only, batch 16 x 32 tokens) and a larger one (4 layers, d_model
256, 8 heads, MLPs, batch 8 x 128 tokens). Absolute milliseconds are printed too (machine- and
load-dependent). ``--threads`` sets torch's thread count (1 by default).

(3) ``--agreement`` (instead of timing): how well the estimates match exact patching. On the
hand-built models of ``tests/probes`` (known circuits) and on the two CI-sized fixtures, trained
here with the recipe of ``tests/probes/conftest.py`` (seed 0, about a minute on 2 cores):
attribution patching against exact activation patching per head and per (position, head), and
EAP / EAP-IG against exact edge patching, with two metrics (the log-probability of the right
token, which saturates when the model is confident, and its logit, which does not), plus the
faithfulness of top-k circuits.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kvshift_lens import HookedKVShiftTransformer, KVShiftConfig  # noqa: E402
from probes.attribution import attribution_patch, logprob_metric  # noqa: E402
from probes.eap import Circuit, CircuitRunner, edge_attribution  # noqa: E402
from probes.patching import patch_by_name  # noqa: E402

SHAPES = {
    "2L d32 (CI fixture)": dict(cfg=dict(n_layers=2, d_model=32, d_head=8, n_ctx=32, d_vocab=24,
                                         attn_only=True), batch=16, seq=32),
    "4L d256 MLP": dict(cfg=dict(n_layers=4, d_model=256, d_head=32, n_ctx=128, d_vocab=512,
                                 d_mlp=1024, attn_only=False), batch=8, seq=128),
}


def make_model(cfg: dict, seed: int = 0) -> HookedKVShiftTransformer:
    config = KVShiftConfig(shift_k=True, shift_v=True, shift_init="uniform", device="cpu", **cfg)
    return HookedKVShiftTransformer(config, generator=torch.Generator().manual_seed(seed)).eval()


def make_inputs(cfg: dict, batch: int, seq: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, cfg["d_vocab"], (batch, seq), generator=g)
    corrupted = torch.randint(0, cfg["d_vocab"], (batch, seq), generator=g)
    return clean, corrupted


def attribution_hooks(model: HookedKVShiftTransformer) -> list[str]:
    names = []
    for layer in range(model.cfg.n_layers):
        a = f"blocks.{layer}.attn"
        names += [f"blocks.{layer}.hook_resid_pre", f"{a}.hook_q", f"{a}.hook_k", f"{a}.hook_v",
                  f"{a}.hook_k_shifted", f"{a}.hook_v_shifted", f"{a}.hook_shift_k",
                  f"{a}.hook_shift_v", f"{a}.hook_pattern", f"{a}.hook_z"]
    return [n for n in names if n in model.hook_dict]  # a vanilla model has no shift hooks


class PassCounter:
    """Counts forward passes (``hook_embed`` fires) and backward passes (a gradient reaches the
    logits the metric read)."""

    def __init__(self, model: HookedKVShiftTransformer, metric: Callable):
        self.model, self.inner = model, metric
        self.forward = self.backward = 0

    def metric(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.requires_grad:
            logits.register_hook(self._count_backward)
        return self.inner(logits)

    def _count_backward(self, grad: torch.Tensor) -> None:
        self.backward += 1

    def _count_forward(self, act: torch.Tensor, hook) -> None:
        self.forward += 1

    def count(self, fn: Callable[[Callable], object]) -> tuple[int, int]:
        self.forward = self.backward = 0
        self.model.add_hook("hook_embed", self._count_forward, is_permanent=True)
        try:
            fn(self.metric)
        finally:
            self.model.reset_hooks(including_permanent=True)
        return self.forward, self.backward


def variants(model, clean, corrupted, metric, ig_steps: int,
             runner: CircuitRunner) -> dict[str, Callable[[Callable], object]]:
    """The timed calls, each taking the metric (wrapped by a :class:`PassCounter` or not)."""
    hooks = attribution_hooks(model)
    circuit = Circuit.full(runner.graph).without(runner.graph.edges[0])

    def fwd_bwd(metric):
        metric(model(clean)).backward()
        model.zero_grad(set_to_none=True)

    def faithfulness_run(metric):
        runner.metric = metric  # the runner was built (corrupted senders cached) beforehand
        return runner.value(circuit)

    return {
        "forward + backward (unit)": fwd_bwd,
        "attribution_patch (all hooks above)": lambda metric: attribution_patch(
            model, clean, corrupted, metric, hooks),
        "EAP": lambda metric: edge_attribution(model, clean, corrupted, metric),
        f"EAP-IG ({ig_steps} steps)": lambda metric: edge_attribution(
            model, clean, corrupted, metric, method="eap-ig", ig_steps=ig_steps),
        "one faithfulness run (a circuit)": faithfulness_run,
    }


def time_rounds(fns: dict[str, Callable[[], object]],
                repeats: int) -> dict[str, dict[str, list[float]]]:
    """Seconds per call, one entry per round, as wall-clock time (``"wall"``) and as this process'
    CPU time (``"cpu"``, all threads: less disturbed by other processes on a shared machine); the
    order rotates from round to round."""
    for fn in fns.values():
        fn()  # warm-up
    names = list(fns)
    out: dict[str, dict[str, list[float]]] = {"wall": {n: [] for n in names}, "cpu": {n: [] for n in names}}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            t0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            out["wall"][name].append(time.perf_counter() - t0)
            out["cpu"][name].append(time.process_time() - c0)
    return out


def _ratio(times: dict[str, list[float]], name: str, unit: str) -> str:
    """Median over rounds of the per-round ratio name / unit, with its quartiles."""
    ratios = sorted(a / b for a, b in zip(times[name], times[unit]))
    q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    return f"{statistics.median(ratios):.2f} [{q[0]:.2f}, {q[2]:.2f}]"


def run(shape: str, repeats: int, ig_steps: int, quick: bool, n_exact_edges: int) -> list[str]:
    spec = SHAPES[shape]
    cfg, batch, seq = dict(spec["cfg"]), spec["batch"], spec["seq"]
    if quick:
        cfg.update(n_ctx=min(cfg["n_ctx"], 16))
        batch, seq = 2, min(seq, 16)
    model = make_model(cfg)
    clean, corrupted = make_inputs(cfg, batch, seq)
    return run_model(shape, model, clean, corrupted, repeats, ig_steps, n_exact_edges)


def zoo_inputs(model: HookedKVShiftTransformer, batch: int, run_length: int,
               seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``BOS r r`` (clean) and ``BOS r' r`` (corrupted: the first copy redrawn), the inputs
    notebook 05 uses on the zoo's text models."""
    g = torch.Generator().manual_seed(seed)
    bos = model.tokenizer.bos_token_id
    low = 1 if bos == 0 else 0
    r = torch.randint(low, model.cfg.d_vocab, (batch, run_length), generator=g)
    r2 = torch.randint(low, model.cfg.d_vocab, (batch, run_length), generator=g)
    start = torch.full((batch, 1), bos)
    return torch.cat([start, r, r], 1), torch.cat([start, r2, r], 1)


def run_model(label: str, model: HookedKVShiftTransformer, clean: torch.Tensor,
              corrupted: torch.Tensor, repeats: int, ig_steps: int,
              n_exact_edges: int) -> list[str]:
    batch, seq = clean.shape
    shape = label
    metric = logprob_metric(clean)
    counter = PassCounter(model, metric)
    runner = CircuitRunner(model, clean, corrupted, metric)
    n_edges = runner.graph.n_edges
    vs = variants(model, clean, corrupted, metric, ig_steps, runner)
    lines = [f"### {shape}: {model.cfg.n_layers} layers x {model.cfg.n_heads} heads, d_model "
             f"{model.cfg.d_model}, batch {batch} x {seq} tokens, {n_edges} graph edges", "",
             "| what | forward passes | backward passes | CPU time / unit | wall time / unit "
             "| CPU ms | wall ms |", "|---|---|---|---|---|---|---|"]
    counts = {name: counter.count(fn) for name, fn in vs.items()}
    times = time_rounds({name: (lambda fn=fn: fn(metric)) for name, fn in vs.items()}, repeats)
    unit_name = "forward + backward (unit)"
    for name in vs:
        f, b = counts[name]
        lines.append(f"| {name} | {f} | {b} | {_ratio(times['cpu'], name, unit_name)} "
                     f"| {_ratio(times['wall'], name, unit_name)} "
                     f"| {1e3 * statistics.median(times['cpu'][name]):.1f} "
                     f"| {1e3 * statistics.median(times['wall'][name]):.1f} |")
    unit_cpu = statistics.median(times["cpu"][unit_name])

    # The exact references cost one forward pass per cell or edge: one call each, counted and
    # timed at once, then scaled: hook_z per head to every (position, head) cell, a sample of edges
    # to the whole graph.
    z_hooks = [f"blocks.{layer}.attn.hook_z" for layer in range(model.cfg.n_layers)]
    n_heads = model.cfg.n_layers * model.cfg.n_heads
    sample = list(runner.graph.edges[:: max(1, n_edges // n_exact_edges)])[:n_exact_edges]
    exact = {
        f"exact patching of hook_z per head ({n_heads} heads; x {seq} = every (pos, head))": (
            lambda metric: patch_by_name(model, corrupted, clean, z_hooks, metric, index="head"), seq),
        f"exact patching of {len(sample)} edges (x {n_edges / len(sample):.1f} = all {n_edges})": (
            lambda metric: faithful_edges(runner, metric, sample), n_edges / len(sample)),
    }
    for label, (fn, scale) in exact.items():
        t0, c0 = time.perf_counter(), time.process_time()
        f, b = counter.count(fn)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        lines.append(f"| {label} | {f} | {b} | {cpu / unit_cpu:.0f} (x {scale:.1f}: "
                     f"{scale * cpu / unit_cpu:.0f}) | (one call) | {1e3 * cpu:.0f} | {1e3 * wall:.0f} |")
    return lines


def faithful_edges(runner: CircuitRunner, metric: Callable, edges) -> torch.Tensor:
    runner.metric = metric
    return runner.edge_effects(edges)


# ---------------------------------------------------------------------------------- agreement
def _fixture(shift: bool, n_layers: int, steps: int, target: float, **model_kw):
    """A CI fixture model (the recipe of tests/probes/conftest.py), trained in a temporary folder."""
    import tempfile

    from kvshift_lens.train import RunSpec, TrainConfig, train

    spec = RunSpec(
        model=dict(d_model=32, d_head=8, n_layers=n_layers, n_ctx=32, attn_only=True,
                   shift_k=shift, shift_v=shift, **model_kw),
        task=dict(name="induction", d_vocab=24, seq_len=32),
        train=TrainConfig(steps=steps, batch_size=32, lr=3e-3, warmup_steps=20, eval_every=20,
                          progress=False, device="cpu", stop_at_target=True, seed=0,
                          target_accuracy=target, shift_lr_scale=1.0))
    with tempfile.TemporaryDirectory() as tmp:
        result = train(spec, Path(tmp) / "run")
    if result.steps_to_target is None:
        raise RuntimeError(f"the fixture did not reach {target:.0%}: {result.final_metrics}")
    return result.model.eval()


def _corrupt_induction(batch, seed: int) -> torch.Tensor:
    """The first copy of each repeated segment replaced by tokens from outside the segment."""
    g = torch.Generator().manual_seed(seed)
    tokens = batch.tokens.clone()
    for b in range(tokens.shape[0]):
        s, n = int(batch.info["source_start"][b]), int(batch.info["length"][b])
        segment = set(tokens[b, s:s + n].tolist())
        pool = torch.tensor([t for t in range(1, 24) if t not in segment])
        tokens[b, s:s + n] = pool[torch.randint(len(pool), (n,), generator=g)]
    return tokens


def _target_logit(tokens: torch.Tensor, mask: torch.Tensor) -> Callable:
    def metric(logits):
        picked = logits[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
        return picked[mask[:, :-1]].mean()
    return metric


def _row(name: str, est: torch.Tensor, ref: torch.Tensor, top_k: int) -> str:
    from probes.attribution import agreement

    a = agreement(est, ref, top_k=top_k)
    ratio = float(est.abs().sum() / ref.abs().sum()) if ref.abs().sum() > 0 else float("nan")
    return (f"| {name} | {a.n} | {a.spearman:.2f} | {a.pearson:.2f} | {a.top_k_overlap:.2f} (k={a.top_k}) "
            f"| {ratio:.2f} |")


def agreement_tables() -> list[str]:
    from kvshift_lens.data.tasks import InductionTask
    from probes.attribution import exact_patching_effects

    sys.path.insert(0, str(ROOT))
    from tests.probes import shift_head_model, two_layer_induction_model

    header = ["| compared | cells | Spearman | Pearson | top-k overlap | sum abs estimate / sum abs exact |",
              "|---|---|---|---|---|---|"]
    lines = ["### Hand-built models (scores of 40: saturated attention)", "",
             "| model | edge | EAP | EAP-IG (10 steps) | exact edge patching |", "|---|---|---|---|---|"]
    g = torch.Generator().manual_seed(0)
    first = torch.stack([torch.randperm(16, generator=g)[:8] for _ in range(4)])
    clean = torch.cat([first, first], 1)
    corrupted = clean.clone()
    corrupted[:, :8] = torch.stack([torch.randperm(16, generator=g)[:8] for _ in range(4)])
    mask = torch.zeros_like(clean, dtype=torch.bool)
    mask[:, 8:-1] = True
    metric = _target_logit(clean, mask)
    for label, model, edges in (
            ("1-layer shift induction head", shift_head_model(16, 16),
             ["L0H0 <- embed via k_shift", "L0H0 <- embed via k", "L0H0 <- embed via v",
              "logits <- L0H0 via logits"]),
            ("2-layer vanilla induction", two_layer_induction_model(16, 16),
             ["L1H0 <- L0H0 via k", "L0H0 <- embed via v", "L1H0 <- embed via v",
              "logits <- L1H0 via logits"])):
        eap = edge_attribution(model, clean, corrupted, metric)
        ig = edge_attribution(model, clean, corrupted, metric, method="eap-ig", ig_steps=10)
        exact = CircuitRunner(model, clean, corrupted, metric).edge_effects(edges)
        for edge, x in zip(edges, exact.tolist()):
            lines.append(f"| {label} | {edge} | {eap[edge]:.3f} | {ig[edge]:.3f} | {x:.3f} |")

    task = InductionTask(d_vocab=24, seq_len=32)
    batch = task.sample(16, torch.Generator().manual_seed(7))
    corrupted = _corrupt_induction(batch, 8)
    models = {"kvshift_1l": _fixture(True, 1, 600, 0.9),
              "vanilla_2l": _fixture(False, 2, 1500, 0.95, positional_embedding_type="rotary")}
    metrics = {"log-prob": logprob_metric(batch.tokens, batch.mask),
               "logit": _target_logit(batch.tokens, batch.mask)}
    for name, model in models.items():
        n_layers = model.cfg.n_layers
        kinds = ["z", "q", "k", "v"] + (["k_shifted", "v_shifted"] if name == "kvshift_1l" else [])
        for mname, metric in metrics.items():
            lines += ["", f"### {name}, metric: mean {mname} of the right token on the second copy", "",
                      "Attribution patching vs exact activation patching (noising):", ""] + header
            for kind in kinds:
                hooks = [f"blocks.{layer}.attn.hook_{kind}" for layer in range(n_layers)]
                attr = attribution_patch(model, batch.tokens, corrupted, metric, hooks)
                exact_ph = exact_patching_effects(model, batch.tokens, corrupted, metric, hooks)
                exact_h = exact_patching_effects(model, batch.tokens, corrupted, metric, hooks,
                                                 index="head")
                est_ph = torch.cat([attr.reduce(h, "pos_head").flatten() for h in hooks])
                est_h = torch.cat([attr.reduce(h, "head") for h in hooks])
                if torch.cat([exact_h[h] for h in hooks]).abs().max() == 0:
                    lines.append(f"| hook_{kind} | - | (exact effects all 0: not corrupted where "
                                 "the metric reads) | | | |")
                    continue
                lines.append(_row(f"hook_{kind} per (pos, head)", est_ph,
                                  torch.cat([exact_ph[h].flatten() for h in hooks]), 5))
                lines.append(_row(f"hook_{kind} per head", est_h, torch.cat([exact_h[h] for h in hooks]), 1))
            runner = CircuitRunner(model, batch.tokens, corrupted, metric)
            exact_edges = runner.edge_effects()
            lines += ["", f"EAP vs exact edge patching ({runner.graph.n_edges} edges), and the "
                      "faithfulness of top-k circuits:", ""] + header[:1] + [
                "|---|---|---|---|---|---|"]
            faith = []
            for method in ("eap", "eap-ig"):
                scores = edge_attribution(model, batch.tokens, corrupted, metric, method=method)
                lines.append(_row(f"{method} (5 steps)" if method == "eap-ig" else method,
                                  scores.scores, exact_edges, 10))
                ks = [k for k in (5, 10, 20, 40) if k <= runner.graph.n_edges]
                faith.append(f"{method}: " + ", ".join(
                    f"k={k}: {runner.faithfulness(scores.circuit(top_k=k)).fraction:.2f}" for k in ks))
            lines += [""] + [f"- faithfulness {f}" for f in faith]
    return lines


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="the small model only, tiny inputs, 2 rounds (smoke test)")
    parser.add_argument("--repeats", type=int, default=7, help="timing rounds per shape")
    parser.add_argument("--ig-steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: CPU time is then the least disturbed by other load)")
    parser.add_argument("--exact-edges", type=int, default=64,
                        help="edges patched exactly to time edge patching (scaled to the graph)")
    parser.add_argument("--agreement", action="store_true",
                        help="instead of timing: estimates against exact patching (trains two models)")
    parser.add_argument("--zoo", nargs="*", default=None, metavar="NAME",
                        help="time the zoo's pretrained models instead (default with no names: the "
                             "two-layer ones) on BOS r r inputs, batch 8, runs of 50 tokens")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.agreement:
        lines = agreement_tables()
        print("\n".join(lines))
        return lines
    load_before = os.getloadavg()[0]
    lines = [f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs"]
    print(lines[0], flush=True)
    if args.zoo is not None:
        from kvshift_lens import zoo

        names = args.zoo or [n for n in zoo.list_models() if n.endswith("2l")]
        for name in names:
            model = HookedKVShiftTransformer.from_pretrained(name, device="cpu")
            clean, corrupted = zoo_inputs(model, 2 if args.quick else 8, 8 if args.quick else 50)
            part = [""] + run_model(f"zoo {name}", model, clean, corrupted,
                                    2 if args.quick else args.repeats, args.ig_steps,
                                    4 if args.quick else args.exact_edges)
            print("\n".join(part), flush=True)
            lines += part
    for shape in [] if args.zoo is not None else list(SHAPES)[:1] if args.quick else SHAPES:
        part = [""] + run(shape, 2 if args.quick else args.repeats, args.ig_steps, args.quick,
                          4 if args.quick else args.exact_edges)
        print("\n".join(part), flush=True)
        lines += part
    lines += ["", f"1-minute load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at "
              f"the end (this process alone adds about {args.threads}; above that, other work shared "
              "the CPUs and the absolute times are inflated; the ratios less so)"]
    print(lines[-1])
    return lines


if __name__ == "__main__":
    main()
