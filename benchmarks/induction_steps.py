"""Steps to 90% induction accuracy: KV-shift 1 layer against vanilla 1 and 2 layers, and the shift
initialisations of a KV-shift 1-layer model, several seeds each.

    .venv/bin/python benchmarks/induction_steps.py            # full run (~11 min, 2 busy CPU cores)
    .venv/bin/python benchmarks/induction_steps.py --quick    # smoke test (2 seeds, small budget)
    .venv/bin/python benchmarks/induction_steps.py --from-json runs/bench_induction/results.json
    .venv/bin/python benchmarks/induction_steps.py --shift-lr-scale 30 \
        --variants kvshift-1L kvshift-1L-identity vanilla-2L \
        --reuse-vanilla runs/bench_induction/results.json --out runs/bench_induction_lrscale/scale30

Every run calls :func:`kvshift_lens.train.trainer.train` with the same settings except the model
variant and the seed (nothing is tuned per variant):

- task: the variable-offset induction task (``InductionTask``, d_vocab 64, seq_len 64, BOS,
  random segment length, source and copy places per sequence); accuracy is measured only at the
  masked positions where induction is the unique right answer.
- model: attention-only, d_model 64, 4 heads of 16, n_ctx 64, LayerNorm, learned absolute
  positions (the library defaults otherwise).
- training: batch 64, AdamW lr 1e-3 (TrainConfig defaults otherwise: 50 warm-up steps, cosine
  decay to 0.1x at the step budget, weight decay 0.01, grad clip 1.0), evaluation every 25 steps on
  4 fixed batches, ``target_accuracy=0.9`` with ``stop_at_target=True``, one step budget for every
  variant (the cosine schedule is laid out over the budget, so the budget is kept equal), 3000
  steps, except vanilla 1 layer, which cannot do induction and is capped at 1500 steps to save
  time (reported as '> 1500' with its final accuracy; ``--vanilla1-budget 3000`` for the full).
- ``--shift-lr-scale S`` (default: ``TrainConfig``'s) goes into every run's ``TrainConfig``: the
  shift coefficients train at ``lr * S`` (no weight decay). It is recorded in results.json (meta and
  every run) and shown in the tables. Vanilla models have no shift coefficients, so
  ``_param_groups`` builds the same optimiser for them whatever S is: their runs do not depend on
  it, and ``--reuse-vanilla RESULTS`` takes the vanilla variants named in ``--variants`` from a
  saved results.json with the same settings (task, model, lr, budget, seeds; S aside) instead of
  running them again (the output says so).

Part A (``kvshift-1L``, ``vanilla-1L``, ``vanilla-2L``): steps to target, median and min-max over
seeds, and the ratio median(KV-shift 1L) / median(vanilla 2L) against the goal (<= 0.35).
Part B: KV-shift 1L with ``shift_init`` identity, uniform (= Part A's ``kvshift-1L`` runs, not run
twice), normal (std 0.1) and induction (the oracle: coefficients already at the paper's induction
point; reported, never a candidate for the default).

Runs go to ``runs/bench_induction/<variant>/seed<k>/`` (git-ignored) and are spread over ``--jobs``
worker processes (spawned, one torch thread each). Tokens/s is the trainer's own figure (training
tokens over the wall time of the loop, periodic evaluations included) and is noisy when the
workers share cores. Results: a markdown table on stdout and ``runs/bench_induction/results.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

OUT_DIR = ROOT / "runs" / "bench_induction"
GOAL_RATIO = 0.35
TARGET = 0.9

TASK = {"name": "induction", "d_vocab": 64, "seq_len": 64}
BASE_MODEL: dict[str, Any] = {
    "d_model": 64, "d_head": 16, "n_heads": 4, "n_ctx": 64, "d_vocab": 64, "attn_only": True,
}
SHIFT = {"shift_k": True, "shift_v": True, "shift_window": 1, "shift_param": "free"}
NO_SHIFT = {"shift_k": False, "shift_v": False, "shift_q": False}

# name -> (model overrides, part, note)
VARIANTS: dict[str, tuple[dict[str, Any], str, str]] = {
    "kvshift-1L": ({"n_layers": 1, **SHIFT, "shift_init": "uniform"}, "A+B",
                   "KV shift (K and V, window 1, free), init uniform"),
    "vanilla-1L": ({"n_layers": 1, **NO_SHIFT}, "A", "no shift"),
    "vanilla-2L": ({"n_layers": 2, **NO_SHIFT}, "A", "no shift"),
    "kvshift-1L-identity": ({"n_layers": 1, **SHIFT, "shift_init": "identity"}, "B",
                            "init identity (exactly vanilla at step 0)"),
    "kvshift-1L-normal": ({"n_layers": 1, **SHIFT, "shift_init": "normal",
                           "shift_init_std": 0.1}, "B", "init identity + N(0, 0.1)"),
    "kvshift-1L-induction": ({"n_layers": 1, **SHIFT, "shift_init": "induction"}, "B",
                             "ORACLE init at the paper's induction point"),
    "kvshift-1L-convex": ({"n_layers": 1, **SHIFT, "shift_init": "uniform",
                           "shift_param": "convex"}, "C",
                          "init uniform, coefficients on the simplex (gain fixed at 1)"),
    "kvshift-1L-gain_mix": ({"n_layers": 1, **SHIFT, "shift_init": "uniform",
                             "shift_param": "gain_mix"}, "C",
                            "init uniform, mix on the simplex times a free per-head gain"),
}
PART_A = ["kvshift-1L", "vanilla-1L", "vanilla-2L"]
PART_B = {"identity": "kvshift-1L-identity", "uniform": "kvshift-1L",
          "normal": "kvshift-1L-normal", "induction (oracle)": "kvshift-1L-induction"}
NON_ORACLE_INITS = ["identity", "uniform", "normal"]
PART_C = {"free": "kvshift-1L", "convex": "kvshift-1L-convex", "gain_mix": "kvshift-1L-gain_mix"}


VANILLA = ("vanilla-1L", "vanilla-2L")  # no shift coefficients: shift_lr_scale has no effect


def _default_shift_lr_scale() -> float:
    from kvshift_lens.train.config import TrainConfig

    return TrainConfig().shift_lr_scale


def _train_args(budget: int, seed: int, lr: float = 1e-3,
                shift_lr_scale: float | None = None) -> dict[str, Any]:
    if shift_lr_scale is None:
        shift_lr_scale = _default_shift_lr_scale()
    return {"steps": budget, "batch_size": 64, "lr": lr, "shift_lr_scale": shift_lr_scale,
            "eval_every": 25, "eval_batches": 4, "seed": seed, "device": "cpu",
            "target_accuracy": TARGET, "stop_at_target": True, "progress": False}


def _scale_str(meta_or_run: dict[str, Any]) -> str:
    """The shift_lr_scale of a results.json ``meta["train"]`` or run (files written before the
    option existed have none: their runs used 1, the only behaviour there was)."""
    v = meta_or_run.get("shift_lr_scale")
    return "1 (not recorded)" if v is None else f"{v:g}"


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)


def _rel(path: Path) -> str:
    """``path`` relative to the repository root when it lies inside it (``--out`` may not)."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path.resolve())


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One training run (in a worker process); returns a JSON-ready summary."""
    from kvshift_lens.train.config import RunSpec, TrainConfig
    from kvshift_lens.train.trainer import train

    overrides, _, _ = VARIANTS[job["variant"]]
    spec = RunSpec(model={**BASE_MODEL, **overrides}, task=dict(TASK),
                   train=TrainConfig(**_train_args(job["budget"], job["seed"], job["lr"],
                                                   job["shift_lr_scale"])))
    t0 = time.perf_counter()
    res = train(spec, job["run_dir"], overwrite=True)
    wall = time.perf_counter() - t0
    last = res.evals[-1]
    return {
        "variant": job["variant"], "seed": job["seed"], "budget": job["budget"],
        "shift_lr_scale": job["shift_lr_scale"], "steps_to_target": res.steps_to_target, "steps": res.steps,
        "final_accuracy": res.final_metrics.get("accuracy"),
        "final_loss": res.final_metrics.get("loss"),
        "tokens_per_second": res.tokens_per_second, "wall_s": wall,
        "curve": [[e["step"], e.get("eval/accuracy")] for e in res.evals],
        "final_coefficients": last.get("coefficients"),
        "run_dir": _rel(Path(job["run_dir"])),
    }


def _fmt_steps(values: list[int | None], budget: int) -> tuple[str, str, int]:
    """Median and min-max of steps to target; unreached runs count as '> budget'."""
    reached = [v for v in values if v is not None]
    key = sorted(float(v) if v is not None else float("inf") for v in values)
    n = len(key)
    med = (key[n // 2] if n % 2 else (key[n // 2 - 1] + key[n // 2]) / 2) if n else float("inf")
    med_s = f"> {budget}" if med == float("inf") else f"{med:g}"
    if not reached:
        spread = f"> {budget} (all)"
    else:
        spread = f"{min(reached)}-{max(reached)}"
        if len(reached) < n:
            spread += f", {n - len(reached)} x > {budget}"
    return med_s, spread, len(reached)


MILESTONES = (0.1, 0.5, 0.9)


def _first_reach(curve: list[list[Any]], level: float) -> int | None:
    return next((step for step, acc in curve if acc is not None and acc >= level), None)


def _median_or_none(values: list[int | None]) -> float | None:
    return None if any(v is None for v in values) or not values else statistics.median(values)


def summarise(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name in VARIANTS:
        rs = sorted((r for r in results if r["variant"] == name), key=lambda r: r["seed"])
        if not rs:
            continue
        budget = max(r["budget"] for r in rs)
        stt = [r["steps_to_target"] for r in rs]
        med_s, spread, n_reached = _fmt_steps(stt, budget)
        reached = [v for v in stt if v is not None]
        scales = sorted({_scale_str(r) for r in rs})
        out[name] = {
            "n_runs": len(rs), "n_reached": n_reached, "budget": budget,
            "shift_lr_scale": ", ".join(scales) if name not in VANILLA else "n/a (no coefficients)",
            "reused_from": sorted({r["reused_from"] for r in rs if r.get("reused_from")}),
            "steps_to_target": stt,
            "median_steps": (statistics.median(stt) if n_reached == len(rs) else None),
            "median_steps_str": med_s, "spread_str": spread,
            "min_steps": min(reached) if reached else None,
            "max_steps": max(reached) if reached else None,
            "final_accuracy": [r["final_accuracy"] for r in rs],
            "median_final_accuracy": statistics.median(r["final_accuracy"] for r in rs),
            "median_tokens_per_second": statistics.median(r["tokens_per_second"] for r in rs),
            "median_wall_s": statistics.median(r["wall_s"] for r in rs),
            "median_steps_to": {str(m): _median_or_none([_first_reach(r["curve"], m) for r in rs])
                                for m in MILESTONES},
            "gain_mix": _gain_mix_summary([r.get("final_coefficients") for r in rs]),
        }
    return out


def _gain_mix_summary(finals: list[dict[str, Any] | None]) -> dict[str, str] | None:
    """Final coefficients of every seed and head read as gain x mix: median [min-max] of the
    gain and of the previous share, per shifted projection, and the largest |c|."""
    import torch

    from kvshift_lens.shift import gain_and_mix

    finals = [f for f in finals if f]
    if not finals:
        return None
    out: dict[str, str] = {}

    def fmt(values: list[float]) -> str:
        return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"

    biggest = 0.0
    for which in ("k", "v"):
        if which not in finals[0]:
            continue
        c = torch.tensor([f[which] for f in finals])  # [seed, layer, head, lag]
        gain, mix = gain_and_mix(c)
        out[f"{which}_gain"] = fmt(gain.flatten().tolist())
        out[f"{which}_previous_share"] = fmt(mix[..., 1:].abs().sum(-1).flatten().tolist())
        biggest = max(biggest, c.abs().max().item())
    out["max_abs"] = f"{biggest:.2f}"
    return out


def report(summary: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    scale = meta["train"].get("shift_lr_scale")
    coeff_lr = "" if scale is None else f" = coefficient lr {meta['train']['lr'] * scale:g}"
    lines = [f"Steps to {TARGET:.0%} induction accuracy (evaluated every 25 steps), "
             f"{meta['n_seeds']} seeds each, lr {meta['train']['lr']:g}, shift_lr_scale "
             f"{_scale_str(meta['train'])}{coeff_lr}, budget {meta['budget']} steps "
             f"(vanilla-1L {meta['vanilla1_budget']}).", ""]
    for name, s in summary.items():
        for src in s.get("reused_from", []):
            lines += [f"NOTE: {name} NOT re-run: its runs are reused from {src} (no shift "
                      f"coefficients, so _param_groups builds the same optimiser whatever "
                      f"shift_lr_scale is).", ""]

    def row(label: str, name: str) -> str | None:
        s = summary.get(name)
        if s is None:
            return None
        accs = ", ".join(f"{a:.3f}" for a in s["final_accuracy"])
        return (f"| {label} | {s.get('shift_lr_scale', '-')} | {s['median_steps_str']} | "
                f"{s['spread_str']} | "
                f"{s['n_reached']}/{s['n_runs']} | {accs} | "
                f"{s['median_tokens_per_second'] / 1000:.0f}k |")

    header = ("| {} | shift_lr_scale | median steps | min-max | reached | "
              "final accuracy per seed | tokens/s (median) |\n|---|---|---|---|---|---|---|")
    lines += ["Part A: variants", "", header.format("variant")]
    lines += [r for r in (row(n, n) for n in PART_A) if r]
    ratio = None
    kv, v2 = summary.get("kvshift-1L"), summary.get("vanilla-2L")
    if kv and v2 and kv["median_steps"] is not None and v2["median_steps"] is not None:
        ratio = kv["median_steps"] / v2["median_steps"]
        verdict = "met" if ratio <= GOAL_RATIO else "NOT met"
        lines += ["", f"median(KV-shift 1L, shift_lr_scale {kv['shift_lr_scale']}) / "
                      f"median(vanilla 2L) = {kv['median_steps']:g} / "
                      f"{v2['median_steps']:g} = {ratio:.2f}x (goal <= {GOAL_RATIO}x: {verdict})"]
    elif kv and v2:
        lines += ["", "ratio undefined: not every run of KV-shift 1L / vanilla 2L reached the "
                      "target within the budget"]
    lines += ["", f"Part B: KV-shift 1L shift_init (shift_lr_scale {_scale_str(meta['train'])})",
              "", header.format("shift_init")]
    lines += [r for r in (row(label, name) for label, name in PART_B.items()) if r]
    best = [(summary[PART_B[i]]["median_steps"], i) for i in NON_ORACLE_INITS
            if PART_B[i] in summary and summary[PART_B[i]]["median_steps"] is not None]
    fastest = None
    if best:
        low = min(m for m, _ in best)
        tied = [i for m, i in best if m == low]
        fastest = tied[0] if len(tied) == 1 else " = ".join(tied)
        lines += ["", f"fastest non-oracle init (median steps): {fastest} ({low:g})"
                      + (" -- a TIE on the median" if len(tied) > 1 else "")]
    if any(PART_C[k] in summary for k in PART_C if k != "free"):
        lines += ["", f"Part C: KV-shift 1L shift_param, init uniform (shift_lr_scale "
                      f"{_scale_str(meta['train'])})", "", header.format("shift_param")]
        lines += [r for r in (row(label, name) for label, name in PART_C.items()) if r]
        lines += ["", "Final coefficients read as gain x mix (shift.gain_and_mix: gain = sum_l "
                      "|c_l|, previous share = |mix_1|), median [min-max] over seeds and heads", "",
                  "| shift_param | K gain | K previous share | V gain | V previous share | "
                  "max |c| |", "|---|---|---|---|---|---|"]
        for label, name in PART_C.items():
            s = summary.get(name)
            if s and s.get("gain_mix"):
                g = s["gain_mix"]
                lines.append(f"| {label} | {g['k_gain']} | {g['k_previous_share']} | "
                             f"{g['v_gain']} | {g['v_previous_share']} | {g['max_abs']} |")
    lines += ["", "Learning-curve milestones: median first evaluated step with accuracy >= "
                  "10% / 50% / 90% (plateau, then rise)", "",
              "| variant | shift_lr_scale | >= 10% | >= 50% | >= 90% |", "|---|---|---|---|---|"]
    for name, s in summary.items():
        cells = ["-" if v is None else f"{v:g}" for v in s["median_steps_to"].values()]
        lines.append(f"| {name} | {s.get('shift_lr_scale', '-')} | " + " | ".join(cells) + " |")
    meta["ratio"] = ratio
    meta["fastest_non_oracle_init"] = fastest
    return "\n".join(lines)


def _load_vanilla(path: Path, names: list[str], seeds: int, budgets: dict[str, int],
                  lr: float) -> list[dict[str, Any]]:
    """The runs of the vanilla variants ``names`` (seeds 0..seeds-1) from a saved results.json,
    after checking that they were made with this script's settings; ``shift_lr_scale`` is not
    compared (vanilla models have no coefficients, so it does not enter their optimiser)."""
    saved = json.loads(Path(path).read_text())
    meta = saved["meta"]
    want_train = {k: v for k, v in _train_args(0, 0, lr).items()
                  if k not in ("seed", "steps", "shift_lr_scale")}
    got_train = {k: v for k, v in meta["train"].items() if k not in ("steps", "shift_lr_scale")}
    problems = []
    if got_train != want_train:
        problems.append(f"train settings {got_train} != {want_train}")
    if meta.get("task") != TASK or meta.get("base_model") != BASE_MODEL:
        problems.append("task or base model differ")
    runs = []
    for name in names:
        if meta.get("variants", {}).get(name, {}).get("model") != VARIANTS[name][0]:
            problems.append(f"{name}: model differs or missing")
        rs = {r["seed"]: r for r in saved["runs"] if r["variant"] == name}
        missing = [k for k in range(seeds) if k not in rs]
        if missing:
            problems.append(f"{name}: seeds {missing} missing")
        for k in range(seeds):
            if k in rs and rs[k]["budget"] != budgets[name]:
                problems.append(f"{name} seed {k}: budget {rs[k]['budget']} != {budgets[name]} "
                                "(the cosine schedule depends on it)")
            if k in rs:
                runs.append({**rs[k], "reused_from": str(path)})
    if problems:
        raise ValueError(f"--reuse-vanilla {path}: cannot reuse: " + "; ".join(problems))
    return runs


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=None,
                   help="seeds 0..N-1 per variant (default 5; 2 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 2 seeds, budget 400, vanilla-1L budget 100")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--budget", type=int, default=None,
                   help="step budget of every variant (default 3000; 400 with --quick)")
    p.add_argument("--vanilla1-budget", type=int, default=None,
                   help="budget of vanilla-1L, which is not expected to reach the target "
                        "(default 1500, or --budget when that is smaller; 100 with --quick). "
                        "Its cosine schedule is laid out over this shorter budget")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="peak AdamW learning rate of every run (default 1e-3, the benchmark's)")
    p.add_argument("--shift-lr-scale", type=float, default=None, metavar="S",
                   help="every run's TrainConfig.shift_lr_scale: the shift coefficients train at "
                        "lr * S (default: TrainConfig's default, "
                        f"{_default_shift_lr_scale():g}). No effect on vanilla variants")
    p.add_argument("--reuse-vanilla", type=Path, default=None, metavar="RESULTS",
                   help="take the vanilla variants named in --variants from this saved "
                        "results.json instead of running them (they have no shift coefficients, "
                        "so --shift-lr-scale does not change them); its task, model, lr, budget "
                        "and seeds must match")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None,
                   help="run only these variants (default: all)")
    p.add_argument("--shift-params", action="store_true",
                   help="Part C only: KV-shift 1L (init uniform) with shift_param free (= "
                        "kvshift-1L), convex and gain_mix; same as --variants "
                        + " ".join(PART_C.values()))
    p.add_argument("--out", type=Path, default=OUT_DIR, help=f"output folder (default {OUT_DIR})")
    p.add_argument("--from-json", type=Path, default=None, metavar="RESULTS",
                   help="print the tables of a saved results.json again (runs nothing)")
    args = p.parse_args(argv)
    if args.shift_params and args.variants is not None:
        p.error("--shift-params names its variants itself; give --variants or --shift-params")
    if args.variants is None:
        args.variants = list(PART_C.values()) if args.shift_params else list(VARIANTS)
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
        summary = summarise(saved["runs"])
        print(report(summary, saved["meta"]))
        return
    seeds = args.seeds if args.seeds is not None else (2 if args.quick else 5)
    budget = args.budget if args.budget is not None else (400 if args.quick else 3000)
    v1_budget = args.vanilla1_budget or (100 if args.quick else min(1500, budget))
    scale = args.shift_lr_scale if args.shift_lr_scale is not None else _default_shift_lr_scale()
    if not scale > 0:
        p.error(f"--shift-lr-scale {scale} must be > 0")
    out = args.out.resolve()

    reused: list[dict[str, Any]] = []
    to_reuse = [n for n in args.variants if n in VANILLA] if args.reuse_vanilla else []
    if to_reuse:
        budgets = {n: v1_budget if n == "vanilla-1L" else budget for n in to_reuse}
        try:
            reused = _load_vanilla(args.reuse_vanilla, to_reuse, seeds, budgets, args.lr)
        except ValueError as e:
            p.error(str(e))
    out.mkdir(parents=True, exist_ok=True)  # each run folder is overwritten by train()

    jobs = []
    for name in args.variants:
        if name in to_reuse:
            continue
        b = v1_budget if name == "vanilla-1L" else budget
        for seed in range(seeds):
            jobs.append({"variant": name, "seed": seed, "budget": b, "lr": args.lr,
                         "shift_lr_scale": scale, "run_dir": str(out / name / f"seed{seed}")})
    # Longest first (vanilla-1L runs its whole budget, vanilla-2L is slow), for load balance.
    order = {"vanilla-1L": 0, "vanilla-2L": 1, "kvshift-1L-identity": 2}
    jobs.sort(key=lambda j: (order.get(j["variant"], 3), j["variant"], j["seed"]))

    print(f"{len(jobs)} runs on {args.jobs} worker(s); lr {args.lr:g}; shift_lr_scale {scale:g}; "
          f"budget {budget} (vanilla-1L {v1_budget}); output {out}", flush=True)
    if to_reuse:
        print(f"NOT re-run, reused from {args.reuse_vanilla}: {', '.join(to_reuse)} "
              f"({len(reused)} runs; no shift coefficients, so shift_lr_scale has no effect)",
              flush=True)
    t0 = time.perf_counter()
    results = []
    ctx = mp.get_context("spawn")
    with ctx.Pool(processes=max(1, min(args.jobs, len(jobs))), initializer=_init_worker,
                  maxtasksperchild=1) as pool:
        for r in pool.imap_unordered(run_one, jobs):
            results.append(r)
            print(f"[{len(results):>2}/{len(jobs)} {time.perf_counter() - t0:6.0f}s] "
                  f"{r['variant']:<22} seed {r['seed']}: steps_to_target="
                  f"{r['steps_to_target']} final acc {r['final_accuracy']:.3f} "
                  f"({r['steps']} steps, {r['wall_s']:.0f}s, "
                  f"{r['tokens_per_second'] / 1000:.0f}k tok/s)", flush=True)
    total = time.perf_counter() - t0

    import torch

    results += reused
    summary = summarise(results)
    meta = {"n_seeds": seeds, "budget": budget, "vanilla1_budget": v1_budget,
            "jobs": args.jobs, "wall_s": total, "target_accuracy": TARGET,
            "goal_ratio": GOAL_RATIO, "task": TASK, "base_model": BASE_MODEL,
            "train": {k: v for k, v in _train_args(budget, 0, args.lr, scale).items()
                      if k != "seed"},
            "reused_vanilla": ({"from": str(args.reuse_vanilla), "variants": to_reuse}
                               if to_reuse else None),
            "variants": {n: {"model": v[0], "part": v[1], "note": v[2]}
                         for n, v in VARIANTS.items() if n in args.variants},
            "torch": torch.__version__, "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "machine": platform.machine()}
    table = report(summary, meta)
    print()
    print(table)
    print(f"\ntotal wall time {total:.0f}s on {args.jobs} worker(s)")
    (out / "results.json").write_text(json.dumps(
        {"meta": meta, "summary": summary,
         "runs": sorted(results, key=lambda r: (r["variant"], r["seed"]))}, indent=1))
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
