"""The one executor every policy runs through: chunked forward passes over a cache it owns, timed alike.

Every timer is here, in the same place for every policy (``full`` included), and each reads the clock
only after synchronising the device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from kvcompare.config import CacheConfig
from kvcompare.engine.attention import ATTN_IMPLEMENTATION, CACHE_KEYWORD, forward_cache
from kvcompare.engine.batched import BatchedKVCache
from kvcompare.engine.cache import BoundedKVCache
from kvcompare.engine.cache_protocol import CellCacheLike, KVCacheLike, Room
from kvcompare.engine.compiled import CompiledDecode, CompileStatus
from kvcompare.engine.memory import PeakMemory
from kvcompare.engine.rope import Rotary, layer_rotaries
from kvcompare.engine.storage import CacheLayout
from kvcompare.engine.timing import SpanTimer, now
from kvcompare.policy import KVPolicy


@dataclasses.dataclass
class QualityResult:
    """Teacher-forced scores of a passage of ``n`` tokens: ``nll[i]`` and ``correct[i]`` (each ``[n - 1]``,
    float64 nats and bool) are for predicting token ``i + 1``."""

    nll: np.ndarray
    correct: np.ndarray
    peak_kv_bytes: int  # the most key and value bytes the cell's cache held (prefill: at the end, with the rest fed)
    peak_mem_bytes: int | None  # bytes; None when the pass was batched: the batch's memory is no one cell's
    max_cached: int  # most tokens any compressed layer held while a chunk was attended
    wall_s: float  # the pass's wall time in seconds; in a batch, the batch's divided by its rows
    batch: int = 1  # how many cells shared the pass as rows of one batch


@dataclasses.dataclass
class LatencyResult:
    """One latency pass (:meth:`Executor.generate`): times in seconds, one entry per counted decode step (``gen``
    of them, after the warm-up), memory in bytes. Built by the executor; raises nothing."""

    ttft_s: float  # from the start of the prefill to the first generated token
    step_s: list[float]  # counted decode steps (after warm-up), each from before its eviction to its token
    evict_s: list[float]  # eviction (slot work) time inside each counted step, 0.0 where none was done
    signal_s: list[float]  # signal collection (attention a policy reads) inside each counted step
    generated: list[int]  # the token ids generated: the first after the prefill, then one per decode step
    peak_kv_bytes: int  # the most key and value bytes the cache held
    peak_mem_bytes: int  # the most bytes the pass added to what was in use when it began (engine.memory.PeakMemory)
    compress_s: float | None = None  # the prefill setting: the one compression's time, inside ttft_s (None: none)
    kv_bytes_compressed: int | None = None  # the prefill setting: key and value bytes held right after compressing
    compiled: bool = False  # every counted decode step ran compiled (--compile)
    compile_s: float = 0.0  # seconds compiling, between the TTFT and the decode steps (never inside either)


@dataclasses.dataclass
class DecodeSteps:
    """What :meth:`Executor.decode` measured, one entry per step: times in seconds."""

    step_s: list[float]  # each step, from before its eviction to its next token
    evict_s: list[float]  # slot work (eviction) inside each step
    signal_s: list[float]  # collecting what the policy reads (attention, queries) inside each step
    tokens: list[int]  # the token each step produced
    compiled: list[bool] = dataclasses.field(default_factory=list)  # each step ran compiled (--compile)
    compile_s: list[float] = dataclasses.field(default_factory=list)  # each step's compilation, 0.0 where none


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
        self.rotary: tuple[Rotary | None, ...] = layer_rotaries(model)  # each layer's (None: no RoPE)
        self.evict_timer = SpanTimer(self.device)  # slot work inside forward(), timed without synchronising
        self.compress_timer = SpanTimer(self.device)  # the prefill setting's compression, inside the TTFT
        self.vocab: int = config.vocab_size
        self.compiled: CompiledDecode | None = None  # decode steps compiled (compile_decode_steps), None: eager

    def compile_decode_steps(self, backend: str | Callable[..., Any] | None = None) -> CompileStatus:
        """Run every later decode step (a one-token chunk of a cell's cache) as one compiled step, the same for every
        policy (see kvcompare.engine.compiled); caches built from now on are zero-filled fixed-shape buffers. Compiles
        nothing yet: a latency pass compiles its cache's shape between its TTFT and its first decode step (elsewhere
        the first step of a new shape compiles). Returns the status that records a fallback."""
        self.compiled = CompiledDecode(self.model, self.device, backend)
        return self.compiled.status

    @property
    def compile_status(self) -> CompileStatus:
        """Whether decode steps run compiled, and if they fell back to eager, why."""
        return self.compiled.status if self.compiled is not None else CompileStatus(requested=False, active=False)

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
        """A cache for one cell on this model: its compressed layers' keys and values in a ``[2, layers, 1,
        kv_heads, slots, head_dim]`` buffer (slots: the largest layer budget, ``config.limit`` unless a pyramid
        shares it), its full layers' in a ``[2, layers, 1, kv_heads, capacity, head_dim]`` one (``capacity``
        tokens); ``check_every_eviction`` checks the policy's output at every eviction, not just the first.

        Raises ConfigError for skip layers the model lacks or budgets that leave a layer less than a chunk;
        :class:`~kvcompare.policy.PolicyError` for a policy that asks for signals but scores at write time;
        :class:`~kvcompare.engine.memory.AllocationError` if the buffers would not fit in free memory.
        """
        return BoundedKVCache(
            self.layout,
            policy,
            config,
            capacity=capacity,
            rotary=self.rotary,
            check_every_eviction=check_every_eviction,
            fixed_shape=self.compiled is not None and self.compiled.status.active,
        )

    @torch.inference_mode()
    def forward(self, cache: KVCacheLike, ids: torch.Tensor, last_only: bool = False) -> tuple[torch.Tensor, Room]:
        """Evict as needed, then run one chunk ``ids`` (``[batch, chunk]``, or ``[1, chunk]`` for every row of
        a batched cache); return the logits (``[rows, chunk or 1 with last_only, vocab]``) and what
        ``cache.make_room`` did: :attr:`Room.SLOTS_REUSED` when slot work (an eviction) was done.

        The slot work is timed by :attr:`evict_timer` with device events, never a synchronisation, so that an
        evicting step has the same synchronisation points as `full`'s; read it with ``take_seconds()`` after
        the step's own timer has synchronised. Call it inside :meth:`attached`, as :meth:`score` and
        :meth:`generate` do. Raises what the policy raises while making room, and
        :class:`~kvcompare.engine.cache.CacheLimitError` (a bug) if a layer would exceed its limit.
        """
        chunk = ids.shape[1]
        self.evict_timer.start()
        room = cache.make_room(chunk)
        self.evict_timer.stop()
        if chunk == 1 and self.compiled is not None and isinstance(cache, BoundedKVCache) and cache.fixed_shape:
            logits = self.compiled.step(cache, ids)
            if logits is not None:  # None: compiled steps fell back to eager; the step runs below
                cache.advance(chunk)
                return logits, room
        ids = ids.expand(cache.rows, -1)  # the rows to feed are known once room is made (a batch may fork)
        positions = torch.arange(cache.seen, cache.seen + chunk, device=self.device).expand(cache.rows, -1)
        with forward_cache(cache):
            out = self.model(
                input_ids=ids,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1 if last_only else 0,
                **{CACHE_KEYWORD: cache},
            )
        cache.advance(chunk)
        return out.logits, room

    def new_batch(
        self, cells: Sequence[tuple[KVPolicy, CacheConfig]], capacity: int, check_every_eviction: bool = False
    ) -> BatchedKVCache:
        """The caches of several ``cells`` as the rows of one batch, every full layer of ``capacity`` tokens (see
        :class:`~kvcompare.engine.batched.BatchedKVCache`). Raises ValueError for cells that bound different layers,
        and what :meth:`new_cache` raises for any one cell."""
        return BatchedKVCache(
            self.layout, cells, capacity=capacity, rotary=self.rotary, check_every_eviction=check_every_eviction
        )

    def score(
        self, tokens: torch.Tensor, policy: KVPolicy, config: CacheConfig, context: int | None = None
    ) -> QualityResult:
        """Quality pass: feed ``tokens`` (``[n]``) teacher-forced in chunks of ``stride``; score every token after
        the first. In the prefill setting the first ``context`` tokens are the context: the chunks stop at its end,
        the cache is compressed once, and the chunks go on. Raises whatever the pass raised (the policy's error,
        AllocationError, ...)."""
        (result,) = self.score_batch(tokens, [(policy, config)], context)
        if isinstance(result, Exception):
            raise result
        return result

    def score_batch(
        self, tokens: torch.Tensor, cells: Sequence[tuple[KVPolicy, CacheConfig]], context: int | None = None
    ) -> list[QualityResult | Exception]:
        """Quality passes of several cells over the same ``tokens``, as the rows of one batch.

        Row r runs cell r's policy and cache (see :class:`~kvcompare.engine.batched.BatchedKVCache`); its scores equal
        a pass of that cell alone. The cells must share the stride. Returns each cell's result, or the
        exception its policy raised (the other rows go on). One cell runs exactly as a pass of its own, and
        returns whatever its pass raised (building its cache included); a batch raises what is not one row's.
        ``tokens`` is ``[n]``; each result's scores are ``[n - 1]``. In the prefill setting (one cell only) the cache
        is compressed once after the first ``context`` tokens (None, or ``n - 1`` and more: never, as no scored
        token would come after it). Raises ValueError for cells
        of different strides, or a batch of several cells in the prefill setting.
        """
        strides = {config.stride for _, config in cells}
        if len(strides) != 1:
            raise ValueError(f"cells of one batch must share the stride, not {sorted(strides)}")
        if len(cells) > 1 and any(config.compression == "prefill" for _, config in cells):
            raise ValueError("the prefill setting's quality passes run one cell at a time, not as a batch")
        (stride,) = strides
        started = time.perf_counter()
        length = tokens.numel()
        ids = tokens.to(self.device).view(1, -1)
        count = len(cells)
        cache: KVCacheLike
        rows: Sequence[CellCacheLike]
        row_of: Sequence[int]
        failed: Mapping[int, Exception]
        nll = np.empty((count, length - 1), dtype=np.float64)  # by batch row
        correct = np.empty((count, length - 1), dtype=bool)
        max_cached = [0] * count
        try:  # building the cache runs the policy's code too (its constructor, needs()) and allocates
            memory = PeakMemory(self.device)  # before the cache: its buffers are the pass's memory
            if count == 1:
                cache = self.new_cache(*cells[0], capacity=length)
                rows, row_of, failed = [cache], [0], {}
            else:
                cache = self.new_batch(cells, capacity=length)
                rows, row_of, failed = cache.caches, cache.row_of, cache.failed
            split = length - 1 if context is None else min(context, length - 1)
            with self.attached():
                for start, end in chunk_bounds(length - 1, stride, split):
                    if start == split:  # the prefill setting (a single cell): the context is fed
                        self.compress(rows[0])
                    logits, _ = self.forward(cache, ids[:, start:end])
                    targets = ids[0, start + 1 : end + 1]
                    for row in range(logits.shape[0]):  # row by row: one row's scores stay in the CPU's cache
                        logp = torch.log_softmax(logits[row].float(), dim=-1)
                        nll[row, start:end] = (-logp.gather(1, targets.unsqueeze(1)).squeeze(1)).cpu().numpy()
                        correct[row, start:end] = (logp.argmax(dim=-1) == targets).cpu().numpy()
                    shared = logits.shape[0] - 1  # the rows not run on their own share this row's scores
                    nll[shared + 1 :, start:end] = nll[shared, start:end]
                    correct[shared + 1 :, start:end] = correct[shared, start:end]
                    max_cached = [max(most, row.compressed_len) for most, row in zip(max_cached, rows, strict=True)]
                    memory.sample()
        except Exception as err:  # one cell's failure, out of memory included, is that cell's
            if count > 1:
                raise
            return [err]
        self.evict_timer.take_seconds()  # a quality pass's slot work is not timed: drop its spans
        self.compress_timer.take_seconds()
        wall_s = (time.perf_counter() - started) / count
        return [
            failed.get(row)
            or QualityResult(
                nll[row],
                correct[row],
                rows[row].peak_kv_bytes,
                memory.peak if count == 1 else None,
                max_cached[row],
                wall_s,
                count,
            )
            for row in row_of
        ]

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
        of the prefill to the first generated token; in the prefill setting it includes the one compression after
        the prompt (also given alone, ``compress_s``), so every decode step runs on the compressed cache. Each decode
        step's time runs from before its eviction to its next token; the first ``warmup`` steps are not counted.
        With compiled decode steps a new cache shape compiles between the TTFT and the first decode step, outside
        both (a counted step that compiled would be an error). ``prompt`` is ``[n]`` token ids. Raises what
        :meth:`new_cache` and :meth:`forward` raise, and CompileInTimedStepError.
        """
        ids = prompt.to(self.device).view(1, -1)
        memory = PeakMemory(self.device)  # before the cache: its buffers are the pass's memory
        cache = self.new_cache(policy, config, capacity=ids.shape[1] + warmup + gen)
        self.compress_timer.take_seconds()
        with self.attached():
            start = now(self.device)
            logits = self.prefill(cache, ids, prefill_chunk or config.stride)
            memory.sample()  # the prefill's peak: the whole prompt's cache, before any compression
            compressed = self.compress(cache)
            token = greedy(logits)
            ttft = now(self.device) - start
            compress_s = self.compress_timer.take_seconds()  # read after the TTFT's synchronisation
            memory.sample()
            compiling = self.compile_status.compile_s
            if self.compiled is not None:  # the decode steps' shape is final here: compiled between the timed parts
                self.compiled.prepare(cache)
            compiling = self.compile_status.compile_s - compiling
            steps = self.decode(cache, token, warmup + gen, memory)
        if any(steps.compile_s[warmup:]):
            raise CompileInTimedStepError(
                f"a counted decode step compiled after {warmup} warm-up steps: compiling is never timed; more warm-up "
                "steps (--warmup) keep it out of the counted ones, or run without --compile"
            )
        return LatencyResult(
            ttft,
            steps.step_s[warmup:],
            steps.evict_s[warmup:],
            steps.signal_s[warmup:],
            [int(token), *steps.tokens],
            cache.peak_kv_bytes,
            memory.peak,
            compress_s if compressed else None,
            cache.kv_bytes_compressed,
            bool(steps.compiled[warmup:]) and all(steps.compiled[warmup:]),
            compiling + sum(steps.compile_s),
        )

    def compress(self, cache: CellCacheLike) -> bool:
        """The prefill setting's one compression of ``cache`` (see
        :meth:`~kvcompare.engine.cache.BoundedKVCache.compress`), timed by :attr:`compress_timer` without a
        synchronisation, as every policy's (``full``'s included: nothing to do, the same timer). Returns whether it
        compressed; raises what the policy raises."""
        self.compress_timer.start()
        compressed = cache.compress()
        self.compress_timer.stop()
        return compressed

    def prefill(self, cache: KVCacheLike, ids: torch.Tensor, chunk: int) -> torch.Tensor:
        """Feed ``ids`` (``[1, length]``) in chunks of ``chunk``; return the last position's logits (``[1, vocab]``),
        from which :func:`greedy` takes the first generated token. Raises what :meth:`forward` raises."""
        for offset in range(0, ids.shape[1], chunk):
            logits, _ = self.forward(cache, ids[:, offset : offset + chunk], last_only=True)
        return logits[:, -1]

    def decode(
        self, cache: CellCacheLike, token: torch.Tensor, steps: int, memory: PeakMemory | None = None
    ) -> DecodeSteps:
        """Decode ``steps`` tokens greedily after ``token`` (``[1, 1]``), timing each step in seconds from before
        its eviction to its next token. Call it inside :meth:`attached`; calling it again continues the same
        sequence. Raises what :meth:`forward` raises."""
        timed = DecodeSteps([], [], [], [])
        cache.take_signal_seconds()
        self.evict_timer.take_seconds()
        status = self.compile_status
        for _ in range(steps):
            ran, compiling = status.steps, status.compile_s
            begin = now(self.device)
            logits, room = self.forward(cache, token, last_only=True)
            token = greedy(logits[:, -1])
            timed.step_s.append(now(self.device) - begin)
            evict_s = self.evict_timer.take_seconds()  # read after the step's synchronisation
            timed.evict_s.append(evict_s if room is Room.SLOTS_REUSED else 0.0)
            timed.signal_s.append(cache.take_signal_seconds())
            timed.tokens.append(int(token))
            timed.compiled.append(status.steps > ran)
            timed.compile_s.append(status.compile_s - compiling)
            if memory is not None:
                memory.sample()
        return timed


class CompileInTimedStepError(RuntimeError):
    """A counted decode step compiled: its time would be the compiler's, not the step's."""


def chunk_bounds(length: int, stride: int, split: int) -> list[tuple[int, int]]:
    """``(start, end)`` of the chunks of ``stride`` tokens covering ``[0, length)``, with a boundary at ``split``
    (the prefill setting's end of the context; ``split == length``: plain chunks)."""
    return [
        (start, min(start + stride, end))
        for begin, end in ((0, split), (split, length))
        for start in range(begin, end, stride)
    ]


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The arg-max token of last-position logits ``[1, vocab]``, as the next input ``[1, 1]``."""
    return logits.argmax(dim=-1, keepdim=True)
