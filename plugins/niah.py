"""RULER's needle-in-a-haystack tasks (Hsieh et al., 2024): `niah_single`, `niah_multikey`, `niah_multivalue`,
`niah_multiquery`.

A needle is the sentence "One of the special magic numbers for {key} is: {value}." hidden in a haystack; the
question asks for the value(s) of the queried key(s). RULER's eight NIAH configurations map to parameters:

- niah_single_1: ``niah_single`` (noise haystack, word key, number value);
- niah_single_2: ``niah_single:haystack=text``; niah_single_3: ``niah_single:haystack=text:value=uuids``;
- niah_multikey_1: ``niah_multikey`` (book text, 4 needles, one queried);
- niah_multikey_2: ``niah_multikey:haystack=needles:keys=1``;
  niah_multikey_3: ``niah_multikey:haystack=needles:keys=1:key=uuids:value=uuids``;
- niah_multivalue: ``niah_multivalue`` (one key, 4 values); niah_multiquery: ``niah_multiquery`` (4 keys, all
  queried).

Deviations from RULER common to the four tasks:

- The ``text`` haystack is the run's corpus text (``TaskInputs.filler``: Project Gutenberg books) instead of
  Paul Graham's essays; ``repeat`` is RULER's noise haystack ("The grass is green. ..." one line repeated);
  ``needles`` is RULER's needle haystack (distractor needles with other keys and values, one per line).
- The prompt is exactly ``length`` tokens, assembled from separately tokenized pieces (instruction, needles,
  question); the haystack's tokens fill what is left, cut at a token. RULER instead searches the haystack
  size so that the prompt plus its 128 generated tokens fit the length, and tokenizes the whole text.
- A needle goes at the token offset ``round(depth * haystack tokens)``: in book text exactly there, so it may
  split a sentence or a word (as kvcompare's passkey does); in the noise haystack at the nearest sentence
  boundary (its sentences are tokenized one by one), in the needle haystack at the nearest line boundary.
  RULER inserts needles between sentences found by nltk in essays and between lines of the noise and needle
  haystacks.
- Depths are drawn, seeded and without replacement, from ``depths`` evenly spaced depths from 0 to 1
  (RULER's 40 by default) for every haystack; RULER draws them so only for essays and puts needles at
  uniformly random lines of the noise and needle haystacks.
- In the line haystacks (``repeat``, ``needles``) each line and each inserted needle starts with a newline;
  in book text a needle is preceded by a space (RULER joins with spaces there too).
- Word keys and values are two distinct words of the run's word list joined by a hyphen (RULER: an adjective
  and a noun of wonderwords' lists), since ``TaskInputs.words`` has no parts of speech.
- Keys and values are all distinct; the inserted needles' keys (and their values) never contain one another,
  and no distractor key or value contains (or is contained in) a queried key or an answer; so the queried
  needles appear exactly once and a substring match never mistakes a distractor for an answer. RULER draws
  them independently.
- The prompt starts with the model's BOS token when its documents do (RULER leaves that to the tokenizer).

As RULER, decoding runs the full ``tokens_to_generate`` (128) with no stop string, and the metric is
``string_match_all``.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, ClassVar, Literal

from kvcompare.hookspecs import hookimpl
from kvcompare.parameters import parameter
from kvcompare.ruler import (
    VALUE_KINDS,
    RulerTask,
    ValueKind,
    budget_left,
    check_exact,
    depth_grid,
    distinct_values,
    noise_haystack,
    text_haystack,
    units_haystack,
    weave,
)
from kvcompare.task import Probe, TaskError, TaskInputs

NEEDLE = "One of the special magic {kind} for {key} is: {value}."
INSTRUCTION = (
    "Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {kind} afterwards."
)
QUESTION = "What are all the special magic {kind} for {query} mentioned in the provided text?"
ANSWER_PREFIX = " The special magic {kind} for {query} mentioned in the provided text are"
#: RULER's tokens_to_generate for its NIAH tasks.
TOKENS_TO_GENERATE = 128

KEY_HELP = "kind of the needles' keys: words (two words joined by a hyphen), numbers (7 digits) or uuids"
VALUE_HELP = "kind of the needles' values: numbers (7 digits), words or uuids"
DEPTHS_HELP = "needles sit at depths drawn (seeded) from this many evenly spaced depths from 0 to 1 (RULER's 40)"


def singular(template: str) -> str:
    """RULER's wording when exactly one value is asked for ("A special magic number is hidden ...")."""
    return template.replace("Some", "A").replace("are all", "is").replace("are", "is")


