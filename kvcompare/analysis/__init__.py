"""The numbers of a run, apart from how a report shows them: a results folder read into frames (load), the
figures and changes (metrics), means and paired changes against `full` (pairing), passkey retrieval
(retrieval), the noise floor (noise), names of configurations (names), the compression settings and the figures
against the compression ratio (settings), the recommendation rules (rules), and
the whole analysis of one run (:func:`analyse`). Nothing here formats a table or writes a file."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from kvcompare.analysis.load import (
    IS_PROBE,
    PASSKEY_TASK,
    PPL_TASK,
    ReportError,
    RunData,
    check_run_dir,
    empty_frame,
    load_run,
)
from kvcompare.analysis.metrics import (
    ACCURACY_CHANGE,
    CHANGE_BY_COLUMN,
    CHANGES,
    EVERYTHING,
    METRIC_BY_COLUMN,
    METRICS,
    NOISE_CHANGES,
    PHYSICS_COLUMNS,
    PPL_CHANGE,
    PREFILL_COLUMNS,
    SPEED_CHANGES,
    THROUGHPUT_CHANGE,
    TPOT_CHANGE,
    TTFT_CHANGE,
    TTFT_ONESHOT_CHANGE,
    Bounded,
    Change,
    Measured,
    Metric,
    is_speed,
)
from kvcompare.analysis.names import (
    DEFAULT_COMPRESSION,
    config_name,
    policy_name,
    ratio_words,
    removed_words,
    several_position_modes,
)
from kvcompare.analysis.noise import NoiseFloor, noise_floor
from kvcompare.analysis.pairing import (
    BASELINE_POLICY,
    BASELINE_ROLES,
    CONFIG_KEYS,
    CONFIG_ORDER,
    IS_BASELINE,
    IS_OK,
    PAIR_KEYS,
    ROUND_KEYS,
    TRIAL_KEYS,
    TrialPairs,
    aggregate,
    baseline_lengths,
    change_estimates,
    estimate,
    failed_cells,
    lengths_in,
    ok_cells,
    paired_changes,
    position_perplexity,
    relative_changes,
    sort_configs,
    summary,
    trial_figures,
    trial_pairs,
)
from kvcompare.analysis.retrieval import (
    BUDGET_LIMIT,
    IS_ANSWERED,
    PROBE_KEYS,
    TASK_KEYS,
    retrieval_by_config,
    retrieval_by_probe,
    retrieval_gaps,
    retrieval_measured,
    retrieval_stats,
    task_scores,
    with_task_label,
)
from kvcompare.analysis.retrieval import CONFIG_KEYS as RETRIEVAL_CONFIG_KEYS
from kvcompare.analysis.rules import (
    ALL_RULES,
    LONG_TEXT,
    MEMORY_BOUND,
    PER_LENGTH_RULES,
    PPL_DELTA,
    QUALITY_FIRST,
    QUALITY_FIRST_WITH_RETRIEVAL,
    QUALITY_PPL_MAX_PCT,
    QUALITY_RETRIEVAL_MAX_PTS,
    SPEED_FIRST,
    SPEED_PPL_MAX_PCT,
    SPEED_PPL_OK,
    Recommendation,
    Rule,
    Step,
    apply_rule,
    recommend,
    rules_for,
    significant_gain,
)
from kvcompare.analysis.settings import quality_by_ratio, settings_of

# --- Everything a report says about one run, computed once --------------------------------------------------


@dataclass(frozen=True)
class Analysis:
    """Everything a report shows, computed once from a results folder: the summary, the noise floor, the recommendations
    and the retrieval figures."""

    summary: pl.DataFrame  # summary(): one row per configuration and length
    baseline_lengths: set[int]
    noise: NoiseFloor
    several_modes: bool
    recommendations: list[Recommendation]
    rules: tuple[Rule, ...] = ALL_RULES  # the rules the recommendations followed, as the report states them
    measured: Measured = EVERYTHING  # what the run measured


def probes_measured(probes: pl.DataFrame) -> str:
    """What a run's probes measured, in words: "passkey retrieval", or the probe tasks by name."""
    tasks = sorted(probes["task"].drop_nulls().unique().to_list())
    if tasks == [PASSKEY_TASK]:
        return "passkey retrieval"
    return f"probe tasks ({', '.join(tasks)})"


