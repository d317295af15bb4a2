"""Aggregation: per-configuration means over samples, and changes against `full` paired per sample (quality)
and per trial (speed, from the raw timings, with bootstrap intervals)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl

from kvcompare.analysis.load import empty_frame
from kvcompare.analysis.metrics import (
    CHANGES,
    METRICS,
    NOISE_CHANGES,
    PHYSICS_COLUMNS,
    PREFILL_COLUMNS,
    SPEED_CHANGES,
    Change,
)
from kvcompare.schema import (
    TIMINGS_SCHEMA,
)
from kvcompare.stats import Estimate, mean_estimate

# --- Aggregation: per-configuration means over samples, paired changes against `full` -----------------------

#: A configuration at one length: a policy at a cache limit (and the compression ratio it came from, when the run
#: gave --ratio) in a position mode and a compression setting; `policy` rides along for colouring and filtering.
CONFIG_KEYS: list[str] = ["seq_len", "policy", "policy_label", "cache_size", "positions", "compression", "ratio"]
#: A policy row is compared with the baseline row that saw the same passage the same way: the same position mode
#: and compression setting (in the prefill setting only the second half of a passage is scored, so a prefill
#: cell's only baseline is the prefill `full`).
PAIR_KEYS: list[str] = ["seq_len", "sample_id", "positions", "compression"]
#: A policy trial is compared with the baseline trial of the same passage, setting, session and round.
ROUND_KEYS: list[str] = [*PAIR_KEYS, "session", "round"]
#: One latency trial in the raw timings (its TTFT row and its step rows share these).
TRIAL_KEYS: list[str] = ["cell_id", "role", *ROUND_KEYS]
#: Roles of `full` trials a policy trial (or an A/A control) is paired with; a key has at most one of them.
BASELINE_ROLES = ("cell", "baseline")
BASELINE_POLICY = "full"

IS_BASELINE = (pl.col("policy") == BASELINE_POLICY) & pl.col("cache_size").is_null()
IS_OK = pl.col("status") == "ok"


def ok_cells(cells: pl.DataFrame) -> pl.DataFrame:
    """The successful cells of ``cells``."""
    return cells.filter(IS_OK)


def compile_summary(cells: pl.DataFrame, warm_up_s: float = 0.0) -> dict[str, Any]:
    """What --compile did, from the rows: successful timed cells whose counted decode steps all ran compiled, those
    that ran eagerly and why, and the seconds spent compiling, never timed: in the cells (between prefill and
    decode steps), in the untimed warm-up passes (``warm_up_s``, run.json's ``speed.warm_up_compile_s``), and
    both (``compile_s``)."""
    timed = ok_cells(cells).filter(pl.col("compiled").is_not_null()) if "compiled" in cells.columns else cells[:0]
    eager = timed.filter(~pl.col("compiled"))
    cells_s = float(timed["compile_s"].fill_null(0.0).sum()) if timed.height else 0.0
    return {
        "cells_compiled": timed.height - eager.height,
        "cells_eager": eager.height,
        "fallbacks": sorted({r for r in eager["compile_fallback"].to_list() if r}) if eager.height else [],
        "cells_compile_s": cells_s,
        "warm_up_compile_s": warm_up_s,
        "compile_s": cells_s + warm_up_s,
    }


def failed_cells(cells: pl.DataFrame) -> pl.DataFrame:
    """The cells of ``cells`` that failed (their ``error`` and ``traceback`` say why)."""
    return cells.filter(~IS_OK)


def lengths_in(frame: pl.DataFrame) -> list[int]:
    """The passage lengths present, shortest first."""
    return sorted(frame["seq_len"].drop_nulls().unique().to_list())


#: The order configurations are listed in everywhere: the continuous setting first, the baseline first, then by
#: policy, ratio, cache limit and positions (sort with nulls first).
CONFIG_ORDER: list[str | pl.Expr] = [
    pl.col("compression") == "prefill",
    pl.col("policy") != BASELINE_POLICY,
    "policy_label",
    "ratio",
    "cache_size",
    "positions",
]


def sort_configs(frame: pl.DataFrame) -> pl.DataFrame:
    """Per length, the configurations in CONFIG_ORDER, so tables read the same everywhere."""
    return frame.sort([pl.col("seq_len"), *CONFIG_ORDER], nulls_last=False)


def aggregate(cells: pl.DataFrame) -> pl.DataFrame:
    """Per configuration: mean, std and count over samples of every metric; for speed metrics also the
    lowest low and highest high of the cells' intervals over trials; the physics of a decode step, and what the
    prefill setting records (PREFILL_COLUMNS)."""
    stats = [pl.len().alias("n")]
    for metric in METRICS:
        stats += [
            pl.col(metric.column).mean().alias(f"{metric.column}_mean"),
            pl.col(metric.column).std().alias(f"{metric.column}_std"),
        ]
        if metric.interval is not None:
            stats += [
                pl.col(f"{metric.interval}_ci_low").min().alias(metric.low),
                pl.col(f"{metric.interval}_ci_high").max().alias(metric.high),
            ]
    stats += [pl.col(column).mean().alias(f"{column}_mean") for column in (*PHYSICS_COLUMNS, *PREFILL_COLUMNS)]
    return sort_configs(ok_cells(cells).group_by(CONFIG_KEYS).agg(stats))


def _with_changes(frame: pl.DataFrame, changes: Sequence[Change]) -> pl.DataFrame:
    """Each change in %, from the policy's `value` column and the paired baseline's `<base>_base` column."""
    columns = []
    for change in changes:
        base = pl.col(f"{change.base}_base")
        columns.append(pl.when(base != 0).then(100 * (pl.col(change.value) - base) / base).alias(change.column))
    return frame.with_columns(columns)


def _base_columns(changes: Sequence[Change]) -> list[str]:
    return sorted({change.base for change in changes})


def paired_changes(cells: pl.DataFrame) -> pl.DataFrame:
    """Per-sample change in % of the same sample's baseline cell: pairing removes passage-to-passage variance."""
    ok = ok_cells(cells)
    baseline = (
        ok.filter(IS_BASELINE)
        .group_by(PAIR_KEYS)
        .agg(pl.col(column).mean().alias(f"{column}_base") for column in _base_columns(CHANGES))
    )
    return _with_changes(ok.filter(~IS_BASELINE).join(baseline, on=PAIR_KEYS, how="inner"), CHANGES)


def trial_figures(timings: pl.DataFrame) -> pl.DataFrame:
    """One row per latency trial: its TTFT (and one-pass TTFT), TPOT = the median of its counted steps,
    throughput = its number of counted steps / their total seconds."""
    seconds, kind = pl.col("seconds"), pl.col("kind")
    steps = seconds.filter(kind == "step")
    return timings.group_by(TRIAL_KEYS).agg(
        seconds.filter(kind == "ttft").first().alias("ttft_s"),
        seconds.filter(kind == "ttft_oneshot").first().alias("ttft_oneshot_s"),
        steps.median().alias("tpot_s"),
        pl.when(steps.sum() > 0).then(steps.count() / steps.sum()).alias("throughput_tok_s"),
    )


@dataclass(frozen=True)
class TrialPairs:
    """Trials paired with the `full` trial of the same passage, position mode, compression setting, session and
    round, with the
    change of each paired figure in %: never across sessions or rounds."""

    policy: pl.DataFrame  # a policy's trial (role "cell") against `full`; SPEED_CHANGES columns
    aa: pl.DataFrame  # the A/A control (`full` timed again) against `full`; NOISE_CHANGES columns


def trial_pairs(cells: pl.DataFrame, timings: pl.DataFrame) -> TrialPairs:
    """Pair the trials of successful cells; a trial with no `full` trial of its key is left out."""
    configs = ok_cells(cells).select(
        "cell_id", "policy", "policy_label", "cache_size", "ratio", IS_BASELINE.alias("_baseline")
    )
    trials = trial_figures(timings).join(configs, on="cell_id", how="inner")
    is_baseline, role = pl.col("_baseline"), pl.col("role")
    base = (
        trials.filter(is_baseline & role.is_in(BASELINE_ROLES))
        .sort([*ROUND_KEYS, "role"])
        .unique(ROUND_KEYS, keep="first", maintain_order=True)  # at most one by design; never a cross product
        .select(*ROUND_KEYS, *(pl.col(column).alias(f"{column}_base") for column in _base_columns(SPEED_CHANGES)))
    )

    def paired(frame: pl.DataFrame, changes: Sequence[Change]) -> pl.DataFrame:
        return _with_changes(frame.join(base, on=ROUND_KEYS, how="inner"), changes)

    return TrialPairs(
        policy=paired(trials.filter(~is_baseline & (role == "cell")), SPEED_CHANGES),
        aa=paired(trials.filter(is_baseline & (role == "aa_control")), NOISE_CHANGES),
    )


def change_estimates(pairs: pl.DataFrame, keys: Sequence[str], changes: Sequence[Change]) -> pl.DataFrame:
    """Per group of `keys` (one group when empty): each change's mean over its pairs, with a seeded bootstrap
    95% interval over the pairs (stats.mean_estimate) and the number of pairs."""
    groups = pairs.group_by(list(keys), maintain_order=True) if keys else [((), pairs)]
    rows = []
    for key, group in groups:
        row: dict[str, Any] = dict(zip(keys, key, strict=True))
        for change in changes:
            estimate = mean_estimate(group[change.column].to_list())
            row.update(
                {
                    change.column: estimate.value,
                    change.low: estimate.low,
                    change.high: estimate.high,
                    change.n: estimate.n,
                }
            )
        rows.append(row)
    schema: dict[str, Any] = {key: pairs.schema[key] for key in keys}
    for change in changes:
        schema.update({change.column: pl.Float64, change.low: pl.Float64, change.high: pl.Float64, change.n: pl.Int64})
    return pl.DataFrame(rows, schema=schema)


def estimate(row: dict[str, Any], change: Change) -> Estimate:
    """A change of a row of change_estimates() or summary() as a stats.Estimate (n = 0 when absent)."""
    return Estimate(row.get(change.column), row.get(change.low), row.get(change.high), row.get(change.n) or 0)


def relative_changes(cells: pl.DataFrame, timings: pl.DataFrame | None = None) -> pl.DataFrame:
    """Per configuration: paired changes against `full`, n_paired = samples that had a baseline cell.

    Quality: the mean over samples of the per-sample change (deterministic). Speed: the mean over trial pairs
    (samples × rounds) with its interval, from the raw timings; a configuration without any trial pair (a run
    older than the raw timings) falls back to the per-sample change of the cells' figures, with no interval,
    and has speed_from_trials false.
    """
    by_sample = (
        paired_changes(cells)
        .group_by(CONFIG_KEYS)
        .agg(
            pl.len().alias("n_paired"),
            *(pl.col(c.column).mean() for c in CHANGES),
            *(pl.col(c.column).count().alias(c.n) for c in SPEED_CHANGES),
        )
    )
    timings = empty_frame(TIMINGS_SCHEMA) if timings is None else timings
    by_trial = change_estimates(trial_pairs(cells, timings).policy, CONFIG_KEYS, SPEED_CHANGES)
    joined = by_sample.join(by_trial, on=CONFIG_KEYS, how="left", nulls_equal=True, suffix="_trials")
    columns = []
    for change in SPEED_CHANGES:
        from_trials = pl.col(f"{change.n}_trials").fill_null(0) > 0
        columns += [
            pl.when(from_trials)
            .then(pl.col(f"{change.column}_trials"))
            .otherwise(pl.col(change.column))
            .alias(change.column),
            pl.when(from_trials).then(pl.col(f"{change.n}_trials")).otherwise(pl.col(change.n)).alias(change.n),
        ]
    trial_counts = [pl.col(f"{c.n}_trials").fill_null(0) for c in SPEED_CHANGES]
    columns.append((pl.max_horizontal(trial_counts) > 0).alias("speed_from_trials"))
    suffixed = [f"{column}_trials" for c in SPEED_CHANGES for column in (c.column, c.n)]
    return sort_configs(joined.with_columns(columns).drop(suffixed))


def summary(cells: pl.DataFrame, timings: pl.DataFrame | None = None) -> pl.DataFrame:
    """Absolute statistics and relative changes side by side; change columns are null without a baseline."""
    return sort_configs(
        aggregate(cells).join(relative_changes(cells, timings), on=CONFIG_KEYS, how="left", nulls_equal=True)
    )


def baseline_lengths(cells: pl.DataFrame) -> set[int]:
    """Lengths at which at least one baseline cell succeeded."""
    return set(ok_cells(cells).filter(IS_BASELINE)["seq_len"].drop_nulls().to_list())


def position_perplexity(curves: pl.DataFrame, cells: pl.DataFrame) -> pl.DataFrame:
    """Perplexity per position bucket and configuration (CONFIG_KEYS; a curve's ratio is its cell's),
    exp(sum nll / sum tokens) pooled over samples; failed cells out."""
    failed = failed_cells(cells)["cell_id"]
    ratios = cells.select("cell_id", "ratio").unique("cell_id")
    return (
        curves.filter(~pl.col("cell_id").is_in(failed.implode()))
        .join(ratios, on="cell_id", how="left")
        .group_by([*CONFIG_KEYS, "bucket_start", "bucket_end"])
        .agg(pl.col("nll_sum").sum(), pl.col("tokens").sum())
        .filter(pl.col("tokens") > 0)
        .with_columns((pl.col("nll_sum") / pl.col("tokens")).exp().alias("ppl"))
        .sort(
            ["seq_len", "compression", "policy_label", "ratio", "cache_size", "positions", "bucket_start"],
            nulls_last=False,
        )
    )
