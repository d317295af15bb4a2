"""Finding and loading plugins: built-in and third-party ones come through the same entry-point group."""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import logging
from types import ModuleType
from typing import Any, TypeVar

import pluggy

from kvcompare import hookspecs
from kvcompare.registry import PolicyRegistry, SpecRegistry, TaskRegistry

log = logging.getLogger(__name__)

R = TypeVar("R", bound=SpecRegistry[Any])


@dataclasses.dataclass(frozen=True)
class PluginInfo:
    """A loaded plugin: its name, module and the distribution (package) and version it came from."""

    name: str
    module: str
    distribution: str
    version: str


@dataclasses.dataclass(frozen=True)
class PluginFailure:
    """A plugin that failed to load, with the error."""

    name: str
    error: str


class PluginHost:
    """The plugin manager, what it loaded, and what failed to load."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self.failures: list[PluginFailure] = []

    def add(self, plugin: object, name: str, distribution: str = "", version: str = "") -> None:
        """Register a plugin; a misspelt hook makes this one fail loudly without taking the others down."""
        self.pm.register(plugin, name=name)
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as err:
            self.pm.unregister(plugin)
            self._fail(name, f"{err} (hooks are named like register_policies)")
            return
        module = plugin.__name__ if isinstance(plugin, ModuleType) else type(plugin).__module__
        self.infos[name] = PluginInfo(name, module, distribution, version)

    def load_entry_points(self) -> None:
        """Register every plugin of the ``kvcompare`` entry-point group not registered yet; one that fails to import is
        recorded, not raised."""
        for ep in importlib.metadata.entry_points(group=hookspecs.PROJECT):
            if self.pm.has_plugin(ep.name):
                continue
            dist = ep.dist
            try:
                plugin = ep.load()
            except Exception as err:  # a broken plugin must not take the others down
                self._fail(ep.name, f"failed to import {ep.value}: {type(err).__name__}: {err}")
                continue
            self.add(plugin, ep.name, dist.name if dist else "", dist.version if dist else "")

    def registry(self) -> PolicyRegistry:
        """Ask every plugin for its policies, remembering which plugin registered which."""
        return self._collect(PolicyRegistry(), "register_policies")

    def tasks(self) -> TaskRegistry:
        """Ask every plugin for its tasks, remembering which plugin registered which."""
        return self._collect(TaskRegistry(), "register_tasks")

    def _collect(self, registry: R, hook: str) -> R:
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            name = impl.plugin_name

            def register(cls: type, _plugin: str = name) -> None:
                registry.add(cls, _plugin)

            try:
                impl.function(register=register)
            except Exception as err:
                self._fail(name, f"{hook} raised {type(err).__name__}: {err}")
        return registry

    def plugins(self) -> list[PluginInfo]:
        """The plugins that loaded and registered cleanly; a failed one is listed in ``failures`` only."""
        failed = {f.name for f in self.failures}
        return [
            self.infos.get(n) or PluginInfo(n, "", "", "")
            for n, _ in sorted(self.pm.list_name_plugin())
            if n not in failed
        ]

    def _fail(self, name: str, error: str) -> None:
        if any(f.name == name and f.error == error for f in self.failures):
            return
        self.failures.append(PluginFailure(name, error))
        log.warning(f"plugin {name!r} not loaded: {error}")
        log.debug(f"plugin {name!r}: the import's traceback", exc_info=True)


@functools.cache
def get_host() -> PluginHost:
    """The process-wide plugin host, loaded once from the `kvcompare` entry-point group."""
    host = PluginHost()
    host.load_entry_points()
    return host


def get_tasks() -> TaskRegistry:
    """The process-wide task registry (every plugin's tasks)."""
    return get_host().tasks()


def get_registry() -> PolicyRegistry:
    """The process-wide policy registry (every plugin's policies)."""
    return get_host().registry()
