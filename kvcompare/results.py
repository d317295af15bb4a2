"""The results folder: one Parquet file per finished cell, written atomically, plus run.json.

A cell is written the moment it finishes, so an interrupted run keeps every finished cell and
``--resume`` skips them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from kvcompare.schema import CURVE_SCHEMA, RESULT_SCHEMA, RUN_JSON


class ResultsError(ValueError):
    """A results folder that cannot be used as asked."""


def cell_id(fields: dict[str, Any]) -> str:
    """A stable id for a cell's configuration, so a resumed run recognises finished cells."""
    return hashlib.sha1(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


class RunFolder:
    """Where one run's results live."""

    def __init__(self, path: Path, *, resume: bool = False, force: bool = False) -> None:
        self.path = path
        if path.exists() and any(path.iterdir()):
            if force:
                shutil.rmtree(path)
            elif not resume:
                raise ResultsError(
                    f"{path} already holds results: pass --resume to continue that run, --force to replace it, "
                    "or choose another --out"
                )
        for sub in ("cells", "curves"):
            (path / sub).mkdir(parents=True, exist_ok=True)

    def finished(self) -> set[str]:
        """Ids of cells that finished successfully."""
        done: set[str] = set()
        for file in (self.path / "cells").glob("*.parquet"):
            table = pq.read_table(file, columns=["cell_id", "status"])
            statuses = zip(table["cell_id"].to_pylist(), table["status"].to_pylist(), strict=True)
            done.update(cell for cell, status in statuses if status == "ok")
        return done

    def write_cell(self, row: dict[str, Any], curve: list[dict[str, Any]]) -> None:
        row = {name: row.get(name) for name in RESULT_SCHEMA.names}
        _write_atomic(
            pa.Table.from_pylist([row], schema=RESULT_SCHEMA), self.path / "cells" / f"{row['cell_id']}.parquet"
        )
        if curve:
            table = pa.Table.from_pylist(
                [{n: r.get(n) for n in CURVE_SCHEMA.names} for r in curve], schema=CURVE_SCHEMA
            )
            _write_atomic(table, self.path / "curves" / f"{row['cell_id']}.parquet")

    def read_run_json(self) -> dict[str, Any]:
        file = self.path / RUN_JSON
        return json.loads(file.read_text()) if file.exists() else {}

    def write_run_json(self, data: dict[str, Any]) -> None:
        tmp = self.path / f".{RUN_JSON}.tmp"
        tmp.write_text(json.dumps(data, indent=2, default=str))
        os.replace(tmp, self.path / RUN_JSON)
