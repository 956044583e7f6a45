"""Static images of plotly figures (PNG/SVG) through kaleido and a Chrome/Chromium binary.

Never fails the caller: when kaleido or a browser is missing, or the export breaks, the result
says so and nothing else happens.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import plotly.graph_objects as go

logger = logging.getLogger(__name__)

BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


@dataclass
class StaticExport:
    """What :func:`export_static` did: ``status`` is "written", "skipped" or "failed"."""

    status: str
    message: str
    directory: Path | None = None
    files: list[Path] = field(default_factory=list)


def find_browser() -> str | None:
    """A Chrome/Chromium binary for kaleido: ``BROWSER_PATH`` when set, else the first of
    :data:`BROWSER_NAMES` on PATH."""
    env = os.environ.get("BROWSER_PATH")
    if env:
        return env if Path(env).is_file() else None
    for name in BROWSER_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def export_static(
    figures: Mapping[str, go.Figure],
    out_dir: str | Path,
    formats: Sequence[str] = ("png", "svg"),
    browser: str | None = None,
    width: int = 1000,
    timeout: float = 120,
) -> StaticExport:
    """Write every figure as ``out_dir/<name>.<format>`` with kaleido (one browser session for
    all). Never raises for a missing or failing exporter: the result says what happened.

    Args:
        figures: ``{name: figure}``; names become file names.
        browser: the Chrome/Chromium binary (default :func:`find_browser`).
        width: image width in pixels for figures that set none (heights are the figures' own,
            else 500).
        timeout: seconds allowed per image.
    """
    if not figures:
        return StaticExport("skipped", "no figures to export")
    try:
        import kaleido
    except ImportError:
        return StaticExport("skipped", "kaleido is not installed (pip install kaleido); no PNG/SVG "
                                       "files were written")
    browser = browser or find_browser()
    if browser is None:
        return StaticExport("skipped", "kaleido needs Chrome or Chromium and none was found (install "
                                       "the Debian package chromium, or set BROWSER_PATH); no "
                                       "PNG/SVG files were written")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs, files = [], []
    for name, fig in figures.items():
        size = {"width": fig.layout.width or width, "height": fig.layout.height or 500}
        for fmt in formats:
            path = out / f"{name}.{fmt}"
            files.append(path)
            jobs.append({"fig": fig, "path": str(path), "opts": {"format": fmt, **size}})
    t0 = time.perf_counter()
    try:
        # mathjax=False: kaleido would otherwise load MathJax from a CDN; plotly.js comes from
        # the plotly package on disk.
        kaleido.write_fig_from_object_sync(
            jobs, kopts={"path": browser, "mathjax": False, "timeout": timeout},
            cancel_on_error=True)
    except Exception as e:  # noqa: BLE001 - any exporter failure becomes a note, never a crash
        message = " ".join(f"{type(e).__name__}: {e}".split())[:400]
        logger.warning("static export failed: %s", message)
        return StaticExport("failed", f"static export with kaleido failed ({message}); no "
                                      "PNG/SVG files were written", out)
    missing = [p for p in files if not p.is_file() or p.stat().st_size == 0]
    if missing:
        logger.warning("static export wrote no %s", ", ".join(p.name for p in missing))
        return StaticExport("failed", f"kaleido did not write {len(missing)} of {len(files)} "
                                      "files", out, [p for p in files if p not in missing])
    logger.info("wrote %d static images to %s in %.1f s", len(files), out, time.perf_counter() - t0)
    return StaticExport("written", f"{len(files)} files ({', '.join(formats).upper()}) written "
                                   f"with kaleido and {browser}", out, files)


__all__ = ["BROWSER_NAMES", "StaticExport", "export_static", "find_browser"]
