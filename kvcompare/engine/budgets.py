"""Per-layer cache budgets: how a cache limit is shared among the compressed layers.

``uniform`` gives every compressed layer the limit. ``pyramid`` follows PyramidKV (Cai et al., 2024):
budgets fall linearly from the lowest compressed layer to the highest, with the same total (so the same KV
bytes) as uniform. As PyramidKV keeps its observation window in every layer on top of the pyramid, every
layer here keeps ``reserve`` slots (room for the largest chunk and the eviction block), and the pyramid
shares out the rest: the top layer gets ``(limit - reserve) / beta`` of it, the bottom layer
``2 (limit - reserve)`` minus that.

In the prefill setting no chunk is fed beside kept tokens, so ``reserve`` is PyramidKV's observation window
(``pyramid:beta=B:window=W``, default :data:`DEFAULT_WINDOW`), kept in every layer as PyramidKV keeps it: layer
budgets are ``W + share``, the shares falling linearly from ``2 (limit - W) - (limit - W) / beta`` at the lowest
compressed layer to ``(limit - W) / beta`` at the top. PyramidKV's code rounds each step down (so its total can fall
short of ``limit * layers``); here the remainder goes to the layers that lost most to rounding, so the total, and
the KV bytes, equal the uniform budget's. PyramidKV's code also falls back to SnapKV's uniform budget when the
pyramid's bottom would exceed the context; here a layer's budget above its context just keeps the whole context.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvcompare.config import DEFAULT_WINDOW, ConfigError, parse_layer_budget, prefill_window

__all__ = ["DEFAULT_WINDOW", "compressed_layer_budgets", "layer_budgets", "parse_layer_budget", "prefill_window"]

if TYPE_CHECKING:
    from kvcompare.config import CacheConfig


def layer_budgets(spec: str, limit: int, layers: int, reserve: int) -> list[int]:
    """Slots for each of ``layers`` compressed layers, lowest first; they sum to ``limit * layers``. Raises
    ConfigError for a bad ``spec`` or a pyramid whose ``reserve`` leaves no room under ``limit``."""
    kind, beta = parse_layer_budget(spec)
    if kind == "uniform" or layers == 1:
        return [limit] * layers
    share = limit - reserve
    if share < 0:
        raise ConfigError(f"--cache {limit} leaves no room for a pyramid beside chunks of {reserve} tokens")
    low = share / beta
    high = 2 * share - low
    exact = [reserve + high - (high - low) * i / (layers - 1) for i in range(layers)]
    budgets = [int(b) for b in exact]
    # Hand the rounding remainder to the layers that lost most to rounding, so the total is exact.
    short = limit * layers - sum(budgets)
    for i in sorted(range(layers), key=lambda i: budgets[i] - exact[i])[:short]:
        budgets[i] += 1
    return budgets


def compressed_layer_budgets(cache: CacheConfig, num_layers: int) -> list[int]:
    """The budget of each compressed layer of a ``num_layers``-layer model under ``cache`` (none without a
    limit): the one place the cache, the physics and the result rows take them from. Raises ConfigError as
    :func:`layer_budgets`."""
    if cache.limit is None:
        return []
    compressed = num_layers - len(set(cache.skip_layers))
    return layer_budgets(cache.layer_budget, cache.limit, compressed, cache.budget_reserve())


def smallest_budget(spec: str, limit: int, reserve: int) -> int:
    """The budget of the most squeezed layer (the top one under a pyramid), for checks before the model loads.
    Raises ConfigError for a bad ``spec``."""
    kind, beta = parse_layer_budget(spec)
    return limit if kind == "uniform" else reserve + int((limit - reserve) / beta)
