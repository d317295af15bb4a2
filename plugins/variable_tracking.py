"""RULER's variable tracking task (Hsieh et al., 2024): `vt`, follow chains of variable assignments."""

from __future__ import annotations

import dataclasses
import random
import string
from typing import Literal

from kvcompare.hookspecs import hookimpl
from kvcompare.parameters import parameter
from kvcompare.ruler import Haystack, RulerTask, budget_left, check_exact, noise_haystack, text_haystack, weave
from kvcompare.task import Probe, TaskError, TaskInputs

INSTRUCTION = "Memorize and track the chain(s) of variable assignment hidden in the following text."
QUESTION = "Question: Find all variables that are assigned the value {value} in the text above."
ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {count} variables are "
    "assigned the value {value}, they are: "
)
#: RULER's tokens_to_generate for vt.
TOKENS_TO_GENERATE = 30
#: RULER generates its worked example for 500 tokens.
EXAMPLE_TOKENS = 500
#: RULER's worked example has at most this many hops.
EXAMPLE_HOPS = 10


@dataclasses.dataclass(frozen=True)
class Chains:
    """Variable chains: ``names[c]`` are chain c's variables in assignment order, ``values[c]`` its number,
    ``statements`` the lines "VAR A = 12345", "VAR B = VAR A ", ... in the order they appear."""

    names: list[list[str]]
    values: list[str]
    statements: list[str]


