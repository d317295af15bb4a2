"""What a report says, in order: assemble computes one run's analysis and charts and lays them out as sections,
the headline first (what was compared, the noise floor, the recommendations) and the protocol last."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from kvcompare.analysis import (
    BASELINE_POLICY,
    Measured,
    RunData,
    analyse,
    lengths_in,
    position_perplexity,
    probes_measured,
    quality_by_ratio,
    retrieval_by_probe,
    several_position_modes,
    what_was_measured,
    with_task_label,
)
from kvcompare.protocol import PROTOCOL_MD
from kvcompare.report.charting import ChartSet
from kvcompare.report.charts import build_charts
from kvcompare.report.compression import build_ratio_charts
from kvcompare.report.document import Definitions, Markdown, Remarks, Report, Section
from kvcompare.report.formatting import MISSING, format_bandwidth, join
from kvcompare.report.heatmaps import build_retrieval_charts
from kvcompare.report.notices import (
    beyond_context_notices,
    compile_notices,
    compiled_steps,
    load_notices,
    noise_line,
    timing_notices,
)
from kvcompare.report.tables import (
    absolute_table,
    cell_counts,
    counts_table,
    failed_table,
    metadata_table,
    noise_table,
    physics_table,
    prefill_table,
    recommendation_table,
    relative_table,
)
from kvcompare.report.task_tables import retrieval_tables, task_summary_table, task_table
from kvcompare.report.wording import (
    BASELINE_PER_MODE,
    BASELINE_POSITIONS,
    COMPRESSION_DEFINITIONS,
    COMPRESSION_HEADING,
    COMPRESSION_INTRO,
    COMPRESSION_INTRO_LIMITS,
    COMPRESSION_LEAD,
    NO_PERPLEXITY,
    NO_RESULTS,
    PREFILL_PAIRING,
    QUALITY_METHOD,
    QUERY_AGNOSTIC,
    QUERY_AWARE,
    RELATIVE_METHOD,
    RETRIEVAL_DEFINITIONS,
    RETRIEVAL_HEADING,
    RULES_LEAD,
    RULES_LEAD_QUALITY,
    SETTING_WORDS,
    TASKS_DEFINITIONS,
    TASKS_HEADING,
    TITLE,
)

# --- What was compared, for the reader in a hurry ------------------------------------------------------------


def against_baseline(rows: pl.DataFrame, config: dict[str, Any]) -> str:
    """What the policies in ``rows`` were compared with: `full`, when a `full` row of them succeeded."""
    if not rows.filter((pl.col("policy") == BASELINE_POLICY) & (pl.col("status") == "ok")).is_empty():
        return " against `full`"
    if config.get("baseline") is False:
        return ", with no `full` baseline (--no-baseline)"
    return ", with no successful `full` baseline"


def _distinct(cells: pl.DataFrame, column: str, fallback: Any = None) -> list[str]:
    """The distinct values of a cells column, sorted; else run.json's value (a list or one value)."""
    found = sorted(cells[column].drop_nulls().unique().to_list()) if column in cells.columns else []
    if not found and fallback is not None:
        found = fallback if isinstance(fallback, list) else [fallback]
    return [str(value) for value in found]


def _probed(retrieval: pl.DataFrame, config: dict[str, Any]) -> str:
    """What the passkey probes covered, for the summary: policies, limits, lengths, depths, keys per length and
    depth (the PPL cells' entries above may name others)."""
    evicting = retrieval.filter(pl.col("policy") != BASELINE_POLICY)
    policies = ", ".join(_distinct(evicting, "policy_label")) or "none"
    ratios = sorted(evicting["ratio"].drop_nulls().unique().to_list())
    if ratios:  # each probe's limit comes from its own context: the ratios say what they were
        budgets = "compression ratios " + ", ".join(f"{ratio:g}" for ratio in ratios)
    else:
        budgets = "cache limits " + (", ".join(_distinct(evicting, "cache_size")) or MISSING)
    lengths = ", ".join(str(n) for n in lengths_in(retrieval))
    depths = ", ".join(f"{d:g}" for d in sorted(retrieval["depth"].drop_nulls().unique().to_list()))
    keys = retrieval.group_by(["seq_len", "depth"]).agg(pl.col("sample_id").n_unique())["sample_id"]
    per = MISSING if keys.is_empty() else str(keys.max())
    against = against_baseline(retrieval, config)
    return (
        f"{policies}{against} at {budgets}; lengths {lengths or MISSING} tokens, needle depths "
        f"{depths or MISSING}, {per} keys per length and depth"
    )


