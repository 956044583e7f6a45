"""Notebook setup: plotly figures that survive ``jupyter nbconvert --to html`` and static viewers,
and an explicit torch thread count.

plotly's default renderer in a Jupyter kernel emits only ``application/vnd.plotly.v1+json``, which
JupyterLab draws but nbconvert's HTML export and static viewers (GitHub) drop. After
:func:`setup_notebook`, each figure is emitted as

- ``text/html``: the plotly div and the script that draws it, with plotly.js inlined once per
  kernel (plotly's own "notebook" injection; no CDN, MathJax off), so it works offline, in Jupyter
  and in exported HTML;
- when kaleido and a Chrome/Chromium binary are available, also ``image/png``, and the same PNG as
  an ``<img>`` inside the HTML that the script removes once the interactive plot is drawn. Viewers
  that strip scripts (GitHub, an untrusted notebook) show the picture instead of an empty box.
"""

from __future__ import annotations

import atexit
import base64
import functools
import logging
import uuid
from dataclasses import dataclass
from typing import Any

import plotly.io as pio
from plotly.io.base_renderers import NotebookRenderer

from kvshift_lens.viz.export import find_browser

logger = logging.getLogger(__name__)

RENDERER = "kvshift_notebook"

# Runs after Plotly.newPlot resolves: the static fallback is not needed once the plot is drawn.
_REMOVE_STATIC = ("var s = document.getElementById('{plot_id}-static'); "
                  "if (s) { s.parentNode.removeChild(s); }")


@dataclass
class NotebookSetup:
    """What :func:`setup_notebook` set.

    ``threads``: torch's intra-op thread count now. ``static_images``: whether figures also carry
    a PNG. ``note``: why not, when they do not.
    """

    threads: int
    static_images: bool
    note: str = ""

    def __str__(self) -> str:
        figures = ("interactive (plotly.js inlined) + static PNG" if self.static_images
                   else f"interactive (plotly.js inlined), no static PNG: {self.note}")
        return f"torch threads: {self.threads}; figures: {figures}"


class NotebookFigureRenderer(NotebookRenderer):
    """plotly's offline "notebook" renderer (plotly.js injected once when activated), without
    MathJax from a CDN, plus a PNG of each figure when ``browser`` is given (see the module
    docstring).

    Args:
        browser: a Chrome/Chromium binary for kaleido; None: interactive HTML only.
        width, height: PNG size in pixels for figures that set none.
    """

    def __init__(self, browser: str | None = None, width: int = 900, height: int = 500) -> None:
        super().__init__(connected=False)
        self.browser, self.width, self.height = browser, width, height
        # shared by the copies plotly makes per figure: after one failure, stop trying
        self._static_failed: dict[str, str] = {}

    def to_mimebundle(self, fig_dict: dict[str, Any]) -> dict[str, str]:
        plot_id = str(uuid.uuid4())
        png = self._png(fig_dict)
        html = pio.to_html(fig_dict, config=self.config, include_plotlyjs=False,
                           include_mathjax=False, full_html=False, validate=False, div_id=plot_id,
                           post_script=_REMOVE_STATIC if png else None)
        if png is None:
            return {"text/html": html}
        img = (f'<img id="{plot_id}-static" alt="plotly figure (static image)" '
               f'src="data:image/png;base64,{png}"/>')
        return {"text/html": img + html, "image/png": png}

    def _png(self, fig_dict: dict[str, Any]) -> str | None:
        """The figure as base64 PNG, or None (no browser, or a failure, said once)."""
        if self.browser is None or self._static_failed:
            return None
        import kaleido

        layout = fig_dict.get("layout", {})
        opts = {"format": "png", "width": layout.get("width") or self.width,
                "height": layout.get("height") or self.height}
        try:
            # One browser for the kernel's lifetime (~0.3 s per figure instead of ~3 s); a no-op
            # once running. mathjax=False: kaleido would otherwise load MathJax from a CDN.
            kaleido.start_sync_server(path=self.browser, mathjax=False, silence_warnings=True)
            _stop_at_exit()
            data = kaleido.calc_fig_sync(fig_dict, opts=opts)
        except Exception as e:  # noqa: BLE001 - a failed image leaves the interactive figure
            message = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            self._static_failed["error"] = message
            logger.warning("no static images from here on: kaleido failed (%s)", message)
            return None
        return base64.b64encode(data).decode("ascii")


@functools.cache
def _stop_at_exit() -> None:
    import kaleido

    atexit.register(kaleido.stop_sync_server, silence_warnings=True)


def setup_notebook(threads: int | None = None, static_images: bool = True,
                   width: int = 900, height: int = 500) -> NotebookSetup:
    """Set what a notebook's outputs and timings depend on; call it in the first code cell.

    Makes :class:`NotebookFigureRenderer` plotly's default renderer (figures survive
    ``nbconvert --to html`` and show on static viewers) and sets torch's thread count.

    Args:
        threads: torch intra-op threads (``torch.set_num_threads``); None leaves torch's setting.
            Notebooks pass the count their stated run times were measured with.
        static_images: also emit a PNG per figure when kaleido and Chrome/Chromium are present
            (found as :func:`kvshift_lens.viz.export.find_browser` does); when they are not,
            the returned setup says why, and figures are interactive only.
        width, height: PNG size in pixels for figures that set none.

    Returns:
        :class:`NotebookSetup`; print it to say what was set.

    Raises:
        ValueError: ``threads`` is not a positive int, or ``width``/``height`` not positive ints.
    """
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):
        raise ValueError(f"threads={threads!r} must be None or an int >= 1")
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an int >= 1 (pixels)")
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    browser, note = None, ""
    if static_images:
        try:
            import kaleido  # noqa: F401
        except ImportError:
            note = "kaleido is not installed (pip install kaleido)"
        else:
            browser = find_browser()
            if browser is None:
                note = ("kaleido needs Chrome or Chromium and none was found (install the Debian "
                        "package chromium, or set BROWSER_PATH)")
    else:
        note = "static images turned off"
    pio.renderers[RENDERER] = NotebookFigureRenderer(browser, width=width, height=height)
    from IPython import get_ipython

    if get_ipython() is not None:  # a plain script keeps plotly's renderer (figures not drawn)
        pio.renderers.default = RENDERER
    setup = NotebookSetup(threads=torch.get_num_threads(), static_images=browser is not None,
                          note=note)
    logger.info("notebook setup: %s", setup)
    return setup


__all__ = ["RENDERER", "NotebookFigureRenderer", "NotebookSetup", "setup_notebook"]
