"""`kvcompare run`: check and plan the grid (kvcompare.plan), load the model, measure each cell, write it at once."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import itertools
import json
import os
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import torch
from tqdm import tqdm

from kvcompare.budgets import compressed_layer_budgets
from kvcompare.cache import CacheLayout
from kvcompare.config import ConfigError, RunConfig, oversubscription
from kvcompare.environment import device_name, environment
from kvcompare.executor import Executor
from kvcompare.fidelity import check_fidelity
from kvcompare.measure import latency_fields, position_buckets, quality_fields
from kvcompare.models import LoadedModel, load_model
from kvcompare.physics import kv_read_bytes, memory_bandwidth, tpot_floor, weight_bytes
from kvcompare.plan import Cell, Plan, merge_repeated_values, plan, prepare
from kvcompare.protocol import PROTOCOL_VERSION
from kvcompare.results import RunFolder, cell_id
from kvcompare.schedule import CellRecord, measure_passage, measure_probes, schedule, trial_passes
from kvcompare.schema import CURVE_CELL_COLUMNS

DEFAULT_RUNS_DIR = Path("reports/runs")


def _timestamp() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def new_run_id(config: RunConfig) -> str:
    """A UTC timestamp and a short hash of the configuration; also the default folder name."""
    return f"{datetime.datetime.now(datetime.UTC):%Y%m%d-%H%M%S}-{cell_id(dataclasses.asdict(config))[:6]}"


#: Grid fields a resumed run may extend (new cells) but never shrink; every other field must stay the same,
#: since it changes what a finished cell means (except EXECUTION_ONLY).
GROWABLE = ("policies", "cache_sizes", "positions", "tasks", "depths")
#: Fields that change how cells are run, never what they measure: a resumed run may change them.
EXECUTION_ONLY = ("quality_batch", "ray", "workers")
#: Fields only the cells of one task depend on: they bind a resume only where the run measured that task.
TASK_ONLY = {"depths": "passkey", "haystack": "passkey"}


def check_protocol(previous: dict[str, Any]) -> None:
    """Refuse to resume a run whose cells were measured under another protocol version."""
    version = previous.get("protocol_version", 1)
    if version != PROTOCOL_VERSION:
        raise ConfigError(
            f"the run in --out was measured under protocol {version}, this kvcompare measures under protocol "
            f"{PROTOCOL_VERSION} (see kvcompare/protocol.py): its cells cannot be mixed with cells measured now; "
            "use another --out (its results stay readable with `kvcompare report`)"
        )


def resume_additions(previous: dict[str, Any], config: RunConfig) -> dict[str, Any]:
    """What ``config`` adds to the run recorded in ``previous``; refuse any change to what finished cells mean."""
    new = dataclasses.asdict(config)
    unknown = sorted(set(new) - set(previous))
    if unknown:
        raise ConfigError(
            f"the run in --out was made by an older kvcompare, whose protocol had no {', '.join(unknown)}: its "
            "cells cannot be mixed with cells measured now; use another --out (its results stay readable with "
            "`kvcompare report`)"
        )
    unused = {key for key, task in TASK_ONLY.items() if task not in previous.get("tasks", [])}
    changed = []
    for key, old in previous.items():
        if key in GROWABLE or key in EXECUTION_ONLY or key in ("lengths", "samples") or key not in new:
            continue
        if new[key] != old and key not in unused:
            changed.append(f"{key}: {old!r} then, {new[key]!r} now")
    for key in GROWABLE:
        if key in unused:  # no finished cell depends on it
            continue
        missing = [v for v in previous.get(key, []) if v not in new[key]]
        if missing:
            changed.append(f"{key}: {missing!r} would be dropped")
    old_samples = dict(zip(previous.get("lengths", []), previous.get("samples", []), strict=False))
    new_samples = dict(zip(config.lengths, config.samples, strict=True))
    for length, count in old_samples.items():
        if new_samples.get(length, 0) < count:
            changed.append(f"length {length}: {count} samples then, {new_samples.get(length, 0)} now")
    if changed:
        raise ConfigError(
            "--resume would mix cells measured under different settings; it may only add policies, cache limits, "
            "position modes, tasks, needle depths, lengths or samples. Differences: "
            + "; ".join(changed)
            + ". Rerun with the original settings, or use another --out"
        )
    added: dict[str, Any] = {}
    for key in GROWABLE:
        extra = [v for v in new[key] if v not in previous.get(key, [])]
        if extra:
            added[key] = extra
    more = {n: c for n, c in new_samples.items() if c > old_samples.get(n, 0)}
    if more:
        added["samples_by_length"] = more
    return added


def beyond_context_lengths(config: RunConfig, max_positions: int | None) -> list[int]:
    """Lengths whose latency pass reaches past the model's trained positions."""
    if not max_positions:
        return []
    return [n for n in config.lengths if config.latency_positions(n) > max_positions]


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


