"""What the core provides itself, always registered: the `full` baseline and the `ppl` rolling pass.

They are plugins of the core, not plugin files: a run builds `full` as its baseline and runs `ppl` as its own pass
over corpus passages whatever is installed. Their plugin names stay ``full`` and ``ppl``, the names their rows
have always carried (a cell's identity includes its policy's plugin), so earlier runs resume as before.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from kvcompare.hookspecs import hookimpl
from kvcompare.policy import KVPolicy
from kvcompare.task import Task


@dataclasses.dataclass
class FullCache(KVPolicy):
    """Keep every token: the executor enforces no cache limit for this policy."""

    name = "full"
    bounded = False

    def select(self, keys: torch.Tensor, keep: int, positions: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the full cache never evicts, so select() is never called")


@dataclasses.dataclass(frozen=True)
class Perplexity(Task):
    """Perplexity and next-token accuracy of every predicted token of each passage (a rolling pass).

    This is the run's own rolling pass (each passage's quality pass and its latency trials, see the protocol in
    the README), not a probe task: the run draws its passages from the corpus, so it builds and scores no probes.
    """

    name = "ppl"
    request = "rolling"
    metric = "perplexity (lower is better) and next-token accuracy"


class FullPlugin:
    """The core's plugin of the `full` baseline."""

    @hookimpl
    def register_policies(self, register: Callable[[type[KVPolicy]], None]) -> None:
        register(FullCache)


class PerplexityPlugin:
    """The core's plugin of the `ppl` rolling pass."""

    @hookimpl
    def register_tasks(self, register: Callable[[type[Task]], None]) -> None:
        register(Perplexity)


#: The core's plugins by plugin name, registered on every plugin host before anything else.
CORE_PLUGINS: dict[str, object] = {"full": FullPlugin(), "ppl": PerplexityPlugin()}


def full_cache() -> KVPolicy:
    """The `full` baseline as every run builds it (no parameters), bound to its plugin ``full``."""
    return FullCache().bound_to("full")
