"""The durable record of a run (SQLite, WAL): every finished request, every prompt's outcome, and what the run
was, so that a run can be rebuilt from this file alone.

- ``replies``: every finished request, keyed by content (the engine's cache; a rerun sends none of them again);
- ``prompts``: this run's unique prompts with stable ids, in input order;
- ``descriptor``: what determines the results (pipeline, its settings, each endpoint's identity, the config);
- ``results``: each prompt's record or failure, tagged with the descriptor it was made under;
- ``splits``: the split each usable pair was assigned to, and its rank there;
- ``failures``: what failed outside any prompt (bad input records), per attempt; ``attempts``: each run.

The store holds JSON and knows nothing of what it means (:mod:`caiforge.records` reads it). Writes happen on
the event-loop thread. With ``commit_interval`` set (a run sets :data:`COMMIT_INTERVAL`), replies and results
are written in one transaction per interval instead of one each (one statement per write cost about 0.1 ms of
CPU a request): a transaction is committed by the first write after it has been open ``commit_interval``
seconds, and by the ``on_dirty`` timer its owner schedules, so a kill -9 loses at most what finished in the
last interval (at most :data:`DURABILITY_BOUND`); with WAL and ``synchronous=NORMAL`` a committed transaction
survives a killed process. Schema changes are numbered migrations recorded in ``_migrations`` (as simonw/llm
does).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .errors import InputError
from .request import Reply

DB_NAME = "caiforge.db"
COMMIT_INTERVAL = 0.05  # seconds a write may wait for company before its transaction is committed
DURABILITY_BOUND = 0.1  # what a kill -9 may lose at most: the interval, plus a late event loop's slack


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


def _m003_one_reply_table_and_run_records(db: sqlite3.Connection) -> None:
    """0.1 kept policy and judge replies apart; one engine keeps one table. Keys are unchanged (the request
    keys of 0.1's two request shapes are kept on purpose), so a 0.1 run resumes with nothing sent again."""
    db.executescript(
        """
        CREATE TABLE replies (
            key TEXT PRIMARY KEY, role TEXT NOT NULL, text TEXT NOT NULL, top_logprobs TEXT,
            prompt_tokens INTEGER, completion_tokens INTEGER, created REAL NOT NULL);
        INSERT OR IGNORE INTO replies
            SELECT key, 'policy', response, NULL, prompt_tokens, completion_tokens, created FROM generations;
        INSERT OR IGNORE INTO replies
            SELECT key, 'judge', reply, top_logprobs, prompt_tokens, completion_tokens, created FROM judge_calls;
        DROP TABLE generations;
        DROP TABLE judge_calls;
        DROP TABLE verdicts;
        CREATE TABLE prompts (id TEXT PRIMARY KEY, position INTEGER NOT NULL, text TEXT NOT NULL);
        CREATE INDEX prompts_position ON prompts(position);
        CREATE TABLE descriptor (id INTEGER PRIMARY KEY CHECK (id = 1), key TEXT NOT NULL, data TEXT NOT NULL);
        CREATE TABLE results (
            prompt_id TEXT PRIMARY KEY, run_key TEXT NOT NULL, status TEXT NOT NULL, data TEXT NOT NULL,
            attempt INTEGER, created REAL NOT NULL);
        CREATE TABLE splits (prompt_id TEXT PRIMARY KEY, split TEXT NOT NULL, rank INTEGER NOT NULL);
        """
    )


def _m004_reviews(db: sqlite3.Connection) -> None:
    """A person's verdict on a pair (``caiforge view``): ``flag`` leaves it out of every export, ``swap`` exchanges
    chosen and rejected. One per prompt of a run; clearing deletes the row."""
    db.executescript(
        """
        CREATE TABLE reviews (
            run_key TEXT NOT NULL, prompt_id TEXT NOT NULL,
            action TEXT NOT NULL CHECK (action IN ('flag', 'swap')), note TEXT, created REAL NOT NULL,
            PRIMARY KEY (run_key, prompt_id));
        """
    )


def _m005_prompt_sets(db: sqlite3.Connection) -> None:
    """Each ``set_prompts`` adds a row in the same transaction: a reader (``caiforge view``) knows the prompts
    were rewritten, even when an edited input has as many prompts as before."""
    db.executescript(
        """
        CREATE TABLE prompt_sets (
            id INTEGER PRIMARY KEY AUTOINCREMENT, attempt INTEGER, count INTEGER NOT NULL, created REAL NOT NULL);
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


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    _m001_initial,
    _m002_judge_calls_and_verdicts,
    _m003_one_reply_table_and_run_records,
    _m004_reviews,
    _m005_prompt_sets,
]


@dataclass(frozen=True, kw_only=True)
class StoredResult:
    prompt_id: str
    position: int
    prompt: str
    status: str | None  # None: no result under the current descriptor yet
    data: dict[str, Any] | None


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
        self.commit_interval = 0.0  # 0: every write commits at once (tools, tests); a run batches
        self.on_dirty: Callable[[], None] | None = None  # called when a transaction opens: schedule commit()
        self._began: float | None = None  # when the open transaction's first write was made

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
        self.commit()
        self.db.close()
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    def _write(self, sql: str, params: tuple[Any, ...]) -> None:
        """One write, batched into the open transaction when ``commit_interval`` is set."""
        if self.commit_interval <= 0:
            self.db.execute(sql, params)
            return
        now = time.monotonic()
        if self._began is None:
            self.db.execute("BEGIN")
            self._began = now
            if self.on_dirty is not None:
                self.on_dirty()
        self.db.execute(sql, params)
        if now - self._began >= self.commit_interval:
            self.commit()

    def commit(self) -> None:
        """Make every write so far durable (a no-op when none is pending)."""
        if self._began is not None:
            self._began = None
            self.db.execute("COMMIT")

    def _at_once(self, sql: str, params: tuple[Any, ...]) -> Any:
        """A write that is committed now, with whatever was pending (attempts, descriptor: rare and vital)."""
        self.commit()
        return self.db.execute(sql, params)

    # -- attempts ---------------------------------------------------------------------------------------
    def begin_attempt(self, config: dict[str, Any]) -> int:
        cur = self._at_once(
            "INSERT INTO attempts (started, status, config) VALUES (?, 'running', ?)",
            (time.time(), json.dumps(config, sort_keys=True)),
        )
        self.attempt = int(cur.lastrowid or 0)
        return self.attempt

    def end_attempt(self, status: str, stats: dict[str, Any]) -> None:
        self._at_once(
            "UPDATE attempts SET finished = ?, status = ?, stats = ? WHERE id = ?",
            (time.time(), status, json.dumps(stats, sort_keys=True), self.attempt),
        )

    # -- replies (the engine's cache) ---------------------------------------------------------------------
    def get_reply(self, key: str) -> Reply | None:
        row = self.db.execute(
            "SELECT text, top_logprobs, prompt_tokens, completion_tokens FROM replies WHERE key = ?", (key,)
        ).fetchone()
        if row is None:
            return None
        text, top, prompt_tokens, completion_tokens = row
        return Reply(
            text=text,
            top_logprobs=json.loads(top) if top else None,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cached=True,
        )

    def put_reply(self, key: str, role: str, reply: Reply) -> None:
        self._write(
            "INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                key,
                role,
                reply.text,
                json.dumps(reply.top_logprobs) if reply.top_logprobs else None,
                reply.prompt_tokens,
                reply.completion_tokens,
                time.time(),
            ),
        )

    # -- what the run is ----------------------------------------------------------------------------------
    def set_prompts(self, prompts: Iterable[tuple[str, str]]) -> int:
        """This attempt's prompts as (id, text), in input order, streamed: they replace the last attempt's. A
        repeated id (the same text) keeps its first position. Returns how many unique prompts there are."""
        self.commit()
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("DELETE FROM prompts")
            self.db.executemany(
                "INSERT OR IGNORE INTO prompts VALUES (?, ?, ?)",
                ((pid, i, text) for i, (pid, text) in enumerate(prompts)),
            )
            count = int(self.db.execute("SELECT COUNT(*) FROM prompts").fetchone()[0])
            self.db.execute(
                "INSERT INTO prompt_sets (attempt, count, created) VALUES (?, ?, ?)", (self.attempt, count, time.time())
            )
        return count

    def pending(self, run_key: str, chunk: int = 1000) -> Iterator[tuple[str, str]]:
        """(id, text) of every prompt without a pair under ``run_key`` (none yet, or a failure to try again), in
        input order, read a chunk at a time: a resumed run starts where it stopped, in constant memory."""
        last = -1
        while True:
            rows = self.db.execute(
                "SELECT p.id, p.text, p.position FROM prompts p "
                "LEFT JOIN results r ON r.prompt_id = p.id AND r.run_key = ? "
                "WHERE p.position > ? AND (r.status IS NULL OR r.status = 'failure') ORDER BY p.position LIMIT ?",
                (run_key, last, chunk),
            ).fetchall()
            if not rows:
                return
            for pid, text, _ in rows:
                yield pid, text
            last = rows[-1][2]

    def count_pending(self, run_key: str) -> int:
        row = self.db.execute(
            "SELECT COUNT(*) FROM prompts p LEFT JOIN results r ON r.prompt_id = p.id AND r.run_key = ? "
            "WHERE r.status IS NULL OR r.status = 'failure'",
            (run_key,),
        ).fetchone()
        return int(row[0])

    def set_descriptor(self, key: str, data: dict[str, Any]) -> None:
        # Key order is kept: the config's split ratios are ordered, and the order decides the assignment.
        self._at_once("INSERT OR REPLACE INTO descriptor VALUES (1, ?, ?)", (key, json.dumps(data)))

    def descriptor(self) -> tuple[str, dict[str, Any]] | None:
        row = self.db.execute("SELECT key, data FROM descriptor WHERE id = 1").fetchone()
        return (row[0], json.loads(row[1])) if row else None

    # -- outcomes -------------------------------------------------------------------------------------------
    def put_result(self, prompt_id: str, run_key: str, status: str, data: dict[str, Any]) -> None:
        self._write(
            "INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?, ?)",
            (prompt_id, run_key, status, json.dumps(data), self.attempt, time.time()),
        )

    def results(self, run_key: str) -> Iterator[StoredResult]:
        """Every prompt in input order, with its result made under ``run_key`` (or none yet)."""
        rows = self.db.execute(
            "SELECT p.id, p.position, p.text, r.status, r.data FROM prompts p "
            "LEFT JOIN results r ON r.prompt_id = p.id AND r.run_key = ? ORDER BY p.position",
            (run_key,),
        )
        for pid, position, text, status, data in rows:
            yield StoredResult(
                prompt_id=pid, position=position, prompt=text, status=status, data=json.loads(data) if data else None
            )

    def count_results(self, run_key: str) -> tuple[int, int]:
        """(prompts of the run, prompts with an outcome under ``run_key``)."""
        row = self.db.execute(
            "SELECT COUNT(*), COUNT(r.prompt_id) FROM prompts p "
            "LEFT JOIN results r ON r.prompt_id = p.id AND r.run_key = ?",
            (run_key,),
        ).fetchone()
        return int(row[0]), int(row[1])

    def set_splits(self, assignment: Iterable[tuple[str, str, int]]) -> None:
        """(prompt id, split, rank in the split) for every usable pair, replacing any earlier assignment."""
        self.commit()
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("DELETE FROM splits")
            self.db.executemany("INSERT INTO splits VALUES (?, ?, ?)", assignment)

    # -- failures outside any prompt --------------------------------------------------------------------
    def put_failure(self, *, stage: str, reason: str, detail: str, source: str | None, line: int | None) -> None:
        self._write(
            "INSERT INTO failures (attempt, prompt, stage, reason, detail, source, line, created) "
            "VALUES (?, NULL, ?, ?, ?, ?, ?, ?)",
            (self.attempt, stage, reason, detail, source, line, time.time()),
        )

    def failures(self, attempt: int | None) -> Iterator[tuple[str, str, str, str | None, int | None]]:
        """(stage, reason, detail, source, line) of an attempt, in the order they were recorded."""
        rows = self.db.execute(
            "SELECT stage, reason, detail, source, line FROM failures WHERE attempt = ? AND prompt IS NULL ORDER BY id",
            (attempt,),
        )
        yield from rows

    # -- human reviews (#13) -----------------------------------------------------------------------------
    def set_review(self, run_key: str, prompt_id: str, action: str | None, note: str | None = None) -> None:
        """Record (or with ``action=None`` clear) a person's review of a prompt's pair, committed at once."""
        if action is None:
            self._at_once("DELETE FROM reviews WHERE run_key = ? AND prompt_id = ?", (run_key, prompt_id))
            return
        self._at_once(
            "INSERT OR REPLACE INTO reviews VALUES (?, ?, ?, ?, ?)", (run_key, prompt_id, action, note, time.time())
        )

    def reviews(self, run_key: str) -> dict[str, tuple[str, str | None, float]]:
        """prompt id -> (action, note, when): reviews are made by hand, so a run has few."""
        rows = self.db.execute("SELECT prompt_id, action, note, created FROM reviews WHERE run_key = ?", (run_key,))
        return {pid: (action, note, created) for pid, action, note, created in rows}

    # -- random reads, for output files in a split's order (#11) -----------------------------------------
    def results_of(self, run_key: str, ids: list[str]) -> Iterator[tuple[str, str, dict[str, Any]]]:
        """(prompt id, status, data) of these prompts' results under ``run_key``, in no particular order: one
        query per batch of ids, so a split's files are written in its rank order without holding the run."""
        if not ids:
            return
        marks = ",".join("?" * len(ids))
        rows = self.db.execute(
            f"SELECT prompt_id, status, data FROM results WHERE run_key = ? AND prompt_id IN ({marks})",
            (run_key, *ids),
        )
        for pid, status, data in rows:
            yield pid, status, json.loads(data)