def _tasks_probed(probes: pl.DataFrame) -> str:
    """What the other probe tasks covered, for the summary: each task with its parameters, and the lengths."""
    tasks = probes.unique(["task", "task_params"], maintain_order=True).sort("task")
    named = [
        f"{r['task']} {r['task_params']}" if r["task_params"] not in (None, "{}") else r["task"]
        for r in tasks.iter_rows(named=True)
    ]
    per = probes.group_by(["task", "task_params", "seq_len"]).agg(pl.col("source").n_unique())["source"]
    most = MISSING if per.is_empty() else str(per.max())
    lengths = ", ".join(str(n) for n in lengths_in(probes)) or MISSING
    return f"{'; '.join(named)}; lengths {lengths} tokens, {most} probes per task and length"


def settings_compared(measured: Measured) -> str:
    """The compression settings of the run, in words: how and when each one evicted."""
    worded = []
    for setting in measured.settings:
        words = SETTING_WORDS.get(setting, setting)
        if setting == "prefill" and measured.query_aware is not None:
            words += f"; {QUERY_AWARE if measured.query_aware else QUERY_AGNOSTIC}"
        worded.append(f"`{setting}`: {words}")
    return ". ".join(worded)


def budgets_compared(run: RunData, measured: Measured, limits: str) -> dict[str, str]:
    """The budgets, as the run gave them: compression ratios (with the limits they came to), else cache limits."""
    if not measured.ratios:
        return {"cache limits (tokens)": limits}
    ratios = join([f"{ratio:g}" for ratio in measured.ratios])
    every = pl.concat([run.cells.select("cache_size"), run.retrieval.select("cache_size")])["cache_size"]
    low, high = every.min(), every.max()
    came_to = "" if low is None else f"; cache limits of {low!s}" + ("" if low == high else f" to {high!s}") + " tokens"
    return {"compression ratios": f"{ratios} (the share of each context removed{came_to})"}


def compared(run: RunData, measured: Measured | None = None) -> dict[str, str]:
    """What the run compared, for the reader in a hurry: from the cells where they say it, else run.json."""
    measured = measured or what_was_measured(run)
    cells, config = run.cells, run.meta.get("config") or {}
    passkey, others = run.passkey, run.other_probes
    speed, environment = run.meta.get("speed") or {}, run.meta.get("environment") or {}
    unknown = "not recorded"

    def listed(column: str, key: str) -> str:
        return ", ".join(_distinct(cells, column, config.get(key))) or unknown

    every_row = pl.concat([cells, run.retrieval], how="diagonal_relaxed")
    evicting = every_row.filter(pl.col("policy") != BASELINE_POLICY)
    policies = _distinct(evicting, "policy_label") or [p for p in config.get("policies", []) if p != BASELINE_POLICY]
    lengths = []
    for seq_len in lengths_in(cells):
        samples = cells.filter(pl.col("seq_len") == seq_len)["sample_id"].n_unique()
        lengths.append(f"{seq_len} ({samples} sample{'s' if samples != 1 else ''})")
    repeats = _distinct(cells, "repeats", config.get("repeats"))
    trials = f"{', '.join(repeats)} per cell, in interleaved rounds" if repeats else "repeats not recorded"
    chunk, gen, warmup = (
        listed(*keys) for keys in (("prefill_chunk", "prefill_chunk"), ("gen_tokens", "gen"), ("warmup", "warmup"))
    )
    device = environment.get("device_name") or listed("device", "device")
    if speed.get("threads"):  # what the run set; a CPU's name says the threads torch had before
        device += f"; timed with {speed['threads']} threads"
    if speed.get("memory_bandwidth_bytes_s"):
        device += f", memory bandwidth {format_bandwidth(run.meta)} (measured at the start of the run)"
    return {
        "model": listed("model", "model"),
        "dataset": listed("dataset", "dataset"),
        "policies": (", ".join(policies) or "none") + against_baseline(every_row, config),
        "compression setting": settings_compared(measured),
        **budgets_compared(run, measured, listed("cache_size", "cache_sizes")),
        "position modes": listed("positions", "positions"),
        "lengths (tokens)": ", ".join(lengths) or listed("seq_len", "lengths"),
        "latency trials": f"{trials}; the prompt prefilled in chunks of {chunk} tokens, then {gen} tokens timed "
        f"after {warmup} warm-up steps{compiled_steps(cells, run.meta)}"
        if measured.speed
        else f"none ({measured.no_speed})",
        "device": device,
        **({"passkey retrieval": _probed(passkey, config)} if not passkey.is_empty() else {}),
        **({"tasks": _tasks_probed(others)} if not others.is_empty() else {}),
    }


