"""Everything a report says, assembled once so that the HTML page and the Markdown file cannot disagree."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from kvcompare.protocol import PROTOCOL_MD
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
from kvcompare.report.recommend import ALL_RULES, recommend
from kvcompare.report.tables import baseline_lengths, ok_cells, position_perplexity, summary

TITLE = "KV-cache eviction report"


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
    notices: list[str] = field(default_factory=list)  # shown at the top of both renderings, before anything else


def report_title(run_dir: Path, meta: dict[str, Any]) -> str:
    """The results folder's name, which a reader can find; run.json's run id only when it differs."""
    folder = run_dir.name or run_dir.resolve().name
    run_id = meta.get("run_id")
    if run_id is None or str(run_id) == folder:
        return f"{TITLE}: {folder}"
    return f"{TITLE}: {folder} (run id {run_id})"


def _join(values: list[str]) -> str:
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " and " + values[-1]


def beyond_context_notices(cells: pl.DataFrame) -> list[str]:
    """One sentence per trained-positions value for lengths whose latency pass ran past the model's positions."""
    beyond = ok_cells(cells).filter(pl.col("beyond_context").fill_null(False))
    notices = []
    for (max_positions,), group in beyond.group_by(["max_positions"], maintain_order=True):
        lengths = sorted(group["seq_len"].drop_nulls().unique().to_list())
        if not lengths:
            continue
        subject = f"Length {lengths[0]} goes" if len(lengths) == 1 else f"Lengths {_join([str(n) for n in lengths])} go"
        positions = "trained positions" if max_positions is None else f"{max_positions} trained positions"
        notices.append(
            f"{subject} beyond the model's {positions} (prompt + generated tokens of the latency pass): "
            "the full cache is then outside what the model was trained for, which is an experiment, "
            "not a typical use."
        )
    return sorted(notices)


def assemble(run: RunData, charts_dir: Path) -> ReportContent:
    """Compute tables, recommendations and charts (written to charts_dir) for one run."""
    stats = summary(run.cells)
    with_baseline = baseline_lengths(run.cells)
    lengths = sorted(stats["seq_len"].drop_nulls().unique().to_list())
    return ReportContent(
        title=report_title(run.run_dir, run.meta),
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
        notices=beyond_context_notices(run.cells),
    )
