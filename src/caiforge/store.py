"""The durable record of a run: every finished request, committed as it completes (SQLite, WAL).

This is the single source of a run's results: outputs are rebuilt from it, a rerun reads it to skip finished
requests, and future exporters read it. Writes happen on the event-loop thread; with WAL and
``synchronous=NORMAL`` a commit costs tens of microseconds and survives a killed process.
Schema changes are numbered migrations recorded in ``_migrations`` (the way simonw/llm does it).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .errors import InputError

DB_NAME = "caiforge.db"


def _m001_initial(db: sqlite3.Connection) -> None:
    db.executescript(
        """
        CREATE TABLE generations (
            key TEXT PRIMARY KEY, prompt TEXT NOT NULL, temperature REAL NOT NULL, response TEXT NOT NULL,
            prompt_tokens INTEGER, completion_tokens INTEGER, created REAL NOT NULL);
        CREATE TABLE judgments (
            key TEXT PRIMARY KEY, prompt TEXT NOT NULL, chosen INTEGER NOT NULL, rejected INTEGER NOT NULL,
            explanation TEXT NOT NULL, reply TEXT NOT NULL, attempts INTEGER NOT NULL,
            prompt_tokens INTEGER, completion_tokens INTEGER, created REAL NOT NULL);
        CREATE TABLE attempts (
            id INTEGER PRIMARY KEY AUTOINCREMENT, started REAL NOT NULL, finished REAL,
            status TEXT NOT NULL, config TEXT NOT NULL, stats TEXT);
        CREATE TABLE failures (
            id INTEGER PRIMARY KEY AUTOINCREMENT, attempt INTEGER NOT NULL, prompt TEXT,
            stage TEXT NOT NULL, reason TEXT NOT NULL, detail TEXT, source TEXT, line INTEGER,
            created REAL NOT NULL);
        CREATE INDEX failures_attempt ON failures(attempt);
        """
    )


def _m002_judge_calls_and_verdicts(db: sqlite3.Connection) -> None:
    """Judge replies are cached raw (re-parsed on resume); verdicts combine passes and modes."""
    db.executescript(
        """
        DROP TABLE judgments;
        CREATE TABLE judge_calls (
            key TEXT PRIMARY KEY, reply TEXT NOT NULL, top_logprobs TEXT,
            prompt_tokens INTEGER, completion_tokens INTEGER, created REAL NOT NULL);
        CREATE TABLE verdicts (key TEXT PRIMARY KEY, prompt TEXT NOT NULL, data TEXT NOT NULL, created REAL NOT NULL);
        """
    )


def _lock(path: Path) -> IO[bytes] | None:
    """An exclusive advisory lock (POSIX flock; released by the OS even after kill -9)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        return None
    handle = path.open("ab")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        handle.close()
        raise InputError(
            f"{path.parent}: another caiforge process is using this folder; wait for it or pick another --output-dir"
        ) from exc
    return handle


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_m001_initial, _m002_judge_calls_and_verdicts]


@dataclass(frozen=True)
class Generation:
    response: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass(frozen=True)
class Failure:
    prompt: str | None
    stage: str
    reason: str
    detail: str = ""
    source: str | None = None
    line: int | None = None

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prompt": self.prompt, "stage": self.stage, "reason": self.reason}
        if self.detail:
            out["detail"] = self.detail
        if self.source is not None:
            out["source"], out["line"] = self.source, self.line
        return out


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.db = sqlite3.connect(path, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise InputError(f"{path}: cannot open the run database: {exc}") from exc
        self.attempt: int | None = None
        self._lock: IO[bytes] | None = None

    @classmethod
    def open(cls, output_dir: Path, fresh: bool = False) -> Store:
        """The run database of ``output_dir``, locked for this process: two runs on one folder would pay twice."""
        path = output_dir / DB_NAME
        lock = _lock(Path(str(path) + ".lock"))
        if fresh:
            for suffix in ("", "-wal", "-shm"):
                Path(str(path) + suffix).unlink(missing_ok=True)
        store = cls(path)
        store._lock = lock
        return store

    def _migrate(self) -> None:
        self.db.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied REAL NOT NULL)")
        done = {row[0] for row in self.db.execute("SELECT name FROM _migrations")}
        for migration in MIGRATIONS:
            if migration.__name__ not in done:
                with self.db:
                    self.db.execute("BEGIN")
                    migration(self.db)
                    self.db.execute("INSERT INTO _migrations VALUES (?, ?)", (migration.__name__, time.time()))

    def close(self) -> None:
        self.db.close()
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    # -- attempts ---------------------------------------------------------------------------------------
    def begin_attempt(self, config: dict[str, Any]) -> int:
        cur = self.db.execute(
            "INSERT INTO attempts (started, status, config) VALUES (?, 'running', ?)",
            (time.time(), json.dumps(config, sort_keys=True)),
        )
        self.attempt = int(cur.lastrowid or 0)
        return self.attempt

    def end_attempt(self, status: str, stats: dict[str, Any]) -> None:
        self.db.execute(
            "UPDATE attempts SET finished = ?, status = ?, stats = ? WHERE id = ?",
            (time.time(), status, json.dumps(stats, sort_keys=True), self.attempt),
        )

    # -- generations ------------------------------------------------------------------------------------
    def get_generation(self, key: str) -> Generation | None:
        row = self.db.execute(
            "SELECT response, prompt_tokens, completion_tokens FROM generations WHERE key = ?", (key,)
        ).fetchone()
        return Generation(*row) if row else None

    def put_generation(self, key: str, prompt: str, temperature: float, gen: Generation) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO generations VALUES (?, ?, ?, ?, ?, ?, ?)",
            (key, prompt, temperature, gen.response, gen.prompt_tokens, gen.completion_tokens, time.time()),
        )

    # -- judge calls and verdicts -----------------------------------------------------------------------
    def get_call(self, key: str) -> tuple[str, list[list[dict[str, Any]]] | None, int | None, int | None] | None:
        row = self.db.execute(
            "SELECT reply, top_logprobs, prompt_tokens, completion_tokens FROM judge_calls WHERE key = ?", (key,)
        ).fetchone()
        if row is None:
            return None
        return row[0], json.loads(row[1]) if row[1] else None, row[2], row[3]

    def put_call(
        self,
        key: str,
        reply: str,
        top_logprobs: list[list[dict[str, Any]]] | None,
        prompt_tokens: int | None,
        completion_tokens: int | None,
    ) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO judge_calls VALUES (?, ?, ?, ?, ?, ?)",
            (
                key,
                reply,
                json.dumps(top_logprobs) if top_logprobs else None,
                prompt_tokens,
                completion_tokens,
                time.time(),
            ),
        )

    def get_verdict(self, key: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT data FROM verdicts WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put_verdict(self, key: str, prompt: str, data: dict[str, Any]) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?)", (key, prompt, json.dumps(data), time.time())
        )

    # -- failures ---------------------------------------------------------------------------------------
    def put_failure(self, failure: Failure) -> None:
        self.db.execute(
            "INSERT INTO failures (attempt, prompt, stage, reason, detail, source, line, created) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                self.attempt,
                failure.prompt,
                failure.stage,
                failure.reason,
                failure.detail,
                failure.source,
                failure.line,
                time.time(),
            ),
        )

    def failures(self, attempt: int | None = None) -> Iterator[Failure]:
        rows = self.db.execute(
            "SELECT prompt, stage, reason, detail, source, line FROM failures WHERE attempt = ? ORDER BY id",
            (attempt if attempt is not None else self.attempt,),
        )
        for row in rows:
            yield Failure(*row)
