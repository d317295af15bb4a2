"""Tiny randomly initialised models for tests and device checks: full rotary (Llama) and partial (GPT-NeoX); the
specs of every built-in policy, from the registry; and policies that misbehave, importable by any worker process, for
tests of failure handling."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

from kvcompare.policy import ScoredPolicy

TINY_VOCAB = 96
_TINY_SHAPES: dict[str, Any] = {
    "vocab_size": TINY_VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "max_position_embeddings": 1024,
}


#: Parameters that fit a built-in policy into the tests' small caches (snapkv's default 32-query window would not).
SMALL_CACHE_SPECS = {"snapkv": "snapkv:window=4"}


def builtin_policies(full: bool = False, signals: bool | None = None) -> list[str]:
    """The spec of every core and built-in policy, from the registry (sorted by name; a third-party or
    test-registered one is left out), with :data:`SMALL_CACHE_SPECS`'s parameters where it has some. ``full``:
    include the unbounded baseline. ``signals``: True keeps only the policies whose ``needs()`` asks for attention
    or queries, False only those that read the keys alone, None both."""
    from kvcompare.plugins import get_host

    host = get_host()
    registry = host.registry()
    specs = []
    for name in registry.names():
        entry = registry.entry(name)
        info = host.infos.get(entry.plugin)
        policy = entry.cls()
        if info is None or not info.origin or (not policy.bounded and not full):
            continue
        if signals is None or bool(policy.needs()) == signals:
            specs.append(SMALL_CACHE_SPECS.get(name, name))
    return specs


def tiny_llama(**changes: Any) -> LlamaForCausalLM:
    """Full rotary, grouped-query attention (4 query heads share 2 KV heads)."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**_TINY_SHAPES, "num_key_value_heads": 2, **changes})).eval()


def tiny_neox(**changes: Any) -> GPTNeoXForCausalLM:
    """Partial rotary: only a quarter of each head's channels are rotated."""
    torch.manual_seed(0)
    return GPTNeoXForCausalLM(GPTNeoXConfig(**{**_TINY_SHAPES, "rotary_pct": 0.25, **changes})).eval()


@dataclasses.dataclass
class DiesInWorker(ScoredPolicy):
    """Scores like `recent`, but kills its process at its first eviction until ``tally`` (a file, one line per
    death) counts ``times`` deaths: a worker that crashes, for tests of Ray's restarts and of --resume."""

    name: ClassVar[str] = "dies"
    tally: str = ""
    times: int = 1

    def score(self, keys: torch.Tensor, positions: torch.Tensor, signals: object = None) -> torch.Tensor:
        """Kill the worker process the first ``times`` calls (across processes), then score as l2."""
        for death in range(self.times):  # each death is claimed atomically: two workers never both take one
            try:
                os.close(os.open(f"{self.tally}.{death}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                continue
            with Path(self.tally).open("a") as file:
                file.write(f"{os.getpid()}\n")
            os._exit(1)
        return positions.float()


@dataclasses.dataclass
class RaisesAtEviction(ScoredPolicy):
    """A policy with a bug: it raises at its first eviction, for tests that one cell's failure costs no other."""

    name: ClassVar[str] = "raises"

    def score(self, keys: torch.Tensor, positions: torch.Tensor, signals: object = None) -> torch.Tensor:
        """Raise, as a buggy policy would."""
        raise RuntimeError("bug in the policy")
