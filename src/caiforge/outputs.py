"""Files on disk, written atomically (a temporary file in the folder, then a rename), so a crash never leaves
half a file. A dataset file is written as it is made (:func:`write_streams`), never held whole in memory."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any, TypeVar

from .writers import CANDIDATES_FILE, FAILURES_FILE, PREFERENCES_FILE, Chunk, Encoder, Lines

MANIFEST_FILE = "manifest.json"
BUFFER = 1 << 20  # bytes a file's chunks gather before a write() (a chunk is one record's text)
__all__ = [
    "CANDIDATES_FILE",
    "FAILURES_FILE",
    "MANIFEST_FILE",
    "PREFERENCES_FILE",
    "write_atomic",
    "write_files",
    "write_json",
    "write_stream",
    "write_streams",
]
T = TypeVar("T")


def write_atomic(path: Path, text: str | bytes) -> None:
    write_stream(path, [text])


def write_json(path: Path, data: Any, indent: int | None = 4) -> None:
    write_atomic(path, json.dumps(data, indent=indent) + "\n")


def write_files(directory: Path, files: dict[str, str | bytes]) -> None:
    """``files`` by path relative to ``directory`` (format folders are made as needed)."""
    for name, data in files.items():
        write_atomic(directory / name, data)


def write_stream(path: Path, chunks: Iterable[Chunk]) -> None:
    """One file from its chunks, as they come."""
    write_streams(path.parent, {path.name: Lines()}, chunks)


def write_streams(directory: Path, encoders: Mapping[str, Encoder[T]], items: Iterable[T]) -> list[str]:
    """Several files fed by one pass over ``items`` (each item to every encoder, its chunk written at once),
    each file atomic: temporary files in their folders, renamed only when every file is complete and synced.
    ``items`` is consumed even when there is no encoder (a pass may only count). Returns the names written."""
    opened: dict[str, tuple[Path, IO[bytes]]] = {}
    try:
        for name in encoders:
            path = directory / name
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            opened[name] = (Path(temporary), os.fdopen(fd, "wb", buffering=BUFFER))
        pairs = [(encoder, opened[name][1]) for name, encoder in encoders.items()]
        for item in items:
            for encoder, handle in pairs:
                _put(handle, encoder.add(item))
        for encoder, handle in pairs:
            _put(handle, encoder.end())
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        for name, (tmp, _) in opened.items():
            os.replace(tmp, directory / name)
    except BaseException:
        for tmp, handle in opened.values():
            handle.close()
            tmp.unlink(missing_ok=True)
        raise
    return list(encoders)


def _put(handle: IO[bytes], chunk: Chunk) -> None:
    if chunk:
        handle.write(chunk.encode("utf-8") if isinstance(chunk, str) else chunk)
