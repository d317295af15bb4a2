"""`l2`: Fix-Size L2 eviction (Devoto et al., 2024) — keys with a low L2 norm draw the most attention."""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from kvcompare import KVPolicy, hookimpl, parameter


@dataclasses.dataclass
class L2Norm(KVPolicy):
    """Per KV head, keep the lowest-norm keys (keep_low), the highest (keep_high) or a seeded random subset.

    keep_high is the ablation; random is uniform and reproducible for a seed.
    """

    name = "l2"
    mode: Literal["keep_low", "keep_high", "random"] = parameter(
        "keep_low", "keep the lowest-norm keys (the paper), the highest (ablation) or a random subset"
    )
    seed: int = parameter(0, "seed of mode=random; each cell starts its generator anew from it")

    def __post_init__(self) -> None:
        self._generator = torch.Generator().manual_seed(self.seed)

    def select(self, keys: torch.Tensor, keep: int, positions: torch.Tensor) -> torch.Tensor:
        if self.mode == "random":
            scores = torch.rand(keys.shape[:4], generator=self._generator).to(keys.device)
        else:
            norms = torch.linalg.vector_norm(keys.float(), dim=-1)
            scores = -norms if self.mode == "keep_low" else norms
        return scores.topk(keep, dim=-1, sorted=False).indices.sort(dim=-1).values


@hookimpl
def register_policies(register):  # type: ignore[no-untyped-def]
    register(L2Norm)
