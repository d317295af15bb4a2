"""Altair charts of the results, saved as PNG (for Markdown) and as Vega-Lite spec (for the HTML page).

Every chart is drawn from data.summary(), data.position_perplexity() or (passkey heat maps)
data.retrieval_by_probe(), labelled once with the names the tables use.
Wherever a speed figure is drawn, its 95% interval is drawn with it, as error bars from `<field>_low` to
`<field>_high`; quality figures have no interval (they are deterministic) and stay points, lines or bars.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import altair as alt
import polars as pl

from kvcompare.analysis import (
    ACCURACY_CHANGE,
    BASELINE_POLICY,
    CHANGE_BY_COLUMN,
    METRIC_BY_COLUMN,
    METRICS,
    PPL_CHANGE,
    SPEED_CHANGES,
    THROUGHPUT_CHANGE,
    TPOT_CHANGE,
    TTFT_CHANGE,
    Change,
    Metric,
    config_name,
    lengths_in,
    policy_name,
)

PANEL_WIDTH = 220
PANEL_HEIGHT = 160
PNG_SCALE = 2
BASELINE_COLOR = "black"
POLICY_COLORS = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#ff9da6", "#9d755d"]
CHANGE_TITLE = "change vs full (%)"

ROW_LENGTH = alt.Row("seq_len:O", title="Length (tokens)")
COLUMN_CACHE = alt.Column("cache_size:O", title="Cache limit (tokens)")


class SkipChart(Exception):
    """Raised by a chart builder when the data cannot support the chart; the message says why."""


@dataclass(frozen=True)
class ChartFile:
    name: str
    title: str
    png: Path
    spec_path: Path
    spec: dict[str, Any]


@dataclass(frozen=True)
class SkippedChart:
    name: str
    title: str
    reason: str


@dataclass(frozen=True)
class ChartSet:
    charts: list[ChartFile]
    skipped: list[SkippedChart]


def _labelled(frame: pl.DataFrame, several_modes: bool) -> pl.DataFrame:
    """Add `config` (policy @ cache), `series` (policy without cache) and `role` (baseline or policy).

    build_charts labels each frame once; every chart builder below takes frames labelled so.
    """
    rows = list(frame.iter_rows(named=True))
    return frame.with_columns(
        pl.Series("config", [config_name(r, several_modes) for r in rows], dtype=pl.String),
        pl.Series("series", [policy_name(r, several_modes) for r in rows], dtype=pl.String),
        pl.when(pl.col("policy") == BASELINE_POLICY).then(pl.lit("baseline")).otherwise(pl.lit("policy")).alias("role"),
    )


def _color(series: pl.DataFrame) -> alt.Color:
    """Baseline series (e.g. "full (for positions=shift)") in black, every policy in the same colour on every chart."""
    baselines = sorted(series.filter(pl.col("role") == "baseline")["series"].unique().to_list())
    others = sorted(set(series["series"].to_list()) - set(baselines))
    domain = [*baselines, *others]
    palette = [BASELINE_COLOR] * len(baselines)
    palette += [POLICY_COLORS[i % len(POLICY_COLORS)] for i in range(len(others))]
    return alt.Color("series:N", title="Policy", scale=alt.Scale(domain=domain, range=palette))


#: Dashed baseline; the colour legend already names it, so this encoding has none.
BASELINE_DASH = alt.StrokeDash(
    "role:N",
    legend=None,
    scale=alt.Scale(domain=["baseline", "policy"], range=[[6, 3], [1, 0]]),
)
FLAT_LABELS = alt.Axis(labelAngle=0)


#: Fields drawn with an interval: speed changes and speed figures (their bounds: `<field>_low`, `<field>_high`).
INTERVAL_FIELDS = frozenset({c.column for c in SPEED_CHANGES} | {m.column for m in METRICS if m.speed})


def _interval(x: alt.X, field: str, axis_title: str, color: alt.Color) -> list[alt.Chart]:
    """The error bars of `field` when it is a speed figure; none for a quality figure."""
    if field not in INTERVAL_FIELDS:
        return []
    bars = alt.Chart().mark_errorbar(ticks={"size": 6}, thickness=1.5)
    return [bars.encode(x=x, y=alt.Y(f"{field}_low:Q", title=axis_title), y2=alt.Y2(f"{field}_high:Q"), color=color)]


def _zero_rule() -> alt.Chart:
    """The baseline on a relative chart: 0% change."""
    return alt.Chart().mark_rule(color=BASELINE_COLOR, strokeDash=[4, 2]).encode(y=alt.datum(0))


#: Shares of decode time that are 0 for every policy that does no such work: all zeros compare nothing.
SHARES = frozenset({"evict_share", "signal_share"})


def nothing_to_compare(panel_data: pl.DataFrame, field: str) -> bool:
    """A panel of figures with fewer than two values (the one-pass TTFT, which only `full` has; a change
    against `full` compares by itself), or a share that is 0 for everything drawn (the signal share of
    policies that read no signal)."""
    if panel_data.is_empty():
        return True
    if field in SHARES and bool((panel_data[field] == 0).all()):
        return True
    return field not in CHANGE_BY_COLUMN and panel_data.height < 2


def _panels(
    data: pl.DataFrame,
    fields: Sequence[tuple[str, str]],
    layers: Callable[[str, str], list[alt.Chart]],
    title: str,
    row: alt.Row | None = None,
    column: alt.Column | None = None,
    columns: int = 4,
) -> alt.ConcatChart:
    """One panel per field (own y axis with its unit), each faceted alike; rows lacking the field dropped, and
    panels with nothing to compare left out (see :func:`nothing_to_compare`)."""
    panels = []
    for field, axis_title in fields:
        panel_data = data.filter(pl.col(field).is_not_null())
        if nothing_to_compare(panel_data, field):
            continue
        layered = alt.layer(*layers(field, axis_title), data=panel_data).properties(
            width=PANEL_WIDTH, height=PANEL_HEIGHT
        )
        if row is None and column is None:
            panels.append(layered)
        else:
            panels.append(layered.facet(row=row or alt.Undefined, column=column or alt.Undefined))
    if not panels:
        raise SkipChart("none of its metrics has two values to compare")
    return alt.concat(*panels, columns=columns, title=title).resolve_scale(color="shared", strokeDash="shared")


def _with_baseline_per_cache(frame: pl.DataFrame) -> pl.DataFrame:
    """Repeat the baseline rows (no cache limit) under every cache limit so that each facet shows them."""
    baseline = frame.filter(pl.col("policy") == BASELINE_POLICY)
    evicting = frame.filter(pl.col("policy") != BASELINE_POLICY)
    caches = evicting.select("cache_size").unique().sort("cache_size")  # sorted: the same report every time
    if caches.is_empty():
        return frame
    return pl.concat([evicting, baseline.drop("cache_size").join(caches, how="cross").select(frame.columns)])


def _change_fields(*changes: Change) -> list[tuple[str, str]]:
    """(change column, axis title) for relative panels."""
    return [(c.column, f"{c.title} {CHANGE_TITLE}") for c in changes]


def _relative_rows(summary: pl.DataFrame) -> pl.DataFrame:
    rows = summary.filter((pl.col("policy") != BASELINE_POLICY) & pl.col("n_paired").is_not_null())
    if rows.is_empty():
        raise SkipChart("no configuration has a `full` baseline to compare against")
    return rows


def _display_units(summary: pl.DataFrame, metrics: Sequence[Metric]) -> pl.DataFrame:
    """Means in the units the axes state, with `<column>_low`/`_high`: the interval of a speed figure (see
    data.aggregate()), mean ± std over samples for the others."""
    columns = []
    for m in metrics:
        mean = pl.col(f"{m.column}_mean") * m.scale
        if m.speed:
            low, high = pl.col(m.low) * m.scale, pl.col(m.high) * m.scale
        else:
            std = pl.col(f"{m.column}_std") * m.scale
            low, high = mean - std, mean + std
        columns += [mean.alias(m.column), low.alias(f"{m.column}_low"), high.alias(f"{m.column}_high")]
    return summary.with_columns(columns)


def metrics_by_config(summary: pl.DataFrame, seq_len: int, color: alt.Color) -> alt.ConcatChart:
    data = _display_units(summary.filter(pl.col("seq_len") == seq_len), METRICS)
    if data.is_empty():
        raise SkipChart(f"no successful cell at length {seq_len}")
    order = data["config"].to_list()

    def layers(field: str, axis_title: str) -> list[alt.Chart]:
        x = alt.X("config:N", title="Configuration", sort=order, axis=alt.Axis(labelAngle=-45))
        bars = (
            alt.Chart()
            .mark_bar()
            .encode(
                x=x,
                y=alt.Y(f"{field}:Q", title=axis_title),
                color=color,
                tooltip=["config:N", f"{field}:Q", "n:Q"],
            )
        )
        spread = (
            alt.Chart()
            .mark_errorbar(color=BASELINE_COLOR)
            .encode(x=x, y=alt.Y(f"{field}_low:Q", title=axis_title), y2=alt.Y2(f"{field}_high:Q"))
        )
        return [bars, spread]

    return _panels(
        data,
        [(m.column, m.label) for m in METRICS],
        layers,
        f"Every metric by configuration, length {seq_len} tokens (speed: median over trials with its 95% "
        "interval; other metrics: mean ± std over samples)",
    )


def cache_tradeoff(summary: pl.DataFrame, color: alt.Color) -> alt.ConcatChart:
    data = _relative_rows(summary)

    def layers(field: str, axis_title: str) -> list[alt.Chart]:
        x = alt.X("cache_size:O", title="Cache limit (tokens)", axis=FLAT_LABELS)
        lines = (
            alt.Chart()
            .mark_line(point=True)
            .encode(
                x=x,
                y=alt.Y(f"{field}:Q", title=axis_title),
                color=color,
                tooltip=["series:N", "cache_size:O", f"{field}:Q", *_interval_tooltip(field)],
            )
        )
        return [_zero_rule(), lines, *_interval(x, field, axis_title, color)]

    return _panels(
        data,
        _change_fields(PPL_CHANGE, TTFT_CHANGE, TPOT_CHANGE, THROUGHPUT_CHANGE),
        layers,
        "Quality and speed against the cache limit (paired mean change vs full; 0% = full; speed with its 95% "
        "interval over paired trials)",
        row=ROW_LENGTH,
        columns=4,
    )


def _interval_tooltip(field: str) -> list[str]:
    """A relative panel's tooltip: the interval and pair count of a speed change, the paired samples else."""
    if field in INTERVAL_FIELDS:
        return [f"{field}_low:Q", f"{field}_high:Q", f"{field}_n:Q"]
    return ["n_paired:Q"]


