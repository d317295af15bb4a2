"""Parameters of a plugin class (a policy or a task): dataclass fields with defaults, typed, with one-line help,
set from the command line as ``name:key=value:key=value`` (a tuple's items separated by ``/``)."""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, ClassVar, Self

from kvcompare.errors import KVCompareError

#: Separates a tuple parameter's items on the command line (``passkey:depths=0.1/0.5``).
ITEM_SEPARATOR = "/"


def parameter(default: Any, help: str) -> Any:
    """A parameter with its one-line help, which `kvcompare policies` and `kvcompare tasks` show.

    Use as ``start_size: int = parameter(4, "attention-sink tokens always kept")``.
    """
    return dataclasses.field(default=default, metadata={"help": help})


def parameter_types(cls: type) -> dict[str, Any]:
    """The declared type of each parameter (dataclass field) of ``cls``."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def parameter_defaults(cls: type) -> dict[str, Any]:
    """Each parameter's default, read from the dataclass fields (no instance is built)."""
    return {
        f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        for f in dataclasses.fields(cls)
    }


def parameter_help(cls: type) -> dict[str, str]:
    """Each parameter's one-line help, where the class gave one with :func:`parameter`."""
    return {f.name: str(f.metadata.get("help", "")) for f in dataclasses.fields(cls)}


def shown_type(kind: Any) -> str:
    """A parameter type as listings show it: ``a|b`` for a Literal, ``float/...`` for a tuple, else its name."""
    if typing.get_origin(kind) is typing.Literal:
        return "|".join(map(str, typing.get_args(kind)))
    if typing.get_origin(kind) is tuple:
        return f"{shown_type(typing.get_args(kind)[0])}{ITEM_SEPARATOR}..."
    return str(getattr(kind, "__name__", kind))


def shown_value(value: Any) -> str:
    """A parameter value as the command line writes it (a tuple's items joined by ``/``)."""
    if isinstance(value, tuple | list):
        return ITEM_SEPARATOR.join(map(str, value))
    return str(value)


def coerce_parameter(cls: type, key: str, raw: str, error: type[KVCompareError]) -> Any:
    """Turn a command-line string into parameter ``key``'s declared type, or raise ``error`` saying what is
    allowed (``cls.name`` names the plugin class in the message)."""
    return _coerce(getattr(cls, "name", cls.__name__), key, parameter_types(cls)[key], raw, error)


def _coerce(owner: str, key: str, kind: Any, raw: str, error: type[KVCompareError]) -> Any:
    if typing.get_origin(kind) is typing.Literal:
        choices = typing.get_args(kind)
        if raw not in choices:
            raise error(f"{owner}: {key}={raw!r} is not one of {', '.join(map(str, choices))}")
        return raw
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        return tuple(_coerce(owner, key, item, part, error) for part in raw.split(ITEM_SEPARATOR))
    try:
        if kind is bool:
            if raw.lower() not in {"true", "false", "1", "0", "yes", "no"}:
                raise ValueError(raw)
            return raw.lower() in {"true", "1", "yes"}
        return kind(raw)
    except (TypeError, ValueError):
        raise error(f"{owner}: {key}={raw!r} is not a valid {shown_type(kind)}") from None


class Parameterised:
    """What a policy and a task share as plugin classes: a registered ``name``, parameters as dataclass fields,
    a label in the command-line syntax, and the plugin that registered the class (set by the registry)."""

    name: ClassVar[str] = ""
    #: How errors name an instance ("policy", "task").
    kind: ClassVar[str] = "plugin class"

    @property
    def plugin(self) -> str:
        """The plugin that registered this class ('' for an instance built by hand rather than by a registry)."""
        return str(self.__dict__.get("_plugin", ""))

    def bound_to(self, plugin: str) -> Self:
        """Record the plugin that registered this class, so errors and results can name it."""
        self.__dict__["_plugin"] = plugin
        return self

    def who(self) -> str:
        """How errors name this instance: its kind, label and plugin."""
        return f"{self.kind} {self.label()!r} (plugin {self.plugin!r})"

    def params(self) -> dict[str, Any]:
        """Every parameter with its value, defaults included."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def params_json(self) -> str:
        """The parameters as canonical JSON (sorted keys), as stored in rows."""
        return json.dumps(self.params(), sort_keys=True)

    def label(self) -> str:
        """The name with its non-default parameters, in the command-line syntax (``l2:mode=random``,
        ``passkey:depths=0.2/0.8``)."""
        defaults = parameter_defaults(type(self))
        changed = [f"{k}={shown_value(v)}" for k, v in self.params().items() if defaults[k] != v]
        return ":".join([self.name, *changed])
