"""`kvcompare run --dry-run`: the plan (cells, passages) and how long it takes per device, before starting it.

The time comes from a short calibration on this machine's device (a few forward passes of the run's model):
a chunk's time grows linearly with the tokens it attends, ``chunk tokens x (per_token + per_token_context x
context)``, and so does a decode step's, ``step + step_context x context``. Every pass of the plan is then
summed with the cache it holds (the limit, or the whole passage for `full`). It is an estimate: quality passes
are counted one by one (batching makes them faster), eviction and signals are not counted, and a busy
machine is slower.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from kvcompare.config import RunConfig
from kvcompare.engine.executor import Executor
from kvcompare.engine.timing import now
from kvcompare.environment import physical_cores
from kvcompare.run.passages import load_checked, passage_groups
from kvcompare.run.plan import Cell
from kvcompare.run.runner import check_start
from kvcompare.run.schedule import ONESHOT_CHUNK, schedule

#: Tokens of context at which the calibration times its second chunk and decode step.
CALIBRATION_CONTEXT = 1024


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Seconds per token of a chunk, and per decode step, each as a constant plus a slope in the context."""

    per_token: float
    per_token_context: float
    step: float
    step_context: float

    def chunks(self, length: int, chunk: int, held: int | None) -> float:
        """Feeding ``length`` tokens in chunks of ``chunk``, the cache holding at most ``held`` (None: all)."""
        total = 0.0
        for start in range(0, length, chunk):
            size = min(chunk, length - start)
            context = start if held is None else min(start, held - size)
            total += size * (self.per_token + self.per_token_context * (context + size / 2))
        return total

    def steps(self, count: int, context: int) -> float:
        """Seconds for ``count`` forward steps at ``context`` tokens of context."""
        return count * (self.step + self.step_context * context)


def calibrate(executor: Executor, stride: int, vocab: int, context: int = CALIBRATION_CONTEXT) -> Calibration:
    """Time a ``stride`` chunk and a decode step with an empty cache and with ``context`` tokens held."""
    from kvcompare.config import CacheConfig
    from kvcompare.core import full_cache

    full = full_cache()
    config = CacheConfig(None, stride)
    ids = torch.randint(0, vocab, (1, context + stride + 4), generator=torch.Generator().manual_seed(0))
    ids = ids.to(executor.device)

    def timed(cache: Any, chunk: torch.Tensor) -> float:
        start = now(executor.device)
        executor.forward(cache, chunk)
        return now(executor.device) - start

    with executor.attached(), torch.inference_mode():
        near, far, step_near, step_far = [], [], [], []
        for _ in range(3):
            cache = executor.new_cache(full, config, capacity=ids.shape[1])
            near.append(timed(cache, ids[:, :stride]) / stride)
            step_near.append(timed(cache, ids[:, stride : stride + 1]))
            cache = executor.new_cache(full, config, capacity=ids.shape[1])
            executor.prefill(cache, ids[:, :context], context)
            far.append(timed(cache, ids[:, context : context + stride]) / stride)
            step_far.append(timed(cache, ids[:, -1:]))
    per_token, step = statistics.median(near), statistics.median(step_near)
    # the far chunk attends `context` more tokens than the near one, on average over its queries
    return Calibration(
        per_token,
        max(0.0, (statistics.median(far) - per_token) / context),
        step,
        max(0.0, (statistics.median(step_far) - step) / context),
    )


def passage_seconds(cells: list[Cell], calibration: Calibration, baselines: list[Cell] | None = None) -> float:
    """One passage's passes, as a serial run (or one Ray actor) measures them; ``baselines``: its `full` cells
    finished in an earlier session, timed again beside the cells (see kvcompare.run.schedule.schedule)."""
    first = cells[0]
    length = len(first.passage.tokens)
    latency = first.context.latency
    chunk = latency.prefill_chunk or first.cache.stride
    if first.probe is not None:  # a probe: one prefill, then its answer's tokens or up to its token budget
        steps = max(len(first.probe.answer), first.probe.max_new_tokens)
        return sum(calibration.chunks(length, chunk, c.cache.limit) + calibration.steps(steps, length) for c in cells)

    def trial(cell: Cell) -> float:
        held = cell.cache.limit
        context = length if held is None else min(length, held)
        return calibration.chunks(length, chunk, held) + calibration.steps(latency.warmup + latency.gen, context)

    quality = sum(calibration.chunks(length - 1, c.cache.stride, c.cache.limit) for c in cells)
    trials = sum(trial(t.cell) for t in schedule(cells, baselines or []))
    oneshot = sum(calibration.chunks(length, min(length, ONESHOT_CHUNK), None) for c in cells if not c.policy.bounded)
    return quality + latency.repeats * (trials + oneshot)