def check_start(config: RunConfig, out: Path | None = None, *, resume: bool = False, force: bool = False) -> RunStart:
    """Every check of a run that needs no weights, in the order a run makes them; a dry run makes the same.

    Raises the run's own errors (ConfigError, ResultsError, ModelError, CorpusError): nothing is written.
    """
    config = merge_repeated_values(config)
    policies = prepare(config)
    run_id = new_run_id(config)
    folder = RunFolder(out if out is not None else DEFAULT_RUNS_DIR / run_id)
    folder.check(resume=resume, force=force)
    previous = folder.read_run_json() if resume else {}
    if previous:
        check_protocol(previous)
    additions = resume_additions(previous["config"], config) if previous.get("config") else {}
    done = folder.finished() if resume else set()
    grid = plan(config, policies)  # the tokenizer and the corpus: passages are drawn before the weights load
    if config.ray in (None, "local") and (warning := oversubscription(config.threads, os.cpu_count())):
        print(f"kvcompare: warning: {warning}", file=sys.stderr)
    return RunStart(grid, previous.get("run_id") or run_id, folder, previous, additions, done)


def run(
    config: RunConfig, out: Path | None = None, *, resume: bool = False, force: bool = False, progress: bool = True
) -> Path:
    """Measure every cell of the grid into ``out`` (default ``reports/runs/<run id>``); return the folder.

    Everything that can be checked without the weights is checked first (:func:`check_start`), and nothing is
    written until the first cell is about to be measured. With ``config.ray`` set, passages are measured by Ray
    actors (kvcompare.distributed); the folder, its rows and ``--resume`` are the same.
    """
    begun = check_start(config, out, resume=resume, force=force)
    grid, folder, previous, done = begun.grid, begun.folder, begun.previous, begun.done
    resumes = list(previous.get("resumes", []))
    if previous:
        resumes.append({"at": _timestamp(), "added": begun.additions})
    meta: dict[str, Any] = {
        "run_id": begun.run_id,
        "protocol_version": PROTOCOL_VERSION,
        "command": " ".join(["kvcompare", *sys.argv[1:]])
        if Path(sys.argv[0]).name == "kvcompare"
        else " ".join(sys.argv),
        **grid.metadata(),
        "started_at": previous.get("started_at") or _timestamp(),
        "resumes": resumes,
        "finished_at": None,
    }
    if len(begun.todo) < len(grid.cells):
        print(
            f"resuming: {len(grid.cells) - len(begun.todo)} of {len(grid.cells)} cells already finished",
            file=sys.stderr,
        )
    if config.ray is not None:
        from kvcompare.distributed import measure_on_ray

        measure_on_ray(grid, done, folder, meta, session=len(resumes), progress=progress)
    else:
        _measure_here(grid, done, folder, meta, session=len(resumes), progress=progress)
    return folder.path


