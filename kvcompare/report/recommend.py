"""Recommendations derived from the data by fixed, stated rules, so a reader can check every choice."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import polars as pl

from kvcompare.report.tables import BASELINE_POLICY

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
    choice: dict[str, Any] | None  # a row of tables.summary(); None when nothing qualifies
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
    """Apply the rules to tables.summary(): PER_LENGTH_RULES at every length, LONG_TEXT at the longest."""
    evicting = summary.filter(pl.col("policy") != BASELINE_POLICY)
    lengths = sorted(evicting["seq_len"].drop_nulls().unique().to_list())
    plan = [(rule, seq_len) for seq_len in lengths for rule in PER_LENGTH_RULES]
    plan += [(LONG_TEXT, lengths[-1])] if lengths else []
    return [apply_rule(rule, evicting, seq_len, seq_len in baseline_lengths) for rule, seq_len in plan]
