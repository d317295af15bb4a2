"""The one base of the errors a user can cause, so the command line turns each into a message and exit code 2."""

from __future__ import annotations

import difflib


class KVCompareError(Exception):
    """An input or setting kvcompare cannot work with; the message says what to do instead."""


def did_you_mean(name: str, known: list[str], cutoff: float = 0.5) -> str:
    """' Did you mean 'x'?' for the closest known name, or '' when nothing is close."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=cutoff)
    return f" Did you mean {close[0]!r}?" if close else ""