def _measure_here(
    grid: Plan, done: set[str], folder: RunFolder, meta: dict[str, Any], *, session: int, progress: bool
) -> None:
    """The serial run: load the model in this process and measure passage by passage."""
    config = grid.config
    loaded, executor = load_checked(config, grid.tokenizer)
    beyond = warn_beyond_context(config, loaded.info.get("max_position_embeddings"))
    meta.update(model_info=loaded.info, environment=environment(torch.device(config.device)))
    meta["beyond_context_lengths"] = beyond
    threads = config.threads or physical_cores()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:  # the caller's thread setting comes back whatever happens
        context = row_context(meta["run_id"], config, loaded, executor, threads)
        meta["speed"] = {
            "threads": threads,
            "cpu_count": os.cpu_count(),  # logical CPUs: a load average above it means another process competed
            "memory_bandwidth_bytes_s": context.bandwidth,
            "load_average_start": _load(),
        }
        todo = [cell for cell in grid.cells if cell.id not in done]
        if todo and config.repeats:  # a quality-only run times nothing
            _warm_up(executor, todo[0])
        folder.open(meta)
        try:
            _measure_all(grid, done, executor, folder, context, session=session, progress=progress)
            finish(folder, meta)
        finally:  # an interrupted run still records how loaded the machine was
            meta["speed"]["load_average_end"] = _load()
            folder.write_run_json(meta)
    finally:
        torch.set_num_threads(threads_before)


def load_checked(config: RunConfig, tokenizer: Any = None) -> tuple[LoadedModel, Executor]:
    """Load the run's model and check that kvcompare reproduces it (kvcompare.fidelity) before any cell; the
    probe's errors go to its info (run.json's model_info.fidelity). Raises UnsupportedModelError if not."""
    loaded = load_model(config.model, config.device, config.dtype, tokenizer=tokenizer)
    executor = Executor(loaded.model)
    loaded.info["fidelity"] = check_fidelity(executor, shift="shift" in config.positions).as_dict()
    return loaded, executor


def warn_beyond_context(config: RunConfig, max_positions: int | None) -> list[int]:
    """The lengths whose latency pass goes past the model's trained positions, with a warning if any."""
    beyond = beyond_context_lengths(config, max_positions)
    if beyond:
        print(
            f"kvcompare: warning: lengths {beyond} (plus {config.warmup + config.gen} decoded tokens) go beyond "
            f"{config.model}'s {max_positions} trained positions; the full cache is then outside what the model "
            "was trained for. Measured anyway and marked beyond_context in every row.",
            file=sys.stderr,
        )
    return beyond


def row_context(run_id: str, config: RunConfig, loaded: LoadedModel, executor: Executor, threads: int) -> RowContext:
    """What this process's rows share: the model's limits, the threads, the weights and the measured bandwidth."""
    max_positions = loaded.info.get("max_position_embeddings")
    return RowContext(
        run_id,
        max_positions,
        frozenset(beyond_context_lengths(config, max_positions)),
        threads,
        weight_bytes(loaded.model),
        memory_bandwidth(executor.device),
        executor.layout,
        socket.gethostname(),
        device_name(executor.device),
        json.dumps((loaded.info.get("fidelity") or {}).get("layer_kinds") or None),
    )


def finish(folder: RunFolder, meta: dict[str, Any]) -> None:
    """Record the run's noise floor and end time once every passage is measured."""
    meta["speed"]["noise_floor"] = measured_noise_floor(folder.path)
    meta["finished_at"] = _timestamp()


def measured_noise_floor(path: Path) -> dict[str, Any]:
    """The run's noise floor in % per speed metric (the A/A control; see kvcompare.report.data.noise_floor)."""
    from kvcompare.report.data import NOISE_CHANGES, load_run, noise_floor, what_was_measured

    data = load_run(path)
    floor = noise_floor(data.cells, data.timings, what_was_measured(data).no_speed)
    return {
        "pct": {change.title: floor.floor(change) for change in NOISE_CHANGES},
        "pairs": floor.pairs,
        "reason": floor.reason,
    }


def physical_cores() -> int:
    """The default --threads: one per physical core (hyper-threads share a core's arithmetic units)."""
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def _load() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, where the platform has them."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


@dataclasses.dataclass(frozen=True)
class RowContext:
    """What every row of this run shares beyond the cell's own identity."""

    run_id: str
    max_positions: int | None
    beyond_context: frozenset[int]  # lengths whose latency pass goes past max_positions (beyond_context_lengths)
    threads: int
    weight_bytes: int
    bandwidth: float
    layout: CacheLayout
    host: str  # the machine that measured the rows
    device_name: str  # the device that measured them (e.g. the GPU's name)
    layer_kinds: str = "null"  # JSON: each layer's attention and RoPE, as the fidelity probe found them


