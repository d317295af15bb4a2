"""The compression settings of a run (continuous or prefill, budgets as ratios or limits), and the figure the field
reads across compression ratios: each task's accuracy (the probes' score) or perplexity against the ratio."""

from __future__ import annotations

import polars as pl

from kvcompare.analysis.load import PPL_TASK, RunData
from kvcompare.analysis.names import DEFAULT_COMPRESSION
from kvcompare.analysis.pairing import BASELINE_POLICY, IS_OK
from kvcompare.analysis.retrieval import IS_ANSWERED, with_task_label

#: The settings in the order a report names them: the default (continuous) first.
SETTING_ORDER = (DEFAULT_COMPRESSION, "prefill")


def settings_of(run: RunData) -> tuple[tuple[str, ...], tuple[float, ...], bool | None]:
    """The compression settings of the run's cells and probes (continuous first; run.json's where no row says),
    its compression ratios (smallest first; () where --cache gave the limits) and, for the prefill setting,
    whether the question was compressed with the context (None where no prefill row recorded it)."""
    rows = pl.concat(
        [frame.select("compression", "ratio", "query_aware") for frame in (run.cells, run.retrieval)],
        how="vertical_relaxed",
    )
    config = run.meta.get("config") or {}
    found = set(rows["compression"].drop_nulls().to_list())
    if not found:
        wanted = config.get("compression") or [DEFAULT_COMPRESSION]
        found = set(wanted if isinstance(wanted, list) else [wanted])
    settings = tuple(sorted(found, key=lambda s: (SETTING_ORDER.index(s) if s in SETTING_ORDER else 9, s)))
    ratios = tuple(sorted(rows["ratio"].drop_nulls().unique().to_list()))
    if not ratios and isinstance(config.get("ratios"), list):
        ratios = tuple(sorted(float(r) for r in config["ratios"]))
    aware = rows.filter(pl.col("compression") == "prefill")["query_aware"].drop_nulls().unique().to_list()
    query_aware = bool(aware[0]) if len(aware) == 1 else None
    return settings, ratios, query_aware


#: One point of the accuracy-against-ratio chart: a task (each variant apart, `task_label`), a policy in a
#: position mode and setting, at a ratio (null for `full`, which evicts nothing).
RATIO_KEYS: list[str] = ["task", "task_label", "policy", "policy_label", "positions", "compression", "ratio"]


def quality_by_ratio(cells: pl.DataFrame, probes: pl.DataFrame) -> pl.DataFrame:
    """Per task (each variant apart: with_task_label()), policy, position mode, compression setting and ratio:
    `value`, the probes' mean score in % (a task's accuracy, e.g. RULER's share of expected values found) or, for
    task `ppl`, the cells' mean perplexity, over every length, sample and probe; `n` = the answered probes or
    successful cells it averages. Only the configurations a ratio gave, and `full` (ratio null), its reference in
    each setting; `metric` says which figure `value` is ("score" or "ppl")."""
    ppl = (
        cells.filter(IS_OK.fill_null(False) & pl.col("ppl").is_not_null())
        .with_columns(pl.lit(PPL_TASK).alias("task"), pl.lit(PPL_TASK).alias("task_label"))
        .group_by(RATIO_KEYS)
        .agg(pl.col("ppl").mean().alias("value"), pl.len().cast(pl.Int64).alias("n"))
        .with_columns(pl.lit("ppl").alias("metric"))
    )
    scores = (
        with_task_label(probes)
        .filter(IS_ANSWERED & pl.col("score").is_not_null())
        .group_by(RATIO_KEYS)
        .agg((pl.col("score").mean() * 100).alias("value"), pl.len().cast(pl.Int64).alias("n"))
        .with_columns(pl.lit("score").alias("metric"))
    )
    every = pl.concat([ppl, scores], how="vertical_relaxed")
    return every.filter(pl.col("ratio").is_not_null() | (pl.col("policy") == BASELINE_POLICY)).sort(
        [
            pl.col("task") != PPL_TASK,
            "task",
            "task_label",
            pl.col("compression") == "prefill",
            pl.col("policy") != BASELINE_POLICY,
            "policy_label",
            "positions",
            "ratio",
        ],
        nulls_last=False,
    )
