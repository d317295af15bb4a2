"""The KV cache the executor owns: preallocated buffers written in place, evicted by one gather.

Compressed layers share one buffer ``[2 (key, value), layers, batch, kv_heads, limit, head_dim]``, so a single
gather evicts all of them at once and a policy sees all their keys as one tensor. Skip layers keep their
full history in a buffer of their own. Nothing is concatenated per step, unlike transformers'
``DynamicLayer``, which copies the whole cache on every token.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from kvcompare.config import CacheConfig, ConfigError
from kvcompare.policy import KVPolicy, PolicyError, check_selection
from kvcompare.rope import Rotary


class CacheLimitError(RuntimeError):
    """The cache would exceed its limit: a bug in the executor, never expected in a run."""


def check_skip_layers(skip_layers: tuple[int, ...] | list[int], num_layers: int) -> None:
    """Skip layers must exist in the model."""
    bad = [i for i in skip_layers if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(f"--skip-layers {list(skip_layers)}: the model has layers 0..{num_layers - 1}, not {bad}")


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """Shapes the cache is built for."""

    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    batch: int = 1


class BoundedKVCache:
    """A KV cache whose compressed layers never hold more than ``config.limit`` tokens.

    The model calls :meth:`update` once per layer per forward pass (the Hugging Face cache protocol); the
    executor calls :meth:`make_room` before and :meth:`advance` after each chunk.
    """

    def __init__(
        self,
        layout: CacheLayout,
        policy: KVPolicy,
        config: CacheConfig,
        *,
        capacity: int,
        rotary: Rotary | None,
        check_every_eviction: bool = False,
    ) -> None:
        if config.positions == "shift" and rotary is None:
            raise ValueError("shift mode needs the model's rotary embedding")
        check_skip_layers(config.skip_layers, layout.num_layers)
        positions, limit, skip_layers = config.positions, config.limit, config.skip_layers
        self.layout = layout
        self.config = config
        self.policy = policy.fresh()  # no state carried over from another cell or pass
        self.limit = limit if policy.bounded else None
        self.positions = positions
        self.rotary = rotary
        self.evict_block = config.evict_block
        self.check_every_eviction = check_every_eviction
        self.evictions = 0
        self.seen = 0  # tokens fed so far: the true position of the next token

        compressed = [] if self.limit is None else [i for i in range(layout.num_layers) if i not in skip_layers]
        full = [i for i in range(layout.num_layers) if i not in compressed]
        self._slot = {layer: ("c", n) for n, layer in enumerate(compressed)}
        self._slot.update({layer: ("f", n) for n, layer in enumerate(full)})
        b, h, d = layout.batch, layout.kv_heads, layout.head_dim
        dtype, device = layout.dtype, layout.device
        self.c_kv = torch.empty(2, len(compressed), b, h, self.limit or 0, d, dtype=dtype, device=device)
        self.f_kv = torch.empty(2, len(full), b, h, capacity if full else 0, d, dtype=dtype, device=device)
        # Original token index of each compressed slot, and the position its key is rotated at.
        self.c_token = torch.empty(len(compressed), b, h, self.limit or 0, dtype=torch.long, device=layout.device)
        self.c_rotated_at = self.c_token.clone() if positions == "shift" else self.c_token
        self._scratch = torch.empty(self.c_kv.numel() // d, d, dtype=dtype, device=device)
        self.c_len = 0
        self.f_len = 0
        self.peak_bytes = 0

    # -- the Hugging Face cache protocol ---------------------------------------------------------
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this chunk's keys and values in place; return the layer's whole cache as views."""
        group, n = self._slot[layer_idx]
        buf, start = (self.c_kv, self.c_len) if group == "c" else (self.f_kv, self.f_len)
        end = start + key_states.shape[2]
        if end > buf.shape[4]:
            what = "limit" if group == "c" else "capacity"
            raise CacheLimitError(f"layer {layer_idx} would hold {end} tokens, over its {what} of {buf.shape[4]}")
        buf[0, n, :, :, start:end] = key_states
        buf[1, n, :, :, start:end] = value_states
        return buf[0, n, :, :, :end], buf[1, n, :, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    # -- executor side ---------------------------------------------------------------------------
    def make_room(self, chunk: int) -> bool:
        """Evict so that the compressed layers can take ``chunk`` more tokens within the limit.

        Evicts down to ``limit - chunk`` tokens, or further to drop at least ``evict_block`` at once
        (amortised eviction). Returns whether anything was evicted.
        """
        if self.limit is None or self.c_len + chunk <= self.limit:
            return False
        keep = max(0, min(self.limit - chunk, self.c_len - self.evict_block))
        keys = self.c_kv[0, :, :, :, : self.c_len]
        tokens = self.c_token[..., : self.c_len]
        if self.evictions == 0 or self.check_every_eviction:
            # The policy gets views of the cache itself: an edit in place would silently change the model.
            keys_before, tokens_before = keys.clone(), tokens.clone()
            kept = self.policy.select(keys, keep, tokens)
            if not (torch.equal(keys, keys_before) and torch.equal(tokens, tokens_before)):
                raise PolicyError(
                    f"{self.policy.who()} changed the keys or positions it was given; select() must only read them "
                    "(work on a copy)"
                )
            check_selection(self.policy, kept, keys.shape, keep)
        else:
            kept = self.policy.select(keys, keep, tokens)
        self._gather(kept.to(torch.long), keep)
        self.evictions += 1
        return True

    def _gather(self, kept: torch.Tensor, keep: int) -> None:
        """Move the kept slots of every compressed layer, keys and values together, to the front.

        One index_select over rows ``(kv, layer, batch, head, slot)`` of head_dim values: its index has one
        entry per kept row, where torch.gather would read one per value (head_dim times as many).
        """
        limit, head_dim = self.c_kv.shape[4], self.layout.head_dim
        base = torch.arange(2 * math.prod(kept.shape[:3]), device=kept.device).view(2, *kept.shape[:3], 1) * limit
        rows = (base + kept.unsqueeze(0)).flatten()
        # Into a buffer allocated once: a fresh tensor of this size costs more in page faults than the copy.
        moved = torch.index_select(self.c_kv.view(-1, head_dim), 0, rows, out=self._scratch[: rows.numel()])
        moved = moved.view(2, *kept.shape, head_dim)
        tokens = torch.gather(self.c_token[..., : self.c_len], 3, kept)
        if self.positions == "shift":
            assert self.rotary is not None
            # Kept keys take consecutive positions ending just before the next token: the relative
            # distances of StreamingLLM's cache slots, without re-rotating the incoming queries.
            rotated_at = torch.gather(self.c_rotated_at[..., : self.c_len], 3, kept)
            target = torch.arange(self.seen - keep, self.seen, device=kept.device).expand_as(rotated_at)
            self.rotary.rotate_(moved[0], target - rotated_at)
            self.c_rotated_at[..., :keep] = target
        self.c_kv[..., :keep, :] = moved
        self.c_token[..., :keep] = tokens
        self.c_len = keep

    def advance(self, chunk: int) -> None:
        """Account for a chunk the model has just written into every layer."""
        if self.limit is not None:
            new = torch.arange(self.seen, self.seen + chunk, device=self.c_token.device)
            self.c_token[..., self.c_len : self.c_len + chunk] = new
            if self.positions == "shift":
                self.c_rotated_at[..., self.c_len : self.c_len + chunk] = new
            self.c_len += chunk
        if self.f_kv.shape[1]:
            self.f_len += chunk
        self.seen += chunk
        if self.limit is not None and self.c_len > self.limit:
            raise CacheLimitError(f"compressed layers hold {self.c_len} tokens, over the limit of {self.limit}")
        self.peak_bytes = max(self.peak_bytes, self.live_bytes())

    def lengths(self) -> dict[int, int]:
        """Tokens held by each layer."""
        return {layer: (self.c_len if g == "c" else self.f_len) for layer, (g, _) in self._slot.items()}

    def live_bytes(self) -> int:
        """Bytes of keys and values currently held, over all layers."""
        per_token = 2 * self.layout.batch * self.layout.kv_heads * self.layout.head_dim * self.c_kv.element_size()
        return per_token * (self.c_kv.shape[1] * self.c_len + self.f_kv.shape[1] * self.f_len)
