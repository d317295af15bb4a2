"""Several cells' caches as the rows of one batch, so a passage's quality passes read the weights once per chunk.

Every cell of a passage feeds the same tokens through the same model; only the caches differ. Row r of the
batch is cell r: its own :class:`~kvcompare.cache.BoundedKVCache` (policy, limit, position mode, layer
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
from collections.abc import Sequence

import torch

from kvcompare.budgets import compressed_layer_budgets
from kvcompare.cache import (
    BoundedKVCache,
    CacheLayout,
    CacheStorage,
    compressed_layers,
    needs_keys_as_written,
    prefix_mask,
    visible_slots,
)
from kvcompare.config import CacheConfig
from kvcompare.policy import KVPolicy
from kvcompare.rope import Rotary


class BatchedKVCache:
    """The caches of several cells over the same tokens, one batch row each (see the module docstring).

    The cells must bound the same layers (all bounded with the same skip layers, or all unbounded). It speaks
    the cache protocol of :class:`~kvcompare.cache.BoundedKVCache` that the executor and kvcompare's attention
    function use, with :attr:`rows` sequences fed per chunk.
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
        self.storage = CacheStorage.allocate(
            layout, len(compressed), slots, capacity, full, rows=(len(cells),), keys_as_written=keys_as_written
        )
        # Row order: the cells whose smallest layer budget fills first come first (stable among equals).
        order = sorted(range(len(cells)), key=lambda i: min(budgets[i], default=capacity))
        self.row_of = [order.index(cell) for cell in range(len(cells))]  # cell index -> batch row
        self.caches = [
            BoundedKVCache(
                layout,
                *cells[cell],
                capacity=capacity,
                rotary=rotary,
                check_every_eviction=check_every_eviction,
                storage=self.storage.row(row),
            )
            for row, cell in enumerate(order)
        ]
        self._slot = self.caches[0]._slot
        self.device = layout.device
        self.seen = 0
        self.fed = 1  # rows the model runs: rows from fed - 1 on share that row's computation
        self.failed: dict[int, Exception] = {}  # rows whose policy raised, with what it raised
        self._kv = 0  # compressed slots the next chunk's attention spans, in the row that spans most
        self._extents: list[int] = []  # compressed slots each fed row's attention spans this chunk
        self._spans: list[tuple[int, int, int]] | None = None  # see spans()
        self._reused = False  # some live row has reused slots: masks come from token indices
        # this chunk's masks, by compressed layer (-1: one for all) and window
        self._mask: dict[tuple[int, float | None], torch.Tensor] = {}

    # -- the cache protocol the model and the attention function use ------------------------------------------
    @property
    def rows(self) -> int:
        """How many sequences the model is fed for the next chunk: the rows that have evicted, and one row for
        all those that have not."""
        return self.fed

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write each row's chunk into its own cache; return every row's keys and values as one view."""
        group, n = self._slot[layer_idx]
        fed = key_states.shape[0]
        for index in range(fed):
            if index not in self.failed:
                self.caches[index].update(key_states[index : index + 1], value_states[index : index + 1], layer_idx)
        if group == "c":
            kv = self.storage.c_kv[:fed, :, n, 0, :, : self._kv]
        else:
            kv = self.storage.f_kv[:fed, :, n, 0, :, : self.seen + key_states.shape[2]]
        return kv[:, 0], kv[:, 1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def attention_mask(
        self, layer_idx: int, q_len: int, kv_len: int, window: float | None = None
    ) -> tuple[torch.Tensor | None, bool]:
        """``(mask, is_causal)``: time order while no row has reused slots, else each row's token indices
        (``window``: the layer's sliding window, as :meth:`BoundedKVCache.attention_mask`).

        The token mask is ``[rows, kv_heads, q_len, slots]``, or ``[rows, 1, q_len, slots]`` made once per chunk
        (and window) when every row holds the same tokens in every layer and head.
        """
        group, n = self._slot[layer_idx]
        if group == "f" or not self._reused:
            return prefix_mask(q_len, kv_len, self.device, window)
        alike = all(cache.alike for index, cache in enumerate(self.caches[: self.fed]) if index not in self.failed)
        key = (-1 if alike else n, window)
        if key not in self._mask:
            tokens = self.storage.c_token[: self.fed, 0 if alike else n, 0, : 1 if alike else None, :kv_len]
            self._mask[key] = visible_slots(tokens, self.seen, q_len, window)
        return self._mask[key], False

    def spans(self, layer_idx: int) -> list[tuple[int, int, int]] | None:
        """``(first row, end row, slots)`` runs of rows that attend the same number of slots, to be attended one
        run at a time (a row of a smaller limit then never computes over the wider rows' slots); None: all rows
        at once."""
        return self._spans if self._slot[layer_idx][0] == "c" else None

    def observe(
        self,
        layer_idx: int,
        query: torch.Tensor,
        key: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        scaling: float | None,
    ) -> None:
        """Show each row whose policy reads signals its own row of the chunk (the shared row, in the prefix)."""
        for index, cache in enumerate(self.caches):
            if cache.recorder is None or index in self.failed:
                continue
            row = min(index, query.shape[0] - 1)
            kv = self._extents[row] if self._reused else key.shape[2]  # never the wider rows' slots
            own = mask[row : row + 1, ..., :kv] if mask is not None and mask.dim() == 4 else mask
            cache.observe(layer_idx, query[row : row + 1], key[row : row + 1, :, :kv], own, is_causal, scaling)

    # -- executor side -------------------------------------------------------------------------------------
    def make_room(self, chunk: int) -> bool:
        """Let each row make room for the next chunk under its own policy; a row whose policy raises is frozen."""
        live = [(index, cache) for index, cache in enumerate(self.caches) if index not in self.failed]
        evicting = [index for index, cache in live if not cache.filling(chunk)]
        if evicting:  # those rows run on their own from now on, and one row after them for the rest
            self._widen(min(len(self.caches), max(evicting) + 2))
        evicted = False
        for index, cache in live:
            try:
                evicted = cache.make_room(chunk) or evicted
            except (KeyboardInterrupt, MemoryError):
                raise
            except Exception as err:  # one failing policy must not lose the other rows
                self.failed[index] = err
        self._reused = any(cache.reused for index, cache in live if index not in self.failed)
        slots = self.storage.c_token.shape[-1]  # a frozen row is given every slot: its results are dropped
        self._extents = [slots if i in self.failed else self.caches[i].attended(chunk) for i in range(self.fed)]
        self._kv = max(self._extents)
        spans, start = [], 0
        for extent, run in itertools.groupby(self._extents):
            end = start + len(list(run))
            spans.append((start, end, extent))
            start = end
        self._spans = spans if len(spans) > 1 else None
        self._mask.clear()
        return evicted

    def _widen(self, fed: int) -> None:
        """Run ``fed`` rows from now on; the rows that join start from the shared row, which held their tokens."""
        if fed <= self.fed:
            return
        self.storage.copy_updated(self.fed - 1, slice(self.fed, fed), self.seen)
        self.fed = fed

    def advance(self, chunk: int) -> None:
        """Account for a chunk the model has just written into every row."""
        for index, cache in enumerate(self.caches):
            if index not in self.failed:
                cache.advance(chunk)
        self.seen += chunk
