"""What RULER's synthetic tasks share: the noise haystack, random keys and values, exact-length assembly.

RULER (Hsieh et al., 2024, github.com/NVIDIA/RULER) fits a prompt under a length by searching a haystack size
and tokenizing the whole text. kvcompare's probes are exactly ``length`` tokens, so a prompt is assembled
from separately tokenized pieces instead: the fixed text (instruction, question, needles) is tokenized first,
and the haystack's tokens fill what is left. The task plugins (``niah``, ``variable_tracking``,
``common_words``, ``frequent_words``) build on the helpers here.
"""

from __future__ import annotations

import bisect
import dataclasses
import random
import re
import uuid
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Literal

from kvcompare.task import Outcome, Probe, Score, Task, TaskError, TaskInputs, string_match_all

#: RULER's "noise" haystack: this line, repeated.
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

#: The kinds of RULER's needle keys and values: adjective-noun style word pairs, 7-digit numbers, UUIDs.
ValueKind = Literal["words", "numbers", "uuids"]
VALUE_KINDS: tuple[str, ...] = ("words", "numbers", "uuids")


def depth_grid(count: int) -> list[float]:
    """``count`` evenly spaced depths from 0 to 1, rounded to whole percents as RULER's 40 are."""
    if count < 1:
        raise TaskError(f"depths must be at least 1, not {count}")
    if count == 1:
        return [0.0]
    return [round(100 * i / (count - 1)) / 100 for i in range(count)]


def random_value(rng: random.Random, kind: str, words: Sequence[str]) -> str:
    """One random key or value of a RULER kind: ``words`` (two words joined by a hyphen, e.g.
    "fluffy-ocean"), ``numbers`` (7 digits) or ``uuids``."""
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    if kind == "words":
        if len(words) < 2:
            raise TaskError(f"word keys and values need at least 2 words in the word list, not {len(words)}")
        first, second = rng.sample(range(len(words)), 2)
        return f"{words[first]}-{words[second]}"
    raise TaskError(f"a key or value kind is one of {', '.join(VALUE_KINDS)}, not {kind!r}")


def distinct_values(
    rng: random.Random,
    kind: str,
    count: int,
    words: Sequence[str],
    taken: set[str],
    protected: Collection[str] = (),
) -> list[str]:
    """``count`` random values of ``kind``, none in ``taken`` (which they join), and none that contains, or is
    contained in, another of them or one of ``protected`` (so a substring match never confuses them)."""
    found: list[str] = []
    for _ in range(1000 * count + 1000):
        if len(found) == count:
            break
        value = random_value(rng, kind, words)
        if value in taken or any(value in other or other in value for other in (*protected, *found)):
            continue
        taken.add(value)
        found.append(value)
    if len(found) < count:
        raise TaskError(f"could not draw {count} distinct {kind} (the word list has {len(words)} words)")
    return found


def newline_token(encode: Callable[[str], list[int]]) -> int:
    """The token a lone newline ends with: what a list task pads with (blank lines)."""
    ids = encode("\n")
    if not ids:
        raise TaskError("the tokenizer encodes a newline to no tokens: a list task cannot pad its prompt")
    return ids[-1]


