"""The task contract: what a task plugin implements (probes and their scoring), never touching the cache.

A task builds :class:`Probe` objects, each a prompt of exactly the requested length in two segments (the
``context``, then the ``question``) with what a correct answer contains, and scores an :class:`Outcome` (what
the model produced under a policy) into a :class:`Score`. How a probe is run is one of a few request kinds the
executor knows (as lm-evaluation-harness splits tasks from models):

- ``answer``: the expected answer's tokens are fed after the prompt as decoding would feed them; the outcome
  has the teacher-forced log-probability and how many leading tokens were the arg-max (passkey).
- ``generate``: greedy decoding after the prompt until ``max_new_tokens`` or a stop string; the outcome has
  the text (RULER's tasks, scored by string match).

(``ppl``, the rolling teacher-forced pass over a corpus passage, is the run's own pass and not a probe task.)

Parameters are dataclass fields with defaults, written on the command line as a policy's are
(``niah_single:haystack=text``); :func:`kvcompare.policy.parameter` gives one its help line.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import numpy as np

from kvcompare.errors import KVCompareError
from kvcompare.parameters import Parameterised

#: How a probe is run (see the module docstring).
RequestKind = Literal["rolling", "answer", "generate"]


class TaskError(KVCompareError, ValueError):
    """A task was given bad parameters, cannot build a prompt of the requested length, or broke its contract."""


@dataclasses.dataclass(frozen=True)
class Probe:
    """One question of a task: token segments, what a correct answer contains, and the probe's parameters.

    ``context`` + ``question`` is the prompt, exactly the requested length (a BOS token, when the model's
    documents start with one, is the context's first token). ``answer`` holds the tokens a teacher-forced
    ``answer`` request feeds (empty for ``generate``). ``expected`` are the strings a correct output contains
    (all of them; compared case-insensitively by the usual scorer). ``params`` are the probe's own values that
    a report may tabulate (e.g. ``depth``), JSON-serialisable; ``source`` says where its haystack came from.
    """

    context: tuple[int, ...]
    question: tuple[int, ...]
    expected: tuple[str, ...]
    answer: tuple[int, ...] = ()
    params: tuple[tuple[str, Any], ...] = ()
    source: str = "synthetic"
    max_new_tokens: int = 0  # generate: the most tokens decoded
    stop: tuple[str, ...] = ("\n",)  # generate: decoding stops once the text contains one of these

    @property
    def tokens(self) -> tuple[int, ...]:
        """The whole prompt: ``context`` then ``question``."""
        return self.context + self.question

    def param(self, key: str, default: Any = None) -> Any:
        """One of ``params`` by name."""
        return dict(self.params).get(key, default)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What the model produced for a probe under one policy and limit.

    ``answer`` requests fill ``matched`` (leading answer tokens that were the arg-max) and ``logprob`` (the
    answer's tokens' log-probability, summed, nats); ``generate`` requests fill ``text`` (decoded, special
    tokens skipped) and ``tokens`` (the generated ids).
    """

    text: str | None = None
    tokens: tuple[int, ...] = ()
    matched: int | None = None
    logprob: float | None = None


@dataclasses.dataclass(frozen=True)
class Score:
    """A probe's result: ``correct`` (the task's pass/fail) and ``score`` in [0, 1] (the task's metric, e.g. the
    share of expected values found)."""

    correct: bool
    score: float

    def __post_init__(self) -> None:
        if not (0.0 <= self.score <= 1.0) or math.isnan(self.score):
            raise TaskError(f"a score is in [0, 1], not {self.score}")


@dataclasses.dataclass(frozen=True)
class TaskInputs:
    """What a task may use to build its probes; the same for every policy of a run.

    ``encode`` gives a text's token ids without special tokens; ``bos`` is the BOS token id when the model's
    documents start with one (else None); ``filler(sample, tokens)`` gives at least ``tokens`` tokens of the
    run's corpus text for sample ``sample`` and a name for where they came from (for book-text haystacks);
    ``word_list()`` gives distinct common English words (for word lists and keys), read through :attr:`words`
    only by a task that needs them.
    """

    encode: Callable[[str], list[int]]
    bos: int | None
    seed: int
    filler: Callable[[int, int], tuple[Sequence[int], str]]
    word_list: Callable[[], Sequence[str]]
    decode: Callable[[Sequence[int]], str] | None = None

    @property
    def words(self) -> Sequence[str]:
        """The word list, read on first use; raises TaskError (saying what to install) when there is none."""
        return self.word_list()


@dataclasses.dataclass(frozen=True)
class Task(Parameterised):
    """Base class of every task: a dataclass whose fields are its parameters (all with defaults).

    Implement :meth:`probes` and :meth:`score`; declare ``name``, ``request``, and for the report ``axes`` (the
    probe parameters its accuracy is broken down by, besides length) and ``metric`` (what ``score`` means).
    """

    kind = "task"
    request: ClassVar[RequestKind] = "generate"
    axes: ClassVar[tuple[str, ...]] = ()
    metric: ClassVar[str] = "accuracy"

    def probes(self, inputs: TaskInputs, length: int, samples: int) -> list[Probe]:
        """``samples`` probes whose prompts (context + question) are exactly ``length`` tokens, seeded by
        ``inputs.seed``, ``length`` and the task's parameters (the same probes for every policy). Raises
        TaskError when ``length`` is too short for the task's fixed text."""
        raise NotImplementedError

    def score(self, probe: Probe, outcome: Outcome) -> Score:
        """Score one outcome of ``probe``."""
        raise NotImplementedError


def checked_score(task: Task, probe: Probe, outcome: Outcome) -> Score:
    """``task.score(probe, outcome)`` held to the contract: a :class:`Score` whose ``correct`` is a bool and
    ``score`` a number in [0, 1] (returned as ``bool`` and ``float``). Raises TaskError naming the task and its
    plugin when score() raises or returns anything else (7.0, NaN, a string, a bare number), so that the cell
    fails with that error rather than storing it as a score."""
    try:
        got = task.score(probe, outcome)
    except Exception as err:  # Score's own check included: the plugin's to fix, so name it
        raise TaskError(f"{task.who()}: score() raised {type(err).__name__}: {err}") from err
    value = getattr(got, "score", None)
    if (
        not isinstance(got, Score)
        or not isinstance(got.correct, bool | np.bool_)
        or not isinstance(value, numbers.Real)
        or not 0.0 <= float(value) <= 1.0  # NaN included
    ):
        raise TaskError(
            f"{task.who()}: score() returned {got!r}: it must return a Score whose correct is a bool and whose "
            "score is a number in [0, 1]"
        )
    return Score(bool(got.correct), float(value))


def string_match_all(expected: Sequence[str], text: str) -> float:
    """RULER's metric for its synthetic tasks: the share of ``expected`` values found in ``text``,
    case-insensitively (``string_match_all`` in RULER's ``eval/synthetic/constants.py``)."""
    if not expected:
        raise TaskError("a probe needs at least one expected value")
    lowered = text.lower()
    return sum(value.lower() in lowered for value in expected) / len(expected)
