"""Turn the reproduction sweeps into REPRODUCTION.md: per experiment the claim, the command, a
figure, the numbers (median and min-max over seeds) and a verdict computed by a stated rule.

Everything is read from the sweep folders (``run.json``, ``metrics.jsonl``, ``final/``), so the
report can be rebuilt at any time, also from a sweep that is still running (missing runs are
counted, and an experiment without finished runs is "not run"). Hand-written commentary survives
regeneration: text between ``<!-- notes:NAME -->`` and ``<!-- /notes:NAME -->`` in an existing
markdown file is carried over to the new one.

    kvshift repro report runs/repro --markdown REPRODUCTION.md --figures docs/reproduction
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvshift_lens._files import atomic_write_text
from kvshift_lens.repro.experiments import EXPERIMENTS
from kvshift_lens.repro.run import MARKER
from kvshift_lens.run_folder import METRICS_FILE, RESULT_FILE, RUN_FILE, read_metrics
from kvshift_lens.train.sweep import RunRecord, SweepSummary, summarize

REPRODUCED, PARTLY, NOT_REPRODUCED, NOT_RUN = "reproduced", "partly", "not reproduced", "not run"
VERDICTS = (REPRODUCED, PARTLY, NOT_REPRODUCED, NOT_RUN)
TARGET = 0.9


# ---------------------------------------------------------------------------------------------
# Reading a sweep
# ---------------------------------------------------------------------------------------------


@dataclass
class Sweep:
    """One experiment's folder: its summary, finished runs and their evaluation records."""

    name: str
    folder: Path
    summary: SweepSummary | None
    quick: bool | None
    evals: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    specs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def finished(self) -> list[RunRecord]:
        return [] if self.summary is None else [r for r in self.summary.runs
                                                if r.status == "finished"]

    def runs(self, variant: str, size: str | None = None) -> list[RunRecord]:
        return [r for r in self.finished if r.variant == variant and r.size == size]

    def not_finished(self) -> int:
        return 0 if self.summary is None else sum(r.status != "finished"
                                                  for r in self.summary.runs)

    def curve(self, variant: str, size: str | None, key: str, hold_last: bool = False
              ) -> tuple[list[int], np.ndarray] | None:
        """``(steps, values[n_seeds, n_steps])`` of ``key`` over the evaluations of every
        finished run of the group; steps a run did not reach are NaN (runs stopped at target
        end early), or with ``hold_last`` its last value (a run stopped at its target is taken
        to stay there)."""
        runs = self.runs(variant, size)
        if not runs:
            return None
        per_run = [{int(e["step"]): e.get(key) for e in self.evals[r.name]} for r in runs]
        steps = sorted({s for d in per_run for s in d})
        values = np.array([[np.nan if d.get(s) is None else float(d[s]) for s in steps]
                           for d in per_run], dtype=float)
        if hold_last:
            for row in values:
                seen = np.flatnonzero(~np.isnan(row))
                if seen.size:
                    row[seen[-1] + 1:] = row[seen[-1]]
        return steps, values

    def final(self, variant: str, size: str | None, key: str) -> list[float]:
        """The last evaluation's ``key`` of every finished run of the group (one per seed)."""
        out = []
        for r in self.runs(variant, size):
            evals = [e for e in self.evals[r.name] if e.get(key) is not None]
            if evals:
                out.append(float(evals[-1][key]))
        return out

    def training_seconds(self) -> float:
        total = 0.0
        for r in self.finished:
            try:
                doc = json.loads((self.folder / r.name / RESULT_FILE).read_text())
                total += float(doc.get("wall_seconds") or 0.0)
            except (OSError, ValueError, TypeError):
                pass
        return total


def load_sweep(root: str | Path, name: str) -> Sweep:
    """The experiment ``name`` under ``root`` (an empty :class:`Sweep` when it has not run)."""
    folder = Path(root) / name
    if not folder.is_dir():
        return Sweep(name, folder, None, None)
    quick = None
    try:
        quick = bool(json.loads((folder / MARKER).read_text()).get("quick"))
    except (OSError, ValueError, AttributeError):
        pass
    summary = summarize(folder, write=False)
    sweep = Sweep(name, folder, summary, quick)
    for r in sweep.finished:
        metrics = folder / r.name / METRICS_FILE
        sweep.evals[r.name] = [e for e in (read_metrics(metrics) if metrics.is_file() else [])
                               if e.get("kind") == "eval"]
        try:
            sweep.specs[r.name] = json.loads((folder / r.name / RUN_FILE).read_text())
        except (OSError, ValueError):
            sweep.specs[r.name] = {}
    return sweep


def parameter_count(run_dir: Path) -> int | None:
    """Parameters of a run's final model, read from the safetensors header (no weights loaded)."""
    from safetensors import safe_open

    path = run_dir / "final" / "model.safetensors"
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


# ---------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------


