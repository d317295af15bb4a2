"""The key-value metadata at the head of a GGUF file, read without touching its tensors (milliseconds).

Layout (GGUF v2/v3, little-endian): ``GGUF``, a uint32 version, a uint64 tensor count, a uint64 count of
key-value pairs; then each pair: a string key (uint64 length, UTF-8 bytes), a uint32 value type and the value.
Strings are a uint64 length and bytes; arrays a uint32 item type, a uint64 count and the items. Source: the
GGUF specification, ggml/docs/gguf.md.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

#: Value types with a fixed size: struct format by type id.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class GGUFMetadataError(ValueError):
    """The file's metadata is not GGUF as specified (truncated, or an unknown value type)."""


def _read(stream: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = stream.read(size)
    if len(data) < size:
        raise GGUFMetadataError("the file ends inside its metadata")
    return struct.unpack("<" + fmt, data)[0]


def _string(stream: BinaryIO) -> str:
    length = _read(stream, "Q")
    data = stream.read(length)
    if len(data) < length:
        raise GGUFMetadataError("the file ends inside its metadata")
    return data.decode("utf-8", errors="replace")


def _value(stream: BinaryIO, kind: int, keep: bool) -> Any:
    """One value of type ``kind``; with ``keep`` false an array is skipped (None), its items not built."""
    if kind in _SCALARS:
        return _read(stream, _SCALARS[kind])
    if kind == _STRING:
        return _string(stream)
    if kind == _ARRAY:
        item, count = _read(stream, "I"), _read(stream, "Q")
        if not keep and item in _SCALARS:
            stream.seek(count * struct.calcsize(_SCALARS[item]), 1)
            return None
        items = [_value(stream, item, keep) for _ in range(count)]
        return items if keep else None
    raise GGUFMetadataError(f"unknown metadata value type {kind}")


def read_metadata(path: Path, arrays: bool = False) -> dict[str, Any]:
    """The metadata of the GGUF file at ``path``, by key; arrays (the tokenizer's vocabulary...) are read only
    with ``arrays``, else skipped and given as None.

    Raises GGUFMetadataError for a file that is not GGUF or ends inside its metadata, OSError if unreadable.
    """
    found: dict[str, Any] = {}
    with path.open("rb") as stream:
        if stream.read(4) != b"GGUF":
            raise GGUFMetadataError("it does not start with GGUF")
        _read(stream, "I")  # version
        _read(stream, "Q")  # tensors
        for _ in range(_read(stream, "Q")):
            key = _string(stream)
            found[key] = _value(stream, _read(stream, "I"), arrays)
    return found


def gguf_layer_count(path: Path) -> int | None:
    """``{architecture}.block_count`` of a GGUF model: its number of transformer layers (None if not given)."""
    metadata = read_metadata(path)
    count = metadata.get(f"{metadata.get('general.architecture')}.block_count")
    return int(count) if count is not None else None
