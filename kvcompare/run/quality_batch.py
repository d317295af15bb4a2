"""Which cells of a passage share a batched quality pass: as many as fit in a share of the free memory.

Cells batch together when they bound the same layers (every bounded policy of a run; `full` cells among
themselves). A batch allocates every row at the widest row's slots, so its size is worked out from the cache
sizes, the signals the policies read and one chunk's activations, not guessed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvcompare.config import CacheConfig
from kvcompare.engine.budgets import compressed_layer_budgets
from kvcompare.engine.cache import compressed_layers
from kvcompare.engine.storage import CacheLayout
from kvcompare.policy import KVPolicy

#: The share of the device's free memory a batched quality pass may take.
MEMORY_SHARE = 0.5


def row_bytes(layout: CacheLayout, policy: KVPolicy, config: CacheConfig, length: int, slots: int, vocab: int) -> int:
    """Memory one row of a batch takes: its cache at ``slots`` per compressed layer, the signals its policy
    reads, and one chunk's logits and attention scores."""
    element = torch.empty(0, dtype=layout.dtype).element_size()
    compressed = len(compressed_layers(policy, config, layout.num_layers))
    full = layout.num_layers - compressed
    heads = layout.heads or layout.kv_heads
    cache = 2 * layout.kv_heads * layout.head_dim * element * (compressed * slots + full * length)
    tokens = 8 * compressed * layout.kv_heads * slots
    needs = policy.needs()
    signals = 3 * 4 * compressed * layout.kv_heads * slots if needs.attention else 0
    signals += element * compressed * heads * needs.queries * layout.head_dim
    chunk = config.stride
    activations = 4 * chunk * (2 * vocab + 2 * heads * max(slots, length if full else 0))
    return cache + tokens + signals + activations


def slots_of(policy: KVPolicy, config: CacheConfig, layers: int) -> int:
    """The slots a cell's compressed layers need: its largest layer budget (0 for an unbounded cell)."""
    if not compressed_layers(policy, config, layers):
        return 0
    return max(compressed_layer_budgets(config, layers))


def quality_batches(
    cells: Sequence[tuple[KVPolicy, CacheConfig]],
    layout: CacheLayout,
    *,
    length: int,
    vocab: int,
    budget: int,
    most: int | None = None,
) -> list[list[int]]:
    """Split ``cells`` (one passage's) into batches of indices: cells that bound the same layers, in order,
    each batch as large as ``budget`` bytes allow and at most ``most`` cells (None: no cap). A cell too large
    for the budget on its own still runs, alone."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, (policy, config) in enumerate(cells):
        groups.setdefault(compressed_layers(policy, config, layout.num_layers), []).append(index)
    batches: list[list[int]] = []
    for members in groups.values():
        batch: list[int] = []
        for index in members:
            candidate = [*batch, index]
            slots = max(slots_of(*cells[i], layout.num_layers) for i in candidate)
            size = sum(row_bytes(layout, *cells[i], length, slots, vocab) for i in candidate)
            if batch and (size > budget or (most is not None and len(candidate) > most)):
                batches.append(batch)
                candidate = [index]
            batch = candidate
        batches.append(batch)
    return batches
