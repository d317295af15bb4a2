"""`tova`: Token Omission Via Attention (Oren et al., 2024) — evict what the latest query attends least."""

from __future__ import annotations

import dataclasses

import torch

from kvcompare import Needs, ScoredPolicy, Signals, hookimpl, parameter


@dataclasses.dataclass
class TokenOmission(ScoredPolicy):
    """Evict the tokens with the lowest attention from the last query, averaged over all heads of the layer.

    As in the paper, one set of tokens is kept per layer; ``per_head=true`` lets each KV head keep its own
    (its query heads' weights summed). In a decode step the last query is the previous token's, which saw
    exactly the held tokens: the paper's choice. In chunked teacher forcing it is the previous chunk's last
    query, over the tokens held then and that chunk.
    """

    name = "tova"
    per_head: bool = parameter(False, "each KV head keeps its own tokens, instead of one set per layer")

    def needs(self) -> Needs:
        return Needs(attention=True)

    def score(self, keys: torch.Tensor, positions: torch.Tensor, signals: Signals | None = None) -> torch.Tensor:
        assert signals is not None and signals.last_attention is not None
        weights = signals.last_attention
        if self.per_head:
            return weights
        return weights.mean(dim=2, keepdim=True).expand_as(weights)  # the same score for every head of a layer


@hookimpl
def register_policies(register):  # type: ignore[no-untyped-def]
    register(TokenOmission)
