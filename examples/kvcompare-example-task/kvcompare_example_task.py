"""`kv_lookup`: look up one key among many "key: value" lines — an example task plugin to copy.

The context lists ``pairs`` lines "k<i>: <value>" (filler text after them pads the prompt to its exact length);
the question asks for one key's value, whose tokens are then fed as an ``answer`` request: correct when greedy
decoding gives the value exactly.
"""

from __future__ import annotations

import dataclasses
import random

from kvcompare import hookimpl, parameter
from kvcompare.task import Outcome, Probe, Score, Task, TaskError, TaskInputs

FILLER = " The grass is green. The sky is blue."


@dataclasses.dataclass(frozen=True)
class KeyValueLookup(Task):
    """Find the value of one key among `pairs` key-value lines."""

    name = "kv_lookup"
    request = "answer"
    metric = "exact match of the value's tokens (greedy)"
    pairs: int = parameter(8, "key-value lines in the context")

    def probes(self, inputs: TaskInputs, length: int, samples: int) -> list[Probe]:
        probes = []
        for sample in range(samples):
            rng = random.Random(f"{inputs.seed}-{self.label()}-{length}-{sample}")
            values = [str(rng.randint(1000, 9999)) for _ in range(self.pairs)]
            asked = rng.randrange(self.pairs)
            lines = inputs.encode("".join(f"\nk{i}: {v}" for i, v in enumerate(values)))
            question = inputs.encode(f"\nWhat is the value of k{asked}? The value of k{asked} is")
            answer = inputs.encode(f" {values[asked]}")
            start = [] if inputs.bos is None else [inputs.bos]
            budget = length - len(start) - len(lines) - len(question)
            if budget < 0:
                raise TaskError(f"kv_lookup needs at least {length - budget} tokens for {self.pairs} pairs")
            unit = inputs.encode(FILLER)
            padding = (unit * (budget // len(unit) + 1))[:budget]
            probes.append(
                Probe(
                    context=(*start, *lines, *padding),
                    question=tuple(question),
                    expected=(values[asked],),
                    answer=tuple(answer),
                    params=(("key", asked), ("sample", sample)),
                )
            )
        return probes

    def score(self, probe: Probe, outcome: Outcome) -> Score:
        matched = outcome.matched or 0
        return Score(matched == len(probe.answer), matched / len(probe.answer))


@hookimpl
def register_tasks(register):  # type: ignore[no-untyped-def]
    register(KeyValueLookup)
