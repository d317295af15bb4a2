"""The plugin hook specification: how plugins hand kvcompare their policies and tasks."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from kvcompare.policy import KVPolicy
    from kvcompare.task import Task

PROJECT = "kvcompare"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_policies(register: Callable[[type[KVPolicy]], None]) -> None:
    """Register KV-cache eviction policies.

    Call ``register(PolicyClass)`` once per policy. ``PolicyClass`` is a dataclass subclass of
    :class:`kvcompare.policy.KVPolicy` with a unique ``name``; its dataclass fields are its parameters,
    typed and with defaults, so they can be set from the command line (``l2:mode=random``).

    A hook call reaches every plugin, so this hook only collects policies; choosing one by name goes
    through :class:`kvcompare.registry.PolicyRegistry`.
    """


@hookspec
def register_tasks(register: Callable[[type[Task]], None]) -> None:
    """Register tasks: what a run asks of the model under each policy (perplexity, passkey, RULER's tasks).

    Call ``register(TaskClass)`` once per task. ``TaskClass`` is a frozen dataclass subclass of
    :class:`kvcompare.task.Task` with a unique ``name``; its dataclass fields are its parameters, typed and with
    defaults (``passkey:depths=0.1/0.5``). Choosing one by name goes through
    :class:`kvcompare.registry.TaskRegistry`.
    """