# --- The report, section by section --------------------------------------------------------------------------


def report_title(run_dir: Path, meta: dict[str, Any]) -> str:
    """The results folder's name, which a reader can find; run.json's run id only when it differs."""
    folder = run_dir.name or run_dir.resolve().name
    run_id = meta.get("run_id")
    if run_id is None or str(run_id) == folder:
        return f"{TITLE}: {folder}"
    return f"{TITLE}: {folder} (run id {run_id})"


def not_drawn(charts: ChartSet) -> Remarks:
    """The charts of a set that could not be drawn, each with its reason."""
    return Remarks([f"{s.title} (`{s.name}`) not drawn: {s.reason}" for s in charts.skipped])


def retrieval_section(retrieval: pl.DataFrame, charts: ChartSet, several_modes: bool) -> Section:
    """The passkey probes: the table and a heat map per policy (of each variant of passkey apart: retrieval_tables(),
    build_retrieval_charts()), and the charts that could not be drawn."""
    return Section(
        RETRIEVAL_HEADING,
        [
            *retrieval_tables(retrieval, several_modes),
            *charts.charts,
            not_drawn(charts),
        ],
        intro=RETRIEVAL_DEFINITIONS,
    )


def task_metrics() -> dict[str, str]:
    """What each installed task's score means, as its plugin declares it (a task not installed here has none)."""
    from kvcompare.plugins import get_tasks

    registry = get_tasks()
    return {name: str(registry.entry(name).cls.metric) for name in registry.names()}


def tasks_section(probes: pl.DataFrame, several_modes: bool) -> Section:
    """The probe tasks other than passkey: the score across tasks, then a table per task (per variant of a task:
    with_task_label())."""
    probes, metrics = with_task_label(probes), task_metrics()
    tasks = dict(sorted(probes.select("task_label", "task").unique().iter_rows()))  # label: the task's name
    tables = [task_table(probes, label, several_modes, metrics.get(task, "")) for label, task in tasks.items()]
    return Section(TASKS_HEADING, [task_summary_table(probes, several_modes), *tables], intro=TASKS_DEFINITIONS)


def compression_section(summary: pl.DataFrame, charts: ChartSet, measured: Measured, several_modes: bool) -> Section:
    """How much each policy keeps as more is removed (the accuracy-against-ratio chart, where the run gave ratios),
    the prefill setting's speed and memory, and what the compression columns mean."""
    prefill = [prefill_table(summary, measured, several_modes)] if measured.prefill and measured.perplexity else []
    return Section(
        COMPRESSION_HEADING,
        [
            *charts.charts,
            not_drawn(charts),
            *prefill,
            Definitions(
                COMPRESSION_LEAD,
                COMPRESSION_DEFINITIONS if measured.prefill else {"ratio": COMPRESSION_DEFINITIONS["ratio"]},
            ),
        ],
        intro=COMPRESSION_INTRO if measured.ratios else COMPRESSION_INTRO_LIMITS,
    )


