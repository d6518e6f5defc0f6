"""Readers for every input file: red-team prompts, plain prompt files, the constitution.

The real hh-rlhf ``red_team_attempts.jsonl.gz`` is one JSON array despite its name, so containers are detected
from the bytes (gzip magic, first non-space character), never from the file name. Every problem is reported as
an :class:`InputError` naming the file and line; with ``on_bad_record="skip"`` bad records are returned as
:class:`BadRecord` instead, to be listed in ``failures.jsonl``.
"""

from __future__ import annotations

import csv
import gzip
import itertools
import json
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from .errors import InputError

GZIP_MAGIC = b"\x1f\x8b"
PROMPT_FIELDS = ("prompt", "text")


@dataclass(frozen=True)
class PromptRecord:
    text: str
    source: str
    line: int


@dataclass(frozen=True)
class BadRecord:
    source: str
    line: int
    reason: str


def read_bytes(path: Path, what: str) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise InputError(f"{path}: {what} file not found") from exc
    except IsADirectoryError as exc:
        raise InputError(f"{path}: {what} path is a directory, expected a file") from exc
    except OSError as exc:
        raise InputError(f"{path}: cannot read {what} file: {exc.strerror or exc}") from exc
    if raw.startswith(GZIP_MAGIC):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise InputError(f"{path}: corrupt gzip data: {exc}") from exc
    return raw


def read_text(path: Path, what: str) -> str:
    raw = read_bytes(path, what)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from exc
    return text.removeprefix("\ufeff")


def first_human_turn(transcript: str) -> str | None:
    """The seed's prompt: the text between the first ``Human:`` and the next ``Assistant:``."""
    start = transcript.find("Human:")
    if start < 0:
        return None
    start += len("Human:")
    end = transcript.find("Assistant:", start)
    prompt = transcript[start:end] if end >= 0 else transcript[start:]
    return prompt.strip() or None


