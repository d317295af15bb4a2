"""`l2`: Fix-Size L2 eviction (Devoto et al., 2024) — keys with a low L2 norm draw the most attention."""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from kvcompare import ScoredPolicy, hookimpl, parameter


@dataclasses.dataclass
class L2Norm(ScoredPolicy):
    """Per KV head, keep the lowest-norm keys (keep_low), the highest (keep_high) or a seeded random subset.

    keep_high is the ablation; random is uniform and reproducible for a seed. A key's norm is computed once,
    when it is written (rotation does not change it).
    """

    name = "l2"
    prefill_setting = (
        "keep_low: per KV head, the budget keys of the context with the lowest L2 norm, as kvpress's KnormPress "
        "(Devoto et al., 2024); keep_high and random are ablations with no reference. No deviation."
    )
    mode: Literal["keep_low", "keep_high", "random"] = parameter(
        "keep_low", "keep the lowest-norm keys (the paper), the highest (ablation) or a random subset"
    )
    seed: int = parameter(0, "seed of mode=random; each cell starts its generator anew from it")

    def __post_init__(self) -> None:
        self._generator = torch.Generator().manual_seed(self.seed)

    def scores_at_write(self) -> bool:
        return self.mode != "random"

    def score(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.mode == "random":
            return self._random(positions)
        norms = torch.linalg.vector_norm(keys.float(), dim=-1)
        return -norms if self.mode == "keep_low" else norms

    def _random(self, positions: torch.Tensor) -> torch.Tensor:
        """Uniform scores, drawn for the held tokens in time order so that a seed picks the same tokens
        whatever slots they sit in."""
        held = int((positions[(0,) * (positions.dim() - 1)] >= 0).sum())
        in_time = positions.argsort(dim=-1)[..., positions.shape[-1] - held :]
        draw = torch.rand((*positions.shape[:-1], held), generator=self._generator).to(positions.device)
        return torch.full(positions.shape, float("-inf"), device=positions.device).scatter_(-1, in_time, draw)


@hookimpl
def register_policies(register):  # type: ignore[no-untyped-def]
    register(L2Norm)
