"""Rotary position embeddings: finding a model's rotary setup and re-rotating cached keys.

Shift mode (StreamingLLM's positional shift) needs kept keys moved to new positions after an eviction.
RoPE is a rotation, so a key rotated at position p is moved to q by rotating it once more by q - p.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from kvcompare.errors import KVCompareError


class UnsupportedModelError(KVCompareError, ValueError):
    """The model lacks something the executor needs (rotary position embeddings, a causal LM head)."""


@dataclasses.dataclass(frozen=True)
class Rotary:
    """The rotary frequencies of a model; the first ``rotary_dim`` channels of each head are rotated."""

    inv_freq: torch.Tensor  # [rotary_dim // 2], float32
    rotary_dim: int
    _tables: dict[tuple[int, torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(
        default_factory=dict, compare=False, repr=False
    )

    def rotate_rows_(self, x: torch.Tensor, rows: torch.Tensor, delta: torch.Tensor | int) -> None:
        """Rotate the given rows of ``x`` (``[N, head_dim]``) in place, row ``rows[i]`` by ``delta[i]`` (or all
        by one int). Only those rows are read and written: after an eviction, the keys whose rank changed."""
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
        key is garbage after about a thousand moves). ``total`` (``[N]``) keeps each row's rotation so far, and
        the row is rebuilt from ``original`` (the key as the model wrote it) in float32, rounded once."""
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


def find_rotary(model: nn.Module) -> Rotary:
    """The model's rotary embedding, or an UnsupportedModelError for models without RoPE."""
    for module in model.modules():
        inv_freq = getattr(module, "inv_freq", None)
        if isinstance(inv_freq, torch.Tensor) and "rotary" in type(module).__name__.lower():
            rope_type = getattr(module, "rope_type", "default")
            if rope_type == "dynamic":
                raise UnsupportedModelError(
                    "dynamic NTK RoPE changes its frequencies with the sequence length, so cached keys cannot "
                    "be re-rotated consistently; use a model with static RoPE"
                )
            return Rotary(inv_freq.detach().float().cpu(), 2 * inv_freq.numel())
    raise UnsupportedModelError(
        f"{type(model).__name__} has no rotary position embedding (RoPE); kvcompare supports RoPE models "
        "such as the Llama, Mistral, Qwen and GPT-NeoX families"
    )
