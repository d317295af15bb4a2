"""Recording the signals a policy asks for, inside kvcompare's attention function (see kvcompare.signals for
what they are): per-slot attention and a ring of the latest queries, for the compressed layers only, timed
(``signal_s``)."""

from __future__ import annotations

import math

import torch

from kvcompare.engine.memory import ensure_fits
from kvcompare.engine.timing import SpanTimer
from kvcompare.signals import Needs, Signals


class SignalRecorder:
    """Per-slot attention and a ring of queries for the compressed layers, written as the model runs.

    The executor owns it beside the cache: an accumulated score belongs to its slot and is reset when the slot
    is freed, so a policy never re-indexes state after an eviction. ``tokens`` is the cache's slot tokens
    (``[layers, batch, kv_heads, slots]``), whose shape the per-slot signals take. Raises
    :class:`~kvcompare.engine.memory.AllocationError` if its buffers would not fit in the device's free memory.
    """

    def __init__(self, needs: Needs, tokens: torch.Tensor, heads: int, head_dim: int, dtype: torch.dtype) -> None:
        self.needs = needs
        device = tokens.device
        # Weights are computed at float32 at least (float64 models keep float64).
        self.dtype = torch.promote_types(dtype, torch.float32)
        shape = tokens.shape
        w = needs.queries
        per_slot = 3 * self.dtype.itemsize * tokens.numel() if needs.attention else 0
        ring = dtype.itemsize * shape[0] * shape[1] * heads * w * head_dim
        ensure_fits(per_slot + ring, device, f"the signals the policy reads (a ring of {w} queries per layer)")
        self.attention = torch.zeros(shape, dtype=self.dtype, device=device) if needs.attention else None
        self.last = torch.zeros(shape, dtype=self.dtype, device=device) if needs.attention else None
        self.accumulated = torch.zeros(shape, dtype=self.dtype, device=device) if needs.attention else None
        self.queries = torch.zeros(shape[0], shape[1], heads, w, head_dim, dtype=dtype, device=device) if w else None
        self.query_positions = torch.full((w,), -1, dtype=torch.long, device=device) if w else None
        self.scaling = 1 / math.sqrt(head_dim)
        self.timer = SpanTimer(device)  # time spent collecting, without synchronising inside the step

    def observe(
        self,
        layer: int,
        seen: int,
        query: torch.Tensor,
        key: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        scaling: float | None,
    ) -> None:
        """Record compressed layer ``layer``'s chunk: ``query`` ``[batch, heads, q, dim]`` over ``key``
        ``[batch, kv_heads, kv, dim]`` (the first ``kv`` slots), under the mask the attention used."""
        self.timer.start()
        b, heads, q_len, dim = query.shape
        kv_heads, kv_len = key.shape[1], key.shape[2]
        if scaling is not None:
            self.scaling = scaling
        if self.needs.attention:
            assert self.attention is not None and self.last is not None and self.accumulated is not None
            grouped = (query.to(self.dtype) * self.scaling).reshape(b, kv_heads, heads // kv_heads * q_len, dim)
            logits = (grouped @ key.to(self.dtype).transpose(-1, -2)).view(b, kv_heads, -1, q_len, kv_len)
            visible = _visible(mask, is_causal, q_len, kv_len, query.device)
            if visible is not None:
                logits.masked_fill_(~visible.unsqueeze(2), float("-inf"))
            weights = logits.softmax(dim=-1)  # [batch, kv_heads, group, q, kv]
            chunk = weights.sum(dim=(2, 3))
            self.attention[layer, ..., :kv_len] = chunk
            self.last[layer, ..., :kv_len] = chunk if q_len == 1 else weights[:, :, :, -1].sum(dim=2)
            self.accumulated[layer, ..., :kv_len] += chunk
        if self.queries is not None:
            assert self.query_positions is not None
            w = self.queries.shape[3]
            kept = min(q_len, w)
            tokens = torch.arange(seen + q_len - kept, seen + q_len, device=query.device)
            self.queries[layer].index_copy_(2, tokens % w, query[:, :, q_len - kept :])
            if layer == 0:
                self.query_positions.index_copy_(0, tokens % w, tokens)
        self.timer.stop()

    def forget(self, slots: torch.Tensor) -> None:
        """Freed ``slots`` (``[layers, batch, kv_heads, n]``) start again from nothing."""
        if self.accumulated is not None:
            self.accumulated.scatter_(-1, slots, 0.0)

    def take_seconds(self) -> float:
        """The collection time since the last call, in seconds."""
        return self.timer.take_seconds()

    def snapshot(
        self, seen: int, incoming: int, budgets: torch.Tensor, setting: str = "continuous", slots: int | None = None
    ) -> Signals:
        """The signals recorded so far, as views (``[layers, batch, kv_heads, slots]`` per slot, or only the first
        ``slots`` slots), for an eviction before token ``seen`` that makes room for ``incoming`` tokens; ``budgets``
        is ``[layers]``, ``setting`` the compression setting (see :class:`~kvcompare.signals.Signals`)."""
        first = slice(None, slots)
        return Signals(
            None if self.attention is None else self.attention[..., first],
            None if self.last is None else self.last[..., first],
            None if self.accumulated is None else self.accumulated[..., first],
            self.queries,
            self.query_positions,
            self.scaling,
            seen,
            incoming,
            budgets,
            setting,
        )


def _visible(
    mask: torch.Tensor | None, is_causal: bool, q_len: int, kv_len: int, device: torch.device
) -> torch.Tensor | None:
    """The attention's mask as booleans ``[batch or 1, kv_heads or 1, q, kv]`` (None: every key visible)."""
    if mask is not None:
        return mask if mask.dim() == 4 else mask.view(1, 1, q_len, kv_len)
    if is_causal:
        return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril().view(1, 1, q_len, kv_len)
    return None
