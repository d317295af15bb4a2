"""Altair charts of the results, saved as PNG (for Markdown) and as Vega-Lite spec (for the HTML page).

Every chart is drawn from analysis.summary() or analysis.position_perplexity(), labelled once with the names
the tables use (charting.py holds what the charts share; heatmaps.py draws the passkey heat maps).
Wherever a speed figure is drawn, its 95% interval is drawn with it, as error bars from `<field>_low` to
`<field>_high`; quality figures have no interval (they are deterministic) and stay points, lines or bars.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

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
    lengths_in,
)
from kvcompare.report.charting import (
    BASELINE_COLOR,
    FLAT_LABELS,
    ChartFile,
    ChartSet,
    SkipChart,
    SkippedChart,
    labelled,
    save_chart,
    series_color,
)

#: Pixels of one panel's plot area; a chart is a grid of such panels.
PANEL_WIDTH = 220
PANEL_HEIGHT = 160
CHANGE_TITLE = "change vs full (%)"

#: Facets: one row of panels per length, one column per budget (cache limit, or compression ratio).
ROW_LENGTH = alt.Row("seq_len:O", title="Length (tokens)")
CACHE_TITLE = "Cache limit (tokens)"
RATIO_TITLE = "Compression ratio (share of the context removed)"


def budget_field(frame: pl.DataFrame) -> tuple[str, str]:
    """The budget the evicting rows of ``frame`` are laid out by, and its title: the compression ratio where the run
    gave ratios (--ratio; the limits then differ with each context), else the cache limit."""
    evicting = frame.filter(pl.col("policy") != BASELINE_POLICY)
    if "ratio" in frame.columns and not evicting.is_empty() and evicting["ratio"].null_count() == 0:
        return "ratio", RATIO_TITLE
    return "cache_size", CACHE_TITLE


def _budget_column(frame: pl.DataFrame) -> alt.Column:
    """A column of panels per budget (budget_field)."""
    field, title = budget_field(frame)
    return alt.Column(f"{field}:O", title=title)


#: Dashed baseline; the colour legend already names it, so this encoding has none.
BASELINE_DASH = alt.StrokeDash(
    "role:N",
    legend=None,
    scale=alt.Scale(domain=["baseline", "policy"], range=[[6, 3], [1, 0]]),
)


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
    """Repeat the baseline rows (no cache limit, no ratio) under every budget (budget_field) so that each facet
    shows them."""
    field, _ = budget_field(frame)
    baseline = frame.filter(pl.col("policy") == BASELINE_POLICY)
    evicting = frame.filter(pl.col("policy") != BASELINE_POLICY)
    budgets = evicting.select(field).unique().sort(field)  # sorted: the same report every time
    if budgets.is_empty():
        return frame
    return pl.concat([evicting, baseline.drop(field).join(budgets, how="cross").select(frame.columns)])


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
    analysis.aggregate()), mean ± std over samples for the others."""
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
    """Every metric at one length, a bar per configuration with its interval (speed) or ± std (others)."""
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
    """PPL, TTFT, TPOT and throughput change vs `full` against the budget (the cache limit, or the compression
    ratio), a line per policy, a row per length."""
    data = _relative_rows(summary)
    budget, budget_title = budget_field(data)

    def layers(field: str, axis_title: str) -> list[alt.Chart]:
        x = alt.X(f"{budget}:O", title=budget_title, axis=FLAT_LABELS)
        lines = (
            alt.Chart()
            .mark_line(point=True)
            .encode(
                x=x,
                y=alt.Y(f"{field}:Q", title=axis_title),
                color=color,
                tooltip=[
                    "series:N",
                    f"{budget}:O",
                    *(["cache_size:O"] if budget == "ratio" else []),
                    f"{field}:Q",
                    *_interval_tooltip(field),
                ],
            )
        )
        return [_zero_rule(), lines, *_interval(x, field, axis_title, color)]

    against = "the compression ratio" if budget == "ratio" else "the cache limit"
    return _panels(
        data,
        _change_fields(PPL_CHANGE, TTFT_CHANGE, TPOT_CHANGE, THROUGHPUT_CHANGE),
        layers,
        f"Quality and speed against {against} (paired mean change vs full; 0% = full; speed with its 95% "
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
    """PPL and throughput against the length, `full` dashed beside the policies, a column per cache limit."""
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
        column=_budget_column(data),
        columns=1,
    )


def policies_at_cache(summary: pl.DataFrame, color: alt.Color) -> alt.ConcatChart:
    """PPL and accuracy change vs `full`, a bar per policy, a panel per length and cache limit."""
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
        "Policies at the same cache limit (paired mean change vs full)"
        if budget_field(data)[0] == "cache_size"
        else "Policies at the same compression ratio (paired mean change vs full)",
        row=ROW_LENGTH,
        column=_budget_column(data),
        columns=1,
    )


def ppl_by_position(position_ppl: pl.DataFrame, color: alt.Color) -> alt.ConcatChart:
    """Perplexity per bucket of positions in the passage (analysis.position_perplexity()), a line per
    configuration, a panel per length and cache limit."""
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
        column=_budget_column(data),
        columns=1,
    )


def build_charts(
    summary: pl.DataFrame, position_ppl: pl.DataFrame, out_dir: Path, several_modes: bool = False
) -> ChartSet:
    """Render every chart the data supports; a chart it cannot support is listed with the reason.

    several_modes: the run has several position modes, so each `full` baseline names its mode (config_name).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    summary, position_ppl = labelled(summary, several_modes), labelled(position_ppl, several_modes)
    color = series_color(
        pl.concat([frame.select("series", "role", "compression") for frame in (summary, position_ppl)])
    )
    lengths = lengths_in(summary)
    plan: list[tuple[str, str, Callable[[], alt.TopLevelMixin]]] = [
        (
            f"metrics_by_config_{n}",
            f"Every metric by configuration, length {n}",
            partial(metrics_by_config, summary, n, color),
        )
        for n in lengths
    ]
    budget = "the compression ratio" if budget_field(summary)[0] == "ratio" else "the cache limit"
    plan += [
        (
            "cache_tradeoff",
            f"Quality and speed against {budget}",
            lambda: cache_tradeoff(summary, color),
        ),
        ("length_effect", "Baseline and policies across lengths", lambda: length_effect(summary, color)),
        ("policies_at_cache", f"Policies at the same {budget[4:]}", lambda: policies_at_cache(summary, color)),
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
                charts.append(save_chart(build(), out_dir, name, title))
            except SkipChart as reason:
                skipped.append(SkippedChart(name, title, str(reason)))
    return ChartSet(charts, skipped)