@dataclasses.dataclass(frozen=True)
class VariableTracking(RulerTask):
    """RULER's vt: ``chains`` chains of ``hops`` assignments ("VAR QPJZR = 38012", then "VAR MKAOE = VAR QPJZR
    " ...) hidden in a haystack; the question gives the first chain's number and asks for every variable that
    holds it (all ``hops + 1`` of them). As RULER, a worked example (variables of 3 letters, at most 10 hops,
    answer included) comes first, and the statements sit at random places in their chain's order, chains
    interleaved.

    Deviations from RULER:

    - Exact length from separately tokenized pieces (instruction, statements, question, the example); the
      haystack's tokens fill what is left, cut at a token; RULER searches the haystack size so the prompt plus
      its 30 generated tokens fit.
    - The ``text`` haystack is the run's corpus text (Project Gutenberg books) instead of Paul Graham's
      essays; ``repeat`` is RULER's noise line repeated (its default).
    - In book text, statements go before uniformly random tokens (so they may split a sentence or a word);
      RULER puts them between sentences, at depths drawn from its 40. In the noise haystack they go between
      random lines, as RULER's.
    - The worked example takes up to 500 tokens as RULER's, but at most an eighth of the prompt: its
      haystack shrinks (to nothing) for short prompts. Its answer follows the answer prefix after one space,
      not two. For ``text`` its haystack is the book text that follows the main haystack's.
    - Variable names are distinct within the example and within the chains (as RULER), none is "VAR", and
      the chains' numbers are distinct and differ from the example's (RULER draws them independently).
    - In the ``repeat`` haystack each line and each statement starts with a newline; in book text a statement
      is " VAR B = VAR A." (as RULER writes statements in essays).
    - The prompt starts with the model's BOS token when its documents do.

    As RULER, decoding runs the full 30 tokens with no stop string, and the metric is ``string_match_all``.
    """

    name = "vt"

    haystack: Literal["repeat", "text"] = parameter(
        "repeat", "repeat: RULER's noise sentence repeated; text: the run's book text"
    )
    chains: int = parameter(1, "chains of assignments; the first one is asked about (RULER: 1)")
    hops: int = parameter(4, "assignments after a chain's first, so hops + 1 variables hold its number (RULER: 4)")
    fewshot: bool = parameter(True, "a worked example before the question, as RULER")

    def validate(self) -> None:
        if self.haystack not in ("repeat", "text"):
            raise TaskError(f"vt: haystack is repeat or text, not {self.haystack!r}")
        if self.chains < 1 or self.hops < 1:
            raise TaskError(f"vt: chains and hops are at least 1, not {self.chains} and {self.hops}")

    def probes(self, inputs: TaskInputs, length: int, samples: int) -> list[Probe]:
        return [self.probe(inputs, length, sample) for sample in range(samples)]

    def make_chains(self, rng: random.Random, letters: int, hops: int, taken: set[str]) -> Chains:
        """``self.chains`` chains of ``hops`` hops with variables of ``letters`` letters and numbers not in
        ``taken`` (which they join)."""
        names: list[list[str]] = []
        seen = {"VAR"}
        for _ in range(self.chains):
            chain: list[str] = []
            while len(chain) < hops + 1:
                name = "".join(rng.choices(string.ascii_uppercase, k=letters))
                if name not in seen:
                    seen.add(name)
                    chain.append(name)
            names.append(chain)
        values: list[str] = []
        while len(values) < self.chains:
            value = str(rng.randint(10000, 99999))
            if value not in taken:
                taken.add(value)
                values.append(value)
        lines = [
            [f"VAR {chain[0]} = {value}"] + [f"VAR {chain[j + 1]} = VAR {chain[j]} " for j in range(hops)]
            for chain, value in zip(names, values, strict=True)
        ]
        # A random interleaving of the chains that keeps each chain's order.
        order = [c for c in range(self.chains) for _ in range(hops + 1)]
        rng.shuffle(order)
        done = [0] * self.chains
        statements = []
        for c in order:
            statements.append(lines[c][done[c]])
            done[c] += 1
        return Chains(names, values, statements)

    def section(self, inputs: TaskInputs, chains: Chains, hops: int) -> tuple[list[int], list[list[int]], list[int]]:
        """The tokens of one instruction, statement pieces and question (with RULER's answer prefix)."""
        lines = self.haystack == "repeat"
        instruction = inputs.encode(INSTRUCTION + ("\n" if lines else "\n\n"))
        statements = [
            inputs.encode("\n" + statement if lines else " " + statement.strip() + ".")
            for statement in chains.statements
        ]
        value = chains.values[0]
        question = inputs.encode(
            "\n" + QUESTION.format(value=value) + ANSWER_PREFIX.format(count=hops + 1, value=value)
        )
        return instruction, statements, question

    def hide(self, rng: random.Random, haystack: Haystack, statements: list[list[int]]) -> list[int]:
        """The haystack with the statements at sorted random insertion points."""
        offsets = sorted(haystack.random_offset(rng) for _ in statements)
        return weave(haystack.tokens, zip(offsets, statements, strict=True))

    def probe(self, inputs: TaskInputs, length: int, sample: int) -> Probe:
        """The probe of one sample."""
        rng = self.rng(inputs, length, sample)
        taken: set[str] = set()
        chains = self.make_chains(rng, 5, self.hops, taken)
        instruction, statements, question = self.section(inputs, chains, self.hops)
        prefix = [] if inputs.bos is None else [inputs.bos]

        example_parts: tuple[list[int], list[list[int]], list[int]] | None = None
        example_answer: list[int] = []
        example_budget = 0
        if self.fewshot:
            example_hops = min(EXAMPLE_HOPS, self.hops)
            example = self.make_chains(rng, 3, example_hops, taken)
            example_parts = self.section(inputs, example, example_hops)
            example_answer = inputs.encode(" ".join(example.names[0]) + "\n\n")
            fixed = sum(map(len, example_parts[1])) + len(example_parts[0]) + len(example_parts[2])
            example_budget = max(0, min(EXAMPLE_TOKENS, length // 8) - fixed - len(example_answer))

        fixed = len(prefix) + len(instruction) + sum(map(len, statements)) + len(question)
        if example_parts is not None:
            fixed += sum(map(len, example_parts[1])) + len(example_parts[0]) + len(example_parts[2])
            fixed += len(example_answer) + example_budget
        budget = budget_left(self.name, length, fixed)

        if self.haystack == "repeat":
            main = noise_haystack(inputs.encode, budget, between="lines")
            rest = noise_haystack(inputs.encode, example_budget, between="lines")
        else:
            both = text_haystack(inputs, sample, budget + example_budget)
            main = Haystack(both.tokens[:budget], None, both.source)
            rest = Haystack(both.tokens[budget:], None, both.source)

        context = list(prefix)
        if example_parts is not None:
            example_instruction, example_statements, example_question = example_parts
            context += example_instruction + self.hide(rng, rest, example_statements)
            context += example_question + example_answer
        example_tokens = len(context) - len(prefix)
        context += instruction + self.hide(rng, main, statements)
        check_exact(self.name, length, context, question)
        return Probe(
            context=tuple(context),
            question=tuple(question),
            expected=tuple(chains.names[0]),
            params=(("chains", self.chains), ("hops", self.hops), ("example", example_tokens)),
            source=main.source,
            max_new_tokens=TOKENS_TO_GENERATE,
            stop=(),
        )


@hookimpl
def register_tasks(register):  # type: ignore[no-untyped-def]
    register(VariableTracking)
