"""`keydiff`: KeyDiff (Park et al., 2025) — keep the keys least like the others; needs no attention."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from kvcompare import ScoredPolicy, hookimpl


@dataclasses.dataclass
class KeyDiff(ScoredPolicy):
    """Per KV head, evict the keys most similar (cosine) to the anchor, the mean of the held keys' directions.

    Keys only, as in the paper (and kvpress's KeyDiffPress): distinctive keys tend to draw attention. The
    anchor moves as tokens come and go, so every eviction scores the held keys anew.
    """

    name = "keydiff"
    prefill_setting = (
        "as kvpress's KeyDiffPress: per KV head the anchor is the mean of the context's normalised keys and the "
        "budget keys least similar (cosine) to it are kept. Scores are computed in float32 (kvpress: in the model's "
        "dtype), which can only change ties."
    )

    def score(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        held = (positions >= 0).float().unsqueeze(-2)  # [..., 1, slots]
        directions = F.normalize(keys.float(), dim=-1)
        anchor = held @ directions  # the held directions summed: the mean's direction, [..., 1, head_dim]
        cosine = (directions @ anchor.transpose(-1, -2)).squeeze(-1) / anchor.norm(dim=-1).clamp(min=1e-12)
        return -cosine


@hookimpl
def register_policies(register):  # type: ignore[no-untyped-def]
    register(KeyDiff)
