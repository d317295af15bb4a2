"""What a failed cell records and shows: its error, the frames of the policy's own code, and the whole traceback.

A policy's bug is the plugin author's to fix, so the line printed for a failed cell is followed by the frames
of the policy's source file (file, line, code), or, when the error was raised elsewhere (inside torch, say),
by the innermost frames. The whole traceback is stored with the cell (the ``traceback`` column).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import traceback
from pathlib import Path

from kvcompare.policy import KVPolicy

log = logging.getLogger(__name__)

#: Frames shown when none is in the policy's own file: the innermost ones, where the error was raised.
INNERMOST_FRAMES = 3


@dataclasses.dataclass(frozen=True)
class Failure:
    """One cell's failure."""

    error: str  # "RuntimeError: bug in the policy": the result row's ``error``
    traceback: str  # the whole traceback, as Python prints it: the row's ``traceback``
    frames: str  # the frames worth showing on the terminal (see the module docstring)


def policy_file(cls: type[KVPolicy]) -> Path | None:
    """The source file of a policy class, where its author's frames are (None if it has none)."""
    try:
        found = inspect.getsourcefile(cls)
    except TypeError:  # a class defined in the interpreter
        return None
    return Path(found).resolve() if found else None


def failure_of(err: BaseException, cls: type[KVPolicy]) -> Failure:
    """The failure ``err`` (raised while a policy of class ``cls`` ran, handled or not) records and shows."""
    stack, mine = _frames(err, cls)
    if mine:  # from the policy's first frame on: its code and whatever it called
        shown = stack[stack.index(mine[0]) :]
    else:
        shown = stack[-INNERMOST_FRAMES:]
    return Failure(
        f"{type(err).__name__}: {err}",
        "".join(traceback.format_exception(type(err), err, err.__traceback__)),
        "".join(traceback.format_list(shown)),
    )


def policy_line(err: BaseException, cls: type) -> str:
    """Where in the policy's own file ``err`` was raised, as ``file:line``, or '' when not in it."""
    _, mine = _frames(err, cls)
    return f"{mine[-1].filename}:{mine[-1].lineno}" if mine else ""


def _frames(err: BaseException, cls: type) -> tuple[traceback.StackSummary, list[traceback.FrameSummary]]:
    """The frames of ``err``'s traceback, and those of them in the policy's own file."""
    stack = traceback.extract_tb(err.__traceback__)
    own = policy_file(cls)
    return stack, [frame for frame in stack if own is not None and Path(frame.filename).resolve() == own]


def report_failure(who: str, failure: Failure) -> None:
    """Print a failed cell's line and the frames worth showing to stderr."""
    frames = f"\n{failure.frames.rstrip()}" if failure.frames else ""
    log.error(f"cell failed: {who}: {failure.error}{frames}")
