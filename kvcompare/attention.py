"""The attention function the executor installs in the model.

Cached layers hold different lengths (skip layers keep everything, compressed layers are bounded), but
Hugging Face sizes its attention mask from one layer. So this function ignores that mask and builds each
layer's own: the chunk's queries see every cached key plus the chunk causally (bottom-right aligned).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

ATTN_IMPLEMENTATION = "kvcompare"


@functools.lru_cache(maxsize=8)
def _chunk_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(diagonal=kv_len - q_len)


def chunk_causal_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    q_len, kv_len = query.shape[2], key.shape[2]
    groups = query.shape[1] // key.shape[1]
    if groups > 1 and query.device.type == "mps":  # enable_gqa is not implemented on mps
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
        groups = 1
    mask = None if q_len == 1 or q_len == kv_len else _chunk_mask(q_len, kv_len, query.device)
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=mask,
        is_causal=q_len > 1 and q_len == kv_len,
        scale=scaling,
        enable_gqa=groups > 1,
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_IMPLEMENTATION, chunk_causal_attention)
