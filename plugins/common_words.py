"""RULER's common words extraction task (Hsieh et al., 2024): `cwe`, name the most frequent words of a list."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from kvcompare.hookspecs import hookimpl
from kvcompare.parameters import parameter
from kvcompare.ruler import RulerTask, budget_left, check_exact, newline_token
from kvcompare.task import Probe, TaskError, TaskInputs

INSTRUCTION = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often."
)
QUESTION = "Question: What are the {count} most common words in the above list?"
ANSWER_PREFIX = " Answer: The top {count} words that appear most often in the list are:"
#: RULER's tokens_to_generate for cwe.
TOKENS_TO_GENERATE = 120
#: RULER's frequencies below 4096 tokens: (common, uncommon) in the list; (words, common, uncommon) in the
#: worked example; and from 4096 tokens on, the example's.
SHORT_FREQUENCIES = (6, 1)
SHORT_EXAMPLE = (20, 3, 1)
EXAMPLE = (40, 10, 3)


def numbered(words: list[str]) -> str:
    """RULER's list format: "1. apple 2. pear ..."."""
    return " ".join(f"{i}. {word}" for i, word in enumerate(words, 1))


class TokenCache:
    """The tokens of list entries' pieces, each tokenized once: "1.", " 2.", ... and " word"."""

    def __init__(self, encode: Callable[[str], list[int]]) -> None:
        self.encode = encode
        self.numbers: dict[int, list[int]] = {}
        self.words: dict[str, list[int]] = {}

    def number(self, i: int) -> list[int]:
        if i not in self.numbers:
            self.numbers[i] = self.encode(f"{i}." if i == 1 else f" {i}.")
        return self.numbers[i]

    def word(self, word: str) -> list[int]:
        if word not in self.words:
            self.words[word] = self.encode(f" {word}")
        return self.words[word]

    def entries(self, start: int, count: int, word: str) -> int:
        """Tokens of ``count`` entries of ``word`` numbered from ``start``."""
        return sum(len(self.number(i)) for i in range(start, start + count)) + count * len(self.word(word))


