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
class Rule:
    """Keep the configurations that qualify, order them, take the first."""

    scenario: str
    text: str  # the rule as the report states it
    keep: pl.Expr
    order: tuple[pl.Expr, ...]
    needs_baseline: bool
    none_reason: str  # shown when no configuration qualifies


QUALITY_FIRST = Rule(
    "quality first",
    f"per length, the smallest cache limit whose mean PPL change is at most +{QUALITY_PPL_MAX_PCT:g}%, "
    "with the policy of lowest PPL change at that limit",
    PPL_CHANGE <= QUALITY_PPL_MAX_PCT,
    (pl.col("cache_size"), PPL_CHANGE),
    True,
    f"no configuration within +{QUALITY_PPL_MAX_PCT:g}% PPL",
)
SPEED_FIRST = Rule(
    "speed first",
    f"per length, the lowest (most negative) TPOT change among configurations whose mean PPL change is "
    f"at most +{SPEED_PPL_MAX_PCT:g}%",
    (PPL_CHANGE <= SPEED_PPL_MAX_PCT) & pl.col("tpot_s_change_pct").is_not_null(),
    (pl.col("tpot_s_change_pct"),),
    True,
    f"no configuration within +{SPEED_PPL_MAX_PCT:g}% PPL",
)
MEMORY_BOUND = Rule(
    "memory-bound",
    "per length, the configuration with the smallest mean peak KV-cache size (ties: lowest PPL change), "
    "whatever its PPL change, which is shown",
    pl.col("peak_kv_bytes_mean").is_not_null(),
    (pl.col("peak_kv_bytes_mean"), PPL_CHANGE),
    False,
    "no peak KV-cache size measured",
)
LONG_TEXT = Rule(
    "long text",
    f"at the longest length, the highest throughput change among configurations whose mean PPL change is "
    f"at most +{SPEED_PPL_MAX_PCT:g}%",
    (PPL_CHANGE <= SPEED_PPL_MAX_PCT) & pl.col("throughput_tok_s_change_pct").is_not_null(),
    (pl.col("throughput_tok_s_change_pct").neg(),),
    True,
    f"no configuration within +{SPEED_PPL_MAX_PCT:g}% PPL",
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
    candidates = evicting.filter((pl.col("seq_len") == seq_len) & rule.keep).sort(rule.order, nulls_last=True)
    if not candidates.is_empty():
        return Recommendation(rule.scenario, seq_len, candidates.row(0, named=True), "")
    reason = "no baseline at this length" if rule.needs_baseline and not has_baseline else rule.none_reason
    return Recommendation(rule.scenario, seq_len, None, reason)


def recommend(summary: pl.DataFrame, baseline_lengths: set[int]) -> list[Recommendation]:
    """Apply the rules to tables.summary(): PER_LENGTH_RULES at every length, LONG_TEXT at the longest."""
    evicting = summary.filter(pl.col("policy") != BASELINE_POLICY)
    lengths = sorted(evicting["seq_len"].drop_nulls().unique().to_list())
    plan = [(rule, seq_len) for seq_len in lengths for rule in PER_LENGTH_RULES]
    plan += [(LONG_TEXT, lengths[-1])] if lengths else []
    return [apply_rule(rule, evicting, seq_len, seq_len in baseline_lengths) for rule, seq_len in plan]
