"""Readers for every input file: red-team prompts, plain prompt files, the constitution.

The real hh-rlhf ``red_team_attempts.jsonl.gz`` is one JSON array despite its name, so containers are detected
from the bytes (gzip magic, first non-space character), never from the file name. Every problem is reported as
an :class:`InputError` naming the file and line; with ``on_bad_record="skip"`` bad records are returned as
:class:`BadRecord` instead, to be listed in ``failures.jsonl``.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

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


def read_prompts(path: Path, on_bad_record: str = "error") -> tuple[list[PromptRecord], list[BadRecord]]:
    """All prompts of a file in order (duplicates kept; the pipeline counts and merges them)."""
    text = read_text(path, "prompts")
    source = str(path)
    prompts: list[PromptRecord] = []
    bad: list[BadRecord] = []

    def reject(line: int, reason: str) -> None:
        if on_bad_record != "skip":
            raise InputError(f"{path}:{line}: {reason}")
        bad.append(BadRecord(source, line, reason))

    kind = _format_of(path)
    if kind == ".txt":
        for number, raw in enumerate(lines_of(text), start=1):
            if raw.strip():
                prompts.append(PromptRecord(raw.strip(), source, number))
    elif kind == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        fields = [f.strip().lower() for f in reader.fieldnames or []]
        if "prompt" not in fields:
            raise InputError(f"{path}:1: CSV header has no 'prompt' column (columns: {reader.fieldnames})")
        column = (reader.fieldnames or [])[fields.index("prompt")]
        try:
            start = reader.line_num + 1
            for row in reader:
                value = (row.get(column) or "").strip()
                if value:
                    prompts.append(PromptRecord(value, source, start))
                else:
                    reject(start, "empty 'prompt' cell")
                start = reader.line_num + 1
        except csv.Error as exc:
            raise InputError(f"{path}:{reader.line_num}: invalid CSV: {exc}") from exc
    else:
        if not text.strip():
            raise InputError(f"{path}: file is empty, expected prompts")
        for line, obj in _records(text, path):
            try:
                if isinstance(obj, InvalidLine):
                    raise obj
                prompts.append(PromptRecord(_prompt_from_record(obj), source, line))
            except ValueError as exc:
                reject(line, str(exc))
    if not prompts:
        raise InputError(f"{path}: no prompts found" + (f" ({len(bad)} bad records skipped)" if bad else ""))
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
