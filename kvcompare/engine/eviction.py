"""Choosing victims: a policy's scores, or the slots it keeps, become the cache slots to free.

The cache reuses slots, so its keys are not in time order. A :class:`~kvcompare.policy.ScoredPolicy` scores
the slots where they are and the victims are one topk over the lowest scores; scores that depend only on a
slot's own key and token are computed once, when the key is written, and kept as ranks with their slots.
A plain ``select()`` policy is given its keys in time order, as its contract promises, which costs one
gather of the cache per eviction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from kvcompare.policy import KVPolicy, PolicyError, ScoredPolicy, check_scores, check_selection
from kvcompare.signals import Signals

T = TypeVar("T")


#: The eviction rank of an empty slot: below every held one, so empty slots are always freed first.
EMPTY = torch.iinfo(torch.int64).min
#: The rank of a blocked slot (beyond its layer's budget): above every held one, so it is never freed.
NEVER = torch.iinfo(torch.int64).max
#: The token index a blocked slot records; like an empty slot's -1 it is negative, so it is never attended.
BLOCKED = -2


class VictimChooser:
    """Holds a cache's policy and, for scores made at write time, each slot's eviction rank between evictions.

    ``slots`` is the cache's slot tokens (``[layers, batch, kv_heads, slots]``), ``budgets`` each layer's. Raises
    :class:`~kvcompare.policy.PolicyError` for a policy that asks for signals but scores at write time.
    """

    def __init__(
        self, policy: KVPolicy, slots: torch.Tensor, budgets: list[int], check_every_eviction: bool = False
    ) -> None:
        self.policy = policy
        self.scored = isinstance(policy, ScoredPolicy)
        self.at_write = isinstance(policy, ScoredPolicy) and policy.scores_at_write()
        self.signals = bool(policy.needs())
        if self.signals and (not self.scored or self.at_write):
            raise PolicyError(
                f"{policy.who()} asks for signals in needs(), so it must be a ScoredPolicy whose "
                "scores_at_write() is False: signals change after a key is written"
            )
        self.budgets = torch.tensor(budgets, dtype=torch.long, device=slots.device)
        # Each slot's rank (see eviction_ranks), kept only when scores are made at write time.
        self.ranks = torch.full(slots.shape, EMPTY, device=slots.device) if self.at_write else None
        if self.ranks is not None:
            self.ranks.masked_fill_(slots == BLOCKED, NEVER)
        self._unranked: list[torch.Tensor] = []  # slots written since the last eviction, not ranked yet
        # True while every layer and head ranks its slots alike (scores from token indices alone, as
        # StreamingLLM's and recent's): then they all evict the same slots, chosen once from one row.
        self.uniform = self.at_write and len(set(budgets)) <= 1
        self.check_every_eviction = check_every_eviction
        self.calls = 0

    def written(self, slots: torch.Tensor) -> None:
        """Note the slots a chunk is about to be written into (``[layers, batch, kv_heads, chunk]``) once slots
        are reused; before the first eviction the held slots are ranked all at once."""
        if self.at_write:
            self._unranked.append(slots)

    def choose(
        self, keys: torch.Tensor, tokens: torch.Tensor, held: int, count: int, signals: Signals | None = None
    ) -> torch.Tensor:
        """The ``count`` slots to free in every layer and head: its empty slots first, then its held ones
        ranked lowest; blocked slots never.

        ``keys`` is ``[layers, batch, kv_heads, slots, head_dim]``, ``tokens`` the token index of each slot
        (-1 when empty, :data:`BLOCKED` beyond the layer's budget), ``held`` the tokens each head held when the
        slots were last in time order (the first eviction). Returns ``[layers, batch, kv_heads, count]``.

        Raises whatever the policy raises; when checking (the first eviction, or every one with
        ``check_every_eviction``), :class:`~kvcompare.policy.PolicyError` for scores or a selection of the wrong
        shape or dtype, or for a policy that edited the keys or positions it was given.
        """
        first = self.calls == 0
        check = first or self.check_every_eviction
        self.calls += 1
        if self.at_write:
            ranks = self._ranks_at_write(keys, tokens, held, first, check)
        else:
            scores = (
                self._scored(keys, tokens, check, signals)
                if self.scored
                else self._scores_from_select(keys, tokens, count, check)
            )
            ranks = eviction_ranks(scores, tokens).masked_fill(tokens < 0, EMPTY).masked_fill(tokens == BLOCKED, NEVER)
        if self.uniform:
            freed = _lowest(ranks[(0,) * (ranks.dim() - 1)], count).expand(*ranks.shape[:-1], count)
        else:
            freed = _lowest(ranks, count)
        if self.ranks is not None:
            self.ranks.scatter_(-1, freed, EMPTY)
        return freed

    def keep(
        self, keys: torch.Tensor, tokens: torch.Tensor, keep: list[int], signals: Signals | None = None
    ) -> list[torch.Tensor]:
        """The prefill setting's one compression: the slots each compressed layer keeps of the tokens it holds.

        ``keys`` is ``[layers, batch, kv_heads, held, head_dim]`` and ``tokens`` ``[layers, batch, kv_heads, held]``,
        both in time order (nothing was evicted before); ``keep[n]`` is layer n's budget, at most ``held``. A
        :class:`~kvcompare.policy.ScoredPolicy`'s highest scores are kept (equal scores: the newest), a ``select()``
        policy's selection as it gives it. Returns one ``[batch, kv_heads, keep[n]]`` tensor per layer, ascending.
        Raises what the policy raises, and :class:`~kvcompare.policy.PolicyError` for output of the wrong shape or
        dtype, or for a policy that edited what it was given.
        """
        self.calls += 1
        if self.scored:
            scores = self._scored(keys, tokens, True, signals)
        else:
            scores = self._scores_from_select(keys, tokens, 0, True, keep)
        ranks = eviction_ranks(scores, tokens)
        if len(set(keep)) == 1:
            return list(ranks.topk(keep[0], dim=-1).indices.sort(dim=-1).values)
        return [ranks[n].topk(k, dim=-1).indices.sort(dim=-1).values for n, k in enumerate(keep)]

    # -- the three ways a policy's choice arrives ---------------------------------------------------------
    def _scored(
        self, keys: torch.Tensor, tokens: torch.Tensor, check: bool, signals: Signals | None = None
    ) -> torch.Tensor:
        assert isinstance(self.policy, ScoredPolicy)
        policy = self.policy
        if self.signals:
            scores = self._call(lambda: policy.score(keys, tokens, signals), keys, tokens, check)
        else:
            scores = self._call(lambda: policy.score(keys, tokens), keys, tokens, check)
        if check:
            check_scores(policy, scores, tuple(tokens.shape))
        return scores

    def _ranks_at_write(
        self, keys: torch.Tensor, tokens: torch.Tensor, held: int, first: bool, check: bool
    ) -> torch.Tensor:
        """Rank the slots written since the last eviction (on the first, the ``held`` slots filled in order)."""
        assert self.ranks is not None
        if first:
            prefix = tokens[..., :held]
            fresh = eviction_ranks(self._scored(keys[..., :held, :], prefix, check), prefix)
            self.ranks[..., :held] = fresh
        elif self._unranked:
            slots = self._unranked[0] if len(self._unranked) == 1 else torch.cat(self._unranked, dim=-1)
            self._unranked.clear()
            written = tokens.gather(-1, slots)
            fresh = eviction_ranks(self._scored(_take(keys, slots), written, check), written)
            self.ranks.scatter_(-1, slots, fresh)
        else:
            return self.ranks
        if self.uniform:
            self.uniform = torch.equal(fresh, fresh[:1, :1, :1].expand_as(fresh))
        return self.ranks

    def _scores_from_select(
        self, keys: torch.Tensor, tokens: torch.Tensor, count: int, check: bool, keep: list[int] | None = None
    ) -> torch.Tensor:
        """Give select() the held keys in time order; score what it keeps 1 and the rest 0.

        Each layer keeps ``keep[n]`` tokens (default: its budget less the ``count`` freed, at most what it holds).
        Layers that hold different numbers of tokens (uneven budgets) are given to select() one at a time.
        """
        held = (tokens[:, 0, 0] >= 0).sum(dim=-1).tolist()
        if keep is None:
            keep = torch.minimum(torch.tensor(held), self.budgets.cpu() - count).tolist()
        if len(set(zip(held, keep, strict=True))) == 1:
            return self._select_layers(keys, tokens, held[0], keep[0], check)
        return torch.cat(
            [
                self._select_layers(keys[n : n + 1], tokens[n : n + 1], held[n], keep[n], check)
                for n in range(tokens.shape[0])
            ]
        )

    def _select_layers(
        self, keys: torch.Tensor, tokens: torch.Tensor, held: int, keep: int, check: bool
    ) -> torch.Tensor:
        if keep >= held:  # this layer has room without evicting: keep every held token
            return (tokens >= 0).float()
        order = tokens.argsort(dim=-1)[..., tokens.shape[-1] - held :]  # held slots, oldest first (empty sort first)
        in_time, positions = _take(keys, order), tokens.gather(-1, order)
        kept = self._call(lambda: self.policy.select(in_time, keep, positions), in_time, positions, check)
        if check:
            check_selection(self.policy, kept, in_time.shape, keep)
        ones = torch.ones(kept.shape, dtype=torch.float32, device=tokens.device)
        return torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device).scatter_(
            -1, order.gather(-1, kept.long()), ones
        )

    def _call(self, call: Callable[[], T], keys: torch.Tensor, tokens: torch.Tensor, check: bool) -> T:
        """Run a policy call; when checking, refuse one that edited what it was given."""
        if not check:
            return call()
        # A policy may be given views of the cache itself: an edit in place would silently change the model.
        keys_before, tokens_before = keys.clone(), tokens.clone()
        result = call()
        if not (torch.equal(keys, keys_before) and torch.equal(tokens, tokens_before)):
            raise PolicyError(
                f"{self.policy.who()} changed the keys or positions it was given; it must only read them "
                "(work on a copy)"
            )
        return result


def _lowest(ranks: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` lowest-ranked slots along the last axis (argmin for one: it reads the ranks once)."""
    if count == 1:
        return ranks.argmin(dim=-1, keepdim=True)
    return ranks.topk(count, dim=-1, largest=False, sorted=False).indices


def eviction_ranks(scores: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """One 64-bit integer per slot whose order is the eviction order: by score, then oldest token first.

    Equal scores (the same word's key at layer 0 has the same norm wherever it occurs) go oldest first, so the
    victims do not depend on which slots tokens happen to sit in. The score's float32 bits, made monotone,
    sit above the token index. Meaningless for empty slots: the caller ranks those :data:`EMPTY`.
    """
    bits = scores.float().view(torch.int32)
    monotone = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()
    return (monotone << 32) | (tokens + 1)


def _take(keys: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The keys at ``slots`` (``[..., n]``), as ``[..., n, head_dim]``."""
    return keys.gather(-2, slots.unsqueeze(-1).expand(*slots.shape, keys.shape[-1]))


def rank_shift(
    tokens: torch.Tensor, freed: torch.Tensor, uniform: bool = False
) -> tuple[torch.Tensor, torch.Tensor | int]:
    """The kept slots whose position moves up when ``freed`` slots are evicted, and by how much.

    Shift mode keeps the held positions consecutive, ending just before the next token, so a key moves up by
    one for every newer token evicted; keys newer than every evicted token stay. Returns flat indices into
    ``tokens`` and the moves (an int when all move alike: one token evicted), so that only the moving keys
    are touched (for StreamingLLM, just the sinks). ``uniform``: every row holds the same tokens in the same
    slots and frees the same ones, so the first row is worked out and repeated.
    """
    if uniform:
        first = (0,) * (tokens.dim() - 1)
        rows, moves = rank_shift(tokens[first].unsqueeze(0), freed[first].unsqueeze(0))
        starts = torch.arange(0, tokens.numel(), tokens.shape[-1], device=tokens.device).unsqueeze(1)
        every = (starts + rows).flatten()
        return every, moves if isinstance(moves, int) else moves.repeat(starts.shape[0])
    gone = tokens.gather(-1, freed)
    if gone.shape[-1] > 1:
        gone = gone.sort(dim=-1).values  # an empty slot's -1 is never newer than a token
    older = (tokens >= 0) & (tokens < gone[..., -1:])
    older.scatter_(-1, freed, False)  # freed slots are overwritten or emptied, not moved
    rows = older.view(-1).nonzero().squeeze(1)
    count = gone.shape[-1]
    if count == 1:
        return rows, 1
    gone_by_row = gone.reshape(-1, count).index_select(0, rows.div(tokens.shape[-1], rounding_mode="floor"))
    kept = tokens.reshape(-1).index_select(0, rows).unsqueeze(1)
    return rows, count - torch.searchsorted(gone_by_row, kept, right=True).squeeze(1)
