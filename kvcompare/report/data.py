"""The report's numbers: a run directory read into frames, means over samples, paired changes against `full`,
the names of configurations, and the recommendations chosen from the numbers by fixed, stated rules.

Nothing here formats a table or writes a file; content.py says things about these numbers, charts.py draws them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

from kvcompare.errors import KVCompareError
from kvcompare.schema import CURVE_SCHEMA, CURVES_GLOB, RESULT_SCHEMA, RESULTS_GLOB, RUN_JSON

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
    problems: list[str] = field(default_factory=list)  # files that could not be read


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


def load_run(run_dir: Path) -> RunData:
    """Load run.json, cells and curves; any of them may be missing, but not all (ReportError)."""
    check_run_dir(run_dir)
    problems: list[str] = []
    meta_path = run_dir / RUN_JSON
    meta: dict[str, Any] = {}
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            problems.append(f"{RUN_JSON}: {exc}")
    cells = _latest_attempt(_read_parquet_dir(run_dir, RESULTS_GLOB, RESULT_SCHEMA, problems))
    curves = _read_parquet_dir(run_dir, CURVES_GLOB, CURVE_SCHEMA, problems)
    return RunData(run_dir=run_dir, meta=meta, cells=cells, curves=curves, problems=problems)


# --- Metrics: titles and display units, so tables and charts agree ------------------------------------------


@dataclass(frozen=True)
class Metric:
    """A result column and how a reader sees it."""

    column: str
    title: str
    unit: str  # unit after `scale` is applied; "" for unitless
    decimals: int
    scale: float = 1.0  # stored value * scale = displayed value
    relative: bool = False  # compared against the `full` baseline

    @property
    def label(self) -> str:
        return f"{self.title} ({self.unit})" if self.unit else self.title

    @property
    def change_column(self) -> str:
        return f"{self.column}_change_pct"


METRICS: tuple[Metric, ...] = (
    Metric("ttft_s", "TTFT", "s", 4, relative=True),
    Metric("tpot_s", "TPOT", "s", 5, relative=True),
    Metric("throughput_tok_s", "Throughput", "tokens/s", 1, relative=True),
    Metric("ppl", "PPL", "", 3, relative=True),
    Metric("accuracy", "Accuracy", "", 4, relative=True),
    Metric("peak_kv_bytes", "Peak KV", "MiB", 2, scale=1 / 2**20),
    Metric("evict_share", "Eviction share", "%", 1, scale=100.0),
)
RELATIVE_METRICS: tuple[Metric, ...] = tuple(m for m in METRICS if m.relative)
METRIC_BY_COLUMN: dict[str, Metric] = {m.column: m for m in METRICS}


# --- Aggregation: per-configuration means over samples, paired changes against `full` -----------------------

#: A configuration at one length; `policy` rides along for colouring and filtering.
CONFIG_KEYS: list[str] = ["seq_len", "policy", "policy_label", "cache_size", "positions"]
#: A policy row is compared with the baseline row that saw the same passage the same way.
PAIR_KEYS: list[str] = ["seq_len", "sample_id", "positions"]
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
    failed = failed_cells(cells)["cell_id"]
    return (
        curves.filter(~pl.col("cell_id").is_in(failed.implode()))
        .group_by(["seq_len", "policy", "policy_label", "cache_size", "positions", "bucket_start", "bucket_end"])
        .agg(pl.col("nll_sum").sum(), pl.col("tokens").sum())
        .filter(pl.col("tokens") > 0)
        .with_columns((pl.col("nll_sum") / pl.col("tokens")).exp().alias("ppl"))
        .sort(["seq_len", "policy_label", "cache_size", "positions", "bucket_start"], nulls_last=False)
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

PPL_CHANGE = pl.col("ppl_change_pct")


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
    PPL_CHANGE <= SPEED_PPL_MAX_PCT,
    f"no configuration within +{SPEED_PPL_MAX_PCT:g}% PPL",
)

QUALITY_FIRST = Rule(
    "quality first",
    f"per length, the smallest cache limit whose mean PPL change is at most +{QUALITY_PPL_MAX_PCT:g}%, "
    "with the policy of lowest PPL change at that limit",
    (Step(PPL_CHANGE <= QUALITY_PPL_MAX_PCT, f"no configuration within +{QUALITY_PPL_MAX_PCT:g}% PPL"),),
    (pl.col("cache_size"), PPL_CHANGE),
    True,
)
SPEED_FIRST = Rule(
    "speed first",
    f"per length, among configurations faster than full (mean TPOT change below 0%) whose mean PPL change is "
    f"at most +{SPEED_PPL_MAX_PCT:g}%, the one with the lowest (most negative) TPOT change; none when nothing "
    "beat full on TPOT",
    (
        SPEED_PPL_OK,
        Step(
            pl.col("tpot_s_change_pct") < 0,
            f"nothing beat full on TPOT at this length (among configurations within +{SPEED_PPL_MAX_PCT:g}% PPL)",
        ),
    ),
    (pl.col("tpot_s_change_pct"),),
    True,
)
MEMORY_BOUND = Rule(
    "memory-bound",
    "per length, the configuration with the smallest mean peak KV-cache size (ties: lowest PPL change), "
    "whatever its PPL change, which is shown",
    (Step(pl.col("peak_kv_bytes_mean").is_not_null(), "no peak KV-cache size measured"),),
    (pl.col("peak_kv_bytes_mean"), PPL_CHANGE),
    False,
)
LONG_TEXT = Rule(
    "long text",
    f"at the longest length, among configurations with more throughput than full (mean throughput change "
    f"above 0%) whose mean PPL change is at most +{SPEED_PPL_MAX_PCT:g}%, the one with the highest throughput "
    "change; none when nothing beat full on throughput",
    (
        SPEED_PPL_OK,
        Step(
            pl.col("throughput_tok_s_change_pct") > 0,
            f"nothing beat full on throughput at this length (among configurations within +{SPEED_PPL_MAX_PCT:g}% PPL)",
        ),
    ),
    (pl.col("throughput_tok_s_change_pct").neg(),),
    True,
)
PER_LENGTH_RULES = (QUALITY_FIRST, SPEED_FIRST, MEMORY_BOUND)
ALL_RULES = (*PER_LENGTH_RULES, LONG_TEXT)


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


def recommend(summary: pl.DataFrame, baseline_lengths: set[int]) -> list[Recommendation]:
    """Apply the rules to summary(): PER_LENGTH_RULES at every length, LONG_TEXT at the longest."""
    evicting = summary.filter(pl.col("policy") != BASELINE_POLICY)
    lengths = lengths_in(evicting)
    plan = [(rule, seq_len) for seq_len in lengths for rule in PER_LENGTH_RULES]
    plan += [(LONG_TEXT, lengths[-1])] if lengths else []
    return [apply_rule(rule, evicting, seq_len, seq_len in baseline_lengths) for rule, seq_len in plan]
