"""The KVPolicy contract: a policy only chooses which cache slots to keep; the executor does the rest."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from kvcompare.errors import KVCompareError
from kvcompare.parameters import Parameterised
from kvcompare.signals import Needs, Signals


class PolicyError(KVCompareError, RuntimeError):
    """A policy broke its contract or was given bad parameters."""


@dataclasses.dataclass
class KVPolicy(Parameterised):
    """Base class of every eviction policy.

    Subclasses are dataclasses whose fields are their parameters (typed, with defaults). They implement
    :meth:`select` (or, cheaper, subclass :class:`ScoredPolicy` and implement ``score``) and nothing else:
    victims, slot reuse, re-rotation and timing belong to the shared executor, so every policy is measured
    the same way.
    """

    name: ClassVar[str] = ""
    kind = "policy"
    #: False for policies that never evict (the ``full`` baseline): the executor then enforces no limit.
    bounded: ClassVar[bool] = True
    #: What the policy keeps when the context is compressed once (``--compression prefill``), against its authors'
    #: reference implementation, every deviation stated; ``kvcompare policies`` shows it.
    prefill_setting: ClassVar[str] = ""

    def select(self, keys: torch.Tensor, keep: int, positions: torch.Tensor) -> torch.Tensor:
        """Return the slots to keep.

        Args:
            keys: the cached keys of every compressed layer at once, shape
                ``[layers, batch, kv_heads, length, head_dim]``, in time order (index 0 is the oldest kept
                token). One tensor for all compressed layers lets a policy score them in one vectorised
                call. Keys carry their rotary embedding; rotation does not change their norm. Putting the
                keys in time order costs a copy of the cache per eviction: a :class:`ScoredPolicy` avoids it.
            keep: how many slots to keep, ``0 < keep < length``.
            positions: the original token index of every slot, shape ``[layers, batch, kv_heads, length]``.

        Returns:
            Integer tensor of shape ``[layers, batch, kv_heads, keep]``: per KV head, distinct slot indices
            in ascending order.
        """
        raise NotImplementedError

    def validate(self) -> None:
        """Refuse parameter values that cannot work (called once the policy is built from its spec)."""

    def check_limit(self, min_keep: int) -> None:
        """Refuse a cache limit too small for this policy; ``min_keep`` is the fewest slots an eviction keeps."""

    def needs(self) -> Needs:
        """What this policy reads besides the keys (a :class:`ScoredPolicy` only): the executor collects it
        only when asked, and hands it to :meth:`ScoredPolicy.score` as ``signals``."""
        return Needs()

    # -- bookkeeping the executor and the results use; plugins need not touch it --------------------------
    def fresh(self) -> KVPolicy:
        """A new instance with the same parameters and plugin but no state, so no cell inherits another's.

        ``dataclasses.replace`` runs ``__init__`` and ``__post_init__`` again: a seeded generator starts anew.
        """
        return dataclasses.replace(self).bound_to(self.plugin)


@dataclasses.dataclass
class ScoredPolicy(KVPolicy):
    """A policy that scores slots; the executor evicts the lowest scores with one topk.

    The cheap way to write a policy: the executor picks the victims itself, writes the next tokens into their
    slots and moves nothing that stays, so an eviction costs what it evicts. :meth:`select` is derived from
    :meth:`score`, for callers that want kept indices.
    """

    def score(self, keys: torch.Tensor, positions: torch.Tensor, signals: Signals | None = None) -> torch.Tensor:
        """Return one score per slot; the lowest are evicted first.

        Args:
            keys: ``[layers, batch, kv_heads, slots, head_dim]``, in slot order, which is not time order:
                slots are reused as tokens come and go. A view of the executor's buffer: read it, never edit it.
            positions: the original token index of every slot, ``[layers, batch, kv_heads, slots]``; a
                negative index marks a slot that holds no token, whose score is ignored.
            signals: what :meth:`needs` asked for (attention, queries) and the eviction's context; given only
                to a policy whose ``needs()`` asks for something, so a keys-only policy may leave it out.

        Returns:
            Floating tensor shaped like ``positions``.
        """
        raise NotImplementedError

    def scores_at_write(self) -> bool:
        """Whether a slot's score depends only on its own key and token index, never on the others or on time.

        Then the executor scores each key once, when it is written (``score`` is given just the new slots),
        and keeps the score with its slot, so an eviction never re-reads the cache. A policy that reads
        signals scores at eviction time, so it must return False.
        """
        return False

    def select(self, keys: torch.Tensor, keep: int, positions: torch.Tensor) -> torch.Tensor:
        """The ``keep`` highest-scoring slots, ascending."""
        return self.score(keys, positions).topk(keep, dim=-1).indices.sort(dim=-1).values


def check_selection(policy: KVPolicy, kept: object, keys_shape: torch.Size, keep: int) -> None:
    """Raise a PolicyError naming the policy and its plugin if ``kept`` breaks the select() contract."""
    who = policy.who()
    if not isinstance(kept, torch.Tensor):
        raise PolicyError(f"{who} returned {type(kept).__name__} from select(), expected a tensor of slot indices")
    expected = (*keys_shape[:3], keep)
    if tuple(kept.shape) != expected:
        raise PolicyError(f"{who} returned shape {tuple(kept.shape)}, expected {expected}")
    if kept.dtype.is_floating_point or kept.dtype == torch.bool or kept.is_complex():
        raise PolicyError(f"{who} returned {kept.dtype} indices, expected an integer tensor")
    length = keys_shape[3]
    if keep and (int(kept.min()) < 0 or int(kept.max()) >= length):
        raise PolicyError(f"{who} returned an index outside [0, {length})")
    if keep > 1 and not bool((kept.diff(dim=-1) > 0).all()):
        raise PolicyError(f"{who} returned repeated or unsorted indices; each head's must be distinct and ascending")


def check_scores(policy: KVPolicy, scores: object, shape: tuple[int, ...]) -> None:
    """Raise a PolicyError naming the policy and its plugin if ``scores`` breaks the score() contract."""
    who = policy.who()
    if not isinstance(scores, torch.Tensor):
        raise PolicyError(f"{who} returned {type(scores).__name__} from score(), expected a tensor of scores")
    if tuple(scores.shape) != shape:
        raise PolicyError(f"{who} returned scores of shape {tuple(scores.shape)}, expected {shape}")
    if not scores.dtype.is_floating_point:
        raise PolicyError(f"{who} returned {scores.dtype} scores, expected a floating tensor")
    if bool(scores.isnan().any()):
        raise PolicyError(f"{who} returned NaN scores")
