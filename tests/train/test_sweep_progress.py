"""Where a sweep's lines go: a caller's log gets exactly the per-run lines; the default log writes
them to stdout in a notebook kernel (with a start line), above a bar on a terminal, and only them
(no bar, no start line) when stderr is a file or a pipe."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from kvshift_lens.train import sweep
from kvshift_lens.train.sweep import _SweepProgress, progress_log, run_sweep

LINES = ["[1/2] a__seed0: finished, 8 steps", "[2/2] b__seed0: FAILED: boom"]


def _feed(progress: _SweepProgress) -> None:
    for line in LINES:
        progress.run_done(line)
    progress.close()


def test_a_callers_log_gets_the_run_lines_only():
    got: list[str] = []
    _feed(_SweepProgress(got.append, total=2, jobs=2, out=Path("s")))
    assert got == LINES


def test_not_on_a_terminal_only_run_lines_on_stderr(monkeypatch, capsys):
    monkeypatch.setattr(sweep, "_in_notebook", lambda: False)
    monkeypatch.setattr(sweep.sys.stderr, "isatty", lambda: False, raising=False)
    _feed(_SweepProgress(progress_log, total=2, jobs=1, out=Path("s")))
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == LINES  # no bar, no start line


def test_in_a_notebook_lines_go_to_stdout_after_a_start_line(monkeypatch, capsys):
    monkeypatch.setattr(sweep, "_in_notebook", lambda: True)
    _feed(_SweepProgress(progress_log, total=2, jobs=4, out=Path("runs/s")))
    out, err = capsys.readouterr()
    assert err == ""
    first, *rest = out.splitlines()
    assert first.startswith("sweep: training 2 runs in runs/s, 2 at a time") and rest == LINES


def test_on_a_terminal_a_bar_over_the_runs_with_the_lines_above_it(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    monkeypatch.setattr(sweep, "_in_notebook", lambda: False)
    monkeypatch.setattr(sweep.sys, "stderr", tty)
    progress = _SweepProgress(progress_log, total=2, jobs=1, out=Path("runs/s"))
    assert progress.bar is not None and progress.bar.total == 2
    _feed(progress)
    text = tty.getvalue()
    for line in LINES:
        assert line in text
    assert "2/2" in text and "sweep s" in text  # the bar's last state: both runs done


@pytest.mark.parametrize("in_notebook", [False, True])
def test_nothing_to_run_says_nothing_but_the_skip(monkeypatch, capsys, tmp_path, in_notebook):
    monkeypatch.setattr(sweep, "_in_notebook", lambda: in_notebook)
    spec = {"base": {"model": {"d_model": 8, "d_head": 4, "n_layers": 1, "attn_only": True},
                     "task": {"name": "induction", "d_vocab": 8, "seq_len": 8},
                     "train": {"steps": 2, "batch_size": 4, "eval_every": 2, "eval_batches": 1,
                               "device": "cpu"}},
            "variants": {"kv": {}}}
    run_sweep(spec, tmp_path, log=None)  # trains the one run
    capsys.readouterr()
    run_sweep(spec, tmp_path)  # default log: everything finished already
    out, err = capsys.readouterr()
    said = (out if in_notebook else err).splitlines()
    assert said == ["sweep: 1 of 1 runs already finished, skipped"]