def _prompt_from_record(obj: Any) -> str:
    """The prompt of one JSON record, or a ValueError saying what is wrong with it."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "transcript" in obj:
        transcript = obj["transcript"]
        if not isinstance(transcript, str):
            raise ValueError(f"'transcript' must be a string, got {type(transcript).__name__}")
        prompt = first_human_turn(transcript)
        if prompt is None:
            raise ValueError("transcript has no (non-empty) 'Human:' turn")
        return prompt
    for field in PROMPT_FIELDS:
        if field in obj:
            value = obj[field]
            if not isinstance(value, str):
                raise ValueError(f"'{field}' must be a string, got {type(value).__name__}")
            if not value.strip():
                raise ValueError(f"'{field}' is empty")
            return value.strip()
    raise ValueError("record has no 'transcript', 'prompt' or 'text' field")


def _json_array(text: str, path: Path) -> Iterator[tuple[int, Any]]:
    """Elements of a top-level JSON array with the line each starts on, without loading it twice."""
    decoder = json.JSONDecoder()
    n = len(text)

    def skip(pos: int) -> int:
        while pos < n and text[pos] in " \t\r\n":
            pos += 1
        return pos

    def line_at(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    pos = skip(text.index("[") + 1)
    line, counted = 1, 0
    if pos < n and text[pos] == "]":
        return
    while True:
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from exc
        except (ValueError, RecursionError) as exc:  # 5000-digit numbers, pathological nesting
            raise InputError(f"{path}:{line_at(pos)}: invalid JSON: {str(exc)[:100]}") from exc
        line += text.count("\n", counted, pos)
        counted = pos
        yield line, obj
        pos = skip(end)
        if pos < n and text[pos] == ",":
            pos = skip(pos + 1)
            continue
        if pos < n and text[pos] == "]":
            if skip(pos + 1) != n:
                raise InputError(f"{path}:{line_at(skip(pos + 1))}: unexpected data after the JSON array")
            return
        raise InputError(f"{path}:{line_at(pos)}: invalid JSON: expected ',' or ']' in the array")


def lines_of(text: str) -> list[str]:
    """Lines split on "\n" only: U+2028 and friends may stand unescaped inside a JSON string."""
    return [line.rstrip("\r") for line in text.split("\n")]


class InvalidLine(ValueError):
    """A JSON Lines line that does not parse; skippable, unlike a broken JSON array."""


def _json_lines(text: str, path: Path) -> Iterator[tuple[int, Any]]:
    for number, line in enumerate(lines_of(text), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except (ValueError, RecursionError) as exc:
            msg = f"{exc.msg} (column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else str(exc)[:100]
            yield number, InvalidLine(f"invalid JSON: {msg}")


def _records(text: str, path: Path) -> Iterator[tuple[int, Any]]:
    stripped = text.lstrip()
    if stripped.startswith("["):
        return _json_array(text, path)
    return _json_lines(text, path)


def _format_of(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    return suffixes[-1] if suffixes else ""


class _Lines:
    """A file's lines, streamed (gunzipped when it starts with the gzip magic), split on "\n" only and decoded
    one at a time, so a file of any size is read in constant memory and a problem still names its line."""

    def __init__(self, path: Path, what: str) -> None:
        self.path, self.what = path, what
        self.number = 0  # the line last read
        self._offset = 0  # bytes before that line, for "not UTF-8 at offset N"

    def __iter__(self) -> Iterator[str]:
        path = self.path
        try:
            handle = path.open("rb")
        except FileNotFoundError as exc:
            raise InputError(f"{path}: {self.what} file not found") from exc
        except IsADirectoryError as exc:
            raise InputError(f"{path}: {self.what} path is a directory, expected a file") from exc
        except OSError as exc:
            raise InputError(f"{path}: cannot read {self.what} file: {exc.strerror or exc}") from exc
        with handle:
            stream: IO[bytes] | gzip.GzipFile = handle
            if handle.read(2) == GZIP_MAGIC:
                handle.seek(0)
                stream = gzip.GzipFile(fileobj=handle)
            else:
                handle.seek(0)
            try:
                for raw in stream:
                    self.number += 1
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        at = self._offset + exc.start
                        raise InputError(
                            f"{path}:{self.number}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {at})"
                        ) from exc
                    self._offset += len(raw)
                    if self.number == 1:
                        line = line.removeprefix("\ufeff")
                    yield line.removesuffix("\n").removesuffix("\r")
            except (OSError, EOFError, zlib.error) as exc:
                raise InputError(f"{path}: corrupt gzip data: {exc}") from exc


def _array_stream(lines: Iterator[str], first: str, path: Path) -> Iterator[tuple[int, Any]]:
    """Elements of a top-level JSON array with the line each starts on, decoded from a sliding buffer: the
    array may be larger than memory (hh-rlhf's red_team_attempts is one array)."""
    decoder = json.JSONDecoder()
    buf, base, pos, done = first + "\n", 1, 0, False  # base: the file line of buf's first line
    chunk = 1 << 16

    def fill() -> bool:
        nonlocal buf, done
        if done:
            return False
        parts, size = [], 0
        for line in lines:
            parts.append(line + "\n")
            size += len(line) + 1
            if size >= chunk:
                break
        else:
            done = True
        buf += "".join(parts)
        return bool(parts)

    def skip() -> None:
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf) or not fill():
                return

    def line_at(at: int) -> int:
        return base + buf.count("\n", 0, at)

    fill()
    pos = buf.index("[") + 1
    skip()
    if pos < len(buf) and buf[pos] == "]":
        pos += 1
        skip()
        if pos < len(buf):
            raise InputError(f"{path}:{line_at(pos)}: unexpected data after the JSON array")
        return
    while True:
        if pos > chunk:  # drop what is decoded, keeping line numbers
            base += buf.count("\n", 0, pos)
            buf, pos = buf[pos:], 0
        while True:
            try:
                obj, end = decoder.raw_decode(buf, pos)
                break
            except json.JSONDecodeError as exc:
                if exc.pos >= len(buf) - 1 and fill():
                    continue  # the element goes on past what is read so far
                raise InputError(f"{path}:{line_at(exc.pos)}: invalid JSON: {exc.msg} (column {exc.colno})") from exc
            except (ValueError, RecursionError) as exc:  # 5000-digit numbers, pathological nesting
                raise InputError(f"{path}:{line_at(pos)}: invalid JSON: {str(exc)[:100]}") from exc
        yield line_at(pos), obj
        pos = end
        skip()
        if pos < len(buf) and buf[pos] == ",":
            pos += 1
            skip()
            continue
        if pos < len(buf) and buf[pos] == "]":
            pos += 1
            skip()
            if pos < len(buf):
                raise InputError(f"{path}:{line_at(pos)}: unexpected data after the JSON array")
            return
        raise InputError(f"{path}:{line_at(pos)}: invalid JSON: expected ',' or ']' in the array")


def _line_records(lines: Iterator[str], first: tuple[int, str], number: Callable[[], int]) -> Iterator[tuple[int, Any]]:
    for n, line in itertools.chain([first], ((number(), line) for line in lines)):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except (ValueError, RecursionError) as exc:
            msg = f"{exc.msg} (column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else str(exc)[:100]
            yield n, InvalidLine(f"invalid JSON: {msg}")


