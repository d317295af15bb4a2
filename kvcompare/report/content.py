"""What a report says, in order: its sections with their headings, notes, empty-state text and formatted tables.

A report is a list of Section objects; the HTML page and the Markdown file (render.py) walk that one list, so
neither can add, drop, reorder or reword a section. Text is inline Markdown (`code`, **bold**) throughout.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import polars as pl

from kvcompare.protocol import PROTOCOL_MD
from kvcompare.report.charts import ChartFile, ChartSet, build_charts
from kvcompare.report.data import (
    ALL_RULES,
    BASELINE_POLICY,
    METRIC_BY_COLUMN,
    METRICS,
    RELATIVE_METRICS,
    Metric,
    Recommendation,
    RunData,
    baseline_lengths,
    config_name,
    failed_cells,
    lengths_in,
    ok_cells,
    policy_name,
    position_perplexity,
    recommend,
    several_position_modes,
    summary,
)

TITLE = "KV-cache eviction report"
MISSING = "–"

RELATIVE_METHOD = (
    "Relative changes are paired: each sample is compared with the same sample's `full` baseline, "
    "then the per-sample changes are averaged over samples."
)
#: Said once, in the results section: why the baseline's rows carry no position mode.
BASELINE_POSITIONS = (
    "The `full` baseline evicts nothing, so the position mode does not apply to it: it is labelled `full`."
)
#: Added where a run has several position modes, and so one baseline per mode.
BASELINE_PER_MODE = (
    "This run has several position modes; `full` is measured once per mode, as the baseline that mode's "
    "policies are paired with, and named after it: `full (for positions=…)`."
)
RELATIVE_NOTE = (
    "Relative change = 100 × (policy − full) / full, computed per sample against the same sample's `full` "
    "baseline (same length, passage and position mode) and then averaged over the samples that have a "
    "baseline (paired n). Signs: negative TTFT/TPOT = faster; positive throughput = faster; "
    "positive PPL = worse; accuracy is in % of the baseline accuracy (−2.8% = 2.8% lower, relative)."
)
ABSOLUTE_NOTE = "Mean ± standard deviation over samples (successful cells only); n = samples."
RULES_LEAD = "Rules (applied to the mean over samples):"
NO_RESULTS = "No successful cell: nothing to tabulate."


# --- What a section can hold --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Table:
    """A titled grid of already formatted cells; `empty` is shown instead when there are no rows."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""
    empty: str = "none"


@dataclass(frozen=True)
class Markdown:
    """Headings, bullet lists and paragraphs of Markdown, shown as written (the protocol)."""

    text: str


@dataclass(frozen=True)
class Definitions:
    """A lead sentence and a list of terms, each with what it means (the recommendation rules)."""

    lead: str
    items: dict[str, str]


@dataclass(frozen=True)
class Remarks:
    """A list of short remarks (charts not drawn, files not read); nothing at all when empty."""

    items: list[str]


Block: TypeAlias = Table | Markdown | Definitions | Remarks | ChartFile


@dataclass(frozen=True)
class Section:
    heading: str
    blocks: Sequence[Block]
    intro: str = ""  # a paragraph under the heading
    empty: str = ""  # shown instead of the blocks when there are none


@dataclass(frozen=True)
class Report:
    title: str
    sections: list[Section]
    charts: ChartSet  # the files written, also held by the Charts section
    notices: list[str] = field(default_factory=list)  # shown at the top, before any section


# --- Numbers formatted into tables ---------------------------------------------------------------------------


def format_value(value: float | None, metric: Metric) -> str:
    return MISSING if value is None else f"{value * metric.scale:.{metric.decimals}f}"


def format_change(value: float | None) -> str:
    return MISSING if value is None else f"{value:+.1f}%"


def _mean_std(row: dict[str, Any], metric: Metric) -> str:
    mean, std = row[f"{metric.column}_mean"], row[f"{metric.column}_std"]
    return format_value(mean, metric) if std is None else f"{format_value(mean, metric)} ± {format_value(std, metric)}"


def absolute_table(summary: pl.DataFrame, seq_len: int, several_modes: bool = False) -> Table:
    rows = summary.filter(pl.col("seq_len") == seq_len).iter_rows(named=True)
    return Table(
        title=f"Absolute values, length {seq_len} tokens",
        headers=["Policy", "Cache limit (tokens)", "n", *(m.label for m in METRICS)],
        rows=[
            [
                policy_name(r, several_modes),
                MISSING if r["cache_size"] is None else str(r["cache_size"]),
                str(r["n"]),
                *(_mean_std(r, m) for m in METRICS),
            ]
            for r in rows
        ],
        note=ABSOLUTE_NOTE,
    )


def relative_table(summary: pl.DataFrame, seq_len: int, has_baseline: bool) -> Table:
    """Changes vs `full`; a configuration whose samples never met a baseline says so in its row."""
    title = f"Relative change vs full, length {seq_len} tokens"
    headers = ["Policy", "Cache limit (tokens)", "paired n", *(f"Δ {m.title} (%)" for m in RELATIVE_METRICS)]
    if not has_baseline:
        return Table(
            title,
            headers,
            [],
            RELATIVE_NOTE,
            empty=f"no baseline: no successful `full` cell at length {seq_len}, so no relative change",
        )
    rows = []
    for r in summary.filter((pl.col("seq_len") == seq_len) & (pl.col("policy") != BASELINE_POLICY)).iter_rows(
        named=True
    ):
        paired = r["n_paired"] is not None
        changes = [format_change(r[m.change_column]) if paired else "no baseline" for m in RELATIVE_METRICS]
        rows.append([policy_name(r), str(r["cache_size"]), str(r["n_paired"] or 0), *changes])
    return Table(title, headers, rows, RELATIVE_NOTE, empty="no evicting configuration at this length")


