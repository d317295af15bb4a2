"""Rotary position embeddings: finding a model's rotary setup and re-rotating cached keys.

Shift mode (StreamingLLM's positional shift) needs kept keys moved to new positions after an eviction.
RoPE is a rotation, so a key rotated at position p is moved to q by rotating it once more by q - p.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from kvcompare.errors import KVCompareError


class UnsupportedModelError(KVCompareError, ValueError):
    """The model lacks something the executor needs (rotary position embeddings, a causal LM head)."""


@dataclasses.dataclass(frozen=True)
class Rotary:
    """The rotary frequencies of a layer; the first ``rotary_dim`` channels of each head are rotated, as two
    halves (channel i with i + rotary_dim / 2: Llama, GPT-NeoX) or, ``interleaved``, as adjacent pairs (2i with
    2i + 1: Cohere)."""

    inv_freq: torch.Tensor  # [rotary_dim // 2], float32
    rotary_dim: int
    interleaved: bool = False
    _tables: dict[tuple[int, torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(
        default_factory=dict, compare=False, repr=False
    )

    def rotate_rows_(self, x: torch.Tensor, rows: torch.Tensor, delta: torch.Tensor | int) -> None:
        """Rotate the given rows of ``x`` (``[N, head_dim]``) in place, row ``rows[i]`` (``rows``: ``[n]`` int64)
        by ``delta[i]`` positions (or all by one int). Only those rows are read and written: after an eviction,
        the keys whose rank changed. Rows must lie within ``x``: torch raises otherwise."""
        if rows.numel():
            picked = x.index_select(0, rows)
            self._rotate(picked, delta)
            x.index_copy_(0, rows, picked)

    def rotate_rows_from_(
        self,
        x: torch.Tensor,
        original: torch.Tensor,
        total: torch.Tensor,
        rows: torch.Tensor,
        delta: torch.Tensor | int,
    ) -> None:
        """:meth:`rotate_rows_` for low-precision keys (bfloat16, float16), where rotating a rotated key again and
        again would add a rounding error each time (StreamingLLM's sinks move at every eviction: a bfloat16 sink
        key is garbage after about a thousand moves). ``total`` (``[N]`` int64) keeps each row's rotation so far,
        and the row is rebuilt from ``original`` (``[N, head_dim]``, the key as the model wrote it) in float32,
        rounded once."""
        if rows.numel():
            moves = delta if isinstance(delta, torch.Tensor) else torch.full_like(rows, delta)
            total.index_add_(0, rows, moves)
            picked = original.index_select(0, rows).float()
            self._rotate(picked, total.index_select(0, rows))
            x.index_copy_(0, rows, picked.to(x.dtype))

    def _rotate(self, x: torch.Tensor, delta: torch.Tensor | int) -> None:
        """The rotation itself; ``delta`` is one int or one per row of ``x`` (``[..., T]``)."""
        if isinstance(delta, int):
            cos, sin = self._cos_sin(delta, x.dtype, x.device)
        else:
            # Deltas take few distinct values: cos and sin come from a small table indexed by delta.
            low, high = int(delta.min()), int(delta.max())
            offsets = torch.arange(low, high + 1, device=x.device, dtype=torch.float32)
            angles = offsets.unsqueeze(-1) * self.inv_freq.to(x.device)
            index = (delta - low).flatten()
            shape = (*delta.shape, self.rotary_dim // 2)
            cos = angles.cos().to(x.dtype).index_select(0, index).view(shape)
            sin = angles.sin().to(x.dtype).index_select(0, index).view(shape)
        half = self.rotary_dim // 2
        if self.interleaved:
            first, second = x[..., 0 : self.rotary_dim : 2], x[..., 1 : self.rotary_dim : 2]
        else:
            first, second = x[..., :half], x[..., half : self.rotary_dim]
        new_first = torch.mul(first, cos).addcmul_(second, sin, value=-1)
        second.mul_(cos).addcmul_(first, sin)
        first.copy_(new_first)

    def _cos_sin(self, delta: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (delta, dtype, device)
        if key not in self._tables:
            angles = delta * self.inv_freq.to(device)
            self._tables[key] = (angles.cos().to(dtype), angles.sin().to(dtype))
        return self._tables[key]


#: RoPE types whose frequencies depend on the sequence length: a key's rotation changes after it is written.
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def layer_rotaries(model: nn.Module) -> tuple[Rotary | None, ...]:
    """Each layer's rotary embedding as the model applies it, None for a layer without RoPE (SmolLM3's NoPE
    layers); layers that share frequencies share one Rotary. Found from the model's rotary modules (one, or one
    with frequencies per layer type: Gemma-3's local and global), their output layout (halves or interleaved
    pairs) and each attention module's ``use_rope``. Raises UnsupportedModelError for what cannot be re-rotated
    exactly: no rotary module, length-dependent RoPE, or a layout that is neither halves nor pairs.
    """
    config: Any = model.config
    config = getattr(config, "text_config", None) or config
    layers = config.num_hidden_layers
    found = [m for m in model.modules() if "rotary" in type(m).__name__.lower() and _frequencies(m)]
    if not found:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no rotary embedding module whose frequencies kvcompare can read (models "
            "without RoPE, and models that rotate inside their attention module, such as GPT-J); kvcompare "
            "supports RoPE models such as the Llama, Mistral, Qwen, Gemma and GPT-NeoX families"
        )
    module = found[0]
    types = list(getattr(config, "layer_types", None) or [None] * layers)
    distinct: dict[tuple[Any, ...], Rotary] = {}  # layer types with the same frequencies share one Rotary
    by_type: dict[str | None, Rotary] = {}
    for kind in dict.fromkeys(types):
        rotary = _read_rotary(module, kind)
        by_type[kind] = distinct.setdefault((*rotary.inv_freq.tolist(), rotary.rotary_dim, rotary.interleaved), rotary)
    rotaries: list[Rotary | None] = [by_type[kind] for kind in types]
    for attention in model.modules():
        index = getattr(attention, "layer_idx", None)
        if isinstance(index, int) and not getattr(attention, "use_rope", True) and index < layers:
            rotaries[index] = None  # a NoPE layer: its keys carry no position to move
    return tuple(rotaries)


def find_rotary(model: nn.Module) -> Rotary:
    """The rotary embedding of the model's first layer with RoPE (see :func:`layer_rotaries`). Raises
    UnsupportedModelError as :func:`layer_rotaries` does, or for a model without any layer with RoPE."""
    found = [rotary for rotary in layer_rotaries(model) if rotary is not None]
    if not found:
        raise UnsupportedModelError(f"{type(model).__name__} has no layer with a rotary position embedding (RoPE)")
    return found[0]


def _frequencies(module: nn.Module) -> dict[str | None, torch.Tensor]:
    """A rotary module's inverse frequencies: one set, or one per layer type (``{type}_inv_freq``)."""
    single = getattr(module, "inv_freq", None)
    if isinstance(single, torch.Tensor):
        return {None: single}
    kinds = getattr(module, "layer_types", None) or []
    return {kind: t for kind in kinds if isinstance(t := getattr(module, f"{kind}_inv_freq", None), torch.Tensor)}


