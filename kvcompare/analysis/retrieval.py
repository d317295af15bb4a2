"""Probe tasks (passkey, RULER's): how often each configuration answers correctly, by task, configuration and
probe."""

from __future__ import annotations

import json
from collections.abc import Sequence

import polars as pl

from kvcompare.analysis.pairing import CONFIG_ORDER, IS_BASELINE, IS_OK
from kvcompare.parameters import shown_value

# --- Retrieval: passkey probes, whether greedy decoding still gives the key under eviction -------------------

#: A retrieval configuration: a task, and a policy at a budget in a position mode and compression setting;
#: `policy` rides along for names. The budget is the cache limit, or, where the run gave --ratio, the ratio alone:
#: each probe's limit is int(context × (1 − ratio)) of its own context, so the probes of one ratio differ by a
#: few tokens, and their rows (by_budget) carry a null `cache_size` and the limits in `cache_size_min`/`_max`.
CONFIG_KEYS: list[str] = ["policy", "policy_label", "cache_size", "positions", "compression", "ratio"]
#: A probe task's configuration: the task, each of its variants apart (`task_label`, with_task_label()), and
#: CONFIG_KEYS.
TASK_KEYS: list[str] = ["task", "task_label", *CONFIG_KEYS]
#: What a configuration is compared with `full` on: the same task variant, position mode, compression setting and
#: length.
BASELINE_MATCH: list[str] = ["task", "task_label", "positions", "compression", "seq_len"]
#: Where a probe was placed: the prompt's length and the needle's depth in it.
PROBE_KEYS: list[str] = ["seq_len", "depth"]
#: A probe that counts towards accuracy: it succeeded and recorded whether the key came out.
IS_ANSWERED = IS_OK.fill_null(False) & pl.col("correct").is_not_null()
#: The cache limit as a configuration's key: null where a ratio gave it (the ratio is then the key).
BUDGET_LIMIT = pl.when(pl.col("ratio").is_null()).then(pl.col("cache_size"))


def with_task_label(probes: pl.DataFrame) -> pl.DataFrame:
    """Probe rows with `task_label`, what tells a task's variants apart: the task's name, or where ``probes`` hold
    one task with different `task_params` (``--task niah_single,niah_single:haystack=text``) its name with the
    parameters whose values differ between them, in the command-line syntax (``niah_single:haystack=noise``,
    ``niah_single:haystack=text``). Rows that have the column already are returned unchanged."""
    if "task_label" in probes.columns:
        return probes
    key = pl.concat_str(pl.col("task").fill_null(""), pl.lit("\0"), pl.col("task_params").fill_null("{}"))
    pairs = probes.select(key.alias("key")).unique()["key"].to_list()
    variants = {k: (k.split("\0")[0], json.loads(k.split("\0", 1)[1])) for k in pairs}
    labels = {}
    for k, (task, params) in variants.items():
        siblings = [other for name, other in variants.values() if name == task]
        differ = sorted({p for other in siblings for p in {*other, *params} if other.get(p) != params.get(p)})
        labels[k] = ":".join([task, *(f"{p}={shown_value(params.get(p))}" for p in differ)])
    return probes.with_columns(
        key.replace_strict(labels, default=pl.col("task"), return_dtype=pl.String).alias("task_label")
    )


def by_budget(rows: pl.DataFrame) -> pl.DataFrame:
    """Rows keyed by their budget: `cache_size` null where a ratio gave it (CONFIG_KEYS), the limit itself kept
    as `limit`; each task's variants named (with_task_label())."""
    return with_task_label(rows).with_columns(pl.col("cache_size").alias("limit"), BUDGET_LIMIT.alias("cache_size"))


#: The limits a configuration's probes ran under (one value with --cache; a few tokens apart with --ratio).
LIMIT_RANGE = (pl.col("limit").min().alias("cache_size_min"), pl.col("limit").max().alias("cache_size_max"))
#: Tables and charts list configurations in this order: per task and each of its variants in turn, the continuous
#: setting first, the baseline first.
TASK_ORDER = ["task", "task_label", *CONFIG_ORDER]


