"""The HTML report in headless Chromium, offline: every chart renders, tables are there, no JS errors."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from report_fixtures import synthetic_run

from kvcompare.report import build_report

pytestmark = pytest.mark.browser

VOID_TAGS = {
    "area",
    "base",
    "br",
    "col",
    "embed",
    "hr",
    "img",
    "input",
    "link",
    "meta",
    "source",
    "track",
    "wbr",
}


class RenderedPage(HTMLParser):
    """Per chart div, whether an <svg>/<canvas> was drawn into it; also the tables and #js-errors text."""

    def __init__(self) -> None:
        super().__init__()
        self.drawn: dict[str, bool] = {}
        self.tables = 0
        self.js_errors = ""
        self._open: list[str] = []  # non-void tags currently open
        self._chart: tuple[str, int] | None = None  # chart name and its depth while inside one
        self._in_errors_at: int | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "table":
            self.tables += 1
        if self._chart and tag in ("svg", "canvas"):
            self.drawn[self._chart[0]] = True
        if tag in VOID_TAGS:
            return
        self._open.append(tag)
        chart = attributes.get("data-chart")
        if tag == "div" and chart:
            self.drawn.setdefault(chart, False)
            self._chart = (chart, len(self._open))
        if attributes.get("id") == "js-errors":
            self._in_errors_at = len(self._open)

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID_TAGS or tag not in self._open:
            return
        while self._open and self._open.pop() != tag:
            pass
        if self._chart and len(self._open) < self._chart[1]:
            self._chart = None
        if self._in_errors_at and len(self._open) < self._in_errors_at:
            self._in_errors_at = None

    def handle_data(self, data: str) -> None:
        if self._in_errors_at:
            self.js_errors += data


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("Chromium not found: apt-get install chromium (Debian) to run the browser test")
    return found


def _render(chromium: str, page: Path, profile: Path) -> tuple[RenderedPage, str]:
    """Load the page headless, offline, with virtual time to render; returns the DOM afterwards and stderr."""
    result = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=10000",
            "--enable-logging=stderr",
            "--v=0",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rendered = RenderedPage()
    rendered.feed(result.stdout)
    return rendered, result.stderr


def _console_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line and ("Uncaught" in line or "Error" in line)]


@pytest.fixture(scope="module")
def report_html(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    paths = build_report(synthetic_run(tmp_path_factory.mktemp("run")))
    return paths.html, len(paths.charts)


def test_report_renders_offline_in_chromium(report_html: tuple[Path, int], tmp_path: Path) -> None:
    page, chart_count = report_html
    text = page.read_text()
    assert 'src="http' not in text and 'href="http' not in text  # nothing to fetch: the page is self-contained

    rendered, stderr = _render(_chromium(), page, tmp_path / "profile")
    assert len(rendered.drawn) == chart_count == 6
    assert all(rendered.drawn.values()), rendered.drawn
    # recommendations, A/A control, cell counts, run metadata, relative + absolute + physics per length (2 lengths);
    # no failures
    assert rendered.tables == 10
    assert rendered.js_errors.strip() == ""
    assert _console_errors(stderr) == []


def test_page_errors_would_be_seen(report_html: tuple[Path, int], tmp_path: Path) -> None:
    """Control: a script error lands in #js-errors and on the console, so the checks above can fail."""
    page, _ = report_html
    broken = tmp_path / "broken.html"
    broken.write_text(page.read_text().replace("</body>", "<script>undefinedReportFunction();</script></body>"))
    rendered, stderr = _render(_chromium(), broken, tmp_path / "profile")
    assert "undefinedReportFunction" in rendered.js_errors
    assert any("undefinedReportFunction" in line for line in _console_errors(stderr))
