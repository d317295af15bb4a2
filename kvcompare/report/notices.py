"""What a report warns of before its sections (lengths beyond the model's positions, an overloaded machine,
speed changes without intervals) and the noise floor in one sentence, said at the top of every report and of
the terminal summary."""

from __future__ import annotations

from typing import Any

import polars as pl

from kvcompare.analysis import BASELINE_POLICY, EVERYTHING, NOISE_CHANGES, Measured, NoiseFloor, lengths_in, ok_cells
from kvcompare.analysis.pairing import compile_summary
from kvcompare.config import oversubscription
from kvcompare.environment import load_distortion
from kvcompare.report.formatting import join


def beyond_context_notices(cells: pl.DataFrame) -> list[str]:
    """One sentence per trained-positions value for lengths whose latency pass ran past the model's positions."""
    beyond = ok_cells(cells).filter(pl.col("beyond_context").fill_null(False))
    notices = []
    for (max_positions,), group in beyond.group_by(["max_positions"], maintain_order=True):
        lengths = lengths_in(group)
        if not lengths:
            continue
        subject = f"Length {lengths[0]} goes" if len(lengths) == 1 else f"Lengths {join([str(n) for n in lengths])} go"
        positions = "trained positions" if max_positions is None else f"{max_positions} trained positions"
        notices.append(
            f"{subject} beyond the model's {positions} (prompt + generated tokens of the latency pass): "
            "the full cache is then outside what the model was trained for, which is an experiment, "
            "not a typical use."
        )
    return sorted(notices)


def compiled_steps(cells: pl.DataFrame, meta: dict[str, Any] | None = None) -> str:
    """How the timed decode steps ran, for the settings table: "" (eagerly, the default), or compiled and how long
    compiling took, never timed: in the cells (between prefill and decode steps) and in the untimed warm-up pass
    (run.json's ``speed.warm_up_compile_s``, from ``meta``; a run.json without it predates its recording)."""
    warm_up = ((meta or {}).get("speed") or {}).get("warm_up_compile_s")
    summary = compile_summary(_asked_to_compile(cells), warm_up or 0.0)
    if not summary["cells_compiled"]:
        return ""
    where = (
        f"{summary['cells_compile_s']:.1f} s in the cells, between prefill and decode steps (a cache shape compiles "
        "once, in the first cell that has it), and "
        + (
            f"{warm_up:.1f} s in the untimed warm-up pass (the shape of `full`'s cache on the first passage)"
            if warm_up is not None
            else "an unrecorded time in the untimed warm-up pass"
        )
    )
    return (
        f"; decode steps compiled (--compile: one torch.compile step for every policy), {summary['compile_s']:.1f} s "
        f"of compiling, never timed: {where}"
    )


def compile_notices(cells: pl.DataFrame) -> list[str]:
    """A warning when --compile was asked for and some cells' decode steps ran eagerly, with the reasons."""
    summary = compile_summary(_asked_to_compile(cells))
    if not summary["cells_eager"]:
        return []
    timed = summary["cells_compiled"] + summary["cells_eager"]
    return [
        f"--compile was asked for, but the decode steps of {summary['cells_eager']} of {timed} timed cells ran "
        f"eagerly ({'; '.join(summary['fallbacks']) or 'no reason recorded'}): their speed figures are eager steps', "
        "comparable with each other but not with the compiled cells'."
    ]


def _asked_to_compile(cells: pl.DataFrame) -> pl.DataFrame:
    """The cells of a run with --compile (none from a run before it existed)."""
    return cells.filter(pl.col("compile").fill_null(False)) if "compile" in cells.columns else cells[:0]


def load_notices(meta: dict[str, Any]) -> list[str]:
    """A warning when the run used more threads than the machine's CPUs, and when the 1-minute load average at
    the start or end of the run exceeded them (run.json's speed.cpu_count; without it, the threads it used)."""
    speed = meta.get("speed") or {}
    threads, cpus = speed.get("threads"), speed.get("cpu_count")
    warning = oversubscription(threads, cpus) if isinstance(threads, int) and isinstance(cpus, int) else None
    return ([f"{warning[0].upper()}{warning[1:]}."] if warning else []) + _load_notices(speed, meta.get("config"))


def _load_notices(speed: dict[str, Any], config: dict[str, Any] | None = None) -> list[str]:
    """A warning when the 1-minute load average at the start or end exceeded the cores (else the threads), saying
    how far load distorts the run's CPU steps (eager or compiled, from its ``config``) where they ran on a CPU."""
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
    how = ""
    if config and str(config.get("device") or "cpu").startswith("cpu"):
        how = f" How far: {load_distortion(bool(config.get('compile')))}."
    return [
        f"The 1-minute load average was {join(high)} of the run, above the {cores:g} {what}: other work competed "
        f"for the processor, so speed figures may be slower and noisier than this machine allows.{how}"
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
        f"**Noise floor:** speed differences smaller than {join(floors)} are not distinguishable on this machine "
        "in this run (per metric: the larger of |low| and |high| of the 95% interval of the A/A control's change, "
        f"`full` timed twice in the same round, over {noise.pairs} pairs)."
    )
