"""Choosing a policy or a task by name: the registries that plugin registrations fill.

Both kinds are dataclasses whose fields are their parameters, built from the same spec syntax
(``name[:key=value[:key=value...]]``) by one :class:`SpecRegistry`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Generic, TypeVar

from kvcompare.errors import KVCompareError, did_you_mean
from kvcompare.failure import policy_line
from kvcompare.parameters import Parameterised, coerce_parameter, parameter_defaults
from kvcompare.policy import KVPolicy, PolicyError
from kvcompare.task import Task, TaskError

T = TypeVar("T", bound=Parameterised)


@dataclasses.dataclass(frozen=True)
class RegistryEntry(Generic[T]):
    """A registered class and the plugin that registered it."""

    cls: type[T]
    plugin: str


class SpecRegistry(Generic[T]):
    """Classes by name, each with the plugin that registered it, built from specs."""

    #: What the registry holds (``policy`` or ``task``, and the plural), its base class, its error and its
    #: listing command.
    kind: ClassVar[str]
    kinds: ClassVar[str]
    base: ClassVar[type]
    error: ClassVar[type[KVCompareError]]
    listing: ClassVar[str]

    def __init__(self) -> None:
        self._entries: dict[str, RegistryEntry[T]] = {}

    def add(self, cls: type[T], plugin: str) -> None:
        """Register ``cls`` for ``plugin``. Raises the registry's error if it is not a named dataclass of the
        registry's base class, its name is registered already, or it cannot be built with its defaults."""
        kind = self.kind
        if not (isinstance(cls, type) and issubclass(cls, self.base) and dataclasses.is_dataclass(cls)):
            raise self.error(f"plugin {plugin!r} registered {cls!r}, which is not a {self.base.__name__} dataclass")
        name = getattr(cls, "name", "")
        if not name:
            raise self.error(f"plugin {plugin!r} registered {cls.__name__} without a name")
        if name in self._entries:
            other = self._entries[name].plugin
            raise self.error(f"{kind} {name!r} is registered twice: by plugin {other!r} and by {plugin!r}")
        try:
            cls()
        except TypeError as err:
            raise self.error(f"{kind} {name!r} (plugin {plugin!r}) needs defaults for all parameters: {err}") from None
        self._entries[name] = RegistryEntry(cls, plugin)

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def entry(self, name: str) -> RegistryEntry[T]:
        """The entry of ``name``. Raises the registry's error with a "did you mean" when there is none."""
        if name not in self._entries:
            raise self.error(
                f"unknown {self.kind} {name!r}.{did_you_mean(name, self.names())} "
                f"Known {self.kinds}: {', '.join(self.names())} (see `kvcompare {self.listing}`)."
            )
        return self._entries[name]

    def build(self, spec: str) -> T:
        """Build an instance from ``name[:key=value[:key=value...]]``, e.g. ``l2:mode=random:seed=1``, bound to
        the plugin that registered it so errors and results can name that plugin. Raises the registry's error
        for an unknown name or parameter, a bad value, or a constructor that fails."""
        name, *assignments = spec.strip().split(":")
        entry = self.entry(name)
        known = list(parameter_defaults(entry.cls))
        values = {}
        for assignment in assignments:
            key, sep, raw = assignment.partition("=")
            if not sep or not key:
                raise self.error(
                    f"{spec!r}: parameters are written key=value, e.g. {name}:{known[0] if known else 'key'}=..."
                )
            if key not in known:
                listed = ", ".join(known) or "none"
                raise self.error(f"{name} has no parameter {key!r}.{did_you_mean(key, known)} Parameters: {listed}")
            values[key] = coerce_parameter(entry.cls, key, raw, self.error)
        try:
            built = self.construct(entry.cls, values)
        except KVCompareError:
            raise
        except Exception as err:  # a bug in the plugin's constructor or validation: name it and where
            where = policy_line(err, entry.cls)
            raise self.error(
                f"{self.kind} {spec!r} (plugin {entry.plugin!r}) could not be built: {type(err).__name__}: {err}"
                + (f" (at {where})" if where else "")
            ) from err
        return built.bound_to(entry.plugin)

    def construct(self, cls: type[T], values: dict[str, Any]) -> T:
        """An instance of ``cls`` with ``values`` (and its validation run)."""
        return cls(**values)


class PolicyRegistry(SpecRegistry[KVPolicy]):
    """Policies by name, each with the plugin that registered it."""

    kind, kinds, base, error, listing = "policy", "policies", KVPolicy, PolicyError, "policies"

    def construct(self, cls: type[KVPolicy], values: dict[str, Any]) -> KVPolicy:
        """The policy, with :meth:`KVPolicy.validate` run."""
        policy = cls(**values)
        policy.validate()
        return policy


class TaskRegistry(SpecRegistry[Task]):
    """Tasks by name, each with the plugin that registered it."""

    kind, kinds, base, error, listing = "task", "tasks", Task, TaskError, "tasks"