def med(values: Sequence[float]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(vals) if vals else None


def spread(values: Sequence[float]) -> float:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return max(vals) - min(vals) if vals else 0.0


def fmt_stats(values: Sequence[float], digits: int = 3) -> str:
    """``median (min – max)`` or ``-``."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.median(vals):.{digits}f} ({min(vals):.{digits}f} – {max(vals):.{digits}f})"


def steps_to_target(runs: Sequence[RunRecord]) -> tuple[float | None, str, int]:
    """``(median, cell, n_reached)``: the median of the steps at which each run first reached
    the target (a run that never did counts as infinitely late, so the median is None when half
    or more never did), and a table cell ``median (min – max)`` with ``>N`` for such runs."""
    if not runs:
        return None, "-", 0
    keyed = sorted(math.inf if r.steps_to_target is None else r.steps_to_target for r in runs)
    m = statistics.median(keyed)
    cells = [(f">{r.steps}" if r.steps_to_target is None else f"{r.steps_to_target}")
             for r in sorted(runs, key=lambda r: (r.steps_to_target is None,
                                                  r.steps_to_target or r.steps or 0))]
    n = sum(r.steps_to_target is not None for r in runs)
    if math.isfinite(m):
        cell = f"{m:g}" + (f" ({cells[0]} – {cells[-1]})" if len(runs) > 1 else "")
    else:
        cell = f"never (median); {', '.join(cells)}"
    return (m if math.isfinite(m) else None), cell, n


def table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


@dataclass
class Section:
    """One experiment's part of the report."""

    name: str
    title: str
    claim: str
    command: str
    verdict: str
    reason: str
    body: str = ""
    figures: dict[str, Any] = field(default_factory=dict)  # name -> plotly figure
    numbers: dict[str, Any] = field(default_factory=dict)
    runs: str = ""

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict {self.verdict!r} is not one of {VERDICTS}")


def _not_run(sweep: Sweep, title: str, claim: str, command: str) -> Section:
    return Section(sweep.name, title, claim, command, NOT_RUN,
                   f"no finished runs in {sweep.folder}")


def _missing(sweep: Sweep, variants: Sequence[str], sizes: Sequence[str | None] = (None,)
             ) -> str | None:
    """A NOT_RUN reason when a group the verdict needs has no finished run, else None."""
    absent = [v if s is None else f"{v}__{s}" for v in variants for s in sizes
              if not sweep.runs(v, s)]
    return f"no finished runs of {', '.join(absent)} yet." if absent else None


def _runs_line(sweep: Sweep) -> str:
    n = len(sweep.finished)
    missing = sweep.not_finished()
    secs = sweep.training_seconds()
    return (f"{n} finished runs" + (f", {missing} not finished" if missing else "")
            + f"; {secs / 60:.1f} min of training in total (sum over runs).")


def depth_section(sweep: Sweep, command: str) -> Section:
    exp = EXPERIMENTS["depth"]
    if not sweep.finished:
        return _not_run(sweep, exp.title, exp.claim, command)
    kv, v1, v2 = (sweep.runs(v) for v in ("kvshift_1L", "vanilla_1L", "vanilla_2L"))
    rows, numbers = [], {}
    for label, runs in (("kvshift_1L", kv), ("vanilla_1L", v1), ("vanilla_2L", v2)):
        m, cell, n = steps_to_target(runs)
        acc = sweep.final(label, None, "eval/accuracy")
        params = parameter_count(sweep.folder / runs[0].name) if runs else None
        numbers[label] = {"steps_to_target_median": m, "reached": n, "runs": len(runs),
                          "final_accuracy": acc, "params": params}
        rows.append([label, f"{params:,}" if params else "-", f"{n}/{len(runs)}", cell,
                     fmt_stats(acc)])
    kv_m, v2_m = numbers["kvshift_1L"]["steps_to_target_median"], \
        numbers["vanilla_2L"]["steps_to_target_median"]
    v1_best = max(numbers["vanilla_1L"]["final_accuracy"] or [0.0])
    kv_learns = kv_m is not None
    v1_fails = bool(v1) and v1_best < 0.5
    v2_later = v2_m is not None and kv_m is not None and v2_m > kv_m
    missing = _missing(sweep, ("kvshift_1L", "vanilla_1L", "vanilla_2L"))
    if missing:
        verdict, reason = NOT_RUN, missing
    elif kv_learns and v1_fails and v2_later:
        verdict = REPRODUCED
        reason = (f"1-layer KV-shift reaches {TARGET:.0%} at step {kv_m:g} (median), 2-layer "
                  f"vanilla at {v2_m:g} ({v2_m / kv_m:.1f}x later); 1-layer vanilla never "
                  f"exceeds {v1_best:.2f}.")
    elif kv_learns and v1_fails:
        verdict = PARTLY
        reason = ("1-layer KV-shift learns induction and 1-layer vanilla does not, but 2-layer "
                  "vanilla is not later" + ("" if v2_m is not None else
                                             f" (it does not reach {TARGET:.0%})") + ".")
    else:
        verdict = NOT_REPRODUCED
        reason = ("1-layer KV-shift does not reach the target" if not kv_learns else
                  f"1-layer vanilla reaches {v1_best:.2f}") + "."
    from kvshift_lens.viz.figures import seed_band_curves

    series = {}
    for label in ("kvshift_1L", "vanilla_1L", "vanilla_2L"):
        c = sweep.curve(label, None, "eval/accuracy")
        if c is not None:
            series[label] = c
    fig = seed_band_curves(series, "Induction accuracy over training (median, min–max band)",
                           "eval accuracy", y_range=(0, 1.02), hline=TARGET)
    body = table(["model", "parameters", f"reached {TARGET:.0%}", f"steps to {TARGET:.0%}",
                  "final accuracy"], rows)
    return Section("depth", exp.title, exp.claim, command, verdict, reason, body,
                   {"depth": fig}, numbers, _runs_line(sweep))


def _sizes(sweep: Sweep) -> list[str]:
    sizes: list[str] = []
    for r in (sweep.summary.runs if sweep.summary else []):
        if r.size is not None and r.size not in sizes:
            sizes.append(r.size)
    return sizes


def _width_value(size: str) -> int:
    digits = re.sub(r"\D", "", size)
    return int(digits) if digits else 0


def width_section(sweep: Sweep, command: str) -> Section:
    exp = EXPERIMENTS["width"]
    if not sweep.finished:
        return _not_run(sweep, exp.title, exp.claim, command)
    sizes = sorted(_sizes(sweep), key=_width_value)
    variants = ("kvshift_1L", "vanilla_2L")
    acc = {v: {s: sweep.final(v, s, "eval/accuracy") for s in sizes} for v in variants}
    rows = [[s] + [fmt_stats(acc[v][s]) for v in variants] for s in sizes]

    def smallest(v: str) -> str | None:
        for s in sizes:
            m = med(acc[v][s])
            if m is not None and m >= TARGET:
                return s
        return None

    kv_s, v2_s = smallest("kvshift_1L"), smallest("vanilla_2L")
    at_least = all((med(acc["kvshift_1L"][s]) or 0) >= (med(acc["vanilla_2L"][s]) or 0) - 0.02
                   for s in sizes)
    missing = _missing(sweep, variants, sizes)
    if missing:
        verdict, reason = NOT_RUN, missing
    elif kv_s is not None and (v2_s is None or _width_value(kv_s) < _width_value(v2_s)):
        verdict = REPRODUCED
        reason = (f"1-layer KV-shift reaches {TARGET:.0%} (median) from d_model "
                  f"{_width_value(kv_s)}, 2-layer vanilla "
                  + (f"from {_width_value(v2_s)}" if v2_s else "at no width tried") + ".")
    elif kv_s is not None and kv_s == v2_s and at_least:
        verdict = PARTLY
        reason = (f"both reach {TARGET:.0%} from the same width (d_model {_width_value(kv_s)}); "
                  "KV-shift is at least as accurate at every width but not at a smaller one.")
    else:
        verdict = NOT_REPRODUCED
        reason = ("2-layer vanilla reaches the target at a smaller width" if v2_s else
                  "neither reaches the target") + "."
    from kvshift_lens.viz.figures import seed_points

    fig = seed_points({v: {f"{_width_value(s)}": acc[v][s] for s in sizes} for v in variants},
                      f"Final induction accuracy against d_model "
                      f"({sweep.finished[0].steps} steps)", "d_model", "eval accuracy",
                      y_range=(0, 1.02), hline=TARGET)
    body = table(["size", *(f"{v} final accuracy" for v in variants)], rows)
    return Section("width", exp.title, exp.claim, command, verdict, reason, body,
                   {"width": fig}, {"accuracy": acc, "smallest": {"kvshift_1L": kv_s,
                                                                 "vanilla_2L": v2_s}},
                   _runs_line(sweep))


def ngram_section(sweep: Sweep, command: str) -> Section:
    from kvshift_lens.train.tasks import build_task

    exp = EXPERIMENTS["ngram"]
    if not sweep.finished:
        return _not_run(sweep, exp.title, exp.claim, command)
    sizes = _sizes(sweep)
    first = sweep.specs[sweep.finished[0].name]
    task = build_task(dict(first["task"]))
    ceiling = float(task.max_accuracy)
    target = float(first.get("train", {}).get("target_accuracy", TARGET))
    rel = {v: {s: [a / ceiling for a in sweep.final(v, s, "eval/accuracy")] for s in sizes}
           for v in ("vanilla", "kvshift")}
    rows, same, diffs = [], [], {}
    for s in sizes:
        runs = sweep.runs("vanilla", s) or sweep.runs("kvshift", s)
        params = parameter_count(sweep.folder / runs[0].name) if runs else None
        mv, mk = med(rel["vanilla"][s]), med(rel["kvshift"][s])
        if mv is None or mk is None:
            rows.append([s, "-", fmt_stats(rel["vanilla"][s]), fmt_stats(rel["kvshift"][s]), "-",
                         "-", "-"])
            continue
        tol = max(0.02, spread(rel["vanilla"][s]), spread(rel["kvshift"][s]))
        diffs[s] = mk - mv
        same.append(abs(mk - mv) <= tol)
        rows.append([s, f"{params:,}" if params else "-", fmt_stats(rel["vanilla"][s]),
                     fmt_stats(rel["kvshift"][s]), f"{mk - mv:+.3f} (tolerance {tol:.3f})",
                     steps_to_target(sweep.runs("vanilla", s))[1],
                     steps_to_target(sweep.runs("kvshift", s))[1]])
    if not same:
        verdict, reason = NOT_RUN, "no size has finished runs of both variants yet."
    elif all(same):
        verdict, reason = REPRODUCED, ("at every size the two are within the seed spread "
                                       "(or 0.02) of each other.")
    elif any(same):
        verdict = PARTLY
        reason = ("within the seed spread at "
                  + ", ".join(s for s, ok in zip(diffs, same, strict=True) if ok)
                  + "; apart at " + ", ".join(f"{s} ({d:+.3f})" for (s, d), ok
                                               in zip(diffs.items(), same, strict=True)
                                               if not ok) + ".")
    else:
        verdict = NOT_REPRODUCED
        reason = "the two differ by more than the seed spread at every size: " + ", ".join(
            f"{s} {d:+.3f}" for s, d in diffs.items()) + "."
    from kvshift_lens.viz.figures import seed_points

    fig = seed_points({v: rel[v] for v in ("vanilla", "kvshift")},
                      f"3-gram accuracy as a fraction of the Bayes ceiling ({ceiling:.3f})",
                      "model size (parameters)", "accuracy / ceiling", y_range=(0, 1.05),
                      hline=1.0)
    body = (f"Task: {first['task']} — exact Bayes-optimal accuracy {ceiling:.3f}, loss "
            f"{float(task.min_loss):.3f} nats.\n\n"
            + table(["size", "parameters", "vanilla (accuracy / ceiling)",
                     "kvshift (accuracy / ceiling)", "kvshift − vanilla (median)",
                     f"vanilla steps to {target:.2f}", f"kvshift steps to {target:.2f}"], rows))
    return Section("ngram", exp.title, exp.claim, command, verdict, reason, body,
                   {"ngram": fig}, {"relative_accuracy": rel, "ceiling": ceiling},
                   _runs_line(sweep))


def _hops(cell: str) -> int:
    """The hop count of a multihop cell label like ``"hop2-long/3L"``."""
    m = re.match(r"hop(\d+)", cell)
    return int(m.group(1)) if m else 0


def multihop_section(sweep: Sweep, command: str) -> Section:
    exp = EXPERIMENTS["multihop"]
    if not sweep.finished:
        return _not_run(sweep, exp.title, exp.claim, command)
    hops = _sizes(sweep)
    depths = sorted({int(r.variant.rsplit("_", 1)[1].rstrip("L")) for r in sweep.finished})
    acc = {(k, d, h): sweep.final(f"{k}_{d}L", h, "eval/accuracy")
           for k in ("vanilla", "kvshift") for d in depths for h in hops}
    rows, better, worse = [], [], []
    for h in hops:
        for d in depths:
            a_v, a_k = acc[("vanilla", d, h)], acc[("kvshift", d, h)]
            mv, mk = med(a_v), med(a_k)
            st_v = steps_to_target(sweep.runs(f"vanilla_{d}L", h))[1]
            st_k = steps_to_target(sweep.runs(f"kvshift_{d}L", h))[1]
            if mv is not None and mk is not None:
                tol = max(0.05, spread(a_v), spread(a_k))
                if mk > mv + tol:
                    better.append(f"{h}/{d}L")
                elif mk < mv - tol:
                    worse.append(f"{h}/{d}L")
            rows.append([h, d, fmt_stats(a_v), st_v, fmt_stats(a_k), st_k])
    compared = sum(med(acc[("vanilla", d, h)]) is not None and med(acc[("kvshift", d, h)])
                   is not None for d in depths for h in hops)
    if not compared:
        verdict, reason = NOT_RUN, "no (hops, layers) cell has finished runs of both variants yet."
    elif not worse and any(_hops(c) >= 2 for c in better):
        verdict = REPRODUCED
        reason = ("KV-shift is never worse than vanilla beyond the seed spread, and better at "
                  + ", ".join(better) + ".")
    elif not worse and better:
        verdict = PARTLY
        reason = ("KV-shift is better only at one hop (" + ", ".join(better) + "), which is "
                  "plain induction; at two or more hops the two are within the seed spread.")
    elif not worse:
        verdict = PARTLY
        reason = "KV-shift and vanilla are within the seed spread everywhere (no gain shown)."
    elif better:
        verdict = PARTLY
        reason = f"KV-shift is better at {', '.join(better)} but worse at {', '.join(worse)}."
    else:
        verdict = NOT_REPRODUCED
        reason = f"KV-shift is worse than vanilla at {', '.join(worse)} and better nowhere."
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("vanilla", "kvshift"),
                        horizontal_spacing=0.12)
    for col, kind in enumerate(("vanilla", "kvshift"), start=1):
        z = [[med(acc[(kind, d, h)]) for d in depths] for h in hops]
        fig.add_trace(go.Heatmap(
            z=z, x=[f"{d} layer{'s' if d > 1 else ''}" for d in depths], y=hops, zmin=0, zmax=1,
            colorscale="Viridis", showscale=col == 2, texttemplate="%{z:.2f}",
            colorbar=dict(title="accuracy"), name=kind), row=1, col=col)
    fig.update_layout(title="Multi-hop induction: final query accuracy (median over seeds)",
                      template="plotly_white", height=380, width=820)
    body = table(["hops", "layers", "vanilla accuracy", f"vanilla steps to {TARGET:.0%}",
                  "kvshift accuracy", f"kvshift steps to {TARGET:.0%}"], rows)
    return Section("multihop", exp.title, exp.claim, command, verdict, reason, body,
                   {"multihop": fig},
                   {"accuracy": {f"{k}_{d}L/{h}": v for (k, d, h), v in acc.items()},
                    "better": better, "worse": worse}, _runs_line(sweep))


