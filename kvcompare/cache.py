"""The KV cache the executor owns: preallocated buffers written in place, with slots reused after eviction.

Compressed layers share one buffer ``[2 (key, value), layers, batch, kv_heads, slots, head_dim]``, with as
many slots as the largest layer budget (the limit, unless ``--layer-budget`` shares it unevenly; a layer's
slots beyond its budget are blocked and never attended). Until the first eviction they fill in time order.
An eviction only chooses victim slots; the next tokens are written straight into them, so nothing that stays
is moved (shift mode re-rotates, in place, just the keys whose rank changed). Each slot records its token
index, from which the attention masks are built. Skip layers keep their full history in a buffer of their
own, in time order. Nothing is concatenated per step, unlike transformers' ``DynamicLayer``, which copies
the whole cache on every token. A batched quality pass (kvcompare.batched) gives each cell's cache its row of
buffers shared by the batch (:class:`CacheStorage`), written in place the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch

from kvcompare.budgets import compressed_layer_budgets
from kvcompare.config import CacheConfig, ConfigError
from kvcompare.eviction import BLOCKED, VictimChooser, rank_shift
from kvcompare.memory import ensure_fits
from kvcompare.policy import KVPolicy
from kvcompare.rope import Rotary
from kvcompare.signals import SignalRecorder


class CacheLimitError(RuntimeError):
    """The cache would exceed its limit: a bug in the executor, never expected in a run."""


def check_skip_layers(skip_layers: tuple[int, ...] | list[int], num_layers: int) -> None:
    """Skip layers must exist in the model."""
    bad = [i for i in skip_layers if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(f"--skip-layers {list(skip_layers)}: the model has layers 0..{num_layers - 1}, not {bad}")


def compressed_layers(policy: KVPolicy, config: CacheConfig, num_layers: int) -> tuple[int, ...]:
    """The layers a cell's cache bounds: none for an unbounded policy, else every layer but the skip layers."""
    if not policy.bounded or config.limit is None:
        return ()
    return tuple(i for i in range(num_layers) if i not in config.skip_layers)


def needs_keys_as_written(config: CacheConfig, dtype: torch.dtype) -> bool:
    """Whether a cache keeps each key as written (``CacheStorage.c_key0``): shift mode in bfloat16/float16,
    where re-rotating a key again and again would accumulate rounding."""
    return config.positions == "shift" and dtype.itemsize < 4


def visible_slots(tokens: torch.Tensor, seen: int, q_len: int, window: float | None = None) -> torch.Tensor:
    """Which slots each of a chunk's ``q_len`` queries may attend, from the slots' token indices ``[..., slots]``
    (the chunk's first token is ``seen``): a held token no newer than the query, and on a layer with a sliding
    ``window`` one of the query's last ``window`` tokens (token > query - window, as transformers' sliding
    masks). Returns ``[..., q_len, slots]``."""
    tokens = tokens.unsqueeze(-2)
    if q_len == 1 and window is None:  # every held token is older than the one query
        return tokens >= 0
    query = torch.arange(seen, seen + q_len, device=tokens.device).unsqueeze(-1)
    visible = (tokens >= 0) & (tokens <= query)
    return visible if window is None else visible & (tokens > query - window)


@functools.lru_cache(maxsize=16)
def _prefix_mask(q_len: int, kv_len: int, device: torch.device, window: float | None) -> torch.Tensor:
    mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(diagonal=kv_len - q_len)
    if window is not None:
        mask = mask.triu(diagonal=kv_len - q_len - int(window) + 1)
    return mask


def prefix_mask(
    q_len: int, kv_len: int, device: torch.device, window: float | None = None
) -> tuple[torch.Tensor | None, bool]:
    """``(mask, is_causal)`` for keys in time order from the first token to the chunk's last: every earlier key,
    the chunk causally; on a layer with a sliding ``window``, only each query's last ``window`` tokens."""
    if window is not None and kv_len <= window:
        window = None  # every query sees every earlier token anyway
    if window is None and q_len == 1:
        return None, False
    if window is None and q_len == kv_len:
        return None, True
    return _prefix_mask(q_len, kv_len, device, window), False


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """Shapes the cache is built for."""

    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    batch: int = 1
    heads: int | None = None  # query heads (None: as many as kv_heads)


