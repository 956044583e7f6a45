"""The notebooks (notebooks/NN_name.py, jupytext percent scripts, paired with outputs-free .ipynb):
each runs top to bottom on a fresh kernel in fast mode (KVSHIFT_FAST=1) and shows what it is
about, and each .ipynb holds exactly the cells of its .py and no outputs.

The kernel is ipykernel's "python3" from the environment running the tests (the venv); it starts
in a temporary folder, so the notebooks' run folders (``runs/notebooks/...``) land there.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient
from nbconvert import HTMLExporter

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["01_train_and_compare", "02_shift_coefficients", "03_circuits", "04_text",
         "05_zoo_circuits"]
CELL_TIMEOUT_S = 120
# What setup_notebook's renderer emits: per figure, HTML with the plotly div and the call that draws
# it; once per kernel, the inlined plotly.js bundle (it ends by defining window.Plotly).
PLOTLY_DIV = 'class="plotly-graph-div"'
PLOTLY_DRAW = "Plotly.newPlot("
PLOTLY_JS = "window.Plotly = Plotly"

# What each notebook must show: minimum counts of plotly figures and circuitsvis views, and text
# its outputs must contain.
EXPECTED = {
    "01_train_and_compare": {"plotly": 3, "circuitsvis": 0,
                             "text": ["kvshift_1L", "vanilla_1L", "vanilla_2L"]},
    "02_shift_coefficients": {"plotly": 4, "circuitsvis": 0, "text": ["L0H0"]},
    "03_circuits": {"plotly": 7, "circuitsvis": 2,
                    "text": ["key_past_weight", "hook_k_shifted", "removing the key shift",
                             "log-prob of the repeats"]},
    "04_text": {"plotly": 3, "circuitsvis": 0,
                "text": ["validation loss", "heads with a role", "generated:"]},
    "05_zoo_circuits": {"plotly": 7, "circuitsvis": 2,
                        "text": ["induction_via_shift", "agreement of attribution",
                                 "edge attribution vs exact edge patching",
                                 "'L0H3 <- embed via k_shift' in the top-"]},
}


def _cells(nb: nbformat.NotebookNode) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source) for c in nb.cells]


def _outputs(nb: nbformat.NotebookNode) -> list[dict]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def _is_figure(output: dict) -> bool:
    html = output.get("data", {}).get("text/html", "")
    return PLOTLY_DIV in html and PLOTLY_DRAW in html


def _check_figures(outputs: list[dict], at_least: int, where: str) -> None:
    """At least ``at_least`` figures, plotly.js inlined before the first, and, when the setup
    line says static images are on, a PNG with each figure."""
    figures = [i for i, o in enumerate(outputs) if _is_figure(o)]
    assert len(figures) >= at_least, f"{where}: {len(figures)} plotly figures shown"
    injected = [i for i, o in enumerate(outputs) if PLOTLY_JS in o.get("data", {}).get("text/html", "")]
    assert injected and injected[0] < figures[0], f"{where}: plotly.js is not inlined before the figures"
    setup = next(o.get("text", "") for o in outputs if "figures: interactive" in o.get("text", ""))
    if "+ static PNG" in setup:
        assert all(outputs[i]["data"].get("image/png") for i in figures), f"{where}: a figure has no PNG"
    else:
        assert "no static PNG: " in setup, setup


def _text_of(output: dict) -> str:
    if output.get("output_type") == "stream":
        return output.get("text", "")
    data = output.get("data", {})
    return "\n".join(str(data.get(k, "")) for k in ("text/plain", "text/markdown", "text/html"))


def test_every_notebook_is_listed_and_paired():
    scripts = sorted(p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.py"))
    assert scripts == NAMES
    for name in NAMES:
        assert (NOTEBOOKS / f"{name}.ipynb").is_file(), f"{name}.ipynb is missing: run jupytext --sync"


@pytest.mark.parametrize("name", NAMES)
def test_ipynb_in_sync_with_script_and_stripped(name):
    script = jupytext.read(NOTEBOOKS / f"{name}.py")
    paired = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(paired)
    assert _cells(paired) == _cells(script), (
        f"{name}.ipynb differs from {name}.py: run `jupytext --sync notebooks/{name}.py`")
    for cell in paired.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{name}.ipynb has outputs: strip them (jupytext --sync writes none)")
    assert paired.metadata.get("kernelspec", {}).get("name") == "python3"
    assert "py:percent" in paired.metadata.get("jupytext", {}).get("formats", "")


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_in_fast_mode(name, tmp_path, monkeypatch):
    monkeypatch.setenv("KVSHIFT_FAST", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("KVSHIFT_TEST_THREADS", "1"))
    nb = jupytext.read(NOTEBOOKS / f"{name}.py")
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert 'FAST = os.environ.get("KVSHIFT_FAST", "0") == "1"' in first_code.source
    assert "setup_notebook(threads=" in first_code.source, "set the renderer and thread count first"

    client = NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(tmp_path)}})
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the traceback, when a cell fails
    elapsed = time.perf_counter() - t0
    print(f"{name}: {elapsed:.1f} s in fast mode")

    outputs = _outputs(nb)
    assert not [o for o in outputs if o.get("output_type") == "error"]
    expected = EXPECTED[name]
    _check_figures(outputs, expected["plotly"], name)
    stderr = [o["text"] for o in outputs if o.get("output_type") == "stream" and o.get("name") == "stderr"]
    assert not stderr, f"{name}: writes to stderr (shown as error blocks): {stderr}"
    n_cv = sum("CircuitsVis.render(" in o.get("data", {}).get("text/html", "") for o in outputs)
    assert n_cv >= expected["circuitsvis"], f"{name}: {n_cv} circuitsvis views shown"
    text = "\n".join(_text_of(o) for o in outputs)
    for needle in expected["text"]:
        assert needle in text, f"{name}: no output mentions {needle!r}"
    assert (tmp_path / "runs" / "notebooks").is_dir(), "run folders belong under runs/notebooks"


def test_figures_survive_html_export(tmp_path):
    """A tiny notebook through a real kernel and ``jupyter nbconvert --to html``'s exporter: the
    page holds the figure (plotly div, drawing call, plotly.js inlined; a PNG when kaleido has a
    browser) and loads no plotly or MathJax script from a CDN."""
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("from kvshift_lens.viz import setup_notebook\n"
                                  "print(setup_notebook(threads=1))"),
        nbformat.v4.new_code_cell("import plotly.graph_objects as go\n"
                                  "go.Figure(go.Bar(x=['a', 'b'], y=[2, 5], name='bars-under-test'))"),
        nbformat.v4.new_code_cell("import torch\nprint('torch threads', torch.get_num_threads())"),
    ], metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = _outputs(nb)
    _check_figures(outputs, 1, "tiny notebook")
    assert "torch threads 1" in "".join(o.get("text", "") for o in outputs)

    html, _ = HTMLExporter().from_notebook_node(nb)
    assert html.count(PLOTLY_DIV) == 1 and html.count(PLOTLY_DRAW) == 1
    assert html.count(PLOTLY_JS) == 1, "plotly.js is inlined exactly once"
    assert "bars-under-test" in html
    static = "+ static PNG" in outputs[0]["text"]
    has_img = re.search(r'<img[^>]*src="data:image/png;base64,[^"]+"[^>]*>', html) is not None
    assert has_img == static, f"static images {'on' if static else 'off'}, <img> found: {has_img}"
    # scripts loaded from elsewhere: only those of nbconvert's page template (the same notebook
    # exported without outputs)
    bare, _ = HTMLExporter().from_notebook_node(nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell(c.source) for c in nb.cells], metadata=nb.metadata))
    src = r'<script[^>]*\bsrc="([^"]+)"'
    assert sorted(re.findall(src, html)) == sorted(re.findall(src, bare))
