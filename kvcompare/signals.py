"""Signals a policy asks for: the attention its slots received, and the latest queries.

Collected inside kvcompare's attention function, for the compressed layers only, and only when the cell's
policy declares :class:`Needs`; ``streaming``, ``recent`` and ``l2`` pay nothing. Each signal is reduced
right there to per-slot tensors shaped like the cache's token indices (``[layers, batch, kv_heads, slots]``),
so a policy sees the same layout whatever the model. The time spent is counted (``signal_s``).
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Needs:
    """What a policy needs besides the cached keys.

    ``attention``: the attention each cached slot received (from the last chunk, from its last query, and
    accumulated since the slot's token was written). ``queries``: how many of the latest post-RoPE queries
    to keep per compressed layer (0: none).
    """

    attention: bool = False
    queries: int = 0

    def __bool__(self) -> bool:
        return self.attention or self.queries > 0


@dataclasses.dataclass(frozen=True)
class Signals:
    """What the executor collected for a policy before an eviction, and the eviction's context.

    Per-slot tensors are ``[layers, batch, kv_heads, slots]``, in the cache's slot order, like ``positions``;
    an attention weight is summed over the query heads that share the KV head. Signals come from chunks
    already attended, never from the chunk the eviction makes room for (teacher forcing stays causal).
    They are views of the executor's buffers: read them, never edit them.
    """

    attention: torch.Tensor | None  # weight each slot received from the last chunk's queries, summed over them
    last_attention: torch.Tensor | None  # weight each slot received from the last query alone
    accumulated: torch.Tensor | None  # summed over every query since the slot's token was written
    queries: torch.Tensor | None  # [layers, batch, heads, w, head_dim]: the latest w post-RoPE queries, a ring
    query_positions: torch.Tensor | None  # [w]: each ring entry's token index, -1 when empty
    scaling: float  # the model's attention scale (softmax of q·k·scaling)
    seen: int  # the token index of the next token: every held token is older
    incoming: int  # tokens the eviction makes room for (the next chunk)
    budgets: torch.Tensor  # [layers]: slots each compressed layer may hold (its cache limit)
    #: "continuous" (an eviction before a chunk or decode step) or "prefill" (the one compression after the whole
    #: context was prefilled; ``seen - 1`` is then the context's last token and ``incoming`` is 0).
    setting: str = "continuous"
