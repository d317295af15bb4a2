"""The probe tasks' tables: passkey accuracy by policy, budget and depth, each task's scores by length, and the
mean score across tasks (analysis.retrieval computes them; kvcompare.report.tables holds the perplexity and speed
tables and the budget columns both share)."""

from __future__ import annotations

import polars as pl

from kvcompare.analysis import (
    CONFIG_ORDER,
    RETRIEVAL_CONFIG_KEYS,
    policy_name,
    retrieval_by_config,
    retrieval_stats,
    task_scores,
    with_task_label,
)
from kvcompare.report.document import Table
from kvcompare.report.formatting import MISSING, format_pct
from kvcompare.report.tables import budget_cells, budget_headers, config_key, with_ratios
from kvcompare.report.wording import RETRIEVAL_NOTE, TASKS_SUMMARY_NOTE


def retrieval_tables(retrieval: pl.DataFrame, several_modes: bool = False) -> list[Table]:
    """retrieval_table() of each variant of passkey (with_task_label(): ``--task passkey,passkey:haystack=text``
    gives two), in the order of their labels, each headed by its label; one table, as retrieval_table(), for a
    run of one variant."""
    labels = sorted(with_task_label(retrieval)["task_label"].unique().to_list())
    if len(labels) <= 1:
        return [retrieval_table(retrieval, several_modes)]
    return [retrieval_table(retrieval, several_modes, label) for label in labels]


def retrieval_table(retrieval: pl.DataFrame, several_modes: bool = False, variant: str | None = None) -> Table:
    """Passkey accuracy per policy and cache limit (`full` first): over all probes, then per depth. ``variant``:
    the label of the variant of passkey to tabulate (with_task_label()), named in the title; None for probes of
    one variant (retrieval_tables() gives a table per variant)."""
    if variant is not None:
        retrieval = with_task_label(retrieval).filter(pl.col("task_label") == variant)
    by_depth = retrieval_stats(retrieval, ["depth"])
    depths = sorted(by_depth["depth"].drop_nulls().unique().to_list())
    at_depth = {(*config_key(r), r["depth"]): r["accuracy_pct"] for r in by_depth.iter_rows(named=True)}
    ratios = with_ratios(retrieval)
    rows = []
    for r in retrieval_by_config(retrieval).iter_rows(named=True):
        key = config_key(r)
        logprob = MISSING if r["logprob_mean"] is None else f"{r['logprob_mean']:.2f}"
        n = str(r["n"]) + (f" (+{r['failed']} failed)" if r["failed"] else "")
        rows.append(
            [
                policy_name(r, several_modes),
                *budget_cells(r, ratios),
                format_pct(r["accuracy_pct"]),
                n,
                logprob,
                *(format_pct(at_depth.get((*key, depth))) for depth in depths),
            ]
        )
    return Table(
        "Passkey retrieval by configuration" + (f" ({variant})" if variant is not None else ""),
        [
            "Policy",
            *budget_headers(ratios),
            "Accuracy (%)",
            "n",
            "Mean log-prob of the key",
            *(f"depth {depth:g}" for depth in depths),
        ],
        rows,
        RETRIEVAL_NOTE,
        empty="no passkey probe",
    )


# --- Probe tasks (RULER's and third-party ones) --------------------------------------------------------------


def task_table(probes: pl.DataFrame, task: str, several_modes: bool = False, metric: str = "") -> Table:
    """One task's score and accuracy per policy and cache limit (`full` first), over all its probes, then per
    length; ``task`` is the task's label (with_task_label(): a variant of a task has a table of its own);
    ``metric`` (what the task's score is) goes in the note."""
    mine = with_task_label(probes).filter(pl.col("task_label") == task)
    by_length = task_scores(mine, ["seq_len"])
    lengths = sorted(by_length["seq_len"].drop_nulls().unique().to_list())
    at_length = {(*config_key(r), r["seq_len"]): r["score_pct"] for r in by_length.iter_rows(named=True)}
    ratios = with_ratios(mine)
    rows = []
    for r in task_scores(mine).iter_rows(named=True):
        key = config_key(r)
        n = str(r["n"]) + (f" (+{r['failed']} failed)" if r["failed"] else "")
        rows.append(
            [
                policy_name(r, several_modes),
                *budget_cells(r, ratios),
                format_pct(r["score_pct"]),
                format_pct(r["accuracy_pct"]),
                n,
                *(format_pct(at_length.get((*key, length))) for length in lengths),
            ]
        )
    return Table(
        f"Task {task}",
        ["Policy", *budget_headers(ratios), "Score (%)", "Accuracy (%)", "n", *(f"score at {n}" for n in lengths)],
        rows,
        empty=f"no answered {task} probe",
        note=f"Score: {metric}." if metric else "",
    )


def task_summary_table(probes: pl.DataFrame, several_modes: bool = False) -> Table:
    """Mean score over tasks per policy and cache limit, with each task's score beside it (each variant of a task
    as a task of its own, headed by its label: with_task_label())."""
    scores = task_scores(probes)
    tasks = sorted(scores["task_label"].unique().to_list())
    per_task = {(*config_key(r), r["task_label"]): r["score_pct"] for r in scores.iter_rows(named=True)}
    limits = scores.group_by(RETRIEVAL_CONFIG_KEYS).agg(pl.col("cache_size_min").min(), pl.col("cache_size_max").max())
    configs = limits.sort(CONFIG_ORDER, nulls_last=False)
    ratios = with_ratios(scores)
    rows = []
    for r in configs.iter_rows(named=True):
        found = [per_task.get((*config_key(r), task)) for task in tasks]
        known = [value for value in found if value is not None]
        mean = sum(known) / len(known) if len(known) == len(tasks) else None
        rows.append(
            [policy_name(r, several_modes), *budget_cells(r, ratios), format_pct(mean), *map(format_pct, found)]
        )
    return Table(
        "Score across tasks",
        ["Policy", *budget_headers(ratios), "Mean score (%)", *tasks],
        rows,
        empty="no answered probe",
        note=TASKS_SUMMARY_NOTE,
    )
