"""The report's numbers: a run directory read into frames, means over samples, paired changes against `full`
(speed from the raw trial timings, with intervals), the run's noise floor, passkey retrieval accuracy, the names
of configurations, and the recommendations chosen from the numbers by fixed, stated rules.

Nothing here formats a table or writes a file; content.py says things about these numbers, charts.py draws them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

from kvcompare.errors import KVCompareError
from kvcompare.schema import (
    CURVE_SCHEMA,
    CURVES_GLOB,
    RESULT_SCHEMA,
    RESULTS_GLOB,
    RUN_JSON,
    TIMINGS_GLOB,
    TIMINGS_SCHEMA,
)
from kvcompare.stats import Estimate, mean_estimate

# --- Loading: tolerate what an interrupted or partial run leaves behind ---------------------------------------


class ReportError(KVCompareError, ValueError):
    """The folder given is not a results folder: there is nothing to report, and nothing is written."""


def check_run_dir(run_dir: Path) -> None:
    """Raise ReportError unless run_dir is a folder holding run.json or at least one cells/*.parquet."""
    if not run_dir.exists():
        why = "it does not exist"
    elif not run_dir.is_dir():
        why = "it is not a folder"
    elif not (run_dir / RUN_JSON).is_file() and not any(run_dir.glob(RESULTS_GLOB)):
        why = f"no {RUN_JSON}, no {RESULTS_GLOB}"
    else:
        return
    raise ReportError(
        f"{run_dir} is not a kvcompare results folder ({why}): give the folder a `kvcompare run --out` wrote"
    )


@dataclass(frozen=True)
class RunData:
    """Everything the report is built from."""

    run_dir: Path
    meta: dict[str, Any]  # run.json, {} when absent
    cells: pl.DataFrame  # RESULT_SCHEMA, one row per cell (latest attempt)
    curves: pl.DataFrame  # CURVE_SCHEMA
    timings: pl.DataFrame  # TIMINGS_SCHEMA, every trial's raw rows; empty for runs older than repeated trials
    problems: list[str] = field(default_factory=list)  # files that could not be read
    # RESULT_SCHEMA, the passkey probes (task "passkey"), kept apart so that `cells` stays the PPL/speed cells
    retrieval: pl.DataFrame = field(default_factory=lambda: _empty(RESULT_SCHEMA))


def _empty(schema: pa.Schema) -> pl.DataFrame:
    frame = pl.from_arrow(schema.empty_table())
    assert isinstance(frame, pl.DataFrame)
    return frame


def _read_parquet_dir(run_dir: Path, pattern: str, schema: pa.Schema, problems: list[str]) -> pl.DataFrame:
    """Read files one by one so that a half-written file costs only itself, and give every schema column."""
    frames = []
    for path in sorted(run_dir.glob(pattern)):
        try:
            frames.append(pl.read_parquet(path))
        except Exception as exc:  # noqa: BLE001 - any unreadable file is reported, not fatal
            problems.append(f"{path.relative_to(run_dir)}: {exc}")
    empty = _empty(schema)
    frame = pl.concat([empty, *frames], how="diagonal_relaxed")
    return frame.select([pl.col(name).cast(dtype) for name, dtype in empty.schema.items()])


def _latest_attempt(cells: pl.DataFrame) -> pl.DataFrame:
    """A resumed run may hold a failed and a later ok row for one cell: keep ok, then the latest."""
    return (
        cells.with_columns((pl.col("status") == "ok").alias("_ok"))
        .sort(["_ok", "finished_at"], nulls_last=False)
        .unique(subset="cell_id", keep="last", maintain_order=True)
        .drop("_ok")
    )


#: The task of a passkey probe's row; every other row (task "ppl", or null in runs older than tasks) is a PPL cell.
PASSKEY_TASK = "passkey"
IS_PASSKEY = (pl.col("task") == PASSKEY_TASK).fill_null(False)


def load_run(run_dir: Path) -> RunData:
    """Load run.json, cells, curves and timings; any of them may be missing, but not all (ReportError).

    Passkey probes go to `retrieval`, and `cells` (with the curves and timings of its cells) holds only the
    PPL/speed cells, so every figure computed from `cells` is what it was before runs had probes.
    """
    check_run_dir(run_dir)
    problems: list[str] = []
    meta_path = run_dir / RUN_JSON
    meta: dict[str, Any] = {}
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            problems.append(f"{RUN_JSON}: {exc}")
    rows = _latest_attempt(_read_parquet_dir(run_dir, RESULTS_GLOB, RESULT_SCHEMA, problems))
    retrieval = rows.filter(IS_PASSKEY)
    not_probe = ~pl.col("cell_id").is_in(retrieval["cell_id"].implode()).fill_null(False)
    curves = _read_parquet_dir(run_dir, CURVES_GLOB, CURVE_SCHEMA, problems)
    timings = _read_parquet_dir(run_dir, TIMINGS_GLOB, TIMINGS_SCHEMA, problems)
    return RunData(
        run_dir=run_dir,
        meta=meta,
        cells=rows.filter(~IS_PASSKEY),
        curves=curves.filter(not_probe),
        timings=timings.filter(not_probe),
        problems=problems,
        retrieval=retrieval,
    )


# --- Metrics and changes: titles and display units, so tables and charts agree ------------------------------


class Bounded:
    """A figure's column and, beside it, the ends of its 95% interval: `<column>_low` and `<column>_high`
    (the names tables and charts read, so that every speed figure is drawn with its interval alike)."""

    column: str

    @property
    def low(self) -> str:
        return f"{self.column}_low"

    @property
    def high(self) -> str:
        return f"{self.column}_high"


@dataclass(frozen=True)
class Metric(Bounded):
    """A result column and how a reader sees it; a speed metric's `low`/`high` are, per configuration, the
    lowest and highest ends of its cells' intervals over trials (aggregate())."""

    column: str
    title: str
    unit: str  # unit after `scale` is applied; "" for unitless
    decimals: int
    scale: float = 1.0  # stored value * scale = displayed value
    interval: str | None = None  # speed: prefix of the row's interval over trials (`tpot` -> tpot_ci_low)

    @property
    def label(self) -> str:
        return f"{self.title} ({self.unit})" if self.unit else self.title

    @property
    def speed(self) -> bool:
        return self.interval is not None


METRICS: tuple[Metric, ...] = (
    Metric("ttft_s", "TTFT", "s", 4, interval="ttft"),
    Metric("ttft_oneshot_s", "TTFT one pass", "s", 4, interval="ttft_oneshot"),
    Metric("tpot_s", "TPOT", "s", 5, interval="tpot"),
    Metric("throughput_tok_s", "Throughput", "tokens/s", 1, interval="throughput"),
    Metric("ppl", "PPL", "", 3),
    Metric("accuracy", "Accuracy", "", 4),
    Metric("peak_kv_bytes", "Peak KV", "MiB", 2, scale=1 / 2**20),
    Metric("evict_share", "Eviction share", "%", 1, scale=100.0),
    Metric("signal_share", "Signal share", "%", 1, scale=100.0),
)
METRIC_BY_COLUMN: dict[str, Metric] = {m.column: m for m in METRICS}
#: What one decode step must read, per cell (the same for every sample of a configuration and length).
PHYSICS_COLUMNS: tuple[str, ...] = ("kv_read_bytes", "weight_bytes", "tpot_floor_s")


@dataclass(frozen=True)
class Change(Bounded):
    """A relative change against `full`, 100 × (policy − full) / full in %, averaged over pairs.

    Speed changes pair trials (same passage, position mode, session and round) and carry a bootstrap
    interval over the pairs; quality changes pair cells per sample and are deterministic, with no interval.
    """

    column: str  # the mean change; `low`, `high`, `n` name its interval and pair count
    title: str
    value: str  # the policy's figure: a trial figure (speed) or a row column (quality)
    base: str  # the `full` figure it is compared with
    speed: bool

    @property
    def n(self) -> str:
        return f"{self.column}_n"

    @property
    def noise(self) -> str:
        """The run's noise floor for this change, as recommend() adds it beside each configuration."""
        return f"{self.column}_noise"

    @property
    def like_for_like(self) -> bool:
        """Compared with the same figure of `full` (TTFT with TTFT, not with the one-pass TTFT)."""
        return self.value == self.base


TTFT_CHANGE = Change("ttft_s_change_pct", "TTFT", "ttft_s", "ttft_s", speed=True)
TTFT_ONESHOT_CHANGE = Change("ttft_oneshot_change_pct", "TTFT vs one-pass full", "ttft_s", "ttft_oneshot_s", True)
TPOT_CHANGE = Change("tpot_s_change_pct", "TPOT", "tpot_s", "tpot_s", speed=True)
THROUGHPUT_CHANGE = Change(
    "throughput_tok_s_change_pct", "Throughput", "throughput_tok_s", "throughput_tok_s", speed=True
)
PPL_CHANGE = Change("ppl_change_pct", "PPL", "ppl", "ppl", speed=False)
ACCURACY_CHANGE = Change("accuracy_change_pct", "Accuracy", "accuracy", "accuracy", speed=False)
CHANGES: tuple[Change, ...] = (
    TTFT_CHANGE,
    TTFT_ONESHOT_CHANGE,
    TPOT_CHANGE,
    THROUGHPUT_CHANGE,
    PPL_CHANGE,
    ACCURACY_CHANGE,
)
SPEED_CHANGES: tuple[Change, ...] = tuple(c for c in CHANGES if c.speed)
#: What the A/A control measures: `full` against itself, figure for figure.
NOISE_CHANGES: tuple[Change, ...] = tuple(c for c in SPEED_CHANGES if c.like_for_like)
CHANGE_BY_COLUMN: dict[str, Change] = {c.column: c for c in CHANGES}


# --- Aggregation: per-configuration means over samples, paired changes against `full` -----------------------

#: A configuration at one length; `policy` rides along for colouring and filtering.
CONFIG_KEYS: list[str] = ["seq_len", "policy", "policy_label", "cache_size", "positions"]
#: A policy row is compared with the baseline row that saw the same passage the same way.
PAIR_KEYS: list[str] = ["seq_len", "sample_id", "positions"]
#: A policy trial is compared with the baseline trial of the same passage, session and round.
ROUND_KEYS: list[str] = [*PAIR_KEYS, "session", "round"]
#: One latency trial in the raw timings (its TTFT row and its step rows share these).
TRIAL_KEYS: list[str] = ["cell_id", "role", *ROUND_KEYS]
#: Roles of `full` trials a policy trial (or an A/A control) is paired with; a key has at most one of them.
BASELINE_ROLES = ("cell", "baseline")
BASELINE_POLICY = "full"

IS_BASELINE = (pl.col("policy") == BASELINE_POLICY) & pl.col("cache_size").is_null()
IS_OK = pl.col("status") == "ok"


def ok_cells(cells: pl.DataFrame) -> pl.DataFrame:
    return cells.filter(IS_OK)


def failed_cells(cells: pl.DataFrame) -> pl.DataFrame:
    return cells.filter(~IS_OK)


def lengths_in(frame: pl.DataFrame) -> list[int]:
    """The passage lengths present, shortest first."""
    return sorted(frame["seq_len"].drop_nulls().unique().to_list())


def sort_configs(frame: pl.DataFrame) -> pl.DataFrame:
    """Baseline first, then by policy, cache limit and positions, so tables read the same everywhere."""
    return frame.sort(
        [pl.col("seq_len"), pl.col("policy") != BASELINE_POLICY, "policy_label", "cache_size", "positions"],
        nulls_last=False,
    )


def aggregate(cells: pl.DataFrame) -> pl.DataFrame:
    """Per configuration: mean, std and count over samples of every metric; for speed metrics also the
    lowest low and highest high of the cells' intervals over trials; the physics of a decode step."""
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
    stats += [pl.col(column).mean().alias(f"{column}_mean") for column in PHYSICS_COLUMNS]
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
    """Trials paired with the `full` trial of the same passage, position mode, session and round, with the
    change of each paired figure in %: never across sessions or rounds."""

    policy: pl.DataFrame  # a policy's trial (role "cell") against `full`; SPEED_CHANGES columns
    aa: pl.DataFrame  # the A/A control (`full` timed again) against `full`; NOISE_CHANGES columns


def trial_pairs(cells: pl.DataFrame, timings: pl.DataFrame) -> TrialPairs:
    """Pair the trials of successful cells; a trial with no `full` trial of its key is left out."""
    configs = ok_cells(cells).select("cell_id", "policy", "policy_label", "cache_size", IS_BASELINE.alias("_baseline"))
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
    timings = _empty(TIMINGS_SCHEMA) if timings is None else timings
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
    """Perplexity per position bucket, exp(sum nll / sum tokens) pooled over samples; failed cells out."""
    failed = failed_cells(cells)["cell_id"]
    return (
        curves.filter(~pl.col("cell_id").is_in(failed.implode()))
        .group_by(["seq_len", "policy", "policy_label", "cache_size", "positions", "bucket_start", "bucket_end"])
        .agg(pl.col("nll_sum").sum(), pl.col("tokens").sum())
        .filter(pl.col("tokens") > 0)
        .with_columns((pl.col("nll_sum") / pl.col("tokens")).exp().alias("ppl"))
        .sort(["seq_len", "policy_label", "cache_size", "positions", "bucket_start"], nulls_last=False)
    )


# --- Retrieval: passkey probes, whether greedy decoding still gives the key under eviction -------------------

#: A retrieval configuration: a policy at a cache limit in a position mode; `policy` rides along for names.
RETRIEVAL_KEYS: list[str] = ["policy", "policy_label", "cache_size", "positions"]
#: Where a probe was placed: the prompt's length and the needle's depth in it.
PROBE_KEYS: list[str] = ["seq_len", "depth"]
#: A probe that counts towards accuracy: it succeeded and recorded whether the key came out.
IS_ANSWERED = IS_OK.fill_null(False) & pl.col("passkey_correct").is_not_null()


def retrieval_stats(retrieval: pl.DataFrame, by: Sequence[str] = ()) -> pl.DataFrame:
    """Per configuration and group of `by`: accuracy_pct = 100 × the share of answered probes whose greedy
    decoding gave the key exactly, logprob_mean = their mean teacher-forced log-probability of the key, n =
    answered probes; failed = probes that failed, left out of both. Baseline first, as in every table."""
    return (
        retrieval.group_by([*RETRIEVAL_KEYS, *by])
        .agg(
            (pl.col("passkey_correct").filter(IS_ANSWERED).cast(pl.Float64).mean() * 100).alias("accuracy_pct"),
            pl.col("passkey_logprob").filter(IS_ANSWERED).mean().alias("logprob_mean"),
            IS_ANSWERED.sum().cast(pl.Int64).alias("n"),
            (~IS_OK.fill_null(False)).sum().cast(pl.Int64).alias("failed"),
        )
        .sort(
            [pl.col("policy") != BASELINE_POLICY, "policy_label", "cache_size", "positions", *by],
            nulls_last=False,
        )
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
    """Per evicting configuration (RETRIEVAL_KEYS): retrieval_pct, its accuracy, retrieval_full_pct, the
    accuracy of `full` in its position mode, and retrieval_gap_pts = full's − its, in percentage points; both
    pooled over the answered probes at the lengths where both it and that `full` have answered probes, so that
    neither is judged on lengths the other was not. A configuration sharing no length with `full` is absent."""
    answered = retrieval.filter(IS_ANSWERED).with_columns(pl.col("passkey_correct").cast(pl.Float64) * 100)
    baseline = answered.filter(IS_BASELINE).select("positions", "seq_len", "passkey_correct")
    evicting = answered.filter(~IS_BASELINE)
    shared = (
        evicting.select(*RETRIEVAL_KEYS, "seq_len")
        .unique()
        .join(baseline.select("positions", "seq_len").unique(), on=["positions", "seq_len"], nulls_equal=True)
    )
    own = (
        evicting.join(shared, on=[*RETRIEVAL_KEYS, "seq_len"], nulls_equal=True)
        .group_by(RETRIEVAL_KEYS)
        .agg(pl.col("passkey_correct").mean().alias("retrieval_pct"))
    )
    full = (
        shared.join(baseline, on=["positions", "seq_len"], nulls_equal=True)
        .group_by(RETRIEVAL_KEYS)
        .agg(pl.col("passkey_correct").mean().alias("retrieval_full_pct"))
    )
    return own.join(full, on=RETRIEVAL_KEYS, nulls_equal=True).with_columns(
        (pl.col("retrieval_full_pct") - pl.col("retrieval_pct")).alias("retrieval_gap_pts")
    )


# --- The noise floor: how far `full` drifts from itself on this machine in this run -------------------------


@dataclass(frozen=True)
class NoiseFloor:
    """The A/A control's change against `full` (paired like a policy's trials), over all its pairs.

    A metric's floor is max(|low|, |high|) of that change's 95% interval: a speed difference smaller than it
    is not distinguishable from `full` against itself. `reason` says why there is none, "" when measured.
    """

    changes: dict[str, Estimate]  # Change.column -> the A/A change over all lengths
    by_length: pl.DataFrame  # change_estimates() of the A/A pairs per seq_len
    reason: str = ""

    def floor(self, change: Change) -> float | None:
        found = self.changes.get(change.column)
        if found is None or found.low is None or found.high is None:
            return None
        return max(abs(found.low), abs(found.high))

    @property
    def pairs(self) -> int:
        return max((e.n for e in self.changes.values()), default=0)

    @property
    def measured(self) -> bool:
        return any(self.floor(change) is not None for change in NOISE_CHANGES)


def noise_floor(cells: pl.DataFrame, timings: pl.DataFrame | None, no_speed: str = "") -> NoiseFloor:
    """The run's noise floor from its A/A control trials, or why it could not be measured (``no_speed``: why
    the run measured no speed at all, Measured.no_speed)."""
    nothing = change_estimates(pl.DataFrame(schema={"seq_len": pl.Int64}), ["seq_len"], NOISE_CHANGES)
    if no_speed:
        return NoiseFloor({}, nothing, f"no speed was measured: {no_speed}")
    if timings is None or timings.is_empty():
        return NoiseFloor({}, nothing, "the run has no raw timings (`timings/`; it predates repeated latency trials)")
    if timings.filter(pl.col("role") == "aa_control").is_empty():
        return NoiseFloor({}, nothing, "the run recorded no A/A control trials")
    aa = trial_pairs(cells, timings).aa
    if aa.is_empty():
        return NoiseFloor(
            {},
            nothing,
            "no A/A control trial has a successful `full` trial of the same passage, session and round to pair with",
        )
    overall = change_estimates(aa, [], NOISE_CHANGES).row(0, named=True)
    found = NoiseFloor(
        {c.column: estimate(overall, c) for c in NOISE_CHANGES}, change_estimates(aa, ["seq_len"], NOISE_CHANGES)
    )
    if found.measured:
        return found
    return NoiseFloor(
        found.changes,
        found.by_length,
        f"there is only {found.pairs} A/A pair (one round of one passage), and an interval needs at least two",
    )


# --- Names of configurations, the same in every table and chart ---------------------------------------------


def several_position_modes(cells: pl.DataFrame) -> bool:
    """Whether the run measured more than one position mode, and so more than one `full` per passage."""
    return cells["positions"].drop_nulls().n_unique() > 1


def config_name(row: dict[str, Any], several_modes: bool = False) -> str:
    """'streaming @ 64', plus ', positions=shift' when positions are not the true ones.

    The `full` baseline evicts nothing, so the position mode changes nothing it computes: it is 'full'. A run
    with several position modes (several_modes) measures it once per mode, as the baseline that mode's
    policies are paired with, and only then is the mode named: 'full (for positions=shift)'.
    """
    if row["policy"] == BASELINE_POLICY:
        named = several_modes and row["positions"] is not None
        return f"{row['policy_label']} (for positions={row['positions']})" if named else row["policy_label"]
    name = row["policy_label"] if row["cache_size"] is None else f"{row['policy_label']} @ {row['cache_size']}"
    return name if row["positions"] in (None, "true") else f"{name}, positions={row['positions']}"


def policy_name(row: dict[str, Any], several_modes: bool = False) -> str:
    """config_name without the cache limit, for tables that show the limit in a column of its own."""
    return config_name({**row, "cache_size": None}, several_modes)


# --- Recommendations: fixed, stated rules, so a reader can check every choice -------------------------------

#: Quality first: the largest PPL increase, in % of the baseline, that still counts as "no visible loss".
QUALITY_PPL_MAX_PCT = 2.0
#: Speed first and long text: the largest PPL increase worth trading for speed.
SPEED_PPL_MAX_PCT = 10.0

PPL_DELTA = pl.col(PPL_CHANGE.column)


@dataclass(frozen=True)
class Step:
    """One filter of a rule, with what the report says when it leaves no configuration."""

    keep: pl.Expr
    none_reason: str


@dataclass(frozen=True)
class Rule:
    """Keep the configurations that pass every step, order them, take the first."""

    scenario: str
    text: str  # the rule as the report states it
    steps: tuple[Step, ...]  # applied in turn; the first that leaves nothing gives the reason
    order: tuple[pl.Expr, ...]
    needs_baseline: bool


SPEED_PPL_OK = Step(
    PPL_DELTA <= SPEED_PPL_MAX_PCT,
    f"no configuration within +{SPEED_PPL_MAX_PCT:g}% PPL",
)


def significant_gain(change: Change, lower_is_better: bool) -> tuple[Step, Step]:
    """A speed gain a rule may act on: its 95% interval lies entirely on the gaining side of 0, and its mean
    is beyond the run's noise floor (recommend() puts the floor in the `noise` column; 0 when unmeasured)."""
    what = change.title
    side = "below" if lower_is_better else "above"
    if lower_is_better:
        significant = pl.col(change.high) < 0
        beyond = pl.col(change.column) < -pl.col(change.noise)
    else:
        significant = pl.col(change.low) > 0
        beyond = pl.col(change.column) > pl.col(change.noise)
    return (
        Step(
            significant,
            f"nothing beat full significantly on {what} at this length (no configuration within "
            f"+{SPEED_PPL_MAX_PCT:g}% PPL has a {what} change whose 95% interval lies entirely {side} 0; "
            "a change without an interval never counts)",
        ),
        Step(beyond, f"no significant {what} gain at this length is larger than the run's noise floor for {what}"),
    )


def _speed_rule_text(change: Change, side: str, better: str) -> str:
    return (
        f"among configurations whose mean PPL change is at most +{SPEED_PPL_MAX_PCT:g}% and whose "
        f"{change.title} change against full is significant and {side} 0 (its 95% interval over paired trials "
        f"entirely {side} 0, and its mean beyond the run's noise floor for {change.title}), the one with the "
        f"{better} {change.title} change; none when nothing qualifies"
    )


QUALITY_FIRST = Rule(
    "quality first",
    f"per length, the smallest cache limit whose mean PPL change is at most +{QUALITY_PPL_MAX_PCT:g}%, "
    "with the policy of lowest PPL change at that limit",
    (Step(PPL_DELTA <= QUALITY_PPL_MAX_PCT, f"no configuration within +{QUALITY_PPL_MAX_PCT:g}% PPL"),),
    (pl.col("cache_size"), PPL_DELTA),
    True,
)
SPEED_FIRST = Rule(
    "speed first",
    "per length, " + _speed_rule_text(TPOT_CHANGE, "below", "lowest (most negative)"),
    (SPEED_PPL_OK, *significant_gain(TPOT_CHANGE, lower_is_better=True)),
    (pl.col(TPOT_CHANGE.column),),
    True,
)
MEMORY_BOUND = Rule(
    "memory-bound",
    "per length, the configuration with the smallest mean peak KV-cache size (ties: lowest PPL change), "
    "whatever its PPL change, which is shown",
    (Step(pl.col("peak_kv_bytes_mean").is_not_null(), "no peak KV-cache size measured"),),
    (pl.col("peak_kv_bytes_mean"), PPL_DELTA),
    False,
)
LONG_TEXT = Rule(
    "long text",
    "at the longest length, " + _speed_rule_text(THROUGHPUT_CHANGE, "above", "highest"),
    (SPEED_PPL_OK, *significant_gain(THROUGHPUT_CHANGE, lower_is_better=False)),
    (pl.col(THROUGHPUT_CHANGE.column).neg(),),
    True,
)
PER_LENGTH_RULES = (QUALITY_FIRST, SPEED_FIRST, MEMORY_BOUND)
ALL_RULES = (*PER_LENGTH_RULES, LONG_TEXT)

#: Quality first in a run with passkey probes: the largest drop in retrieval accuracy below `full`, in points.
QUALITY_RETRIEVAL_MAX_PTS = 5.0
#: Quality first where retrieval was measured: no visible PPL loss is not enough if the model forgets the key.
QUALITY_FIRST_WITH_RETRIEVAL = Rule(
    QUALITY_FIRST.scenario,
    f"per length, the smallest cache limit whose mean PPL change is at most +{QUALITY_PPL_MAX_PCT:g}% and whose "
    f"passkey retrieval accuracy is at most {QUALITY_RETRIEVAL_MAX_PTS:g} percentage points below that of full "
    "(same position mode, both over the lengths where both were probed; a configuration without such probes "
    "does not qualify), with the policy of lowest PPL change at that limit",
    (
        *QUALITY_FIRST.steps,
        Step(
            pl.col("retrieval_gap_pts") <= QUALITY_RETRIEVAL_MAX_PTS,
            f"no configuration within +{QUALITY_PPL_MAX_PCT:g}% PPL retrieves the pass key within "
            f"{QUALITY_RETRIEVAL_MAX_PTS:g} points of full",
        ),
    ),
    QUALITY_FIRST.order,
    QUALITY_FIRST.needs_baseline,
)


def rules_for(with_retrieval: bool, with_speed: bool = True) -> tuple[Rule, ...]:
    """The rules a run is judged by, in the order the report states them: ALL_RULES, with quality first
    also asking for retrieval when the run answered passkey probes (with_retrieval), and without the speed
    rules when the run measured no speed (with_speed false)."""
    rules = ALL_RULES if with_speed else tuple(rule for rule in ALL_RULES if rule not in (SPEED_FIRST, LONG_TEXT))
    if not with_retrieval:
        return rules
    return tuple(QUALITY_FIRST_WITH_RETRIEVAL if rule is QUALITY_FIRST else rule for rule in rules)


@dataclass(frozen=True)
class Recommendation:
    scenario: str
    seq_len: int
    choice: dict[str, Any] | None  # a row of summary(); None when nothing qualifies
    reason: str  # why there is no choice; "" when there is one


def apply_rule(rule: Rule, evicting: pl.DataFrame, seq_len: int, has_baseline: bool) -> Recommendation:
    """The first configuration in rule order that passes every step; else why not, and no choice is made up."""
    if rule.needs_baseline and not has_baseline:
        return Recommendation(rule.scenario, seq_len, None, "no baseline at this length")
    candidates = evicting.filter(pl.col("seq_len") == seq_len)
    for step in rule.steps:
        candidates = candidates.filter(step.keep)
        if candidates.is_empty():
            return Recommendation(rule.scenario, seq_len, None, step.none_reason)
    best = candidates.sort(rule.order, nulls_last=True).row(0, named=True)
    return Recommendation(rule.scenario, seq_len, best, "")


def recommend(
    summary: pl.DataFrame,
    baseline_lengths: set[int],
    noise: NoiseFloor | None = None,
    retrieval: pl.DataFrame | None = None,
    with_speed: bool = True,
) -> list[Recommendation]:
    """Apply the rules to summary(): the per-length rules at every length, LONG_TEXT at the longest.

    The run's noise floor (0 where it was not measured: significance alone then decides) is put beside each
    configuration, so that no speed rule acts on a gain inside it. Where passkey probes were answered
    (`retrieval`, RunData.retrieval), retrieval_gaps() is put beside each too, and quality first asks for it
    (rules_for()).
    """
    floors = [pl.lit((noise.floor(c) if noise else None) or 0.0).alias(c.noise) for c in NOISE_CHANGES]
    evicting = summary.filter(pl.col("policy") != BASELINE_POLICY).with_columns(floors)
    measured = retrieval_measured(retrieval)
    if measured and retrieval is not None:
        gaps = retrieval_gaps(retrieval)
        evicting = evicting.join(gaps, on=RETRIEVAL_KEYS, how="left", nulls_equal=True, maintain_order="left")
    rules = rules_for(measured, with_speed)
    per_length = [rule for rule in rules if rule is not LONG_TEXT]
    lengths = lengths_in(evicting)
    plan = [(rule, seq_len) for seq_len in lengths for rule in per_length]
    plan += [(LONG_TEXT, lengths[-1])] if lengths and LONG_TEXT in rules else []
    return [apply_rule(rule, evicting, seq_len, seq_len in baseline_lengths) for rule, seq_len in plan]


@dataclass(frozen=True)
class Measured:
    """What a run measured, so that every line and section of its report speaks only of that."""

    perplexity: bool  # some perplexity cell succeeded
    speed: bool  # some successful perplexity cell has speed figures (latency trials)
    retrieval: bool  # some passkey probe was answered
    no_speed: str = ""  # why no speed figure is reported; "" when speed was measured

    def speaks_of(self, change: Change | Metric) -> bool:
        """Whether a table or chart should show ``change`` (speed figures only where speed was measured)."""
        return self.speed or not is_speed(change)


def is_speed(figure: Change | Metric) -> bool:
    """Speed figures, and the shares of decode time spent evicting or collecting signals."""
    return figure.speed or figure.column in ("evict_share", "signal_share")


#: What a run that measured perplexity and speed (and no retrieval) is described as: the tables' default.
EVERYTHING = Measured(True, True, False)


# --- Everything a report says about one run, computed once --------------------------------------------------


@dataclass(frozen=True)
class Analysis:
    summary: pl.DataFrame  # summary(): one row per configuration and length
    baseline_lengths: set[int]
    noise: NoiseFloor
    several_modes: bool
    recommendations: list[Recommendation]
    rules: tuple[Rule, ...] = ALL_RULES  # the rules the recommendations followed, as the report states them
    measured: Measured = EVERYTHING  # what the run measured


def what_was_measured(run: RunData) -> Measured:
    ok = run.cells.filter(pl.col("status") == "ok")
    speed = not ok.filter(pl.col("ttft_s").is_not_null() | pl.col("tpot_s").is_not_null()).is_empty()
    retrieval = retrieval_measured(run.retrieval)
    if speed:
        reason = ""
    elif run.cells.is_empty():
        reason = "the run measured passkey retrieval only" if not run.retrieval.is_empty() else "the run has no cell"
    elif ok.is_empty():
        reason = f"every one of its {run.cells.height} perplexity and speed cells failed"
    elif (ok["repeats"].fill_null(-1) == 0).all():
        reason = "--repeats 0: a quality-only run, with no latency trial"
    else:
        reason = "its cells recorded no latency trial"
    return Measured(not ok.is_empty(), speed, retrieval, reason)


@dataclass(frozen=True)
class Outcome:
    """How a run's cells ended, passkey probes included."""

    ok: int
    failed: int

    @property
    def nothing_succeeded(self) -> bool:
        return self.ok == 0


def outcome(run: RunData) -> Outcome:
    statuses = pl.concat([run.cells["status"], run.retrieval["status"]])
    return Outcome(int((statuses == "ok").sum()), int((statuses != "ok").sum()))


def analyse(run: RunData) -> Analysis:
    stats = summary(run.cells, run.timings)
    with_baseline = baseline_lengths(run.cells)
    measured = what_was_measured(run)
    noise = noise_floor(run.cells, run.timings, measured.no_speed)
    return Analysis(
        stats,
        with_baseline,
        noise,
        several_position_modes(run.cells),
        recommend(stats, with_baseline, noise, run.retrieval, measured.speed),
        rules_for(measured.retrieval, measured.speed),
        measured,
    )