def relative_tables(cells: pl.DataFrame) -> list[Table]:
    """The relative-change table of every length, as `kvcompare run` prints them."""
    stats, with_baseline = summary(cells), baseline_lengths(cells)
    return [relative_table(stats, n, n in with_baseline) for n in lengths_in(stats)]


def _evidence(row: dict[str, Any]) -> str:
    parts = [
        f"PPL {format_change(row['ppl_change_pct'])}"
        if row["ppl_change_pct"] is not None
        else "PPL change: no baseline"
    ]
    parts += [
        f"{m.title} {format_change(row[m.change_column])}"
        for m in RELATIVE_METRICS
        if m.column != "ppl" and row[m.change_column] is not None
    ]
    kv = METRIC_BY_COLUMN["peak_kv_bytes"]
    parts.append(f"{kv.title} {format_value(row['peak_kv_bytes_mean'], kv)} {kv.unit}")
    return ", ".join(parts)


def recommendation_table(recommendations: list[Recommendation]) -> Table:
    rows = [
        [
            r.scenario,
            str(r.seq_len),
            config_name(r.choice) if r.choice else r.reason,
            _evidence(r.choice) if r.choice else MISSING,
        ]
        for r in recommendations
    ]
    return Table(
        "Recommended configurations",
        ["Scenario", "Length (tokens)", "Choice", "Evidence (mean over samples)"],
        rows,
        empty="no configuration to recommend: no successful evicting cells",
    )


@dataclass(frozen=True)
class CellCounts:
    planned: int | None
    ok: int
    failed: int

    @property
    def missing(self) -> int | None:
        return None if self.planned is None else max(self.planned - self.ok - self.failed, 0)


def cell_counts(cells: pl.DataFrame, meta: dict[str, Any]) -> CellCounts:
    planned = meta.get("cells_planned")
    return CellCounts(
        planned=planned if isinstance(planned, int) else None,
        ok=ok_cells(cells).height,
        failed=failed_cells(cells).height,
    )


def counts_table(counts: CellCounts) -> Table:
    def show(value: int | None) -> str:
        return "unknown (no run.json)" if value is None else str(value)

    return Table(
        "Cells",
        ["planned", "ok", "failed", "missing (planned − ok − failed)"],
        [[show(counts.planned), str(counts.ok), str(counts.failed), show(counts.missing)]],
    )


def _one_line(text: str | None, limit: int = 500) -> str:
    """Tracebacks collapsed to one line that fits a table cell; the full text stays in the Parquet file."""
    if not text:
        return MISSING
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def failed_table(cells: pl.DataFrame, several_modes: bool = False) -> Table:
    failed = failed_cells(cells).sort(["seq_len", "policy_label", "cache_size", "sample_id"], nulls_last=False)
    rows = [
        [
            config_name(r, several_modes),
            str(r["seq_len"]),
            str(r["sample_id"]),
            r["cell_id"] or MISSING,
            _one_line(r["error"]),
        ]
        for r in failed.iter_rows(named=True)
    ]
    return Table(
        "Failed cells",
        ["Configuration", "Length (tokens)", "Sample", "Cell id", "Error"],
        rows,
        empty="no failed cells",
    )


def _flat(prefix: str, value: Any) -> list[tuple[str, str]]:
    if isinstance(value, dict):
        return [item for key, sub in value.items() for item in _flat(f"{prefix}.{key}" if prefix else key, sub)]
    return [(prefix, value if isinstance(value, str) else json.dumps(value))]


def metadata_table(meta: dict[str, Any]) -> Table:
    """run.json flattened to dotted keys, so nothing the runner recorded is hidden."""
    return Table("Run metadata", ["Key", "Value"], [list(item) for item in _flat("", meta)], empty="no run.json found")


# --- The report, section by section --------------------------------------------------------------------------


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
        lengths = lengths_in(group)
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


def assemble(run: RunData, charts_dir: Path) -> Report:
    """Compute tables, recommendations and charts (written to charts_dir) for one run, in reading order."""
    stats = summary(run.cells)
    with_baseline = baseline_lengths(run.cells)
    several_modes = several_position_modes(run.cells)
    charts = build_charts(stats, position_perplexity(run.curves, run.cells), charts_dir, several_modes)
    results = [
        table
        for n in lengths_in(stats)
        for table in (relative_table(stats, n, n in with_baseline), absolute_table(stats, n, several_modes))
    ]
    baseline_note = f"{BASELINE_POSITIONS} {BASELINE_PER_MODE}" if several_modes else BASELINE_POSITIONS
    sections = [
        Section("Protocol", [Markdown(PROTOCOL_MD)]),
        Section(
            "Recommendations",
            [
                Definitions(RULES_LEAD, {rule.scenario: rule.text for rule in ALL_RULES}),
                recommendation_table(recommend(stats, with_baseline)),
            ],
        ),
        Section("Results by length", results, intro=f"{RELATIVE_METHOD} {baseline_note}", empty=NO_RESULTS),
        Section(
            "Charts",
            [
                *charts.charts,
                Remarks([f"{s.title} (`{s.name}`) not drawn: {s.reason}" for s in charts.skipped]),
            ],
        ),
        Section(
            "Missing / failed cells",
            [
                counts_table(cell_counts(run.cells, run.meta)),
                failed_table(run.cells, several_modes),
                Remarks([f"unreadable: {problem}" for problem in run.problems]),
            ],
        ),
        Section("Run", [metadata_table(run.meta)]),
    ]
    return Report(report_title(run.run_dir, run.meta), sections, charts, beyond_context_notices(run.cells))
