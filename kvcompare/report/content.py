"""Everything a report says, assembled once so that the HTML page and the Markdown file cannot disagree."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvcompare.report.charts import ChartSet, build_charts
from kvcompare.report.display import (
    LengthTables,
    Table,
    absolute_table,
    cell_counts,
    counts_table,
    failed_table,
    metadata_table,
    recommendation_table,
    relative_table,
)
from kvcompare.report.load import RunData
from kvcompare.report.protocol import PROTOCOL_MD
from kvcompare.report.recommend import ALL_RULES, recommend
from kvcompare.report.tables import baseline_lengths, position_perplexity, summary


@dataclass(frozen=True)
class ReportContent:
    title: str
    protocol_md: str
    metadata: Table
    counts: Table
    lengths: list[LengthTables]
    rules: dict[str, str]  # scenario -> rule text
    recommendations: Table
    failed: Table
    problems: list[str]  # unreadable files
    charts: ChartSet


def assemble(run: RunData, charts_dir: Path) -> ReportContent:
    """Compute tables, recommendations and charts (written to charts_dir) for one run."""
    stats = summary(run.cells)
    with_baseline = baseline_lengths(run.cells)
    lengths = sorted(stats["seq_len"].drop_nulls().unique().to_list())
    return ReportContent(
        title=f"KV-cache eviction report: {run.meta.get('run_id', run.run_dir.name)}",
        protocol_md=PROTOCOL_MD,
        metadata=metadata_table(run.meta),
        counts=counts_table(cell_counts(run.cells, run.meta)),
        lengths=[
            LengthTables(n, absolute_table(stats, n), relative_table(stats, n, n in with_baseline)) for n in lengths
        ],
        rules={rule.scenario: rule.text for rule in ALL_RULES},
        recommendations=recommendation_table(recommend(stats, with_baseline)),
        failed=failed_table(run.cells),
        problems=run.problems,
        charts=build_charts(stats, position_perplexity(run.curves, run.cells), charts_dir),
    )
