"""What a report says, in order: its sections with their headings, notes, empty-state text and formatted tables.

A report is a list of Section objects; the HTML page and the Markdown file (render.py) walk that one list, so
neither can add, drop, reorder or reword a section. Text is inline Markdown (`code`, **bold**) throughout.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import polars as pl

from kvcompare.analysis import (
    BASELINE_POLICY,
    CHANGES,
    EVERYTHING,
    METRIC_BY_COLUMN,
    METRICS,
    NOISE_CHANGES,
    PASSKEY_TASK,
    PPL_CHANGE,
    Analysis,
    Change,
    Measured,
    Metric,
    NoiseFloor,
    Recommendation,
    RunData,
    analyse,
    config_name,
    estimate,
    failed_cells,
    lengths_in,
    ok_cells,
    policy_name,
    position_perplexity,
    retrieval_by_config,
    retrieval_by_probe,
    retrieval_stats,
    several_position_modes,
    what_was_measured,
)
from kvcompare.config import oversubscription
from kvcompare.protocol import PROTOCOL_MD
from kvcompare.report.charts import ChartFile, ChartSet, build_charts, build_retrieval_charts
from kvcompare.stats import Estimate

TITLE = "KV-cache eviction report"
MISSING = "–"
#: Marks a speed change whose 95% interval includes 0: not distinguishable from no change.
NOT_SIGNIFICANT = "≈"

QUALITY_METHOD = (
    "Quality changes (PPL, accuracy) are paired per sample: each cell is compared with the same sample's `full` "
    "cell, then the per-sample changes are averaged over samples."
)
RELATIVE_METHOD = (
    f"{QUALITY_METHOD} Speed changes (TTFT, TPOT, throughput) are "
    "paired per trial: each latency trial is compared with the `full` trial of the same passage, position mode, "
    "session and round, then averaged over those pairs (samples × rounds), with a 95% bootstrap interval."
)
#: Said once, in the results section: why the baseline's rows carry no position mode.
BASELINE_POSITIONS = (
    "The `full` baseline evicts nothing, so the position mode does not apply to it: it is labelled `full`."
)
#: Added where a run has several position modes, and so one baseline per mode.
BASELINE_PER_MODE = (
    "This run has several position modes; `full` is measured once per mode, as the baseline that mode's "
    "policies are paired with, and named after it: `full (for positions=…)`."
)
RELATIVE_DEFINITION = "Relative change = 100 × (policy − full) / full."
QUALITY_PAIRING = (
    "Quality (PPL, accuracy): the mean over samples of the per-sample change against the same sample's `full` "
    "cell, deterministic, so no interval (paired samples: samples with a `full` cell)."
)
QUALITY_SIGNS = "positive PPL = worse; accuracy is in % of the baseline accuracy (−2.8% = 2.8% lower, relative)."
RELATIVE_NOTE = (
    f"{RELATIVE_DEFINITION} Speed (TTFT, TPOT, throughput): the mean over trial pairs "
    "(speed pairs: samples × rounds) with its seeded bootstrap 95% interval over the pairs in brackets; "
    f"`{NOT_SIGNIFICANT}` marks a change whose interval includes 0 (not significant), and a change without an "
    "interval (one pair, or a run without raw timings) says so and is never significant. With few pairs the "
    "percentile bootstrap interval is close to the range of the pairs and covers less than 95%: with fewer than "
    "6 pairs, read significant as every pair agreed in sign, which chance alone gives 2 in 2^n (25% for 3 "
    "pairs); more --samples or --repeats make it a real 95% statement. TTFT is compared like "
    "for like, with `full` prefilled in the same chunks; TTFT vs one-pass full compares it with `full` prefilling "
    "the prompt in one pass, what a user of full attention waits for. "
    + QUALITY_PAIRING
    + " Signs: negative TTFT/TPOT = faster; positive throughput = faster; "
    + QUALITY_SIGNS
)
#: The relative-change note of a run that measured no speed.
RELATIVE_NOTE_QUALITY = f"{RELATIVE_DEFINITION} {QUALITY_PAIRING} Signs: {QUALITY_SIGNS}"
SAMPLE_COLUMNS = "mean ± standard deviation over samples. n = samples (successful cells only)."
ABSOLUTE_NOTE = (
    "Speed (TTFT, TTFT one pass, TPOT, throughput): a cell's figure is the median over its latency trials. With "
    "one sample: that median and, in brackets, its 95% bootstrap interval over trials. With several samples: the "
    "mean of the samples' medians and, in brackets, the range the samples' intervals cover (lowest low to "
    "highest high), which also spans passage-to-passage differences. TTFT: the prompt prefilled in chunks of "
    "`prefill_chunk` tokens, as every policy prefills it; TTFT one pass (`full` only): the prompt prefilled in "
    "one pass (chunks of at most 8192 tokens). Other columns: " + SAMPLE_COLUMNS
)
#: The absolute-values note of a run that measured no speed.
ABSOLUTE_NOTE_QUALITY = "Columns: " + SAMPLE_COLUMNS
PHYSICS_NOTE = (
    "What one decode step at the end of the prompt must read: the model's weights and the keys and values it "
    "attends, summed over layers (skip layers keep every token). TPOT floor = (weights + KV read) / the memory "
    "bandwidth measured at the start of the run ({bandwidth}): no decode step can be faster. Measured TPOT as in "
    "the absolute table. Where the weights dominate the bytes, evicting tokens cannot save much; where the keys "
    "and values dominate, it can."
)
NOISE_NOTE = (
    "The A/A control: `full` timed a second time in each round, paired with that round's `full` trial exactly "
    "as a policy's trial is. Its true change is 0; its interval shows how far two identical configurations "
    "drift apart on this machine. Noise floor of a metric = the larger of |low| and |high| of its interval over "
    "all lengths."
)
RULES_LEAD_QUALITY = "Rules (quality: mean change over samples):"
RULES_LEAD = (
    f"{RULES_LEAD_QUALITY[:-2]}; speed: mean change over paired trials, with its 95% interval "
    "and the run's noise floor):"
)
NO_RESULTS = "No successful cell: nothing to tabulate."
NO_PERPLEXITY = (
    "This run measured passkey retrieval only (no perplexity cell), so the recommendations, which rest on "
    "perplexity, are not made: see the retrieval section."
)
RETRIEVAL_HEADING = "Retrieval (passkey)"
RETRIEVAL_DEFINITIONS = (
    "A probe is one prompt of exactly the given length with a random 5-digit pass key hidden at a depth (0: "
    "right after the instruction, 1: just before the question), prefilled under the policy and cache limit; "
    "accuracy = the share of probes whose greedy decoding gives the key exactly (exact match), and log-prob = "
    "the teacher-forced log-probability of the key's tokens, summed (0 = certain, more negative = less likely)."
)
RETRIEVAL_NOTE = (
    "Accuracy (%): over every answered probe of the configuration, all lengths and depths; depth columns: over "
    "the probes at that depth, all lengths. n = answered probes; failed probes are counted beside it and left "
    "out of accuracy and log-prob."
)


# --- What a section can hold --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Table:
    """A titled grid of already formatted cells; `empty` is shown instead when there are no rows."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""
    empty: str = "none"


