"""Sweeps: variants x seeds x sizes from one spec, one run folder per run, and a summary table.

A sweep spec (a JSON file or a dict)::

    {
      "base":     {"model": {...}, "task": {...}, "train": {...}},   # a RunSpec dict
      "variants": {"kvshift_1L": {"model": {"n_layers": 1}},
                   "vanilla_2L": {"model": {"n_layers": 2, "shift_k": false, "shift_v": false}}},
      "seeds":    [0, 1, 2],                                         # optional, default [0]
      "sizes":    {"d32": {"model": {"d_model": 32}},                # optional
                   "d64": {"model": {"d_model": 64}}}
    }

Each run's spec is ``deep_merge(base, variant, size)`` with ``train.seed = seed`` (dicts merge key by
key, anything else is replaced; ``train.progress`` defaults to False), resolved in its worker by
:func:`~kvshift_lens.train.config.resolve_run_spec`. Its folder is
``out_dir/<variant>[__<size>]__seed<k>/`` (a normal run folder, see :mod:`kvshift_lens.run_folder`),
plus ``result.json`` (steps, final metrics, tokens/s) when it finishes, or ``error.json`` when it
fails. Names may use letters, digits and ``. _ + -`` but not ``__`` (the separator).

Running again is safe: finished runs (``final/`` exists) are skipped, interrupted runs with a
checkpoint are resumed, others start afresh, and a run that fails is recorded without stopping the
others. A folder made by another spec is refused unless the new spec only *grows* it
(:func:`extends`: new variants, sizes or seeds; everything that ran is unchanged), so finished runs
are never reported as results of a spec they did not run. The sweep holds the folder's lock while
it runs (a second sweep on the same folder stops at once), and each run holds its own.
``out_dir/summary.json`` and ``out_dir/summary.md`` are rebuilt from the run folders alone by
:func:`summarize`, so they also describe a sweep that is still running or was cut short.
"""

from __future__ import annotations

import copy
import json
import math
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from kvshift_lens._files import atomic_write_text
from kvshift_lens.run_folder import (
    ERROR_FILE,
    FINAL_DIR,
    METRICS_FILE,
    RESULT_FILE,
    RUN_FILE,
    SUMMARY_JSON,
    SUMMARY_MD,
    SWEEP_FILE,
    FolderLock,
    RunFolderError,
    latest_checkpoint,
    read_metrics,
)
from kvshift_lens.train.config import SECTIONS as _SECTIONS

_NAME = re.compile(r"^[A-Za-z0-9.+-]+(?:_[A-Za-z0-9.+-]+)*$")  # no "__", no leading/trailing "_"
_SEED = re.compile(r"^seed(\d+)$")


# ---------------------------------------------------------------------------------------------
# Run specs
# ---------------------------------------------------------------------------------------------


def deep_merge(*dicts: Mapping[str, Any]) -> dict[str, Any]:
    """Merge mappings left to right: nested mappings merge key by key, other values replace."""
    out: dict[str, Any] = {}
    for d in dicts:
        for k, v in d.items():
            if isinstance(v, Mapping) and isinstance(out.get(k), dict):
                out[k] = deep_merge(out[k], v)
            else:
                out[k] = copy.deepcopy(dict(v) if isinstance(v, Mapping) else v)
    return out


# ---------------------------------------------------------------------------------------------
# Sweep specs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: its folder name, coordinates and merged RunSpec dict."""

    name: str
    variant: str
    size: str | None
    seed: int
    spec: dict[str, Any]


def run_name(variant: str, size: str | None, seed: int) -> str:
    return "__".join([variant, *([size] if size else []), f"seed{seed}"])


def parse_run_name(name: str) -> tuple[str, str | None, int] | None:
    """``(variant, size, seed)`` of a run folder name, or None when it is not one."""
    parts = name.split("__")
    m = _SEED.match(parts[-1])
    if m is None or len(parts) not in (2, 3) or not all(_NAME.match(p) for p in parts[:-1]):
        return None
    return parts[0], (parts[1] if len(parts) == 3 else None), int(m.group(1))


