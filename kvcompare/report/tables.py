"""The report's tables, each a document.Table of formatted cells: absolute values, changes against `full`, the
physics of a decode step, the prefill setting's speed and memory, the A/A control, the recommendations, cell counts
and failures, run metadata, and the budget columns every table shares (the probe tasks' tables are in
kvcompare.report.task_tables)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import polars as pl

from kvcompare.analysis import (
    BASELINE_POLICY,
    CHANGES,
    EVERYTHING,
    METRIC_BY_COLUMN,
    METRICS,
    NOISE_CHANGES,
    PPL_CHANGE,
    PPL_TASK,
    RETRIEVAL_CONFIG_KEYS,
    Analysis,
    Measured,
    NoiseFloor,
    Recommendation,
    config_name,
    estimate,
    failed_cells,
    lengths_in,
    ok_cells,
    policy_name,
    removed_words,
)
from kvcompare.report.document import Table
from kvcompare.report.formatting import (
    MIB,
    MISSING,
    TPOT_MS,
    format_absolute,
    format_bandwidth,
    format_change,
    format_estimate,
    format_median_interval,
    format_pct,
    format_row_change,
    format_value,
    one_line,
)
from kvcompare.report.wording import (
    ABSOLUTE_NOTE,
    ABSOLUTE_NOTE_QUALITY,
    NOISE_NOTE,
    PHYSICS_NOTE,
    PREFILL_TABLE_NOTE,
    PREFILL_TABLE_NOTE_QUALITY,
    RELATIVE_NOTE,
    RELATIVE_NOTE_QUALITY,
)
from kvcompare.stats import Estimate

# --- Figures and changes, one table per length ---------------------------------------------------------------


def _at(summary: pl.DataFrame, seq_len: int, evicting_only: bool = False) -> list[dict[str, Any]]:
    rows = summary.filter(pl.col("seq_len") == seq_len)
    return list((rows.filter(pl.col("policy") != BASELINE_POLICY) if evicting_only else rows).iter_rows(named=True))


def _limit(row: dict[str, Any]) -> str:
    """The cache limit; for probes a ratio gave (a null `cache_size`, retrieval.by_budget), the limits they ran
    under: one value, or the lowest and highest ('57–73')."""
    low, high = row.get("cache_size_min"), row.get("cache_size_max")
    if row["cache_size"] is None and row.get("ratio") is not None and low is not None:
        return str(low) if low == high else f"{low}–{high}"
    return MISSING if row["cache_size"] is None else str(row["cache_size"])


LIMIT_HEADER = "Cache limit (tokens)"
RATIO_HEADER = "Compression ratio (share of the context removed)"


def with_ratios(frame: pl.DataFrame) -> bool:
    """Whether ``frame``'s configurations have compression ratios (--ratio): tables then show the ratio."""
    return "ratio" in frame.columns and frame["ratio"].drop_nulls().len() > 0


def budget_headers(ratios: bool) -> list[str]:
    """The budget's columns: the cache limit, after the ratio it came from where the run gave ratios."""
    return [RATIO_HEADER, LIMIT_HEADER] if ratios else [LIMIT_HEADER]


def budget_cells(row: dict[str, Any], ratios: bool) -> list[str]:
    """A row's budget cells, under _budget_headers: '0.5 (50% removed)', then its cache limit."""
    if not ratios:
        return [_limit(row)]
    return [MISSING if row.get("ratio") is None else removed_words(row["ratio"]), _limit(row)]


def config_key(row: dict[str, Any]) -> tuple[Any, ...]:
    """A probe configuration (RETRIEVAL_CONFIG_KEYS: policy, budget, position mode, compression setting)."""
    return tuple(row.get(key) for key in RETRIEVAL_CONFIG_KEYS)


def absolute_table(
    summary: pl.DataFrame, seq_len: int, several_modes: bool = False, measured: Measured = EVERYTHING
) -> Table:
    """Each configuration's figures; speed columns only where the run measured speed."""
    metrics = [m for m in METRICS if measured.speaks_of(m)]
    ratios = with_ratios(summary)
    return Table(
        title=f"Absolute values, length {seq_len} tokens",
        headers=["Policy", *budget_headers(ratios), "n", *(m.label for m in metrics)],
        rows=[
            [
                policy_name(r, several_modes),
                *budget_cells(r, ratios),
                str(r["n"]),
                *(format_absolute(r, m) for m in metrics),
            ]
            for r in _at(summary, seq_len)
        ],
        note=ABSOLUTE_NOTE if measured.speed else ABSOLUTE_NOTE_QUALITY,
    )


