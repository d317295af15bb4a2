"""One ordered list of sections, walked alike by the HTML page and the Markdown file; the `full` baseline's name."""

from __future__ import annotations

import json
import re
from html import unescape
from pathlib import Path

import pytest
from report_fixtures import cell, channels, curve_rows, failed_cell, spec_rows, write_run

from kvcompare.analysis import config_name, load_run, policy_name
from kvcompare.report import ReportPaths, build_report
from kvcompare.report.sections import assemble
from kvcompare.report.wording import BASELINE_PER_MODE, BASELINE_POSITIONS, NO_RESULTS

SECTIONS = ["Summary", "Results by length", "Charts", "Missing / failed cells", "Run", "Protocol"]


def _headings_md(text: str) -> list[tuple[int, str]]:
    return [(len(m.group(1)), m.group(2)) for m in re.finditer(r"^(#{2,3}) (.*)$", text, flags=re.M)]


def _headings_html(text: str) -> list[tuple[int, str]]:
    """Headings of the page body, not of the inlined Vega bundle (which has templates of its own)."""
    body = text.split("<body>", 1)[1].split("<script>", 1)[0]
    return [(int(m.group(1)), unescape(m.group(2))) for m in re.finditer(r"<h([23])>(.*?)</h\1>", body)]


def _with_curves(rows: list[dict]) -> list[dict]:
    return [curve for row in rows if row["status"] == "ok" for curve in curve_rows(row)]


def _mode(rows: list[dict], positions: str) -> list[dict]:
    """The same cells measured in another position mode (own cell ids)."""
    return [{**row, "positions": positions, "cell_id": f"{row['cell_id']}-{positions}"} for row in rows]


ONE_LENGTH = [cell("full", None, 256, 0), cell("l2", 32, 256, 0, ppl=44.0), cell("recent", 64, 256, 0, ppl=42.0)]


def _report(run_dir: Path, rows: list[dict], curves: bool = True) -> ReportPaths:
    return build_report(write_run(run_dir, rows, _with_curves(rows) if curves else None))


@pytest.mark.parametrize(
    "rows",
    [
        pytest.param(ONE_LENGTH, id="complete"),
        pytest.param([failed_cell("l2", 32, 256, 0, error="boom")], id="nothing-ok"),
        pytest.param([*ONE_LENGTH, failed_cell("l2", 64, 512, 0, error="boom")], id="with-failures"),
    ],
)
def test_html_and_markdown_show_the_same_sections_in_the_same_order(tmp_path: Path, rows: list[dict]) -> None:
    paths = _report(tmp_path / "run", rows)
    html, markdown = paths.html.read_text(), paths.markdown.read_text()
    assert _headings_html(html) == _headings_md(markdown)
    assert [text for level, text in _headings_md(markdown) if level == 2] == SECTIONS
    report = assemble(load_run(tmp_path / "run"), tmp_path / "charts")
    assert [section.heading for section in report.sections] == SECTIONS


def test_empty_state_is_said_once_by_each_rendering(tmp_path: Path) -> None:
    paths = _report(tmp_path, [failed_cell("l2", 32, 256, 0, error="boom")], curves=False)
    html, markdown = paths.html.read_text(), paths.markdown.read_text()
    assert html.count(NO_RESULTS) == 1 and f"<p><em>{NO_RESULTS}</em></p>" in html
    assert markdown.count(NO_RESULTS) == 1 and f"_{NO_RESULTS}_" in markdown


def test_remarks_render_inline_code_in_both(tmp_path: Path) -> None:
    """A chart-not-drawn remark is written once, as inline Markdown; the HTML shows its `code` as code."""
    paths = _report(tmp_path, [cell("l2", 32, 256, 0)], curves=False)
    reason = "not drawn: no configuration has a {} baseline to compare against"
    assert reason.format("<code>full</code>") in paths.html.read_text()
    assert "- Quality and speed against the cache limit (`cache_tradeoff`) " + reason.format("`full`") in (
        paths.markdown.read_text()
    )


