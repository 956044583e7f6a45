"""The report in a real browser: headless Debian Chromium, driven by selenium through
/usr/bin/chromedriver (no driver or browser is downloaded: selenium-manager never runs), opens the
report of a tiny trained run from file:// with the network unused, and finds the plotly figures
drawn, the circuitsvis components rendered and no JavaScript error. The screenshot is kept as
``artifacts/report.png``."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from kvshift_lens.report import write_report

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-quic", "--window-size=1280,1000"]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="/usr/bin/chromium is absent (Debian package chromium)")


@pytest.fixture
def driver(tmp_path, monkeypatch):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    if not CHROMEDRIVER.exists():
        pytest.fail(f"{CHROMIUM} is installed but {CHROMEDRIVER} is not (Debian package "
                    "chromium-driver): install both")
    monkeypatch.setenv("SE_OFFLINE", "1")  # selenium-manager must not download anything
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    drv.set_page_load_timeout(60)
    try:
        yield drv
    finally:
        drv.quit()


def _wait(condition, timeout: float = 30.0, every: float = 0.25):
    deadline = time.monotonic() + timeout
    value = condition()
    while not value and time.monotonic() < deadline:
        time.sleep(every)
        value = condition()
    return value


def test_report_renders_offline_without_javascript_errors(tiny_run, tmp_path, driver):
    report = write_report(tiny_run, tmp_path / "report.html", static=False, landscape_grid=4,
                          n_sequences=4)
    page = report.read_text()
    n_figures = len(re.findall(r'class="plotly-graph-div"', page))
    n_views = page.count('class="kvshift-cv"')
    assert n_figures >= 6 and n_views == 3

    driver.get(report.as_uri())
    drawn = _wait(lambda: driver.execute_script(
        "return document.querySelectorAll('div.js-plotly-plot svg.main-svg').length > 0 && "
        "Array.from(document.querySelectorAll('div.js-plotly-plot')).every("
        "  d => d.querySelector('svg.main-svg') !== null) && "
        "Array.from(document.querySelectorAll('.kvshift-cv')).every("
        "  d => d.childElementCount > 0)"))
    assert drawn, "figures or circuitsvis components did not render in 30 s"

    plots = driver.execute_script(
        "return Array.from(document.querySelectorAll('div.js-plotly-plot')).map(d => d.id)")
    assert len(plots) == n_figures and "fig-landscape_L0H0" in plots
    # every figure has drawn its data, not just an empty frame
    traces = driver.execute_script(
        "return Array.from(document.querySelectorAll('div.js-plotly-plot')).map("
        "  d => d.querySelectorAll('g.trace, g.hm, g.contour').length)")
    assert all(n > 0 for n in traces), traces
    views = driver.execute_script(
        "return Array.from(document.querySelectorAll('.kvshift-cv')).map("
        "  d => [d.dataset.component, d.querySelectorAll('*').length, d.innerText.length])")
    assert [v[0] for v in views] == ["AttentionHeads", "AttentionHeads", "ColoredTokens"]
    assert all(n_nodes > 10 for _, n_nodes, _ in views), views
    # the page fetched nothing but itself
    fetched = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)")
    assert not [u for u in fetched if not u.startswith("file:")], fetched

    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    height = driver.execute_script("return document.body.scrollHeight")
    driver.set_window_size(1280, min(int(height), 8000))
    time.sleep(0.5)
    assert driver.save_screenshot(str(shot))
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000
    assert os.path.getmtime(shot) >= report.stat().st_mtime
