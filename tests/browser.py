"""Snakemake's HTML report, read as data and rendered by headless Chromium.

The report is one page whose script draws the view the reader clicks to; :func:`render` loads a copy with a
small script appended that clicks through ``steps`` (menu entries by their text, ``row:<text>`` for the view
button of the result row containing the text) and returns the DOM Chromium ends with.
"""

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CLICKS = """<script>
(function () {
  const steps = %s;
  function mark(t) { document.body.insertAdjacentHTML("beforeend", "<p class='missing-step'>" + t + "</p>"); }
  function click(t) {
    if (t.startsWith("row:")) {
      const row = Array.from(document.querySelectorAll("tr")).find(r => r.textContent.includes(t.slice(4)));
      const a = row && row.querySelector("a");
      return a ? a.click() : mark(t);
    }
    const els = Array.from(document.querySelectorAll("a, li, button, span, td, div"))
      .filter(el => el.textContent.trim() === t);
    return els.length ? els[els.length - 1].click() : mark(t);
  }
  let i = 0;
  function next() { if (i < steps.length) { click(steps[i++]); setTimeout(next, 1000); } }
  setTimeout(next, 1500);
})();
</script>"""


def entries(report: Path) -> dict:
    """The report's results: path -> {caption (HTML), labels, data_uri, ...}; and its categories."""
    text = report.read_text()
    results = json.loads(re.search(r"var results = (\{.*?\});\s*</script>", text, re.S)[1])
    categories = json.loads(re.search(r"var categories = (\{.*?\});", text, re.S)[1])
    return {"results": results, "categories": categories}


def decoded(data_uri: str) -> str:
    return base64.b64decode(data_uri.split("base64,", 1)[1]).decode()


def chromium() -> str | None:
    """Chromium's command, or a skip (a failure under CI=true, where it must be installed)."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed; CI needs it to render the Snakemake report (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium); the report was checked as data only")
    return exe


def render(report: Path, steps: list[str], tmp: Path) -> str:
    """The DOM after clicking through ``steps`` in a copy of ``report``."""
    text = report.read_text()
    at = text.rfind("</body>")
    page = tmp / f"{report.stem}-{len(list(tmp.glob('*.html')))}.html"
    page.write_text(text[:at] + CLICKS % json.dumps(steps) + text[at:])
    out = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=15000",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout
