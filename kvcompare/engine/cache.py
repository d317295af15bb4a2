"""The KV cache the executor owns: preallocated buffers written in place, with slots reused after eviction.

Compressed layers share one buffer ``[2 (key, value), layers, batch, kv_heads, slots, head_dim]``, with as
many slots as the largest layer budget (the limit, unless ``--layer-budget`` shares it unevenly; a layer's
slots beyond its budget are blocked and never attended). Until the first eviction they fill in time order.
An eviction only chooses victim slots; the next tokens are written straight into them, so nothing that stays
is moved (shift mode re-rotates, in place, just the keys whose rank changed). Each slot records its token
index (``slot_tokens``), from which the attention masks are built. Skip layers keep their full history in a
buffer of their own, in time order. Nothing is concatenated per step, unlike transformers' ``DynamicLayer``,
which copies the whole cache on every token. A batched quality pass (kvcompare.engine.batched) gives each cell's
cache its row of buffers shared by the batch (:class:`CacheStorage`), written in place the same way.

In the prefill setting (``CacheConfig.compression == "prefill"``) nothing is evicted while the context is fed:
the compressed layers fill in time order, then :meth:`BoundedKVCache.compress` cuts each of them once to its
budget, with the same policy code and the signals of the whole context, into new buffers sized for the kept
tokens and the tokens still to come; after that the cache only grows, as in kvpress.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from kvcompare.config import CacheConfig, ConfigError
from kvcompare.engine.budgets import compressed_layer_budgets
from kvcompare.engine.cache_protocol import LayerGroup, LayerSlot, Room
from kvcompare.engine.eviction import BLOCKED, VictimChooser, rank_shift
from kvcompare.engine.masks import prefix_mask, visible_slots
from kvcompare.engine.recorder import SignalRecorder
from kvcompare.engine.rope import Rotary
from kvcompare.engine.storage import CacheLayout, CacheStorage, needs_keys_as_written
from kvcompare.policy import KVPolicy

if TYPE_CHECKING:
    from kvcompare.engine.cache_protocol import CellCacheLike


class CacheLimitError(RuntimeError):
    """The cache would exceed its limit: a bug in the executor, never expected in a run."""


def check_skip_layers(skip_layers: tuple[int, ...] | list[int], num_layers: int) -> None:
    """Skip layers must exist in the model: raises ConfigError for one outside ``0..num_layers - 1``."""
    bad = [i for i in skip_layers if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(f"--skip-layers {list(skip_layers)}: the model has layers 0..{num_layers - 1}, not {bad}")


def compressed_layers(policy: KVPolicy, config: CacheConfig, num_layers: int) -> tuple[int, ...]:
    """The layers a cell's cache bounds: none for an unbounded policy, else every layer but the skip layers."""
    if not policy.bounded or config.limit is None:
        return ()
    return tuple(i for i in range(num_layers) if i not in config.skip_layers)


