"""The sweep runner: variants x seeds x sizes, parallel workers, skip-if-finished, failures recorded
without stopping the others, and a summary rebuilt from the run folders alone."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest

from kvshift_lens.train.sweep import (
    RunRecord,
    deep_merge,
    expand_sweep,
    load_sweep_spec,
    parse_run_name,
    run_sweep,
    steps_to_target_stats,
    summarize,
)

BASE = {
    "model": {"d_model": 16, "d_head": 4, "n_layers": 1, "attn_only": True},
    "task": {"name": "induction", "d_vocab": 8, "seq_len": 16},
    "train": {"steps": 8, "batch_size": 16, "eval_every": 2, "eval_batches": 2, "device": "cpu",
              "warmup_steps": 1, "lr": 0.03, "target_accuracy": 0.15, "log_every": 2},
}
VARIANTS = {"kv": {}, "vanilla": {"model": {"shift_k": False, "shift_v": False}}}


def _evals(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "eval"]


def _mtimes(run_dir: Path) -> dict[str, int]:
    files = ["run.json", "metrics.jsonl", "result.json", "final/model.safetensors",
             "final/config.json"]
    return {f: (run_dir / f).stat().st_mtime_ns for f in files}


def test_sweep_runs_in_parallel_summarizes_and_skips_finished_runs(tmp_path):
    spec = {"base": BASE, "variants": VARIANTS, "seeds": [0, 1]}
    summary = run_sweep(spec, tmp_path, jobs=2, log=None)

    names = ["kv__seed0", "kv__seed1", "vanilla__seed0", "vanilla__seed1"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == names
    for name in names:
        assert (tmp_path / name / "final" / "config.json").is_file()
        run = json.loads((tmp_path / name / "run.json").read_text())
        assert run["train"]["seed"] == int(name[-1])
        assert run["model"].get("shift_k", True) is (not name.startswith("vanilla"))
    assert sorted(summary.ran) == names and summary.failed == [] and summary.skipped == []

    on_disk = json.loads((tmp_path / "summary.json").read_text())
    markdown = (tmp_path / "summary.md").read_text()
    for variant in VARIANTS:
        group = summary.group(variant)
        evals = {seed: _evals(tmp_path / f"{variant}__seed{seed}") for seed in (0, 1)}
        final_acc = [e[-1]["eval/accuracy"] for e in evals.values()]
        final_loss = [e[-1]["eval/loss"] for e in evals.values()]
        to_target = [e[-1]["steps_to_target"] for e in evals.values()]
        # steps_to_target recomputed from the eval records themselves
        for e, got in zip(evals.values(), to_target):
            first = next((r["step"] for r in e if r["eval/accuracy"] >= 0.15), None)
            assert got == first
        assert group.n_runs == 2 and group.seeds == [0, 1]
        assert group.final_accuracy["median"] == pytest.approx(statistics.median(final_acc))
        assert group.final_accuracy["min"] == min(final_acc)
        assert group.final_accuracy["max"] == max(final_acc)
        assert group.final_loss["median"] == pytest.approx(statistics.median(final_loss))
        st = group.steps_to_target
        assert st["values"] == to_target
        if None not in to_target:
            assert st["median"] == statistics.median(to_target)
            assert (st["min"], st["max"]) == (min(to_target), max(to_target))
        else:  # censored at the last step (8): only a lower bound is known
            assert st["median"] is None
            assert st["median_lower_bound"] == statistics.median(
                [8 if v is None else v for v in to_target])
        tps = [json.loads((tmp_path / f"{variant}__seed{s}" / "result.json").read_text())
               ["tokens_per_second"] for s in (0, 1)]
        assert group.tokens_per_second["median"] == pytest.approx(statistics.median(tps))
        assert all(t > 0 for t in tps)
        (stored,) = [g for g in on_disk["groups"] if g["variant"] == variant]
        assert stored["final_accuracy"]["median"] == group.final_accuracy["median"]
        assert f"| {variant} | 2 |" in markdown

    # summarize() alone rebuilds the same numbers from the folders
    again = summarize(tmp_path, write=False)
    assert again.to_dict()["groups"] == summary.to_dict()["groups"]

    # a rerun skips every finished run and touches none of its files
    before = {n: _mtimes(tmp_path / n) for n in names}
    rerun = run_sweep(spec, tmp_path, jobs=2, log=None)
    assert sorted(rerun.skipped) == names and rerun.ran == []
    assert {n: _mtimes(tmp_path / n) for n in names} == before


def test_failing_variant_is_recorded_and_the_others_finish(tmp_path):
    spec = {"base": BASE,
            "variants": {"bad": {"model": {"n_layers": 0}}, "good": {},
                         "bad_task": {"task": {"min_length": 99}}},
            "sizes": {"d8": {"model": {"d_model": 8}}},
            "seeds": [0]}
    lines: list[str] = []
    summary = run_sweep(spec, tmp_path, jobs=1, log=lines.append)
    assert (tmp_path / "good__d8__seed0" / "final").is_dir()
    assert sorted(r.name for r in summary.failed) == ["bad__d8__seed0", "bad_task__d8__seed0"]
    error = json.loads((tmp_path / "bad__d8__seed0" / "error.json").read_text())
    assert "n_layers=0" in error["error"] and error["variant"] == "bad" and error["size"] == "d8"
    assert "min_length" in json.loads((tmp_path / "bad_task__d8__seed0" / "error.json")
                                      .read_text())["error"]
    assert summary.group("bad", "d8").n_failed == 1 and summary.group("bad", "d8").n_runs == 0
    assert summary.group("good", "d8").n_runs == 1
    assert any("FAILED" in line and "bad__d8__seed0" in line for line in lines)
    md = (tmp_path / "summary.md").read_text()
    assert "## Failed runs" in md and "n_layers=0" in md and "| good | d8 | 1 |" in md
    run = json.loads((tmp_path / "good__d8__seed0" / "run.json").read_text())
    assert run["model"]["d_model"] == 8 and run["model"]["n_ctx"] == 16

    # a partially finished sweep: an interrupted run, a run not started, a stray folder
    shutil.rmtree(tmp_path / "good__d8__seed0" / "final")
    (tmp_path / "notes").mkdir()
    sweep_json = json.loads((tmp_path / "sweep.json").read_text())
    sweep_json["seeds"] = [0, 1]
    (tmp_path / "sweep.json").write_text(json.dumps(sweep_json))
    partial = summarize(tmp_path)
    good = partial.group("good", "d8")
    assert (good.n_runs, good.n_incomplete, good.n_pending) == (0, 1, 1)
    assert good.final_accuracy["median"] is None
    assert {r.name: r.status for r in partial.runs}["good__d8__seed1"] == "pending"
    assert "1 incomplete, 1 pending" in (tmp_path / "summary.md").read_text()


def test_spec_expansion_and_names():
    spec = load_sweep_spec({"base": BASE, "variants": VARIANTS, "seeds": [3, 1],
                            "sizes": {"d16": {}, "d32": {"model": {"d_model": 32}}}})
    runs = expand_sweep(spec)
    assert [r.name for r in runs][:3] == ["kv__d16__seed3", "kv__d16__seed1", "kv__d32__seed3"]
    assert len(runs) == 8
    r = next(r for r in runs if r.name == "vanilla__d32__seed1")
    assert r.spec["model"] == {**BASE["model"], "d_model": 32, "shift_k": False, "shift_v": False}
    assert r.spec["train"]["seed"] == 1 and r.spec["train"]["progress"] is False
    assert r.spec["task"] == BASE["task"] and BASE["train"].get("seed") is None  # no mutation
    assert parse_run_name("vanilla__d32__seed1") == ("vanilla", "d32", 1)
    assert parse_run_name("kv_1L__seed0") == ("kv_1L", None, 0)
    assert parse_run_name("summary") is None and parse_run_name("a__b__c__seed0") is None
    assert deep_merge({"a": {"b": 1, "c": [1]}}, {"a": {"c": [2]}}) == {"a": {"b": 1, "c": [2]}}


@pytest.mark.parametrize("spec, match", [
    ({"base": BASE}, "'variants' must be a non-empty dict"),
    ({"base": BASE, "variants": {"a__b": {}}}, "'a__b'"),
    ({"base": BASE, "variants": {"a": {"modle": {}}}}, r"unknown section\(s\) \['modle'\]"),
    ({"base": BASE, "variants": VARIANTS, "seeds": [0, 0]}, r"distinct ints >= 0, got \[0, 0\]"),
    ({"base": BASE, "variants": VARIANTS, "seed": [0]}, r"unknown sweep spec key\(s\) \['seed'\]"),
])
def test_bad_sweep_specs_fail_before_running(tmp_path, spec, match):
    with pytest.raises(ValueError, match=match):
        run_sweep(spec, tmp_path / "out", log=None)
    assert not (tmp_path / "out").exists()


def test_steps_to_target_censoring():
    def rec(stt, steps):
        return RunRecord("x", "v", None, 0, "finished", steps=steps, steps_to_target=stt)

    st = steps_to_target_stats([rec(4, 10), rec(None, 10), rec(6, 10)])
    assert (st["median"], st["min"], st["max"], st["max_lower_bound"]) == (6, 4, None, 10)
    st = steps_to_target_stats([rec(None, 10), rec(None, 12), rec(4, 12)])
    assert st["median"] is None and st["median_lower_bound"] == 10 and st["n_reached"] == 1
    st = steps_to_target_stats([rec(2, 8), rec(4, 8)])
    assert (st["median"], st["min"], st["max"]) == (3, 2, 4)
