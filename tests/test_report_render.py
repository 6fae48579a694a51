"""The review report of a real attacked run opens in a real browser (headless Chromium).

``tests/test_report.py`` checks the HTML text; this file checks what a reviewer sees: every
section is there once the browser has parsed the page, every figure decodes to a picture, and
a screenshot of the page is not blank. Skipped only where no Chromium binary is installed
(CI installs Debian's ``chromium``).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg

from simulations.harness import run_federation

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium or chromium-browser binary on PATH "
                                                         "(apt-get install -y chromium)")

SECTION_IDS = ("overview", "heatmap", "reputation", "curves", "alerts", "flagged", "config")
FIGURE_SECTIONS = ("heatmap", "reputation", "curves")
#: Two sign-flip x10 attackers: flagged every round, so the flagged table has attacker rows.
ATTACKED_RUN = {"attack": "sign-flip", "attack-params": "scale=10", "num-malicious": 2, "rounds": 4}
WINDOW = (1280, 2400)
BROWSER_TIMEOUT_S = 60
#: Runs once the page (and so every inline image) has loaded, and reports what the browser made
#: of it in the title, because --dump-dom gives the DOM but not the decoded image sizes.
PROBE = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const naturalWidths = {};
  for (const section of document.querySelectorAll("section[id]")) {
    naturalWidths[section.id] = Array.from(section.querySelectorAll("img")).map((img) => img.naturalWidth);
  }
  document.title = JSON.stringify({
    images: images.length,
    loaded: images.filter((img) => img.complete && img.naturalWidth > 0).length,
    naturalWidths: naturalWidths,
    attackerRows: document.querySelectorAll("#flagged tr.attacker").length,
  });
});
</script>"""


def run_chromium(page: Path, profile: Path, *options: str) -> str:
    """Open ``page`` in headless Chromium with a fresh profile and return its stdout.

    The browser runs in its own process group, killed whole if it outlives the timeout.
    """
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", f"--user-data-dir={profile}", *options, page.resolve().as_uri()]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=BROWSER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"chromium did not finish {page.name} within {BROWSER_TIMEOUT_S} s")
    assert process.returncode == 0, f"chromium exited {process.returncode}: {stderr[-2000:]}"
    return stdout


def probe_in_browser(report: Path, workdir: Path) -> tuple[str, dict]:
    """Render a copy of ``report`` with :data:`PROBE` added; return the dumped DOM and the probe's findings."""
    page = report.read_text(encoding="utf-8")
    assert page.count("</body>") == 1
    probed = workdir / "probed.html"
    probed.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    # The virtual-time budget makes Chromium dump only after the load handlers have run.
    dom = run_chromium(probed, workdir / "profile-dom", "--virtual-time-budget=5000", "--dump-dom")
    title = re.search(r"<title>(.*?)</title>", dom, re.DOTALL)
    assert title is not None, "the dumped DOM has no <title>"
    try:
        return dom, json.loads(html.unescape(title.group(1)))
    except json.JSONDecodeError:
        pytest.fail(f"the probe did not run (title is {title.group(1)[:200]!r})")


@pytest.fixture(scope="module")
def attacked_report(tmp_path_factory) -> tuple[Path, dict]:
    """``report.html`` and ``summary.json`` of a short real run with two sign-flip attackers."""
    run_dir = tmp_path_factory.mktemp("attacked") / "run"
    summary = run_federation(ATTACKED_RUN | {"out": str(run_dir)})
    report = run_dir / "report.html"
    assert report.is_file(), "the run wrote no report.html"
    return report, summary


def test_the_run_is_a_meaningful_fixture(attacked_report):
    _, summary = attacked_report
    assert len(summary["malicious_nodes"]) == 2
    flagged = {node for record in summary["rounds"] for node in record["flagged"]}
    assert set(summary["malicious_nodes"]) <= flagged


def test_every_section_and_figure_renders_in_the_browser(attacked_report, tmp_path):
    report, summary = attacked_report
    dom, probe = probe_in_browser(report, tmp_path)
    for section in SECTION_IDS:
        assert f'id="{section}"' in dom, section
    assert probe["images"] == len(FIGURE_SECTIONS)
    assert probe["loaded"] == probe["images"], probe
    for section in FIGURE_SECTIONS:
        widths = probe["naturalWidths"][section]
        # One decoded figure, wide enough to read (figures are 4-10 inches at 100 dpi).
        assert len(widths) == 1 and widths[0] >= 300, (section, widths)
    assert probe["attackerRows"] == len(summary["malicious_nodes"])


def test_the_probe_notices_a_figure_that_does_not_decode(attacked_report, tmp_path):
    report, _ = attacked_report
    page = report.read_text(encoding="utf-8")
    # Keep the PNG signature, cut the image data: the browser must fail to decode this figure.
    broken = re.sub(r'(src="data:image/png;base64,)([A-Za-z0-9+/=]{12})[A-Za-z0-9+/=]+"', r'\1\2"', page, count=1)
    assert broken != page
    damaged = tmp_path / "report.html"
    damaged.write_text(broken, encoding="utf-8")
    _, probe = probe_in_browser(damaged, tmp_path)
    assert probe["images"] == len(FIGURE_SECTIONS)
    assert probe["loaded"] == len(FIGURE_SECTIONS) - 1
    assert probe["naturalWidths"]["heatmap"] == [0]


def test_a_screenshot_of_the_report_is_not_blank(attacked_report, tmp_path):
    report, _ = attacked_report
    screenshot = tmp_path / "report.png"
    run_chromium(report, tmp_path / "profile-shot", f"--screenshot={screenshot}",
                 f"--window-size={WINDOW[0]},{WINDOW[1]}")
    pixels = mpimg.imread(screenshot)[..., :3]  # floats in [0, 1]
    assert pixels.shape[:2] == (WINDOW[1], WINDOW[0])
    grey = pixels.mean(axis=2)
    assert grey.std() > 0.05, "the screenshot is (nearly) one flat colour"
    # Text, tables and three figures cover a good part of the page: not a white page with a header.
    assert np.mean(grey < 0.9) > 0.05
    # The heatmap's worst cells are dark (magma_r near 1) and its flags cyan: the figure is drawn.
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    assert np.sum((red < 0.2) & (green > 0.7) & (blue > 0.8)) > 50, "no cyan flag markers on the page"
