"""report.md: the report as Markdown, with the chart PNGs linked relative to the file."""

from __future__ import annotations

import os
from pathlib import Path

from kvcompare.report.content import ReportContent
from kvcompare.report.display import Table

RELATIVE_METHOD = (
    "Relative changes are paired: each sample is compared with the same sample's `full` baseline, "
    "then the per-sample changes are averaged over samples."
)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table_md(table: Table, level: int = 3) -> str:
    lines = [f"{'#' * level} {table.title}", ""]
    if table.rows:
        lines += [
            "| " + " | ".join(_cell(h) for h in table.headers) + " |",
            "|" + "---|" * len(table.headers),
        ]
        lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in table.rows]
    else:
        lines.append(f"_{table.empty}_")
    if table.note:
        lines += ["", f"_{table.note}_"]
    return "\n".join(lines) + "\n"


def render_markdown(content: ReportContent, out_dir: Path) -> str:
    """The whole report; links are relative to out_dir, where report.md is written."""
    parts = [
        f"# {content.title}\n",
        *(f"> **Note:** {notice}\n" for notice in content.notices),
        "## Protocol\n",
        content.protocol_md.strip() + "\n",
        "## Recommendations\n",
        "Rules (applied to the mean over samples):\n",
    ]
    parts.append("\n".join(f"- **{scenario}**: {text}" for scenario, text in content.rules.items()) + "\n")
    parts.append(table_md(content.recommendations))
    parts.append("## Results by length\n")
    parts.append(RELATIVE_METHOD + "\n")
    for length in content.lengths:
        parts += [table_md(length.relative), table_md(length.absolute)]
    if not content.lengths:
        parts.append("_No successful cell: nothing to tabulate._\n")
    parts.append("## Charts\n")
    for chart in content.charts.charts:
        png, spec = (Path(os.path.relpath(p, out_dir)).as_posix() for p in (chart.png, chart.spec_path))
        parts.append(f"### {chart.title}\n\n![{chart.title}]({png})\n\n[Vega-Lite spec]({spec})\n")
    parts += [f"- {s.title} (`{s.name}`) not drawn: {s.reason}\n" for s in content.charts.skipped]
    parts.append("## Missing / failed cells\n")
    parts += [table_md(content.counts), table_md(content.failed)]
    parts += [f"- unreadable: {problem}\n" for problem in content.problems]
    parts += ["## Run\n", table_md(content.metadata)]
    return "\n".join(parts)