@dataclass(frozen=True)
class Markdown:
    """Headings, bullet lists and paragraphs of Markdown, shown as written (the protocol)."""

    text: str


@dataclass(frozen=True)
class Definitions:
    """A lead sentence and a list of terms, each with what it means (the recommendation rules)."""

    lead: str
    items: dict[str, str]


@dataclass(frozen=True)
class Remarks:
    """A list of short remarks (charts not drawn, files not read); nothing at all when empty."""

    items: list[str]


Block: TypeAlias = Table | Markdown | Definitions | Remarks | ChartFile


@dataclass(frozen=True)
class Section:
    heading: str
    blocks: Sequence[Block]
    intro: str = ""  # a paragraph under the heading
    empty: str = ""  # shown instead of the blocks when there are none
    collapsed: bool = False  # HTML: folded under its heading until opened (the protocol)


@dataclass(frozen=True)
class Report:
    title: str
    sections: list[Section]
    charts: ChartSet  # the files written, also held by the Charts section
    notices: list[str] = field(default_factory=list)  # shown at the top, before any section


# --- Numbers formatted into tables ---------------------------------------------------------------------------


def format_value(value: float | None, metric: Metric) -> str:
    return MISSING if value is None else f"{value * metric.scale:.{metric.decimals}f}"


def format_change(value: float | None) -> str:
    return MISSING if value is None else f"{value:+.1f}%"