def spoken_list(items: Sequence[str]) -> str:
    """RULER's way of naming several keys: "a, b, and c"."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + ", and " + items[-1]


@dataclasses.dataclass(frozen=True)
class NeedleTask(RulerTask):
    """What the NIAH tasks share; not a task itself. Subclasses declare the fields ``haystack``, ``key``,
    ``value`` and ``depths`` and say how many keys, values per key and queried keys a probe has."""

    haystacks: ClassVar[tuple[str, ...]] = ("repeat", "text")
    if TYPE_CHECKING:  # declared, with their defaults and help, by each task
        haystack: str
        key: str
        value: str
        depths: int

    def shape(self) -> tuple[int, int, int]:
        """(needle keys, values per key, queried keys)."""
        return 1, 1, 1

    def validate(self) -> None:
        haystack, key, value, depths = self.haystack, self.key, self.value, self.depths
        if haystack not in self.haystacks:
            raise TaskError(f"{self.name}: haystack is one of {', '.join(self.haystacks)}, not {haystack!r}")
        for what, kind in (("key", key), ("value", value)):
            if kind not in VALUE_KINDS:
                raise TaskError(f"{self.name}: {what} is one of {', '.join(VALUE_KINDS)}, not {kind!r}")
        keys, values, queries = self.shape()
        if min(keys, values, queries) < 1:
            raise TaskError(f"{self.name}: keys, values and queries are at least 1")
        if queries > keys:
            raise TaskError(f"{self.name}: {queries} queried keys need at least as many needle keys, not {keys}")
        if depths < 1 or keys * values > depths:
            raise TaskError(f"{self.name}: {keys * values} needles need at least as many depths, not {depths}")

    def probes(self, inputs: TaskInputs, length: int, samples: int) -> list[Probe]:
        return [self.probe(inputs, length, sample) for sample in range(samples)]

    def probe(self, inputs: TaskInputs, length: int, sample: int) -> Probe:
        """The probe of one sample."""
        haystack, key_kind, value_kind = self.haystack, self.key, self.value
        rng = self.rng(inputs, length, sample)
        count_keys, count_values, count_queries = self.shape()

        taken: set[str] = set()  # every key and value so far: all differ
        keys = distinct_values(rng, key_kind, count_keys, inputs.words, taken)
        values = [distinct_values(rng, value_kind, count_values, inputs.words, taken) for _ in keys]
        needles = [
            NEEDLE.format(kind=value_kind, key=key, value=value)
            for key, vs in zip(keys, values, strict=True)
            for value in vs
        ]
        rng.shuffle(needles)
        queried = rng.sample(range(count_keys), count_queries)
        queries = [keys[i] for i in queried]
        answers = [value for i in queried for value in values[i]]
        depths = sorted(rng.sample(depth_grid(self.depths), len(needles)))

        one = count_queries * count_values == 1
        kind = value_kind[:-1] if one else value_kind
        instruction, question = INSTRUCTION, QUESTION + ANSWER_PREFIX
        if one:
            instruction, question = singular(instruction), singular(question)
        lines = haystack != "text"  # line haystacks: every line, needles included, starts with a newline
        query = spoken_list(queries)
        prefix = ([] if inputs.bos is None else [inputs.bos]) + inputs.encode(
            instruction.format(kind=kind) + ("" if lines else "\n")
        )
        needle_tokens = [inputs.encode(("\n" if lines else " ") + needle) for needle in needles]
        question_tokens = inputs.encode("\n" + question.format(kind=kind, query=query))
        fixed = len(prefix) + sum(map(len, needle_tokens)) + len(question_tokens)
        budget = budget_left(self.name, length, fixed)

        if haystack == "repeat":
            hay = noise_haystack(inputs.encode, budget)
        elif haystack == "text":
            hay = text_haystack(inputs, sample, budget)
        else:
            distractors = self.distractors(inputs, rng, taken, queries, answers)
            hay = units_haystack(distractors, budget, "synthetic")
        offsets = [hay.place(round(depth * budget)) for depth in depths]
        context = prefix + weave(hay.tokens, zip(offsets, needle_tokens, strict=True))
        check_exact(self.name, length, context, question_tokens)
        params = (("depth", depths[0]),) if len(needles) == 1 else (("depths", tuple(depths)),)
        return Probe(
            context=tuple(context),
            question=tuple(question_tokens),
            expected=tuple(answers),
            params=(*params, ("needles", len(needles))),
            source=hay.source,
            max_new_tokens=TOKENS_TO_GENERATE,
            stop=(),
        )

    def distractors(
        self,
        inputs: TaskInputs,
        rng: random.Random,
        taken: set[str],
        queries: Sequence[str],
        answers: Sequence[str],
    ) -> Iterator[list[int]]:
        """RULER's needle haystack: lines of distractor needles with new keys and values, without end."""
        while True:
            key = distinct_values(rng, self.key, 1, inputs.words, taken, queries)[0]
            value = distinct_values(rng, self.value, 1, inputs.words, taken, answers)[0]
            yield inputs.encode("\n" + NEEDLE.format(kind=self.value, key=key, value=value))