def length_effect(summary: pl.DataFrame, color: alt.Color) -> alt.ConcatChart:
    if summary["seq_len"].n_unique() < 2:
        raise SkipChart("only one length in the results")
    metrics = [METRIC_BY_COLUMN["ppl"], METRIC_BY_COLUMN["throughput_tok_s"]]
    data = _with_baseline_per_cache(_display_units(summary, metrics))

    def layers(field: str, axis_title: str) -> list[alt.Chart]:
        x = alt.X("seq_len:O", title="Length (tokens)", axis=FLAT_LABELS)
        return [
            alt.Chart()
            .mark_line(point=True)
            .encode(
                x=x,
                y=alt.Y(f"{field}:Q", title=axis_title, scale=alt.Scale(zero=False)),
                color=color,
                strokeDash=BASELINE_DASH,
                tooltip=["config:N", "seq_len:O", f"{field}:Q"],
            ),
            *_interval(x, field, axis_title, color),
        ]

    return _panels(
        data,
        [(m.column, m.label) for m in metrics],
        layers,
        "Baseline (full, dashed black) and policies across lengths (mean over samples; throughput with the "
        "range of its 95% intervals)",
        column=COLUMN_CACHE,
        columns=1,
    )


def policies_at_cache(summary: pl.DataFrame, color: alt.Color) -> alt.ConcatChart:
    data = _relative_rows(summary)

    def layers(field: str, axis_title: str) -> list[alt.Chart]:
        bars = (
            alt.Chart()
            .mark_bar()
            .encode(
                x=alt.X("series:N", title="Policy", axis=alt.Axis(labelAngle=-45)),
                y=alt.Y(f"{field}:Q", title=axis_title),
                color=color,
                tooltip=["config:N", f"{field}:Q", "n_paired:Q"],
            )
        )
        return [bars, _zero_rule()]

    return _panels(
        data,
        _change_fields(PPL_CHANGE, ACCURACY_CHANGE),
        layers,
        "Policies at the same cache limit (paired mean change vs full)",
        row=ROW_LENGTH,
        column=COLUMN_CACHE,
        columns=1,
    )