def format_pct(value: float | None) -> str:
    """An accuracy in %, already scaled: `83.3`."""
    return MISSING if value is None else f"{value:.1f}"


def format_estimate(found: Estimate) -> str:
    """A speed change: `-12.3% [-15.1, -9.0]`; `≈ +2.1% [-3.0, +7.4]` when its interval includes 0;
    `+2.1% (n=1, no interval)` when it has none, which is never significant."""
    if found.value is None:
        return MISSING
    text = format_change(found.value)
    if found.low is None or found.high is None:
        return f"{text} (n={found.n}, no interval)"
    interval = f"[{found.low:+.1f}, {found.high:+.1f}]"
    return f"{text} {interval}" if found.significant else f"{NOT_SIGNIFICANT} {text} {interval}"


def format_row_change(row: dict[str, Any], change: Change) -> str:
    """A change of a summary() row: speed with its interval, quality as a plain paired mean."""
    return format_estimate(estimate(row, change)) if change.speed else format_change(row[change.column])


def _mean_std(row: dict[str, Any], metric: Metric) -> str:
    mean, std = row[f"{metric.column}_mean"], row[f"{metric.column}_std"]
    return format_value(mean, metric) if std is None else f"{format_value(mean, metric)} ± {format_value(std, metric)}"


def _median_interval(row: dict[str, Any], metric: Metric) -> str:
    """A speed figure of an aggregate() row: the (mean of the samples') median over trials, [low, high]."""
    value, low, high = row[f"{metric.column}_mean"], row[metric.low], row[metric.high]
    if value is None:
        return MISSING
    if low is None or high is None:
        return f"{format_value(value, metric)} (no interval)"
    return f"{format_value(value, metric)} [{format_value(low, metric)}, {format_value(high, metric)}]"


def _absolute(row: dict[str, Any], metric: Metric) -> str:
    return _median_interval(row, metric) if metric.speed else _mean_std(row, metric)


def _at(summary: pl.DataFrame, seq_len: int, evicting_only: bool = False) -> list[dict[str, Any]]:
    rows = summary.filter(pl.col("seq_len") == seq_len)
    return list((rows.filter(pl.col("policy") != BASELINE_POLICY) if evicting_only else rows).iter_rows(named=True))


def _limit(row: dict[str, Any]) -> str:
    return MISSING if row["cache_size"] is None else str(row["cache_size"])


def absolute_table(
    summary: pl.DataFrame, seq_len: int, several_modes: bool = False, measured: Measured = EVERYTHING
) -> Table:
    """Each configuration's figures; speed columns only where the run measured speed."""
    metrics = [m for m in METRICS if measured.speaks_of(m)]
    return Table(
        title=f"Absolute values, length {seq_len} tokens",
        headers=["Policy", "Cache limit (tokens)", "n", *(m.label for m in metrics)],
        rows=[
            [policy_name(r, several_modes), _limit(r), str(r["n"]), *(_absolute(r, m) for m in metrics)]
            for r in _at(summary, seq_len)
        ],
        note=ABSOLUTE_NOTE if measured.speed else ABSOLUTE_NOTE_QUALITY,
    )


