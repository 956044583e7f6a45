"""The reproduction report's analysis on hand-made run folders whose answers are known, and its
markdown (notes kept, quick/full never mixed)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kvshift_lens.repro.report import (
    NOT_REPRODUCED,
    NOT_RUN,
    PARTLY,
    REPRODUCED,
    build_report,
    existing_notes,
    load_sweep,
    steps_to_target,
)
from kvshift_lens.repro.run import MARKER
from kvshift_lens.train.sweep import RunRecord


def fake_run(folder: Path, name: str, accuracies: list[float], every: int = 25,
             target: float = 0.9, task: dict | None = None, extra: dict | None = None,
             finished: bool = True) -> None:
    """A run folder as the trainer writes it: run.json, eval records every ``every`` steps
    (``steps_to_target`` as the trainer computes it) and final/ when ``finished``."""
    run = folder / name
    run.mkdir(parents=True)
    spec = {"model": {}, "task": task or {"name": "induction", "d_vocab": 64, "seq_len": 64},
            "train": {"target_accuracy": target, "steps": every * (len(accuracies) - 1),
                      "batch_size": 64}}
    (run / "run.json").write_text(json.dumps(spec))
    reached = None
    lines = []
    for i, acc in enumerate(accuracies):
        step = i * every
        if reached is None and acc >= target:
            reached = step
        rec = {"step": step, "kind": "eval", "eval/accuracy": acc, "eval/loss": 1.0 - acc,
               "steps_to_target": reached, **{k: v[i] for k, v in (extra or {}).items()}}
        lines.append(json.dumps(rec))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if finished:
        (run / "final").mkdir()


def mark(folder: Path, quick: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text(json.dumps({"quick": quick}))


def ramp(reach_at: int, n: int = 40, every: int = 25) -> list[float]:
    """Accuracy 0.1 until step ``reach_at``, 0.95 from there on."""
    return [0.95 if i * every >= reach_at else 0.1 for i in range(n)]


def depth_folder(root: Path, kv_at: int, v2_at: int | None, v1_best: float) -> None:
    folder = root / "depth"
    mark(folder)
    for seed in range(3):
        fake_run(folder, f"kvshift_1L__seed{seed}", ramp(kv_at + 25 * seed))
        fake_run(folder, f"vanilla_1L__seed{seed}", [0.05] * 39 + [v1_best])
        fake_run(folder, f"vanilla_2L__seed{seed}",
                 ramp(v2_at + 25 * seed) if v2_at is not None else [0.3] * 40)


def section(root: Path, name: str):
    result = build_report(root, markdown=None, figures_dir=None, names=[name], static=False)
    (sec,) = result.sections
    return sec


def test_depth_verdicts_follow_the_rule(tmp_path: Path) -> None:
    depth_folder(tmp_path / "a", kv_at=175, v2_at=650, v1_best=0.12)
    sec = section(tmp_path / "a", "depth")
    assert sec.verdict == REPRODUCED
    # medians of (175, 200, 225) and (650, 675, 700)
    assert sec.numbers["kvshift_1L"]["steps_to_target_median"] == 200
    assert sec.numbers["vanilla_2L"]["steps_to_target_median"] == 675
    assert "3.4x later" in sec.reason
    # vanilla 2L faster than KV-shift: only partly
    depth_folder(tmp_path / "b", kv_at=500, v2_at=200, v1_best=0.12)
    assert section(tmp_path / "b", "depth").verdict == PARTLY
    # vanilla 1L learns it too: the claim fails
    depth_folder(tmp_path / "c", kv_at=175, v2_at=650, v1_best=0.95)
    assert section(tmp_path / "c", "depth").verdict == NOT_REPRODUCED
    # nothing there: not run, not a crash
    (tmp_path / "empty").mkdir()
    assert section(tmp_path / "empty", "depth").verdict == NOT_RUN


def test_width_smallest_width_decides(tmp_path: Path) -> None:
    folder = tmp_path / "width"
    mark(folder)
    final = {("kvshift_1L", "d16"): 0.95, ("kvshift_1L", "d32"): 0.99,
             ("vanilla_2L", "d16"): 0.4, ("vanilla_2L", "d32"): 0.93}
    for (v, s), acc in final.items():
        for seed in range(2):
            fake_run(folder, f"{v}__{s}__seed{seed}", [0.1, acc - 0.01 * seed])
    sec = section(tmp_path, "width")
    assert sec.verdict == REPRODUCED
    assert sec.numbers["smallest"] == {"kvshift_1L": "d16", "vanilla_2L": "d32"}


def test_ngram_within_seed_spread(tmp_path: Path) -> None:
    from kvshift_lens.data.tasks import make_task

    task = {"name": "ngram", "d_vocab": 16, "seq_len": 32, "support": 2}
    ceiling = make_task("ngram", d_vocab=16, seq_len=32, support=2).max_accuracy
    folder = tmp_path / "ngram"
    mark(folder)
    accs = {("vanilla", "small"): [0.50, 0.52], ("kvshift", "small"): [0.51, 0.53],
            ("vanilla", "big"): [0.70, 0.70], ("kvshift", "big"): [0.60, 0.60]}
    for (v, s), values in accs.items():
        for seed, a in enumerate(values):
            fake_run(folder, f"{v}__{s}__seed{seed}", [0.1, a], task=task, target=0.7)
    sec = section(tmp_path, "ngram")
    assert sec.numbers["ceiling"] == pytest.approx(ceiling)
    assert sec.numbers["relative_accuracy"]["kvshift"]["small"] == pytest.approx(
        [0.51 / ceiling, 0.53 / ceiling])
    assert sec.verdict == PARTLY  # the same at "small", apart at "big"
    assert "big" in sec.reason and "small" in sec.reason


def test_ablation_keys_only_as_fast_is_partly(tmp_path: Path) -> None:
    folder = tmp_path / "ablation"
    mark(folder)
    for seed in range(3):
        fake_run(folder, f"kv__seed{seed}", ramp(200))
        fake_run(folder, f"k_only__seed{seed}", ramp(175))
        fake_run(folder, f"v_only__seed{seed}", [0.1] * 41)
    sec = section(tmp_path, "ablation")
    assert sec.verdict == PARTLY
    assert sec.numbers["v_only"]["steps_to_target_median"] is None
    assert sec.numbers["k_only"]["steps_to_target_median"] == 175
    assert sec.reason.startswith("values only loses the gain, but keys only learns")


def test_text_needs_lower_loss_beyond_the_spread(tmp_path: Path) -> None:
    folder = tmp_path / "text"
    mark(folder)
    task = {"name": "text"}
    losses = {"vanilla": [1.50, 1.52], "kvshift": [1.30, 1.31]}
    for v, values in losses.items():
        for seed, loss in enumerate(values):
            run = f"{v}__d64__seed{seed}"
            fake_run(folder, run, [0.2, 0.3], task=task,
                     extra={"eval/icl_score": [0.0, -0.1]})
            # the analysis reads eval/loss: rewrite the records with the wanted final loss
            recs = [json.loads(x) for x in (folder / run / "metrics.jsonl").read_text().splitlines()]
            recs[-1]["eval/loss"] = loss
            (folder / run / "metrics.jsonl").write_text(
                "\n".join(json.dumps(r) for r in recs) + "\n")
    sec = section(tmp_path, "text")
    assert sec.verdict == REPRODUCED
    assert sec.numbers["d64"]["loss"]["kvshift"] == [1.30, 1.31]
    assert "-0.205" in sec.reason  # median 1.305 - 1.51


def test_steps_to_target_counts_runs_that_never_arrive() -> None:
    def rec(s: int | None, steps: int = 1000) -> RunRecord:
        return RunRecord("x", "v", None, 0, "finished", steps=steps, steps_to_target=s)

    m, cell, n = steps_to_target([rec(100), rec(300), rec(None)])
    assert (m, n) == (300, 2) and cell == "300 (100 – >1000)"
    m, cell, n = steps_to_target([rec(100), rec(None), rec(None)])
    assert m is None and n == 1 and cell.startswith("never")
    assert steps_to_target([]) == (None, "-", 0)


def test_unfinished_runs_are_counted_not_analysed(tmp_path: Path) -> None:
    depth_folder(tmp_path, kv_at=175, v2_at=650, v1_best=0.1)
    fake_run(tmp_path / "depth", "kvshift_1L__seed7", ramp(25), finished=False)
    sweep = load_sweep(tmp_path, "depth")
    assert len(sweep.finished) == 9 and sweep.not_finished() == 1
    sec = section(tmp_path, "depth")
    assert sec.numbers["kvshift_1L"]["runs"] == 3
    assert "1 not finished" in sec.runs


def test_markdown_keeps_notes_and_refuses_mixed_modes(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    depth_folder(root, kv_at=175, v2_at=650, v1_best=0.1)
    md = tmp_path / "REPRODUCTION.md"
    build_report(root, md, None, names=["depth", "width"], static=False)
    text = md.read_text()
    assert "**Verdict: reproduced.**" in text and "**Verdict: not run.**" in text
    assert "Quick mode" not in text
    assert "<!-- notes:depth -->" in text
    text = text.replace("<!-- notes:depth -->\n", "<!-- notes:depth -->\nMy reading: fine.\n\n"
                        "Second paragraph.\n")
    md.write_text(text)
    build_report(root, md, None, names=["depth", "width"], static=False)
    again = md.read_text()
    assert existing_notes(md)["depth"] == "My reading: fine.\n\nSecond paragraph.\n"
    assert again.count("My reading: fine.") == 1
    build_report(root, md, None, names=["depth", "width"], static=False)
    assert md.read_text() == again  # regeneration is idempotent
    mark(root / "width", quick=True)
    with pytest.raises(ValueError, match="mixes quick and full"):
        build_report(root, md, None, names=["depth", "width"], static=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_report(tmp_path / "nope", md, None)
    with pytest.raises(ValueError, match="unknown report section 'bogus'"):
        build_report(root, md, None, names=["bogus"])


def test_fmt_helpers_ignore_missing_values() -> None:
    from kvshift_lens.repro.report import fmt_stats, med, spread

    assert fmt_stats([0.5, None, 0.7, math.nan, 0.6]) == "0.600 (0.500 – 0.700)"
    assert fmt_stats([]) == "-" and med([None]) is None and spread([]) == 0.0


def test_multihop_cells_compare_kvshift_with_vanilla(tmp_path: Path) -> None:
    folder = tmp_path / "multihop"
    mark(folder)
    task = {"name": "multi_hop", "d_vocab": 32, "seq_len": 32}
    final = {("vanilla", 1, "hop1"): 0.95, ("kvshift", 1, "hop1"): 0.96,   # same
             ("vanilla", 1, "hop2"): 0.20, ("kvshift", 1, "hop2"): 0.60,   # better
             ("vanilla", 2, "hop1"): 0.97, ("kvshift", 2, "hop1"): 0.97,
             ("vanilla", 2, "hop2"): 0.50, ("kvshift", 2, "hop2"): 0.52}
    for (kind, depth, hop), acc in final.items():
        for seed in range(2):
            fake_run(folder, f"{kind}_{depth}L__{hop}__seed{seed}", [0.0, acc], task=task)
    sec = section(tmp_path, "multihop")
    assert sec.verdict == REPRODUCED and sec.numbers["better"] == ["hop2/1L"]
    assert sec.numbers["worse"] == []
    # make KV-shift worse in one cell: mixed
    run = folder / "kvshift_2L__hop1__seed0"
    for seed in range(2):
        run = folder / f"kvshift_2L__hop1__seed{seed}"
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        recs[-1]["eval/accuracy"] = 0.5
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    sec = section(tmp_path, "multihop")
    assert sec.verdict == PARTLY and sec.numbers["worse"] == ["hop1/2L"]


def test_half_finished_sweeps_are_not_judged(tmp_path: Path) -> None:
    """A verdict needs every group it compares: until then the section says "not run"."""
    folder = tmp_path / "ngram"
    mark(folder)
    task = {"name": "ngram", "d_vocab": 16, "seq_len": 32, "support": 2}
    fake_run(folder, "vanilla__1K__seed0", [0.1, 0.5], task=task)
    assert section(tmp_path, "ngram").verdict == NOT_RUN
    folder = tmp_path / "width"
    mark(folder)
    fake_run(folder, "kvshift_1L__d16__seed0", [0.1, 0.95])
    sec = section(tmp_path, "width")
    assert sec.verdict == NOT_RUN and "vanilla_2L__d16" in sec.reason
    folder = tmp_path / "ablation"
    mark(folder)
    fake_run(folder, "kv__seed0", ramp(100))
    assert section(tmp_path, "ablation").verdict == NOT_RUN
    folder = tmp_path / "text"
    mark(folder)
    fake_run(folder, "kvshift__d64__seed0", [0.1, 0.2], task={"name": "text"})
    assert section(tmp_path, "text").verdict == NOT_RUN


def test_toward_fraction_on_known_fields() -> None:
    from types import SimpleNamespace

    import numpy as np

    from kvshift_lens.repro.report import toward_fraction

    axis = np.linspace(-0.5, 1.5, 5)  # contains the induction point (0, 1) as a grid point
    a, b = np.meshgrid(axis, axis, indexing="ij")
    bowl = SimpleNamespace(a1=axis, b1=axis, grad=np.stack([2 * a, 2 * (b - 1)], -1))
    assert toward_fraction(bowl) == 1.0  # a bowl centred on (0, 1): every step goes there
    away = SimpleNamespace(a1=axis, b1=axis, grad=-bowl.grad)
    assert toward_fraction(away) == 0.0
    # a constant slope downhill towards -alpha1: towards (0, 1) exactly where alpha1 > 0;
    # 24 points count (the target itself is left out), 15 of them have alpha1 > 0
    slope = SimpleNamespace(a1=axis, b1=axis, grad=np.stack([np.ones_like(a), 0 * b], -1))
    assert toward_fraction(slope) == pytest.approx(15 / 24)


def test_multihop_gain_at_one_hop_only_is_partly(tmp_path: Path) -> None:
    folder = tmp_path / "multihop"
    mark(folder)
    task = {"name": "multi_hop", "d_vocab": 32, "seq_len": 32}
    final = {("vanilla", "hop1"): 0.02, ("kvshift", "hop1"): 1.0,
             ("vanilla", "hop2-long"): 0.05, ("kvshift", "hop2-long"): 0.06}
    for (kind, hop), acc in final.items():
        for seed in range(2):
            fake_run(folder, f"{kind}_1L__{hop}__seed{seed}", [0.0, acc], task=task)
    sec = section(tmp_path, "multihop")
    assert sec.verdict == PARTLY and sec.numbers["better"] == ["hop1/1L"]
    assert "only at one hop" in sec.reason


def test_hop2_deep_counts_seeds_that_learn(tmp_path: Path) -> None:
    folder = tmp_path / "hop2_deep"
    mark(folder)
    task = {"name": "multi_hop", "d_vocab": 32, "seq_len": 32, "hops": 2}
    for seed in range(4):
        fake_run(folder, f"vanilla_3L__seed{seed}", [0.05, 0.1], task=task, every=3000)
        learned = seed < 3
        fake_run(folder, f"kvshift_3L__seed{seed}", [0.05, 0.95 if learned else 0.2], task=task,
                 every=3000)
    sec = section(tmp_path, "hop2_deep")
    assert sec.verdict == REPRODUCED
    assert sec.numbers["kvshift_3L"]["reached"] == 3 and sec.numbers["vanilla_3L"]["reached"] == 0
    assert "3 of 4 KV-shift seeds" in sec.reason and "+0.85" in sec.reason


def test_curves_can_hold_a_stopped_runs_last_value(tmp_path: Path) -> None:
    folder = tmp_path / "depth"
    mark(folder)
    fake_run(folder, "kv__seed0", [0.1, 0.5, 0.95])           # stopped at step 50
    fake_run(folder, "kv__seed1", [0.1, 0.2, 0.3, 0.4, 0.6])  # ran to step 100
    sweep = load_sweep(tmp_path, "depth")
    steps, values = sweep.curve("kv", None, "eval/accuracy")
    assert steps == [0, 25, 50, 75, 100] and math.isnan(values[0, 3])
    _, held = sweep.curve("kv", None, "eval/accuracy", hold_last=True)
    assert held[0].tolist() == [0.1, 0.5, 0.95, 0.95, 0.95]
    assert held[1].tolist() == [0.1, 0.2, 0.3, 0.4, 0.6]


def test_a_quick_report_never_replaces_the_real_one(tmp_path: Path, monkeypatch) -> None:
    """A --quick (smoke-test) set writes its report inside its own folder by default, and refuses
    to write over a full report or a full report's figures even when told to."""
    monkeypatch.chdir(tmp_path)
    full = tmp_path / "full"
    depth_folder(full, kv_at=175, v2_at=650, v1_best=0.1)
    build_report(full, names=["depth"], static=False)  # defaults: ./REPRODUCTION.md
    real = (tmp_path / "REPRODUCTION.md").read_text()
    assert real.startswith("<!-- kvshift repro report: full -->")
    figures = tmp_path / "docs" / "reproduction"
    figures.mkdir(parents=True)
    (figures / "depth.png").write_bytes(b"\x89PNG real figure")

    quick = tmp_path / "quick"
    depth_folder(quick, kv_at=175, v2_at=650, v1_best=0.1)
    mark(quick / "depth", quick=True)
    result = build_report(quick, names=["depth"], static=False)
    assert result.markdown == quick / "REPRODUCTION.md"
    assert "Quick mode" in result.markdown.read_text()
    assert (tmp_path / "REPRODUCTION.md").read_text() == real
    with pytest.raises(ValueError, match="holds a full reproduction report"):
        build_report(quick, markdown=tmp_path / "REPRODUCTION.md", names=["depth"], static=False)
    with pytest.raises(ValueError, match="holds a full report's figures"):
        build_report(quick, markdown=tmp_path / "Q.md", figures_dir=figures, names=["depth"])
    assert (tmp_path / "REPRODUCTION.md").read_text() == real
    assert (figures / "depth.png").read_bytes() == b"\x89PNG real figure"
    # a report written before the marker existed counts as full
    legacy = tmp_path / "OLD.md"
    legacy.write_text("# Reproducing the paper's toy results\n")
    with pytest.raises(ValueError, match="holds a full reproduction report"):
        build_report(quick, markdown=legacy, names=["depth"], static=False)