def relative_table(summary: pl.DataFrame, seq_len: int, has_baseline: bool, measured: Measured = EVERYTHING) -> Table:
    """Changes vs `full`; a configuration whose samples never met a baseline says so in its row. Speed changes
    only where the run measured speed."""
    title = f"Relative change vs full, length {seq_len} tokens"
    changes = [c for c in CHANGES if measured.speaks_of(c)]
    ratios = with_ratios(summary)
    headers = [
        "Policy",
        *budget_headers(ratios),
        "paired samples",
        *(["speed pairs"] if measured.speed else []),
        *(f"Δ {c.title} (%)" for c in changes),
    ]
    note = RELATIVE_NOTE if measured.speed else RELATIVE_NOTE_QUALITY
    if not has_baseline:
        return Table(
            title,
            headers,
            [],
            note,
            empty=f"no baseline: no successful `full` cell at length {seq_len}, so no relative change",
        )
    rows = []
    for r in _at(summary, seq_len, evicting_only=True):
        paired = r["n_paired"] is not None
        shown = [format_row_change(r, c) if paired else "no baseline" for c in changes]
        pairs = str(r[NOISE_CHANGES[0].n] or 0) if paired and r["speed_from_trials"] else MISSING
        rows.append(
            [
                policy_name(r),
                *budget_cells(r, ratios),
                str(r["n_paired"] or 0),
                *([pairs] if measured.speed else []),
                *shown,
            ]
        )
    return Table(title, headers, rows, note, empty="no evicting configuration at this length")


def physics_table(summary: pl.DataFrame, seq_len: int, meta: dict[str, Any], several_modes: bool = False) -> Table:
    """Bytes per decode step, the TPOT they allow at the measured bandwidth, and the TPOT measured."""
    rows = []
    for r in _at(summary, seq_len):
        kv, weights, floor = r["kv_read_bytes_mean"], r["weight_bytes_mean"], r["tpot_floor_s_mean"]
        if kv is None and weights is None and floor is None:
            continue
        measured = r["tpot_s_mean"]
        ratio = f"×{measured / floor:.1f}" if measured is not None and floor else MISSING
        floor_ms = MISSING if floor is None else f"{floor * 1000:.2f}"
        rows.append(
            [
                config_name(r, several_modes),
                format_value(kv, MIB),
                format_value(weights, MIB),
                floor_ms,
                format_median_interval(r, TPOT_MS),
                ratio,
            ]
        )
    return Table(
        f"Physics of a decode step, length {seq_len} tokens",
        [
            "Configuration",
            "KV read per step (MiB)",
            "Weights (MiB)",
            "TPOT floor (ms)",
            "Measured TPOT (ms)",
            "Measured / floor",
        ],
        rows,
        PHYSICS_NOTE.format(bandwidth=format_bandwidth(meta)),
        empty="no physics recorded (bytes per step and TPOT floor): a run older than these columns",
    )


def prefill_table(summary: pl.DataFrame, measured: Measured = EVERYTHING, several_modes: bool = False) -> Table:
    """The prefill setting's speed and memory per configuration and length: the context compressed, TTFT with
    the compression's share of it, TPOT (where the run measured speed), the peak KV bytes and those kept."""
    rows = summary.filter(pl.col("compression") == "prefill")
    ratios = with_ratios(rows)
    ttft = METRIC_BY_COLUMN["ttft_s"]
    body = []
    for r in rows.iter_rows(named=True):
        context = r["context_tokens_mean"]
        share = r["compress_share_mean"]
        speed = [
            format_median_interval(r, ttft),
            MISSING if share is None else f"{100 * share:.1f}",
            format_median_interval(r, TPOT_MS),
        ]
        body.append(
            [
                policy_name(r, several_modes),
                str(r["seq_len"]),
                *budget_cells(r, ratios),
                MISSING if context is None else f"{context:.0f}",
                *(speed if measured.speed else []),
                format_value(r["peak_kv_bytes_mean"], MIB),
                format_value(r["kv_bytes_compressed_mean"], MIB),
            ]
        )
    return Table(
        "Speed and memory in the prefill setting",
        [
            "Policy",
            "Length (tokens)",
            *budget_headers(ratios),
            "Context compressed (tokens)",
            *([ttft.label, "Compression in TTFT (%)", f"TPOT ({TPOT_MS.unit})"] if measured.speed else []),
            f"Peak KV ({MIB.unit})",
            f"KV after compression ({MIB.unit})",
        ],
        body,
        PREFILL_TABLE_NOTE if measured.speed else PREFILL_TABLE_NOTE_QUALITY,
        empty="no successful cell in the prefill setting",
    )


def relative_tables(analysis: Analysis) -> list[Table]:
    """The relative-change table of every length, as `kvcompare run` prints them."""
    stats = analysis.summary
    return [relative_table(stats, n, n in analysis.baseline_lengths, analysis.measured) for n in lengths_in(stats)]


# --- The A/A control and the recommendations -----------------------------------------------------------------


