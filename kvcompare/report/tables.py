"""Numbers behind the report: per-configuration means over samples and paired changes against `full`."""

from __future__ import annotations

import polars as pl

from kvcompare.report.metrics import METRICS, RELATIVE_METRICS

#: A configuration at one length; `policy` rides along for colouring and filtering.
CONFIG_KEYS: list[str] = ["seq_len", "policy", "policy_label", "cache_size", "positions"]
#: A policy row is compared with the baseline row that saw the same passage the same way.
PAIR_KEYS: list[str] = ["seq_len", "sample_id", "positions"]
BASELINE_POLICY = "full"

IS_BASELINE = (pl.col("policy") == BASELINE_POLICY) & pl.col("cache_size").is_null()


def ok_cells(cells: pl.DataFrame) -> pl.DataFrame:
    return cells.filter(pl.col("status") == "ok")


def sort_configs(frame: pl.DataFrame) -> pl.DataFrame:
    """Baseline first, then by policy, cache limit and positions, so tables read the same everywhere."""
    return frame.sort(
        [pl.col("seq_len"), pl.col("policy") != BASELINE_POLICY, "policy_label", "cache_size", "positions"],
        nulls_last=False,
    )


def aggregate(cells: pl.DataFrame) -> pl.DataFrame:
    """Mean, std and count over samples of every metric, per configuration."""
    stats = [pl.len().alias("n")]
    for metric in METRICS:
        stats += [
            pl.col(metric.column).mean().alias(f"{metric.column}_mean"),
            pl.col(metric.column).std().alias(f"{metric.column}_std"),
        ]
    return sort_configs(ok_cells(cells).group_by(CONFIG_KEYS).agg(stats))


def paired_changes(cells: pl.DataFrame) -> pl.DataFrame:
    """Per-sample change in % of the same sample's baseline: pairing removes passage-to-passage variance."""
    ok = ok_cells(cells)
    baseline = (
        ok.filter(IS_BASELINE)
        .group_by(PAIR_KEYS)
        .agg(pl.col(m.column).mean().alias(f"{m.column}_base") for m in RELATIVE_METRICS)
    )
    changes = []
    for metric in RELATIVE_METRICS:
        base = pl.col(f"{metric.column}_base")
        changes.append(pl.when(base != 0).then(100 * (pl.col(metric.column) - base) / base).alias(metric.change_column))
    return ok.filter(~IS_BASELINE).join(baseline, on=PAIR_KEYS, how="inner").with_columns(changes)


def relative_changes(cells: pl.DataFrame) -> pl.DataFrame:
    """Mean (and std) over samples of the paired changes per configuration; n_paired had a baseline."""
    stats = [pl.len().alias("n_paired")]
    for metric in RELATIVE_METRICS:
        stats += [
            pl.col(metric.change_column).mean(),
            pl.col(metric.change_column).std().alias(f"{metric.change_column}_std"),
        ]
    return sort_configs(paired_changes(cells).group_by(CONFIG_KEYS).agg(stats))


def summary(cells: pl.DataFrame) -> pl.DataFrame:
    """Absolute statistics and relative changes side by side; change columns are null without a baseline."""
    return sort_configs(aggregate(cells).join(relative_changes(cells), on=CONFIG_KEYS, how="left", nulls_equal=True))


def baseline_lengths(cells: pl.DataFrame) -> set[int]:
    """Lengths at which at least one baseline cell succeeded."""
    return set(ok_cells(cells).filter(IS_BASELINE)["seq_len"].drop_nulls().to_list())


def position_perplexity(curves: pl.DataFrame, cells: pl.DataFrame) -> pl.DataFrame:
    """Perplexity per position bucket, exp(sum nll / sum tokens) pooled over samples; failed cells out."""
    failed = cells.filter(pl.col("status") != "ok")["cell_id"]
    return (
        curves.filter(~pl.col("cell_id").is_in(failed.implode()))
        .group_by(["seq_len", "policy", "policy_label", "cache_size", "positions", "bucket_start", "bucket_end"])
        .agg(pl.col("nll_sum").sum(), pl.col("tokens").sum())
        .filter(pl.col("tokens") > 0)
        .with_columns((pl.col("nll_sum") / pl.col("tokens")).exp().alias("ppl"))
        .sort(["seq_len", "policy_label", "cache_size", "positions", "bucket_start"], nulls_last=False)
    )
