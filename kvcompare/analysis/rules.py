"""Recommendations: fixed, stated rules applied to the numbers, so a reader can check every choice."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import polars as pl

from kvcompare.analysis.metrics import NOISE_CHANGES, PPL_CHANGE, THROUGHPUT_CHANGE, TPOT_CHANGE, Change
from kvcompare.analysis.noise import NoiseFloor
from kvcompare.analysis.pairing import BASELINE_POLICY, lengths_in
from kvcompare.analysis.retrieval import BUDGET_LIMIT, CONFIG_KEYS, retrieval_gaps, retrieval_measured

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
    "(same position mode and task variant, both over the lengths where both were probed, then the mean over the "
    "variants probed, each alike; a configuration without such probes does not qualify), with the policy of lowest "
    "PPL change at that limit",
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
    """The configuration a scenario's rule picks at one length, or why none qualifies."""

    scenario: str
    seq_len: int
    choice: dict[str, Any] | None  # a row of summary(); None when nothing qualifies
    reason: str  # why there is no choice; "" when there is one
    setting: str | None = None  # the compression setting chosen within, in a run with several; else None


def apply_rule(
    rule: Rule, evicting: pl.DataFrame, seq_len: int, has_baseline: bool, setting: str | None = None
) -> Recommendation:
    """The first configuration in rule order that passes every step (among those of compression ``setting``
    when given); else why not, and no choice is made up."""
    if rule.needs_baseline and not has_baseline:
        return Recommendation(rule.scenario, seq_len, None, "no baseline at this length", setting)
    candidates = evicting.filter(pl.col("seq_len") == seq_len)
    if setting is not None:
        candidates = candidates.filter(pl.col("compression") == setting)
    for step in rule.steps:
        candidates = candidates.filter(step.keep)
        if candidates.is_empty():
            return Recommendation(rule.scenario, seq_len, None, step.none_reason, setting)
    best = candidates.sort(rule.order, nulls_last=True).row(0, named=True)
    return Recommendation(rule.scenario, seq_len, best, "", setting)


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
        # probes are keyed by their budget (a ratio alone where it gave the limit: retrieval.by_budget), and so
        # are the configurations they are matched with
        gaps = retrieval_gaps(retrieval).rename({"cache_size": "_budget"})
        keys = ["_budget" if key == "cache_size" else key for key in CONFIG_KEYS]
        evicting = (
            evicting.with_columns(BUDGET_LIMIT.alias("_budget"))
            .join(gaps, on=keys, how="left", nulls_equal=True, maintain_order="left")
            .drop("_budget")
        )
    rules = rules_for(measured, with_speed)
    per_length = [rule for rule in rules if rule is not LONG_TEXT]
    lengths = lengths_in(evicting)
    # A run with both compression settings is judged within each: a prefill budget covers only the context, and
    # its peak KV is the whole context's, so limits and bytes do not compare across settings.
    found = set(evicting["compression"].drop_nulls().to_list()) if "compression" in evicting.columns else set()
    settings: list[str | None] = sorted(found, key=lambda s: s != "continuous") if len(found) > 1 else [None]
    plan = [(rule, seq_len, setting) for seq_len in lengths for setting in settings for rule in per_length]
    if lengths and LONG_TEXT in rules:
        plan += [(LONG_TEXT, lengths[-1], setting) for setting in settings]
    return [
        apply_rule(rule, evicting, seq_len, seq_len in baseline_lengths, setting) for rule, seq_len, setting in plan
    ]
