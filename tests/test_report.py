"""The run report: one offline HTML file with the run's figures, circuitsvis views and summary;
the circuitsvis rendering; static export (or a note saying why not); ``kvshift report``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from kvshift_lens import HookedKVShiftTransformer
from kvshift_lens.cli import main
from kvshift_lens.report import (
    ReportError,
    generate_report,
    load_run,
    summarize_run,
    write_report,
)
from kvshift_lens.viz import patterns as P
from tests.helpers import build

SCRIPT_SRC = re.compile(r"<script[^>]*\bsrc\s*=", re.I)
REMOTE_IMPORT = re.compile(r"""(import\s[^;]*?from\s*|import\s*\(\s*)["']https?://""", re.I)


def assert_offline(page: str) -> None:
    """No script loaded from anywhere: every script is inline, nothing is imported from a URL, and
    neither circuitsvis' CDN (unpkg) nor plotly's nor MathJax's is named. (plotly.js itself holds
    URLs of map tiles and icons, fetched only by map traces, which the report has none of.)"""
    assert not SCRIPT_SRC.search(page)
    assert not REMOTE_IMPORT.search(page)
    for cdn in ("unpkg.com", "cdn.plot.ly/plotly", "cdnjs.cloudflare.com/ajax/libs/mathjax"):
        assert cdn not in page, cdn


def _props(body: str, component: str) -> dict:
    match = re.search(rf"CircuitsVis\.{component}, (\{{.*?\}})\);</script>", body, re.S)
    assert match, body[:300]
    return json.loads(match.group(1))


# ------------------------------------------------------------------ circuitsvis views


def test_circuitsvis_views_are_offline_closed_and_escaped():
    tokens = ["BOS", "a", "</script><b>", "a", "b"]
    pattern = torch.softmax(torch.randn(2, 5, 5), -1).tril()
    view = P.attention_heads(pattern, tokens, head_names=["x", "y"])
    page = view.to_html()
    assert_offline(page)
    assert "CircuitsVis" in page and len(page) > 1_000_000  # the bundle is inlined
    # the container is closed (circuitsvis writes <div .../>, which HTML never closes)
    assert re.search(r'<div id="kvshift-cv-[^"]+" class="kvshift-cv" data-component='
                     r'"AttentionHeads"></div>', view.body)
    assert "</script><b>" not in view.body  # a token cannot end the script
    props = _props(view.body, "AttentionHeads")
    assert props["tokens"] == tokens and props["attentionHeadNames"] == ["x", "y"]
    torch.testing.assert_close(torch.tensor(props["attention"]), pattern)
    assert view._repr_html_() == page
    assert view.to_html(include_js=False) == view.body
    assert_offline(P.attention_patterns(pattern, tokens).to_html())


def test_long_sequences_are_windowed():
    assert P.window(10, 64) == slice(0, 10)
    assert P.window(100, 64) == slice(0, 64)
    assert P.window(100, 64, start=50) == slice(36, 100)
    pattern = torch.rand(1, 100, 100)
    tokens = [str(i) for i in range(100)]
    props = _props(P.attention_heads(pattern, tokens, max_len=8, start=10).body, "AttentionHeads")
    assert props["tokens"] == tokens[10:18]
    torch.testing.assert_close(torch.tensor(props["attention"]), pattern[:, 10:18, 10:18])
    with pytest.raises(ValueError, match="positions but 3 tokens"):
        P.attention_heads(pattern, tokens[:3])


def test_loss_tokens_colour_each_token_by_the_loss_of_predicting_it():
    loss = torch.tensor([0.5, 2.0, 0.1])
    props = _props(P.loss_tokens(["a", "b", "c", "d"], loss).body, "ColoredTokens")
    assert props["tokens"] == ["a", "b", "c", "d"]
    assert props["values"] == pytest.approx([0.0, 0.5, 2.0, 0.1])  # token t+1 gets loss[t]
    assert props["minValue"] == 0.0 and props["maxValue"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="position t predicts token t \\+ 1"):
        P.loss_tokens(["a", "b"], loss)


def test_plain_and_effective_patterns_come_from_the_model_and_probes():
    from probes.effective import effective_pattern

    model = build(n_layers=2, n_key_value_heads=2)  # grouped-query: value coefficients repeat
    tokens = torch.randint(1, 23, (12,), generator=torch.Generator().manual_seed(0))
    plain, effective = P.layer_patterns(model, tokens, layer=1)
    _, cache = model.run_with_cache(tokens[None], names_filter="blocks.1.attn.hook_pattern")
    torch.testing.assert_close(plain, cache["blocks.1.attn.hook_pattern"][0])
    beta = model.blocks[1].attn.coefficients("v").detach().repeat_interleave(2, 0)
    torch.testing.assert_close(effective, effective_pattern(plain, beta))
    view = P.plain_and_effective(model, tokens, layer=1)
    assert view.body.count('data-component="AttentionHeads"') == 2
    assert "effective pattern" in view.body
    assert_offline(view.to_html())

    vanilla = build(n_layers=1, shift_k=False, shift_v=False)
    assert P.layer_patterns(vanilla, tokens)[1] is None
    assert P.plain_and_effective(vanilla, tokens).body.count('data-component="AttentionHeads"') == 1


# ------------------------------------------------------------------ the report


def test_report_is_one_offline_page_with_the_runs_figures(tiny_run, tmp_path):
    out = write_report(tiny_run, tmp_path / "sub" / "r.html", static=False, landscape_grid=4,
                       n_sequences=4)
    assert out == tmp_path / "sub" / "r.html"
    page = out.read_text()
    assert_offline(page)
    assert page.count("plotly.js v") == 1  # the library once, however many figures
    ids = re.findall(r'<div id="fig-([a-zA-Z0-9_]+)" class="plotly-graph-div"', page)
    assert ids == ["loss_accuracy", "coefficients", "trajectories", "plane", "landscape_L0H0",
                   "landscape_L0H1"]
    assert page.count("Plotly.newPlot(") == len(ids)
    assert page.count('data-component="AttentionHeads"') == 2  # plain and effective, layer 0
    assert page.count('data-component="ColoredTokens"') == 1
    assert page.count("var CircuitsVis=") == 1
    assert "not asked for (--no-static)" in page
    assert "steps to 90% accuracy" in page


def test_summary_states_the_runs_numbers(tiny_run):
    run = load_run(tiny_run)
    summary = summarize_run(run)
    evals = [r for r in run.records if r["kind"] == "eval"]
    assert summary.final_accuracy == evals[-1]["eval/accuracy"]
    assert summary.final_loss == evals[-1]["eval/loss"]
    assert summary.steps == 24 and summary.target_accuracy == 0.9
    reached = [r["step"] for r in evals if r["eval/accuracy"] >= 0.9]
    assert summary.steps_to_target == (reached[0] if reached else None)
    model = HookedKVShiftTransformer.from_pretrained(tiny_run / "final", device="cpu")
    coeffs = model.shift_coefficients()
    rows = dict(summary.head_rows())
    assert set(rows) == {"L0H0", "L0H1"}
    assert rows["L0H1"]["α2"] == float(coeffs["k"][0, 1, 1])
    assert rows["L0H0"]["β1"] == float(coeffs["v"][0, 0, 0])
    mixes = dict(summary.mix_rows())
    k = coeffs["k"][0, 1].double()
    assert mixes["L0H1"]["α gain"] == pytest.approx(float(k.abs().sum()))
    assert mixes["L0H1"]["α mix, previous"] == pytest.approx(float(k[1] / k.abs().sum()))
    assert set(summary.induction_scores) == {"L0H0", "L0H1"}
    text = summary.to_text()
    assert "L0H1" in text and "gain x mix" in text and "α2 " in text  # raw values kept
    assert "1 layer, d_model 16, 2 heads, shift kv (window 1)" in text
    best = summary.induction_head()
    if best is None:
        assert "nearest the induction point" not in text
    else:
        assert summary.induction_scores[best] >= summary.induction_threshold


def test_nearest_the_induction_point_is_chosen_by_mix_among_measured_induction_heads():
    """The demo's failure: raw distances pick a head of small gain; by mix among heads the probes
    measure as induction heads the choice is the head whose keys read the previous position."""
    from kvshift_lens.report import RunSummary

    coeffs = {"k": [[[0.311, 4.368], [0.603, 3.639], [0.0, 1.0]]],
              "v": [[[3.441, -0.006], [1.595, -0.089], [1.0, 0.0]]]}
    summary = RunSummary(name="x", description="", steps=1, target_accuracy=0.9,
                         steps_to_target=None, phase_change=None, final_accuracy=None,
                         final_loss=None, coefficients=coeffs,
                         induction_scores={"L0H0": 0.96, "L0H1": 0.40, "L0H2": 0.1})
    # raw (α1, β1) distance to (0, 1) would pick L0H1 ((0.60, 1.60) vs (0.31, 3.44))
    assert summary.induction_head() == "L0H0"
    # L0H2 is exactly at the induction point but the probes say it is no induction head
    assert "L0H2" != summary.induction_head()
    summary.induction_scores = {}
    assert summary.induction_head() is None


def test_report_of_a_vanilla_two_layer_run_leaves_out_what_does_not_apply(tmp_path):
    from kvshift_lens.train import train
    from tests.conftest import tiny_spec

    spec = tiny_spec(steps=4)
    spec.model.update(n_layers=2, shift_k=False, shift_v=False)
    train(spec, tmp_path / "run")
    outcome = generate_report(tmp_path / "run", static=False)
    assert outcome.path == tmp_path / "run" / "report.html"
    assert outcome.items == ["loss_accuracy", "patterns_L0", "patterns_L1", "loss_tokens"]
    assert any("no shifted projection" in n for n in outcome.notes)
    assert "vanilla attention" in outcome.summary.to_text()


def test_unreadable_run_folders_raise_report_errors(tmp_path):
    with pytest.raises(ReportError, match="does not exist"):
        load_run(tmp_path / "missing")
    with pytest.raises(ReportError, match="no metrics.jsonl"):
        load_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "kind": "summary"}\n{"broken')
    with pytest.raises(ReportError, match="no training or evaluation records"):
        load_run(tmp_path)


# ------------------------------------------------------------------ the command


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_report_command_writes_the_report_and_prints_the_summary(tiny_run, tmp_path, capsys):
    code, out, err = _cli(capsys, "report", tiny_run, "--out", tmp_path / "rep.html",
                          "--no-static", "--landscape-grid", "3")
    assert code == 0, err
    assert f"report: {tmp_path / 'rep.html'}" in out
    assert "static figures: not asked for (--no-static)" in out
    assert "steps to 90% accuracy" in out and "L0H0" in out
    page = (tmp_path / "rep.html").read_text()
    assert_offline(page)
    code, out, err = _cli(capsys, "report", tiny_run, "--out", tmp_path / "rep2.html",
                          "--no-static", "--no-landscape")
    assert code == 0, err
    assert "landscape_L0H0" not in (tmp_path / "rep2.html").read_text()


@pytest.mark.parametrize("argv,expected", [
    (lambda t, r: ["report", t / "missing"], "missing does not exist"),
    (lambda t, r: ["report", t], "has no metrics.jsonl"),
    (lambda t, r: ["report", r, "--out", t / "r.txt"], "must name an .html file"),
    (lambda t, r: ["report", r, "--landscape-grid", "1"], "1 must be >= 2"),
    (lambda t, r: ["report", r, "--out", t], "must name an .html file"),
])
def test_report_command_errors_are_one_line(tiny_run, tmp_path, capsys, argv, expected):
    code, out, err = _cli(capsys, *argv(tmp_path, tiny_run))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("kvshift report") and "Traceback" not in err
    assert expected in err
    assert not (tmp_path / "r.txt").exists()


def test_report_command_help(capsys):
    code, out, _ = _cli(capsys, "report", "--help")
    assert code == 0
    for flag in ("--out", "--no-static", "--no-landscape", "--landscape-grid", "RUN_DIR"):
        assert flag in out


def test_default_report_path_is_in_the_run_folder(tiny_run):
    # the session's run folder may already hold one from another test: the path is what matters
    path = write_report(tiny_run, static=False, landscape=False)
    assert path == Path(tiny_run) / "report.html" and path.stat().st_size > 1_000_000
