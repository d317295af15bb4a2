"""What the hardware allows: the bytes one decode step must read, and the memory bandwidth to read them.

A decode step of a small model is bound by memory traffic: it reads every weight once and the keys and
values it attends. Set beside the measured TPOT, these figures show why a 135M model gains little from
eviction at 2K tokens (the weights dominate) and a lot at 16K (the cache does).
"""

from __future__ import annotations

import torch

from kvcompare.config import CacheConfig
from kvcompare.engine.budgets import compressed_layer_budgets
from kvcompare.engine.storage import CacheLayout
from kvcompare.engine.timing import now

#: Bytes copied per bandwidth trial: large enough to leave every cache level behind.
PROBE_BYTES = 256 * 2**20
PROBE_TRIALS = 5


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter, as the model holds them (its dtype's bytes per element)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kv_read_bytes(layout: CacheLayout, cache: CacheConfig, context: int) -> int:
    """Key and value bytes the first decode step after a ``context``-token prompt attends, over all layers.

    Compressed layers hold at most ``cache.limit`` tokens (the new one included; in the prefill setting, their
    budget of the context plus the new one); skip layers and the `full` baseline hold the whole context plus the
    new token.
    """
    per_token = (
        2 * layout.batch * layout.kv_heads * layout.head_dim * torch.empty((), dtype=layout.dtype).element_size()
    )
    held = context + 1
    if cache.limit is None:
        return per_token * layout.num_layers * held
    skipped = len(set(cache.skip_layers))
    budgets = compressed_layer_budgets(cache, layout.num_layers)
    if cache.once:
        return per_token * (skipped * held + sum(min(budget, context) + 1 for budget in budgets))
    return per_token * (skipped * held + sum(min(budget, held) for budget in budgets))


def memory_bandwidth(device: torch.device, size: int = PROBE_BYTES, trials: int = PROBE_TRIALS) -> float:
    """Bytes per second of a large device-to-device copy (read plus write) of ``size`` bytes, the best of
    ``trials`` (NaN if the copy took no measurable time). Raises torch's OutOfMemoryError if two buffers of
    ``size`` bytes do not fit."""
    source = torch.ones(size // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    target.copy_(source)  # first touch outside the timer
    best = float("inf")
    for _ in range(trials):
        start = now(device)
        target.copy_(source)
        best = min(best, now(device) - start)
    del source, target
    return 2 * size / best if best > 0 else float("nan")


def tpot_floor(weights: int, kv_bytes: int, bandwidth: float | None) -> float | None:
    """The fastest a decode step could be, in seconds, if it only had to read its ``weights`` and ``kv_bytes``
    (bytes) once at ``bandwidth`` (bytes per second); None without a bandwidth."""
    if not bandwidth or bandwidth != bandwidth:  # None or NaN
        return None
    return (weights + kv_bytes) / bandwidth
