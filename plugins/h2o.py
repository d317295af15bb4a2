"""`h2o`: Heavy-Hitter Oracle (Zhang et al., NeurIPS 2023) — keep the tokens that have drawn the most attention."""

from __future__ import annotations

import dataclasses

import torch

from kvcompare import Needs, PolicyError, ScoredPolicy, Signals, hookimpl, parameter


@dataclasses.dataclass
class HeavyHitters(ScoredPolicy):
    """Per KV head, keep a recent window and, beside it, the tokens with the most accumulated attention.

    A token's score is the attention it has received from every query since it was written, summed over the
    query heads that share the KV head (H2O's accumulated score). The budget is split as in the paper: the
    newest ``recent_ratio`` of each layer's limit is a recent window, the rest goes to heavy hitters. Chunked
    teacher forcing forces one choice: the window counts the incoming chunk, so only ``recent - chunk`` of
    the held tokens are protected as recent, and the heavy part keeps the same size at any stride.
    """

    name = "h2o"
    prefill_setting = (
        "as H2O's real-drop code (H2OKVCache_LayerWise) at the end of the prompt: the newest int(budget x "
        "recent_ratio) context tokens are the recent window and the rest of the budget goes to the tokens with the "
        "most attention accumulated over every context query. Deviation: per KV head, the attention of its query "
        "group summed (H2O's code scores each attention head of models without grouped-query attention)."
    )
    recent_ratio: float = parameter(
        0.5, "share of each layer's limit kept as a recent window; the rest are heavy hitters"
    )

    def validate(self) -> None:
        if not 0 <= self.recent_ratio <= 1:
            raise PolicyError(f"h2o: recent_ratio must be between 0 and 1, not {self.recent_ratio}")
        if self.recent_ratio == 1:
            raise PolicyError("h2o: recent_ratio=1 keeps no heavy hitter: that is `recent`; use recent, or below 1")

    def needs(self) -> Needs:
        return Needs(attention=True)

    def score(self, keys: torch.Tensor, positions: torch.Tensor, signals: Signals | None = None) -> torch.Tensor:
        assert signals is not None and signals.accumulated is not None
        recent = (signals.budgets * self.recent_ratio).long() - signals.incoming  # held tokens in the window
        first_recent = (signals.seen - recent.clamp(min=0)).view(-1, *[1] * (positions.dim() - 1))
        return signals.accumulated.masked_fill(positions >= first_recent, float("inf"))


@hookimpl
def register_policies(register):  # type: ignore[no-untyped-def]
    register(HeavyHitters)
