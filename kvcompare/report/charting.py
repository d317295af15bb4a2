"""What every chart shares: the files a chart is saved as (ChartFile, and ChartSet with the charts that could
not be drawn), the colours that give each policy one colour on every chart, and frames labelled with the
names the tables use. charts.py (the results charts), heatmaps.py (the passkey heat maps) and compression.py (accuracy
against the compression ratio) draw on it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import altair as alt
import polars as pl

from kvcompare.analysis import BASELINE_POLICY, config_name, policy_name

#: Pixels per Vega-Lite pixel in a saved PNG.
PNG_SCALE = 2
BASELINE_COLOR = "black"
#: The `full` of the prefill setting, beside the continuous one's BASELINE_COLOR where a run measured both.
PREFILL_BASELINE_COLOR = "#7f7f7f"
#: One colour per policy series, in the order of their names; the baseline is BASELINE_COLOR. Eight, then eight
#: more for runs with more series (both compression settings name each policy twice) before they repeat.
POLICY_COLORS = [
    *("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#ff9da6", "#9d755d"),
    *("#bcbd22", "#17becf", "#9467bd", "#8c564b", "#e377c2", "#aec7e8", "#ffbb78", "#98df8a"),
]
#: An axis whose labels (lengths, cache limits, depths) are short enough to stand upright.
FLAT_LABELS = alt.Axis(labelAngle=0)


class SkipChart(Exception):
    """Raised by a chart builder when the data cannot support the chart; the message says why."""


@dataclass(frozen=True)
class ChartFile:
    """A chart as saved: its PNG (for report.md) and its Vega-Lite spec, as a file and as a dict (for the HTML
    page)."""

    name: str
    title: str
    png: Path
    spec_path: Path
    spec: dict[str, Any]
    caption: str = ""  # what the chart shows, in a sentence or two under it ("" for none)


@dataclass(frozen=True)
class SkippedChart:
    """A chart the data could not support, and why; the report lists it where the chart would be."""

    name: str
    title: str
    reason: str


@dataclass(frozen=True)
class ChartSet:
    """The charts of one build: those drawn, in reading order, and those skipped."""

    charts: list[ChartFile]
    skipped: list[SkippedChart]


def labelled(frame: pl.DataFrame, several_modes: bool) -> pl.DataFrame:
    """Add `config` (policy @ cache), `series` (policy without cache) and `role` (baseline or policy).

    build_charts and build_retrieval_charts label each frame once; every chart builder takes frames labelled so.
    """
    rows = list(frame.iter_rows(named=True))
    return frame.with_columns(
        pl.Series("config", [config_name(r, several_modes) for r in rows], dtype=pl.String),
        pl.Series("series", [policy_name(r, several_modes) for r in rows], dtype=pl.String),
        pl.when(pl.col("policy") == BASELINE_POLICY).then(pl.lit("baseline")).otherwise(pl.lit("policy")).alias("role"),
    )


def series_color(series: pl.DataFrame) -> alt.Color:
    """Baseline series (e.g. "full (for positions=shift)") in black (the prefill setting's `full` in grey), every
    policy in the same colour on every chart."""
    baselines = sorted(series.filter(pl.col("role") == "baseline")["series"].unique().to_list())
    others = sorted(set(series["series"].to_list()) - set(baselines))
    prefill = set()
    if "compression" in series.columns:
        prefill = set(series.filter(pl.col("compression") == "prefill")["series"].to_list())
    domain = [*baselines, *others]
    palette = [PREFILL_BASELINE_COLOR if name in prefill else BASELINE_COLOR for name in baselines]
    palette += [POLICY_COLORS[i % len(POLICY_COLORS)] for i in range(len(others))]
    return alt.Color("series:N", title="Policy", scale=alt.Scale(domain=domain, range=palette))


def save_chart(chart: alt.TopLevelMixin, out_dir: Path, name: str, title: str, caption: str = "") -> ChartFile:
    """Write `<name>.png` and `<name>.vl.json` into out_dir; ``caption`` is said under the chart."""
    png, spec_path = out_dir / f"{name}.png", out_dir / f"{name}.vl.json"
    chart.save(png, format="png", scale_factor=PNG_SCALE)
    spec = chart.to_dict()
    spec_path.write_text(json.dumps(spec, indent=1))
    return ChartFile(name, title, png, spec_path, spec, caption)
