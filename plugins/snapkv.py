"""`snapkv`: SnapKV (Li et al., 2024) — what the latest window of queries attends, pooled over neighbours."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from kvcompare import Needs, PolicyError, ScoredPolicy, Signals, hookimpl, parameter


@dataclasses.dataclass
class SnapKV(ScoredPolicy):
    """Per KV head, keep the tokens the last ``window`` queries attend most, and the window's own tokens.

    As in the paper: the window's queries attend the held keys (causally), their weights are summed over the
    window and averaged over the query heads that share the KV head, then average-pooled over ``kernel``
    neighbouring tokens (in time order, zero-padded at both ends) so that kept tokens keep some context.
    The paper compresses once, after the prompt: that is ``--compression prefill``. In the continuous setting
    kvcompare applies it at every eviction, during chunked prefill and decoding alike, with the window's queries as
    they were computed (in shift mode the held keys have been re-rotated since).
    """

    name = "snapkv"
    prefill_setting = (
        "as SnapKV's code and kvpress's SnapKVPress: the context's last `window` queries attend the whole context "
        "causally (softmax over every key), their weights on the older tokens are summed over the window, "
        "average-pooled over `kernel` tokens (zero padding) and averaged over the query heads of each KV head "
        "(kvpress's grouped-query rule, from SnapKV issue #22); the window is always kept and the rest of the "
        "budget goes to the top pooled scores. Deviation: defaults window=32 here, 64 in both references (give "
        "snapkv:window=64 to match them)."
    )
    window: int = parameter(32, "latest queries whose attention decides; their own tokens are always kept")
    kernel: int = parameter(5, "tokens pooled around each token's score (odd)")

    def validate(self) -> None:
        if self.window < 1:
            raise PolicyError(f"snapkv: window must be at least 1, not {self.window}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise PolicyError(f"snapkv: kernel must be a positive odd number, not {self.kernel}")

    def check_limit(self, min_keep: int) -> None:
        if self.window >= min_keep:
            raise PolicyError(
                f"snapkv: window={self.window} is not below the {min_keep} tokens an eviction keeps, so every kept "
                "token would be in the window and snapkv would be `recent`; lower window"
            )

    def needs(self) -> Needs:
        return Needs(queries=self.window)

    def score(self, keys: torch.Tensor, positions: torch.Tensor, signals: Signals | None = None) -> torch.Tensor:
        assert signals is not None and signals.queries is not None and signals.query_positions is not None
        layers, batch, kv_heads, slots, dim = keys.shape
        asked = signals.query_positions
        filled = asked >= 0  # the ring is not full until `window` tokens have been seen
        queries = signals.queries[:, :, :, filled] if not bool(filled.all()) else signals.queries
        asked = asked[filled]
        # A KV head's group of queries, by window, scaled before the product (the smaller tensor).
        queries = (queries.float() * signals.scaling).reshape(layers, batch, kv_heads, -1, dim)
        asked = asked.repeat(queries.shape[3] // asked.numel()).view(-1, 1)
        logits = queries @ keys.float().transpose(-1, -2)  # [layers, batch, kv_heads, rows, slots]
        # A query sees held tokens up to its own: empty and blocked slots compare as newer than any query.
        held = positions.masked_fill(positions < 0, torch.iinfo(positions.dtype).max).unsqueeze(-2)
        # nansum: a query whose every visible token was evicted (a tiny limit) votes for nothing.
        votes = logits.masked_fill_(held > asked, float("-inf")).softmax(dim=-1).nansum(dim=-2)
        in_window = positions >= signals.seen - self.window
        votes.masked_fill_(in_window, 0.0)
        # Pool over neighbours in time: empty slots sort first and score 0, as the paper's zero padding.
        order = positions.argsort(dim=-1)
        pooled = F.avg_pool1d(
            votes.gather(-1, order).view(-1, 1, slots), self.kernel, stride=1, padding=self.kernel // 2
        ).view_as(votes)
        scores = torch.empty_like(votes).scatter_(-1, order, pooled)
        return scores.masked_fill(in_window, float("inf"))


@hookimpl
def register_policies(register):  # type: ignore[no-untyped-def]
    register(SnapKV)