def hop2_deep_section(sweep: Sweep, command: str) -> Section:
    exp = EXPERIMENTS["hop2_deep"]
    if not sweep.finished:
        return _not_run(sweep, exp.title, exp.claim, command)
    variants = ("vanilla_3L", "kvshift_3L")
    rows, numbers = [], {}
    for v in variants:
        runs = sweep.runs(v)
        m, cell, n = steps_to_target(runs)
        acc = sweep.final(v, None, "eval/accuracy")
        numbers[v] = {"reached": n, "runs": len(runs), "final_accuracy": acc,
                      "steps_to_target_median": m}
        rows.append([v, f"{n}/{len(runs)}", cell, fmt_stats(acc)])
    missing = _missing(sweep, variants)
    kv, va = numbers["kvshift_3L"], numbers["vanilla_3L"]
    gap = (med(kv["final_accuracy"]) or 0.0) - (med(va["final_accuracy"]) or 0.0)
    if missing:
        verdict, reason = NOT_RUN, missing
    elif kv["reached"] > va["reached"] and gap > 0.05:
        verdict = REPRODUCED
        reason = (f"{kv['reached']} of {kv['runs']} KV-shift seeds learn two hops, "
                  f"{va['reached']} of {va['runs']} vanilla seeds; median final accuracy "
                  f"{gap:+.2f}.")
    elif va["reached"] > kv["reached"] and gap < -0.05:
        verdict = NOT_REPRODUCED
        reason = (f"vanilla learns two hops more often ({va['reached']} vs {kv['reached']} "
                  "seeds).")
    else:
        verdict = PARTLY
        reason = (f"{kv['reached']} of {kv['runs']} KV-shift and {va['reached']} of {va['runs']} "
                  f"vanilla seeds learn two hops; median final accuracy {gap:+.2f}.")
    from kvshift_lens.viz.figures import seed_band_curves

    series = {v: c for v in variants
              if (c := sweep.curve(v, None, "eval/accuracy", hold_last=True)) is not None}
    fig = seed_band_curves(series, "Two-hop query accuracy, three layers (median, min–max; a "
                                   "run stopped at 90% is held there)", "eval accuracy",
                           y_range=(0, 1.02), hline=TARGET)
    body = table(["model", f"reached {TARGET:.0%}", f"steps to {TARGET:.0%}",
                  "final accuracy"], rows)
    return Section("hop2_deep", exp.title, exp.claim, command, verdict, reason, body,
                   {"hop2_deep": fig}, numbers, _runs_line(sweep))


