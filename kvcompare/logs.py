"""Where kvcompare's messages go: library modules log to ``logging.getLogger(__name__)`` (under the ``kvcompare``
logger) and never print; the CLI (or a Ray worker, or any program using kvcompare as a library) calls
:func:`configure` once to show them on stderr, written above any progress bar (``tqdm.write``) so a bar is never
broken. ``--quiet`` shows warnings and errors only, the default adds notices (``INFO``: a download, a resume),
``-v`` adds debugging detail (``DEBUG``: a plugin's import traceback).

Without :func:`configure`, Python's own last-resort handler still shows warnings and errors, unprefixed.
"""

from __future__ import annotations

import logging
import sys

from tqdm import tqdm

#: The logger every kvcompare module's logger descends from.
ROOT = "kvcompare"

#: ``kvcompare run --quiet`` / default / ``-v``: the level shown.
QUIET, NORMAL, VERBOSE = logging.WARNING, logging.INFO, logging.DEBUG


class KVCompareFormatter(logging.Formatter):
    """``kvcompare: <message>``, with ``warning:`` or ``error:`` after the prefix at those levels."""

    def format(self, record: logging.LogRecord) -> str:
        """The record's message with its prefix."""
        text = super().format(record)
        if record.levelno >= logging.ERROR:
            return f"kvcompare: error: {text}"
        if record.levelno >= logging.WARNING:
            return f"kvcompare: warning: {text}"
        return f"kvcompare: {text}"


class ProgressSafeHandler(logging.Handler):
    """Writes each message to stderr through ``tqdm.write``, which clears an active progress bar, writes the
    line and redraws the bar below it (with no bar it is a plain write)."""

    def emit(self, record: logging.LogRecord) -> None:
        """Write one message above the progress bar."""
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise into the measurement
            self.handleError(record)


def level_for(quiet: bool, verbose: int) -> int:
    """The level for the CLI's flags: ``--quiet`` wins over ``-v``."""
    if quiet:
        return QUIET
    return VERBOSE if verbose else NORMAL


def configure(level: int = NORMAL) -> None:
    """Show kvcompare's messages at ``level`` and above on stderr; calling it again replaces the handler (so a
    test or a long-lived program may call it for every command)."""
    logger = logging.getLogger(ROOT)
    for handler in [h for h in logger.handlers if isinstance(h, ProgressSafeHandler)]:
        logger.removeHandler(handler)
    handler = ProgressSafeHandler()
    handler.setFormatter(KVCompareFormatter())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # shown once, by this handler, not again by a root handler a program installed


def configured_level() -> int | None:
    """The level :func:`configure` set in this process, or None if it was never called (to pass it on to Ray
    workers, which are other processes)."""
    logger = logging.getLogger(ROOT)
    return logger.level if any(isinstance(h, ProgressSafeHandler) for h in logger.handlers) else None