def _check_overrides(kind: str, table: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(table, Mapping) or not table:
        raise ValueError(f"sweep {kind!r} must be a non-empty dict of name -> overrides")
    for name, overrides in table.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(
                f"sweep {kind[:-1]} name {name!r} must use letters, digits and '. _ + -', without "
                "'__' and without a leading or trailing '_' (it becomes part of a folder name)")
        if not isinstance(overrides, Mapping):
            raise ValueError(f"sweep {kind[:-1]} {name!r} must be a dict like "
                             "{\"model\": {...}, \"train\": {...}}")
        bad = sorted(set(overrides) - set(_SECTIONS))
        if bad:
            raise ValueError(f"sweep {kind[:-1]} {name!r} has unknown section(s) {bad}; "
                             f"use {list(_SECTIONS)}")
    return {k: dict(v) for k, v in table.items()}


def load_sweep_spec(spec: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    """Read (from a JSON file when given a path) and check a sweep spec's structure.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: invalid JSON or structure (the message names the key).
    """
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"sweep spec {path} does not exist")
        try:
            spec = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"sweep spec {path} is not valid JSON ({e})") from None
    if not isinstance(spec, Mapping):
        raise ValueError(f"a sweep spec must be a dict, got {type(spec).__name__}")
    unknown = sorted(set(spec) - {"base", "variants", "seeds", "sizes"})
    if unknown:
        raise ValueError(f"unknown sweep spec key(s) {unknown}; the keys are "
                         "['base', 'variants', 'seeds', 'sizes']")
    base = spec.get("base", {})
    if not isinstance(base, Mapping) or sorted(set(base) - set(_SECTIONS)):
        raise ValueError(f"sweep 'base' must be a RunSpec dict with sections {list(_SECTIONS)}")
    variants = _check_overrides("variants", spec.get("variants"))
    sizes = _check_overrides("sizes", spec["sizes"]) if spec.get("sizes") is not None else None
    seeds = spec.get("seeds", [0])
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
            or len(set(seeds)) != len(seeds)):
        raise ValueError(f"sweep 'seeds' must be a non-empty list of distinct ints >= 0, got {seeds!r}")
    return {"base": copy.deepcopy(dict(base)), "variants": variants, "seeds": list(seeds),
            "sizes": sizes}


def expand_sweep(spec: Mapping[str, Any]) -> list[SweepRun]:
    """Every run of a (checked) sweep spec, in order variant, size, seed."""
    runs = []
    sizes = spec.get("sizes") or {None: {}}
    for variant, v_over in spec["variants"].items():
        for size, s_over in sizes.items():
            for seed in spec["seeds"]:
                merged = deep_merge({"model": {}, "task": {}, "train": {"progress": False}},
                                   spec["base"], v_over, s_over)
                merged["train"]["seed"] = seed
                runs.append(SweepRun(run_name(variant, size, seed), variant, size, seed, merged))
    return runs


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def write_result(run_dir: Path, result: Any, wall_seconds: float | None = None,
                 resumed: bool = False) -> None:
    """Write ``result.json`` (what metrics.jsonl lacks: throughput and wall time) for a run."""
    doc = {"steps": result.steps, "steps_to_target": result.steps_to_target,
           "final_metrics": result.final_metrics, "tokens_per_second": result.tokens_per_second,
           "wall_seconds": wall_seconds, "resumed": resumed}
    _write_json(Path(run_dir) / RESULT_FILE, doc)


def _write_json(path: Path, doc: Any) -> None:
    atomic_write_text(path, json.dumps(doc, indent=2, default=_json_default) + "\n")


def _json_default(x: Any) -> Any:
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def _run_mode(run_dir: Path, overwrite: bool) -> str:
    """How a sweep (re)starts one run: resume it from its checkpoint, replace it, or start it."""
    if not run_dir.is_dir() or not any(e.name != ".kvshift.lock" for e in run_dir.iterdir()):
        return "new"
    if not overwrite and (run_dir / RUN_FILE).is_file() and latest_checkpoint(run_dir):
        return "resume"
    return "overwrite"