@dataclasses.dataclass(frozen=True)
class CacheStorage:
    """The buffers a cache writes in place: one cache's own, or its row of a batch's (see kvcompare.batched).

    :meth:`BoundedKVCache.update` writes :data:`UPDATED` (what the model computes); the cache's own bookkeeping
    in ``make_room`` writes the rest. A batch row that shares another row's computation is given only the
    former, by :meth:`copy_updated`.
    """

    c_kv: torch.Tensor  # [2, compressed layers, batch, kv_heads, slots, head_dim], zeros
    c_token: torch.Tensor  # [compressed layers, batch, kv_heads, slots] int64, all -1
    f_kv: torch.Tensor  # [2, full layers, batch, kv_heads, capacity, head_dim]
    # Shift mode in bfloat16/float16 only (else None): each slot's key as written, [compressed layers, batch,
    # kv_heads, slots, head_dim], and the rotation it has had since, [compressed layers, batch, kv_heads, slots].
    c_key0: torch.Tensor | None = None
    c_moved: torch.Tensor | None = None

    #: The buffers the model's keys and values are written to (by ``update``); the others are bookkeeping.
    UPDATED: ClassVar[tuple[str, ...]] = ("c_kv", "f_kv", "c_key0")

    @classmethod
    def allocate(
        cls,
        layout: CacheLayout,
        compressed: int,
        slots: int,
        capacity: int,
        full: int,
        rows: tuple[int, ...] = (),
        keys_as_written: bool = False,
    ) -> CacheStorage:
        """Buffers for ``layout``; ``rows`` (e.g. ``(n,)``) puts that many independent caches in front;
        ``keys_as_written`` adds ``c_key0`` and ``c_moved`` (shift mode in a low-precision dtype)."""
        b, h, d, device = layout.batch, layout.kv_heads, layout.head_dim, layout.device
        cells = math.prod(rows) * b * h
        slot_bytes = (2 + keys_as_written) * d * layout.dtype.itemsize + 8 * (1 + keys_as_written)
        ensure_fits(
            cells * (compressed * slots * slot_bytes + 2 * full * capacity * d * layout.dtype.itemsize),
            device,
            "the KV cache",
        )
        c_kv = torch.zeros(*rows, 2, compressed, b, h, slots, d, dtype=layout.dtype, device=device)
        c_token = torch.full((*rows, compressed, b, h, slots), -1, dtype=torch.long, device=device)
        return cls(
            c_kv,
            c_token,
            torch.empty(*rows, 2, full, b, h, capacity if full else 0, d, dtype=layout.dtype, device=device),
            torch.zeros_like(c_kv[..., 0, :, :, :, :, :]) if keys_as_written else None,
            torch.zeros_like(c_token) if keys_as_written else None,
        )

    def row(self, index: int) -> CacheStorage:
        """The buffers of row ``index`` of a batch's storage: contiguous views, written in place."""
        key0, moved = self.c_key0, self.c_moved
        return CacheStorage(
            self.c_kv[index],
            self.c_token[index],
            self.f_kv[index],
            None if key0 is None else key0[index],
            None if moved is None else moved[index],
        )

    def copy_updated(self, source: int, rows: slice, f_len: int) -> None:
        """Give batch ``rows`` everything ``update`` has written into row ``source`` (the first ``f_len`` tokens
        of the full layers): the rows held the same tokens and were computed as that row."""
        for name in self.UPDATED:
            buffer = getattr(self, name)
            if buffer is None:
                continue
            if name == "f_kv":
                buffer[rows, ..., :f_len, :] = buffer[source : source + 1, ..., :f_len, :]
            else:
                buffer[rows] = buffer[source : source + 1]


