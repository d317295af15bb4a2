"""The request kinds a task's probe is run as (kvcompare.task): the prompt prefilled in chunks under the policy
and limit, as the latency pass prefills, then either the expected answer fed as decoding would feed it
(``answer``) or greedy decoding (``generate``). Neither is timed for speed; both report their wall time.

In the prefill setting (``context`` given) the prompt's first ``context`` tokens are prefilled, the cache is
compressed once, and the rest of the prompt (the question, unless it was compressed with the context) and the
answer run on a cache that only grows.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import torch

from kvcompare.config import CacheConfig
from kvcompare.engine.cache import BoundedKVCache
from kvcompare.engine.executor import Executor
from kvcompare.policy import KVPolicy


@dataclasses.dataclass(frozen=True)
class Answered:
    """An ``answer`` request's result: ``matched`` leading answer tokens were the arg-max (all of them: greedy
    decoding would produce the answer exactly) and ``logprob`` is the answer's teacher-forced log-probability
    (nats, summed over its tokens)."""

    matched: int
    logprob: float
    wall_s: float


@dataclasses.dataclass(frozen=True)
class Generated:
    """A ``generate`` request's result: the greedily decoded token ids (at most ``max_new_tokens``)."""

    tokens: tuple[int, ...]
    wall_s: float


@torch.inference_mode()
def answer(
    executor: Executor,
    prompt: Sequence[int],
    expected: Sequence[int],
    policy: KVPolicy,
    config: CacheConfig,
    prefill_chunk: int,
    context: int | None = None,
) -> Answered:
    """Prefill ``prompt`` in chunks of ``prefill_chunk`` under ``policy`` and ``config``, then feed ``expected``
    one token at a time.

    Greedy decoding feeds back its own arg-max; while that equals the answer's next token, it is fed exactly
    what is fed here, through the same evictions. So the answer is generated exactly iff every answer token is
    the arg-max here, and one pass gives both the exact match and the teacher-forced log-probability.
    """
    begin = time.perf_counter()
    ids = torch.tensor(list(prompt), device=executor.device).view(1, -1)
    cache = executor.new_cache(policy, config, capacity=ids.shape[1] + len(expected))
    logprob, matched, on_track = 0.0, 0, True
    with executor.attached():
        last = _prefill(executor, cache, ids, prefill_chunk, context)
        for index, token in enumerate(expected):
            scores = torch.log_softmax(last[0].float(), dim=-1)
            logprob += float(scores[token])
            on_track = on_track and int(scores.argmax()) == token
            matched += on_track
            if index + 1 < len(expected):
                logits, _ = executor.forward(cache, torch.tensor([[token]], device=executor.device), last_only=True)
                last = logits[:, -1]
    executor.evict_timer.take_seconds()  # a probe is not timed for speed: drop its eviction spans
    executor.compress_timer.take_seconds()
    return Answered(matched, logprob, time.perf_counter() - begin)


@torch.inference_mode()
def generate(
    executor: Executor,
    prompt: Sequence[int],
    policy: KVPolicy,
    config: CacheConfig,
    prefill_chunk: int,
    max_new_tokens: int,
    done: Callable[[Sequence[int]], bool] = lambda tokens: False,
    eos: int | None = None,
    context: int | None = None,
) -> Generated:
    """Prefill ``prompt`` under ``policy`` and ``config`` (in the prefill setting, compressed once after its first
    ``context`` tokens), then decode greedily, each token fed back through the same evictions, until
    ``max_new_tokens`` tokens, the ``eos`` token (not kept), or ``done(tokens)``."""
    begin = time.perf_counter()
    ids = torch.tensor(list(prompt), device=executor.device).view(1, -1)
    cache = executor.new_cache(policy, config, capacity=ids.shape[1] + max_new_tokens)
    produced: list[int] = []
    with executor.attached():
        last = _prefill(executor, cache, ids, prefill_chunk, context)
        while len(produced) < max_new_tokens:
            token = int(last[0].argmax())
            if token == eos:
                break
            produced.append(token)
            if done(produced) or len(produced) == max_new_tokens:
                break
            logits, _ = executor.forward(cache, torch.tensor([[token]], device=executor.device), last_only=True)
            last = logits[:, -1]
    executor.evict_timer.take_seconds()
    executor.compress_timer.take_seconds()
    return Generated(tuple(produced), time.perf_counter() - begin)


def _prefill(
    executor: Executor, cache: BoundedKVCache, ids: torch.Tensor, chunk: int, context: int | None
) -> torch.Tensor:
    """Prefill ``ids`` (``[1, n]``) in chunks; in the prefill setting (``context`` given) compress once after the
    first ``context`` tokens and prefill the rest on the compressed cache. Returns the last position's logits."""
    if context is None or context >= ids.shape[1]:
        last = executor.prefill(cache, ids, chunk)
        if context is not None:
            executor.compress(cache)
        return last
    executor.prefill(cache, ids[:, :context], chunk)
    executor.compress(cache)
    return executor.prefill(cache, ids[:, context:], chunk)