ABLATION_LABELS = {
    "kv": "keys and values shifted (the paper)", "k_only": "keys only", "v_only": "values only",
    "convex": "coefficients convex (0 to 1)", "window2": "window 2 (lags 0-2)",
    "window4": "window 4 (lags 0-4)", "init_identity": "initialised at identity (vanilla)",
    "init_normal": "initialised near identity (normal)",
    "init_induction": "initialised at the induction point",
    "kv_equal_lr": "coefficients at the weights' learning rate",
}


def ablation_section(sweep: Sweep, command: str) -> Section:
    exp = EXPERIMENTS["ablation"]
    if not sweep.finished:
        return _not_run(sweep, exp.title, exp.claim, command)
    variants = [v for v in ABLATION_LABELS if sweep.runs(v)]
    rows, numbers = [], {}
    for v in variants:
        runs = sweep.runs(v)
        m, cell, n = steps_to_target(runs)
        acc = sweep.final(v, None, "eval/accuracy")
        numbers[v] = {"steps_to_target_median": m, "reached": n, "runs": len(runs),
                      "final_accuracy": acc}
        rows.append([v, ABLATION_LABELS[v], f"{n}/{len(runs)}", cell, fmt_stats(acc)])
    kv = numbers.get("kv", {}).get("steps_to_target_median")

    def loses(v: str) -> bool | None:
        if v not in numbers or kv is None:
            return None
        m = numbers[v]["steps_to_target_median"]
        return m is None or m > kv

    k_loses, v_loses = loses("k_only"), loses("v_only")
    convex_ok = numbers.get("convex", {}).get("steps_to_target_median") is not None
    missing = _missing(sweep, ("kv", "k_only", "v_only"))
    if missing:
        verdict, reason = NOT_RUN, missing
    elif kv is None:
        verdict, reason = NOT_REPRODUCED, "the full KV shift itself does not reach the target."
    elif k_loses and v_loses:
        verdict = REPRODUCED
        reason = "both keys-only and values-only are slower than (or never as good as) KV."
    elif k_loses or v_loses:
        verdict = PARTLY
        fast = "keys only" if not k_loses else "values only"
        slow = "keys only" if k_loses else "values only"
        reason = (f"{slow} loses the gain, but {fast} learns one-layer induction as fast as "
                  "KV or faster")
        reason += "; convex coefficients learn it too." if convex_ok else "."
    else:
        verdict = NOT_REPRODUCED
        reason = "neither keys-only nor values-only is slower than KV."
    import plotly.graph_objects as go

    from kvshift_lens.viz.figures import _color

    fig = go.Figure()
    cap = max((r.steps or 0) for r in sweep.finished)
    for i, v in enumerate(variants):
        runs = sweep.runs(v)
        reached = [r.steps_to_target for r in runs if r.steps_to_target is not None]
        never = sum(r.steps_to_target is None for r in runs)
        if reached:
            fig.add_trace(go.Box(y=reached, x=[v] * len(reached), name=v, boxpoints="all",
                                 jitter=0.3, pointpos=0, marker=dict(color=_color(i)),
                                 line=dict(color=_color(i)), showlegend=False))
        if never:
            fig.add_trace(go.Scatter(x=[v] * never, y=[cap] * never, mode="markers",
                                     marker=dict(symbol="x", size=10, color=_color(i)),
                                     showlegend=False, name=f"{v} (never)"))
    fig.add_hline(y=cap, line=dict(color="#999", dash="dot"),
                  annotation_text=f"never reached {TARGET:.0%} within {cap} steps (x)",
                  annotation_position="top left")
    fig.update_layout(title=f"Steps to {TARGET:.0%} induction accuracy, one layer (every seed)",
                      template="plotly_white", height=440, width=820,
                      xaxis=dict(type="category", categoryorder="array", categoryarray=variants),
                      yaxis=dict(title=f"steps to {TARGET:.0%}", rangemode="tozero"))
    body = table(["variant", "what", f"reached {TARGET:.0%}", f"steps to {TARGET:.0%}",
                  "final accuracy"], rows)
    return Section("ablation", exp.title, exp.claim, command, verdict, reason, body,
                   {"ablation": fig}, numbers, _runs_line(sweep))


