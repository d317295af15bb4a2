"""Several cells' caches as the rows of one batch, so a passage's quality passes read the weights once per chunk.

Every cell of a passage feeds the same tokens through the same model; only the caches differ. Row r of the
batch is cell r: its own :class:`~kvcompare.engine.cache.BoundedKVCache` (policy, limit, position mode, layer
budgets, signals), working in place on row r of buffers that all rows share, so the model reads every row's
keys from one tensor per layer. Rows with smaller limits leave the slots beyond their budgets blocked, and a
query of a row sees a slot of its row iff ``0 <= token <= its position``.

Until a row first evicts it holds the same tokens as every other row that has not evicted yet, and
computes the same thing. So the rows are kept in the order in which they first evict (smallest budget first),
the model runs only the rows that have evicted plus one row for all the others (the shared prefix), and a
row is copied from that shared row when it first evicts. A row whose policy raises is frozen (the model still
runs it, its results are dropped); the others go on.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from kvcompare.config import CacheConfig
from kvcompare.engine.budgets import compressed_layer_budgets
from kvcompare.engine.cache import BoundedKVCache, compressed_layers
from kvcompare.engine.cache_protocol import LayerGroup, LayerSlot, Room
from kvcompare.engine.masks import prefix_mask, visible_slots
from kvcompare.engine.rope import Rotary
from kvcompare.engine.storage import CacheLayout, CacheStorage, needs_keys_as_written
from kvcompare.policy import KVPolicy

if TYPE_CHECKING:
    from kvcompare.engine.cache_protocol import KVCacheLike


class BatchedKVCache:
    """The caches of several cells over the same tokens, one batch row each (see the module docstring).

    The cells must bound the same layers (all bounded with the same skip layers, or all unbounded). It speaks
    the cache protocol (:class:`~kvcompare.engine.cache_protocol.KVCacheLike`) that the executor and kvcompare's
    attention function use, with :attr:`rows` sequences fed per chunk. Raises ValueError for cells that bound
    different layers, and whatever building a row's :class:`~kvcompare.engine.cache.BoundedKVCache` raises.
    """

    def __init__(
        self,
        layout: CacheLayout,
        cells: Sequence[tuple[KVPolicy, CacheConfig]],
        *,
        capacity: int,
        rotary: Rotary | Sequence[Rotary | None] | None,
        check_every_eviction: bool = False,
    ) -> None:
        layers = {compressed_layers(policy, config, layout.num_layers) for policy, config in cells}
        if len(layers) != 1:
            raise ValueError(f"cells bounding different layers cannot share a batch: {sorted(layers)}")
        compressed = layers.pop()
        budgets = [compressed_layer_budgets(config, layout.num_layers) if compressed else [] for _, config in cells]
        slots = max((max(b) for b in budgets if b), default=0)
        full = layout.num_layers - len(compressed)
        keys_as_written = bool(compressed) and any(needs_keys_as_written(config, layout.dtype) for _, config in cells)
        self._storage = CacheStorage.allocate(
            layout, len(compressed), slots, capacity, full, rows=(len(cells),), with_keys_as_written=keys_as_written
        )
        # Row order: the cells whose smallest layer budget fills first come first (stable among equals).
        order = sorted(range(len(cells)), key=lambda i: min(budgets[i], default=capacity))
        self._row_of = [order.index(cell) for cell in range(len(cells))]  # cell index -> batch row
        self._caches = [
            BoundedKVCache(
                layout,
                *cells[cell],
                capacity=capacity,
                rotary=rotary,
                check_every_eviction=check_every_eviction,
                storage=self._storage.row(row),
            )
            for row, cell in enumerate(order)
        ]
        first = self._caches[0]
        self._layer_slots = {layer: first.layer_slot(layer) for layer in range(layout.num_layers)}
        self._device = layout.device
        self._seen = 0
        self._fed = 1  # rows the model runs: rows from fed - 1 on share that row's computation
        self._failed: dict[int, Exception] = {}  # rows whose policy raised, with what it raised
        self._kv = 0  # compressed slots the next chunk's attention spans, in the row that spans most
        self._extents: list[int] = []  # compressed slots each fed row's attention spans this chunk
        self._spans: list[tuple[int, int, int]] | None = None  # see spans()
        self._slots_reused = False  # some live row has reused slots: masks come from token indices
        # this chunk's masks, by compressed layer (-1: one for all) and window
        self._mask: dict[tuple[int, float | None], torch.Tensor] = {}

    # -- read-only state ------------------------------------------------------------------------------------
    @property
    def caches(self) -> Sequence[BoundedKVCache]:
        """Each batch row's own cache, in row order."""
        return self._caches

    @property
    def row_of(self) -> Sequence[int]:
        """The batch row of each cell, in the order the cells were given."""
        return self._row_of

    @property
    def failed(self) -> Mapping[int, Exception]:
        """Rows whose policy raised (frozen since), with what it raised: ``{batch row: exception}``."""
        return self._failed

    @property
    def storage(self) -> CacheStorage:
        """The buffers every row writes in place, each with the cells in front of one cache's shape (the compressed
        keys and values ``[cells, 2, compressed layers, batch, kv_heads, slots, head_dim]``); row r's are
        ``storage.row(r)``."""
        return self._storage

    @property
    def seen(self) -> int:
        """Tokens fed so far: the true position of the next token, every row alike."""
        return self._seen

    def layer_slot(self, layer_idx: int) -> LayerSlot:
        """Where model layer ``layer_idx`` sits in every row: its group and index within it. Raises KeyError for a
        layer the model lacks."""
        return self._layer_slots[layer_idx]

    # -- the cache protocol the model and the attention function use ------------------------------------------
    @property
    def rows(self) -> int:
        """How many sequences the model is fed for the next chunk: the rows that have evicted, and one row for
        all those that have not."""
        return self._fed

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write each row's chunk (``[rows, kv_heads, chunk, head_dim]``) into its own cache; return every row's
        keys and values as one view ``[rows, kv_heads, kv, head_dim]``: the compressed slots the widest row
        attends, or a full layer's tokens so far. Raises :class:`~kvcompare.engine.cache.CacheLimitError` as a row's
        :meth:`~kvcompare.engine.cache.BoundedKVCache.update` does (a frozen row is not written)."""
        group, n = self._layer_slots[layer_idx]
        fed = key_states.shape[0]
        for index in range(fed):
            if index not in self._failed:
                self._caches[index].update(key_states[index : index + 1], value_states[index : index + 1], layer_idx)
        if group is LayerGroup.COMPRESSED:
            kv = self._storage.compressed_kv[:fed, :, n, 0, :, : self._kv]
        else:
            kv = self._storage.full_kv[:fed, :, n, 0, :, : self._seen + key_states.shape[2]]
        return kv[:, 0], kv[:, 1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens fed so far, every layer and row alike (the Hugging Face protocol): :attr:`seen`."""
        return self._seen

    def attention_mask(
        self, layer_idx: int, q_len: int, kv_len: int, window: float | None = None
    ) -> tuple[torch.Tensor | None, bool]:
        """``(mask, is_causal)``: time order while no row has reused slots, else each row's token indices
        (``window``: the layer's sliding window, as :meth:`BoundedKVCache.attention_mask`).

        The token mask is ``[rows, kv_heads, q_len, slots]``, or ``[rows, 1, q_len, slots]`` made once per chunk
        (and window) when every row holds the same tokens in every layer and head. Raises nothing.
        """
        group, n = self._layer_slots[layer_idx]
        if group is LayerGroup.FULL or not self._slots_reused:
            return prefix_mask(q_len, kv_len, self._device, window)
        alike = all(cache.alike for index, cache in enumerate(self._caches[: self._fed]) if index not in self._failed)
        key = (-1 if alike else n, window)
        if key not in self._mask:
            tokens = self._storage.slot_tokens[: self._fed, 0 if alike else n, 0, : 1 if alike else None, :kv_len]
            self._mask[key] = visible_slots(tokens, self._seen, q_len, window)
        return self._mask[key], False

    def spans(self, layer_idx: int) -> list[tuple[int, int, int]] | None:
        """``(first row, end row, slots)`` runs of rows that attend the same number of slots, to be attended one
        run at a time (a row of a smaller limit then never computes over the wider rows' slots); None: all rows
        at once."""
        return self._spans if self._layer_slots[layer_idx].group is LayerGroup.COMPRESSED else None

    def observe(
        self,
        layer_idx: int,
        query: torch.Tensor,
        key: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        scaling: float | None,
    ) -> None:
        """Show each row whose policy reads signals its own row of the chunk (the shared row, in the prefix):
        ``query`` ``[rows, heads, q_len, head_dim]`` over ``key`` ``[rows, kv_heads, kv_len, head_dim]``."""
        for index, cache in enumerate(self._caches):
            if cache.recorder is None or index in self._failed:
                continue
            row = min(index, query.shape[0] - 1)
            kv = self._extents[row] if self._slots_reused else key.shape[2]  # never the wider rows' slots
            own = mask[row : row + 1, ..., :kv] if mask is not None and mask.dim() == 4 else mask
            cache.observe(layer_idx, query[row : row + 1], key[row : row + 1, :, :kv], own, is_causal, scaling)

    # -- executor side -------------------------------------------------------------------------------------
    def make_room(self, chunk: int) -> Room:
        """Let each row make room for the next ``chunk`` tokens under its own policy; a row whose policy raises
        is frozen (see :attr:`failed`), so this raises only KeyboardInterrupt and MemoryError. Returns
        :attr:`Room.SLOTS_REUSED` if any row did slot work, else :attr:`Room.IN_ORDER`."""
        live = [(index, cache) for index, cache in enumerate(self._caches) if index not in self._failed]
        evicting = [index for index, cache in live if not cache.filling(chunk)]
        if evicting:  # those rows run on their own from now on, and one row after them for the rest
            self._widen(min(len(self._caches), max(evicting) + 2))
        room = Room.IN_ORDER
        for index, cache in live:
            try:
                if cache.make_room(chunk) is Room.SLOTS_REUSED:
                    room = Room.SLOTS_REUSED
            except (KeyboardInterrupt, MemoryError):
                raise
            except Exception as err:  # one failing policy must not lose the other rows
                self._failed[index] = err
        self._slots_reused = any(cache.slots_reused for index, cache in live if index not in self._failed)
        slots = self._storage.slot_tokens.shape[-1]  # a frozen row is given every slot: its results are dropped
        self._extents = [slots if i in self._failed else self._caches[i].attended(chunk) for i in range(self._fed)]
        self._kv = max(self._extents)
        spans, start = [], 0
        for extent, run in itertools.groupby(self._extents):
            end = start + len(list(run))
            spans.append((start, end, extent))
            start = end
        self._spans = spans if len(spans) > 1 else None
        self._mask.clear()
        return room

    def _widen(self, fed: int) -> None:
        """Run ``fed`` rows from now on; the rows that join start from the shared row, which held their tokens."""
        if fed <= self._fed:
            return
        self._storage.copy_updated(self._fed - 1, slice(self._fed, fed), self._seen)
        self._fed = fed

    def advance(self, chunk: int) -> None:
        """Account for a chunk the model has just written into every row (a frozen row is skipped). Raises
        :class:`~kvcompare.engine.cache.CacheLimitError` as a row's
        :meth:`~kvcompare.engine.cache.BoundedKVCache.advance`."""
        for index, cache in enumerate(self._caches):
            if index not in self._failed:
                cache.advance(chunk)
        self._seen += chunk


if TYPE_CHECKING:

    def _implements_the_protocol(cache: BatchedKVCache) -> KVCacheLike:
        return cache  # mypy checks that a BatchedKVCache is a KVCacheLike
