"""Which cached keys each query may attend: from the slots' token indices (a cache whose slots were reused),
or for keys in time order (a prefix), with a layer's sliding window where it has one."""

from __future__ import annotations

import functools

import torch


def visible_slots(tokens: torch.Tensor, seen: int, q_len: int, window: float | None = None) -> torch.Tensor:
    """Which slots each of a chunk's ``q_len`` queries may attend, from the slots' token indices ``[..., slots]``
    (the chunk's first token is ``seen``): a held token no newer than the query, and on a layer with a sliding
    ``window`` one of the query's last ``window`` tokens (token > query - window, as transformers' sliding
    masks). Returns ``[..., q_len, slots]``."""
    tokens = tokens.unsqueeze(-2)
    if q_len == 1 and window is None:  # every held token is older than the one query
        return tokens >= 0
    query = torch.arange(seen, seen + q_len, device=tokens.device).unsqueeze(-1)
    visible = (tokens >= 0) & (tokens <= query)
    return visible if window is None else visible & (tokens > query - window)


@functools.lru_cache(maxsize=16)
def _prefix_mask(q_len: int, kv_len: int, device: torch.device, window: float | None) -> torch.Tensor:
    mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(diagonal=kv_len - q_len)
    if window is not None:
        mask = mask.triu(diagonal=kv_len - q_len - int(window) + 1)
    return mask


def prefix_mask(
    q_len: int, kv_len: int, device: torch.device, window: float | None = None
) -> tuple[torch.Tensor | None, bool]:
    """``(mask, is_causal)`` for keys in time order from the first token to the chunk's last: every earlier key,
    the chunk causally; on a layer with a sliding ``window``, only each query's last ``window`` tokens. The mask
    is boolean ``[q_len, kv_len]`` (True: attend), or None where ``is_causal`` or no mask says it all."""
    if window is not None and kv_len <= window:
        window = None  # every query sees every earlier token anyway
    if window is None and q_len == 1:
        return None, False
    if window is None and q_len == kv_len:
        return None, True
    return _prefix_mask(q_len, kv_len, device, window), False