def _execute(job: dict[str, Any]) -> dict[str, Any]:
    """Run one job (in a worker process or in-process); never raises an ``Exception``."""
    from kvshift_lens.run_folder import FolderInUse
    from kvshift_lens.train.trainer import train

    run_dir = Path(job["run_dir"])
    record = {"name": job["name"], "status": "finished", "error": None, "resumed": False}
    t0 = time.perf_counter()
    try:
        (run_dir / ERROR_FILE).unlink(missing_ok=True)  # the last attempt's, written below
        mode = _run_mode(run_dir, job["overwrite"])
        result = train(job["spec"], run_dir, resume=mode == "resume",
                       overwrite=mode == "overwrite")
        wall = time.perf_counter() - t0
        write_result(run_dir, result, wall, resumed=mode == "resume")
        record.update(resumed=mode == "resume", steps=result.steps,
                      steps_to_target=result.steps_to_target,
                      final_metrics=result.final_metrics, wall_seconds=wall)
    except Exception as e:  # noqa: BLE001 - a failing run is recorded, the sweep goes on
        message = f"{type(e).__name__}: {e}"
        record.update(status="failed", error=message)
        if not isinstance(e, FolderInUse):  # never write into a folder another process owns
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
                _write_json(run_dir / ERROR_FILE, {
                    "error": message, "type": type(e).__name__,
                    "traceback": traceback.format_exc(), "variant": job["variant"],
                    "size": job["size"], "seed": job["seed"]})
            except OSError:
                pass
    return record


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _in_notebook() -> bool:
    """Whether this process is a Jupyter kernel writing cell outputs (ipykernel's streams)."""
    return "ipykernel" in sys.modules and type(sys.stdout).__module__.startswith("ipykernel")


def progress_log(line: str) -> None:
    """The default ``log`` of :func:`run_sweep`; its lines go where they read as progress.

    In a notebook kernel: stdout, plain text in the cell (stderr would show as error blocks).
    Elsewhere: stderr. :func:`run_sweep` adds, with this log only, a line when a sweep starts (in a
    notebook) or a progress bar over its runs (on a terminal); when stderr is a file or a pipe,
    only the per-run finished/failed lines are written, never a bar.
    """
    print(line, file=sys.stdout if _in_notebook() else sys.stderr, flush=True)