def landscape_section(sweep: Sweep, command: str, grid: int = 21) -> Section:
    """The paper's Fig. 2 on the ablation's convex runs (their heads live on the plane)."""
    title = "The (α1, β1) landscape"
    claim = ("Over the plane α2 = 1 − α1, β2 = 1 − β1 gradient descent flows towards the "
             "induction point (α1, β1) = (0, 1).")
    runs = sorted(sweep.runs("convex"), key=lambda r: r.seed)
    if not runs:
        return Section("landscape", title, claim, command, NOT_RUN,
                       f"no finished convex runs in {sweep.folder}")
    import torch

    from kvshift_lens.model import HookedKVShiftTransformer
    from kvshift_lens.train.tasks import build_task
    from kvshift_lens.viz.figures import eval_coefficients, head_label, landscape_figure
    from kvshift_lens.viz.landscape import loss_landscape

    run = runs[0]
    model = HookedKVShiftTransformer.from_pretrained(sweep.folder / run.name / "final",
                                                     device="cpu")
    task = build_task(dict(sweep.specs[run.name]["task"]))
    with torch.enable_grad():
        land = loss_landscape(model, task, layer=0, heads=None, grid=grid, n_sequences=32,
                              seed=1234, coords="raw")
    toward = toward_fraction(land)
    lo_a, lo_b = land.argmin()
    # The paper: the flow towards (0, 1) is more consistent the longer the sequences (its O(T)
    # term). The same trained model, the same plane, shorter and longer induction sequences.
    by_length = {}
    seq_lens = sorted({max(8, task.seq_len // 4), max(8, task.seq_len // 2), task.seq_len})
    for seq_len in seq_lens:
        other = dataclasses.replace(task, seq_len=seq_len, max_length=None)
        with torch.enable_grad():
            land_t = loss_landscape(model, other, layer=0, heads=None, grid=max(5, grid // 2 + 1),
                                    n_sequences=32, seed=1234, coords="raw")
        by_length[seq_len] = (toward_fraction(land_t), land_t.argmin())
    # Where every head of every convex run ended, and the paths of the first run.
    by_head = list(_ends_by_run(sweep, runs))
    ends = [end for _, _, end in by_head]
    _, coeffs = eval_coefficients(sweep.evals[run.name])
    paths = {head_label(0, h): (coeffs["k"][:, 0, h, 0].tolist(), coeffs["v"][:, 0, h, 0].tolist())
             for h in range(coeffs["k"].shape[2])}
    a_end = [e[0] for e in ends]
    b_end = [e[1] for e in ends]
    keys_prev = sum(x < 0.2 for x in a_end)
    if toward >= 0.75 and keys_prev == len(ends):
        verdict = REPRODUCED
    elif toward >= 0.5 or keys_prev >= len(ends) / 2:
        verdict = PARTLY
    else:
        verdict = NOT_REPRODUCED
    reason = (f"the descent direction points towards (0, 1) at {toward:.0%} of the grid points "
              f"(those farther than 0.15 from it); the grid's lowest loss is at "
              f"({lo_a:.2f}, {lo_b:.2f}); {keys_prev} of {len(ends)} trained heads end with "
              f"α1 < 0.2 (keys read the previous token), their β1 spans "
              f"{min(b_end):.2f} – {max(b_end):.2f}.")
    fig = landscape_figure(land, paths=paths, arrow_stride=2 if grid > 15 else 1,
                           title=f"Loss over (α1, β1), every head moved together "
                                 f"({run.name}, trained)")
    fig.update_layout(width=760, height=620)
    body = (f"Model: `{sweep.folder.name}/{run.name}` (1 layer, convex coefficients, so α2 = 1 − "
            f"α1 and β2 = 1 − β1 hold exactly and the trained heads lie on the plane). Loss: masked "
            f"induction cross-entropy on {land.n_sequences} fresh sequences, every head's "
            f"coefficients set through the hooks to (a, 1 − a, b, 1 − b), {grid}x{grid} grid "
            f"over [−0.5, 1.5]²; the trained model's own loss {land.model_loss:.3f}, the grid's "
            f"lowest {float(land.loss.min()):.3f}.\n\n"
            + table(["induction seq_len", "descent towards (0, 1)", "lowest loss at (α1, β1)"],
                    [[n, f"{f:.0%}", f"({lo[0]:.2f}, {lo[1]:.2f})"]
                     for n, (f, lo) in by_length.items()])
            + "\n\nWhere the trained heads of every convex run ended:\n\n"
            + table(["run", "head", "α1 (end)", "β1 (end)"],
                    [[r.name, h, f"{coeffs_end[0]:.3f}", f"{coeffs_end[1]:.3f}"]
                     for r, h, coeffs_end in by_head]))
    return Section("landscape", title, claim, command, verdict, reason, body,
                   {"landscape": fig}, {"toward_fraction": toward, "argmin": (lo_a, lo_b),
                                        "ends": ends, "by_seq_len": by_length}, "")


def toward_fraction(land: Any, target: tuple[float, float] = (0.0, 1.0),
                    exclude: float = 0.15) -> float:
    """The share of grid points (farther than ``exclude`` from ``target``) where the descent
    direction ``-grad`` has a positive component towards ``target``."""
    a, b = np.meshgrid(np.asarray(land.a1), np.asarray(land.b1), indexing="ij")
    g = np.asarray(land.grad)
    to_target = np.stack([target[0] - a, target[1] - b], -1)
    ok = (np.linalg.norm(to_target, axis=-1) > exclude) & (np.linalg.norm(g, axis=-1) > 0)
    if not ok.any():
        return float("nan")
    return float(((-g * to_target).sum(-1)[ok] > 0).mean())


def _ends_by_run(sweep: Sweep, runs: Sequence[RunRecord]):
    from kvshift_lens.viz.figures import eval_coefficients

    for r in runs:
        _, coeffs = eval_coefficients(sweep.evals[r.name])
        for h in range(coeffs["k"].shape[2]):
            yield r, h, (float(coeffs["k"][-1, 0, h, 0]), float(coeffs["v"][-1, 0, h, 0]))


def text_section(sweep: Sweep, command: str) -> Section:
    exp = EXPERIMENTS["text"]
    if not sweep.finished:
        return _not_run(sweep, exp.title, exp.claim, command)
    sizes = _sizes(sweep)
    rows, lower, numbers = [], [], {}
    for s in sizes:
        lv, lk = sweep.final("vanilla", s, "eval/loss"), sweep.final("kvshift", s, "eval/loss")
        iv, ik = (sweep.final("vanilla", s, "eval/icl_score"),
                  sweep.final("kvshift", s, "eval/icl_score"))
        runs = sweep.runs("vanilla", s) or sweep.runs("kvshift", s)
        params = parameter_count(sweep.folder / runs[0].name) if runs else None
        mv, mk = med(lv), med(lk)
        if mv is not None and mk is not None:
            lower.append((s, mk - mv, max(spread(lv), spread(lk))))
        numbers[s] = {"loss": {"vanilla": lv, "kvshift": lk}, "icl": {"vanilla": iv,
                                                                       "kvshift": ik}}
        rows.append([s, f"{params:,}" if params else "-", fmt_stats(lv), fmt_stats(lk),
                     "-" if mv is None or mk is None else f"{mk - mv:+.3f}",
                     fmt_stats(iv), fmt_stats(ik)])
    clear = [s for s, d, sp in lower if d < -sp]
    if not lower:
        verdict, reason = NOT_RUN, "no size has finished runs of both variants yet."
    elif len(clear) == len(lower):
        verdict = REPRODUCED
        reason = ("KV-shift's validation loss is lower at every size, by more than the seed "
                  "spread: " + ", ".join(f"{s} {d:+.3f} nats/token" for s, d, _ in lower) + ".")
    elif clear or any(d < 0 for _, d, _ in lower):
        verdict = PARTLY
        reason = ("KV-shift is lower at " + ", ".join(f"{s} ({d:+.3f})" for s, d, _ in lower
                                                      if d < 0)
                  + (", but not beyond the seed spread everywhere." if len(clear) < len(lower)
                     else "."))
    else:
        verdict = NOT_REPRODUCED
        reason = "KV-shift's validation loss is not lower at any size."
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from kvshift_lens.viz.figures import _color

    fig = make_subplots(rows=1, cols=2, subplot_titles=("validation loss (nats/token)",
                                                        "in-context-learning score"))
    i = 0
    for s in sizes:
        for v in ("vanilla", "kvshift"):
            for col, key in ((1, "eval/loss"), (2, "eval/icl_score")):
                c = sweep.curve(v, s, key)
                if c is None:
                    continue
                steps, vals = c
                ok = ~np.isnan(vals).all(0)
                if not ok.any():
                    continue
                fig.add_trace(go.Scatter(
                    x=[st for st, keep in zip(steps, ok, strict=True) if keep],
                    y=np.nanmedian(vals[:, ok], 0).tolist(), mode="lines",
                    name=f"{v} {s}", legendgroup=f"{v} {s}", showlegend=col == 1,
                    line=dict(color=_color(i), dash="solid" if v == "kvshift" else "dot")),
                    row=1, col=col)
        i += 1
    fig.update_xaxes(title_text="step")
    task_spec = sweep.specs[sweep.finished[0].name].get("task", {})
    tokenizers = sorted({str(sweep.specs[r.name].get("task", {}).get("tokenizer", "byte"))
                         for r in sweep.finished})
    fig.update_layout(title=f"Text ({task_spec.get('source', 'stdlib')} corpus, "
                            f"{' and '.join(tokenizers)} tokens): median over seeds; "
                            "solid kvshift, dotted vanilla",
                      template="plotly_white", height=420, width=900,
                      legend=dict(orientation="h", y=-0.22))
    first = sweep.specs[sweep.finished[0].name]
    train = first.get("train", {})
    body = (f"Task: {first.get('task')} (sizes may override it: see `sweep.json`); "
            f"{train.get('steps')} steps of {train.get('batch_size')} "
            f"windows for every model (the same token budget). Losses are per token of each "
            f"size's tokenizer, so compare within a row. ICL score: mean loss on the last "
            f"tokens of a window minus on tokens near its start (negative: more context helps; "
            f"TextTask.metrics).\n\n"
            + table(["size", "parameters", "vanilla val loss", "kvshift val loss",
                     "kvshift − vanilla", "vanilla ICL score", "kvshift ICL score"], rows))
    return Section("text", exp.title, exp.claim, command, verdict, reason, body, {"text": fig},
                   numbers, _runs_line(sweep))


RULES = {
    "depth": "reproduced when the 1-layer KV-shift median reaches 90%, no 1-layer vanilla run "
             "ends above 50%, and the 2-layer vanilla median reaches 90% later than KV-shift's; "
             "partly when only the first two hold.",
    "width": "reproduced when the smallest d_model whose median final accuracy reaches 90% is "
             "smaller for 1-layer KV-shift than for 2-layer vanilla; partly when it is the same "
             "and KV-shift is at least as accurate (within 0.02) at every width.",
    "ngram": "reproduced when at every size the medians of accuracy / ceiling differ by at most "
             "the larger seed range of the two (at least 0.02); partly when that holds at some "
             "sizes.",
    "multihop": "a cell (hops, layers) counts as better or worse for KV-shift when its median "
                "differs from vanilla's by more than the larger seed range (at least 0.05). "
                "Reproduced when never worse and better in some cell of two or more hops; partly "
                "when never worse and better only at one hop (plain induction) or nowhere, or "
                "when mixed; not reproduced when only worse.",
    "hop2_deep": "reproduced when more KV-shift seeds than vanilla seeds reach 90% and "
                 "KV-shift's median final accuracy is higher by more than 0.05; not reproduced "
                 "when the same holds the other way round; partly otherwise.",
    "ablation": "reproduced when both keys-only and values-only need more steps to 90% than KV "
                "(medians; a run that never gets there counts as infinitely many); partly when "
                "one of them does.",
    "landscape": "reproduced when the descent direction has a positive component towards (0, 1) "
                 "at 75% or more of the grid points farther than 0.15 from it, and every trained "
                 "head ends with α1 < 0.2; partly when 50% of the points or half the heads do.",
    "text": "reproduced when KV-shift's median validation loss is lower at every size by more "
            "than the larger seed range; partly when it is lower at some size.",
}
"""How each section's verdict is decided (printed in the report beside the verdict)."""

SECTIONS: dict[str, Callable[..., Section]] = {
    "depth": depth_section, "width": width_section, "ngram": ngram_section,
    "multihop": multihop_section, "hop2_deep": hop2_deep_section,
    "ablation": ablation_section, "landscape": landscape_section, "text": text_section,
}
"""Report sections in order; ``landscape`` reads the ``ablation`` folder."""


# ---------------------------------------------------------------------------------------------
# The markdown
# ---------------------------------------------------------------------------------------------

_NOTES = re.compile(r"<!-- notes:(\w+) -->\n(.*?)<!-- /notes:\1 -->", re.S)


def existing_notes(path: Path) -> dict[str, str]:
    """Hand-written notes per section from an existing report (empty when there is none)."""
    if not path.is_file():
        return {}
    return {m.group(1): m.group(2) for m in _NOTES.finditer(path.read_text())}


def _command(name: str, out: str, quick: bool) -> str:
    q = " --quick" if quick else ""
    exp = "ablation" if name == "landscape" else name
    return f"kvshift repro run {exp} --out {out} --jobs 2{q}"


MODE_MARKER = "<!-- kvshift repro report: {mode} -->"
"""The first line of every report: whether it was built from a quick (smoke-test) or a full set."""

FIGURES_MARKER = ".kvshift-report.json"
"""Written beside the figures: which kind of report they belong to."""


def report_mode(path: Path) -> str | None:
    """``"quick"`` or ``"full"`` for an existing report file (older reports without the marker
    count as full unless they carry the quick banner), None when there is no file."""
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8", errors="replace")
    for mode in ("quick", "full"):
        if text.startswith(MODE_MARKER.format(mode=mode)):
            return mode
    return "quick" if "**Quick mode**" in text else "full"


def figures_mode(folder: Path) -> str | None:
    """The mode of the report whose figures ``folder`` holds; None when it holds no figure.
    Figures without a marker count as a full report's."""
    if not folder.is_dir() or not any(folder.glob("*.png")):
        return None
    try:
        return "quick" if json.loads((folder / FIGURES_MARKER).read_text()).get("quick") else "full"
    except (OSError, json.JSONDecodeError, AttributeError):
        return "full"


def default_outputs(root: Path, quick: bool) -> tuple[Path, Path]:
    """Where a report goes when not told: the tracked ``REPRODUCTION.md`` and
    ``docs/reproduction/`` for a full set; inside ``root`` for a quick one, so a smoke test never
    touches the real report."""
    if quick:
        return root / "REPRODUCTION.md", root / "figures"
    return Path("REPRODUCTION.md"), Path("docs/reproduction")


def _guard_quick(markdown: Path | None, figures: Path | None, quick: bool) -> None:
    if not quick:
        return
    if markdown is not None and report_mode(markdown) == "full":
        raise ValueError(f"{markdown} holds a full reproduction report; a --quick run's report "
                         "never replaces it (name another file with --markdown)")
    if figures is not None and figures_mode(figures) == "full":
        raise ValueError(f"{figures} holds a full report's figures; a --quick run's figures never "
                         "replace them (name another folder with --figures)")


def render_markdown(sections: Sequence[Section], figure_links: Mapping[str, str],
                    notes: Mapping[str, str], root: str, quick: bool,
                    header_note: str = "") -> str:
    lines = [MODE_MARKER.format(mode="quick" if quick else "full"),
             "# Reproducing the paper's toy results", ""]
    if quick:
        lines += ["> **Quick mode** (a smoke test of the pipeline): a handful of steps per run; "
                  "the numbers and verdicts below mean nothing.", ""]
    lines += [
        "What PAPER.md's claims look like at toy scale when rerun with this toolkit's own "
        "training, probes and figures. Every number below is computed from the run folders by "
        "`kvshift_lens.repro.report`; each verdict follows the rule stated in its section "
        "(`kvshift_lens/repro/report.py`), and hand-written notes sit between `notes` markers, "
        "which regeneration keeps.", "",
        "Rerun everything (about 80 minutes on 2 CPU cores) and rebuild this file:", "",
        "```bash",
        f"kvshift repro run --out {root} --jobs 2{' --quick' if quick else ''}",
        f"kvshift repro report {root} --markdown REPRODUCTION.md --figures docs/reproduction",
        "```", "",
        "Each experiment is an ordinary sweep: `kvshift sweep "
        f"{root}/NAME/sweep.json --out {root}/NAME` reruns or finishes one, and "
        f"`{root}/NAME/summary.md` lists its runs. Medians over seeds, with the min – max range "
        "in brackets; \"steps to 90%\" is the first evaluation (every 25 or 50 steps) at or "
        "above 90% accuracy, and `>N` means a run never got there in its N steps.", "",
    ]
    if header_note:
        lines += [header_note, ""]
    lines += ["| # | experiment | verdict | why |", "|---|---|---|---|"]
    for i, s in enumerate(sections, start=1):
        lines.append(f"| {i} | [{s.title}](#{i}-{_anchor(s.title)}) | **{s.verdict}** | "
                     f"{s.reason[:1].upper()}{s.reason[1:]} |")
    lines += ["", "<!-- notes:about -->", notes.get("about", "").rstrip("\n"),
              "<!-- /notes:about -->", ""]
    for i, s in enumerate(sections, start=1):
        lines += [f"## {i}. {s.title}", "", f"**Claim.** {s.claim}", "",
                  f"**Command.** `{s.command}`" + (f" — {s.runs}" if s.runs else ""), ""]
        for name in s.figures:
            if name in figure_links:
                lines += [f"![{s.title}]({figure_links[name]})", ""]
        if s.body:
            lines += [s.body, ""]
        if s.name in RULES:
            lines += [f"**Rule.** {RULES[s.name][0].upper()}{RULES[s.name][1:]}", ""]
        lines += [f"**Verdict: {s.verdict}.** {s.reason[:1].upper()}{s.reason[1:]}", ""]
        lines += [f"<!-- notes:{s.name} -->", notes.get(s.name, "").rstrip("\n"),
                  f"<!-- /notes:{s.name} -->", ""]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).rstrip("\n") + "\n"


def _anchor(title: str) -> str:
    t = re.sub(r"[^\w\- ]", "", title.lower()).strip()
    return re.sub(r"\s", "-", t)


@dataclass
class ReportResult:
    sections: list[Section]
    markdown: Path | None
    figures: list[Path]
    static_note: str


def build_report(
    root: str | Path,
    markdown: str | Path | None = "",
    figures_dir: str | Path | None = "",
    names: Sequence[str] | None = None,
    static: bool = True,
    landscape_grid: int = 21,
) -> ReportResult:
    """Analyse the experiments under ``root`` and write the markdown and PNG figures.

    Args:
        root: the folder ``kvshift repro run --out`` wrote.
        markdown: the report file ("": :func:`default_outputs`; None: do not write one).
        figures_dir: where the PNG figures go ("": :func:`default_outputs`; None or
            ``static=False``: none are written and the report links none).
        names: the sections to build (default: every one).

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: an unknown section name, quick and full runs mixed under ``root``, or a quick
            set asked to write over a full report or its figures.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"reproduction folder {root} does not exist (run "
                                f"'kvshift repro run --out {root}' first)")
    names = list(names) if names else list(SECTIONS)
    for n in names:
        if n not in SECTIONS:
            raise ValueError(f"unknown report section {n!r}; choose from {list(SECTIONS)}")
    sweeps = {n: load_sweep(root, "ablation" if n == "landscape" else n) for n in names}
    modes = {s.quick for s in sweeps.values() if s.quick is not None}
    if len(modes) > 1:
        raise ValueError(f"{root} mixes quick and full experiments; report them separately")
    quick = modes == {True}
    md_default, fig_default = default_outputs(root, quick)
    markdown = md_default if markdown == "" else markdown
    figures_dir = fig_default if figures_dir == "" else figures_dir
    _guard_quick(None if markdown is None else Path(markdown),
                 None if figures_dir is None or not static else Path(figures_dir), quick)
    shown_root = os.path.relpath(root) if not root.is_absolute() else str(root)
    sections = []
    for n in names:
        cmd = _command(n, shown_root, quick)
        if n == "landscape":
            sections.append(SECTIONS[n](sweeps[n], cmd, grid=landscape_grid))
        else:
            sections.append(SECTIONS[n](sweeps[n], cmd))
    figures = {k: f for s in sections for k, f in s.figures.items()}
    written: list[Path] = []
    links: dict[str, str] = {}
    static_note = "no figures requested"
    if static and figures_dir is not None and figures:
        from kvshift_lens.viz.export import export_static

        result = export_static(figures, figures_dir, formats=("png",))
        if result.directory is not None:
            atomic_write_text(Path(figures_dir) / FIGURES_MARKER,
                              json.dumps({"quick": quick}) + "\n")
        static_note = result.message
        written = [p for p in result.files if p.is_file()]
        base = Path(markdown).parent if markdown is not None else Path(".")
        for p in written:
            links[p.stem] = os.path.relpath(p, base)
    md_path = None
    if markdown is not None:
        md_path = Path(markdown)
        notes = existing_notes(md_path)
        header = "" if len(links) == len(figures) or not figures else (
            f"_Figures: {static_note}._")
        text = render_markdown(sections, links, notes, shown_root, quick, header)
        md_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(md_path, text)
    return ReportResult(sections, md_path, written, static_note)


__all__ = ["NOT_REPRODUCED", "NOT_RUN", "PARTLY", "REPRODUCED", "SECTIONS", "Section", "Sweep",
           "build_report", "default_outputs", "existing_notes", "load_sweep", "render_markdown",
           "report_mode", "steps_to_target"]