class BoundedKVCache:
    """A KV cache whose compressed layers never hold more than ``config.limit`` tokens.

    The model calls :meth:`update` once per layer per forward pass (the Hugging Face cache protocol), and
    kvcompare's attention function asks :meth:`attention_mask` for each layer's mask; the executor calls
    :meth:`make_room` before and :meth:`advance` after each chunk.
    """

    def __init__(
        self,
        layout: CacheLayout,
        policy: KVPolicy,
        config: CacheConfig,
        *,
        capacity: int,
        rotary: Rotary | Sequence[Rotary | None] | None,
        check_every_eviction: bool = False,
        storage: CacheStorage | None = None,
    ) -> None:
        if config.positions == "shift" and rotary is None:
            raise ValueError("shift mode needs the model's rotary embedding")
        per_layer = list(rotary) if isinstance(rotary, Sequence) else [rotary] * layout.num_layers
        check_skip_layers(config.skip_layers, layout.num_layers)
        self.layout = layout
        self.config = config
        self.policy = policy.fresh()  # no state carried over from another cell or pass
        self.limit = config.limit if policy.bounded else None
        self.positions = config.positions
        self.evict_block = config.evict_block
        self.evictions = 0
        self.seen = 0  # tokens fed so far: the true position of the next token

        compressed = compressed_layers(policy, config, layout.num_layers)
        full = [i for i in range(layout.num_layers) if i not in compressed]
        # Shift mode re-rotates the compressed keys with their layers' rotaries: (rotary, its compressed layers,
        # or None for all of them); layers without RoPE (None) are in no group.
        groups: dict[int, tuple[Rotary, list[int]]] = {}
        for n, layer in enumerate(compressed):
            if (own := per_layer[layer]) is not None:
                groups.setdefault(id(own), (own, []))[1].append(n)
        self._rotary_groups = [
            (own, None if len(members) == len(compressed) else torch.tensor(members, device=layout.device))
            for own, members in groups.values()
        ]
        self._slot = {layer: ("c", n) for n, layer in enumerate(compressed)}
        self._slot.update({layer: ("f", n) for n, layer in enumerate(full)})
        h, d = layout.kv_heads, layout.head_dim
        self.budgets = compressed_layer_budgets(config, layout.num_layers) if self.limit is not None else []
        self._budget_array = np.asarray(self.budgets, dtype=np.int64)  # for the per-chunk arithmetic on `held`
        self.smallest = min(self.budgets, default=0)  # the first layer to fill
        if self.budgets and self.smallest < config.budget_reserve():
            raise ConfigError(f"layer budgets {self.budgets} leave a layer less than a chunk of room")
        # Shift mode in bfloat16/float16: each slot's key as written and its rotation since, so a key that moves
        # again and again is rebuilt from the original instead of accumulating rounding (Rotary.rotate_rows_from_).
        low_precision = needs_keys_as_written(config, layout.dtype) and bool(self.budgets)
        if storage is None:
            slots = max(self.budgets, default=0)
            storage = CacheStorage.allocate(
                layout, len(compressed), slots, capacity, len(full), keys_as_written=low_precision
            )
        if low_precision and storage.c_key0 is None:
            raise ValueError("shift mode in a low-precision dtype needs storage with the keys as written")
        # Zeros, not torch.empty: once slots are reused, a never-written slot is attended (masked) and handed
        # to policies, and uninitialised memory may hold NaN (0 x NaN in attention; NaN != NaN in the edit check).
        self.storage = storage
        self.c_kv = storage.c_kv
        self.f_kv = storage.f_kv
        # Per slot: the original token index (-1 = empty, BLOCKED = beyond the layer's budget). In shift mode a
        # held key is rotated at its rank among the held tokens, counted to end just before the next token:
        # derived, so not stored.
        self.c_token = storage.c_token
        slots = self.c_token.shape[-1]
        if self.budgets and slots < max(self.budgets):
            raise ValueError(f"{slots} slots cannot hold layer budgets up to {max(self.budgets)}")
        # Some layer has slots beyond its budget (blocked): per-layer budgets, or a batch row in a wider buffer.
        self.uneven = any(budget < slots for budget in self.budgets)
        for n, budget in enumerate(self.budgets):
            self.c_token[n, ..., budget:] = BLOCKED
        self.victims = VictimChooser(self.policy, self.c_token, self.budgets, check_every_eviction)
        needs = self.policy.needs()
        self.recorder = (
            SignalRecorder(needs, self.c_token, layout.heads or h, d, layout.dtype) if needs and self.budgets else None
        )
        self.c_key0 = storage.c_key0 if low_precision else None
        self.c_moved = storage.c_moved if low_precision else None
        self.held = np.zeros(len(compressed), dtype=np.int64)  # tokens each compressed layer holds
        self.f_len = 0
        self.reused = False  # once slots are reused, compressed keys are no longer in time order
        self._write_index: torch.Tensor | None = None  # slots the current chunk goes to, expanded over head_dim
        self._spare = self.c_token[..., :0]  # freed slots the last chunk did not fill
        self._shared_masks: dict[float | None, torch.Tensor] = {}  # this chunk's mask by window, victims uniform
        self.peak_bytes = 0

    # -- the Hugging Face cache protocol ---------------------------------------------------------
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this chunk's keys and values in place; return the layer's whole cache as views."""
        group, n = self._slot[layer_idx]
        chunk = key_states.shape[2]
        if group == "c" and self.reused:
            if self._write_index is None or self._write_index.shape[-2] != chunk:
                raise CacheLimitError(f"layer {layer_idx} was given {chunk} tokens without make_room() for them")
            index = self._write_index[n]
            self.c_kv[0, n].scatter_(2, index, key_states)
            self.c_kv[1, n].scatter_(2, index, value_states)
            if self.c_key0 is not None:
                self.c_key0[n].scatter_(2, index, key_states)
            if self.uneven:  # a layer attends its own budget of slots, never the blocked ones beyond it
                budget = self.budgets[n]
                return self.c_kv[0, n, :, :, :budget], self.c_kv[1, n, :, :, :budget]
            return self.c_kv[0, n], self.c_kv[1, n]
        buf, start = (self.c_kv, self.c_len) if group == "c" else (self.f_kv, self.f_len)
        end = start + chunk
        if end > (self.smallest if group == "c" else buf.shape[4]):
            what = "limit" if group == "c" else "capacity"
            raise CacheLimitError(f"layer {layer_idx} would hold {end} tokens, over its {what} of {buf.shape[4]}")
        buf[0, n, :, :, start:end] = key_states
        buf[1, n, :, :, start:end] = value_states
        if group == "c" and self.c_key0 is not None:
            self.c_key0[n, :, :, start:end] = key_states
        return buf[0, n, :, :, :end], buf[1, n, :, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def attention_mask(
        self, layer_idx: int, q_len: int, kv_len: int, window: float | None = None
    ) -> tuple[torch.Tensor | None, bool]:
        """``(mask, is_causal)`` for the chunk's queries over what :meth:`update` returned for this layer;
        ``window``: the layer's sliding window, if the model gives it one (see :func:`visible_slots`).

        Reused slots are in no order: a query at position p sees a slot iff ``0 <= token <= p``, a
        ``[batch, kv_heads, q_len, slots]`` mask made from the slots' token indices. While every layer and
        head has evicted alike (``victims.uniform``: StreamingLLM, recent), they hold the same tokens in the
        same slots and one ``[batch, 1, q_len, slots]`` mask serves them all (one per window). A decode step
        over a full buffer of a layer without a window needs none.
        """
        group, n = self._slot[layer_idx]
        if group == "f" or not self.reused:
            return prefix_mask(q_len, kv_len, self.c_kv.device, window)
        if q_len == 1 and self._spare.shape[-1] == 0 and not self.uneven and window is None:
            return None, False
        if not self.victims.uniform:
            return visible_slots(self.c_token[n, ..., :kv_len], self.seen, q_len, window), False
        if window not in self._shared_masks:  # made once per chunk, for every layer with this window
            self._shared_masks[window] = visible_slots(self.c_token[0, :, :1], self.seen, q_len, window)
        return self._shared_masks[window], False

    def observe(
        self,
        layer_idx: int,
        query: torch.Tensor,
        key: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        scaling: float | None,
    ) -> None:
        """Show the signal recorder a compressed layer's chunk (nothing happens for a policy that reads none)."""
        group, n = self._slot[layer_idx]
        if self.recorder is not None and group == "c":
            self.recorder.observe(n, self.seen, query, key, mask, is_causal, scaling)

    @property
    def rows(self) -> int:
        """How many sequences the model is fed per chunk."""
        return self.layout.batch

    def spans(self, layer_idx: int) -> list[tuple[int, int, int]] | None:
        """Rows attended separately (see :meth:`kvcompare.batched.BatchedKVCache.spans`); one cache: all at once."""
        return None

    def attended(self, chunk: int) -> int:
        """Slots of the compressed layers the next ``chunk``'s attention spans: the held tokens in time order
        and the chunk, or once slots are reused every slot a layer may use."""
        return self.c_len + chunk if not self.reused else max(self.budgets)

    def filling(self, chunk: int) -> bool:
        """Whether the next ``chunk`` tokens just extend the held tokens in time order (no eviction)."""
        return self.limit is None or (not self.reused and self.c_len + chunk <= self.smallest)

    @property
    def alike(self) -> bool:
        """Whether every compressed layer and head holds the same tokens in the same slots (one mask serves all)."""
        return not self.uneven and (not self.reused or self.victims.uniform)

    # -- executor side ---------------------------------------------------------------------------
    def make_room(self, chunk: int) -> bool:
        """Choose the slots the next ``chunk`` tokens go to, evicting if the compressed layers are full.

        An eviction frees slots down to ``limit - chunk`` held tokens, or further to free at least
        ``evict_block`` at once (amortised eviction); the chunk fills freed slots and the rest stay spare
        for the chunks after it. Returns whether any slot work was done (it is timed as eviction).
        """
        if self.limit is None:
            return False
        new = torch.arange(self.seen, self.seen + chunk, device=self.c_token.device)
        if self.filling(chunk):  # still filling in time order
            self.c_token[..., self.c_len : self.c_len + chunk] = new
            return False
        if self.reused and chunk <= self._spare.shape[-1]:
            slots, self._spare = self._spare[..., :chunk], self._spare[..., chunk:]
            self._assign(slots, new)
            return True
        # Every layer frees the same number of slots, its empty ones first: with uneven budgets a layer with
        # room to spare evicts fewer tokens, or none.
        empty = self._budget_array - self.held
        count = min(self.smallest, max(chunk, int(empty.min()) + self.evict_block))
        signals = None if self.recorder is None else self.recorder.snapshot(self.seen, chunk, self.victims.budgets)
        freed = self.victims.choose(self.c_kv[0], self.c_token, self.c_len, count, signals)
        if self.recorder is not None:
            self.recorder.forget(freed)
        if self.positions == "shift":
            self._rerotate(*rank_shift(self.c_token, freed, self.victims.uniform))
        if freed.shape[-1] > chunk:  # the freed slots the chunk does not fill are left empty
            self.c_token.scatter_(-1, freed[..., chunk:], -1)
        self.held = np.minimum(self.held, self._budget_array - count)
        self.reused = True
        self.evictions += 1
        self._assign(freed[..., :chunk], new)
        self._spare = freed[..., chunk:]
        return True

    def _rerotate(self, rows: torch.Tensor, moves: torch.Tensor | int) -> None:
        """Move the keys of ``rows`` (flat indices into the compressed keys) by ``moves`` positions, each with
        its layer's rotary; the keys of layers without RoPE stay as they are."""
        d = self.layout.head_dim
        keys = self.c_kv[0].view(-1, d)
        per_layer = self.c_token[0].numel()  # flat rows of one compressed layer
        for rotary, members in self._rotary_groups:
            picked, moved = rows, moves
            if members is not None:  # layers with other frequencies, or none, share the buffer
                keep = torch.isin(rows.div(per_layer, rounding_mode="floor"), members)
                picked, moved = rows[keep], moves[keep] if isinstance(moves, torch.Tensor) else moves
            if self.c_key0 is not None and self.c_moved is not None:
                rotary.rotate_rows_from_(keys, self.c_key0.view(-1, d), self.c_moved.view(-1), picked, moved)
            else:
                rotary.rotate_rows_(keys, picked, moved)

    def _assign(self, slots: torch.Tensor, new: torch.Tensor) -> None:
        """Give the next chunk's tokens ``slots`` (``[layers, batch, kv_heads, chunk]``), metadata first."""
        self.c_token.scatter_(-1, slots, new.expand(slots.shape))
        if self.c_moved is not None:
            self.c_moved.scatter_(-1, slots, 0)
        self.victims.written(slots)
        self._write_index = slots.unsqueeze(-1).expand(*slots.shape, self.layout.head_dim)

    def advance(self, chunk: int) -> None:
        """Account for a chunk the model has just written into every layer."""
        self._shared_masks.clear()
        self._write_index = None  # the next chunk needs make_room() first
        if self.limit is not None:
            self.held += chunk
            if (self.held > self._budget_array).any():
                raise CacheLimitError(f"compressed layers hold {self.held.tolist()} tokens, over {self.budgets}")
        if self.f_kv.shape[1]:
            self.f_len += chunk
        self.seen += chunk
        self.peak_bytes = max(self.peak_bytes, self.live_bytes())

    @property
    def c_len(self) -> int:
        """The most tokens any compressed layer holds (all hold alike until the first eviction)."""
        return int(self.held.max()) if self.held.size else 0

    def lengths(self) -> dict[int, int]:
        """Tokens held by each layer."""
        return {layer: int(self.held[n] if g == "c" else self.f_len) for layer, (g, n) in self._slot.items()}

    def live_bytes(self) -> int:
        """Bytes of keys and values currently held, over all layers (true bytes held, not slots allocated)."""
        per_token = 2 * self.layout.batch * self.layout.kv_heads * self.layout.head_dim * self.c_kv.element_size()
        return per_token * (int(self.held.sum()) + self.f_kv.shape[1] * self.f_len)

    def take_signal_seconds(self) -> float:
        """Time spent collecting signals since the last call (0 for a policy that reads none)."""
        return 0.0 if self.recorder is None else self.recorder.take_seconds()