class _SweepProgress:
    """Where one sweep's lines go: the caller's ``log`` as given; with :func:`progress_log`, also
    a start line in a notebook, or a tqdm bar over the runs on a terminal (lines above it)."""

    def __init__(self, log: Callable[[str], None], total: int, jobs: int, out: Path) -> None:
        self.log, self.bar = log, None
        if log is not progress_log or total == 0:
            return
        if _in_notebook():
            workers = min(jobs, total)
            log(f"sweep: training {total} run{'s' * (total > 1)} in {out}, "
                f"{workers} at a time; one line as each finishes")
        elif sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=f"sweep {out.name}", unit="run", file=sys.stderr,
                            dynamic_ncols=True)

    def run_done(self, text: str) -> None:
        if self.bar is None:
            self.log(text)
        else:
            self.bar.write(text, file=sys.stderr)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run_sweep(
    spec: Mapping[str, Any] | str | Path,
    out_dir: str | Path,
    jobs: int = 1,
    overwrite: bool = False,
    threads: int | None = None,
    log: Callable[[str], None] | None = progress_log,
) -> SweepSummary:
    """Run every run of a sweep that is not finished yet, then write and return the summary.

    Args:
        spec: a sweep spec dict or the path of a JSON file (see the module docstring).
        out_dir: the sweep folder; one subfolder per run.
        jobs: worker processes (``spawn``) running in parallel; 1 runs in this process.
        overwrite: rerun finished runs too, from scratch.
        threads: torch threads per worker (default 1 in workers; in-process runs leave the
            current setting alone unless this is given).
        log: called with one line per finished or failed run, and one for runs skipped
            (None: silent). The default, :func:`progress_log`, also shows progress
            where someone watches: a start line in a notebook (on stdout), a bar over
            the runs on a terminal; when stderr is not a terminal, only those lines.

    Raises:
        FileNotFoundError, ValueError: the spec is missing or malformed (before anything runs).
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs={jobs!r} must be an int >= 1")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):
        raise ValueError(f"threads={threads!r} must be an int >= 1")
    checked = load_sweep_spec(spec)
    runs = expand_sweep(checked)
    out = Path(out_dir)
    if str(out).strip() == "":
        raise ValueError("the sweep folder is an empty path; name a folder")
    if out.exists() and not out.is_dir():
        raise ValueError(f"sweep folder {out} exists and is not a directory")
    if not overwrite:
        check_sweep_folder(out, checked)
    out.mkdir(parents=True, exist_ok=True)
    with FolderLock(out, "sweep"):
        check_sweep_folder(out, checked, overwrite)  # again, now that no other sweep can write
        _write_json(out / SWEEP_FILE, checked)
        return _run_all(checked, runs, out, jobs, overwrite, threads, log or (lambda line: None))


def extends(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """Whether the sweep ``new`` only adds to ``old``: the same base, and every variant and size
    of ``old`` unchanged (new variants, sizes and seeds may be added). Finished runs of ``old``
    are then runs of ``new`` too, so they are kept and only the new ones run."""
    if old.get("base") != new.get("base"):
        return False
    for key in ("variants", "sizes"):
        before, after = old.get(key) or {}, new.get(key) or {}
        if (key == "sizes") and bool(before) != bool(after):
            return False
        if any(name not in after or after[name] != over for name, over in before.items()):
            return False
    return True


def check_sweep_folder(out: Path, spec: Mapping[str, Any], overwrite: bool = False) -> None:
    """Raise :class:`~kvshift_lens.run_folder.RunFolderError` when ``out`` holds a sweep that
    ``spec`` does not extend (unless ``overwrite``), or a ``sweep.json`` that cannot be read."""
    path = out / SWEEP_FILE
    if overwrite or not path.is_file():
        return
    try:
        old = load_sweep_spec(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        raise RunFolderError(f"{path} is unreadable ({e}); use another folder, or --overwrite to "
                             "rerun every run from scratch") from None
    if not extends(old, spec):
        raise RunFolderError(
            f"{out} holds a different sweep ({path} differs from this spec in more than added "
            "variants, sizes or seeds), so its finished runs are not runs of this spec; use "
            "another folder, or --overwrite to rerun every run from scratch")


def _run_all(checked: dict[str, Any], runs: list[SweepRun], out: Path, jobs: int, overwrite: bool,
             threads: int | None, log: Callable[[str], None]) -> SweepSummary:
    todo, skipped = [], []
    for run in runs:
        if not overwrite and (out / run.name / FINAL_DIR).is_dir():
            skipped.append(run.name)
        else:
            todo.append({"name": run.name, "run_dir": str(out / run.name), "spec": run.spec,
                         "overwrite": overwrite, "variant": run.variant, "size": run.size,
                         "seed": run.seed})
    if skipped:
        log(f"sweep: {len(skipped)} of {len(runs)} runs already finished, skipped")
    records: list[dict[str, Any]] = []
    progress = _SweepProgress(log, len(todo), jobs, out)

    def done(rec: dict[str, Any]) -> None:
        records.append(rec)
        n = f"[{len(records)}/{len(todo)}]"
        if rec["status"] == "finished":
            acc = rec["final_metrics"].get("accuracy")
            progress.run_done(
                f"{n} {rec['name']}: finished, {rec['steps']} steps, steps_to_target="
                f"{rec['steps_to_target']}, accuracy={_fmt(acc, 4)}, {rec['wall_seconds']:.1f}s")
        else:
            progress.run_done(f"{n} {rec['name']}: FAILED: {rec['error']}")
        if len(records) == len(todo):
            progress.close()  # the bar (if any) goes before the summary is printed

    if jobs == 1 or len(todo) <= 1:
        if threads is not None:
            import torch

            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
        try:
            for job in todo:
                done(_execute(job))
        finally:
            if threads is not None:
                torch.set_num_threads(previous)
    elif todo:
        with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=get_context("spawn"),
                                 initializer=_init_worker, initargs=(threads or 1,)) as pool:
            futures = {pool.submit(_execute, job): job for job in todo}
            try:
                for fut in as_completed(futures):
                    job = futures[fut]
                    try:
                        rec = fut.result()
                    except BrokenProcessPool as e:
                        rec = {"name": job["name"], "status": "failed",
                               "error": f"worker process died ({e})"}
                        _record_crash(job, rec["error"])
                    done(rec)
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    summary = summarize(out)
    summary.ran = [r["name"] for r in records if r["status"] == "finished"]
    summary.failed_now = [r["name"] for r in records if r["status"] != "finished"]
    summary.skipped = skipped
    return summary


def _record_crash(job: dict[str, Any], message: str) -> None:
    run_dir = Path(job["run_dir"])
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_json(run_dir / ERROR_FILE, {"error": message, "type": "BrokenProcessPool",
                                           "variant": job["variant"], "size": job["size"],
                                           "seed": job["seed"]})
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------------------------


@dataclass
class RunRecord:
    """What :func:`summarize` reads from one run folder.

    ``status``: "finished" (``final/`` exists), "failed" (``error.json``), "incomplete" (started,
    not finished: running now or interrupted) or "pending" (named by sweep.json, no folder yet).
    ``steps``: the last step in metrics.jsonl. ``steps_to_target``: the first evaluated step with
    accuracy >= ``target_accuracy``, None when never reached.
    """

    name: str
    variant: str
    size: str | None
    seed: int
    status: str
    steps: int | None = None
    target_accuracy: float | None = None
    steps_to_target: int | None = None
    final_accuracy: float | None = None
    final_loss: float | None = None
    tokens_per_second: float | None = None
    error: str | None = None


@dataclass
class GroupSummary:
    """Statistics over the finished runs of one variant (and size)."""

    variant: str
    size: str | None
    n_runs: int
    seeds: list[int]
    n_failed: int
    n_incomplete: int
    n_pending: int
    target_accuracy: float | None
    steps_to_target: dict[str, Any]
    final_accuracy: dict[str, float | None]
    final_loss: dict[str, float | None]
    tokens_per_second: dict[str, float | None]

    @property
    def label(self) -> str:
        return self.variant if self.size is None else f"{self.variant}__{self.size}"


@dataclass
class SweepSummary:
    """The summary of a sweep folder (see :func:`summarize`). After :func:`run_sweep`, ``ran``,
    ``failed_now`` and ``skipped`` name the runs of that call."""

    out_dir: Path
    groups: list[GroupSummary]
    runs: list[RunRecord]
    ran: list[str] = field(default_factory=list)
    failed_now: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[RunRecord]:
        return [r for r in self.runs if r.status == "failed"]

    def group(self, variant: str, size: str | None = None) -> GroupSummary:
        for g in self.groups:
            if g.variant == variant and g.size == size:
                return g
        raise KeyError(f"no group {run_name(variant, size, 0).rsplit('__', 1)[0]!r} in this sweep")

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "groups": [{**g.__dict__, "label": g.label} for g in self.groups],
            "runs": [r.__dict__ for r in self.runs],
            "failed": [{"name": r.name, "error": r.error} for r in self.failed],
        }

    def to_markdown(self) -> str:
        return _markdown(self)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def read_run(run_dir: Path, variant: str, size: str | None, seed: int) -> RunRecord:
    """Read one run folder (see :class:`RunRecord`)."""
    rec = RunRecord(name=run_dir.name, variant=variant, size=size, seed=seed, status="incomplete")
    spec = _read_json(run_dir / RUN_FILE)
    if isinstance(spec, dict):
        rec.target_accuracy = spec.get("train", {}).get("target_accuracy")
    metrics = read_metrics(run_dir / METRICS_FILE)
    if metrics:
        rec.steps = max(int(m.get("step", 0)) for m in metrics)
    evals = [m for m in metrics if m.get("kind") == "eval"]
    if evals:
        last = evals[-1]
        rec.final_accuracy = last.get("eval/accuracy")
        rec.final_loss = last.get("eval/loss")
        rec.steps_to_target = last.get("steps_to_target")
    result = _read_json(run_dir / RESULT_FILE)
    if isinstance(result, dict):
        rec.tokens_per_second = result.get("tokens_per_second")
    error = _read_json(run_dir / ERROR_FILE)
    if (run_dir / ERROR_FILE).exists():
        rec.status = "failed"
        rec.error = error.get("error") if isinstance(error, dict) else "unreadable error.json"
    elif (run_dir / FINAL_DIR).is_dir():
        rec.status = "finished"
    return rec


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _stats(values: list[float | None]) -> dict[str, float | None]:
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    return {"median": _median(vals), "min": min(vals) if vals else None,
            "max": max(vals) if vals else None}


def steps_to_target_stats(runs: list[RunRecord]) -> dict[str, Any]:
    """Median and range of steps to target over finished runs; runs that never reached the
    target count as "more than their last step" (right-censored).

    ``median``/``min``/``max`` are None where a censored run decides them; ``*_lower_bound`` then
    gives the bound to report as ``>N`` (the median of the values with every censored run at its
    last step is a lower bound of the true median).
    """
    values = [r.steps_to_target for r in runs]
    reached = sorted(v for v in values if v is not None)
    bounds = [r.steps_to_target if r.steps_to_target is not None else (r.steps or 0) for r in runs]
    censored = [r.steps or 0 for r in runs if r.steps_to_target is None]
    out: dict[str, Any] = {"n": len(runs), "n_reached": len(reached), "values": values,
                           "median": None, "min": None, "max": None,
                           "median_lower_bound": None, "min_lower_bound": None,
                           "max_lower_bound": None}
    if not runs:
        return out
    keyed = sorted(math.inf if v is None else v for v in values)
    median = statistics.median(keyed)
    if math.isfinite(median):
        out["median"] = median
    else:
        out["median_lower_bound"] = statistics.median(bounds)
    if reached:
        out["min"] = reached[0]
    else:
        out["min_lower_bound"] = min(censored)
    if not censored:
        out["max"] = reached[-1]
    else:
        out["max_lower_bound"] = max(censored)
    return out


def _group_order(out: Path, records: list[RunRecord]) -> list[tuple[str, str | None]]:
    keys: list[tuple[str, str | None]] = []
    sweep = _read_json(out / SWEEP_FILE)
    if isinstance(sweep, dict) and isinstance(sweep.get("variants"), dict):
        sizes = list(sweep["sizes"]) if isinstance(sweep.get("sizes"), dict) else [None]
        keys = [(v, s) for v in sweep["variants"] for s in sizes]
    for key in sorted({(r.variant, r.size) for r in records}, key=lambda k: (k[0], k[1] or "")):
        if key not in keys:
            keys.append(key)
    return keys


def summarize(out_dir: str | Path, write: bool = True) -> SweepSummary:
    """Rebuild a sweep's summary from its run folders alone (run.json, metrics.jsonl, and
    result.json / error.json where present) and write ``summary.json`` and ``summary.md``.

    Works on a sweep that is still running or was cut short: statistics are over finished runs;
    failed, incomplete and (when ``sweep.json`` names them) pending runs are counted separately.
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"sweep folder {out} does not exist")
    records: list[RunRecord] = []
    for child in sorted(out.iterdir()):
        parsed = parse_run_name(child.name) if child.is_dir() else None
        if parsed is None:
            continue
        if not any((child / f).exists() for f in (RUN_FILE, ERROR_FILE, FINAL_DIR, METRICS_FILE)):
            continue
        records.append(read_run(child, *parsed))
    sweep = _read_json(out / SWEEP_FILE)
    if isinstance(sweep, dict):
        try:
            expected = expand_sweep(load_sweep_spec(sweep))
        except (ValueError, KeyError, TypeError):
            expected = []
        have = {r.name for r in records}
        records += [RunRecord(r.name, r.variant, r.size, r.seed, "pending")
                    for r in expected if r.name not in have]
    order = _group_order(out, records)
    rank = {k: i for i, k in enumerate(order)}
    records.sort(key=lambda r: (rank[(r.variant, r.size)], r.seed))
    groups = []
    for variant, size in order:
        members = [r for r in records if (r.variant, r.size) == (variant, size)]
        if not members:
            continue
        finished = [r for r in members if r.status == "finished"]
        targets = sorted({r.target_accuracy for r in finished if r.target_accuracy is not None})
        groups.append(GroupSummary(
            variant=variant, size=size, n_runs=len(finished), seeds=[r.seed for r in finished],
            n_failed=sum(r.status == "failed" for r in members),
            n_incomplete=sum(r.status == "incomplete" for r in members),
            n_pending=sum(r.status == "pending" for r in members),
            target_accuracy=targets[0] if len(targets) == 1 else None,
            steps_to_target=steps_to_target_stats(finished),
            final_accuracy=_stats([r.final_accuracy for r in finished]),
            final_loss=_stats([r.final_loss for r in finished]),
            tokens_per_second=_stats([r.tokens_per_second for r in finished]),
        ))
    summary = SweepSummary(out_dir=out, groups=groups, runs=records)
    if write:
        _write_json(out / SUMMARY_JSON, summary.to_dict())
        atomic_write_text(out / SUMMARY_MD, summary.to_markdown())
    return summary


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}f}"


