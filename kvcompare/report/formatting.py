"""Numbers formatted for a table cell: figures in their display units, changes in %, speed changes with their
95% interval, and the few phrases (a list of words, a traceback on one line) tables and notices share."""

from __future__ import annotations

import dataclasses
from typing import Any

from kvcompare.analysis import METRIC_BY_COLUMN, Change, Metric, estimate
from kvcompare.stats import Estimate

#: Shown for a figure that is not there (no value, no baseline, nothing recorded).
MISSING = "–"
#: Marks a speed change whose 95% interval includes 0: not distinguishable from no change.
NOT_SIGNIFICANT = "≈"

#: The measured TPOT beside its floor, in the floor's unit.
TPOT_MS = dataclasses.replace(METRIC_BY_COLUMN["tpot_s"], unit="ms", decimals=2, scale=1000.0)
#: Bytes shown in MiB, as the peak KV memory is.
MIB = METRIC_BY_COLUMN["peak_kv_bytes"]


def format_value(value: float | None, metric: Metric) -> str:
    """A figure in its metric's display unit and decimals (bytes in MiB, shares in %): `12.35`."""
    return MISSING if value is None else f"{value * metric.scale:.{metric.decimals}f}"


def format_change(value: float | None) -> str:
    """A change in %, signed: `+2.1%`."""
    return MISSING if value is None else f"{value:+.1f}%"


def format_pct(value: float | None) -> str:
    """An accuracy in %, already scaled: `83.3`."""
    return MISSING if value is None else f"{value:.1f}"


def format_estimate(found: Estimate) -> str:
    """A speed change: `-12.3% [-15.1, -9.0]`; `≈ +2.1% [-3.0, +7.4]` when its interval includes 0;
    `+2.1% (n=1, no interval)` when it has none, which is never significant."""
    if found.value is None:
        return MISSING
    text = format_change(found.value)
    if found.low is None or found.high is None:
        return f"{text} (n={found.n}, no interval)"
    interval = f"[{found.low:+.1f}, {found.high:+.1f}]"
    return f"{text} {interval}" if found.significant else f"{NOT_SIGNIFICANT} {text} {interval}"


def format_row_change(row: dict[str, Any], change: Change) -> str:
    """A change of a summary() row: speed with its interval, quality as a plain paired mean."""
    return format_estimate(estimate(row, change)) if change.speed else format_change(row[change.column])


def _mean_std(row: dict[str, Any], metric: Metric) -> str:
    """A figure of an aggregate() row: mean ± standard deviation over samples (the mean alone with one sample)."""
    mean, std = row[f"{metric.column}_mean"], row[f"{metric.column}_std"]
    return format_value(mean, metric) if std is None else f"{format_value(mean, metric)} ± {format_value(std, metric)}"


def format_median_interval(row: dict[str, Any], metric: Metric) -> str:
    """A speed figure of an aggregate() row: the (mean of the samples') median over trials, [low, high]."""
    value, low, high = row[f"{metric.column}_mean"], row[metric.low], row[metric.high]
    if value is None:
        return MISSING
    if low is None or high is None:
        return f"{format_value(value, metric)} (no interval)"
    return f"{format_value(value, metric)} [{format_value(low, metric)}, {format_value(high, metric)}]"


def format_absolute(row: dict[str, Any], metric: Metric) -> str:
    """A cell of the absolute table: a speed figure with its interval, any other as mean ± std over samples."""
    return format_median_interval(row, metric) if metric.speed else _mean_std(row, metric)


def format_bandwidth(meta: dict[str, Any]) -> str:
    """The memory bandwidth run.json recorded at the start of the run, in GB/s: `25.6 GB/s`, or `not recorded`."""
    bandwidth = (meta.get("speed") or {}).get("memory_bandwidth_bytes_s")
    return f"{bandwidth / 1e9:.1f} GB/s" if isinstance(bandwidth, int | float) and bandwidth > 0 else "not recorded"


def join(values: list[str]) -> str:
    """Words joined as in a sentence: `a`, `a and b`, `a, b and c` (at least one value)."""
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " and " + values[-1]


def one_line(text: str | None, limit: int = 500) -> str:
    """Tracebacks collapsed to one line that fits a table cell; the full text stays in the Parquet file."""
    if not text:
        return MISSING
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
