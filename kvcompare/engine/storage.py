"""The buffers a cache writes in place (:class:`CacheStorage`) and the shapes they are built for
(:class:`CacheLayout`): one cache's own, or its row of a batch's (kvcompare.engine.batched)."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from kvcompare.config import CacheConfig
from kvcompare.engine.memory import ensure_fits


def needs_keys_as_written(config: CacheConfig, dtype: torch.dtype) -> bool:
    """Whether a cache keeps each key as written (``CacheStorage.keys_as_written``): shift mode in
    bfloat16/float16, where re-rotating a key again and again would accumulate rounding (not the prefill setting,
    whose kept keys are re-rotated once)."""
    return config.positions == "shift" and dtype.itemsize < 4 and not config.once  # prefill: keys rotate only once


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """Shapes the cache is built for: keys and values are ``[batch, kv_heads, tokens, head_dim]`` per layer."""

    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    batch: int = 1
    heads: int | None = None  # query heads (None: as many as kv_heads)


@dataclasses.dataclass(frozen=True)
class CacheStorage:
    """The buffers a cache writes in place: one cache's own, or its row of a batch's (see kvcompare.engine.batched).

    :meth:`BoundedKVCache.update` writes :data:`UPDATED` (what the model computes); the cache's own bookkeeping
    in ``make_room`` writes the rest. A batch row that shares another row's computation is given only the
    former, by :meth:`copy_updated`.
    """

    #: Keys and values of the compressed layers, ``[2 (key, value), compressed layers, batch, kv_heads, slots,
    #: head_dim]``, zeros until written.
    compressed_kv: torch.Tensor
    #: The token index each compressed slot holds, ``[compressed layers, batch, kv_heads, slots]`` int64: -1 when
    #: free, :data:`~kvcompare.engine.eviction.BLOCKED` beyond its layer's budget.
    slot_tokens: torch.Tensor
    #: Keys and values of the full layers in time order, ``[2, full layers, batch, kv_heads, capacity, head_dim]``.
    full_kv: torch.Tensor
    #: Shift mode in bfloat16/float16 only (else None): each compressed slot's key as the model wrote it,
    #: ``[compressed layers, batch, kv_heads, slots, head_dim]``.
    keys_as_written: torch.Tensor | None = None
    #: Shift mode in bfloat16/float16 only (else None): the positions each compressed slot's key has been moved
    #: since it was written, ``[compressed layers, batch, kv_heads, slots]`` int64.
    rotation_since_written: torch.Tensor | None = None

    #: The buffers the model's keys and values are written to (by ``update``); the others are bookkeeping.
    UPDATED: ClassVar[tuple[str, ...]] = ("compressed_kv", "full_kv", "keys_as_written")

    @classmethod
    def allocate(
        cls,
        layout: CacheLayout,
        compressed: int,
        slots: int,
        capacity: int,
        full: int,
        rows: tuple[int, ...] = (),
        with_keys_as_written: bool = False,
        zeroed: bool = True,
        zero_full: bool = False,
    ) -> CacheStorage:
        """Buffers for ``layout``: ``compressed`` layers of ``slots`` slots and ``full`` layers of ``capacity``
        tokens; ``rows`` (e.g. ``(n,)``) puts that many independent caches in front of every shape;
        ``with_keys_as_written`` adds :attr:`keys_as_written` and :attr:`rotation_since_written` (shift mode in
        a low-precision dtype); ``zeroed=False`` leaves the compressed keys and values unwritten, for a cache that
        never attends a slot before writing it (the prefill setting); ``zero_full`` zero-fills the full layers' too
        (unwritten otherwise), for a compiled step, which attends every slot of a buffer under a mask. Raises
        :class:`~kvcompare.engine.memory.AllocationError` if they would not fit in the device's free memory."""
        b, h, d, device = layout.batch, layout.kv_heads, layout.head_dim, layout.device
        cells = math.prod(rows) * b * h
        slot_bytes = (2 + with_keys_as_written) * d * layout.dtype.itemsize + 8 * (1 + with_keys_as_written)
        ensure_fits(
            cells * (compressed * slots * slot_bytes + 2 * full * capacity * d * layout.dtype.itemsize),
            device,
            "the KV cache",
        )
        new = torch.zeros if zeroed else torch.empty
        compressed_kv = new(*rows, 2, compressed, b, h, slots, d, dtype=layout.dtype, device=device)
        slot_tokens = torch.full((*rows, compressed, b, h, slots), -1, dtype=torch.long, device=device)
        return cls(
            compressed_kv,
            slot_tokens,
            (torch.zeros if zero_full else torch.empty)(
                *rows, 2, full, b, h, capacity if full else 0, d, dtype=layout.dtype, device=device
            ),
            torch.zeros_like(compressed_kv[..., 0, :, :, :, :, :]) if with_keys_as_written else None,
            torch.zeros_like(slot_tokens) if with_keys_as_written else None,
        )

    def with_compressed_slots(self, layout: CacheLayout, slots: int, zeroed: bool = False) -> CacheStorage:
        """New compressed-layer buffers of ``slots`` slots (every slot free; unwritten unless ``zeroed``), beside this
        storage's full layers (shared, not copied): where the prefill setting moves the tokens it keeps. Raises
        :class:`~kvcompare.engine.memory.AllocationError` if they would not fit in the device's free memory."""
        fresh = CacheStorage.allocate(layout, self.slot_tokens.shape[0], slots, capacity=0, full=0, zeroed=zeroed)
        return dataclasses.replace(fresh, full_kv=self.full_kv)

    def row(self, index: int) -> CacheStorage:
        """The buffers of row ``index`` of a batch's storage (allocated with ``rows=(n,)``): contiguous views,
        written in place, shaped as one cache's. Raises IndexError for a row beyond the batch."""
        written, rotation = self.keys_as_written, self.rotation_since_written
        return CacheStorage(
            self.compressed_kv[index],
            self.slot_tokens[index],
            self.full_kv[index],
            None if written is None else written[index],
            None if rotation is None else rotation[index],
        )

    def copy_updated(self, source: int, rows: slice, full_len: int) -> None:
        """Give batch ``rows`` everything ``update`` has written into row ``source`` (the first ``full_len`` tokens
        of the full layers): the rows held the same tokens and were computed as that row."""
        for name in self.UPDATED:
            buffer = getattr(self, name)
            if buffer is None:
                continue
            if name == "full_kv":
                buffer[rows, ..., :full_len, :] = buffer[source : source + 1, ..., :full_len, :]
            else:
                buffer[rows] = buffer[source : source + 1]
