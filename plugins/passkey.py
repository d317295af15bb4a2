"""`passkey`: the passkey retrieval task (Mohtashami & Jaggi 2023, Landmark attention; LongLoRA's evaluation):
can the model still recall one fact under eviction?

A prompt of exactly ``length`` tokens: an instruction, a filler sentence repeated (or book text with
``haystack=text``), the line "The pass key is {key}. Remember it. {key} is the pass key." at a depth, then
"What is the pass key? The pass key is". Run as an ``answer`` request: the key's tokens are fed one at a time
after the prompt, as decoding would feed them; correct when greedy decoding gives the key exactly.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from typing import Literal

from kvcompare import hookimpl, parameter
from kvcompare.task import Outcome, Probe, Score, Task, TaskError, TaskInputs

INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"


@dataclasses.dataclass(frozen=True)
class PasskeyPrompt:
    """One retrieval probe: the prompt's tokens, the answer's tokens and where the needle sits."""

    tokens: tuple[int, ...]  # exactly the requested length
    answer: tuple[int, ...]  # the tokens of " {key}", what should follow the prompt
    key: str
    depth: float  # requested: the needle starts this far into the filler
    haystack: str  # "repeat", or where the filler text came from (a book of the dataset)
    needle_start: int  # token index of the needle's first token
    needle_end: int  # one past its last
    bos: bool = False  # the prompt starts with the tokenizer's BOS token


def passkey_keys(seed: int, length: int, depth: float, samples: int) -> list[str]:
    """``samples`` seeded random 5-digit keys for one (length, depth); the same for every policy."""
    rng = random.Random(f"{seed}-{length}-{depth}")
    return [str(rng.randint(10000, 99999)) for _ in range(samples)]


def build_prompt(
    encode: Callable[[str], list[int]],
    length: int,
    depth: float,
    key: str,
    filler: Sequence[int] | None = None,
    haystack: str = "repeat",
    bos: int | None = None,
) -> PasskeyPrompt:
    """The prompt for ``key`` with the needle at ``depth`` (0: right after the instruction, 1: before the
    question), assembled from separately tokenized pieces so that its length is exact; with a ``bos`` token
    id it starts with it, as a document does.

    ``filler``: the tokens of a text to hide the needle in (``haystack`` names it), repeated if short;
    default the classic sentence. The answer is what the model should produce after the question: the
    tokens " K" takes in the question's context (:func:`answer_tokens`), not " K" tokenized alone.
    """
    if not 0 <= depth <= 1:
        raise TaskError(f"passkey: depths are numbers from 0 to 1, not {depth}")
    instruction, needle, question = encode(INSTRUCTION), encode(NEEDLE.format(key=key)), encode(QUESTION)
    if bos is not None:
        instruction = [bos, *instruction]
    budget = length - len(instruction) - len(needle) - len(question)
    if budget < 0:
        fixed = length - budget
        raise TaskError(f"a passkey prompt needs at least {fixed} tokens with this tokenizer, not {length}")
    unit = list(filler) if filler else encode(FILLER)
    stream = (unit * (budget // len(unit) + 1))[:budget]
    before = round(depth * budget)
    start = len(instruction) + before
    tokens = (*instruction, *stream[:before], *needle, *stream[before:], *question)
    answer = answer_tokens(encode, question, key)
    return PasskeyPrompt(tuple(tokens), answer, key, depth, haystack, start, start + len(needle), bos is not None)


def answer_tokens(encode: Callable[[str], list[int]], question: Sequence[int], key: str) -> tuple[int, ...]:
    """The tokens of " {key}" as they follow the question: the question and the answer tokenized together,
    less the question's tokens. A SentencePiece tokenizer gives " 12345" alone other tokens (a lone "▁" piece,
    say) than after "is", which the model would never emit. Where joining changes the question's own tokens,
    the answer alone is used."""
    joined = encode(QUESTION + f" {key}")
    if len(joined) > len(question) and joined[: len(question)] == list(question):
        return tuple(joined[len(question) :])
    return tuple(encode(f" {key}"))


#: The default needle depths (0: right after the instruction, 1: just before the question).
DEFAULT_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


@dataclasses.dataclass(frozen=True)
class Passkey(Task):
    """Hide a 5-digit key in filler text at each depth; ask for it after the filler (exact match of its tokens).

    Deviation: the instruction, needle and question follow LongLoRA's passkey prompt; the prompt's length is
    exact (assembled from separately tokenized pieces), where the original repeats the filler a number of times.
    """

    name = "passkey"
    request = "answer"
    axes = ("depth",)
    metric = "exact match of the key's tokens (greedy)"
    depths: tuple[float, ...] = parameter(DEFAULT_DEPTHS, "needle depths, 0 (start) to 1 (end), /-separated")
    haystack: Literal["repeat", "text"] = parameter(
        "repeat", "repeat: the classic filler sentence; text: passages of the run's --dataset"
    )

    def __post_init__(self) -> None:
        if not self.depths or not all(0 <= d <= 1 for d in self.depths):
            raise TaskError(f"passkey: depths are numbers from 0 (start) to 1 (end), not {self.depths}")

    def probes(self, inputs: TaskInputs, length: int, samples: int) -> list[Probe]:
        """``samples`` seeded keys per depth, each prompt exactly ``length`` tokens; with ``haystack=text`` sample
        s hides its keys in the s-th corpus passage, the same text at every depth."""
        probes, question = [], len(inputs.encode(QUESTION))
        for depth in dict.fromkeys(self.depths):
            for sample, key in enumerate(passkey_keys(inputs.seed, length, depth, samples)):
                filler, source = inputs.filler(sample, length) if self.haystack == "text" else (None, "repeat")
                prompt = build_prompt(inputs.encode, length, depth, key, filler, source, inputs.bos)
                probes.append(
                    Probe(
                        context=prompt.tokens[:-question],
                        question=prompt.tokens[-question:],
                        expected=(key,),
                        answer=prompt.answer,
                        params=(("depth", depth), ("needle_start", prompt.needle_start), ("sample", sample)),
                        source=f"passkey:{key}:{source}",
                    )
                )
        return probes

    def score(self, probe: Probe, outcome: Outcome) -> Score:
        """Correct when every answer token was the arg-max; the score is the share of them matched in a row."""
        matched = outcome.matched or 0
        return Score(matched == len(probe.answer), matched / len(probe.answer))


@hookimpl
def register_tasks(register: Callable[[type[Task]], None]) -> None:
    register(Passkey)
