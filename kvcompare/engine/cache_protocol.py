"""The cache protocol the executor, kvcompare's attention function and the model speak, and its small types.

Two caches implement it: one cell's :class:`~kvcompare.engine.cache.BoundedKVCache` and a batch of cells'
:class:`~kvcompare.engine.batched.BatchedKVCache`. :class:`KVCacheLike` is what one chunked forward pass needs;
:class:`CellCacheLike` adds what the executor reads of one cell's cache after its passes (lengths, bytes,
signal time), which a batch, whose memory is no one cell's, does not have.

Shapes: the model's keys and values are ``[batch, kv_heads, tokens, head_dim]``; ``batch`` is the cache's
:attr:`~KVCacheLike.rows`. A compressed layer's buffer has ``slots`` (its largest budget), a full layer's
``capacity`` (every token of the pass).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import NamedTuple, Protocol

import torch


class LayerGroup(enum.Enum):
    """Which buffer a model layer's keys and values live in."""

    #: Bounded by the policy: at most its budget of slots, reused after evictions (out of time order).
    COMPRESSED = "compressed"
    #: A skip layer, or any layer of an unbounded cell: every token, in time order.
    FULL = "full"


class LayerSlot(NamedTuple):
    """Where a model layer sits in the cache: its group, and its index among that group's layers (``in_group``:
    its row of the group's buffers)."""

    group: LayerGroup
    in_group: int


class Room(enum.Enum):
    """What :meth:`KVCacheLike.make_room` did for the next chunk."""

    #: The chunk extends the held tokens in time order (filling, or no limit): no slot work was done.
    IN_ORDER = "in order"
    #: The chunk goes to slots freed by an eviction (made now, or left spare by the last): slot work was done,
    #: which the executor times as eviction.
    SLOTS_REUSED = "slots reused"


class KVCacheLike(Protocol):
    """What one chunked forward pass calls on a cache: the executor (:meth:`make_room`, :attr:`rows`,
    :attr:`seen`, :meth:`advance`), the model (:meth:`update`, :meth:`get_seq_length`: the Hugging Face cache
    protocol) and kvcompare's attention function (:meth:`attention_mask`, :meth:`observe`, :meth:`spans`).

    Per chunk: ``make_room(chunk)``, then the model's forward pass (per layer ``update``, then
    ``attention_mask``, ``observe`` and ``spans``), then ``advance(chunk)``.
    """

    @property
    def seen(self) -> int:
        """Tokens fed so far: the true position of the next token (an int, 0 before the first chunk)."""
        ...

    @property
    def rows(self) -> int:
        """How many sequences the model is fed for the next chunk: the batch size of its ``input_ids``
        (``[rows, chunk]``), known once :meth:`make_room` has run."""
        ...

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the chunk's keys and values of model layer ``layer_idx`` (each ``[rows, kv_heads, chunk,
        head_dim]``) in place; return the layer's keys and values the chunk attends, as views ``[rows, kv_heads,
        kv, head_dim]`` (``kv``: the layer's held tokens and the chunk, or its slots once they are reused).

        Raises :class:`~kvcompare.engine.cache.CacheLimitError` if the layer would hold more than its limit or capacity,
        or is given a chunk :meth:`make_room` did not make room for.
        """
        ...

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens fed so far, every layer alike (the Hugging Face protocol): :attr:`seen`."""
        ...

    def attention_mask(
        self, layer_idx: int, q_len: int, kv_len: int, window: float | None = None
    ) -> tuple[torch.Tensor | None, bool]:
        """``(mask, is_causal)`` for the chunk's ``q_len`` queries over the ``kv_len`` keys :meth:`update`
        returned for layer ``layer_idx``; ``window``: the layer's sliding window in tokens, if it has one.

        ``mask`` is boolean (True: attend), ``[q_len, kv_len]`` while keys are in time order, else
        ``[rows, kv_heads or 1, q_len, kv_len]``; None with ``is_causal`` for a plain causal chunk, None without
        it when every key is visible. Raises nothing.
        """
        ...

    def observe(
        self,
        layer_idx: int,
        query: torch.Tensor,
        key: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        scaling: float | None,
    ) -> None:
        """Show the signal recorder the layer's post-RoPE ``query`` (``[rows, heads, q_len, head_dim]``) over
        ``key`` (``[rows, kv_heads, kv_len, head_dim]``) under the mask the attention uses; nothing happens for a
        policy that reads no signal, or a full layer. Raises nothing."""
        ...

    def spans(self, layer_idx: int) -> list[tuple[int, int, int]] | None:
        """``(first row, end row, slots)`` runs of rows to attend one run at a time, each over its first
        ``slots`` keys (rows of a batch with different limits); None: all rows at once over every key."""
        ...

    def make_room(self, chunk: int) -> Room:
        """Choose where the next ``chunk`` tokens go, evicting under the policy if the compressed layers are
        full. Returns :attr:`Room.SLOTS_REUSED` when slot work was done (timed as eviction), else
        :attr:`Room.IN_ORDER`.

        Raises whatever the policy raises (:class:`~kvcompare.policy.PolicyError` for scores or a selection of
        the wrong shape); a batch freezes a row whose policy raises instead.
        """
        ...

    def advance(self, chunk: int) -> None:
        """Account for the ``chunk`` tokens the model has just written into every layer.

        Raises :class:`~kvcompare.engine.cache.CacheLimitError` if a compressed layer now holds more than its budget.
        """
        ...


class CellCacheLike(KVCacheLike, Protocol):
    """One cell's cache (:class:`~kvcompare.engine.cache.BoundedKVCache`): what the executor reads of it besides a
    forward pass, for a cell's result."""

    @property
    def compressed_len(self) -> int:
        """The most tokens any compressed layer holds (0 without compressed layers)."""
        ...

    @property
    def peak_kv_bytes(self) -> int:
        """The most key and value bytes the cache has held after a chunk (bytes held, not allocated)."""
        ...

    def lengths(self) -> Mapping[int, int]:
        """Tokens held by each model layer: ``{layer index: tokens}``."""
        ...

    def live_bytes(self) -> int:
        """Bytes of keys and values held now, over all layers (tokens held, not slots allocated)."""
        ...

    def take_signal_seconds(self) -> float:
        """Seconds spent collecting signals since the last call (0.0 for a policy that reads none); on a cuda or
        mps device it waits for the recorded spans to end."""
        ...

    @property
    def kv_bytes_compressed(self) -> int | None:
        """The prefill setting: key and value bytes held right after the one compression (None before it, or in the
        continuous setting)."""
        ...

    def compress(self) -> bool:
        """The prefill setting: cut every compressed layer once to its budget; return whether it did (False in the
        continuous setting, for an unbounded policy, or when done before). Raises what the policy raises."""
        ...
