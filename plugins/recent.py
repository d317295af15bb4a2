"""`recent`: recent_only, the plain sliding window."""

from __future__ import annotations

import dataclasses

import torch

from kvcompare import ScoredPolicy, hookimpl


@dataclasses.dataclass
class RecentOnly(ScoredPolicy):
    """Keep the most recent tokens only (StreamingLLM without sinks: shows what the sinks are worth)."""

    name = "recent"
    prefill_setting = "the context's most recent budget tokens (StreamingLLMPress with n_sink = 0); no deviation."

    def score(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return positions.float()  # the oldest token goes first

    def scores_at_write(self) -> bool:
        return True


@hookimpl
def register_policies(register):  # type: ignore[no-untyped-def]
    register(RecentOnly)