def noise_table(noise: NoiseFloor) -> Table:
    """The A/A control's change per length and over all lengths, and the floor taken from the latter."""
    rows = [
        [str(r["seq_len"]), str(r[NOISE_CHANGES[0].n]), *(format_estimate(estimate(r, c)) for c in NOISE_CHANGES)]
        for r in noise.by_length.sort("seq_len").iter_rows(named=True)
    ]
    if noise.changes:
        all_lengths = [noise.changes.get(c.column, Estimate(None, None, None, 0)) for c in NOISE_CHANGES]
        rows.append(["all lengths", str(noise.pairs), *(format_estimate(e) for e in all_lengths)])
        floors = [noise.floor(c) for c in NOISE_CHANGES]
        rows.append(["noise floor", "", *(MISSING if f is None else f"±{f:.1f}%" for f in floors)])
    return Table(
        "A/A control (noise floor)",
        ["Length (tokens)", "A/A pairs", *(f"Δ {c.title} (%)" for c in NOISE_CHANGES)],
        rows,
        NOISE_NOTE,
        empty=f"no A/A pair: {noise.reason}",
    )


def _evidence(row: dict[str, Any]) -> str:
    parts = [
        f"PPL {format_change(row[PPL_CHANGE.column])}"
        if row[PPL_CHANGE.column] is not None
        else "PPL change: no baseline"
    ]
    if row.get("retrieval_pct") is not None:
        parts.append(f"Retrieval {format_pct(row['retrieval_pct'])}% (full {format_pct(row['retrieval_full_pct'])}%)")
    parts += [
        f"{c.title} {format_row_change(row, c)}"
        for c in CHANGES
        if c.like_for_like and c is not PPL_CHANGE and row[c.column] is not None
    ]
    kv = METRIC_BY_COLUMN["peak_kv_bytes"]
    parts.append(f"{kv.title} {format_value(row['peak_kv_bytes_mean'], kv)} {kv.unit}")
    return ", ".join(parts)


def recommendation_table(recommendations: list[Recommendation]) -> Table:
    """One row per scenario and length (and compression setting, in a run with both): the configuration chosen (or
    why none) and the changes it rests on."""
    rows = [
        [
            r.scenario,
            str(r.seq_len) if r.setting is None else f"{r.seq_len} ({r.setting})",
            config_name(r.choice) if r.choice else r.reason,
            _evidence(r.choice) if r.choice else MISSING,
        ]
        for r in recommendations
    ]
    return Table(
        "Recommended configurations",
        ["Scenario", "Length (tokens)", "Choice", "Evidence (changes vs full; speed with its 95% interval)"],
        rows,
        empty="no configuration to recommend: no successful evicting cells",
    )


# --- Cells planned, failed and recorded ----------------------------------------------------------------------


@dataclass(frozen=True)
class CellCounts:
    """Cells planned (None without run.json), succeeded and failed; `missing`: planned but neither (never run)."""

    planned: int | None
    ok: int
    failed: int

    @property
    def missing(self) -> int | None:
        """Planned cells neither finished nor failed (an interrupted run), or None when the plan is unknown."""
        return None if self.planned is None else max(self.planned - self.ok - self.failed, 0)


def cell_counts(cells: pl.DataFrame, meta: dict[str, Any]) -> CellCounts:
    """Count the cells (perplexity cells and passkey probes alike) against run.json's cells_planned."""
    planned = meta.get("cells_planned")
    return CellCounts(
        planned=planned if isinstance(planned, int) else None,
        ok=ok_cells(cells).height,
        failed=failed_cells(cells).height,
    )


def counts_table(counts: CellCounts) -> Table:
    """The cell counts in one row."""

    def show(value: int | None) -> str:
        return "unknown (no run.json)" if value is None else str(value)

    return Table(
        "Cells",
        ["planned", "ok", "failed", "missing (planned − ok − failed)"],
        [[show(counts.planned), str(counts.ok), str(counts.failed), show(counts.missing)]],
    )


def probe_name(row: dict[str, Any], several_modes: bool = False) -> str:
    """config_name, and for a probe what it probed: 'l2 @ 64, passkey at depth 0.5', 'l2 @ 64, vt'."""
    name = config_name(row, several_modes)
    task = row.get("task")
    if task in (None, PPL_TASK):
        return name
    depth = row.get("depth")
    if depth is None and row.get("probe_params"):
        depth = json.loads(row["probe_params"]).get("depth")
    return f"{name}, {task}" + ("" if depth is None else f" at depth {depth:g}")


def failed_table(cells: pl.DataFrame, several_modes: bool = False) -> Table:
    """Every failed cell or probe, in a stable order, with its error on one line."""
    failed = failed_cells(cells).sort(
        ["seq_len", "task", "compression", "policy_label", "ratio", "cache_size", "sample_id", "probe_params"],
        nulls_last=False,
    )
    rows = [
        [
            probe_name(r, several_modes),
            str(r["seq_len"]),
            str(r["sample_id"]),
            r["cell_id"] or MISSING,
            one_line(r["error"]),
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
