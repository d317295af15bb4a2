"""The table printed at the end of `kvcompare run`: each configuration against the baseline."""

from __future__ import annotations

from pathlib import Path

from kvcompare.report.display import relative_table
from kvcompare.report.load import load_run
from kvcompare.report.markdown import table_md
from kvcompare.report.tables import baseline_lengths, summary


def summary_table(run_dir: Path) -> str:
    """Relative change against `full` for every length, as Markdown tables for the terminal."""
    run = load_run(run_dir)
    stats = summary(run.cells)
    with_baseline = baseline_lengths(run.cells)
    lengths = sorted(stats["seq_len"].drop_nulls().unique().to_list())
    if not lengths:
        return "no finished cells"
    return "\n".join(table_md(relative_table(stats, n, n in with_baseline)) for n in lengths)
