"""The reproduction pipeline end to end in quick mode: every experiment trains (a few steps),
the report analyses every section from the run folders, and the runner refuses to mix a quick
set with a full one. Also the experiment specs themselves and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvshift_lens.cli import main
from kvshift_lens.repro import EXPERIMENTS, run_experiments
from kvshift_lens.repro.report import NOT_RUN, SECTIONS, build_report
from kvshift_lens.train import resolve_run_spec
from kvshift_lens.train.sweep import expand_sweep, load_sweep_spec
from kvshift_lens.train.tasks import build_tasks


@pytest.mark.parametrize("quick", [False, True])
def test_every_spec_is_a_valid_sweep(quick: bool, monkeypatch) -> None:
    # Each distinct task is built once (text corpora and tokenizers take seconds to build).
    built: dict[str, tuple] = {}

    def cached(spec):
        key = json.dumps(spec, sort_keys=True)
        if key not in built:
            built[key] = build_tasks(spec)
        return built[key]

    monkeypatch.setattr("kvshift_lens.train.tasks.build_tasks", cached)
    for name, exp in EXPERIMENTS.items():
        runs = expand_sweep(load_sweep_spec(exp.spec(quick)))
        assert runs, name
        for run in runs:
            resolve_run_spec(run.spec)  # raises on any bad value
        if quick:
            assert all(r.spec["train"]["steps"] <= 6 for r in runs), name
            assert {r.seed for r in runs} == {0}, name


def test_full_specs_cover_the_issue() -> None:
    depth = EXPERIMENTS["depth"].spec()
    assert len(depth["seeds"]) >= 5 and set(depth["variants"]) == {
        "kvshift_1L", "vanilla_1L", "vanilla_2L"}
    assert len(EXPERIMENTS["ngram"].spec()["sizes"]) == 3
    hops = {s["task"]["hops"] for s in EXPERIMENTS["multihop"].spec()["sizes"].values()}
    depths = {v["model"]["n_layers"] for v in EXPERIMENTS["multihop"].spec()["variants"].values()}
    assert hops == {1, 2, 3} and depths == {1, 2, 3}
    ablation = EXPERIMENTS["ablation"].spec()["variants"]
    assert {"k_only", "v_only", "kv", "convex", "window2", "window4"} <= set(ablation)
    assert len(EXPERIMENTS["text"].spec()["sizes"]) >= 2


def test_quick_pipeline_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "repro"
    summaries = run_experiments(out, quick=True, jobs=1)
    assert set(summaries) == set(EXPERIMENTS)
    for name, summary in summaries.items():
        assert not summary.failed, (name, [r.error for r in summary.failed])
    md = tmp_path / "REPRODUCTION.md"
    result = build_report(out, md, None, static=False, landscape_grid=5)
    assert [s.name for s in result.sections] == list(SECTIONS)
    assert all(s.verdict != NOT_RUN for s in result.sections), [
        (s.name, s.reason) for s in result.sections]
    text = md.read_text()
    assert "Quick mode" in text and text.count("**Verdict:") == len(SECTIONS)
    assert f"kvshift repro run depth --out {out} --jobs 2 --quick" in text
    # text runs log the in-context-learning score with every evaluation
    evals = [json.loads(x) for x in
             (out / "text" / "kvshift__d32__seed0" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/icl_score" in e for e in evals)
    # a full run into the quick folder is refused before anything runs
    with pytest.raises(ValueError, match="holds a quick run of 'depth'"):
        run_experiments(out, ["depth"], quick=False)
    # running the quick set again skips every finished run
    again = run_experiments(out, ["depth"], quick=True)
    assert again["depth"].ran == [] and len(again["depth"].skipped) == 3


def test_changed_spec_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "ablation"
    folder.mkdir()
    spec = EXPERIMENTS["ablation"].spec(quick=True)
    spec["variants"]["kv"]["model"]["shift_window"] = 3
    (folder / "sweep.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="differs from the current 'ablation' spec"):
        run_experiments(tmp_path, ["ablation"], quick=True)


def test_cli_repro(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["repro", "spec", "depth"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert spec == EXPERIMENTS["depth"].spec()
    assert main(["repro", "spec", "nope"]) == 2
    assert "unknown experiment 'nope'" in capsys.readouterr().err
    assert main(["repro", "run", "bogus", "--out", str(tmp_path)]) == 2
    assert "choose from" in capsys.readouterr().err
    assert main(["repro", "report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["repro", "report", str(tmp_path), "--markdown", "x.txt"]) == 2
    assert "must name a .md file" in capsys.readouterr().err
    assert main(["repro", "run", "--jobs", "0"]) == 2


def test_an_experiment_may_grow_but_not_change() -> None:
    from kvshift_lens.train.sweep import extends

    old = load_sweep_spec(EXPERIMENTS["width"].spec())
    grown = json.loads(json.dumps(old))
    grown["sizes"]["d256"] = {"model": {"d_model": 256, "d_head": 64}}
    grown["seeds"] = [*old["seeds"], 9]
    assert extends(old, grown) and extends(old, old)
    assert not extends(grown, old)  # a size removed
    changed = json.loads(json.dumps(old))
    changed["sizes"]["d8"]["model"]["d_head"] = 2
    assert not extends(old, changed)
    rebased = json.loads(json.dumps(old))
    rebased["base"]["train"]["lr"] = 3e-3
    assert not extends(old, rebased)


def test_cli_repro_run_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r"
    assert main(["repro", "run", "ablation", "--quick", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ablation: 10 runs finished" in printed and f"kvshift repro report {out}" in printed
    md = tmp_path / "R.md"
    assert main(["repro", "report", str(out), "--markdown", str(md), "--no-static",
                 "--landscape-grid", "5"]) == 0
    printed = capsys.readouterr().out
    assert f"report: {md}" in printed and "figures: 0 written" in printed
    lines = {line.split()[0]: line for line in printed.splitlines() if line[:1].isalpha()}
    assert "not run" in lines["depth"] and "not run" not in lines["ablation"]
    assert "## 6. Ablations" in md.read_text()
    # the quick folder refuses a full run, with one line naming the folder
    assert main(["repro", "run", "ablation", "--out", str(out)]) == 2
    assert "holds a quick run of 'ablation'" in capsys.readouterr().err
