"""kvcompare: compare KV-cache eviction policies for causal language models under identical measurement.

What a plugin author needs is importable from here:
``from kvcompare import KVPolicy, ScoredPolicy, Needs, Signals, hookimpl, parameter``.
These names are loaded on first use, so ``import kvcompare`` stays light (no torch) for the command line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["KVCompareError", "KVPolicy", "Needs", "PolicyError", "ScoredPolicy", "Signals", "hookimpl", "parameter"]

if TYPE_CHECKING:
    from kvcompare.errors import KVCompareError
    from kvcompare.hookspecs import hookimpl
    from kvcompare.parameters import parameter
    from kvcompare.policy import KVPolicy, PolicyError, ScoredPolicy
    from kvcompare.signals import Needs, Signals

_HOMES = {
    "KVCompareError": "kvcompare.errors",
    "KVPolicy": "kvcompare.policy",
    "PolicyError": "kvcompare.policy",
    "ScoredPolicy": "kvcompare.policy",
    "Needs": "kvcompare.signals",
    "Signals": "kvcompare.signals",
    "hookimpl": "kvcompare.hookspecs",
    "parameter": "kvcompare.parameters",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'kvcompare' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_HOMES[name]), name)
