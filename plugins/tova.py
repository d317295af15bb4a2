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

    In the prefill setting (one compression after the context, as kvpress's TOVAPress): the context's last query's
    attention, averaged over the layer's heads, and the context's last token is always kept (kvpress pads it with
    the highest score). Every KV head of a layer keeps the same tokens unless ``per_head``.
    """

    name = "tova"
    prefill_setting = (
        "as kvpress's TOVAPress: the context's last query's attention, averaged over all heads of the layer, the "
        "same tokens kept by every KV head, and the context's last token always kept; per_head=true (each KV head "
        "its own group's weights) is kvcompare's variant."
    )
    per_head: bool = parameter(False, "each KV head keeps its own tokens, instead of one set per layer")

    def needs(self) -> Needs:
        return Needs(attention=True)

    def score(self, keys: torch.Tensor, positions: torch.Tensor, signals: Signals | None = None) -> torch.Tensor:
        assert signals is not None and signals.last_attention is not None
        weights = signals.last_attention
        if not self.per_head:
            weights = weights.mean(dim=2, keepdim=True).expand_as(weights)  # the same for every head of a layer
        if signals.setting == "prefill":  # the context's last token stays, as in kvpress's TOVAPress
            weights = weights.masked_fill(positions == signals.seen - 1, float("inf"))
        return weights


@hookimpl
def register_policies(register):  # type: ignore[no-untyped-def]
    register(TokenOmission)
