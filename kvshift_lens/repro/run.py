"""Run the reproduction sweeps: ``OUT/<experiment>/`` per experiment, each an ordinary sweep."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from kvshift_lens._files import atomic_write_text
from kvshift_lens.repro.experiments import EXPERIMENTS, experiment
from kvshift_lens.run_folder import REPRO_MARKER, SWEEP_FILE, RunFolderError
from kvshift_lens.train.sweep import (
    SweepSummary,
    check_sweep_folder,
    extends,
    load_sweep_spec,
    run_sweep,
)

MARKER = REPRO_MARKER
"""Written in each experiment folder: which experiment, quick or full (so a later run or report
cannot silently mix a smoke test with the real thing)."""


def check_names(names: Sequence[str] | None) -> list[str]:
    """The experiments to run, in their canonical order; ValueError naming an unknown one."""
    if not names:
        return list(EXPERIMENTS)
    for name in names:
        experiment(name)
    return [n for n in EXPERIMENTS if n in set(names)]


def _check_folder(folder: Path, name: str, quick: bool, spec: dict) -> None:
    marker = folder / MARKER
    if marker.is_file():
        try:
            doc = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            doc = {}
        if doc.get("quick") != quick:
            have = "quick" if doc.get("quick") else "full"
            raise ValueError(
                f"{folder} holds a {have} run of {name!r} but this is a "
                f"{'quick' if quick else 'full'} one; use another --out or --overwrite")
    try:
        check_sweep_folder(folder, load_sweep_spec(spec))
    except RunFolderError:
        raise ValueError(
            f"{folder / SWEEP_FILE} differs from the current {name!r} spec (the experiment changed "
            "since it ran); use another --out, or --overwrite to rerun it") from None


def run_experiments(
    out: str | Path,
    names: Sequence[str] | None = None,
    quick: bool = False,
    jobs: int = 1,
    threads: int | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, SweepSummary]:
    """Run (or finish: finished runs are skipped, interrupted ones resumed) the named experiments
    (default: all) into ``out/<name>/``; returns each sweep's summary.

    Raises:
        ValueError: an unknown experiment, or a folder that holds a different (quick vs full, or
            changed) sweep and ``overwrite`` is False. Checked for every experiment before
            anything runs.
    """
    out = Path(out)
    names = check_names(names)
    specs = {name: EXPERIMENTS[name].spec(quick) for name in names}
    if not overwrite:
        for name in names:
            _check_folder(out / name, name, quick, specs[name])
    log = log or (lambda line: None)
    summaries = {}
    for name in names:
        folder = out / name
        t0 = time.perf_counter()
        log(f"repro: {name} -> {folder}")
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / MARKER, json.dumps({"experiment": name, "quick": quick}) + "\n")
        summaries[name] = run_sweep(specs[name], folder, jobs=jobs, threads=threads,
                                    overwrite=overwrite, log=log)
        log(f"repro: {name} done in {time.perf_counter() - t0:.0f}s")
    return summaries


__all__ = ["MARKER", "check_names", "extends", "run_experiments"]
