"""The chart the field reads: each task's accuracy (the probes' mean score) or perplexity against the compression
ratio, one line per policy, one panel per task and compression setting, `full` as the horizontal reference, drawn
from analysis.quality_by_ratio() where the run gave its budgets as ratios (--ratio)."""

from __future__ import annotations

from pathlib import Path

import altair as alt
import polars as pl

from kvcompare.analysis import BASELINE_POLICY, PPL_TASK, config_name, policy_name
from kvcompare.report.charting import (
    BASELINE_COLOR,
    POLICY_COLORS,
    ChartFile,
    ChartSet,
    SkipChart,
    SkippedChart,
    save_chart,
)

RATIO_CHART = "accuracy_by_ratio"
RATIO_CHART_TITLE = "Accuracy against compression ratio"
RATIO_CAPTION = (
    "Each task's accuracy (its probes' mean score, in %; higher is better) or, for `ppl`, the mean perplexity "
    "(lower is better) against the compression ratio, the share of the context removed; one line per policy, "
    "pooled over lengths, samples and probes. The dashed black line is `full` of the same task and compression "
    "setting, which removes nothing."
)
RATIO_AXIS = "Compression ratio (share of the context removed)"
PANEL_WIDTH = 220
PANEL_HEIGHT = 160
SETTING_WORDS = {
    "continuous": "evicted continuously",
    "prefill": "compressed once after the prefill",
}


def _axis_title(task: str) -> str:
    return "PPL" if task == PPL_TASK else "Score (%)"


def _panel(rows: pl.DataFrame, title: str, color: alt.Color) -> alt.LayerChart:
    """One task in one setting: a line per policy against the ratio, `full` as a dashed rule."""
    task = rows["task"][0]
    y_scale = alt.Scale(zero=False) if task == PPL_TASK else alt.Scale(domain=[0, 100])
    y = alt.Y("value:Q", title=_axis_title(task), scale=y_scale)
    policies = rows.filter(pl.col("role") == "policy")
    layers: list[alt.Chart] = []
    full = rows.filter(pl.col("role") == "baseline")
    if not full.is_empty():
        layers.append(
            alt.Chart(full)
            .mark_rule(color=BASELINE_COLOR, strokeDash=[6, 3])
            .encode(y=y, tooltip=["config:N", "value:Q", "n:Q"])
        )
    if not policies.is_empty():
        layers.append(
            alt.Chart(policies)
            .mark_line(point=True)
            .encode(
                x=alt.X("ratio:Q", title=RATIO_AXIS, scale=alt.Scale(domain=[0, 1])),
                y=y,
                color=color,
                tooltip=["config:N", "ratio:Q", "value:Q", "n:Q"],
            )
        )
    return alt.LayerChart(layer=layers).properties(width=PANEL_WIDTH, height=PANEL_HEIGHT, title=title)


def _labelled(quality: pl.DataFrame, several_modes: bool) -> pl.DataFrame:
    """`line` (the policy, without its setting or ratio: the panel says the setting, the x axis the ratio),
    `config` (its full name) and `role`."""
    rows = list(quality.iter_rows(named=True))
    return quality.with_columns(
        pl.Series(
            "line",
            [policy_name({**r, "cache_size": None, "compression": None}, several_modes) for r in rows],
            dtype=pl.String,
        ),
        pl.Series(
            "config",
            [config_name({**r, "cache_size": None}, several_modes) for r in rows],
            dtype=pl.String,
        ),
        pl.when(pl.col("policy") == BASELINE_POLICY).then(pl.lit("baseline")).otherwise(pl.lit("policy")).alias("role"),
    )


def accuracy_by_ratio(
    quality: pl.DataFrame, several_modes: bool = False, query_aware: bool | None = None
) -> alt.ConcatChart:
    """quality_by_ratio() as a grid of panels: one per task (columns; a variant of a task is one of its own, named
    by its label) and compression setting (rows)."""
    policies = quality.filter((pl.col("policy") != BASELINE_POLICY) & pl.col("ratio").is_not_null())
    if policies.is_empty():
        raise SkipChart("no configuration was given its budget as a compression ratio (--ratio)")
    data = _labelled(quality, several_modes)
    lines = sorted(data.filter(pl.col("role") == "policy")["line"].unique().to_list())
    palette = [POLICY_COLORS[i % len(POLICY_COLORS)] for i in range(len(lines))]
    color = alt.Color("line:N", title="Policy", scale=alt.Scale(domain=lines, range=palette))
    tasks = data["task_label"].unique(maintain_order=True).to_list()  # each variant of a task a panel
    settings = data["compression"].unique(maintain_order=True).to_list()
    several_settings = len(settings) > 1
    panels = []
    for setting in settings:
        for task in tasks:
            rows = data.filter((pl.col("task_label") == task) & (pl.col("compression") == setting))
            if rows.is_empty():
                continue
            words = SETTING_WORDS.get(str(setting), str(setting))
            if setting == "prefill" and query_aware is not None:
                words += ", query-aware" if query_aware else ", query-agnostic"
            panels.append(_panel(rows, f"{task}, {setting} ({words})" if several_settings else str(task), color))
    return alt.concat(*panels, columns=len(tasks), title=RATIO_CHART_TITLE).resolve_scale(color="shared")


def build_ratio_charts(
    quality: pl.DataFrame, out_dir: Path, several_modes: bool = False, query_aware: bool | None = None
) -> ChartSet:
    """The accuracy-against-ratio chart (analysis.quality_by_ratio()), or why it was not drawn."""
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with alt.data_transformers.disable_max_rows():
            chart = accuracy_by_ratio(quality, several_modes, query_aware)
            saved: ChartFile = save_chart(chart, out_dir, RATIO_CHART, RATIO_CHART_TITLE, RATIO_CAPTION)
    except SkipChart as reason:
        return ChartSet([], [SkippedChart(RATIO_CHART, RATIO_CHART_TITLE, str(reason))])
    return ChartSet([saved], [])