def ppl_by_position(position_ppl: pl.DataFrame, color: alt.Color) -> alt.ConcatChart:
    if position_ppl.is_empty():
        raise SkipChart("no perplexity-by-position curves in the results")
    data = _with_baseline_per_cache(position_ppl)

    def layers(field: str, axis_title: str) -> list[alt.Chart]:
        return [
            alt.Chart()
            .mark_line()
            .encode(
                x=alt.X("bucket_start:Q", title="Position in passage (tokens)"),
                y=alt.Y(f"{field}:Q", title=axis_title, scale=alt.Scale(zero=False)),
                color=color,
                strokeDash=BASELINE_DASH,
                detail="config:N",
                tooltip=["config:N", "bucket_start:Q", "bucket_end:Q", f"{field}:Q", "tokens:Q"],
            )
        ]

    return _panels(
        data,
        [("ppl", "Perplexity")],
        layers,
        "Perplexity by position, pooled over samples: exp(Σ nll / Σ tokens) per bucket (full: dashed black)",
        row=ROW_LENGTH,
        column=COLUMN_CACHE,
        columns=1,
    )


#: Accuracy on a fixed 0–100% scale, so that every heat map reads alike; text dark on the light (high) end.
ACCURACY_SCALE = alt.Scale(domain=[0, 100], scheme="viridis")
ACCURACY_TITLE = "Accuracy (%)"
CELL_STEP = 34  # pixels per depth or length in a heat map


