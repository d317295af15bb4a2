"""The results folder: one Parquet file per finished cell, written atomically, plus run.json.

A cell is written the moment it finishes, so an interrupted run keeps every finished cell and
``--resume`` skips them. The folder is checked before any work; a run holds it from its start to its end with a
lock (kvcompare.run.lock), so that a second run on it is refused; its results are written only when the first cell
is about to be, and a run that fails to start leaves nothing behind (not even the folder it made for its lock).
``--force`` replaces only what kvcompare wrote: a folder holding anything else is refused, never deleted.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from kvcompare.errors import KVCompareError
from kvcompare.run import lock
from kvcompare.schema import CURVE_SCHEMA, RESULT_SCHEMA, RUN_JSON, TIMINGS_SCHEMA

log = logging.getLogger(__name__)

CELLS, CURVES, TIMINGS, REPORT, QUARANTINE = "cells", "curves", "timings", "report", "quarantine"
#: Everything kvcompare writes at the top of a results folder (and its lock); anything else makes the folder foreign.
OWN_ENTRIES = frozenset({RUN_JSON, f".{RUN_JSON}.tmp", CELLS, CURVES, TIMINGS, REPORT, QUARANTINE})
#: Folders whose files are all Parquet (or kvcompare's own temporary files while writing).
PARQUET_FOLDERS = (CELLS, CURVES, TIMINGS)


class ResultsError(KVCompareError, ValueError):
    """A results folder that cannot be used as asked."""


def cell_id(fields: dict[str, Any]) -> str:
    """A stable id for a cell's configuration, so a resumed run recognises finished cells."""
    return hashlib.sha1(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def foreign_entries(path: Path) -> list[str]:
    """What in ``path`` kvcompare did not write (relative names); empty for a results folder."""
    foreign = [e.name for e in path.iterdir() if e.name not in OWN_ENTRIES and not lock.is_lock_file(e.name)]
    for sub in PARQUET_FOLDERS:
        folder = path / sub
        if folder.is_dir():
            foreign += [
                f"{sub}/{entry.name}"
                for entry in folder.iterdir()
                if not (entry.is_file() and (entry.suffix == ".parquet" or entry.name.endswith(".tmp")))
            ]
        elif folder.exists():
            foreign.append(sub)
    return sorted(foreign)


def _writable_ancestor(path: Path) -> Path:
    """The nearest folder at or above ``path`` that exists: where the results folder would be created."""
    probe = path.absolute()
    while not probe.exists():
        probe = probe.parent
    return probe


class RunFolder:
    """Where one run's results live. Nothing is written until :meth:`open`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._replace = False
        self._token: str | None = None  # the lock's, while this run holds the folder
        self._made: Path | None = None  # the topmost folder that taking the lock created

    # -- before any work ------------------------------------------------------------------------
    def check(self, *, resume: bool = False, force: bool = False, hold: bool = False) -> None:
        """Refuse a folder that cannot be used as asked; remember whether ``--force`` must replace it.

        With ``hold``, take the folder's lock first (creating the folder) and keep it until :meth:`release`;
        without, only refuse a folder that a live run holds. Raises ResultsError, or FolderInUseError for a folder
        in use (nothing of it is changed)."""
        path = self.path
        if force and resume:
            raise ResultsError("--force and --resume contradict each other: --resume keeps, --force replaces")
        if path.exists() and not path.is_dir():
            raise ResultsError(f"--out {path} is a file, not a folder: choose a folder for the results")
        if resume and not path.exists():
            raise ResultsError(
                f"--resume: {path} does not exist, so there is no run to continue: give the --out of that run, "
                "or leave out --resume to start a new one"
            )
        base = _writable_ancestor(path)
        if not os.access(base, os.W_OK | os.X_OK):
            raise ResultsError(f"cannot write to {base} (permission denied): choose another --out")
        if hold:
            self._hold()
        elif path.is_dir():
            lock.holder(path)  # raises FolderInUseError for a run that holds it
        try:
            self._check_contents(resume=resume, force=force)
        except BaseException:
            self.release()
            raise

    def _check_contents(self, *, resume: bool, force: bool) -> None:
        path = self.path
        if not path.exists() or not any(not lock.is_lock_file(entry.name) for entry in path.iterdir()):
            return
        foreign = foreign_entries(path)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise ResultsError(
                f"--out {path} holds files kvcompare did not write ({shown}); it is not a results folder, so "
                "neither --force nor --resume will touch it: choose another --out"
            )
        if not any((path / CELLS).glob("*.parquet")):
            self._replace = True  # a run that never finished a cell: nothing measured to keep
            return
        if force:
            self._replace = True
        elif not resume:
            raise ResultsError(
                f"{path} already holds results: pass --resume to continue that run, --force to replace it, "
                "or choose another --out"
            )

    def _hold(self) -> None:
        """Take the folder's lock (creating the folder if needed): raises FolderInUseError if a live run holds it."""
        made = _writable_ancestor(self.path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ResultsError(f"cannot create the results folder {self.path}: {err}") from None
        if made != self.path.absolute():
            self._made = self.path.absolute()
            while self._made.parent != made:
                self._made = self._made.parent
        try:
            self._token = lock.take(self.path)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Give the folder's lock back (every exit path of a run calls it); remove the folders that taking it
        created if nothing was written there."""
        if self._token is not None:
            lock.release(self.path, self._token)
            self._token = None
        if self._made is not None:
            folder = self.path.absolute()
            try:
                while True:
                    folder.rmdir()  # only empty folders: a folder with results stays
                    if folder == self._made:
                        break
                    folder = folder.parent
            except OSError:
                pass
            self._made = None

    def read_run_json(self) -> dict[str, Any]:
        """The folder's run.json, or {} when there is none (or it is being replaced). Raises ResultsError if it is
        unreadable."""
        file = self.path / RUN_JSON
        if self._replace or not file.exists():
            return {}
        try:
            data: dict[str, Any] = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ResultsError(f"{file} cannot be read ({err}): it is needed to resume; choose another --out") from None
        return data

    def finished(self) -> set[str]:
        """Ids of cells that finished successfully; an unreadable cell file is moved to quarantine/."""
        done: set[str] = set()
        if self._replace:
            return done
        for file in sorted((self.path / CELLS).glob("*.parquet")):
            try:
                table = pq.read_table(file, columns=["cell_id", "status"])
            except Exception as err:  # noqa: BLE001 - a truncated or foreign file costs only its own cell
                moved = self._quarantine(file)
                log.warning(
                    f"{file} cannot be read ({type(err).__name__}); kept as {moved}, its cell is measured again"
                )
                continue
            statuses = zip(table["cell_id"].to_pylist(), table["status"].to_pylist(), strict=True)
            done.update(cell for cell, status in statuses if status == "ok")
        return done

    def _quarantine(self, file: Path) -> Path:
        folder = self.path / QUARANTINE
        folder.mkdir(exist_ok=True)
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        target = folder / f"{file.name}.{stamp}"
        os.replace(file, target)
        return target

    # -- when the first cell is about to be written ------------------------------------------------
    def open(self, meta: dict[str, Any]) -> None:
        """Create the folder (replacing kvcompare's own files where ``--force`` said so) and write run.json."""
        try:
            if self._replace:
                for name in OWN_ENTRIES:  # never the lock
                    entry = self.path / name
                    if entry.is_dir():
                        shutil.rmtree(entry)
                    elif entry.exists():
                        entry.unlink()
                self._replace = False
            for sub in PARQUET_FOLDERS:
                (self.path / sub).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ResultsError(f"cannot create the results folder {self.path}: {err}") from None
        self.write_run_json(meta)

    def write_cell(self, row: dict[str, Any], curve: list[dict[str, Any]]) -> None:
        """Write one cell's row (and its perplexity curve) atomically to cells/ (and curves/)."""
        row = {name: row.get(name) for name in RESULT_SCHEMA.names}
        _write_atomic(
            pa.Table.from_pylist([row], schema=RESULT_SCHEMA), self.path / CELLS / f"{row['cell_id']}.parquet"
        )
        if curve:
            table = pa.Table.from_pylist(
                [{n: r.get(n) for n in CURVE_SCHEMA.names} for r in curve], schema=CURVE_SCHEMA
            )
            _write_atomic(table, self.path / CURVES / f"{row['cell_id']}.parquet")

    def write_timings(self, name: str, rows: list[dict[str, Any]]) -> None:
        """One passage's raw trial timings (TIMINGS_SCHEMA), written before its cells."""
        table = pa.Table.from_pylist([{n: r.get(n) for n in TIMINGS_SCHEMA.names} for r in rows], schema=TIMINGS_SCHEMA)
        _write_atomic(table, self.path / TIMINGS / f"{name}.parquet")

    def write_run_json(self, data: dict[str, Any]) -> None:
        """Write run.json atomically."""
        tmp = self.path / f".{RUN_JSON}.tmp"
        tmp.write_text(json.dumps(data, indent=2, default=str))
        os.replace(tmp, self.path / RUN_JSON)
