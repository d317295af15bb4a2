"""Measuring passages on a loaded model: what the serial and the Ray backends share (kvcompare.run.backends,
kvcompare.run.distributed). A passage's cells are measured together (kvcompare.run.schedule) and turned into result
rows."""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import logging
import socket
from collections.abc import Callable
from typing import Any

import torch

from kvcompare.config import RunConfig
from kvcompare.engine.budgets import compressed_layer_budgets
from kvcompare.engine.executor import Executor
from kvcompare.engine.fidelity import check_fidelity
from kvcompare.engine.physics import kv_read_bytes, memory_bandwidth, tpot_floor, weight_bytes
from kvcompare.engine.storage import CacheLayout
from kvcompare.environment import device_name
from kvcompare.models import LoadedModel, load_model
from kvcompare.run.figures import latency_fields, position_buckets, quality_fields
from kvcompare.run.plan import Cell, Plan
from kvcompare.run.results import cell_id
from kvcompare.run.schedule import CellRecord, measure_passage, measure_probes, schedule, trial_passes
from kvcompare.schema import CURVE_CELL_COLUMNS

log = logging.getLogger(__name__)

#: One passage's cells: all of them, and those still to measure.
Group = tuple[list[Cell], list[Cell]]


def now_iso() -> str:
    """The current UTC time, to the second, as run.json and the rows record times."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def load_checked(config: RunConfig, tokenizer: Any = None) -> tuple[LoadedModel, Executor]:
    """Load the run's model and check that kvcompare reproduces it (kvcompare.engine.fidelity) before any cell; the
    probe's errors go to its info (run.json's model_info.fidelity). Raises UnsupportedModelError if not. With
    ``config.compile`` the executor's decode steps are compiled from then on (see Executor.compile_decode_steps)."""
    loaded = load_model(config.model, config.device, config.dtype, tokenizer=tokenizer)
    executor = Executor(loaded.model)
    loaded.info["fidelity"] = check_fidelity(executor, shift="shift" in config.positions).as_dict()
    if config.compile:
        executor.compile_decode_steps()
    return loaded, executor


def beyond_context_lengths(config: RunConfig, max_positions: int | None) -> list[int]:
    """Lengths whose latency pass reaches past the model's trained positions."""
    if not max_positions:
        return []
    return [n for n in config.lengths if config.latency_positions(n) > max_positions]


def warn_beyond_context(config: RunConfig, max_positions: int | None) -> list[int]:
    """The lengths whose latency pass goes past the model's trained positions, with a warning if any."""
    beyond = beyond_context_lengths(config, max_positions)
    if beyond:
        log.warning(
            f"lengths {beyond} (plus {config.warmup + config.gen} decoded tokens) go beyond "
            f"{config.model}'s {max_positions} trained positions; the full cache is then outside what the model "
            "was trained for. Measured anyway and marked beyond_context in every row."
        )
    return beyond


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
    tokenizer: Any = None  # decodes a generate task's output


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
        loaded.tokenizer,
    )


def passage_groups(grid: Plan, done: set[str]) -> list[Group]:
    """Each passage's cells with those still to measure, in the plan's order; finished passages are left out."""
    groups = [list(cells) for _, cells in itertools.groupby(grid.cells, key=lambda cell: cell.passage)]
    return [(cells, todo) for cells in groups if (todo := [c for c in cells if c.id not in done])]


def count_passes(groups: list[Group], config: RunConfig) -> int:
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


@dataclasses.dataclass
class PassageResults:
    """What measuring one passage (or one passkey prompt) gives, to be written to the run folder together."""

    timings_name: str | None  # the timings file's name (None: a passkey prompt, which is not timed)
    timings: list[dict[str, Any]]
    cells: list[tuple[dict[str, Any], list[dict[str, Any]]]]  # each cell's row and curve
    warm_up_compile_s: float = 0.0  # seconds the untimed warm-up before this passage spent compiling (--compile)


def measure_group(
    executor: Executor,
    cells: list[Cell],
    todo: list[Cell],
    done: set[str],
    context: RowContext,
    session: int,
    quality_batch: int | None,
    tick: Callable[[str, int], None],
    *,
    warm: bool = False,
) -> PassageResults:
    """Measure the ``todo`` cells of one passage (``cells`` are all of its cells, ``done`` those finished); with
    ``warm``, run the untimed :func:`warm_up` first (the first timed cell must not pay for first calls) and record
    the seconds it spent compiling in ``warm_up_compile_s``."""
    if warm:
        compiling = warm_up(executor, todo[0])
        results = measure_group(executor, cells, todo, done, context, session, quality_batch, tick)
        return dataclasses.replace(results, warm_up_compile_s=compiling)
    if todo[0].probe is not None:
        records = measure_probes(executor, todo, tick, context.tokenizer)
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
    rows = [result_row(record, context, executor.compile_status.reason) for record in records]
    return PassageResults(f"{passage_key(todo[0])}-s{session}", timings, rows)


