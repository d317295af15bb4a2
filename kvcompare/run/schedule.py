"""One passage's measurements: a quality pass per cell, then latency trials in interleaved rounds.

Round r runs trial r of every cell of the passage, `full` included, before round r + 1, and the order
rotates between rounds, so a slow spell of the machine touches every policy alike. Each round also times
the `full` baseline a second time (the A/A control: the same configuration twice, whose difference is the
run's noise floor) and, for `full`, the prompt prefilled in one pass (`ttft_oneshot`). When a resumed run
adds cells to a passage whose `full` cell is already finished, `full` is timed again in each round as a
"baseline" trial, so that every change is paired within one session and round.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kvcompare.engine.executor import Executor, LatencyResult, QualityResult
from kvcompare.engine.memory import free_memory
from kvcompare.engine.requests import answer, generate
from kvcompare.failure import failure_of, report_failure
from kvcompare.run.figures import round_order, timing_rows
from kvcompare.run.plan import Cell
from kvcompare.run.quality_batch import MEMORY_SHARE, quality_batches
from kvcompare.task import Outcome, Score, checked_score

log = logging.getLogger(__name__)

#: A one-pass prefill of the `full` baseline goes in chunks of at most this many tokens (memory).
ONESHOT_CHUNK = 8192


@dataclasses.dataclass
class CellRecord:
    """What one cell gathered in its passage: its quality pass, its trials, or the error that stopped it."""

    cell: Cell
    quality: QualityResult | None = None
    trials: list[LatencyResult] = dataclasses.field(default_factory=list)
    oneshot_ttft: list[float] = dataclasses.field(default_factory=list)
    outcome: Outcome | None = None  # a probe cell's one pass
    score: Score | None = None  # its task's score of it
    error: str | None = None
    traceback: str | None = None  # the error's whole traceback
    wall_s: float = 0.0  # its own passes only: cells of a passage interleave


@dataclasses.dataclass(frozen=True)
class ScheduledTrial:
    """One latency trial of a round: a cell's own, the baseline's, or the A/A control's."""

    cell: Cell
    role: str  # "cell", "aa_control" or "baseline" (see kvcompare.schema.TIMINGS_SCHEMA)


def schedule(todo: list[Cell], finished_baselines: list[Cell]) -> list[ScheduledTrial]:
    """The trials of one round, before rotation: each cell to measure, and `full` again as the A/A control.

    ``finished_baselines`` are `full` cells of this passage measured in an earlier session; they are timed
    again (role "baseline") wherever a cell of their position mode and compression setting is measured now.
    """
    trials = [ScheduledTrial(cell, "cell") for cell in todo]
    modes = {(cell.cache.positions, cell.cache.compression) for cell in todo}
    for baseline in finished_baselines:
        if (baseline.cache.positions, baseline.cache.compression) in modes:
            trials.append(ScheduledTrial(baseline, "baseline"))
    full = [cell for cell in todo if not cell.policy.bounded] + [t.cell for t in trials if t.role == "baseline"]
    trials += [ScheduledTrial(cell, "aa_control") for cell in full]
    return trials


def _tokens(cell: Cell) -> torch.Tensor:
    return torch.tensor(cell.passage.tokens, dtype=torch.long)


def _prompt(cell: Cell) -> torch.Tensor:
    """What the cell's latency pass prefills (in the prefill setting, the context alone)."""
    return torch.tensor(cell.prompt, dtype=torch.long)


