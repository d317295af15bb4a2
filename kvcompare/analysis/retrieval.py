"""Probe tasks (passkey, RULER's): how often each configuration answers correctly, by task, configuration and
probe."""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

from kvcompare.analysis.pairing import CONFIG_ORDER, IS_BASELINE, IS_OK

# --- Retrieval: passkey probes, whether greedy decoding still gives the key under eviction -------------------

#: A retrieval configuration: a task, and a policy at a budget in a position mode and compression setting;
#: `policy` rides along for names. The budget is the cache limit, or, where the run gave --ratio, the ratio alone:
#: each probe's limit is int(context × (1 − ratio)) of its own context, so the probes of one ratio differ by a
#: few tokens, and their rows (by_budget) carry a null `cache_size` and the limits in `cache_size_min`/`_max`.
CONFIG_KEYS: list[str] = ["policy", "policy_label", "cache_size", "positions", "compression", "ratio"]
RETRIEVAL_KEYS: list[str] = ["task", *CONFIG_KEYS]
#: What a configuration is compared with `full` on: the same task, position mode, compression setting and length.
BASELINE_MATCH: list[str] = ["task", "positions", "compression", "seq_len"]
#: Where a probe was placed: the prompt's length and the needle's depth in it.
PROBE_KEYS: list[str] = ["seq_len", "depth"]
#: A probe that counts towards accuracy: it succeeded and recorded whether the key came out.
IS_ANSWERED = IS_OK.fill_null(False) & pl.col("correct").is_not_null()
#: The cache limit as a configuration's key: null where a ratio gave it (the ratio is then the key).
BUDGET_LIMIT = pl.when(pl.col("ratio").is_null()).then(pl.col("cache_size"))


def by_budget(rows: pl.DataFrame) -> pl.DataFrame:
    """Rows keyed by their budget: `cache_size` null where a ratio gave it (CONFIG_KEYS), the limit itself kept
    as `limit`."""
    return rows.with_columns(pl.col("cache_size").alias("limit"), BUDGET_LIMIT.alias("cache_size"))


#: The limits a configuration's probes ran under (one value with --cache; a few tokens apart with --ratio).
LIMIT_RANGE = (pl.col("limit").min().alias("cache_size_min"), pl.col("limit").max().alias("cache_size_max"))
#: Tables and charts list configurations in this order: per task, the continuous setting first, the baseline first.
PROBE_ORDER = ["task", *CONFIG_ORDER]


def retrieval_stats(retrieval: pl.DataFrame, by: Sequence[str] = ()) -> pl.DataFrame:
    """Per configuration and group of `by`: accuracy_pct = 100 × the share of answered probes whose greedy
    decoding gave the key exactly, logprob_mean = their mean teacher-forced log-probability of the key, n =
    answered probes; failed = probes that failed, left out of both; cache_size_min/_max = the limits its probes
    ran under. Baseline first, as in every table."""
    return (
        by_budget(retrieval)
        .group_by([*RETRIEVAL_KEYS, *by])
        .agg(
            (pl.col("correct").filter(IS_ANSWERED).cast(pl.Float64).mean() * 100).alias("accuracy_pct"),
            pl.col("answer_logprob").filter(IS_ANSWERED).mean().alias("logprob_mean"),
            IS_ANSWERED.sum().cast(pl.Int64).alias("n"),
            (~IS_OK.fill_null(False)).sum().cast(pl.Int64).alias("failed"),
            *LIMIT_RANGE,
        )
        .sort([*PROBE_ORDER, *by], nulls_last=False)
    )


def retrieval_by_probe(retrieval: pl.DataFrame) -> pl.DataFrame:
    """retrieval_stats() per configuration, length and depth: one cell of a heat map each."""
    return retrieval_stats(retrieval, PROBE_KEYS)


def retrieval_by_config(retrieval: pl.DataFrame) -> pl.DataFrame:
    """retrieval_stats() per configuration, over every length and depth it was probed at."""
    return retrieval_stats(retrieval)


def retrieval_measured(retrieval: pl.DataFrame | None) -> bool:
    """Whether any probe was answered: only then do the recommendations weigh retrieval."""
    return retrieval is not None and not retrieval.filter(IS_ANSWERED).is_empty()


def retrieval_gaps(retrieval: pl.DataFrame) -> pl.DataFrame:
    """Per evicting configuration (CONFIG_KEYS): retrieval_pct, its accuracy (the mean over tasks of each task's
    accuracy), retrieval_full_pct, the accuracy of `full` in its position mode and compression setting, and
    retrieval_gap_pts = full's − its, in percentage points; both pooled over the answered probes at the lengths
    where both it and that `full` have answered probes, so that neither is judged on lengths the
    other was not. A configuration sharing no length with `full` is absent."""
    answered = by_budget(retrieval).filter(IS_ANSWERED).with_columns(pl.col("correct").cast(pl.Float64) * 100)
    baseline = answered.filter(IS_BASELINE).select(*BASELINE_MATCH, "correct")
    evicting = answered.filter(~IS_BASELINE)
    shared = (
        evicting.select(*RETRIEVAL_KEYS, "seq_len")
        .unique()
        .join(baseline.select(BASELINE_MATCH).unique(), on=BASELINE_MATCH, nulls_equal=True)
    )
    own = (
        evicting.join(shared, on=[*RETRIEVAL_KEYS, "seq_len"], nulls_equal=True)
        .group_by(RETRIEVAL_KEYS)
        .agg(pl.col("correct").mean().alias("retrieval_pct"))
    )
    full = (
        shared.join(baseline, on=BASELINE_MATCH, nulls_equal=True)
        .group_by(RETRIEVAL_KEYS)
        .agg(pl.col("correct").mean().alias("retrieval_full_pct"))
    )
    per_task = own.join(full, on=RETRIEVAL_KEYS, nulls_equal=True)
    return (
        per_task.group_by(CONFIG_KEYS)
        .agg(pl.col("retrieval_pct").mean(), pl.col("retrieval_full_pct").mean())
        .with_columns((pl.col("retrieval_full_pct") - pl.col("retrieval_pct")).alias("retrieval_gap_pts"))
    )


def task_scores(probes: pl.DataFrame, by: Sequence[str] = ()) -> pl.DataFrame:
    """Per task, configuration and group of ``by``: score_pct = 100 × the mean score of the answered probes (the
    task's metric, e.g. RULER's share of expected values found), accuracy_pct = 100 × the share fully correct,
    n = answered probes, failed = probes that failed, cache_size_min/_max = the limits its probes ran under.
    Baseline first within each task and compression setting."""
    return (
        by_budget(probes)
        .group_by([*RETRIEVAL_KEYS, *by])
        .agg(
            (pl.col("score").filter(IS_ANSWERED).mean() * 100).alias("score_pct"),
            (pl.col("correct").filter(IS_ANSWERED).cast(pl.Float64).mean() * 100).alias("accuracy_pct"),
            IS_ANSWERED.sum().cast(pl.Int64).alias("n"),
            (~IS_OK.fill_null(False)).sum().cast(pl.Int64).alias("failed"),
            *LIMIT_RANGE,
        )
        .sort([*PROBE_ORDER, *by], nulls_last=False)
    )
