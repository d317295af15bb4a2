"""The attention function the executor installs in the model.

Cached layers hold different lengths (skip layers keep everything, compressed layers are bounded and reuse
slots out of time order), but Hugging Face sizes its attention mask from one layer. So this function ignores
that mask and asks kvcompare's cache, which the executor passes as the ``kvcompare_cache`` keyword, for
each layer's own. It also shows the cache each layer's post-RoPE queries and keys, from which the signals a
policy asks for (attention weights, recent queries) are collected.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from kvcompare.engine.rope import UnsupportedModelError

if TYPE_CHECKING:
    from kvcompare.engine.cache_protocol import KVCacheLike

ATTN_IMPLEMENTATION = "kvcompare"
CACHE_KEYWORD = "kvcompare_cache"
#: The cache of the forward pass under way, for models whose layers do not pass keyword arguments down to their
#: attention (StableLM): set by :func:`forward_cache` around each forward pass.
FORWARD_CACHE: contextvars.ContextVar[KVCacheLike | None] = contextvars.ContextVar(
    "kvcompare_forward_cache", default=None
)


#: How often kvcompare's attention ran: a model that computes attention in its own code never calls it.
CALLS = [0]
#: Where set (kvcompare.engine.fidelity's probe), each layer's attention features as the model passed them:
#: ``{layer: (sliding window or None, soft-cap or None, has learned sinks)}``.
LAYER_FEATURES: contextvars.ContextVar[dict[int, tuple[float | None, float | None, bool]] | None] = (
    contextvars.ContextVar("kvcompare_layer_features", default=None)
)


@contextlib.contextmanager
def forward_cache(cache: KVCacheLike) -> Iterator[None]:
    """Make ``cache`` the one kvcompare's attention uses during the block (one forward pass)."""
    token = FORWARD_CACHE.set(cache)
    try:
        yield
    finally:
        FORWARD_CACHE.reset(token)


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
    """The attention of one layer's chunk, as Hugging Face calls an attention function: ``query``
    ``[batch, heads, q_len, head_dim]`` over ``key`` and ``value`` ``[batch, kv_heads, kv_len, head_dim]`` (what
    the cache's ``update`` returned), under the cache's own mask for the layer (the model's ``attention_mask`` is
    ignored). Returns ``([batch, q_len, heads, head_dim], None)``. Raises UnsupportedModelError when run outside
    :meth:`~kvcompare.engine.executor.Executor.forward` (no kvcompare cache to ask)."""
    CALLS[0] += 1
    # The keyword, where the model passes its keyword arguments down to its attention; else the forward pass's.
    cache: KVCacheLike | None = kwargs.get(CACHE_KEYWORD) or FORWARD_CACHE.get()  # type: ignore[assignment]
    if cache is None:
        raise UnsupportedModelError(
            f"{type(module).__name__} ran kvcompare's attention outside kvcompare's forward pass: call the model "
            "through Executor.forward"
        )
    q_len, kv_len = query.shape[2], key.shape[2]
    window, extra = layer_features(kwargs)
    if (seen := LAYER_FEATURES.get()) is not None:
        seen[module.layer_idx] = (window, extra.softcap, extra.sinks is not None)  # type: ignore[index]
    mask, is_causal = cache.attention_mask(module.layer_idx, q_len, kv_len, window)  # type: ignore[arg-type]
    cache.observe(module.layer_idx, query, key, mask, is_causal, scaling)  # type: ignore[arg-type]
    spans = cache.spans(module.layer_idx)  # type: ignore[arg-type]
    if spans is None:
        out = _attend(query, key, value, mask, is_causal, scaling, extra)
    else:  # batch rows of different widths: each run of rows attends only the slots it uses
        assert mask is not None and mask.dim() == 4
        out = torch.cat(
            [
                _attend(
                    query[a:b], key[a:b, :, :kv], value[a:b, :, :kv], mask[a:b, ..., :kv], is_causal, scaling, extra
                )
                for a, b, kv in spans
            ]
        )
    return out.transpose(1, 2).contiguous(), None


def _positive(value: object) -> float | None:
    """A window or cap the model passed, or None where it passed none (None, 0, or a non-number)."""
    return float(value) if isinstance(value, int | float) and value > 0 else None


def layer_features(kwargs: dict[str, object]) -> tuple[float | None, Extras]:
    """What a layer's attention does beyond plain causal attention, from the keyword arguments its module passes
    to the attention function: its sliding window (a query sees its last ``window`` tokens; None: all) and its
    :class:`Extras` (soft-cap, learned sinks)."""
    sinks = kwargs.get("s_aux")
    extra = Extras(_positive(kwargs.get("softcap")), sinks if isinstance(sinks, torch.Tensor) else None)
    return _positive(kwargs.get("sliding_window")), extra


@dataclasses.dataclass(frozen=True)
class Extras:
    """Attention features plain SDPA cannot express, computed in :func:`_attend_eager` as the model does.

    ``softcap``: logits become ``softcap * tanh(logits / softcap)`` before the mask (Gemma-2). ``sinks``: one
    learned logit per query head, joined to each query's logits before the softmax and dropped after it
    (gpt-oss's ``s_aux``).
    """

    softcap: float | None = None
    sinks: torch.Tensor | None = None

    def __bool__(self) -> bool:
        return self.softcap is not None or self.sinks is not None


def _attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    scaling: float | None,
    extra: Extras = Extras(),
) -> torch.Tensor:
    """Scaled dot-product attention of query heads over grouped KV heads, under a per-KV-head mask."""
    groups = query.shape[1] // key.shape[1]
    if mask is not None and mask.dim() == 4 and groups > 1 and mask.shape[1] > 1:
        mask = mask.repeat_interleave(groups, dim=1)  # per KV head -> per query head
    if extra:
        return _attend_eager(query, key, value, mask, is_causal, scaling, extra)
    if groups > 1 and query.device.type == "mps":  # enable_gqa is not implemented on mps
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
        groups = 1
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, is_causal=is_causal, scale=scaling, enable_gqa=groups > 1
    )


def _attend_eager(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    scaling: float | None,
    extra: Extras,
) -> torch.Tensor:
    """Attention written out, for what SDPA cannot express (see :class:`Extras`), in the order the model's own
    eager attention applies it: scale, soft-cap, mask, join the sinks, softmax (float32), drop the sinks."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    logits = (query @ key.transpose(-1, -2)).float() * scale
    if extra.softcap is not None:
        logits = torch.tanh(logits / extra.softcap) * extra.softcap
    if is_causal:
        q_len, kv_len = logits.shape[-2:]
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=logits.device).tril(diagonal=kv_len - q_len)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    if extra.sinks is not None:
        sinks = extra.sinks.float().reshape(1, -1, 1, 1).expand(*logits.shape[:-1], 1)
        logits = torch.cat([logits, sinks], dim=-1)
        logits = logits - logits.max(dim=-1, keepdim=True).values
        weights = logits.softmax(dim=-1)[..., :-1]
    else:
        weights = logits.softmax(dim=-1)
    return weights.to(value.dtype) @ value


AttentionInterface.register(ATTN_IMPLEMENTATION, chunk_causal_attention)