def _read_rotary(module: nn.Module, kind: str | None) -> Rotary:
    """The Rotary of one layer type of a rotary module, its layout read from the module's own cos output."""
    frequencies = _frequencies(module)
    inv_freq = frequencies.get(kind, frequencies.get(None))
    if inv_freq is None:
        raise UnsupportedModelError(f"{type(module).__name__} has no frequencies for layers of type {kind!r}")
    rope_type = getattr(module, "rope_type", "default")
    rope_type = rope_type.get(kind, "default") if isinstance(rope_type, dict) else rope_type
    if rope_type in LENGTH_DEPENDENT_ROPE:
        raise UnsupportedModelError(
            f"{rope_type} RoPE changes its frequencies with the sequence length, so a cached key's rotation "
            "changes after it is written and cannot be re-rotated exactly; use a model with static RoPE "
            "(default, linear, llama3, yarn)"
        )
    dim = 2 * inv_freq.numel()
    probe = torch.zeros(1, 1, dim)
    positions = torch.arange(1, 4).view(1, -1)
    with torch.no_grad():  # a module with frequencies per layer type is asked for this type's
        cos, _ = (
            module(probe, positions, kind) if kind in frequencies and kind is not None else module(probe, positions)
        )
    cos = cos.float().reshape(-1, cos.shape[-1])[:, :dim]
    if cos.shape[-1] == dim // 2:  # one cos per pair (gpt-oss): the layout is the attention's; the probe decides
        interleaved = False
    elif torch.allclose(cos[:, : dim // 2], cos[:, dim // 2 :]):
        interleaved = False
    elif torch.allclose(cos[:, 0::2], cos[:, 1::2]):
        interleaved = True
    else:
        raise UnsupportedModelError(
            f"{type(module).__name__} lays out its rotary channels neither as two halves nor as adjacent pairs"
        )
    return Rotary(inv_freq.detach().float().cpu(), dim, interleaved)