def iter_prompts(path: Path, on_bad_record: str = "error") -> Iterator[PromptRecord | BadRecord]:
    """Every prompt of a file in order (duplicates kept), streamed: the file is never held in memory. A bad
    record raises InputError naming its line, or with ``on_bad_record="skip"`` comes out as a BadRecord."""
    source = str(path)
    found = skipped = 0

    def reject(line: int, reason: str) -> BadRecord:
        nonlocal skipped
        if on_bad_record != "skip":
            raise InputError(f"{path}:{line}: {reason}")
        skipped += 1
        return BadRecord(source, line, reason)

    reader = _Lines(path, "prompts")
    lines = iter(reader)
    kind = _format_of(path)
    if kind == ".txt":
        for raw in lines:
            if raw.strip():
                found += 1
                yield PromptRecord(raw.strip(), source, reader.number)
    elif kind == ".csv":
        rows = csv.reader(line + "\n" for line in lines)
        try:
            header = next(rows, None) or []
            fields = [f.strip().lower() for f in header]
            if "prompt" not in fields:
                raise InputError(f"{path}:1: CSV header has no 'prompt' column (columns: {header or None})")
            column = fields.index("prompt")
            start = reader.number + 1
            for row in rows:
                value = (row[column] if column < len(row) else "").strip()
                if value:
                    found += 1
                    yield PromptRecord(value, source, start)
                elif row:  # a blank line is no row
                    yield reject(start, "empty 'prompt' cell")
                start = reader.number + 1
        except csv.Error as exc:
            raise InputError(f"{path}:{reader.number}: invalid CSV: {exc}") from exc
    else:
        first = next((line for line in lines if line.strip()), None)
        if first is None:
            raise InputError(f"{path}: file is empty, expected prompts")
        records = (
            _array_stream(lines, first, path)
            if first.lstrip().startswith("[")
            else _line_records(lines, (reader.number, first), lambda: reader.number)
        )
        for line, obj in records:
            try:
                if isinstance(obj, InvalidLine):
                    raise obj
                prompt = _prompt_from_record(obj)
            except ValueError as exc:
                yield reject(line, str(exc))
                continue
            found += 1
            yield PromptRecord(prompt, source, line)
    if not found:
        raise InputError(f"{path}: no prompts found" + (f" ({skipped} bad records skipped)" if skipped else ""))


def json_array(path: Path, what: str) -> Iterator[tuple[int, Any]]:
    """(line, element) of a file holding one JSON array, streamed: for outputs larger than memory."""
    reader = _Lines(path, what)
    lines = iter(reader)
    first = next((line for line in lines if line.strip()), None)
    if first is None:
        raise InputError(f"{path}: file is empty, expected a JSON array")
    if not first.lstrip().startswith("["):
        raise InputError(f"{path}:{reader.number}: expected a JSON array")
    yield from _array_stream(lines, first, path)


def read_prompts(path: Path, on_bad_record: str = "error") -> tuple[list[PromptRecord], list[BadRecord]]:
    """All prompts of a file in order (duplicates kept), and the bad records skipped; for small files."""
    prompts: list[PromptRecord] = []
    bad: list[BadRecord] = []
    for record in iter_prompts(path, on_bad_record):
        if isinstance(record, PromptRecord):
            prompts.append(record)
        else:
            bad.append(record)
    return prompts, bad


def read_constitution(path: Path) -> str:
    text = read_text(path, "constitution")
    if not text.strip():
        raise InputError(f"{path}: constitution file is empty")
    return text


def json_lines(path: Path, what: str) -> Iterator[tuple[int, Any]]:
    """(line number, value) of every non-blank line of a JSON Lines file; a bad line is an InputError."""
    for number, line in enumerate(lines_of(read_text(path, what)), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise InputError(f"{path}:{number}: invalid JSON: {str(exc)[:100]}") from exc


def check_blend_files(splits: Mapping[str, Mapping[Literal["prompts", "comparisons"], Sequence[Path]]]) -> None:
    """The seed's ``--blend-with`` files, every one checked before anything is written."""
    for spec in splits.values():
        for path in spec["prompts"]:
            check_jsonl(path, "blend prompts")
        for path in spec["comparisons"]:
            check_jsonl(path, "blend comparisons", even_lines=True)


def check_jsonl(path: Path, what: str, even_lines: bool = False) -> int:
    """Validate an external NeMo JSONL file before any request is sent; returns its number of lines."""
    text = read_text(path, what)
    lines = [line for line in lines_of(text) if line.strip()]
    for number, line in enumerate(lines_of(text), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as exc:
            msg = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)[:100]
            raise InputError(f"{path}:{number}: invalid JSON in {what} file: {msg}") from exc
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise InputError(f"{path}:{number}: {what} line must be an object with a string 'text' field")
    if not lines:
        raise InputError(f"{path}: {what} file is empty")
    if even_lines and len(lines) % 2:
        raise InputError(f"{path}: comparisons file has {len(lines)} lines; it must alternate chosen/rejected")
    return len(lines)