def repeat_to(unit: Sequence[int], count: int) -> list[int]:
    """``unit`` repeated and cut to exactly ``count`` tokens."""
    if count <= 0:
        return []
    if not unit:
        raise TaskError("a haystack unit has no tokens")
    return (list(unit) * (count // len(unit) + 1))[:count]


def weave(stream: Sequence[int], inserts: Iterable[tuple[int, Sequence[int]]]) -> list[int]:
    """``stream`` with each insert's tokens placed just before stream token ``offset`` (0 to len(stream));
    inserts at the same offset keep their order."""
    woven: list[int] = []
    done = 0
    for offset, tokens in sorted(inserts, key=lambda insert: insert[0]):
        if not 0 <= offset <= len(stream):
            raise TaskError(f"an insert's offset {offset} is outside a haystack of {len(stream)} tokens")
        woven.extend(stream[done:offset])
        woven.extend(tokens)
        done = offset
    woven.extend(stream[done:])
    return woven


@dataclasses.dataclass(frozen=True)
class Haystack:
    """A haystack's tokens, where something may be inserted (token offsets, ascending; None: anywhere), and
    where its text came from (``repeat``, ``synthetic`` or the corpus text's name)."""

    tokens: list[int]
    boundaries: list[int] | None
    source: str

    def place(self, offset: int) -> int:
        """The insertion point nearest ``offset`` (the earlier one on a tie)."""
        if self.boundaries is None:
            return offset
        i = bisect.bisect_left(self.boundaries, offset)
        candidates = self.boundaries[max(0, i - 1) : i + 1]
        return min(candidates, key=lambda boundary: abs(boundary - offset))

    def random_offset(self, rng: random.Random) -> int:
        """A uniformly random insertion point."""
        if self.boundaries is None:
            return rng.randint(0, len(self.tokens))
        return rng.choice(self.boundaries)


def units_haystack(units: Iterable[Sequence[int]], count: int, source: str) -> Haystack:
    """``count`` tokens of ``units`` one after another, the last cut at a token; insertions go between units
    (and at the end if it falls between two)."""
    tokens: list[int] = []
    boundaries: list[int] = []
    for unit in units:
        if len(tokens) >= count:
            break
        if not unit:
            raise TaskError("a haystack unit has no tokens")
        boundaries.append(len(tokens))
        tokens.extend(unit)
    if len(tokens) < count:
        raise TaskError(f"a haystack ran out of units at {len(tokens)} of {count} tokens")
    if len(tokens) == count:
        boundaries.append(count)
    return Haystack(tokens[:count], boundaries or [0], source)


def noise_haystack(
    encode: Callable[[str], list[int]], count: int, between: Literal["sentences", "lines"] = "sentences"
) -> Haystack:
    """RULER's noise haystack, ``count`` tokens: the :data:`NOISE` line repeated, each line starting with a
    newline. Insertions go between its sentences (tokenized one by one) or only between its lines."""
    if between == "lines":
        units = [encode("\n" + NOISE)]
    else:
        first, *rest = re.findall(r"\s*[^.]+\.", NOISE)
        units = [encode("\n" + first), *(encode(sentence) for sentence in rest)]
    cycles = count // sum(map(len, units)) + 1
    return units_haystack((unit for _ in range(cycles) for unit in units), count, "repeat")


def text_haystack(inputs: TaskInputs, sample: int, count: int) -> Haystack:
    """``count`` tokens of the run's corpus text for ``sample`` (repeated if the filler gave fewer); an
    insertion may go before any token."""
    tokens, name = inputs.filler(sample, count)
    return Haystack(repeat_to(tokens, count) if count > 0 else [], None, name)


def budget_left(name: str, length: int, fixed: int) -> int:
    """The tokens left for the haystack once ``fixed`` tokens are placed, or a TaskError if none can be."""
    left = length - fixed
    if left < 0:
        raise TaskError(f"{name}: a prompt needs at least {fixed} tokens with this tokenizer, not {length}")
    return left


def check_exact(name: str, length: int, context: Sequence[int], question: Sequence[int]) -> None:
    """Raise a TaskError if a built prompt is not exactly ``length`` tokens (a bug, never the user's)."""
    if len(context) + len(question) != length:
        raise TaskError(f"{name} built a prompt of {len(context) + len(question)} tokens, not {length}")


@dataclasses.dataclass(frozen=True)
class RulerTask(Task):
    """A RULER synthetic task: greedy generation scored by RULER's ``string_match_all`` (the share of the
    expected values the output contains, case-insensitively); a probe is correct when it contains them all."""

    request = "generate"
    metric = "RULER's string_match_all, the share of expected values found in the output (case-insensitive)"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise a TaskError for bad parameters (called on construction)."""

    def rng(self, inputs: TaskInputs, length: int, sample: int) -> random.Random:
        """The random source of one probe: the run's seed, the task and its parameters, the length and the
        sample, so every policy gets the same probes and samples differ."""
        return random.Random(f"{inputs.seed}-{self.label()}-{length}-{sample}")

    def score(self, probe: Probe, outcome: Outcome) -> Score:
        value = string_match_all(probe.expected, outcome.text or "")
        return Score(correct=value == 1.0, score=value)