def relative_table(summary: pl.DataFrame, seq_len: int, has_baseline: bool, measured: Measured = EVERYTHING) -> Table:
    """Changes vs `full`; a configuration whose samples never met a baseline says so in its row. Speed changes
    only where the run measured speed."""
    title = f"Relative change vs full, length {seq_len} tokens"
    changes = [c for c in CHANGES if measured.speaks_of(c)]
    headers = [
        "Policy",
        "Cache limit (tokens)",
        "paired samples",
        *(["speed pairs"] if measured.speed else []),
        *(f"Δ {c.title} (%)" for c in changes),
    ]
    note = RELATIVE_NOTE if measured.speed else RELATIVE_NOTE_QUALITY
    if not has_baseline:
        return Table(
            title,
            headers,
            [],
            note,
            empty=f"no baseline: no successful `full` cell at length {seq_len}, so no relative change",
        )
    rows = []
    for r in _at(summary, seq_len, evicting_only=True):
        paired = r["n_paired"] is not None
        shown = [format_row_change(r, c) if paired else "no baseline" for c in changes]
        pairs = str(r[NOISE_CHANGES[0].n] or 0) if paired and r["speed_from_trials"] else MISSING
        rows.append(
            [
                policy_name(r),
                str(r["cache_size"]),
                str(r["n_paired"] or 0),
                *([pairs] if measured.speed else []),
                *shown,
            ]
        )
    return Table(title, headers, rows, note, empty="no evicting configuration at this length")


#: The measured TPOT beside its floor, in the floor's unit.
TPOT_MS = dataclasses.replace(METRIC_BY_COLUMN["tpot_s"], unit="ms", decimals=2, scale=1000.0)
MIB = METRIC_BY_COLUMN["peak_kv_bytes"]


def _bandwidth(meta: dict[str, Any]) -> str:
    bandwidth = (meta.get("speed") or {}).get("memory_bandwidth_bytes_s")
    return f"{bandwidth / 1e9:.1f} GB/s" if isinstance(bandwidth, int | float) and bandwidth > 0 else "not recorded"


def physics_table(summary: pl.DataFrame, seq_len: int, meta: dict[str, Any], several_modes: bool = False) -> Table:
    """Bytes per decode step, the TPOT they allow at the measured bandwidth, and the TPOT measured."""
    rows = []
    for r in _at(summary, seq_len):
        kv, weights, floor = r["kv_read_bytes_mean"], r["weight_bytes_mean"], r["tpot_floor_s_mean"]
        if kv is None and weights is None and floor is None:
            continue
        measured = r["tpot_s_mean"]
        ratio = f"×{measured / floor:.1f}" if measured is not None and floor else MISSING
        floor_ms = MISSING if floor is None else f"{floor * 1000:.2f}"
        rows.append(
            [
                config_name(r, several_modes),
                format_value(kv, MIB),
                format_value(weights, MIB),
                floor_ms,
                _median_interval(r, TPOT_MS),
                ratio,
            ]
        )
    return Table(
        f"Physics of a decode step, length {seq_len} tokens",
        [
            "Configuration",
            "KV read per step (MiB)",
            "Weights (MiB)",
            "TPOT floor (ms)",
            "Measured TPOT (ms)",
            "Measured / floor",
        ],
        rows,
        PHYSICS_NOTE.format(bandwidth=_bandwidth(meta)),
        empty="no physics recorded (bytes per step and TPOT floor): a run older than these columns",
    )


def relative_tables(analysis: Analysis) -> list[Table]:
    """The relative-change table of every length, as `kvcompare run` prints them."""
    stats = analysis.summary
    return [relative_table(stats, n, n in analysis.baseline_lengths, analysis.measured) for n in lengths_in(stats)]


