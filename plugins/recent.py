"""`recent`: recent_only, the plain sliding window."""

from __future__ import annotations

import dataclasses

import torch

from kvcompare import KVPolicy, hookimpl


@dataclasses.dataclass
class RecentOnly(KVPolicy):
    """Keep the most recent tokens only (StreamingLLM without sinks: shows what the sinks are worth)."""

    name = "recent"

    def select(self, keys: torch.Tensor, keep: int, positions: torch.Tensor) -> torch.Tensor:
        length = keys.shape[3]
        return torch.arange(length - keep, length, device=keys.device).expand(*keys.shape[:3], keep)


@hookimpl
def register_policies(register):  # type: ignore[no-untyped-def]
    register(RecentOnly)