class BoundedKVCache:
    """A KV cache whose compressed layers never hold more than ``config.limit`` tokens (:class:`CellCacheLike`).

    The model calls :meth:`update` once per layer per forward pass (the Hugging Face cache protocol), and
    kvcompare's attention function asks :meth:`attention_mask` for each layer's mask; the executor calls
    :meth:`make_room` before and :meth:`advance` after each chunk. Its state is the cache's own: other modules
    read it through read-only properties. A compiled decode step (kvcompare.engine.compiled) attends whole buffers
    under masks and hands its keys and values to :meth:`write_step` instead; ``fixed_shape`` zero-fills every
    buffer for it, so that a slot it attends but masks never holds NaN.

    Raises ValueError for shift mode without a rotary embedding, or ``storage`` that cannot hold the layer
    budgets (or lacks the keys as written that shift mode in a low-precision dtype needs); ConfigError for skip
    layers the model lacks or budgets that leave a layer less than a chunk of room; the policy's
    :class:`~kvcompare.policy.PolicyError` for a policy that asks for signals but scores at write time;
    :class:`~kvcompare.engine.memory.AllocationError` if its buffers would not fit.
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
        fixed_shape: bool = False,
    ) -> None:
        if config.positions == "shift" and rotary is None:
            raise ValueError("shift mode needs the model's rotary embedding")
        per_layer = list(rotary) if isinstance(rotary, Sequence) else [rotary] * layout.num_layers
        check_skip_layers(config.skip_layers, layout.num_layers)
        self._layout = layout
        self._policy = policy.fresh()  # no state carried over from another cell or pass
        self._limit = config.limit if policy.bounded else None
        self._once = self._limit is not None and config.once  # the prefill setting: compress once, then grow
        self._compressed_once = False  # whether compress() has cut the layers to their budgets
        self._capacity = capacity
        self._fixed_shape = fixed_shape
        self._kv_bytes_compressed: int | None = None
        self._positions = config.positions
        self._evict_block = config.evict_block
        self._evictions = 0
        self._seen = 0  # tokens fed so far: the true position of the next token

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
        self._layer_slots = {layer: LayerSlot(LayerGroup.COMPRESSED, n) for n, layer in enumerate(compressed)}
        self._layer_slots.update({layer: LayerSlot(LayerGroup.FULL, n) for n, layer in enumerate(full)})
        h, d = layout.kv_heads, layout.head_dim
        self._budgets = compressed_layer_budgets(config, layout.num_layers) if self._limit is not None else []
        self._budget_array = np.asarray(self._budgets, dtype=np.int64)  # for the per-chunk arithmetic on `held`
        self._smallest_budget = min(self._budgets, default=0)  # the first layer to fill
        if self._budgets and not self._once and self._smallest_budget < config.budget_reserve():
            raise ConfigError(f"layer budgets {self._budgets} leave a layer less than a chunk of room")
        # Shift mode in bfloat16/float16: each slot's key as written and its rotation since, so a key that moves
        # again and again is rebuilt from the original instead of accumulating rounding (Rotary.rotate_rows_from_).
        low_precision = needs_keys_as_written(config, layout.dtype) and bool(self._budgets)
        if storage is None:  # the prefill setting holds the whole context until it compresses
            slots = capacity if self._once else max(self._budgets, default=0)
            # The prefill setting attends only slots it has written (a prefix), so its buffers are left unwritten
            # like the full layers': first touching them is then inside the prefill, as it is for `full`.
            storage = CacheStorage.allocate(
                layout,
                len(compressed),
                slots,
                capacity,
                len(full),
                with_keys_as_written=low_precision,
                zeroed=fixed_shape or not self._once,
                zero_full=fixed_shape,
            )
        if low_precision and storage.keys_as_written is None:
            raise ValueError("shift mode in a low-precision dtype needs storage with the keys as written")
        # Zeros, not torch.empty: once slots are reused, a never-written slot is attended (masked) and handed
        # to policies, and uninitialised memory may hold NaN (0 x NaN in attention; NaN != NaN in the edit check).
        self._storage = storage
        self._compressed_kv = storage.compressed_kv
        self._full_kv = storage.full_kv
        # Per slot: the original token index (-1 = empty, BLOCKED = beyond the layer's budget). In shift mode a
        # held key is rotated at its rank among the held tokens, counted to end just before the next token:
        # derived, so not stored.
        self._slot_tokens = storage.slot_tokens
        slots = self._slot_tokens.shape[-1]
        if self._budgets and not self._once and slots < max(self._budgets):
            raise ValueError(f"{slots} slots cannot hold layer budgets up to {max(self._budgets)}")
        # Some layer has slots beyond its budget (blocked): per-layer budgets, or a batch row in a wider buffer.
        self._uneven = not self._once and any(budget < slots for budget in self._budgets)
        for n, budget in enumerate(self._budgets if not self._once else []):
            self._slot_tokens[n, ..., budget:] = BLOCKED
        self._victims = VictimChooser(self._policy, self._slot_tokens, self._budgets, check_every_eviction)
        needs = self._policy.needs()
        self._recorder = (
            SignalRecorder(needs, self._slot_tokens, layout.heads or h, d, layout.dtype)
            if needs and self._budgets
            else None
        )
        self._keys_as_written = storage.keys_as_written if low_precision else None
        self._rotation_since_written = storage.rotation_since_written if low_precision else None
        self._held = np.zeros(len(compressed), dtype=np.int64)  # tokens each compressed layer holds
        self._full_len = 0  # tokens each full layer holds
        self._slots_reused = False  # once slots are reused, compressed keys are no longer in time order
        self._write_index: torch.Tensor | None = None  # slots the current chunk goes to, expanded over head_dim
        self._spare = self._slot_tokens[..., :0]  # freed slots the last chunk did not fill
        self._shared_masks: dict[float | None, torch.Tensor] = {}  # this chunk's mask by window, victims uniform
        self._peak_kv_bytes = 0

    # -- read-only state ----------------------------------------------------------------------------
    @property
    def policy(self) -> KVPolicy:
        """The cell's policy: a fresh copy of the one the cache was given, owned by this cache."""
        return self._policy

    @property
    def limit(self) -> int | None:
        """The cell's cache limit in tokens, None for an unbounded policy."""
        return self._limit

    @property
    def budgets(self) -> list[int]:
        """Slots each compressed layer may hold, lowest layer first (empty without a limit)."""
        return self._budgets

    @property
    def evictions(self) -> int:
        """How many evictions :meth:`make_room` has made."""
        return self._evictions

    @property
    def seen(self) -> int:
        """Tokens fed so far: the true position of the next token."""
        return self._seen

    @property
    def storage(self) -> CacheStorage:
        """The buffers the cache writes in place (its own, or its row of a batch's)."""
        return self._storage

    @property
    def compressed_kv(self) -> torch.Tensor:
        """Keys and values of the compressed layers, ``[2, compressed layers, batch, kv_heads, slots,
        head_dim]``: a view of :attr:`storage`, to read, never to edit."""
        return self._compressed_kv

    @property
    def full_kv(self) -> torch.Tensor:
        """Keys and values of the full layers in time order, ``[2, full layers, batch, kv_heads, capacity,
        head_dim]`` (the first :attr:`full_len` tokens written): to read, never to edit."""
        return self._full_kv

    @property
    def slot_tokens(self) -> torch.Tensor:
        """The token index each compressed slot holds, ``[compressed layers, batch, kv_heads, slots]`` int64
        (-1 free, :data:`~kvcompare.engine.eviction.BLOCKED` beyond its layer's budget): to read, never to edit."""
        return self._slot_tokens

    @property
    def victims(self) -> VictimChooser:
        """What turns the policy's scores or selection into the slots to free."""
        return self._victims

    @property
    def recorder(self) -> SignalRecorder | None:
        """The signals the policy reads, collected as the model runs; None for a policy that reads none."""
        return self._recorder

    @property
    def slots_reused(self) -> bool:
        """Whether slots have been reused (after the first eviction): compressed keys are then out of time order."""
        return self._slots_reused

    @property
    def full_len(self) -> int:
        """Tokens each full layer holds (0 without full layers)."""
        return self._full_len

    @property
    def peak_kv_bytes(self) -> int:
        """The most key and value bytes held after any chunk (see :meth:`live_bytes`)."""
        return self._peak_kv_bytes

    @property
    def kv_bytes_compressed(self) -> int | None:
        """The prefill setting: the key and value bytes held right after :meth:`compress` (None before, or in the
        continuous setting)."""
        return self._kv_bytes_compressed

    @property
    def fixed_shape(self) -> bool:
        """Whether every buffer is zero-filled for compiled decode steps, which attend whole buffers."""
        return self._fixed_shape

    @property
    def layer_slots(self) -> dict[int, LayerSlot]:
        """Where each model layer sits: ``{layer index: its group and index within it}`` (to read, never to edit)."""
        return self._layer_slots

    @property
    def attended_budgets(self) -> tuple[int, ...] | None:
        """Each compressed layer's budget of slots where some layer has slots beyond its budget (uneven budgets: a
        pyramid, or a batch row in a wider buffer), which it never attends; None where every layer may use every
        slot."""
        return tuple(self._budgets) if self._uneven else None

    def layer_slot(self, layer_idx: int) -> LayerSlot:
        """Where model layer ``layer_idx`` sits: its group and index within it. Raises KeyError for a layer
        the model lacks."""
        return self._layer_slots[layer_idx]

    # -- the Hugging Face cache protocol ---------------------------------------------------------
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this chunk's keys and values (each ``[batch, kv_heads, chunk, head_dim]``) in place; return the
        layer's whole cache as views ``[batch, kv_heads, kv, head_dim]``: the held tokens and the chunk in time
        order, or once slots are reused the layer's budget of slots.

        Raises :class:`CacheLimitError` if the layer would exceed its limit (or a full layer its capacity), or
        once slots are reused is given a chunk :meth:`make_room` did not make room for.
        """
        group, n = self._layer_slots[layer_idx]
        end = self._write(group, n, key_states.unsqueeze(0), value_states.unsqueeze(0), f"layer {layer_idx}")
        return self._attended(group, n, end)

    def write_step(self, compressed: torch.Tensor | None, full: torch.Tensor | None) -> None:
        """Write a compiled decode step's new keys and values, ``[2, layers, batch, kv_heads, 1, head_dim]`` for the
        compressed and the full layers (None where the cell has none), where :meth:`update` would have written them
        (see kvcompare.engine.compiled). Raises what :meth:`update` raises."""
        for group, kv in ((LayerGroup.COMPRESSED, compressed), (LayerGroup.FULL, full)):
            if kv is not None:
                self._write(group, 0, kv[0], kv[1], f"the {group.value} layers")

    def observe_step(self, layer_idx: int, query: torch.Tensor, window: float | None, scaling: float | None) -> None:
        """After a compiled decode step has been written: show the signal recorder compressed layer ``layer_idx``'s
        ``query`` (``[batch, heads, 1, head_dim]``) over the keys an eager step would have attended, under its
        mask, as :meth:`observe` is shown them inside an eager step."""
        group, n = self._layer_slots[layer_idx]
        chunk = query.shape[2]
        end = None if self._slots_reused else self._append_starts(slice(n, n + 1))[0] + chunk
        key, _ = self._attended(group, n, end)
        mask, is_causal = self.attention_mask(layer_idx, chunk, key.shape[2], window)
        self.observe(layer_idx, query, key, mask, is_causal, scaling)

    def _write(self, group: LayerGroup, first: int, keys: torch.Tensor, values: torch.Tensor, what: str) -> int | None:
        """Write a chunk's ``keys`` and ``values`` (``[layers, batch, kv_heads, chunk, head_dim]``) into ``group``'s
        layers ``first``, ``first + 1``, ...; return where the chunk ends in buffers kept in time order (None: it
        went to reused slots). Raises :class:`CacheLimitError` (naming ``what``) as :meth:`update` does."""
        count, chunk = keys.shape[0], keys.shape[3]
        layers = slice(first, first + count)
        if group is LayerGroup.COMPRESSED and self._slots_reused:
            if self._write_index is None or self._write_index.shape[-2] != chunk:
                raise CacheLimitError(f"{what} was given {chunk} tokens without make_room() for them")
            index = self._write_index[layers]
            self._compressed_kv[0, layers].scatter_(3, index, keys)
            self._compressed_kv[1, layers].scatter_(3, index, values)
            if self._keys_as_written is not None:
                self._keys_as_written[layers].scatter_(3, index, keys)
            return None
        if group is LayerGroup.COMPRESSED:  # in the prefill setting each layer appends after its own held tokens
            buf = self._compressed_kv
            starts = self._append_starts(layers)
            bound = buf.shape[4] if self._once else self._smallest_budget
        else:
            buf, starts, bound = self._full_kv, [self._full_len], self._full_kv.shape[4]
        if len(set(starts)) > 1:  # uneven budgets (a pyramid): layer by layer
            for n in range(count):
                self._write(group, first + n, keys[n : n + 1], values[n : n + 1], what)
            return None
        start = int(starts[0])
        end = start + chunk
        if end > bound:
            kind = "limit" if group is LayerGroup.COMPRESSED else "capacity"
            raise CacheLimitError(f"{what} would hold {end} tokens, over its {kind} of {buf.shape[4]}")
        buf[0, layers, :, :, start:end] = keys
        buf[1, layers, :, :, start:end] = values
        if group is LayerGroup.COMPRESSED and self._keys_as_written is not None:
            self._keys_as_written[layers, :, :, start:end] = keys
        return end

    def _append_starts(self, layers: slice) -> list[int]:
        """Where the next chunk goes in compressed ``layers`` kept in time order: after each layer's own held tokens
        in the prefill setting, else after the length they share (one entry for them all)."""
        return [int(n) for n in self._held[layers].tolist()] if self._once else [self.compressed_len]

    def _attended(self, group: LayerGroup, n: int, end: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """What layer ``n`` of ``group`` attends once a chunk is written, as views ``[batch, kv_heads, kv,
        head_dim]``: its first ``end`` tokens in time order, or (``end`` None) its budget of reused slots."""
        buf = self._compressed_kv if group is LayerGroup.COMPRESSED else self._full_kv
        if end is None:
            end = self._budgets[n] if self._uneven else buf.shape[4]
        return buf[0, n, :, :, :end], buf[1, n, :, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens fed so far, every layer alike (the Hugging Face protocol): :attr:`seen`."""
        return self._seen

    def attention_mask(
        self, layer_idx: int, q_len: int, kv_len: int, window: float | None = None
    ) -> tuple[torch.Tensor | None, bool]:
        """``(mask, is_causal)`` for the chunk's queries over what :meth:`update` returned for this layer;
        ``window``: the layer's sliding window, if the model gives it one (see :func:`visible_slots`).

        Reused slots are in no order: a query at position p sees a slot iff ``0 <= token <= p``, a
        ``[batch, kv_heads, q_len, slots]`` mask made from the slots' token indices. While every layer and
        head has evicted alike (``victims.uniform``: StreamingLLM, recent), they hold the same tokens in the
        same slots and one ``[batch, 1, q_len, slots]`` mask serves them all (one per window). A decode step
        over a full buffer of a layer without a window needs none. Raises nothing.
        """
        group, n = self._layer_slots[layer_idx]
        if self._compressed_once and group is LayerGroup.COMPRESSED and window is not None:
            # The kept tokens are in time order but not consecutive: a window is over token indices.
            return visible_slots(self._slot_tokens[n, ..., :kv_len], self._seen, q_len, window), False
        if group is LayerGroup.FULL or not self._slots_reused:
            return prefix_mask(q_len, kv_len, self._compressed_kv.device, window)
        if q_len == 1 and self._spare.shape[-1] == 0 and not self._uneven and window is None:
            return None, False
        if not self._victims.uniform:
            return visible_slots(self._slot_tokens[n, ..., :kv_len], self._seen, q_len, window), False
        if window not in self._shared_masks:  # made once per chunk, for every layer with this window
            self._shared_masks[window] = visible_slots(self._slot_tokens[0, :, :1], self._seen, q_len, window)
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
        """Show the signal recorder a compressed layer's chunk, ``query`` ``[batch, heads, q_len, head_dim]``
        over ``key`` ``[batch, kv_heads, kv_len, head_dim]`` (nothing happens for a policy that reads none)."""
        group, n = self._layer_slots[layer_idx]
        if self._recorder is not None and group is LayerGroup.COMPRESSED:
            self._recorder.observe(n, self._seen, query, key, mask, is_causal, scaling)

    @property
    def rows(self) -> int:
        """How many sequences the model is fed per chunk: the layout's batch."""
        return self._layout.batch

    def spans(self, layer_idx: int) -> list[tuple[int, int, int]] | None:
        """Rows attended separately (see :meth:`kvcompare.engine.batched.BatchedKVCache.spans`); one cache: all
        at once."""
        return None

    def attended(self, chunk: int) -> int:
        """Slots of the compressed layers the next ``chunk``'s attention spans: the held tokens in time order
        and the chunk, or once slots are reused every slot a layer may use."""
        return self.compressed_len + chunk if not self._slots_reused else max(self._budgets)

    def filling(self, chunk: int) -> bool:
        """Whether the next ``chunk`` tokens just extend the held tokens in time order (no eviction)."""
        return self._limit is None or (not self._slots_reused and self.compressed_len + chunk <= self._smallest_budget)

    @property
    def alike(self) -> bool:
        """Whether every compressed layer and head holds the same tokens in the same slots (one mask serves all)."""
        return not self._uneven and (not self._slots_reused or self._victims.uniform)

    # -- executor side ---------------------------------------------------------------------------
    def make_room(self, chunk: int) -> Room:
        """Choose the slots the next ``chunk`` tokens go to, evicting if the compressed layers are full.

        An eviction frees slots down to ``limit - chunk`` held tokens, or further to free at least
        ``evict_block`` at once (amortised eviction); the chunk fills freed slots and the rest stay spare
        for the chunks after it. Returns :attr:`Room.SLOTS_REUSED` when slot work was done (an eviction, or
        spare slots taken; it is timed as eviction), :attr:`Room.IN_ORDER` when the chunk just extends the held
        tokens (or there is no limit).

        Raises whatever the policy raises: :class:`~kvcompare.policy.PolicyError` for scores or a selection of
        the wrong shape, or for a policy that edits what it is given (checked at the first eviction, or every one
        with ``check_every_eviction``).
        """
        if self._limit is None:
            return Room.IN_ORDER
        new = torch.arange(self._seen, self._seen + chunk, device=self._slot_tokens.device)
        if self._once:
            return self._append(new)
        if self.filling(chunk):  # still filling in time order
            held = self.compressed_len
            self._slot_tokens[..., held : held + chunk] = new
            return Room.IN_ORDER
        if self._slots_reused and chunk <= self._spare.shape[-1]:
            slots, self._spare = self._spare[..., :chunk], self._spare[..., chunk:]
            self._assign(slots, new)
            return Room.SLOTS_REUSED
        # Every layer frees the same number of slots, its empty ones first: with uneven budgets a layer with
        # room to spare evicts fewer tokens, or none.
        empty = self._budget_array - self._held
        count = min(self._smallest_budget, max(chunk, int(empty.min()) + self._evict_block))
        signals = None if self._recorder is None else self._recorder.snapshot(self._seen, chunk, self._victims.budgets)
        freed = self._victims.choose(self._compressed_kv[0], self._slot_tokens, self.compressed_len, count, signals)
        if self._recorder is not None:
            self._recorder.forget(freed)
        if self._positions == "shift":
            self._rerotate(*rank_shift(self._slot_tokens, freed, self._victims.uniform))
        if freed.shape[-1] > chunk:  # the freed slots the chunk does not fill are left empty
            self._slot_tokens.scatter_(-1, freed[..., chunk:], -1)
        self._held = np.minimum(self._held, self._budget_array - count)
        self._slots_reused = True
        self._evictions += 1
        self._assign(freed[..., :chunk], new)
        self._spare = freed[..., chunk:]
        return Room.SLOTS_REUSED

    def _append(self, new: torch.Tensor) -> Room:
        """The prefill setting: the chunk's tokens ``new`` go after each layer's held tokens, in time order (nothing
        is evicted). Raises :class:`CacheLimitError` when a layer's slots cannot take them (fed beyond the
        capacity the cache was built for)."""
        chunk, slots = new.numel(), self._slot_tokens.shape[-1]
        if int(self._held.max()) + chunk > slots:
            raise CacheLimitError(f"compressed layers holding {self._held.tolist()} tokens cannot take {chunk} more")
        if (self._held == self._held[0]).all():
            start = int(self._held[0])
            self._slot_tokens[..., start : start + chunk] = new
        else:  # uneven budgets (a pyramid): each layer after its own tokens
            for n, start in enumerate(self._held.tolist()):
                self._slot_tokens[n, ..., start : start + chunk] = new
        return Room.IN_ORDER

    def compress(self) -> bool:
        """The prefill setting's one compression: cut each compressed layer to its budget, with the policy's scores
        (or selection) over every held token and the signals of the whole context; return whether it did.

        A layer whose budget is at least the tokens it holds keeps them all. The kept tokens move, in time order, to
        new buffers of ``budget + tokens still to come`` slots (the old ones are freed); in shift mode their keys are
        re-rotated once to consecutive positions ending just before the next token. After it the cache only grows
        and the policy is never called again. Returns False, doing nothing, in the continuous setting, for an
        unbounded policy, or when already compressed. Raises what the policy raises, and
        :class:`~kvcompare.engine.memory.AllocationError` if the new buffers would not fit.
        """
        if not self._once or self._compressed_once:
            return False
        held = self.compressed_len
        keep = [min(budget, held) for budget in self._budgets]
        tokens = self._slot_tokens[..., :held]
        signals = None
        if self._recorder is not None:
            signals = self._recorder.snapshot(self._seen, 0, self._victims.budgets, "prefill", held)
        kept = self._victims.keep(self._compressed_kv[0, ..., :held, :], tokens, keep, signals)
        storage = self._storage.with_compressed_slots(
            self._layout, max(keep) + self._capacity - self._seen, zeroed=self._fixed_shape
        )
        d = self._layout.head_dim
        for n, slots in enumerate(kept):  # [batch, kv_heads, keep[n]] ascending: slots are in time order
            count = slots.shape[-1]
            index = slots.unsqueeze(-1).expand(*slots.shape, d)
            for kv in (0, 1):
                storage.compressed_kv[kv, n, :, :, :count] = self._compressed_kv[kv, n].gather(2, index)
            storage.slot_tokens[n, ..., :count] = tokens[n].gather(-1, slots)
        self._storage, self._compressed_kv, self._slot_tokens = storage, storage.compressed_kv, storage.slot_tokens
        self._held = np.asarray(keep, dtype=np.int64)
        self._compressed_once = True
        self._recorder = None  # nothing is evicted any more: no signal to collect
        self._victims.ranks = None  # nor ranks to keep: only the old buffers referred to them
        self._spare = self._slot_tokens[..., :0]
        self._evictions += 1
        if self._positions == "shift":
            self._shift_kept()
        self._kv_bytes_compressed = self.live_bytes()
        return True

    def _shift_kept(self) -> None:
        """Shift mode after :meth:`compress`: move each kept key to its rank among its layer's kept tokens, counted
        to end just before the next token (the continuous setting's rule, applied once)."""
        tokens = self._slot_tokens
        held = torch.as_tensor(self._held, device=tokens.device).view(-1, *[1] * (tokens.dim() - 1))
        ranks = torch.arange(tokens.shape[-1], device=tokens.device)
        moves = (self._seen - held + ranks) - tokens
        moving = (tokens >= 0) & (moves != 0)
        rows = moving.view(-1).nonzero().squeeze(1)
        self._rerotate(rows, moves.view(-1).index_select(0, rows))

    def _rerotate(self, rows: torch.Tensor, moves: torch.Tensor | int) -> None:
        """Move the keys of ``rows`` (flat indices into the compressed keys) by ``moves`` positions, each with
        its layer's rotary; the keys of layers without RoPE stay as they are."""
        d = self._layout.head_dim
        keys = self._compressed_kv[0].view(-1, d)
        per_layer = self._slot_tokens[0].numel()  # flat rows of one compressed layer
        written, rotation = self._keys_as_written, self._rotation_since_written
        for rotary, members in self._rotary_groups:
            picked, moved = rows, moves
            if members is not None:  # layers with other frequencies, or none, share the buffer
                keep = torch.isin(rows.div(per_layer, rounding_mode="floor"), members)
                picked, moved = rows[keep], moves[keep] if isinstance(moves, torch.Tensor) else moves
            if written is not None and rotation is not None:
                rotary.rotate_rows_from_(keys, written.view(-1, d), rotation.view(-1), picked, moved)
            else:
                rotary.rotate_rows_(keys, picked, moved)

    def _assign(self, slots: torch.Tensor, new: torch.Tensor) -> None:
        """Give the next chunk's tokens ``slots`` (``[layers, batch, kv_heads, chunk]``), metadata first."""
        self._slot_tokens.scatter_(-1, slots, new.expand(slots.shape))
        if self._rotation_since_written is not None:
            self._rotation_since_written.scatter_(-1, slots, 0)
        self._victims.written(slots)
        self._write_index = slots.unsqueeze(-1).expand(*slots.shape, self._layout.head_dim)

    def advance(self, chunk: int) -> None:
        """Account for a chunk the model has just written into every layer.

        Raises :class:`CacheLimitError` if a compressed layer now holds more than its budget.
        """
        self._shared_masks.clear()
        self._write_index = None  # the next chunk needs make_room() first
        if self._limit is not None:
            self._held += chunk
            bound = self._slot_tokens.shape[-1] if self._once else self._budget_array
            if (self._held > bound).any():
                raise CacheLimitError(f"compressed layers hold {self._held.tolist()} tokens, over {self._budgets}")
        if self._full_kv.shape[1]:
            self._full_len += chunk
        self._seen += chunk
        self._peak_kv_bytes = max(self._peak_kv_bytes, self.live_bytes())

    @property
    def compressed_len(self) -> int:
        """The most tokens any compressed layer holds (all hold alike until the first eviction; 0 without
        compressed layers)."""
        return int(self._held.max()) if self._held.size else 0

    def lengths(self) -> dict[int, int]:
        """Tokens held by each model layer: ``{layer index: tokens}``."""
        return {
            layer: int(self._held[n] if group is LayerGroup.COMPRESSED else self._full_len)
            for layer, (group, n) in self._layer_slots.items()
        }

    def live_bytes(self) -> int:
        """Bytes of keys and values currently held, over all layers (true bytes held, not slots allocated)."""
        layout = self._layout
        per_token = 2 * layout.batch * layout.kv_heads * layout.head_dim * self._compressed_kv.element_size()
        return per_token * (int(self._held.sum()) + self._full_kv.shape[1] * self._full_len)

    def take_signal_seconds(self) -> float:
        """Seconds spent collecting signals since the last call (0.0 for a policy that reads none)."""
        return 0.0 if self._recorder is None else self._recorder.take_seconds()


if TYPE_CHECKING:

    def _implements_the_protocol(cache: BoundedKVCache) -> CellCacheLike:
        return cache  # mypy checks that a BoundedKVCache is a CellCacheLike
