"""Files on disk, written atomically (a temporary file, then a rename), so a crash never leaves half a file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .writers import CANDIDATES_FILE, FAILURES_FILE, PREFERENCES_FILE

MANIFEST_FILE = "manifest.json"
__all__ = ["CANDIDATES_FILE", "FAILURES_FILE", "MANIFEST_FILE", "PREFERENCES_FILE", "write_atomic", "write_json"]


def write_atomic(path: Path, text: str | bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(text.encode("utf-8") if isinstance(text, str) else text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any, indent: int | None = 4) -> None:
    write_atomic(path, json.dumps(data, indent=indent) + "\n")


def write_files(directory: Path, files: dict[str, str | bytes]) -> None:
    """``files`` by path relative to ``directory`` (format folders are made as needed)."""
    for name, data in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)