def noise_line(noise: NoiseFloor, measured: Measured = EVERYTHING) -> str:
    """The noise floor in one sentence, or that speed was not measured: said at the top of every report and of
    the terminal summary."""
    if not measured.speed:
        return f"**Speed:** not measured in this run ({measured.no_speed}); no speed figure is reported."
    if not noise.measured:
        return (
            f"**Noise floor:** could not be measured in this run, because {noise.reason}; speed changes are judged "
            "by their own intervals only."
        )
    floors = [f"±{floor:.1f}% ({c.title})" for c in NOISE_CHANGES if (floor := noise.floor(c)) is not None]
    return (
        f"**Noise floor:** speed differences smaller than {_join(floors)} are not distinguishable on this machine "
        "in this run (per metric: the larger of |low| and |high| of the 95% interval of the A/A control's change, "
        f"`full` timed twice in the same round, over {noise.pairs} pairs)."
    )


def noise_table(noise: NoiseFloor) -> Table:
    """The A/A control's change per length and over all lengths, and the floor taken from the latter."""
    rows = [
        [str(r["seq_len"]), str(r[NOISE_CHANGES[0].n]), *(format_estimate(estimate(r, c)) for c in NOISE_CHANGES)]
        for r in noise.by_length.sort("seq_len").iter_rows(named=True)
    ]
    if noise.changes:
        all_lengths = [noise.changes.get(c.column, Estimate(None, None, None, 0)) for c in NOISE_CHANGES]
        rows.append(["all lengths", str(noise.pairs), *(format_estimate(e) for e in all_lengths)])
        floors = [noise.floor(c) for c in NOISE_CHANGES]
        rows.append(["noise floor", "", *(MISSING if f is None else f"±{f:.1f}%" for f in floors)])
    return Table(
        "A/A control (noise floor)",
        ["Length (tokens)", "A/A pairs", *(f"Δ {c.title} (%)" for c in NOISE_CHANGES)],
        rows,
        NOISE_NOTE,
        empty=f"no A/A pair: {noise.reason}",
    )


def _evidence(row: dict[str, Any]) -> str:
    parts = [
        f"PPL {format_change(row[PPL_CHANGE.column])}"
        if row[PPL_CHANGE.column] is not None
        else "PPL change: no baseline"
    ]
    if row.get("retrieval_pct") is not None:
        parts.append(f"Retrieval {format_pct(row['retrieval_pct'])}% (full {format_pct(row['retrieval_full_pct'])}%)")
    parts += [
        f"{c.title} {format_row_change(row, c)}"
        for c in CHANGES
        if c.like_for_like and c is not PPL_CHANGE and row[c.column] is not None
    ]
    kv = METRIC_BY_COLUMN["peak_kv_bytes"]
    parts.append(f"{kv.title} {format_value(row['peak_kv_bytes_mean'], kv)} {kv.unit}")
    return ", ".join(parts)


def recommendation_table(recommendations: list[Recommendation]) -> Table:
    rows = [
        [
            r.scenario,
            str(r.seq_len),
            config_name(r.choice) if r.choice else r.reason,
            _evidence(r.choice) if r.choice else MISSING,
        ]
        for r in recommendations
    ]
    return Table(
        "Recommended configurations",
        ["Scenario", "Length (tokens)", "Choice", "Evidence (changes vs full; speed with its 95% interval)"],
        rows,
        empty="no configuration to recommend: no successful evicting cells",
    )


@dataclass(frozen=True)
class CellCounts:
    planned: int | None
    ok: int
    failed: int

    @property
    def missing(self) -> int | None:
        return None if self.planned is None else max(self.planned - self.ok - self.failed, 0)


def cell_counts(cells: pl.DataFrame, meta: dict[str, Any]) -> CellCounts:
    planned = meta.get("cells_planned")
    return CellCounts(
        planned=planned if isinstance(planned, int) else None,
        ok=ok_cells(cells).height,
        failed=failed_cells(cells).height,
    )


