"""Read a run directory into data frames, tolerating what an interrupted or partial run leaves behind."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

from kvcompare.schema import CURVE_SCHEMA, CURVES_GLOB, RESULT_SCHEMA, RESULTS_GLOB, RUN_JSON


class ReportError(ValueError):
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
    problems: list[str] = field(default_factory=list)  # files that could not be read


def _empty(schema: pa.Schema) -> pl.DataFrame:
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
    empty = _empty(schema)
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


def load_run(run_dir: Path) -> RunData:
    """Load run.json, cells and curves; any of them may be missing, but not all (ReportError)."""
    check_run_dir(run_dir)
    problems: list[str] = []
    meta_path = run_dir / RUN_JSON
    meta: dict[str, Any] = {}
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            problems.append(f"{RUN_JSON}: {exc}")
    cells = _latest_attempt(_read_parquet_dir(run_dir, RESULTS_GLOB, RESULT_SCHEMA, problems))
    curves = _read_parquet_dir(run_dir, CURVES_GLOB, CURVE_SCHEMA, problems)
    return RunData(run_dir=run_dir, meta=meta, cells=cells, curves=curves, problems=problems)
