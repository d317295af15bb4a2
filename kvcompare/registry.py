"""Choosing a policy by name: the registry that plugin registrations fill."""

from __future__ import annotations

import dataclasses

from kvcompare.errors import did_you_mean
from kvcompare.failure import policy_line
from kvcompare.policy import KVPolicy, PolicyError, coerce_parameter, parameter_defaults


@dataclasses.dataclass(frozen=True)
class PolicyEntry:
    """A registered policy class and the plugin that registered it."""

    cls: type[KVPolicy]
    plugin: str


class PolicyRegistry:
    """Policies by name, each with the plugin that registered it."""

    def __init__(self) -> None:
        self._entries: dict[str, PolicyEntry] = {}

    def add(self, cls: type[KVPolicy], plugin: str) -> None:
        """Register ``cls`` for ``plugin``. Raises PolicyError if it is not a named KVPolicy dataclass, its name is
        registered already, or it cannot be built with its defaults."""
        if not (isinstance(cls, type) and issubclass(cls, KVPolicy) and dataclasses.is_dataclass(cls)):
            raise PolicyError(f"plugin {plugin!r} registered {cls!r}, which is not a KVPolicy dataclass")
        if not cls.name:
            raise PolicyError(f"plugin {plugin!r} registered {cls.__name__} without a name")
        if cls.name in self._entries:
            other = self._entries[cls.name].plugin
            raise PolicyError(f"policy {cls.name!r} is registered twice: by plugin {other!r} and by {plugin!r}")
        try:
            cls()
        except TypeError as err:
            who = f"policy {cls.name!r} (plugin {plugin!r})"
            raise PolicyError(f"{who} needs defaults for all parameters: {err}") from None
        self._entries[cls.name] = PolicyEntry(cls, plugin)

    def names(self) -> list[str]:
        """The registered policy names, sorted."""
        return sorted(self._entries)

    def entry(self, name: str) -> PolicyEntry:
        """The entry of policy ``name``. Raises PolicyError with a "did you mean" when there is none."""
        if name not in self._entries:
            raise PolicyError(
                f"unknown policy {name!r}.{did_you_mean(name, self.names())} "
                f"Known policies: {', '.join(self.names())} (see `kvcompare policies`)."
            )
        return self._entries[name]

    def build(self, spec: str) -> KVPolicy:
        """Build a policy from ``name[:key=value[:key=value...]]``, e.g. ``l2:mode=random:seed=1``.

        The policy comes bound to the plugin that registered it, so errors and results can name that plugin.
        """
        name, *assignments = spec.strip().split(":")
        cls = self.entry(name).cls
        known = list(parameter_defaults(cls))
        values = {}
        for assignment in assignments:
            key, sep, raw = assignment.partition("=")
            if not sep or not key:
                raise PolicyError(
                    f"{spec!r}: parameters are written key=value, e.g. {name}:{known[0] if known else 'key'}=..."
                )
            if key not in known:
                listed = ", ".join(known) or "none"
                raise PolicyError(f"{name} has no parameter {key!r}.{did_you_mean(key, known)} Parameters: {listed}")
            values[key] = coerce_parameter(cls, key, raw)
        plugin = self.entry(name).plugin
        try:
            policy = cls(**values)
            policy.validate()
        except PolicyError:
            raise
        except Exception as err:  # a bug in the plugin's constructor or validate(): name it and where
            where = policy_line(err, cls)
            raise PolicyError(
                f"policy {spec!r} (plugin {plugin!r}) could not be built: {type(err).__name__}: {err}"
                + (f" (at {where})" if where else "")
            ) from err
        return policy.bound_to(plugin)
