"""The passkey retrieval task (LongLoRA, Landmark attention): can the model still recall one fact under eviction?

A prompt of exactly ``length`` tokens: an instruction, a filler sentence repeated, the line "The pass key is
{key}. Remember it. {key} is the pass key." at a depth, then "What is the pass key? The pass key is". It is
prefilled in chunks under the policy and limit, as the latency pass does; then the key's tokens are fed one
at a time, as decoding would, recording each one's log-probability and whether it was the arg-max.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Sequence

import torch

from kvcompare.config import CacheConfig, ConfigError
from kvcompare.engine.executor import Executor
from kvcompare.policy import KVPolicy

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
        raise ConfigError(f"--depths takes numbers from 0 to 1, not {depth}")
    instruction, needle, question = encode(INSTRUCTION), encode(NEEDLE.format(key=key)), encode(QUESTION)
    if bos is not None:
        instruction = [bos, *instruction]
    budget = length - len(instruction) - len(needle) - len(question)
    if budget < 0:
        fixed = length - budget
        raise ConfigError(f"a passkey prompt needs at least {fixed} tokens with this tokenizer, not {length}")
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


@dataclasses.dataclass(frozen=True)
class Retrieval:
    """What a policy made of one probe."""

    correct: bool  # greedy decoding would produce the answer's tokens exactly
    matched: int  # answer tokens that were the arg-max before the first that was not
    logprob: float  # teacher-forced log-probability of the answer's tokens, summed
    wall_s: float


@torch.inference_mode()
def retrieve(
    executor: Executor, prompt: PasskeyPrompt, policy: KVPolicy, config: CacheConfig, prefill_chunk: int
) -> Retrieval:
    """Prefill the prompt in chunks under the policy, then feed the answer one token at a time.

    Greedy decoding feeds back its own arg-max; while that equals the answer's next token, it is fed exactly
    what is fed here, through the same evictions. So the answer is generated exactly iff every answer token
    is the arg-max here, and one pass gives both the exact match and the teacher-forced log-probability.
    """
    begin = time.perf_counter()
    ids = torch.tensor(prompt.tokens, device=executor.device).view(1, -1)
    cache = executor.new_cache(policy, config, capacity=ids.shape[1] + len(prompt.answer))
    logprob, matched, on_track = 0.0, 0, True
    with executor.attached():
        last = executor.prefill(cache, ids, prefill_chunk)
        for index, token in enumerate(prompt.answer):
            scores = torch.log_softmax(last[0].float(), dim=-1)
            logprob += float(scores[token])
            on_track = on_track and int(scores.argmax()) == token
            matched += on_track
            if index + 1 < len(prompt.answer):
                logits, _ = executor.forward(cache, torch.tensor([[token]], device=executor.device), last_only=True)
                last = logits[:, -1]
    executor.evict_timer.take_seconds()  # retrieval is not timed for speed: drop its eviction spans
    return Retrieval(matched == len(prompt.answer), matched, logprob, time.perf_counter() - begin)