def _measure_all(
    grid: Plan,
    done: set[str],
    executor: Executor,
    folder: RunFolder,
    context: RowContext,
    *,
    session: int,
    progress: bool,
) -> None:
    """Measure passage by passage; write a passage's timings, then its cells, the moment it is done."""
    groups = passage_groups(grid, done)

    def tick(label: str, passes: int) -> None:
        bar.set_postfix_str(label, refresh=not passes)
        if passes:
            bar.update(passes)

    failures = 0
    with passes_bar(count_passes(groups, grid.config), progress, folder) as bar:
        for cells, todo in groups:
            results = measure_group(executor, cells, todo, done, context, session, grid.config.quality_batch, tick)
            failures += write_results(folder, results)
    report_failures(failures)


@contextlib.contextmanager
def passes_bar(total: int, progress: bool, folder: RunFolder) -> Iterator[Any]:
    """The run's progress bar over its passes; an interrupt closes it and says what is kept."""
    bar = tqdm(total=total, desc="passes", unit="pass", disable=not progress, file=sys.stderr)
    try:
        yield bar
    except KeyboardInterrupt:
        bar.close()
        print(f"\ninterrupted: {KEPT_ON_INTERRUPT.format(path=folder.path)}", file=sys.stderr)
        raise
    bar.close()


#: What an interrupted run says (a serial one, or one on Ray).
KEPT_ON_INTERRUPT = (
    "finished passages are kept in {path} (the ones in progress are measured again); add --resume to continue"
)


def passage_groups(grid: Plan, done: set[str]) -> list[tuple[list[Cell], list[Cell]]]:
    """Each passage's cells with those still to measure, in the plan's order; finished passages are left out."""
    groups = [list(cells) for _, cells in itertools.groupby(grid.cells, key=lambda cell: cell.passage)]
    return [(cells, todo) for cells in groups if (todo := [c for c in cells if c.id not in done])]


def count_passes(groups: list[tuple[list[Cell], list[Cell]]], config: RunConfig) -> int:
    """Every pass the run will make: a passkey cell's one pass; a passage's quality passes, then in each round
    every scheduled trial (controls included) and the one-pass prefill of each `full` cell."""
    total = 0
    for cells, todo in groups:
        if todo[0].probe is not None:
            total += len(todo)
            continue
        baselines = [c for c in cells if not c.policy.bounded and c not in todo]
        total += len(todo) + config.repeats * sum(trial_passes(t) for t in schedule(todo, baselines))
    return total


def report_failures(failures: int) -> None:
    if failures:
        print(f"{failures} cell(s) failed; their errors are in the results (status = 'failed')", file=sys.stderr)


@dataclasses.dataclass
class PassageResults:
    """What measuring one passage (or one passkey prompt) gives, to be written to the run folder together."""

    timings_name: str | None  # the timings file's name (None: a passkey prompt, which is not timed)
    timings: list[dict[str, Any]]
    cells: list[tuple[dict[str, Any], list[dict[str, Any]]]]  # each cell's row and curve


def measure_group(
    executor: Executor,
    cells: list[Cell],
    todo: list[Cell],
    done: set[str],
    context: RowContext,
    session: int,
    quality_batch: int | None,
    tick: Callable[[str, int], None],
) -> PassageResults:
    """Measure the ``todo`` cells of one passage (``cells`` are all of its cells, ``done`` those finished)."""
    if todo[0].probe is not None:
        records = measure_probes(executor, todo, tick)
        return PassageResults(None, [], [result_row(record, context) for record in records])
    baselines = [c for c in cells if not c.policy.bounded and c.id in done]
    records, timings = measure_passage(
        executor,
        todo,
        baselines,
        run_id=context.run_id,
        session=session,
        quality_batch=quality_batch,
        tick=tick,
    )
    rows = [result_row(record, context) for record in records]
    return PassageResults(f"{passage_key(todo[0])}-s{session}", timings, rows)