@dataclasses.dataclass(frozen=True)
class CommonWords(RulerTask):
    """RULER's cwe: a numbered list of words ("1. apple 2. pear ...") in which ``num_cw`` words appear
    ``freq_cw`` times each and every other word ``freq_ucw`` times, shuffled; the question asks for the
    ``num_cw`` most common words. As RULER, below 4096 tokens the common words appear 6 times and the others
    once, and a worked example (40 words at 10 and 3, or 20 words at 3 and 1 below 4096 tokens; its answer
    numbered "1. w 2. w ...") comes first. The words are ``TaskInputs.words`` (wonderwords' nouns, adjectives
    and verbs, as RULER's).

    Deviations from RULER:

    - Exact length: the number of uncommon words is the most whose entries fit, counted in separately
      tokenized pieces ("1.", " 2.", " word"); the tokens left over (fewer than one more word's entries) are
      blank lines (newline tokens) between the list and the question, reported as the probe's ``padding``.
      RULER searches the word count so the prompt plus its 120 generated tokens fit.
    - When the word list runs out before the prompt is full, the probe is a TaskError; RULER switches to a
      larger word list (which it downloads) there.
    - The short-prompt frequencies apply below ``short_below`` prompt tokens (RULER: when the length
      including the generated tokens is below 4096); ``short_below=0`` always uses ``freq_cw``/``freq_ucw``.
    - The example's words are disjoint from the list's (RULER draws them independently), so each common
      word appears exactly ``freq_cw`` times after the instruction and the example cannot answer the
      question. The question names ``num_cw`` ("the 10 most common words"), which RULER writes as 10.
    - The prompt starts with the model's BOS token when its documents do.

    As RULER, decoding runs the full 120 tokens with no stop string (the answer is a list, which may span
    lines), and the metric is ``string_match_all``.
    """

    name = "cwe"

    freq_cw: int = parameter(30, "times each common word appears in the list (RULER: 30)")
    freq_ucw: int = parameter(3, "times each other word appears (RULER: 3)")
    num_cw: int = parameter(10, "common words, all asked for (RULER: 10)")
    fewshot: bool = parameter(True, "a worked example before the question, as RULER")
    short_below: int = parameter(
        4096, "below this many tokens, as RULER, common words appear 6 times and others once; 0: never"
    )

    def validate(self) -> None:
        if self.num_cw < 1 or self.freq_ucw < 1 or self.freq_cw <= self.freq_ucw:
            raise TaskError(
                f"cwe: num_cw and freq_ucw are at least 1 and freq_cw exceeds freq_ucw, not num_cw={self.num_cw}, "
                f"freq_cw={self.freq_cw}, freq_ucw={self.freq_ucw}"
            )
        if self.short_below < 0:
            raise TaskError(f"cwe: short_below is at least 0, not {self.short_below}")

    def frequencies(self, length: int) -> tuple[tuple[int, int], tuple[int, int, int]]:
        """(common, uncommon) frequencies of the list and (words, common, uncommon) of the example."""
        if length < self.short_below:
            return SHORT_FREQUENCIES, SHORT_EXAMPLE
        return (self.freq_cw, self.freq_ucw), EXAMPLE

    def probes(self, inputs: TaskInputs, length: int, samples: int) -> list[Probe]:
        cache = TokenCache(inputs.encode)
        return [self.probe(inputs, length, sample, cache) for sample in range(samples)]

    def probe(self, inputs: TaskInputs, length: int, sample: int, cache: TokenCache) -> Probe:
        """The probe of one sample."""
        rng = self.rng(inputs, length, sample)
        (common_freq, other_freq), (example_words, example_common, example_other) = self.frequencies(length)
        pool = list(inputs.words)
        rng.shuffle(pool)
        needed = self.num_cw + 1 + (example_words if self.fewshot else 0)
        if len(pool) < needed:
            raise TaskError(f"cwe needs at least {needed} words in the word list, not {len(pool)}")

        context = [] if inputs.bos is None else [inputs.bos]
        if self.fewshot:
            words, pool = pool[:example_words], pool[example_words:]
            common = words[: self.num_cw]
            entries = common * example_common + words[self.num_cw :] * example_other
            rng.shuffle(entries)
            example = f"{INSTRUCTION}\n{numbered(entries)}\n{self.question()} {numbered(common)}\n"
            context += inputs.encode(example)
        context += inputs.encode(INSTRUCTION + "\n")
        question = inputs.encode("\n" + self.question())
        budget = budget_left(self.name, length, len(context) + len(question))

        common = pool[: self.num_cw]
        count = self.num_cw * common_freq
        used = sum(cache.entries(1 + i * common_freq, common_freq, word) for i, word in enumerate(common))
        if used > budget:
            raise TaskError(
                f"cwe: a prompt needs at least {length - budget + used} tokens with this tokenizer for "
                f"{self.num_cw} words appearing {common_freq} times, not {length}"
            )
        others: list[str] = []
        for word in pool[self.num_cw :]:
            more = cache.entries(count + 1, other_freq, word)
            if used + more > budget:
                break
            others.append(word)
            used += more
            count += other_freq
        else:
            if used < budget:
                raise TaskError(
                    f"cwe: the word list's {len(inputs.words)} words fill only {used} of the {budget} list tokens "
                    f"of a {length}-token prompt; use a shorter length or a larger word list"
                )
        entries = common * common_freq + others * other_freq
        rng.shuffle(entries)
        for i, word in enumerate(entries, 1):
            context += cache.number(i) + cache.word(word)
        padding = budget - used
        context += [newline_token(inputs.encode)] * padding
        check_exact(self.name, length, context, question)
        return Probe(
            context=tuple(context),
            question=tuple(question),
            expected=tuple(common),
            params=(
                ("words", len(common) + len(others)),
                ("freq_cw", common_freq),
                ("freq_ucw", other_freq),
                ("padding", padding),
            ),
            source="synthetic",
            max_new_tokens=TOKENS_TO_GENERATE,
            stop=(),
        )

    def question(self) -> str:
        """The question with RULER's answer prefix."""
        return QUESTION.format(count=self.num_cw) + ANSWER_PREFIX.format(count=self.num_cw)


@hookimpl
def register_tasks(register):  # type: ignore[no-untyped-def]
    register(CommonWords)
