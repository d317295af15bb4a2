"""What the CLI calls: build_report writes a run directory's report (index.html, report.md, charts), and
summary_table gives its relative-change tables as text for the terminal."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvcompare.analysis import ReportError, analyse, load_run, outcome, several_position_modes
from kvcompare.report.notices import noise_line
from kvcompare.report.render import render_html, render_markdown, table_md
from kvcompare.report.sections import assemble
from kvcompare.report.tables import relative_tables
from kvcompare.report.task_tables import retrieval_tables, task_summary_table

REPORT_DIR = "report"
CHARTS_DIR = "charts"


@dataclass(frozen=True)
class ReportPaths:
    """The files a report was written to: the HTML page, the Markdown file, the charts' PNGs and specs."""

    html: Path
    markdown: Path
    charts: list[Path]  # PNGs, one per drawn chart
    specs: list[Path]  # the same charts as Vega-Lite JSON
    skipped_charts: dict[str, str]  # chart name -> why it was not drawn


def build_report(run_dir: Path, out_dir: Path | None = None) -> ReportPaths:
    """Write the report of run_dir into out_dir (default RUN_DIR/report); partial runs, partial reports.

    Raises ReportError, creating nothing, when run_dir is not a results folder.
    """
    out_dir = run_dir / REPORT_DIR if out_dir is None else out_dir
    run = load_run(run_dir)  # before anything is created: a mistyped folder must not become an empty report
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ReportError(f"--out {out_dir} is a file, or inside one: choose a folder for the report") from None
    except PermissionError:
        raise ReportError(f"--out {out_dir}: cannot create it (permission denied): choose another folder") from None
    report = assemble(run, out_dir / CHARTS_DIR)
    html_path, markdown_path = out_dir / "index.html", out_dir / "report.md"
    html_path.write_text(render_html(report, out_dir), encoding="utf-8")
    markdown_path.write_text(render_markdown(report, out_dir), encoding="utf-8")
    return ReportPaths(
        html=html_path,
        markdown=markdown_path,
        charts=[chart.png for chart in report.charts.charts],
        specs=[chart.spec_path for chart in report.charts.charts],
        skipped_charts={chart.name: chart.reason for chart in report.charts.skipped},
    )


def summary_table(run_dir: Path) -> str:
    """The noise floor (or that speed was not measured), then the relative change against `full` for every
    length, the passkey retrieval table (one per variant of passkey) and the score across the other probe tasks,
    as Markdown for the terminal."""
    run = load_run(run_dir)
    analysis = analyse(run)
    tables = [table_md(table) for table in relative_tables(analysis)]
    modes = several_position_modes(run.retrieval)
    passkey, others = run.passkey, run.other_probes
    if not passkey.is_empty():
        tables.extend(table_md(table) for table in retrieval_tables(passkey, modes))
    if not others.is_empty():
        tables.append(table_md(task_summary_table(others, modes)))
    ended = outcome(run)
    if ended.nothing_succeeded and ended.failed:
        tables = tables or [f"no successful cell: all {ended.failed} cells failed ({FAILED_HINT})"]
    if ended.nothing_compared:
        tables.append(f"nothing compared: all {ended.compared_failed} cells but `full`'s failed ({FAILED_HINT})")
    return "\n".join([noise_line(analysis.noise, analysis.measured) + "\n", *(tables or ["no finished cells"])])


#: Where a failed cell's error is, for the terminal.
FAILED_HINT = "their errors and tracebacks are in the `error` and `traceback` columns of cells/*.parquet"