def write_results(folder: RunFolder, results: PassageResults) -> int:
    """Write a passage's timings, then its cells; return how many of its cells failed."""
    if results.timings_name is not None and results.timings:  # a quality-only run times nothing
        folder.write_timings(results.timings_name, results.timings)
    for row, curve in results.cells:
        folder.write_cell(row, curve)
    return sum(row["status"] != "ok" for row, _ in results.cells)


def passage_key(cell: Cell) -> str:
    """A short stable name of a cell's passage, for the timings file of that passage."""
    passage = cell.passage
    return cell_id({"source": passage.source, "token_offset": passage.token_offset, "seq_len": len(passage.tokens)})


def result_row(record: CellRecord, context: RowContext) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A cell's result row and its perplexity curve, from what its passage's measurement gathered."""
    cell = record.cell
    seq_len = len(cell.passage.tokens)
    row: dict[str, Any] = {
        "run_id": context.run_id,
        "cell_id": cell.id,
        **cell.fields,
        "threads": context.threads,
        "max_positions": context.max_positions,
        "beyond_context": seq_len in context.beyond_context,
        "wall_s": record.wall_s,
        "host": context.host,
        "device_name": context.device_name,
        "layer_kinds": None if context.layer_kinds == "null" else context.layer_kinds,
        "finished_at": _timestamp(),
    }
    kv_bytes = kv_read_bytes(context.layout, cell.cache, seq_len)
    budgets = compressed_layer_budgets(cell.cache, context.layout.num_layers) if cell.policy.bounded else []
    row.update(
        layer_budgets=json.dumps(budgets) if budgets else None,
        kv_read_bytes=kv_bytes,
        weight_bytes=context.weight_bytes,
        tpot_floor_s=tpot_floor(context.weight_bytes, kv_bytes, context.bandwidth),
    )
    if record.retrieval is not None:
        probe, retrieval = cell.probe, record.retrieval
        assert probe is not None
        row.update(
            needle_start=probe.needle_start,
            passkey_correct=retrieval.correct,
            passkey_matched=retrieval.matched,
            passkey_tokens=len(probe.answer),
            passkey_logprob=retrieval.logprob,
            status="ok",
        )
        return row, []
    if record.error is not None or record.quality is None:
        row.update(status="failed", error=record.error or "no quality pass", traceback=record.traceback)
        return row, []
    quality = record.quality
    row.update(
        quality_fields(quality.nll, quality.correct),
        **latency_fields(record.trials, record.oneshot_ttft),
        peak_kv_bytes=max([quality.peak_kv_bytes, *(t.peak_kv_bytes for t in record.trials)]),
        peak_mem_bytes=max(  # a batched quality pass's memory is no one cell's: only single passes count
            [t.peak_mem_bytes for t in record.trials]
            + ([] if quality.peak_mem_bytes is None else [quality.peak_mem_bytes]),
            default=None,
        ),
        quality_s=quality.wall_s,
        quality_batch=quality.batch,
        status="ok",
    )
    curve = position_buckets(quality.nll, cell.context.bucket)
    for point in curve:
        point.update({k: row[k] for k in CURVE_CELL_COLUMNS})
    return row, curve


#: The warm-up prefills at most this many tokens: enough to touch the shapes and memory a cell uses.
WARM_UP_TOKENS = 4096


def _warm_up(executor: Executor, cell: Cell) -> None:
    """One untimed latency pass of the full cache on the first cell's passage (up to WARM_UP_TOKENS).

    It runs what the first timed cell runs (the same chunk shapes, a cache of the same size, the same number
    of decode steps), so that cell does not pay for first-call allocation and first-touch page faults.
    """
    tokens = torch.tensor(cell.passage.tokens[:WARM_UP_TOKENS], dtype=torch.long)
    full = dataclasses.replace(cell.cache, limit=None)
    latency = cell.context.latency
    executor.generate(
        tokens, cell.policy, full, gen=latency.gen, warmup=latency.warmup, prefill_chunk=latency.prefill_chunk
    )
