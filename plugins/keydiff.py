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

    def score(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        held = (positions >= 0).unsqueeze(-1)
        directions = F.normalize(keys.float(), dim=-1)
        anchor = (directions * held).sum(dim=-2, keepdim=True) / held.sum(dim=-2, keepdim=True).clamp(min=1)
        return -F.cosine_similarity(directions, anchor, dim=-1)


@hookimpl
def register_policies(register):  # type: ignore[no-untyped-def]
    register(KeyDiff)