def what_was_measured(run: RunData) -> Measured:
    """What the run's successful cells measured: speed (latency trials) or not, retrieval (passkey) or not, and why a
    missing one is missing; the compression settings and ratios of its cells and probes."""
    ok = run.cells.filter(pl.col("status") == "ok")
    speed = not ok.filter(pl.col("ttft_s").is_not_null() | pl.col("tpot_s").is_not_null()).is_empty()
    retrieval = retrieval_measured(run.retrieval)
    if speed:
        reason = ""
    elif run.cells.is_empty():
        reason = (
            f"the run measured {probes_measured(run.retrieval)} only"
            if not run.retrieval.is_empty()
            else "the run has no cell"
        )
    elif ok.is_empty():
        reason = f"every one of its {run.cells.height} perplexity and speed cells failed"
    elif (ok["repeats"].fill_null(-1) == 0).all():
        reason = "--repeats 0: a quality-only run, with no latency trial"
    else:
        reason = "its cells recorded no latency trial"
    settings, ratios, query_aware = settings_of(run)
    return Measured(not ok.is_empty(), speed, retrieval, reason, settings, ratios, query_aware)


@dataclass(frozen=True)
class Outcome:
    """How a run's cells ended, passkey probes included."""

    ok: int
    failed: int
    compared_ok: int = 0  # of them, the cells and probes of the compared configurations (all but `full`)
    compared_failed: int = 0

    @property
    def nothing_succeeded(self) -> bool:
        """No cell or probe of the run succeeded (the CLI then exits with status 1)."""
        return self.ok == 0

    @property
    def nothing_compared(self) -> bool:
        """Only the `full` baseline succeeded: every cell and probe of the configurations compared with it failed,
        so the run compared nothing (the CLI then exits with status 1 too)."""
        return self.ok > 0 and self.compared_failed > 0 and self.compared_ok == 0


def outcome(run: RunData) -> Outcome:
    """How many cells and probes of ``run`` succeeded and failed, in all and of the compared configurations."""
    rows = pl.concat([frame.select("status", compared=~IS_BASELINE) for frame in (run.cells, run.retrieval)])
    ok, compared = rows["status"] == "ok", rows["compared"]
    return Outcome(
        int(ok.sum()), int((~ok).sum()), int((ok & compared).sum()), int((~ok & compared).sum())
    )


def analyse(run: RunData) -> Analysis:
    """The analysis of a loaded run (:func:`load_run`): summary, noise floor, relative changes and recommendations."""
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


__all__ = [
    "ACCURACY_CHANGE",
    "ALL_RULES",
    "Analysis",
    "BASELINE_POLICY",
    "BASELINE_ROLES",
    "BUDGET_LIMIT",
    "Bounded",
    "CHANGES",
    "CHANGE_BY_COLUMN",
    "CONFIG_KEYS",
    "Change",
    "DEFAULT_COMPRESSION",
    "EVERYTHING",
    "IS_ANSWERED",
    "IS_BASELINE",
    "IS_OK",
    "IS_PROBE",
    "LONG_TEXT",
    "MEMORY_BOUND",
    "METRICS",
    "METRIC_BY_COLUMN",
    "Measured",
    "Metric",
    "NOISE_CHANGES",
    "NoiseFloor",
    "Outcome",
    "PAIR_KEYS",
    "PASSKEY_TASK",
    "PPL_TASK",
    "PER_LENGTH_RULES",
    "PHYSICS_COLUMNS",
    "PPL_CHANGE",
    "PPL_DELTA",
    "PREFILL_COLUMNS",
    "PROBE_KEYS",
    "QUALITY_FIRST",
    "QUALITY_FIRST_WITH_RETRIEVAL",
    "QUALITY_PPL_MAX_PCT",
    "QUALITY_RETRIEVAL_MAX_PTS",
    "RETRIEVAL_CONFIG_KEYS",
    "TASK_KEYS",
    "ROUND_KEYS",
    "Recommendation",
    "ReportError",
    "Rule",
    "RunData",
    "SPEED_CHANGES",
    "SPEED_FIRST",
    "SPEED_PPL_MAX_PCT",
    "SPEED_PPL_OK",
    "Step",
    "THROUGHPUT_CHANGE",
    "TPOT_CHANGE",
    "TRIAL_KEYS",
    "TTFT_CHANGE",
    "TTFT_ONESHOT_CHANGE",
    "TrialPairs",
    "aggregate",
    "analyse",
    "apply_rule",
    "baseline_lengths",
    "change_estimates",
    "check_run_dir",
    "config_name",
    "empty_frame",
    "estimate",
    "failed_cells",
    "is_speed",
    "lengths_in",
    "load_run",
    "noise_floor",
    "ok_cells",
    "outcome",
    "probes_measured",
    "paired_changes",
    "policy_name",
    "position_perplexity",
    "quality_by_ratio",
    "ratio_words",
    "recommend",
    "relative_changes",
    "removed_words",
    "retrieval_by_config",
    "retrieval_by_probe",
    "retrieval_gaps",
    "task_scores",
    "with_task_label",
    "retrieval_measured",
    "retrieval_stats",
    "rules_for",
    "settings_of",
    "several_position_modes",
    "significant_gain",
    "sort_configs",
    "CONFIG_ORDER",
    "summary",
    "trial_figures",
    "trial_pairs",
    "what_was_measured",
]