def _limit_label(cache_size: int | None) -> str:
    """A heat map panel: the cache limit, or `full` for the baseline (no limit)."""
    return BASELINE_POLICY if cache_size is None else str(cache_size)


def retrieval_heatmap(probes: pl.DataFrame, title: str) -> alt.FacetChart:
    """One policy's passkey accuracy by needle depth (x) and length (y), labelled in every cell, one panel per
    cache limit, `full` (of its position mode) first as the reference. `probes`: labelled retrieval_by_probe()
    rows with answered probes."""
    data = probes.with_columns(
        pl.Series("limit", [_limit_label(c) for c in probes["cache_size"].to_list()], dtype=pl.String)
    )
    limits = sorted(data["cache_size"].unique().to_list(), key=lambda c: (c is not None, c or 0))
    base = alt.Chart().encode(
        x=alt.X("depth:O", title="Needle depth (0 = start, 1 = end)", axis=FLAT_LABELS),
        y=alt.Y("seq_len:O", title="Length (tokens)", sort="descending"),
    )
    cells = base.mark_rect().encode(
        color=alt.Color("accuracy_pct:Q", title=ACCURACY_TITLE, scale=ACCURACY_SCALE),
        tooltip=["config:N", "seq_len:O", "depth:O", "accuracy_pct:Q", "n:Q", "logprob_mean:Q"],
    )
    labels = base.mark_text(baseline="middle", fontSize=10).encode(
        text=alt.Text("accuracy_pct:Q", format=".0f"),
        color=alt.condition("datum.accuracy_pct >= 50", alt.value("black"), alt.value("white")),
    )
    return (
        alt.layer(cells, labels, data=data)
        .properties(width=alt.Step(CELL_STEP), height=alt.Step(CELL_STEP))
        .facet(
            column=alt.Column("limit:N", title="Cache limit (tokens)", sort=[_limit_label(c) for c in limits]),
            title=title,
        )
    )