def counts_table(counts: CellCounts) -> Table:
    def show(value: int | None) -> str:
        return "unknown (no run.json)" if value is None else str(value)

    return Table(
        "Cells",
        ["planned", "ok", "failed", "missing (planned − ok − failed)"],
        [[show(counts.planned), str(counts.ok), str(counts.failed), show(counts.missing)]],
    )


def _one_line(text: str | None, limit: int = 500) -> str:
    """Tracebacks collapsed to one line that fits a table cell; the full text stays in the Parquet file."""
    if not text:
        return MISSING
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _probe_name(row: dict[str, Any], several_modes: bool = False) -> str:
    """config_name, and for a passkey probe what it probed: 'l2 @ 64, passkey at depth 0.5'."""
    name = config_name(row, several_modes)
    if row.get("task") != PASSKEY_TASK:
        return name
    depth = MISSING if row.get("depth") is None else f"{row['depth']:g}"
    return f"{name}, passkey at depth {depth}"


def failed_table(cells: pl.DataFrame, several_modes: bool = False) -> Table:
    failed = failed_cells(cells).sort(["seq_len", "policy_label", "cache_size", "sample_id", "depth"], nulls_last=False)
    rows = [
        [
            _probe_name(r, several_modes),
            str(r["seq_len"]),
            str(r["sample_id"]),
            r["cell_id"] or MISSING,
            _one_line(r["error"]),
        ]
        for r in failed.iter_rows(named=True)
    ]
    return Table(
        "Failed cells",
        ["Configuration", "Length (tokens)", "Sample", "Cell id", "Error"],
        rows,
        empty="no failed cells",
    )


def _flat(prefix: str, value: Any) -> list[tuple[str, str]]:
    if isinstance(value, dict):
        return [item for key, sub in value.items() for item in _flat(f"{prefix}.{key}" if prefix else key, sub)]
    return [(prefix, value if isinstance(value, str) else json.dumps(value))]


def metadata_table(meta: dict[str, Any]) -> Table:
    """run.json flattened to dotted keys, so nothing the runner recorded is hidden."""
    return Table("Run metadata", ["Key", "Value"], [list(item) for item in _flat("", meta)], empty="no run.json found")


def retrieval_table(retrieval: pl.DataFrame, several_modes: bool = False) -> Table:
    """Passkey accuracy per policy and cache limit (`full` first): over all probes, then per depth."""
    by_depth = retrieval_stats(retrieval, ["depth"])
    depths = sorted(by_depth["depth"].drop_nulls().unique().to_list())
    at_depth = {
        (r["policy"], r["policy_label"], r["cache_size"], r["positions"], r["depth"]): r["accuracy_pct"]
        for r in by_depth.iter_rows(named=True)
    }
    rows = []
    for r in retrieval_by_config(retrieval).iter_rows(named=True):
        key = (r["policy"], r["policy_label"], r["cache_size"], r["positions"])
        logprob = MISSING if r["logprob_mean"] is None else f"{r['logprob_mean']:.2f}"
        n = str(r["n"]) + (f" (+{r['failed']} failed)" if r["failed"] else "")
        rows.append(
            [
                policy_name(r, several_modes),
                _limit(r),
                format_pct(r["accuracy_pct"]),
                n,
                logprob,
                *(format_pct(at_depth.get((*key, depth))) for depth in depths),
            ]
        )
    return Table(
        "Passkey retrieval by configuration",
        [
            "Policy",
            "Cache limit (tokens)",
            "Accuracy (%)",
            "n",
            "Mean log-prob of the key",
            *(f"depth {depth:g}" for depth in depths),
        ],
        rows,
        RETRIEVAL_NOTE,
        empty="no passkey probe",
    )


def not_drawn(charts: ChartSet) -> Remarks:
    """The charts of a set that could not be drawn, each with its reason."""
    return Remarks([f"{s.title} (`{s.name}`) not drawn: {s.reason}" for s in charts.skipped])