def passage_key(cell: Cell) -> str:
    """A short stable name of a cell's passage, for the timings file of that passage."""
    passage = cell.passage
    return cell_id({"source": passage.source, "token_offset": passage.token_offset, "seq_len": len(passage.tokens)})


def result_row(
    record: CellRecord, context: RowContext, compile_fallback: str | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A cell's result row and its perplexity curve, from what its passage's measurement gathered;
    ``compile_fallback`` is why compiled decode steps were turned off, if they were (recorded in a cell that asked
    for them and ran eagerly)."""
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
        "finished_at": now_iso(),
    }
    kv_bytes = kv_read_bytes(context.layout, cell.cache, len(cell.prompt))
    budgets = compressed_layer_budgets(cell.cache, context.layout.num_layers) if cell.policy.bounded else []
    row.update(
        layer_budgets=json.dumps(budgets) if budgets else None,
        kv_read_bytes=kv_bytes,
        weight_bytes=context.weight_bytes,
        tpot_floor_s=tpot_floor(context.weight_bytes, kv_bytes, context.bandwidth),
    )
    if record.outcome is not None and record.score is not None:
        probe, outcome = cell.probe, record.outcome
        assert probe is not None
        row.update(
            correct=record.score.correct,
            score=record.score.score,
            answer_matched=outcome.matched,
            answer_tokens=len(probe.answer) if probe.answer else None,
            answer_logprob=outcome.logprob,
            generated=outcome.text,
            status="ok",
        )
        return row, []
    if record.error is not None or record.quality is None:
        row.update(status="failed", error=record.error or "no quality pass", traceback=record.traceback)
        return row, []
    quality = record.quality
    scored = slice(cell.context_tokens or 0, None)  # the prefill setting scores the tokens after its context
    row.update(
        quality_fields(quality.nll[scored], quality.correct[scored]),
        **latency_fields(record.trials, record.oneshot_ttft),
        peak_kv_bytes=max([quality.peak_kv_bytes, *(t.peak_kv_bytes for t in record.trials)]),
        kv_bytes_compressed=max(
            (t.kv_bytes_compressed for t in record.trials if t.kv_bytes_compressed is not None), default=None
        ),
        peak_mem_bytes=max(  # a batched quality pass's memory is no one cell's: only single passes count
            [t.peak_mem_bytes for t in record.trials]
            + ([] if quality.peak_mem_bytes is None else [quality.peak_mem_bytes]),
            default=None,
        ),
        quality_s=quality.wall_s,
        quality_batch=quality.batch,
        status="ok",
    )
    if cell.context.latency.compile and row.get("compiled") is False:
        row["compile_fallback"] = compile_fallback or "the cell's caches were built after compiled steps turned off"
    curve = position_buckets(quality.nll, cell.context.bucket)
    for point in curve:
        point.update({k: row[k] for k in CURVE_CELL_COLUMNS})
    return row, curve


#: The warm-up prefills at most this many tokens: enough to touch the shapes and memory a cell uses.
WARM_UP_TOKENS = 4096


def warm_up(executor: Executor, cell: Cell) -> float:
    """One untimed latency pass of the full cache on the first cell's prompt (the passage, or in the prefill
    setting its context; up to WARM_UP_TOKENS); returns the seconds it spent compiling (0.0 without --compile).

    It runs what the first timed cell's `full` runs (the same chunk shapes, a cache of the same size, the same
    number of decode steps), so that cell does not pay for first-call allocation and first-touch page faults,
    and with --compile the shape of that `full` cache compiles here (a prompt over WARM_UP_TOKENS excepted).
    """
    tokens = torch.tensor(cell.prompt[:WARM_UP_TOKENS], dtype=torch.long)
    full = dataclasses.replace(cell.cache, limit=None)
    latency = cell.context.latency
    return executor.generate(
        tokens, cell.policy, full, gen=latency.gen, warmup=latency.warmup, prefill_chunk=latency.prefill_chunk
    ).compile_s
