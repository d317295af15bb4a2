"""`uniform`: keep evenly spaced tokens plus the newest ones — an example policy plugin to copy."""

from __future__ import annotations

import dataclasses

import torch

from kvcompare import KVPolicy, hookimpl, parameter


@dataclasses.dataclass
class UniformSpacing(KVPolicy):
    """Keep `recent` newest tokens and spread the rest evenly over the older ones."""

    name = "uniform"
    recent: int = parameter(16, "newest tokens always kept")

    def select(self, keys: torch.Tensor, keep: int, positions: torch.Tensor) -> torch.Tensor:
        length = keys.shape[3]
        recent = min(self.recent, keep)
        older = torch.linspace(0, length - recent - 1, keep - recent, device=keys.device).round().long()
        newest = torch.arange(length - recent, length, device=keys.device)
        return torch.cat([older, newest]).expand(*keys.shape[:3], keep)


@hookimpl
def register_policies(register):  # type: ignore[no-untyped-def]
    register(UniformSpacing)
