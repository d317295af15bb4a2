"""`streaming`: StreamingLLM (Xiao et al., 2024) — attention sinks plus a recent window."""

from __future__ import annotations

import dataclasses

import torch

from kvcompare import PolicyError, ScoredPolicy, hookimpl, parameter


@dataclasses.dataclass
class StreamingLLM(ScoredPolicy):
    """Keep the first `start_size` tokens (the attention sinks) and the most recent ones."""

    name = "streaming"
    prefill_setting = (
        "the context's first start_size tokens and its most recent (budget - start_size), as kvpress's "
        "StreamingLLMPress with n_sink = start_size; no deviation."
    )
    start_size: int = parameter(4, "attention-sink tokens kept from the start of the text")

    def validate(self) -> None:
        if self.start_size < 0:
            raise PolicyError("streaming: start_size must be >= 0")

    def check_limit(self, min_keep: int) -> None:
        if min_keep <= self.start_size:
            raise PolicyError(
                f"streaming: an eviction would keep only {min_keep} tokens, not more than its "
                f"start_size={self.start_size} attention sinks"
            )

    def score(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # The oldest token goes first, except the sinks, which never go.
        return positions.float().masked_fill(positions < self.start_size, float("inf"))

    def scores_at_write(self) -> bool:
        return True


@hookimpl
def register_policies(register):  # type: ignore[no-untyped-def]
    register(StreamingLLM)
