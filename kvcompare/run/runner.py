"""`kvcompare run`: check and plan the grid (kvcompare.run.plan), have a backend measure its passages
(kvcompare.run.backends: this process, or Ray actors), and own the results folder: progress, writing, the finish."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from kvcompare.config import RunConfig, oversubscription
from kvcompare.environment import busy_for_compiled_steps, load_average, physical_cores
from kvcompare.protocol import PROTOCOL_VERSION
from kvcompare.run.backends import Backend, SerialBackend
from kvcompare.run.passages import PassageResults, count_passes, now_iso, passage_groups
from kvcompare.run.plan import Cell, Plan, merge_repeated_values, plan, prepare
from kvcompare.run.results import RunFolder, cell_id
from kvcompare.run.resume import check_protocol, resume_additions

if TYPE_CHECKING:
    from kvcompare.analysis import RunData

log = logging.getLogger(__name__)

DEFAULT_RUNS_DIR = Path("reports/runs")


def new_run_id(config: RunConfig) -> str:
    """A UTC timestamp and a short hash of the configuration; also the default folder name."""
    return f"{datetime.datetime.now(datetime.UTC):%Y%m%d-%H%M%S}-{cell_id(dataclasses.asdict(config))[:6]}"


@dataclasses.dataclass(frozen=True)
class RunStart:
    """A run that passed every check made before the weights load: its plan, folder and what is finished."""

    grid: Plan
    run_id: str  # the resumed run's, or a new one (also the default folder's name)
    folder: RunFolder
    previous: dict[str, Any]  # the run.json of the run resumed ({} for a new run)
    additions: dict[str, Any]  # what a resume adds to it
    done: set[str]  # ids of the cells already finished in the folder

    @property
    def todo(self) -> list[Cell]:
        """The cells still to measure, in the plan's order."""
        return [cell for cell in self.grid.cells if cell.id not in self.done]


def check_start(
    config: RunConfig, out: Path | None = None, *, resume: bool = False, force: bool = False, hold: bool = False
) -> RunStart:
    """Every check of a run that needs no weights, in the order a run makes them; a dry run makes the same.

    With ``hold`` (a run), the folder's lock is taken before its contents are read, and kept (the caller must
    ``folder.release()`` it); without (a dry run), a folder in use is only refused. Raises the run's own errors
    (ConfigError, ResultsError, FolderInUseError, ModelError, CorpusError): nothing is written, and a lock taken
    is given back.
    """
    config = merge_repeated_values(config)
    policies = prepare(config)
    run_id = new_run_id(config)
    folder = RunFolder(out if out is not None else DEFAULT_RUNS_DIR / run_id)
    folder.check(resume=resume, force=force, hold=hold)
    try:
        previous = folder.read_run_json() if resume else {}
        if previous:
            check_protocol(previous)
        additions = resume_additions(previous["config"], config) if previous.get("config") else {}
        done = folder.finished() if resume else set()
        grid = plan(config, policies)  # the tokenizer and the corpus: passages are drawn before the weights load
    except BaseException:
        folder.release()
        raise
    if config.ray in (None, "local") and (warning := oversubscription(config.threads, os.cpu_count())):
        log.warning(warning)
    threads = config.threads or physical_cores()
    if config.compile and (warning := busy_for_compiled_steps(threads, os.cpu_count(), load_average())):
        log.warning(warning)
    return RunStart(grid, previous.get("run_id") or run_id, folder, previous, additions, done)


def run(
    config: RunConfig, out: Path | None = None, *, resume: bool = False, force: bool = False, progress: bool = True
) -> Path:
    """Measure every cell of the grid into ``out`` (default ``reports/runs/<run id>``); return the folder.

    Everything that can be checked without the weights is checked first (:func:`check_start`), and nothing but
    the folder's lock is written until the first cell is about to be measured; the lock refuses a second run on the
    folder (FolderInUseError) and is given back on every exit. With ``config.ray`` set, passages are measured by Ray
    actors (kvcompare.run.distributed); the folder, its rows and ``--resume`` are the same.
    """
    begun = check_start(config, out, resume=resume, force=force, hold=True)
    try:
        return measure_run(begun, progress)
    finally:
        begun.folder.release()