def _chart_name(prefix: str, label: str, taken: set[str]) -> str:
    """A file and element name from a label: letters, digits and underscores only, unique among `taken`."""
    name = f"{prefix}_{re.sub(r'[^A-Za-z0-9]+', '_', label).strip('_')}"
    unique, i = name, 2
    while unique in taken:
        unique, i = f"{name}_{i}", i + 1
    taken.add(unique)
    return unique


RETRIEVAL_CHART_TITLE = "Passkey retrieval"


def build_retrieval_charts(by_probe: pl.DataFrame, out_dir: Path, several_modes: bool = False) -> ChartSet:
    """One heat map per policy (with its position mode) from data.retrieval_by_probe(), each beside the `full`
    of the same position mode; `full` alone when the run probed no evicting policy."""
    out_dir.mkdir(parents=True, exist_ok=True)
    answered = by_probe.filter(pl.col("n") > 0)
    if answered.is_empty():
        return ChartSet([], [SkippedChart("passkey", RETRIEVAL_CHART_TITLE, "no passkey probe was answered")])
    probes = _labelled(answered, several_modes)
    baseline = probes.filter(pl.col("role") == "baseline")
    evicting = probes.filter(pl.col("role") == "policy")
    groups: list[tuple[str, pl.DataFrame]] = []
    for (series, positions), rows in evicting.group_by(["series", "positions"], maintain_order=True):
        reference = baseline.filter(pl.col("positions").eq_missing(positions))
        groups.append((str(series), pl.concat([reference, rows])))
    if not groups:
        groups = [(str(series), rows) for (series,), rows in baseline.group_by(["series"], maintain_order=True)]
    charts: list[ChartFile] = []
    taken: set[str] = set()
    with alt.data_transformers.disable_max_rows():
        for series, rows in groups:
            title = f"{RETRIEVAL_CHART_TITLE}: {series}"
            chart = retrieval_heatmap(rows, f"{title} (accuracy in % of probes, by depth and length)")
            charts.append(_save(chart, out_dir, _chart_name("passkey", series, taken), title))
    return ChartSet(charts, [])


def _save(chart: alt.TopLevelMixin, out_dir: Path, name: str, title: str) -> ChartFile:
    png, spec_path = out_dir / f"{name}.png", out_dir / f"{name}.vl.json"
    chart.save(png, format="png", scale_factor=PNG_SCALE)
    spec = chart.to_dict()
    spec_path.write_text(json.dumps(spec, indent=1))
    return ChartFile(name, title, png, spec_path, spec)


def build_charts(
    summary: pl.DataFrame, position_ppl: pl.DataFrame, out_dir: Path, several_modes: bool = False
) -> ChartSet:
    """Render every chart the data supports; a chart it cannot support is listed with the reason.

    several_modes: the run has several position modes, so each `full` baseline names its mode (config_name).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    summary, position_ppl = _labelled(summary, several_modes), _labelled(position_ppl, several_modes)
    color = _color(pl.concat([frame.select("series", "role") for frame in (summary, position_ppl)]))
    lengths = lengths_in(summary)
    plan: list[tuple[str, str, Callable[[], alt.TopLevelMixin]]] = [
        (
            f"metrics_by_config_{n}",
            f"Every metric by configuration, length {n}",
            partial(metrics_by_config, summary, n, color),
        )
        for n in lengths
    ]
    plan += [
        (
            "cache_tradeoff",
            "Quality and speed against the cache limit",
            lambda: cache_tradeoff(summary, color),
        ),
        ("length_effect", "Baseline and policies across lengths", lambda: length_effect(summary, color)),
        ("policies_at_cache", "Policies at the same cache limit", lambda: policies_at_cache(summary, color)),
        ("ppl_by_position", "Perplexity by position", lambda: ppl_by_position(position_ppl, color)),
    ]
    charts: list[ChartFile] = []
    skipped = (
        []
        if lengths
        else [SkippedChart("metrics_by_config", "Every metric by configuration", "no successful cell in the results")]
    )
    with alt.data_transformers.disable_max_rows():
        for name, title, build in plan:
            try:
                charts.append(_save(build(), out_dir, name, title))
            except SkipChart as reason:
                skipped.append(SkippedChart(name, title, str(reason)))
    return ChartSet(charts, skipped)