def makespan(seconds: list[float], devices: int) -> float:
    """Wall time of passages spread over ``devices`` (longest first, each to the least loaded device)."""
    loads = [0.0] * max(1, devices)
    for value in sorted(seconds, reverse=True):
        loads[loads.index(min(loads))] += value
    return max(loads)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def dry_run(config: RunConfig, out: Path | None = None, *, resume: bool = False, force: bool = False) -> str:
    """The plan of ``config`` and its estimated time, as text; measures nothing and writes nothing.

    It makes every check the real run makes (:func:`kvcompare.run.runner.check_start`: the folder in ``out``, ``resume``
    and ``force`` included) and plans only what the real run would measure: a resumed run's unfinished cells.
    """
    begun = check_start(config, out, resume=resume, force=force)
    grid, todo = begun.grid, begun.todo
    where = f"results in {begun.folder.path}"
    if resume and begun.done:
        where = f"resuming {begun.folder.path}: {len(grid.cells) - len(todo)} of {len(grid.cells)} cells finished"
    if not todo:
        return f"plan: nothing to measure; {where}"
    # the model is checked as the run checks it; the calibration's decode steps run eagerly, never compiling
    _, executor = load_checked(dataclasses.replace(config, compile=False), grid.tokenizer)
    threads = config.threads or physical_cores()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        started = time.perf_counter()
        calibration = calibrate(executor, config.stride, executor.vocab)
        calibrated_s = time.perf_counter() - started
    finally:
        torch.set_num_threads(before)
    passages = passage_groups(grid, begun.done)
    groups = [todo for _, todo in passages]
    per_passage = [
        passage_seconds(todo, calibration, [c for c in cells if not c.policy.bounded and c.id in begun.done])
        for cells, todo in passages
    ]
    policies = grid.policies
    lines = [
        f"plan: {len(todo)} cells to measure in {len(groups)} passages or prompts ({where}); policies "
        f"{', '.join(p.label() for p in policies)}; "
        + (
            f"ratios {', '.join(f'{r:g}' for r in config.ratios)}"
            if config.ratios
            else f"limits {', '.join(map(str, config.cache_sizes))}"
        )
        + f"; positions {', '.join(config.positions)}; compression {', '.join(config.compression)}; "
        f"tasks {', '.join(config.tasks)}",
        "",
        "| task | length | passages | cells per passage | estimated time per passage |",
        "|---|---|---|---|---|",
    ]
    by_kind: dict[tuple[str, int], list[tuple[list[Cell], float]]] = {}
    for cells, seconds in zip(groups, per_passage, strict=True):
        by_kind.setdefault((cells[0].task, len(cells[0].passage.tokens)), []).append((cells, seconds))
    for (task, length), entries in by_kind.items():
        cells_each = sorted({len(cells) for cells, _ in entries})
        mean = statistics.mean(seconds for _, seconds in entries)
        lines.append(f"| {task} | {length} | {len(entries)} | {', '.join(map(str, cells_each))} | {_duration(mean)} |")
    total = sum(per_passage)
    device = f"{config.device} ({threads} threads)" if config.device == "cpu" else config.device
    lines += [
        "",
        f"calibration on this machine's {device}, {config.model} in {config.dtype} ({calibrated_s:.0f} s): "
        f"{1e3 * calibration.per_token:.2f} ms per token of a chunk at empty context "
        f"(+{1e6 * calibration.per_token_context:.3f} us per token held), decode step "
        f"{1e3 * calibration.step:.1f} ms (+{1e6 * calibration.step_context:.2f} us per token held)",
        f"estimated time on one such device: {_duration(total)}",
    ]
    for devices in sorted({2, 4, 8, config.workers or 1} - {1}):
        spread = _duration(makespan(per_passage, devices))
        lines.append(f"  on {devices} such devices (--ray, a passage per device at a time): {spread}")
    lines.append(
        "an estimate: quality passes counted one by one (batching makes them faster), eviction and signal "
        "collection not counted, and a busy machine is slower"
    )
    if config.compile:
        lines.append(
            "--compile: decode steps estimated as eager ones (compiled they are faster); compiling is not counted "
            "(on a CPU about one to two minutes for each new cache shape, in the first cells)"
        )
    return "\n".join(lines)
