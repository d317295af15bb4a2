"""`full`: the baseline that never evicts."""

from __future__ import annotations

import dataclasses

import torch

from kvcompare import KVPolicy, hookimpl


@dataclasses.dataclass
class FullCache(KVPolicy):
    """Keep every token: the executor enforces no cache limit for this policy."""

    name = "full"
    bounded = False

    def select(self, keys: torch.Tensor, keep: int, positions: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the full cache never evicts, so select() is never called")


@hookimpl
def register_policies(register):  # type: ignore[no-untyped-def]
    register(FullCache)
