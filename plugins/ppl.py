"""`ppl`: perplexity and next-token accuracy on corpus passages, teacher-forced, in chunks under the policy.

This is the run's own rolling pass (each passage's quality pass and its latency trials, see the protocol in the
README), not a probe task: it is registered so that `kvcompare tasks` lists it and `--task ppl` names it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from kvcompare import hookimpl
from kvcompare.task import Outcome, Probe, Score, Task, TaskError, TaskInputs


@dataclasses.dataclass(frozen=True)
class Perplexity(Task):
    """Perplexity and next-token accuracy of every predicted token of each passage (a rolling pass)."""

    name = "ppl"
    request = "rolling"
    metric = "perplexity (lower is better) and next-token accuracy"

    def probes(self, inputs: TaskInputs, length: int, samples: int) -> list[Probe]:
        """ppl has no probes: its passages are drawn from the corpus by the run."""
        raise TaskError("ppl is the run's rolling pass over corpus passages: it has no probes")

    def score(self, probe: Probe, outcome: Outcome) -> Score:
        """ppl scores no probes."""
        raise TaskError("ppl is the run's rolling pass over corpus passages: it scores no probes")


@hookimpl
def register_tasks(register: Callable[[type[Task]], None]) -> None:
    register(Perplexity)
