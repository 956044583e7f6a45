"""setup_notebook and its plotly renderer: figures as HTML with the plotly div and drawing script
(no CDN), plus a PNG (also as a fallback <img> the script removes) when kaleido has a browser;
a failing exporter is said once and leaves the interactive figure; bad arguments raise.

The export through a real kernel and nbconvert is tested in tests/test_notebooks.py."""

from __future__ import annotations

import base64
import copy
import json
import logging
import re
import struct

import plotly.graph_objects as go
import plotly.io as pio
import pytest
import torch

from kvshift_lens.viz import setup_notebook
from kvshift_lens.viz.export import find_browser
from kvshift_lens.viz.notebook import NotebookFigureRenderer, NotebookSetup


def _figure() -> dict:
    fig = go.Figure(go.Scatter(x=[1, 2, 3], y=[3, 1, 2], name="trace-under-test"))
    return fig.update_layout(title="a figure").to_dict()


def _plot_data(html: str) -> list:
    """The data argument of Plotly.newPlot in the renderer's HTML."""
    m = re.search(r'Plotly\.newPlot\(\s*"([^"]+)",\s*(\[.*?\]),\s*\{', html, flags=re.S)
    assert m, "no Plotly.newPlot call"
    return json.loads(m.group(2))


@pytest.fixture
def restore_plotly_and_torch():
    default, threads = pio.renderers.default, torch.get_num_threads()
    yield
    pio.renderers.default = default
    torch.set_num_threads(threads)


def test_html_only_without_browser():
    bundle = NotebookFigureRenderer(browser=None).to_mimebundle(_figure())
    assert set(bundle) == {"text/html"}
    html = bundle["text/html"]
    assert 'class="plotly-graph-div"' in html
    (trace,) = _plot_data(html)
    assert trace["name"] == "trace-under-test" and trace["y"] == [3, 1, 2]
    assert "<img" not in html
    assert not re.search(r"<script[^>]*\bsrc=", html), "figures must not load scripts (no CDN)"
    assert "mathjax" not in html.lower()


def test_failing_exporter_is_said_once_and_leaves_the_interactive_figure(monkeypatch, caplog):
    import kaleido

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no display")

    monkeypatch.setattr(kaleido, "start_sync_server", lambda *a, **k: None)
    monkeypatch.setattr(kaleido, "calc_fig_sync", broken)
    renderer = NotebookFigureRenderer(browser="/nonexistent/chromium")
    with caplog.at_level(logging.WARNING, logger="kvshift_lens.viz.notebook"):
        # plotly renders each figure with a copy of the renderer; the failure must carry over
        first = copy.copy(renderer).to_mimebundle(_figure())
        second = copy.copy(renderer).to_mimebundle(_figure())
    for bundle in (first, second):
        assert set(bundle) == {"text/html"} and "plotly-graph-div" in bundle["text/html"]
    assert len(calls) == 1, "after one failure, no more attempts"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no display" in warnings[0].getMessage()


@pytest.mark.skipif(find_browser() is None, reason="needs Chrome/Chromium for kaleido (none found)")
def test_png_with_browser_is_a_real_image_of_the_requested_size():
    fig = _figure()
    fig["layout"]["width"] = 640
    bundle = NotebookFigureRenderer(browser=find_browser(), height=300).to_mimebundle(fig)
    png = base64.b64decode(bundle["image/png"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk
    assert (width, height) == (640, 300)  # the figure's width, the renderer's default height
    html = bundle["text/html"]
    img_id = re.search(r'<img id="([^"]+)-static"', html).group(1)
    assert bundle["image/png"] in html
    (trace,) = _plot_data(html)
    assert trace["name"] == "trace-under-test"
    assert f"getElementById('{img_id}-static')" in html, "the drawn plot removes its fallback"


def test_setup_sets_threads_and_says_what_it_did(restore_plotly_and_torch):
    setup = setup_notebook(threads=1)
    assert isinstance(setup, NotebookSetup) and setup.threads == torch.get_num_threads() == 1
    text = str(setup)
    assert "torch threads: 1" in text
    if setup.static_images:
        assert "static PNG" in text and "no static PNG" not in text
    else:
        assert "no static PNG: " in text and setup.note
    assert isinstance(pio.renderers["kvshift_notebook"], NotebookFigureRenderer)
    off = setup_notebook(static_images=False)
    assert not off.static_images and "turned off" in str(off) and off.threads == 1


@pytest.mark.parametrize("kwargs", [{"threads": 0}, {"threads": True}, {"threads": 1.5},
                                    {"threads": "2"}, {"width": 0}, {"height": -5}])
def test_bad_arguments_raise(kwargs, restore_plotly_and_torch):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        setup_notebook(**kwargs)
