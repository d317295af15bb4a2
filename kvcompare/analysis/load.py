"""Reading a results folder: run.json, the cells (the latest attempt of each), curves and timings, tolerating
what an interrupted or partial run leaves behind; passkey probes kept apart from the perplexity cells."""

from __future__ import annotations

import json
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


#: The task of a passkey probe's row, and of a perplexity cell's.
PASSKEY_TASK, PPL_TASK = "passkey", "ppl"


@dataclass(frozen=True)
class RunData:
    """Everything the report is built from."""

    run_dir: Path
    meta: dict[str, Any]  # run.json, {} when absent
    cells: pl.DataFrame  # RESULT_SCHEMA, one row per cell (latest attempt)
    curves: pl.DataFrame  # CURVE_SCHEMA
    timings: pl.DataFrame  # TIMINGS_SCHEMA, every trial's raw rows; empty for runs older than repeated trials
    problems: list[str] = field(default_factory=list)  # files that could not be read
    # RESULT_SCHEMA (and `depth`), every probe task's rows, kept apart so that `cells` stays the PPL/speed cells
    retrieval: pl.DataFrame = field(default_factory=lambda: empty_frame(RESULT_SCHEMA))

    @property
    def passkey(self) -> pl.DataFrame:
        """The passkey probes of :attr:`retrieval`."""
        return self.retrieval.filter(pl.col("task") == PASSKEY_TASK)

    @property
    def other_probes(self) -> pl.DataFrame:
        """The probes of every other task (RULER's, third-party ones)."""
        return self.retrieval.filter(pl.col("task") != PASSKEY_TASK)


def empty_frame(schema: pa.Schema) -> pl.DataFrame:
    """A DataFrame with ``schema``'s columns and no rows (a run with no timings or no probes)."""
    frame = pl.from_arrow(schema.empty_table())
    assert isinstance(frame, pl.DataFrame)
    return frame


#: Columns of results written before protocol 7, by their generic names (a passkey probe's, issue 23).
LEGACY_COLUMNS = {
    "passkey_correct": "correct",
    "passkey_matched": "answer_matched",
    "passkey_tokens": "answer_tokens",
    "passkey_logprob": "answer_logprob",
}


def generic_columns(frame: pl.DataFrame) -> pl.DataFrame:
    """A result file of an older protocol with today's columns: passkey_* renamed, the needle's depth and start
    moved into ``probe_params``; a file of today's protocol unchanged."""
    frame = frame.rename({old: new for old, new in LEGACY_COLUMNS.items() if old in frame.columns})
    if "depth" in frame.columns and "probe_params" not in frame.columns:
        start = pl.col("needle_start") if "needle_start" in frame.columns else pl.lit(None, dtype=pl.Int64)
        params = pl.struct(pl.col("depth"), start.alias("needle_start")).struct.json_encode()
        frame = frame.with_columns(
            pl.when(pl.col("depth").is_not_null()).then(params).otherwise(None).alias("probe_params"),
            pl.lit("{}").alias("task_params"),
        )
        if "correct" in frame.columns:
            frame = frame.with_columns((pl.col("answer_matched") / pl.col("answer_tokens")).alias("score"))
    return frame.drop([c for c in ("depth", "needle_start") if c in frame.columns])


def _read_parquet_dir(run_dir: Path, pattern: str, schema: pa.Schema, problems: list[str]) -> pl.DataFrame:
    """Read files one by one so that a half-written file costs only itself, and give every schema column."""
    frames = []
    for path in sorted(run_dir.glob(pattern)):
        try:
            frames.append(generic_columns(pl.read_parquet(path)) if schema is RESULT_SCHEMA else pl.read_parquet(path))
        except Exception as exc:  # noqa: BLE001 - any unreadable file is reported, not fatal
            problems.append(f"{path.relative_to(run_dir)}: {exc}")
    empty = empty_frame(schema)
    frame = pl.concat([empty, *frames], how="diagonal_relaxed")
    frame = frame.select([pl.col(name).cast(dtype) for name, dtype in empty.schema.items()])
    if "compression" in frame.columns:  # runs older than the setting (protocol 8) were all continuous
        frame = frame.with_columns(pl.col("compression").fill_null("continuous"))
    return frame


def _latest_attempt(cells: pl.DataFrame) -> pl.DataFrame:
    """A resumed run may hold a failed and a later ok row for one cell: keep ok, then the latest."""
    return (
        cells.with_columns((pl.col("status") == "ok").alias("_ok"))
        .sort(["_ok", "finished_at"], nulls_last=False)
        .unique(subset="cell_id", keep="last", maintain_order=True)
        .drop("_ok")
    )


#: A probe task's row; every other row (task "ppl", or null in runs older than tasks) is a PPL cell.
IS_PROBE = (pl.col("task").is_not_null() & (pl.col("task") != PPL_TASK)).fill_null(False)


def with_depth(probes: pl.DataFrame) -> pl.DataFrame:
    """Probe rows with their ``depth`` (a needle task's axis, from ``probe_params``; null where there is none)."""
    depth = pl.col("probe_params").str.json_path_match("$.depth").cast(pl.Float64, strict=False)
    return probes.with_columns(depth.alias("depth"))


def load_run(run_dir: Path) -> RunData:
    """Load run.json, cells, curves and timings; any of them may be missing, but not all (ReportError).

    Probes (passkey, RULER's tasks) go to `retrieval`, with their ``depth``, and `cells` (with the curves and
    timings of its cells) holds only the
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
    retrieval = with_depth(rows.filter(IS_PROBE))
    not_probe = ~pl.col("cell_id").is_in(retrieval["cell_id"].implode()).fill_null(False)
    curves = _read_parquet_dir(run_dir, CURVES_GLOB, CURVE_SCHEMA, problems)
    timings = _read_parquet_dir(run_dir, TIMINGS_GLOB, TIMINGS_SCHEMA, problems)
    return RunData(
        run_dir=run_dir,
        meta=meta,
        cells=rows.filter(~IS_PROBE),
        curves=curves.filter(not_probe),
        timings=timings.filter(not_probe),
        problems=problems,
        retrieval=retrieval,
    )