def retrieval_section(retrieval: pl.DataFrame, charts: ChartSet, several_modes: bool) -> Section:
    """The passkey probes: the table, a heat map per policy, and the charts that could not be drawn."""
    return Section(
        RETRIEVAL_HEADING,
        [
            retrieval_table(retrieval, several_modes),
            *charts.charts,
            not_drawn(charts),
        ],
        intro=RETRIEVAL_DEFINITIONS,
    )


def _probed(retrieval: pl.DataFrame, config: dict[str, Any]) -> str:
    """What the passkey probes covered, for the summary: policies, limits, lengths, depths, keys per length and
    depth (the PPL cells' entries above may name others)."""
    evicting = retrieval.filter(pl.col("policy") != BASELINE_POLICY)
    policies = ", ".join(_distinct(evicting, "policy_label")) or "none"
    limits = ", ".join(_distinct(evicting, "cache_size")) or MISSING
    lengths = ", ".join(str(n) for n in lengths_in(retrieval))
    depths = ", ".join(f"{d:g}" for d in sorted(retrieval["depth"].drop_nulls().unique().to_list()))
    keys = retrieval.group_by(["seq_len", "depth"]).agg(pl.col("sample_id").n_unique())["sample_id"]
    per = MISSING if keys.is_empty() else str(keys.max())
    against = against_baseline(retrieval, config)
    return (
        f"{policies}{against} at cache limits {limits}; lengths {lengths or MISSING} tokens, needle depths "
        f"{depths or MISSING}, {per} keys per length and depth"
    )


# --- The report, section by section --------------------------------------------------------------------------


def report_title(run_dir: Path, meta: dict[str, Any]) -> str:
    """The results folder's name, which a reader can find; run.json's run id only when it differs."""
    folder = run_dir.name or run_dir.resolve().name
    run_id = meta.get("run_id")
    if run_id is None or str(run_id) == folder:
        return f"{TITLE}: {folder}"
    return f"{TITLE}: {folder} (run id {run_id})"


def _join(values: list[str]) -> str:
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " and " + values[-1]


def beyond_context_notices(cells: pl.DataFrame) -> list[str]:
    """One sentence per trained-positions value for lengths whose latency pass ran past the model's positions."""
    beyond = ok_cells(cells).filter(pl.col("beyond_context").fill_null(False))
    notices = []
    for (max_positions,), group in beyond.group_by(["max_positions"], maintain_order=True):
        lengths = lengths_in(group)
        if not lengths:
            continue
        subject = f"Length {lengths[0]} goes" if len(lengths) == 1 else f"Lengths {_join([str(n) for n in lengths])} go"
        positions = "trained positions" if max_positions is None else f"{max_positions} trained positions"
        notices.append(
            f"{subject} beyond the model's {positions} (prompt + generated tokens of the latency pass): "
            "the full cache is then outside what the model was trained for, which is an experiment, "
            "not a typical use."
        )
    return sorted(notices)


def load_notices(meta: dict[str, Any]) -> list[str]:
    """A warning when the run used more threads than the machine's CPUs, and when the 1-minute load average at
    the start or end of the run exceeded them (run.json's speed.cpu_count; without it, the threads it used)."""
    speed = meta.get("speed") or {}
    threads, cpus = speed.get("threads"), speed.get("cpu_count")
    warning = oversubscription(threads, cpus) if isinstance(threads, int) and isinstance(cpus, int) else None
    return ([f"{warning[0].upper()}{warning[1:]}."] if warning else []) + _load_notices(speed)