def measure_passage(
    executor: Executor,
    todo: list[Cell],
    finished_baselines: list[Cell],
    *,
    run_id: str,
    session: int,
    quality_batch: int | None = None,
    tick: Callable[[str, int], None] = lambda label, passes: None,
) -> tuple[list[CellRecord], list[dict[str, Any]]]:
    """Measure the ``todo`` cells of one passage; return their records and every trial's raw timing rows.

    Quality passes run in batches of up to ``quality_batch`` cells (None: as many as fit in memory; see
    :func:`measure_quality`); latency trials always run one sequence at a time. A cell whose quality pass or
    trial raises is recorded with its error and leaves the later rounds; the other cells go on.
    ``tick(label, passes)`` is called for a progress bar: with 0 as a pass starts, with the passes it made
    when it ends (every pass counts, controls included, as :func:`kvcompare.run.runner.count_passes` counts them).
    """
    records = {cell.id: CellRecord(cell) for cell in todo}
    measure_quality(executor, [records[cell.id] for cell in todo], quality_batch, tick)
    trials = schedule(todo, finished_baselines)
    rows: list[dict[str, Any]] = []
    repeats = todo[0].context.latency.repeats if todo else 0
    for round_index in range(repeats):
        for order, trial in enumerate(round_order(trials, round_index)):
            record = records.get(trial.cell.id)  # a finished baseline of an earlier session has none
            label = f"round {round_index + 1} {trial.role} {trial.cell.describe()}"
            if record is not None and record.error is not None:
                tick(f"{label} (skipped: the cell failed)", trial_passes(trial))
                continue  # the cell failed: its own trials and its controls stop
            owner = record if trial.role == "cell" else None  # the record this trial's figures belong to
            tick(label, 0)
            keys: dict[str, Any] = {
                "run_id": run_id,
                "cell_id": trial.cell.id,
                "role": trial.role,
                "session": session,
                "round": round_index,
                "order": order,
                "seq_len": len(trial.cell.passage.tokens),
                "sample_id": trial.cell.passage.sample_id,
                "positions": trial.cell.cache.positions,
                "compression": trial.cell.cache.compression,
            }
            started = time.perf_counter()
            try:
                timed = _trial(executor, trial.cell)
                rows += timing_rows(timed, **keys)
                if owner is not None:
                    owner.trials.append(timed)
                    if not trial.cell.policy.bounded:
                        oneshot = _trial(executor, trial.cell, oneshot=True)
                        owner.oneshot_ttft.append(oneshot.ttft_s)
                        rows += timing_rows(oneshot, kind="ttft_oneshot", **keys)
            except Exception as err:  # one failing policy (its memory included) must not lose the other cells
                if owner is not None:
                    _fail(owner, err)
                else:  # a control trial: its pairs are missing, no cell is lost
                    log.warning(f"{trial.role} trial of {trial.cell.describe()} failed: {err}")
            if owner is not None:
                owner.wall_s += time.perf_counter() - started
            tick(label, trial_passes(trial))
    return list(records.values()), rows


def trial_passes(trial: ScheduledTrial) -> int:
    """The passes one scheduled trial makes: a latency pass, and for a `full` cell the one-pass prefill too."""
    return 2 if trial.role == "cell" and not trial.cell.policy.bounded else 1


def measure_quality(
    executor: Executor, records: list[CellRecord], most: int | None, tick: Callable[[str, int], None]
) -> None:
    """The quality passes of one passage's cells, as batch rows: up to ``most`` cells per batch (None: as many
    as fit in MEMORY_SHARE of the free memory). Each record gets its own result, or its policy's error.

    A batch that fails as a whole (out of memory, or an error outside a policy) is run again one cell at a
    time, so one cell's failure never costs another cell its pass.
    """
    unsized = [record for record in records if not _sized(record)]
    for record in unsized:
        tick(f"quality {record.cell.describe()} (failed)", 1)
    records = [record for record in records if record not in unsized]
    for record in [record for record in records if record.cell.context_tokens is not None]:
        _quality_alone(executor, record, tick)  # the prefill setting compresses mid-pass: never batched
    records = [record for record in records if record.cell.context_tokens is None]
    if not records:
        return
    tokens = _tokens(records[0].cell)
    cells = [(record.cell.policy, record.cell.cache) for record in records]
    budget = int(MEMORY_SHARE * free_memory(executor.device))
    vocab = executor.vocab
    for batch in quality_batches(cells, executor.layout, length=len(tokens), vocab=vocab, budget=budget, most=most):
        members = [records[index] for index in batch]
        tick(f"quality {_batch_label(members)}", 0)
        started = time.perf_counter()
        try:
            results = executor.score_batch(tokens, [cells[index] for index in batch])
        except Exception as err:  # a single cell's pass returns its errors: this is a batch's
            log.warning(f"batched quality pass failed ({err}); running its {len(batch)} cells one by one")
            results = [executor.score_batch(tokens, [cells[index]])[0] for index in batch]
        share = (time.perf_counter() - started) / len(batch)
        for record, result in zip(members, results, strict=True):
            if isinstance(result, Exception):
                _fail(record, result)
                record.wall_s += share
            else:
                record.quality = result
                record.wall_s += result.wall_s
            tick(f"quality {record.cell.describe()}", 1)


