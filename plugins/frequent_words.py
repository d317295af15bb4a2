"""RULER's frequent words extraction task (Hsieh et al., 2024): `fwe`, name the most frequent coded words."""

from __future__ import annotations

import dataclasses
import random
import string

from scipy.special import zeta

from kvcompare.hookspecs import hookimpl
from kvcompare.parameters import parameter
from kvcompare.ruler import RulerTask, budget_left, check_exact, newline_token
from kvcompare.task import Probe, TaskError, TaskInputs

INSTRUCTION = (
    "Read the following coded text and track the frequency of each coded word. "
    "Find the three most frequently appeared coded words."
)
QUESTION = (
    "Question: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
ANSWER_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
#: RULER's tokens_to_generate for fwe.
TOKENS_TO_GENERATE = 50
#: The top-ranked word is noise (the question says to ignore it); the next three are the answer.
NOISE_WORD = "..."
ANSWERS = 3
#: RULER's vocabulary: one coded word per this many tokens of the prompt.
TOKENS_PER_WORD = 50


@dataclasses.dataclass(frozen=True)
class FrequentWords(RulerTask):
    """RULER's fwe: coded words (random strings of ``word_length`` lowercase letters) whose counts follow a
    Zipf law: with ``n`` words in all, the word of rank k appears ``int(n * k**-alpha / zeta(alpha))`` times,
    shuffled and separated by spaces. The top-ranked word is "..." (noise, which the question says to ignore);
    the answer is the words of ranks 2 to 4. The vocabulary has one word per 50 prompt tokens, as RULER's.

    Deviations from RULER:

    - Exact length: ``n`` is the largest whose words fit, counted in separately tokenized pieces (" word");
      the tokens left over (fewer than the next word's) are blank lines (newline tokens) between the text and
      the question, reported as the probe's ``padding``. RULER searches ``n`` so that the prompt fits the
      length less its 50 generated tokens, and sizes its vocabulary from that length less 50.
    - A length too short for ranks 2 to 4 to each appear more often than every other coded word is a
      TaskError (RULER does not check).
    - The prompt starts with the model's BOS token when its documents do.

    As RULER, decoding runs the full 50 tokens with no stop string, no worked example is given, and the
    metric is ``string_match_all``.
    """

    name = "fwe"

    alpha: float = parameter(2.0, "Zipf exponent of the coded words' counts (RULER: 2.0)")
    word_length: int = parameter(6, "letters of a coded word (RULER: 6)")
    vocab: int = parameter(0, "coded words in the vocabulary, noise included; 0: one per 50 prompt tokens (RULER)")

    def validate(self) -> None:
        if not self.alpha > 1:
            raise TaskError(f"fwe: alpha is above 1 (the Zipf law's sum must converge), not {self.alpha}")
        if self.word_length < 1 or self.vocab < 0 or 0 < self.vocab < ANSWERS + 1:
            raise TaskError(
                f"fwe: word_length is at least 1 and vocab 0 or at least {ANSWERS + 1}, "
                f"not {self.word_length} and {self.vocab}"
            )

    def probes(self, inputs: TaskInputs, length: int, samples: int) -> list[Probe]:
        return [self.probe(inputs, length, sample) for sample in range(samples)]

    def coded_words(self, rng: random.Random, count: int) -> list[str]:
        """The noise word then ``count - 1`` distinct random coded words, in rank order."""
        if 26**self.word_length < count:
            raise TaskError(f"fwe: {count} distinct coded words need more than {self.word_length} letters")
        words: list[str] = []
        seen: set[str] = set()
        while len(words) < count - 1:
            word = "".join(rng.choices(string.ascii_lowercase, k=self.word_length))
            if word not in seen:
                seen.add(word)
                words.append(word)
        return [NOISE_WORD, *words]

    def counts(self, total: int, size: int) -> list[int]:
        """Each rank's count for ``total`` words (RULER's truncated Zipf law)."""
        norm = float(zeta(self.alpha))
        return [int(total * k**-self.alpha / norm) for k in range(1, size + 1)]

    def probe(self, inputs: TaskInputs, length: int, sample: int) -> Probe:
        """The probe of one sample."""
        rng = self.rng(inputs, length, sample)
        size = self.vocab or length // TOKENS_PER_WORD
        if size < ANSWERS + 1:
            raise TaskError(
                f"fwe: a {length}-token prompt has a vocabulary of {size} coded words, fewer than "
                f"{ANSWERS + 1}; it needs at least {(ANSWERS + 1) * TOKENS_PER_WORD} tokens (or set vocab)"
            )
        vocab = self.coded_words(rng, size)
        pieces = [inputs.encode(f" {word}") for word in vocab]
        if not all(pieces):
            raise TaskError("fwe: the tokenizer encodes a coded word to no tokens")
        prefix = ([] if inputs.bos is None else [inputs.bos]) + inputs.encode(INSTRUCTION)
        question = inputs.encode("\n" + QUESTION + ANSWER_PREFIX)
        budget = budget_left(self.name, length, len(prefix) + len(question))

        def cost(total: int) -> int:
            return sum(n * len(piece) for n, piece in zip(self.counts(total, size), pieces, strict=True))

        low, high = 0, max(1, budget)
        while cost(high) <= budget:
            low, high = high, 2 * high
        while high - low > 1:  # cost(low) fits, cost(high) does not
            middle = (low + high) // 2
            low, high = (middle, high) if cost(middle) <= budget else (low, middle)
        counts = self.counts(low, size)
        if counts[ANSWERS] < 1 or (size > ANSWERS + 1 and counts[ANSWERS] <= counts[ANSWERS + 1]):
            raise TaskError(
                f"fwe: a {length}-token prompt is too short for three coded words to stand out "
                f"({counts[: ANSWERS + 2]} at the top ranks)"
            )
        ranks = [rank for rank, n in enumerate(counts) for _ in range(n)]
        rng.shuffle(ranks)
        context = prefix + [token for rank in ranks for token in pieces[rank]]
        padding = budget - cost(low)
        context += [newline_token(inputs.encode)] * padding
        check_exact(self.name, length, context, question)
        return Probe(
            context=tuple(context),
            question=tuple(question),
            expected=tuple(vocab[1 : ANSWERS + 1]),
            params=(("words", len(ranks)), ("vocab", size), ("padding", padding)),
            source="synthetic",
            max_new_tokens=TOKENS_TO_GENERATE,
            stop=(),
        )


@hookimpl
def register_tasks(register):  # type: ignore[no-untyped-def]
    register(FrequentWords)