def measure_run(begun: RunStart, progress: bool) -> Path:
    """Measure the unfinished cells of a run that passed its checks and holds its folder; return the folder."""
    grid, folder, previous, done = begun.grid, begun.folder, begun.previous, begun.done
    resumes = list(previous.get("resumes", []))
    if previous:
        resumes.append({"at": now_iso(), "added": begun.additions})
    meta: dict[str, Any] = {
        "run_id": begun.run_id,
        "protocol_version": PROTOCOL_VERSION,
        "command": " ".join(["kvcompare", *sys.argv[1:]])
        if Path(sys.argv[0]).name == "kvcompare"
        else " ".join(sys.argv),
        **grid.metadata(),
        "started_at": previous.get("started_at") or now_iso(),
        "resumes": resumes,
        "finished_at": None,
    }
    if len(begun.todo) < len(grid.cells):
        log.info(f"resuming: {len(grid.cells) - len(begun.todo)} of {len(grid.cells)} cells already finished")
    backend = open_backend(grid, begun.run_id)
    try:
        meta.update(backend.describe())
        meta["speed"]["warm_up_compile_s"] = (previous.get("speed") or {}).get("warm_up_compile_s") or 0.0
        folder.open(meta)
        try:
            measure_all(backend, grid, done, folder, meta["speed"], session=len(resumes), progress=progress)
            finish(folder, meta)
        finally:  # an interrupted run still records how loaded the machine was
            meta["speed"]["load_average_end"] = load_average()
            folder.write_run_json(meta)
    finally:
        backend.close()
    return folder.path


def open_backend(grid: Plan, run_id: str) -> Backend:
    """Ray actors (``--ray``) or this process; either loads and checks the model before any cell."""
    if grid.config.ray is not None:
        from kvcompare.run.distributed import RayBackend

        return RayBackend(grid, run_id)
    return SerialBackend(grid, run_id)


def measure_all(
    backend: Backend, grid: Plan, done: set[str], folder: RunFolder, speed: dict[str, Any], *, session: int,
    progress: bool,
) -> None:
    """Have ``backend`` measure every unfinished passage; write each one's timings, then its cells, the moment
    it comes back, and count its passes on the progress bar; add the seconds its warm-ups spent compiling to
    ``speed["warm_up_compile_s"]`` (run.json's, every session's)."""
    groups = passage_groups(grid, done)

    def tick(label: str, passes: int) -> None:
        bar.set_postfix_str(label, refresh=not passes)
        if passes:
            bar.update(passes)

    failures = 0
    with passes_bar(count_passes(groups, grid.config), progress, folder) as bar:
        for results in backend.measure(groups, done, session, tick):
            speed["warm_up_compile_s"] += results.warm_up_compile_s
            failures += write_results(folder, results)
    report_failures(failures)


def finish(folder: RunFolder, meta: dict[str, Any]) -> None:
    """Record the run's noise floor, what --compile did, and the end time once every passage is measured."""
    from kvcompare.analysis import load_run
    from kvcompare.analysis.pairing import compile_summary

    data = load_run(folder.path)
    meta["speed"]["noise_floor"] = measured_noise_floor(data)
    if meta["config"].get("compile"):
        meta["speed"]["compile"] = compile_summary(data.cells, meta["speed"].get("warm_up_compile_s") or 0.0)
    meta["finished_at"] = now_iso()


def measured_noise_floor(data: RunData) -> dict[str, Any]:
    """The run's noise floor in % per speed metric (the A/A control; see kvcompare.analysis.noise_floor)."""
    from kvcompare.analysis import NOISE_CHANGES, noise_floor, what_was_measured

    floor = noise_floor(data.cells, data.timings, what_was_measured(data).no_speed)
    return {
        "pct": {change.title: floor.floor(change) for change in NOISE_CHANGES},
        "pairs": floor.pairs,
        "reason": floor.reason,
    }


@contextlib.contextmanager
def passes_bar(total: int, progress: bool, folder: RunFolder) -> Iterator[Any]:
    """The run's progress bar over its passes; an interrupt closes it and says what is kept."""
    bar = tqdm(total=total, desc="passes", unit="pass", disable=not progress, file=sys.stderr)
    try:
        yield bar
    except KeyboardInterrupt:
        bar.close()
        log.warning(f"interrupted: {KEPT_ON_INTERRUPT.format(path=folder.path)}")
        raise
    bar.close()


#: What an interrupted run says (a serial one, or one on Ray).
KEPT_ON_INTERRUPT = (
    "finished passages are kept in {path} (the ones in progress are measured again); add --resume to continue"
)


def report_failures(failures: int) -> None:
    """Say how many cells failed, if any."""
    if failures:
        log.warning(f"{failures} cell(s) failed; their errors are in the results (status = 'failed')")


def write_results(folder: RunFolder, results: PassageResults) -> int:
    """Write a passage's timings, then its cells; return how many of its cells failed."""
    if results.timings_name is not None and results.timings:  # a quality-only run times nothing
        folder.write_timings(results.timings_name, results.timings)
    for row, curve in results.cells:
        folder.write_cell(row, curve)
    return sum(row["status"] != "ok" for row, _ in results.cells)