def _load_notices(speed: dict[str, Any]) -> list[str]:
    cores, what = speed.get("cpu_count"), "CPU cores"
    if not isinstance(cores, int | float) or cores <= 0:
        cores, what = speed.get("threads"), "threads the run used (run.json records no core count)"
    if not isinstance(cores, int | float) or cores <= 0:
        return []
    high = [
        f"{load[0]:g} at the {when}"
        for when, key in (("start", "load_average_start"), ("end", "load_average_end"))
        if isinstance(load := speed.get(key), list) and load and isinstance(load[0], int | float) and load[0] > cores
    ]
    if not high:
        return []
    return [
        f"The 1-minute load average was {_join(high)} of the run, above the {cores:g} {what}: other work competed "
        "for the processor, so speed figures may be slower and noisier than this machine allows."
    ]


def timing_notices(summary: pl.DataFrame) -> list[str]:
    """Say where speed changes come from cell-level means, without intervals (runs older than raw timings)."""
    paired = summary.filter((pl.col("policy") != BASELINE_POLICY) & pl.col("n_paired").is_not_null())
    without = paired.filter(~pl.col("speed_from_trials").fill_null(False)).height
    if not without:
        return []
    consequence = (
        "speed changes are the cell-level paired means over samples, without intervals; none is marked "
        "significant, and no speed rule recommends anything on them."
    )
    if without == paired.height:
        return [f"This run has no raw trial timings (`timings/`) paired with `full`: {consequence}"]
    return [
        f"{without} of {paired.height} configurations have no raw trial timings paired with `full`: their "
        + consequence
    ]


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


def compared(run: RunData, measured: Measured | None = None) -> dict[str, str]:
    """What the run compared, for the reader in a hurry: from the cells where they say it, else run.json."""
    measured = measured or what_was_measured(run)
    cells, config = run.cells, run.meta.get("config") or {}
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
        device += f", memory bandwidth {_bandwidth(run.meta)} (measured at the start of the run)"
    return {
        "model": listed("model", "model"),
        "dataset": listed("dataset", "dataset"),
        "policies": (", ".join(policies) or "none") + against_baseline(every_row, config),
        "cache limits (tokens)": listed("cache_size", "cache_sizes"),
        "position modes": listed("positions", "positions"),
        "lengths (tokens)": ", ".join(lengths) or listed("seq_len", "lengths"),
        "latency trials": f"{trials}; the prompt prefilled in chunks of {chunk} tokens, then {gen} tokens timed "
        f"after {warmup} warm-up steps"
        if measured.speed
        else f"none ({measured.no_speed})",
        "device": device,
        **({"passkey retrieval": _probed(run.retrieval, config)} if not run.retrieval.is_empty() else {}),
    }


def assemble(run: RunData, charts_dir: Path) -> Report:
    """Compute tables, recommendations and charts (written to charts_dir) for one run, in reading order:
    the headline first (what was compared, the noise floor, the recommendations), the protocol last."""
    analysis = analyse(run)
    stats, several_modes = analysis.summary, analysis.several_modes
    ppl_charts = build_charts(stats, position_perplexity(run.curves, run.cells), charts_dir, several_modes)
    charts, every_row, retrieval = ppl_charts, run.cells, []
    if not run.retrieval.is_empty():  # a run with passkey probes: their section, heat maps, failures and counts
        every_row = pl.concat([run.cells, run.retrieval], how="diagonal_relaxed")
        probe_modes = several_position_modes(every_row)
        heat_maps = build_retrieval_charts(retrieval_by_probe(run.retrieval), charts_dir, probe_modes)
        retrieval = [retrieval_section(run.retrieval, heat_maps, probe_modes)]
        charts = ChartSet([*ppl_charts.charts, *heat_maps.charts], [*ppl_charts.skipped, *heat_maps.skipped])
    measured = analysis.measured
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
                    else [Markdown(NO_PERPLEXITY)]
                ),
                *([noise_table(analysis.noise)] if measured.speed else []),
            ],
        ),
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
    notices = [*beyond_context_notices(run.cells), *load_notices(run.meta)]
    notices += timing_notices(stats) if measured.speed else []
    return Report(report_title(run.run_dir, run.meta), sections, charts, notices)
