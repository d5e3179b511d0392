"""The report at a reader's width: rendered by headless Chromium at 1000 and 1280 px,
no element runs past the page and no text is clipped (issue 37: a fit message and the
protocol's JSON ran off the page). A planted overflow shows the check can fail."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from analysis import report

CHECK = """<script>
window.addEventListener('load', () => {
  const width = document.documentElement.clientWidth;
  const wide = [], clipped = [];
  for (const el of document.querySelectorAll('body *')) {
    const r = el.getBoundingClientRect();
    const what = el.tagName + ': ' + (el.textContent || '').trim().slice(0, 60);
    if (r.width > 0 && r.right > width + 1) wide.push(what);
    // Content wider than its box: cut off where overflow hides it, spilling over
    // its neighbours (or the page's edge) where it does not.
    if (el.clientWidth > 0 && el.scrollWidth > el.clientWidth + 1) {
      const style = getComputedStyle(el);
      (['hidden', 'clip'].includes(style.overflowX) ? clipped : wide).push(what);
    }
  }
  // Figures are saved at 130 dpi with fonts of 9 pt and up: shown at fewer than 96
  // CSS px an inch (scaled down to the page), their text reads smaller than 9 pt.
  const shrunk = [];
  for (const img of document.querySelectorAll('img')) {
    const perInch = img.getBoundingClientRect().width / img.naturalWidth * 130;
    if (perInch < 95.5) shrunk.push(img.alt + ': ' + perInch.toFixed(0) + ' px/in');
  }
  const page = document.documentElement.scrollWidth;
  document.body.setAttribute('data-layout', JSON.stringify(
    {width, page, wide: wide.slice(0, 10), clipped: clipped.slice(0, 10), shrunk}));
});
</script>"""


def layout(page: Path, width: int) -> dict:
    """What Chromium measured on ``page`` at ``width`` px."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run does)")
    probe = page.with_name(f"layout-{width}.html")
    probe.write_text(page.read_text().replace("</body>", CHECK + "</body>"))
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                          f"--window-size={width},3000", "--virtual-time-budget=5000",
                          "--dump-dom", probe.as_uri()], check=True, capture_output=True,
                         text=True, timeout=120).stdout
    found = re.search(r"data-layout=\"([^\"]*)\"", dom)
    assert found, "the layout script did not run"
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    from test_analysis import _write_study, synthetic_rows

    folder = tmp_path_factory.mktemp("layout")
    rows = synthetic_rows(seeds=(0, 1, 2), head_depths=(2, 3), students=True)
    return Path(report.write_report(_write_study(folder, rows)))


@pytest.mark.parametrize("width", [1000, 1280])
def test_nothing_runs_off_the_page_or_is_clipped(page, width):
    seen = layout(page, width)
    assert seen["width"] <= width and seen["page"] <= seen["width"], seen  # no sideways scroll
    assert seen["wide"] == [] and seen["clipped"] == [], seen
    assert seen["shrunk"] == [], seen  # every figure's text at 9 pt or more on the page


def test_a_planted_overflow_is_caught(page, tmp_path):
    """Mutation: one unbreakable line wider than the page."""
    bad = tmp_path / "report.html"
    bad.write_text(page.read_text().replace(
        "</h1>", "</h1><div style='white-space:nowrap'>" + "overflow " * 400 + "</div>", 1))
    seen = layout(bad, 1000)
    assert any(w.startswith("DIV: overflow") for w in seen["wide"]), seen
    assert seen["page"] > seen["width"]
