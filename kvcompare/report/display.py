"""Turn numbers into labelled text tables that both the HTML and the Markdown writer render as they are."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import polars as pl

from kvcompare.report.metrics import METRIC_BY_COLUMN, METRICS, RELATIVE_METRICS, Metric
from kvcompare.report.recommend import Recommendation
from kvcompare.report.tables import BASELINE_POLICY, ok_cells

MISSING = "–"

RELATIVE_NOTE = (
    "Relative change = 100 × (policy − full) / full, computed per sample against the same sample's `full` "
    "baseline (same length, passage and position mode) and then averaged over the samples that have a "
    "baseline (paired n). Signs: negative TTFT/TPOT = faster; positive throughput = faster; "
    "positive PPL = worse; accuracy is in % of the baseline accuracy (−2.8% = 2.8% lower, relative)."
)
ABSOLUTE_NOTE = "Mean ± standard deviation over samples (successful cells only); n = samples."


@dataclass(frozen=True)
class Table:
    """A titled grid of already formatted cells; `empty` is shown instead when there are no rows."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""
    empty: str = "none"


@dataclass(frozen=True)
class CellCounts:
    planned: int | None
    ok: int
    failed: int

    @property
    def missing(self) -> int | None:
        return None if self.planned is None else max(self.planned - self.ok - self.failed, 0)


@dataclass(frozen=True)
class LengthTables:
    seq_len: int
    absolute: Table
    relative: Table


def config_name(row: dict[str, Any]) -> str:
    """'streaming @ 64', plus ', positions=shift' when positions are not the true ones; 'full' for full."""
    name = row["policy_label"] if row["cache_size"] is None else f"{row['policy_label']} @ {row['cache_size']}"
    return name if row["positions"] in (None, "true") else f"{name}, positions={row['positions']}"


def policy_name(row: dict[str, Any]) -> str:
    """config_name without the cache limit, for tables that show the limit in a column of its own."""
    return config_name({**row, "cache_size": None})


def format_value(value: float | None, metric: Metric) -> str:
    return MISSING if value is None else f"{value * metric.scale:.{metric.decimals}f}"


def format_change(value: float | None) -> str:
    return MISSING if value is None else f"{value:+.1f}%"


def _mean_std(row: dict[str, Any], metric: Metric) -> str:
    mean, std = row[f"{metric.column}_mean"], row[f"{metric.column}_std"]
    return format_value(mean, metric) if std is None else f"{format_value(mean, metric)} ± {format_value(std, metric)}"


def absolute_table(summary: pl.DataFrame, seq_len: int) -> Table:
    rows = summary.filter(pl.col("seq_len") == seq_len).iter_rows(named=True)
    return Table(
        title=f"Absolute values, length {seq_len} tokens",
        headers=["Policy", "Cache limit (tokens)", "n", *(m.label for m in METRICS)],
        rows=[
            [
                policy_name(r),
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


def cell_counts(cells: pl.DataFrame, meta: dict[str, Any]) -> CellCounts:
    planned = meta.get("cells_planned")
    return CellCounts(
        planned=planned if isinstance(planned, int) else None,
        ok=ok_cells(cells).height,
        failed=cells.filter(pl.col("status") != "ok").height,
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


def failed_table(cells: pl.DataFrame) -> Table:
    failed = cells.filter(pl.col("status") != "ok").sort(
        ["seq_len", "policy_label", "cache_size", "sample_id"], nulls_last=False
    )
    rows = [
        [
            config_name(r),
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
