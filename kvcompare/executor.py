"""The one executor every policy runs through: chunked forward passes over a cache it owns, timed alike.

Every timer is here, in the same place for every policy (``full`` included), and each reads the clock
only after synchronising the device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from kvcompare.attention import ATTN_IMPLEMENTATION, CACHE_KEYWORD
from kvcompare.cache import BoundedKVCache, CacheLayout
from kvcompare.config import CacheConfig
from kvcompare.memory import PeakMemory
from kvcompare.policy import KVPolicy
from kvcompare.rope import Rotary, find_rotary
from kvcompare.timing import now


@dataclasses.dataclass
class QualityResult:
    """Teacher-forced scores: ``nll[i]`` and ``correct[i]`` are for predicting token ``i + 1``."""

    nll: np.ndarray
    correct: np.ndarray
    peak_kv_bytes: int
    peak_mem_bytes: int
    max_cached: int  # most tokens any compressed layer held while a chunk was attended
    wall_s: float


@dataclasses.dataclass
class LatencyResult:
    ttft_s: float
    step_s: list[float]  # counted decode steps (after warm-up)
    evict_s: list[float]  # eviction time inside each counted step
    signal_s: list[float]  # signal collection (attention a policy reads) inside each counted step
    generated: list[int]
    peak_kv_bytes: int
    peak_mem_bytes: int


@dataclasses.dataclass
class DecodeSteps:
    step_s: list[float]  # each step, from before its eviction to its next token
    evict_s: list[float]  # slot work (eviction) inside each step
    signal_s: list[float]  # collecting what the policy reads (attention, queries) inside each step
    tokens: list[int]  # the token each step produced


class Executor:
    """Runs a Hugging Face causal LM over token sequences under a policy, owning its KV cache."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()
        config: Any = model.config
        self._config = config
        param = next(model.parameters())
        self.device = param.device
        heads = config.num_attention_heads
        self.layout = CacheLayout(
            num_layers=config.num_hidden_layers,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            dtype=param.dtype,
            device=param.device,
            heads=heads,
        )
        self.rotary: Rotary = find_rotary(model)

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        """Install kvcompare's attention function (per-layer masks) for the block, then restore the model's own.

        Every pass of the executor runs inside it, so the model is left as it was found for any other use.
        """
        previous = self._config._attn_implementation
        self._config._attn_implementation = ATTN_IMPLEMENTATION
        try:
            yield
        finally:
            self._config._attn_implementation = previous

    def new_cache(
        self, policy: KVPolicy, config: CacheConfig, capacity: int, check_every_eviction: bool = False
    ) -> BoundedKVCache:
        return BoundedKVCache(
            self.layout,
            policy,
            config,
            capacity=capacity,
            rotary=self.rotary,
            check_every_eviction=check_every_eviction,
        )

    @torch.inference_mode()
    def forward(self, cache: BoundedKVCache, ids: torch.Tensor, last_only: bool = False) -> tuple[torch.Tensor, float]:
        """Evict as needed, then run one chunk ``ids`` (``[batch, chunk]``); return logits and eviction seconds.

        Call it inside :meth:`attached`, as :meth:`score` and :meth:`generate` do.
        """
        chunk = ids.shape[1]
        start = now(self.device)
        evicted = cache.make_room(chunk)
        evict_s = now(self.device) - start if evicted else 0.0
        positions = torch.arange(cache.seen, cache.seen + chunk, device=self.device).unsqueeze(0)
        out = self.model(
            input_ids=ids,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1 if last_only else 0,
            **{CACHE_KEYWORD: cache},
        )
        cache.advance(chunk)
        return out.logits, evict_s

    def score(self, tokens: torch.Tensor, policy: KVPolicy, config: CacheConfig) -> QualityResult:
        """Quality pass: feed ``tokens`` teacher-forced in chunks of ``stride``; score every token after the first."""
        started = time.perf_counter()
        length = tokens.numel()
        ids = tokens.to(self.device).view(1, -1)
        cache = self.new_cache(policy, config, capacity=length)
        memory = PeakMemory(self.device)
        nll = np.empty(length - 1, dtype=np.float64)
        correct = np.empty(length - 1, dtype=bool)
        max_cached = 0
        with self.attached():
            for start in range(0, length - 1, config.stride):
                end = min(start + config.stride, length - 1)
                logits, _ = self.forward(cache, ids[:, start:end])
                max_cached = max(max_cached, cache.c_len)
                logp = torch.log_softmax(logits[0].float(), dim=-1)
                targets = ids[0, start + 1 : end + 1]
                nll[start:end] = (-logp.gather(1, targets.unsqueeze(1)).squeeze(1)).cpu().numpy()
                correct[start:end] = (logp.argmax(dim=-1) == targets).cpu().numpy()
                memory.sample()
        return QualityResult(nll, correct, cache.peak_bytes, memory.peak, max_cached, time.perf_counter() - started)

    def generate(
        self,
        prompt: torch.Tensor,
        policy: KVPolicy,
        config: CacheConfig,
        gen: int,
        warmup: int,
        prefill_chunk: int | None = None,
    ) -> LatencyResult:
        """Latency pass: prefill ``prompt`` in chunks under the policy, then decode greedily one token at a time.

        The prefill runs in chunks of ``prefill_chunk`` tokens (default: the stride). TTFT runs from the start
        of the prefill to the first generated token. Each decode step's time runs from before its eviction to
        its next token; the first ``warmup`` steps are not counted.
        """
        ids = prompt.to(self.device).view(1, -1)
        cache = self.new_cache(policy, config, capacity=ids.shape[1] + warmup + gen)
        memory = PeakMemory(self.device)
        with self.attached():
            start = now(self.device)
            token = greedy(self.prefill(cache, ids, prefill_chunk or config.stride))
            ttft = now(self.device) - start
            memory.sample()
            steps = self.decode(cache, token, warmup + gen, memory)
        return LatencyResult(
            ttft,
            steps.step_s[warmup:],
            steps.evict_s[warmup:],
            steps.signal_s[warmup:],
            [int(token), *steps.tokens],
            cache.peak_bytes,
            memory.peak,
        )

    def prefill(self, cache: BoundedKVCache, ids: torch.Tensor, chunk: int) -> torch.Tensor:
        """Feed ``ids`` (``[1, length]``) in chunks of ``chunk``; return the last position's logits (``[1, vocab]``),
        from which :func:`greedy` takes the first generated token."""
        for offset in range(0, ids.shape[1], chunk):
            logits, _ = self.forward(cache, ids[:, offset : offset + chunk], last_only=True)
        return logits[:, -1]

    def decode(
        self, cache: BoundedKVCache, token: torch.Tensor, steps: int, memory: PeakMemory | None = None
    ) -> DecodeSteps:
        """Decode ``steps`` tokens greedily after ``token``, timing each step from before its eviction to its
        next token. Call it inside :meth:`attached`; calling it again continues the same sequence."""
        timed = DecodeSteps([], [], [], [])
        cache.take_signal_seconds()
        for _ in range(steps):
            begin = now(self.device)
            logits, evict_s = self.forward(cache, token, last_only=True)
            token = greedy(logits[:, -1])
            timed.step_s.append(now(self.device) - begin)
            timed.evict_s.append(evict_s)
            timed.signal_s.append(cache.take_signal_seconds())
            timed.tokens.append(int(token))
            if memory is not None:
                memory.sample()
        return timed


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The arg-max token of last-position logits ``[1, vocab]``, as the next input ``[1, 1]``."""
    return logits.argmax(dim=-1, keepdim=True)
