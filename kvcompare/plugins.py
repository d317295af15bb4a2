"""Finding and loading plugins: the core's own, the built-in ones by import, third-party ones by entry point.

All three are registered on one plugin host with the same hooks, so a built-in is written exactly like a third-party
plugin (see examples/kvcompare-example-plugin); only how it is found differs. A new built-in is one module in
``plugins/`` plus one line in :data:`BUILTIN_PLUGINS`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import logging
from types import ModuleType
from typing import Any, TypeVar

import pluggy

import kvcompare
from kvcompare import hookspecs
from kvcompare.core import CORE_PLUGINS
from kvcompare.registry import PolicyRegistry, SpecRegistry, TaskRegistry

log = logging.getLogger(__name__)

R = TypeVar("R", bound=SpecRegistry[Any])

#: The package of the built-in plugins (``plugins/`` in the source tree, installed as ``kvcompare_plugins``).
BUILTIN_PACKAGE = "kvcompare_plugins"
#: The built-in plugins, loaded by import (as simonw/llm's DEFAULT_PLUGINS); each is registered under its module's
#: last name, the name its rows carry in the ``plugin`` column.
BUILTIN_PLUGINS: tuple[str, ...] = tuple(
    f"{BUILTIN_PACKAGE}.{name}"
    for name in (
        "streaming",
        "l2",
        "recent",
        "h2o",
        "tova",
        "snapkv",
        "keydiff",
        "passkey",
        "niah",
        "variable_tracking",
        "common_words",
        "frequent_words",
    )
)
#: Where a plugin came from, besides a third-party distribution (origin "").
CORE, BUILT_IN = "core", "built-in"


@dataclasses.dataclass(frozen=True)
class PluginInfo:
    """A loaded plugin: its name, module, the distribution (package) and version it came from, and its origin:
    ``core``, ``built-in``, or ``""`` for a third-party or in-process one."""

    name: str
    module: str
    distribution: str
    version: str
    origin: str = ""


@dataclasses.dataclass(frozen=True)
class PluginFailure:
    """A plugin that failed to load, with the error."""

    name: str
    error: str


class PluginHost:
    """The plugin manager, what it loaded, and what failed to load. The core's plugins are registered from the
    start; :meth:`load` adds the built-in and third-party ones."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self.failures: list[PluginFailure] = []
        for name, plugin in CORE_PLUGINS.items():
            self.add(plugin, name, "kvcompare", kvcompare.__version__, CORE)

    def load(self) -> None:
        """Register the built-in plugins, then every third-party plugin of the ``kvcompare`` entry-point group."""
        self.load_builtins()
        self.load_entry_points()

    def load_builtins(self) -> None:
        """Import and register each module of :data:`BUILTIN_PLUGINS`; one that fails to import is recorded (a
        broken checkout), not raised."""
        for module in BUILTIN_PLUGINS:
            name = module.rsplit(".", 1)[1]
            if self.pm.has_plugin(name):
                continue
            try:
                plugin = importlib.import_module(module)
            except Exception as err:
                self._fail(name, f"failed to import {module}: {type(err).__name__}: {err}")
                continue
            self.add(plugin, name, "kvcompare", kvcompare.__version__, BUILT_IN)

    def add(self, plugin: object, name: str, distribution: str = "", version: str = "", origin: str = "") -> None:
        """Register a plugin; a misspelt hook makes this one fail loudly without taking the others down."""
        self.pm.register(plugin, name=name)
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as err:
            self.pm.unregister(plugin)
            self._fail(name, f"{err} (hooks are named like register_policies)")
            return
        module = plugin.__name__ if isinstance(plugin, ModuleType) else type(plugin).__module__
        self.infos[name] = PluginInfo(name, module, distribution, version, origin)

    def load_entry_points(self) -> None:
        """Register every third-party plugin of the ``kvcompare`` entry-point group; one that fails to import, or
        whose name a core or built-in plugin has, is recorded, not raised. An entry point into kvcompare's own
        packages (an install made when built-ins were entry points) is skipped: they load by import."""
        for ep in importlib.metadata.entry_points(group=hookspecs.PROJECT):
            if ep.module.split(".")[0] in {BUILTIN_PACKAGE, "kvcompare"}:
                continue
            if self.pm.has_plugin(ep.name):
                taken = self.infos.get(ep.name)
                if taken is not None and taken.origin:
                    self._fail(
                        f"{ep.name} ({ep.value})",
                        f"plugin name {ep.name!r} is taken by the {taken.origin} plugin: rename the entry point "
                        f"{ep.name} = {ep.value} in its package",
                    )
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
    """The process-wide plugin host: the core's, the built-in and the third-party plugins, loaded once."""
    host = PluginHost()
    host.load()
    return host


def get_tasks() -> TaskRegistry:
    """The process-wide task registry (every plugin's tasks)."""
    return get_host().tasks()


def get_registry() -> PolicyRegistry:
    """The process-wide policy registry (every plugin's policies)."""
    return get_host().registry()
