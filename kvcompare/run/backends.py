"""Where passages are measured: the protocol the runner drives, and the serial backend (this process).

A backend loads the model (where it measures), says what run.json records of it, measures the passages it is
given and yields each one's results as it finishes, and frees what it holds. The runner alone owns the results
folder, the progress bar and the writing (kvcompare.run.runner); the Ray backend is kvcompare.run.distributed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch

from kvcompare.environment import environment, load_average, physical_cores
from kvcompare.run.passages import (
    Group,
    PassageResults,
    load_checked,
    measure_group,
    row_context,
    warn_beyond_context,
)
from kvcompare.run.plan import Plan

#: ``tick(label, passes)``: a pass starts (0) or ends with the passes it made (see kvcompare.run.schedule).
Tick = Callable[[str, int], None]


class Backend(Protocol):
    """What the runner needs of a way to measure passages."""

    def describe(self) -> dict[str, Any]:
        """run.json's entries about the measuring side: ``model_info``, ``environment``,
        ``beyond_context_lengths`` and ``speed`` (threads, CPUs, bandwidth, load average at the start)."""
        ...

    def measure(self, groups: list[Group], done: set[str], session: int, tick: Tick) -> Iterator[PassageResults]:
        """Measure each passage of ``groups`` (its cells, and those still to measure; ``done``: the ids of the
        finished ones); yield each passage's results as it finishes, in any order."""
        ...

    def close(self) -> None:
        """Free what the backend holds (threads setting, actors, a cluster it started)."""
        ...


class SerialBackend:
    """This process: the model loaded once, passages measured one after another, each pass ticked as it ends."""

    def __init__(self, grid: Plan, run_id: str) -> None:
        self.config = config = grid.config
        self.loaded, self.executor = load_checked(config, grid.tokenizer)
        self.beyond = warn_beyond_context(config, self.loaded.info.get("max_position_embeddings"))
        self.threads = config.threads or physical_cores()
        self.threads_before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        self.context = row_context(run_id, config, self.loaded, self.executor, self.threads)
        self.warmed = False

    def describe(self) -> dict[str, Any]:
        """The model, environment and notices of this process, for run.json."""
        return {
            "model_info": self.loaded.info,
            "environment": environment(torch.device(self.config.device)),
            "beyond_context_lengths": self.beyond,
            "speed": {
                "threads": self.threads,
                "cpu_count": os.cpu_count(),  # logical CPUs: a load average above it means a process competed
                "memory_bandwidth_bytes_s": self.context.bandwidth,
                "load_average_start": load_average(),
            },
        }

    def measure(self, groups: list[Group], done: set[str], session: int, tick: Tick) -> Iterator[PassageResults]:
        """Measure each passage group in this process (warming up before the first timed one), yielding its results."""
        for cells, todo in groups:
            warm = not self.warmed and bool(self.config.repeats)  # before the first timed cell
            self.warmed |= warm
            yield measure_group(
                self.executor, cells, todo, done, self.context, session, self.config.quality_batch, tick, warm=warm
            )

    def close(self) -> None:
        """Give back the caller's torch thread count."""
        torch.set_num_threads(self.threads_before)  # the caller's thread setting comes back whatever happened