def assemble(run: RunData, charts_dir: Path) -> Report:
    """Compute tables, recommendations and charts (written to charts_dir) for one run, in reading order:
    the headline first (what was compared, the noise floor, the recommendations), the protocol last."""
    analysis = analyse(run)
    stats, several_modes = analysis.summary, analysis.several_modes
    ppl_charts = build_charts(stats, position_perplexity(run.curves, run.cells), charts_dir, several_modes)
    charts, every_row, retrieval = ppl_charts, run.cells, []
    passkey, others = run.passkey, run.other_probes
    if not run.retrieval.is_empty():  # a run with probes: their failures and counts
        every_row = pl.concat([run.cells, run.retrieval], how="diagonal_relaxed")
    probe_modes = several_position_modes(every_row)
    if not passkey.is_empty():  # passkey probes: their section and heat maps
        heat_maps = build_retrieval_charts(retrieval_by_probe(passkey), charts_dir, probe_modes)
        retrieval = [retrieval_section(passkey, heat_maps, probe_modes)]
        charts = ChartSet([*ppl_charts.charts, *heat_maps.charts], [*ppl_charts.skipped, *heat_maps.skipped])
    if not others.is_empty():  # other probe tasks: a table each and the score across them
        retrieval.append(tasks_section(others, probe_modes))
    measured = analysis.measured
    compression = []
    if measured.ratios or measured.prefill:  # budgets as ratios, or the prefill setting: its own section
        quality = quality_by_ratio(run.cells, run.retrieval)
        ratio_charts = (
            build_ratio_charts(quality, charts_dir, probe_modes, measured.query_aware)
            if measured.ratios
            else ChartSet([], [])
        )
        charts = ChartSet([*ratio_charts.charts, *charts.charts], [*ratio_charts.skipped, *charts.skipped])
        compression = [compression_section(stats, ratio_charts, measured, several_modes)]
    results = [
        table
        for n in lengths_in(stats)
        for table in (
            relative_table(stats, n, n in analysis.baseline_lengths, measured),
            absolute_table(stats, n, several_modes, measured),
            *([physics_table(stats, n, run.meta, several_modes)] if measured.speed else []),
        )
    ]
    baseline_note = f"{BASELINE_POSITIONS} {BASELINE_PER_MODE}" if several_modes else BASELINE_POSITIONS
    baseline_note += f" {PREFILL_PAIRING}" if measured.prefill else ""
    perplexity_measured = not run.cells.is_empty() or run.retrieval.is_empty()  # a passkey-only run has none
    method = RELATIVE_METHOD if measured.speed else QUALITY_METHOD
    sections = [
        Section(
            "Summary",
            [
                Definitions("What was compared:", compared(run, measured)),
                Markdown(noise_line(analysis.noise, measured)),
                *(
                    [
                        recommendation_table(analysis.recommendations),
                        Definitions(
                            RULES_LEAD if measured.speed else RULES_LEAD_QUALITY,
                            {rule.scenario: rule.text for rule in analysis.rules},
                        ),
                    ]
                    if perplexity_measured
                    else [
                        Markdown(
                            NO_PERPLEXITY.format(
                                what=probes_measured(run.retrieval),
                                where="retrieval" if not passkey.is_empty() else "tasks",
                            )
                        )
                    ]
                ),
                *([noise_table(analysis.noise)] if measured.speed else []),
            ],
        ),
        *compression,
        *(
            [Section("Results by length", results, intro=f"{method} {baseline_note}", empty=NO_RESULTS)]
            if perplexity_measured
            else []
        ),
        *retrieval,
        *([Section("Charts", [*ppl_charts.charts, not_drawn(ppl_charts)])] if perplexity_measured else []),
        Section(
            "Missing / failed cells",
            [
                counts_table(cell_counts(every_row, run.meta)),
                failed_table(every_row, several_modes),
                Remarks([f"unreadable: {problem}" for problem in run.problems]),
            ],
        ),
        Section("Run", [metadata_table(run.meta)]),
        Section("Protocol", [Markdown(PROTOCOL_MD)], collapsed=True),
    ]
    notices = [*beyond_context_notices(run.cells), *load_notices(run.meta), *compile_notices(run.cells)]
    notices += timing_notices(stats) if measured.speed else []
    return Report(report_title(run.run_dir, run.meta), sections, charts, notices)