@dataclasses.dataclass(frozen=True)
class NiahSingle(NeedleTask):
    """RULER's niah_single_1/2/3: one needle, its value asked for (singular wording: "A special magic number
    is hidden ..."). Deviations: see the module docstring."""

    name = "niah_single"
    axes = ("depth",)

    haystack: Literal["repeat", "text"] = parameter(
        "repeat", "repeat: RULER's noise sentence repeated; text: the run's book text"
    )
    key: ValueKind = parameter("words", KEY_HELP)
    value: ValueKind = parameter("numbers", VALUE_HELP)
    depths: int = parameter(40, DEPTHS_HELP)


@dataclasses.dataclass(frozen=True)
class NiahMultikey(NeedleTask):
    """RULER's niah_multikey_1/2/3: ``keys`` needles with distinct keys, one of them queried; the others are
    distractors. With ``haystack=needles`` the whole haystack is distractor needles (RULER's multikey_2 and
    _3 insert one needle, ``keys=1``, there). Deviations: see the module docstring."""

    name = "niah_multikey"
    haystacks = ("text", "repeat", "needles")

    haystack: Literal["text", "repeat", "needles"] = parameter(
        "text", "text: the run's book text; repeat: RULER's noise sentence; needles: distractor needles"
    )
    keys: int = parameter(4, "needles inserted, each with its own key; one is queried (RULER: 4, or 1 in needles)")
    key: ValueKind = parameter("words", KEY_HELP)
    value: ValueKind = parameter("numbers", VALUE_HELP)
    depths: int = parameter(40, DEPTHS_HELP)

    def shape(self) -> tuple[int, int, int]:
        return self.keys, 1, 1


@dataclasses.dataclass(frozen=True)
class NiahMultivalue(NeedleTask):
    """RULER's niah_multivalue: one key with ``values`` needles (each with its own value); all its values are
    asked for. Deviations: see the module docstring."""

    name = "niah_multivalue"

    haystack: Literal["text", "repeat"] = parameter(
        "text", "text: the run's book text; repeat: RULER's noise sentence repeated"
    )
    values: int = parameter(4, "needles of the one key, each with its own value, all asked for (RULER: 4)")
    key: ValueKind = parameter("words", KEY_HELP)
    value: ValueKind = parameter("numbers", VALUE_HELP)
    depths: int = parameter(40, DEPTHS_HELP)

    def shape(self) -> tuple[int, int, int]:
        return 1, self.values, 1


@dataclasses.dataclass(frozen=True)
class NiahMultiquery(NeedleTask):
    """RULER's niah_multiquery: ``queries`` needles with distinct keys, all queried at once ("... for a, b, c,
    and d ..."). Deviations: see the module docstring."""

    name = "niah_multiquery"

    haystack: Literal["text", "repeat"] = parameter(
        "text", "text: the run's book text; repeat: RULER's noise sentence repeated"
    )
    queries: int = parameter(4, "needles with distinct keys, all queried (RULER: 4)")
    key: ValueKind = parameter("words", KEY_HELP)
    value: ValueKind = parameter("numbers", VALUE_HELP)
    depths: int = parameter(40, DEPTHS_HELP)

    def shape(self) -> tuple[int, int, int]:
        return self.queries, 1, self.queries


@hookimpl
def register_tasks(register):  # type: ignore[no-untyped-def]
    register(NiahSingle)
    register(NiahMultikey)
    register(NiahMultivalue)
    register(NiahMultiquery)
