"""The attention function the executor installs in the model.

Cached layers hold different lengths (skip layers keep everything, compressed layers are bounded and reuse
slots out of time order), but Hugging Face sizes its attention mask from one layer. So this function ignores
that mask and asks kvcompare's cache, which the executor passes as the ``kvcompare_cache`` keyword, for
each layer's own. It also shows the cache each layer's post-RoPE queries and keys, from which the signals a
policy asks for (attention weights, recent queries) are collected.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from kvcompare.rope import UnsupportedModelError

if TYPE_CHECKING:
    from kvcompare.batched import BatchedKVCache
    from kvcompare.cache import BoundedKVCache

ATTN_IMPLEMENTATION = "kvcompare"
CACHE_KEYWORD = "kvcompare_cache"


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
    cache: BoundedKVCache | BatchedKVCache | None = kwargs.get(CACHE_KEYWORD)  # type: ignore[assignment]
    if cache is None:
        raise UnsupportedModelError(
            f"{type(module).__name__} did not pass its keyword arguments on to the attention function, so "
            "kvcompare cannot give each layer its mask; kvcompare supports models that do (Llama, Mistral, "
            "Qwen, GPT-NeoX and most current Hugging Face decoders)"
        )
    q_len, kv_len = query.shape[2], key.shape[2]
    mask, is_causal = cache.attention_mask(module.layer_idx, q_len, kv_len)  # type: ignore[arg-type]
    cache.observe(module.layer_idx, query, key, mask, is_causal, scaling)  # type: ignore[arg-type]
    spans = cache.spans(module.layer_idx)  # type: ignore[arg-type]
    if spans is None:
        out = _attend(query, key, value, mask, is_causal, scaling)
    else:  # batch rows of different widths: each run of rows attends only the slots it uses
        assert mask is not None and mask.dim() == 4
        out = torch.cat(
            [
                _attend(query[a:b], key[a:b, :, :kv], value[a:b, :, :kv], mask[a:b, ..., :kv], is_causal, scaling)
                for a, b, kv in spans
            ]
        )
    return out.transpose(1, 2).contiguous(), None


def _attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    scaling: float | None,
) -> torch.Tensor:
    """Scaled dot-product attention of query heads over grouped KV heads, under a per-KV-head mask."""
    groups = query.shape[1] // key.shape[1]
    if mask is not None and mask.dim() == 4 and groups > 1 and mask.shape[1] > 1:
        mask = mask.repeat_interleave(groups, dim=1)  # per KV head -> per query head
    if groups > 1 and query.device.type == "mps":  # enable_gqa is not implemented on mps
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
        groups = 1
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, is_causal=is_causal, scale=scaling, enable_gqa=groups > 1
    )


AttentionInterface.register(ATTN_IMPLEMENTATION, chunk_causal_attention)