def _baseline_rows(markdown: str) -> list[str]:
    """The Policy cell of every baseline row (no cache limit) in the absolute tables."""
    return re.findall(r"^\| (full[^|]*) \| – \|", markdown, flags=re.M)


def test_shift_baseline_is_labelled_full(tmp_path: Path) -> None:
    rows = [
        *_mode(ONE_LENGTH, "shift"),
        failed_cell("full", None, 256, 1, error="boom") | {"positions": "shift"},
    ]
    paths = _report(tmp_path, rows)
    html, markdown = paths.html.read_text(), paths.markdown.read_text()
    assert _baseline_rows(markdown) == ["full"]
    assert "| full | 256 | 1 |" in markdown  # the failed baseline cell, too
    assert "| l2, positions=shift | 32 |" in markdown  # evicting policies keep their mode
    for text in (html, markdown, *(spec.read_text() for spec in paths.specs)):
        assert "full, positions=shift" not in text
    # said once, in the results section's introduction, by each rendering
    assert markdown.count(BASELINE_POSITIONS) == 1
    assert html.count("evicts nothing, so the position mode does not apply to it") == 1
    assert BASELINE_PER_MODE not in markdown
    spec = json.loads(next(p for p in paths.specs if p.name == "ppl_by_position.vl.json").read_text())
    series = {row["series"] for row in spec_rows(spec) if row["role"] == "baseline"}
    assert series == {"full"}


def test_two_position_modes_name_the_baseline_of_each(tmp_path: Path) -> None:
    paths = _report(tmp_path, [*ONE_LENGTH, *_mode(ONE_LENGTH, "shift")])
    markdown = paths.markdown.read_text()
    assert _baseline_rows(markdown) == ["full (for positions=shift)", "full (for positions=true)"]
    assert markdown.count(BASELINE_PER_MODE) == 1
    spec = json.loads(next(p for p in paths.specs if p.name == "metrics_by_config_256.vl.json").read_text())
    domain = channels(spec, "color")[0]["scale"]["domain"]
    assert domain[:2] == ["full (for positions=shift)", "full (for positions=true)"]


@pytest.mark.parametrize(
    ("positions", "several_modes", "config", "policy"),
    [
        ("true", False, "full", "full"),
        ("shift", False, "full", "full"),
        ("shift", True, "full (for positions=shift)", "full (for positions=shift)"),
        ("true", True, "full (for positions=true)", "full (for positions=true)"),
    ],
)
def test_baseline_names(positions: str, several_modes: bool, config: str, policy: str) -> None:
    row = {"policy": "full", "policy_label": "full", "cache_size": None, "positions": positions}
    assert config_name(row, several_modes) == config and policy_name(row, several_modes) == policy


@pytest.mark.parametrize("several_modes", [False, True])
def test_evicting_names_do_not_depend_on_the_run(several_modes: bool) -> None:
    row = {"policy": "l2", "policy_label": "l2:mode=random", "cache_size": 64, "positions": "shift"}
    assert config_name(row, several_modes) == "l2:mode=random @ 64, positions=shift"
    assert policy_name(row, several_modes) == "l2:mode=random, positions=shift"
    assert config_name({**row, "positions": "true"}, several_modes) == "l2:mode=random @ 64"


def test_prose_cells_wrap_and_figures_do_not() -> None:
    from kvcompare.report.document import Table
    from kvcompare.report.render import PROSE_CHARS, table_html

    reason = "nothing beat full significantly on TPOT at this length (no configuration qualifies)"
    html = table_html(Table("Recommended", ["Scenario", "Choice", "Evidence"], [["speed first", reason, "–"]]))
    assert len(reason) > PROSE_CHARS
    assert f'<td class="prose">{reason}</td>' in html and "<td>speed first</td>" in html