def _quality_alone(executor: Executor, record: CellRecord, tick: Callable[[str, int], None]) -> None:
    """The quality pass of a prefill-setting cell, on its own: its context prefilled and compressed once, the rest
    of the passage scored on the compressed cache."""
    tick(f"quality {record.cell.describe()}", 0)
    started = time.perf_counter()
    (result,) = executor.score_batch(
        _tokens(record.cell), [(record.cell.policy, record.cell.cache)], record.cell.context_tokens
    )
    if isinstance(result, Exception):
        _fail(record, result)
        record.wall_s += time.perf_counter() - started
    else:
        record.quality = result
        record.wall_s += result.wall_s
    tick(f"quality {record.cell.describe()}", 1)


def _sized(record: CellRecord) -> bool:
    """Whether a cell's batch row can be sized: asks its policy what it reads, and fails the cell if that raises."""
    try:
        record.cell.policy.needs()
    except Exception as err:  # a policy's bug costs its own cell only
        _fail(record, err)
        return False
    return True


def _batch_label(records: list[CellRecord]) -> str:
    first = records[0].cell.describe()
    return first if len(records) == 1 else f"{len(records)} cells as one batch, from {first}"


def _trial(executor: Executor, cell: Cell, oneshot: bool = False) -> LatencyResult:
    """One latency trial of ``cell``; ``oneshot``: prefill in one pass and stop at the first token."""
    latency = cell.context.latency
    if oneshot:
        tokens = _prompt(cell)
        chunk = min(len(tokens), ONESHOT_CHUNK)
        return executor.generate(tokens, cell.policy, cell.cache, gen=0, warmup=0, prefill_chunk=chunk)
    return executor.generate(
        _prompt(cell),
        cell.policy,
        cell.cache,
        gen=latency.gen,
        warmup=latency.warmup,
        prefill_chunk=latency.prefill_chunk,
    )


def measure_probes(
    executor: Executor, cells: list[Cell], tick: Callable[[str, int], None], tokenizer: Any = None
) -> list[CellRecord]:
    """A probe's cells: one pass each, as its task's request kind says (``answer``: prefill under the policy,
    then the expected answer's tokens; ``generate``: prefill, then greedy decoding, the text decoded with
    ``tokenizer``), scored by the task.

    Probes are not timed for speed (the ppl task's latency trials are), so no rounds are needed.
    """
    records = []
    for cell in cells:
        record = CellRecord(cell)
        task, probe = cell.probe_task, cell.probe
        assert task is not None and probe is not None
        tick(cell.describe(), 0)
        try:
            chunk = cell.context.latency.prefill_chunk or cell.cache.stride
            split = cell.context_tokens
            if task.request == "answer":
                answered = answer(executor, probe.tokens, probe.answer, cell.policy, cell.cache, chunk, split)
                record.outcome = Outcome(matched=answered.matched, logprob=answered.logprob)
                record.wall_s = answered.wall_s
            else:
                decode = _decoder(tokenizer)
                generated = generate(
                    executor,
                    probe.tokens,
                    cell.policy,
                    cell.cache,
                    chunk,
                    probe.max_new_tokens,
                    done=_stops(decode, probe.stop),
                    eos=getattr(tokenizer, "eos_token_id", None),
                    context=split,
                )
                record.outcome = Outcome(text=decode(generated.tokens), tokens=generated.tokens)
                record.wall_s = generated.wall_s
            record.score = checked_score(task, probe, record.outcome)
        except Exception as err:  # one failing policy (its memory included) must not lose the other cells
            _fail(record, err)
        tick(cell.describe(), 1)
        records.append(record)
    return records


def _stops(decode: Callable[[Sequence[int]], str], stops: tuple[str, ...]) -> Callable[[Sequence[int]], bool]:
    return lambda tokens: any(stop in decode(tokens) for stop in stops)


def _decoder(tokenizer: Any) -> Callable[[Sequence[int]], str]:
    if tokenizer is None:
        raise RuntimeError("a generate task needs the model's tokenizer to decode its output")
    return lambda tokens: str(tokenizer.decode(list(tokens), skip_special_tokens=True))


def _fail(record: CellRecord, err: Exception) -> None:
    """Record ``err`` as the cell's failure (the error and its whole traceback) and show the policy's frames."""
    failure = failure_of(err, type(record.cell.policy))
    record.error, record.traceback = failure.error, failure.traceback
    report_failure(record.cell.policy.who(), failure)