def retrieval_stats(retrieval: pl.DataFrame, by: Sequence[str] = ()) -> pl.DataFrame:
    """Per task variant (`task_label`, with_task_label()), configuration and group of `by`: accuracy_pct = 100 ×
    the share of answered probes whose greedy decoding gave the key exactly, logprob_mean = their mean
    teacher-forced log-probability of the key, n = answered probes; failed = probes that failed, left out of both;
    cache_size_min/_max = the limits its probes ran under. Baseline first within each variant, as in every
    table."""
    return (
        by_budget(retrieval)
        .group_by([*TASK_KEYS, *by])
        .agg(
            (pl.col("correct").filter(IS_ANSWERED).cast(pl.Float64).mean() * 100).alias("accuracy_pct"),
            pl.col("answer_logprob").filter(IS_ANSWERED).mean().alias("logprob_mean"),
            IS_ANSWERED.sum().cast(pl.Int64).alias("n"),
            (~IS_OK.fill_null(False)).sum().cast(pl.Int64).alias("failed"),
            *LIMIT_RANGE,
        )
        .sort([*TASK_ORDER, *by], nulls_last=False)
    )


def retrieval_by_probe(retrieval: pl.DataFrame) -> pl.DataFrame:
    """retrieval_stats() per task variant, configuration, length and depth: one cell of a heat map each."""
    return retrieval_stats(retrieval, PROBE_KEYS)


def retrieval_by_config(retrieval: pl.DataFrame) -> pl.DataFrame:
    """retrieval_stats() per task variant and configuration, over every length and depth it was probed at."""
    return retrieval_stats(retrieval)


def retrieval_measured(retrieval: pl.DataFrame | None) -> bool:
    """Whether any probe was answered: only then do the recommendations weigh retrieval."""
    return retrieval is not None and not retrieval.filter(IS_ANSWERED).is_empty()


def retrieval_gaps(retrieval: pl.DataFrame) -> pl.DataFrame:
    """Per evicting configuration (CONFIG_KEYS): retrieval_pct, its accuracy in %, retrieval_full_pct, that of
    `full` in its position mode and compression setting, and retrieval_gap_pts = full's − its, in percentage points.

    Each task variant (`task_label`, with_task_label(): ``--task passkey,passkey:haystack=text`` gives two) is
    compared apart: the configuration's accuracy and that of `full` on the same variant, both pooled over the
    answered probes at the lengths where both it and that `full` have answered probes, so that neither is judged
    on lengths the other was not. Where the configuration has several variants (of one task or of several), each
    figure is the mean over them, each variant weighing alike whatever its number of probes, and the gap is the
    difference of the means. A configuration sharing no length with `full` in any variant is absent."""
    answered = by_budget(retrieval).filter(IS_ANSWERED).with_columns(pl.col("correct").cast(pl.Float64) * 100)
    baseline = answered.filter(IS_BASELINE).select(*BASELINE_MATCH, "correct")
    evicting = answered.filter(~IS_BASELINE)
    shared = (
        evicting.select(*TASK_KEYS, "seq_len")
        .unique()
        .join(baseline.select(BASELINE_MATCH).unique(), on=BASELINE_MATCH, nulls_equal=True)
    )
    own = (
        evicting.join(shared, on=[*TASK_KEYS, "seq_len"], nulls_equal=True)
        .group_by(TASK_KEYS)
        .agg(pl.col("correct").mean().alias("retrieval_pct"))
    )
    full = (
        shared.join(baseline, on=BASELINE_MATCH, nulls_equal=True)
        .group_by(TASK_KEYS)
        .agg(pl.col("correct").mean().alias("retrieval_full_pct"))
    )
    per_variant = own.join(full, on=TASK_KEYS, nulls_equal=True)
    return (
        per_variant.group_by(CONFIG_KEYS)
        .agg(pl.col("retrieval_pct").mean(), pl.col("retrieval_full_pct").mean())
        .with_columns((pl.col("retrieval_full_pct") - pl.col("retrieval_pct")).alias("retrieval_gap_pts"))
    )


def task_scores(probes: pl.DataFrame, by: Sequence[str] = ()) -> pl.DataFrame:
    """Per task variant (`task_label`, with_task_label()), configuration and group of ``by``: score_pct = 100 × the
    mean score of the answered probes (the task's metric, e.g. RULER's share of expected values found),
    accuracy_pct = 100 × the share fully correct, n = answered probes, failed = probes that failed,
    cache_size_min/_max = the limits its probes ran under. Baseline first within each task variant and compression
    setting."""
    return (
        by_budget(probes)
        .group_by([*TASK_KEYS, *by])
        .agg(
            (pl.col("score").filter(IS_ANSWERED).mean() * 100).alias("score_pct"),
            (pl.col("correct").filter(IS_ANSWERED).cast(pl.Float64).mean() * 100).alias("accuracy_pct"),
            IS_ANSWERED.sum().cast(pl.Int64).alias("n"),
            (~IS_OK.fill_null(False)).sum().cast(pl.Int64).alias("failed"),
            *LIMIT_RANGE,
        )
        .sort([*TASK_ORDER, *by], nulls_last=False)
    )
