"""Static PNG/SVG export of plotly figures: a note, never a crash, when kaleido or a browser is
missing or fails; real files when both are there."""

from __future__ import annotations

import sys

import plotly.graph_objects as go
import pytest

from kvshift_lens.viz.export import export_static, find_browser


def _figure() -> go.Figure:
    return go.Figure(go.Scatter(x=[0, 1, 2], y=[1, 3, 2]), layout=dict(height=300))


def test_static_export_without_kaleido_or_a_browser_is_a_note(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "kaleido", None)  # import kaleido -> ImportError
    result = export_static({"f": _figure()}, tmp_path / "figs")
    assert result.status == "skipped" and "kaleido is not installed" in result.message
    monkeypatch.delitem(sys.modules, "kaleido")
    pytest.importorskip("kaleido")
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-such-chrome"))
    assert find_browser() is None
    result = export_static({"f": _figure()}, tmp_path / "figs")
    assert result.status == "skipped" and "Chromium" in result.message


def test_static_export_failure_is_caught(tmp_path):
    pytest.importorskip("kaleido")
    fake = tmp_path / "chrome"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    result = export_static({"f": _figure()}, tmp_path / "figs", browser=str(fake), timeout=20)
    assert result.status == "failed" and "kaleido" in result.message
    assert not list((tmp_path / "figs").glob("*.png"))


@pytest.mark.skipif(find_browser() is None, reason="no Chrome/Chromium for kaleido")
def test_static_export_writes_png_and_svg(tmp_path):
    pytest.importorskip("kaleido")
    result = export_static({"curve": _figure(), "bars": go.Figure(go.Bar(y=[1, 2]))},
                           tmp_path / "figs")
    assert result.status == "written", result.message
    names = sorted(p.name for p in result.files)
    assert names == ["bars.png", "bars.svg", "curve.png", "curve.svg"]
    png = (tmp_path / "figs" / "curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
    svg = (tmp_path / "figs" / "curve.svg").read_text()
    assert "<svg" in svg
