"""One run per results folder: the lock file ``run.lock`` in it names the run that writes there.

The lock holds its owner's PID, host and start time (JSON). A second run, or a resume, of a folder whose lock
names a live process is refused at once; a lock whose process is gone (a crashed or killed run, same host) is
taken over with a notice, so a crash never blocks a folder for ever. A lock is written whole or not at all (a
complete temporary file, hard-linked into place, which fails if a lock is there), so a reader never sees half.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import uuid
from pathlib import Path
from typing import Any

from kvcompare.errors import KVCompareError

log = logging.getLogger(__name__)

LOCK = "run.lock"


class FolderInUseError(KVCompareError, ValueError):
    """A results folder that another live run holds."""


def is_lock_file(name: str) -> bool:
    """Whether ``name`` (in a results folder) is the lock or a lock being written."""
    return name == LOCK or (name.startswith(f".{LOCK}.") and name.endswith(".tmp"))


def holder(folder: Path) -> dict[str, Any] | None:
    """The record of the live run that holds ``folder``, or None when none does (no lock, or its owner is gone).
    Reads only. Raises FolderInUseError for a lock of another host, whose process cannot be looked up."""
    record = _read(folder / LOCK)
    if record is None or not _alive(folder, record):
        return None
    return record


def take(folder: Path) -> str:
    """Hold ``folder`` (which must exist) for this process; return the lock's token, for :func:`release`.

    Raises FolderInUseError, saying who holds it and what to do, when a live run holds it; a lock whose process
    is gone (or that cannot be read) is taken over with a warning."""
    token = uuid.uuid4().hex
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "token": token,
    }
    lock, tmp = folder / LOCK, folder / f".{LOCK}.{token}.tmp"
    tmp.write_text(json.dumps(record))
    try:
        while True:
            try:
                os.link(tmp, lock)  # atomic: fails if a lock is there
                return token
            except FileExistsError:
                pass
            old = _read(lock)
            if old is not None and _alive(folder, old):
                raise _in_use(folder, old)
            _set_aside(lock, old)
    finally:
        tmp.unlink(missing_ok=True)


def release(folder: Path, token: str) -> None:
    """Remove ``folder``'s lock if it is still the one :func:`take` returned ``token`` for."""
    record = _read(folder / LOCK)
    if record is not None and record.get("token") == token:
        (folder / LOCK).unlink(missing_ok=True)


def _read(lock: Path) -> dict[str, Any] | None:
    """The lock's record; None without a lock; ``{}`` for one that is no record (not JSON, no PID)."""
    try:
        record = json.loads(lock.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) and isinstance(record.get("pid"), int) else {}


def _alive(folder: Path, record: dict[str, Any]) -> bool:
    """Whether the run that wrote ``record`` still runs. Raises FolderInUseError when it ran on another host."""
    if not record:
        return False  # no record: no run could have written it (locks are written whole)
    if record.get("host") != socket.gethostname():
        raise _in_use(folder, record, "if that run is no longer running, remove")
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _set_aside(lock: Path, old: dict[str, Any] | None) -> None:
    """Remove a stale lock, saying whose it was (once, by whichever run renames it first)."""
    aside = lock.with_name(f".{LOCK}.{uuid.uuid4().hex}.tmp")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return  # another run took it first: try again
    aside.unlink(missing_ok=True)
    owner = f"PID {old['pid']} on {old.get('host')}, started {old.get('started_at')}" if old else "an unreadable lock"
    log.warning(f"{lock.parent} was held by a run that is gone ({owner}): it crashed or was killed; taking it over")


#: What to do when the holder may in fact be gone, by where it ran.
STALE_HINT = "if no run is using it (its PID was reused), remove"


def _in_use(folder: Path, record: dict[str, Any], what: str = STALE_HINT) -> FolderInUseError:
    return FolderInUseError(
        f"--out {folder} is in use by another kvcompare run (PID {record['pid']} on {record.get('host')}, started "
        f"{record.get('started_at')}): wait for it to finish, or choose another --out; {what} {folder / LOCK}"
    )