def _fmt_steps(x: float | None) -> str:
    return "-" if x is None else f"{x:g}"


def _steps_cell(st: dict[str, Any], key: str) -> str:
    if st[key] is not None:
        return _fmt_steps(st[key])
    bound = st[f"{key}_lower_bound"]
    return f">{_fmt_steps(bound)}" if bound is not None else "-"


def _markdown(summary: SweepSummary) -> str:
    has_sizes = any(g.size is not None for g in summary.groups)
    head = ["variant", *(["size"] if has_sizes else []), "runs", "target acc",
            "steps to target (median)", "steps (min – max)", "reached", "final acc (median)",
            "final acc (min – max)", "final loss (median)", "tokens/s (median)", "not finished"]
    lines = [f"# Sweep summary: {summary.out_dir}", "",
             "Steps to target: the first evaluated step whose eval accuracy reaches the target "
             "accuracy. `>N`: some runs never reached it, so only a lower bound is known.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in summary.groups:
        st = g.steps_to_target
        fa, fl, tp = g.final_accuracy, g.final_loss, g.tokens_per_second
        not_done = ", ".join(f"{n} {what}" for n, what in ((g.n_failed, "failed"),
                                                             (g.n_incomplete, "incomplete"),
                                                             (g.n_pending, "pending")) if n)
        row = [g.variant, *([g.size or "-"] if has_sizes else []), str(g.n_runs),
               _fmt(g.target_accuracy, 2), _steps_cell(st, "median"),
               f"{_steps_cell(st, 'min')} – {_steps_cell(st, 'max')}" if g.n_runs else "-",
               f"{st['n_reached']}/{st['n']}",
               _fmt(fa["median"], 4), f"{_fmt(fa['min'], 4)} – {_fmt(fa['max'], 4)}" if g.n_runs else "-",
               _fmt(fl["median"], 4),
               f"{tp['median']:,.0f}" if tp["median"] is not None else "-",
               not_done or "-"]
        lines.append("| " + " | ".join(row) + " |")
    if summary.failed:
        lines += ["", "## Failed runs", ""]
        lines += [f"- `{r.name}`: {(r.error or '').splitlines()[0] if r.error else '?'}"
                  for r in summary.failed]
    return "\n".join(lines) + "\n"


__all__ = ["GroupSummary", "RunRecord", "SweepRun", "SweepSummary", "check_sweep_folder",
           "deep_merge", "expand_sweep", "extends", "load_sweep_spec", "parse_run_name",
           "run_name", "run_sweep",
           "steps_to_target_stats", "summarize", "write_result"]
