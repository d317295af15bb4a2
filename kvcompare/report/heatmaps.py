"""The passkey retrieval charts: one heat map per policy (and variant of passkey) of its accuracy by needle depth
and length, one panel per cache limit (or compression ratio) beside the `full` of the same variant, position mode
and compression setting, drawn from analysis.retrieval_by_probe()."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import altair as alt
import polars as pl

from kvcompare.analysis import BASELINE_POLICY, ratio_words
from kvcompare.report.charting import FLAT_LABELS, ChartFile, ChartSet, SkippedChart, labelled, save_chart

#: Accuracy on a fixed 0–100% scale, so that every heat map reads alike; text dark on the light (high) end.
ACCURACY_SCALE = alt.Scale(domain=[0, 100], scheme="viridis")
ACCURACY_TITLE = "Accuracy (%)"
CELL_STEP = 34  # pixels per depth or length in a heat map
#: The title of every heat map, followed by its policy.
RETRIEVAL_CHART_TITLE = "Passkey retrieval"


def _limit_label(cache_size: int | None, ratio: float | None = None) -> str:
    """A heat map panel: the cache limit, or the ratio that gave it ('ratio 0.5': the limits of its probes differ
    with their contexts), or `full` for the baseline (no limit)."""
    if ratio is not None:
        return ratio_words(ratio)
    return BASELINE_POLICY if cache_size is None else str(cache_size)


def _panel_order(row: dict[str, Any]) -> tuple[bool, float]:
    """`full` first, then by ratio or cache limit."""
    budget = row["ratio"] if row.get("ratio") is not None else row["cache_size"]
    return (budget is not None, budget or 0)


def retrieval_heatmap(probes: pl.DataFrame, title: str) -> alt.FacetChart:
    """One policy's passkey accuracy by needle depth (x) and length (y), labelled in every cell, one panel per
    cache limit (or compression ratio), `full` (of its position mode and setting) first as the reference.
    `probes`: labelled retrieval_by_probe() rows with answered probes."""
    rows = list(probes.iter_rows(named=True))
    data = probes.with_columns(
        pl.Series("limit", [_limit_label(r["cache_size"], r.get("ratio")) for r in rows], dtype=pl.String)
    )
    panels = sorted({(_panel_order(r), _limit_label(r["cache_size"], r.get("ratio"))) for r in rows})
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
            column=alt.Column("limit:N", title=_panels_title(probes), sort=[label for _, label in panels]),
            title=title,
        )
    )


def _panels_title(probes: pl.DataFrame) -> str:
    """What the panels of a heat map are: cache limits, or compression ratios."""
    if "ratio" in probes.columns and probes["ratio"].drop_nulls().len() > 0:
        return "Compression ratio (share of the context removed)"
    return "Cache limit (tokens)"


def _chart_name(prefix: str, label: str, taken: set[str]) -> str:
    """A file and element name from a prefix and a label: letters, digits and underscores only, unique among
    `taken`."""
    name = re.sub(r"[^A-Za-z0-9]+", "_", f"{prefix}_{label}").strip("_")
    unique, i = name, 2
    while unique in taken:
        unique, i = f"{name}_{i}", i + 1
    taken.add(unique)
    return unique


def build_retrieval_charts(by_probe: pl.DataFrame, out_dir: Path, several_modes: bool = False) -> ChartSet:
    """One heat map per policy (with its position mode and compression setting) from analysis.retrieval_by_probe(),
    each beside the `full` of the same position mode and setting; `full` alone when the run probed no evicting
    policy. Where the probes hold several variants of passkey (`task_label`: ``--task passkey,passkey:haystack=text``)
    each variant has heat maps of its own, beside `full` on that variant, titled and named by its label."""
    out_dir.mkdir(parents=True, exist_ok=True)
    answered = by_probe.filter(pl.col("n") > 0)
    if answered.is_empty():
        return ChartSet([], [SkippedChart("passkey", RETRIEVAL_CHART_TITLE, "no passkey probe was answered")])
    probes = labelled(answered, several_modes)
    baseline = probes.filter(pl.col("role") == "baseline")
    evicting = probes.filter(pl.col("role") == "policy")
    groups: list[tuple[str, str, pl.DataFrame]] = []
    for (variant, series, positions, setting), rows in evicting.group_by(
        ["task_label", "series", "positions", "compression"], maintain_order=True
    ):
        reference = baseline.filter(
            (pl.col("task_label") == variant)
            & pl.col("positions").eq_missing(positions)
            & pl.col("compression").eq_missing(setting)
        )
        groups.append((str(variant), str(series), pl.concat([reference, rows])))
    if not groups:
        groups = [
            (str(variant), str(series), rows)
            for (variant, series), rows in baseline.group_by(["task_label", "series"], maintain_order=True)
        ]
    several_variants = len({variant for variant, _, _ in groups}) > 1
    charts: list[ChartFile] = []
    taken: set[str] = set()
    with alt.data_transformers.disable_max_rows():
        for variant, series, rows in groups:
            title = f"{RETRIEVAL_CHART_TITLE}{f' ({variant})' if several_variants else ''}: {series}"
            heading = f"{title} (accuracy in % of probes, by depth and length)"
            chart = retrieval_heatmap(rows.drop("task_label"), heading)
            name = _chart_name("passkey", f"{variant.removeprefix('passkey')} {series}", taken)
            charts.append(save_chart(chart, out_dir, name, title))
    return ChartSet(charts, [])
