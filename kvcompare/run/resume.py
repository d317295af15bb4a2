"""Resuming a run: what a resumed run may add to the one in its folder, and what it must leave as it was."""

from __future__ import annotations

import dataclasses
from typing import Any

from kvcompare.config import ConfigError, RunConfig
from kvcompare.protocol import PROTOCOL_VERSION

#: Fields that change how cells are run, never what they measure: a resumed run may change them.
EXECUTION_ONLY = ("quality_batch", "ray", "workers")
#: Fields only the cells of one task depend on: they bind a resume only where the run measured that task.
TASK_ONLY = {"depths": "passkey", "haystack": "passkey"}
#: Fields only the cells of one compression setting depend on: they bind a resume only where the run measured it.
SETTING_ONLY = {"query_aware": "prefill"}
#: Grid fields a resumed run may extend (new cells) but never shrink, with what each adds as the refusal lists it;
#: every other field must stay the same, since it changes what a finished cell means (except EXECUTION_ONLY).
GROWABLE_NAMES = {
    "policies": "policies",
    "cache_sizes": "cache limits",
    "ratios": "ratios",
    "positions": "position modes",
    "compression": "compression settings",
    "tasks": "tasks",
    "depths": "needle depths",
}
GROWABLE = tuple(GROWABLE_NAMES)
#: The two ways of setting the budget, which exclude each other: a run budgeted by one can never gain the other.
BUDGETS = {"cache_sizes": "--cache", "ratios": "--ratio"}


def check_protocol(previous: dict[str, Any]) -> None:
    """Refuse to resume a run whose cells were measured under another protocol version."""
    version = previous.get("protocol_version", 1)
    if version != PROTOCOL_VERSION:
        raise ConfigError(
            f"the run in --out was measured under protocol {version}, this kvcompare measures under protocol "
            f"{PROTOCOL_VERSION} (see kvcompare/protocol.py): its cells cannot be mixed with cells measured now; "
            "use another --out (its results stay readable with `kvcompare report`)"
        )


def resume_additions(previous: dict[str, Any], config: RunConfig) -> dict[str, Any]:
    """What ``config`` adds to the run recorded in ``previous`` (its run.json's ``config``), by field: the GROWABLE
    values it adds, and ``samples_by_length``. Raises ConfigError, listing every difference and what a resume may
    add to this run, for any change to what finished cells mean (a field that only unmeasured cells depend on, such
    as ``query_aware`` where no cell was measured in the prefill setting, may change)."""
    new = dataclasses.asdict(config)
    unknown = sorted(set(new) - set(previous))
    if unknown:
        raise ConfigError(
            f"the run in --out was made by an older kvcompare, whose protocol had no {', '.join(unknown)}: its "
            "cells cannot be mixed with cells measured now; use another --out (its results stay readable with "
            "`kvcompare report`)"
        )
    unused = {key for key, task in TASK_ONLY.items() if task not in previous.get("tasks", [])}
    unused |= {key for key, setting in SETTING_ONLY.items() if setting not in previous.get("compression", [])}
    changed = []
    for key, old in previous.items():
        if key in GROWABLE or key in EXECUTION_ONLY or key in ("lengths", "samples") or key not in new:
            continue
        if new[key] != old and key not in unused:
            changed.append(f"{key}: {old!r} then, {new[key]!r} now")
    for key in GROWABLE:
        if key in unused:  # no finished cell depends on it
            continue
        missing = [v for v in previous.get(key, []) if v not in new[key]]
        if missing:
            changed.append(f"{key}: {missing!r} would be dropped")
    old_samples = dict(zip(previous.get("lengths", []), previous.get("samples", []), strict=False))
    new_samples = dict(zip(config.lengths, config.samples, strict=True))
    for length, count in old_samples.items():
        if new_samples.get(length, 0) < count:
            changed.append(f"length {length}: {count} samples then, {new_samples.get(length, 0)} now")
    budget = next((key for key in BUDGETS if previous.get(key)), None)  # how the run set its budget
    other = next((key for key in BUDGETS if key != budget), None) if budget else None
    if budget and other and new[other]:
        changed.append(
            f"a run budgeted by {BUDGETS[budget]} cannot gain {BUDGETS[other]} budgets (they exclude each other)"
        )
    if changed:
        addable = [name for key, name in GROWABLE_NAMES.items() if key != other]
        raise ConfigError(
            f"--resume would mix cells measured under different settings; it may only add {', '.join(addable)}, "
            "lengths or samples. Differences: "
            + "; ".join(changed)
            + ". Rerun with the original settings, or use another --out"
        )
    added: dict[str, Any] = {}
    for key in GROWABLE:
        extra = [v for v in new[key] if v not in previous.get(key, [])]
        if extra:
            added[key] = extra
    more = {n: c for n, c in new_samples.items() if c > old_samples.get(n, 0)}
    if more:
        added["samples_by_length"] = more
    return added
