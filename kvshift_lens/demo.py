"""The README's main job (``make demo``): one shifted layer against one and two vanilla layers.

Trains a 1-layer KV-shift, a 1-layer vanilla and a 2-layer vanilla transformer on the variable-offset
induction task (a sweep with one subfolder per model), classifies every head of every model with
the probes, zero-ablates each head, measures what removing the key or value shift of the KV-shift
model's induction heads does, writes the HTML report (the KV-shift run, with a section comparing
the three models) and prints a short summary. Coefficients are printed as a gain times a mix over
lags (:func:`kvshift_lens.shift.gain_and_mix`), the raw values beside them. About 2-3 minutes on
2 CPU cores; ``--quick`` is a smoke test.

    python -m kvshift_lens.demo --out runs/demo [--quick] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from kvshift_lens.model import HookedKVShiftTransformer
from kvshift_lens.train.sweep import run_sweep

TASK = {"name": "induction", "d_vocab": 64, "seq_len": 64}
# shift_param pinned to "free", the published demo's, whatever DEFAULT_SHIFT_PARAM becomes.
MODEL = {"d_model": 64, "d_head": 16, "attn_only": True, "shift_param": "free"}
# The benchmark's settings (BENCHMARKS.md): a 3000-step schedule, stopping at 90%. Vanilla 1L never
# gets there, so it is capped at 700 steps to keep the demo short.
VARIANTS = {
    "kvshift_1L": {"model": {"n_layers": 1, "shift_k": True, "shift_v": True}},
    "vanilla_1L": {"model": {"n_layers": 1, "shift_k": False, "shift_v": False},
                   "train": {"steps": 700}},
    "vanilla_2L": {"model": {"n_layers": 2, "shift_k": False, "shift_v": False}},
}


def demo_spec(quick: bool = False) -> dict[str, Any]:
    """The sweep behind the demo: three variants, one seed, stop at 90% induction accuracy."""
    steps = 60 if quick else 3000
    return {
        "base": {
            "model": MODEL,
            "task": TASK,
            "train": {"steps": steps, "batch_size": 64, "lr": 1e-3, "eval_every": 25,
                      "eval_batches": 4, "stop_at_target": True, "target_accuracy": 0.9,
                      "progress": False},
        },
        "variants": ({k: {"model": v["model"]} for k, v in VARIANTS.items()} if quick
                     else VARIANTS),
        "seeds": [0],
    }


def head_summary(model: HookedKVShiftTransformer,
                 tokens: torch.Tensor | None = None) -> list[dict[str, Any]]:
    """Per head: its class from the probes' taxonomy (on ``tokens``: repeated random tokens in
    the run's format), previous-token and induction scores, and shift coefficients as gain, mix
    and raw values."""
    from kvshift_lens.shift import gain_and_mix
    from probes import classify_heads

    rows = []
    for h in classify_heads(model, tokens):
        row = {"layer": h.layer, "head": h.head, "kind": h.kind.value,
               "previous_token": round(h.previous_token, 3), "induction": round(h.induction, 3)}
        for name, coeffs in (("alpha", h.key_coeffs), ("beta", h.value_coeffs)):
            if coeffs:
                gain, mix = gain_and_mix(torch.tensor(coeffs, dtype=torch.float64))
                row[f"{name}_gain"] = round(float(gain), 3)
                row[f"{name}_mix"] = [round(float(c), 3) for c in mix]
                row[name] = [round(c, 3) for c in coeffs]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvshift_lens.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    parser.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel training processes")
    parser.add_argument("--overwrite", action="store_true", help="retrain even if runs exist")
    args = parser.parse_args(argv)
    out = Path(args.out)
    t0 = time.perf_counter()
    print(f"kvshift_lens demo: training 3 models on the induction task in {out} ...", flush=True)
    try:
        summary = run_sweep(demo_spec(args.quick), out, jobs=args.jobs, overwrite=args.overwrite,
                            log=None)
    except ValueError as e:  # e.g. a folder holding another (older) demo's runs
        msg = " ".join(str(e).split()).replace("--overwrite", "--overwrite (make demo "
                                                             "ARGS=--overwrite)")
        print(f"demo: error: {msg}", file=sys.stderr)
        return 2
    if summary.failed:
        for r in summary.failed:
            print(f"run {r.name} failed: {r.error}", file=sys.stderr)
        return 1
    t_train = time.perf_counter() - t0

    print("\nSteps to 90% induction accuracy and final accuracy:")
    for g in summary.groups:
        run = next(r for r in summary.runs if r.variant == g.variant)
        shown = f"{run.steps_to_target}" if run.steps_to_target is not None else \
            f"not reached in {run.steps} steps"
        print(f"  {g.variant:<12} steps to 90%: {shown:<24} final accuracy: "
              f"{run.final_accuracy:.3f}")

    from kvshift_lens.report import load_run, probe_tokens

    kv_dir = out / "kvshift_1L__seed0"
    dirs = {g.variant: out / f"{g.variant}__seed0" for g in summary.groups}
    heads_of = {}
    for variant, run_dir in dirs.items():
        run = load_run(run_dir)
        heads_of[variant] = head_summary(run.model, probe_tokens(run))
    print("\nKV-shift 1L heads. alpha: keys, beta: values, each read as gain x mix: gain = "
          "|c1| + |c2|,\nmix = (share of this token, share of the previous token) = c / gain; "
          "raw c beside. Induction point: alpha mix (0, 1), beta mix (1, 0).")
    for row in heads_of.get("kvshift_1L", []):
        print(f"  L{row['layer']}H{row['head']} {row['kind']:<22} induction={row['induction']:.3f}"
              f"  alpha gain {row['alpha_gain']:.2f} mix {row['alpha_mix']}"
              f"  beta gain {row['beta_gain']:.2f} mix {row['beta_mix']}"
              f"  raw alpha={row['alpha']} beta={row['beta']}")
    for variant in [v for v in heads_of if v.startswith("vanilla")]:
        print(f"\n{variant} heads (previous-token and induction scores in [0, 1]; a class from "
              "0.4):")
        for row in heads_of[variant]:
            print(f"  L{row['layer']}H{row['head']} {row['kind']:<26} previous_token="
                  f"{row['previous_token']:.3f} induction={row['induction']:.3f}")

    report, compared = None, {}
    try:
        from kvshift_lens.report import comparison_items, generate_report

        extra, compared = comparison_items(dirs)
        report = generate_report(kv_dir, out / "report.html", landscape_grid=11,
                                 extra_items=extra).path
    except ImportError:  # the visualisation extra is optional for the library
        pass
    for variant, entry in compared.items():
        drops = ", ".join(f"L{h['layer']}H{h['head']} {h['accuracy_zero_ablated']:.3f}"
                          for h in entry["heads"])
        print(f"\n{variant}: accuracy {entry['accuracy']:.3f}; each head zero-ablated: {drops}")
        for a in entry["shift_ablations"]:
            print(f"  remove the {a['removed']} of {a['head']}: accuracy "
                  f"{a['accuracy_before']:.3f} -> {a['accuracy_after']:.3f}")
    (out / "demo_summary.json").write_text(json.dumps({
        "groups": [g.__dict__ | {"label": g.label} for g in summary.groups],
        "heads": heads_of, "ablations": compared}, indent=2, default=str))
    print(f"\nDone in {time.perf_counter() - t0:.0f} s (training {t_train:.0f} s).")
    print(f"Runs: {out}/<variant>__seed0   summary: {out / 'summary.md'}")
    if report is not None:
        print(f"Report: {report}")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    sys.exit(main())
