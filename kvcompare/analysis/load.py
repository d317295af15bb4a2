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


@dataclass(frozen=True)
class RunData:
    """Everything the report is built from."""

    run_dir: Path
    meta: dict[str, Any]  # run.json, {} when absent
    cells: pl.DataFrame  # RESULT_SCHEMA, one row per cell (latest attempt)
    curves: pl.DataFrame  # CURVE_SCHEMA
    timings: pl.DataFrame  # TIMINGS_SCHEMA, every trial's raw rows; empty for runs older than repeated trials
    problems: list[str] = field(default_factory=list)  # files that could not be read
    # RESULT_SCHEMA, the passkey probes (task "passkey"), kept apart so that `cells` stays the PPL/speed cells
    retrieval: pl.DataFrame = field(default_factory=lambda: empty_frame(RESULT_SCHEMA))


def empty_frame(schema: pa.Schema) -> pl.DataFrame:
    """A DataFrame with ``schema``'s columns and no rows (a run with no timings or no probes)."""
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
    empty = empty_frame(schema)
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


#: The task of a passkey probe's row; every other row (task "ppl", or null in runs older than tasks) is a PPL cell.
PASSKEY_TASK = "passkey"
IS_PASSKEY = (pl.col("task") == PASSKEY_TASK).fill_null(False)


def load_run(run_dir: Path) -> RunData:
    """Load run.json, cells, curves and timings; any of them may be missing, but not all (ReportError).

    Passkey probes go to `retrieval`, and `cells` (with the curves and timings of its cells) holds only the
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
    retrieval = rows.filter(IS_PASSKEY)
    not_probe = ~pl.col("cell_id").is_in(retrieval["cell_id"].implode()).fill_null(False)
    curves = _read_parquet_dir(run_dir, CURVES_GLOB, CURVE_SCHEMA, problems)
    timings = _read_parquet_dir(run_dir, TIMINGS_GLOB, TIMINGS_SCHEMA, problems)
    return RunData(
        run_dir=run_dir,
        meta=meta,
        cells=rows.filter(~IS_PASSKEY),
        curves=curves.filter(not_probe),
        timings=timings.filter(not_probe),
        problems=problems,
        retrieval=retrieval,
    )
