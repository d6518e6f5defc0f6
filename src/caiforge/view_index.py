"""The viewer's index: ``RUN_DIR/view.db``, a derived, deletable sidecar that makes the table fast at 1M rows.

Nothing is added to ``caiforge.db``: a trigger or an index there would slow every write of a run (an FTS5 trigger
made each result write 17x dearer, measured in ``docs/research/viewer.md``). Instead the viewer copies what its
filters need into ``view.db`` and follows the run:

- ``rows``: one per prompt, keyed by input position, with its status (``pair``, ``failure``, ``inconsistent``,
  ``revision`` or ``pending``), the chosen temperature and position, and its review; a partial index per filter.
- ``fts``: a contentless FTS5 table (unicode61) over the prompt, its responses and the judge's explanation, plus
  a ``tags`` column holding each row's filter values as words (``spair``, ``t151``, ``p2``, ``rany``). A search
  with filters is then one FTS5 query whose doclists FTS5 intersects: checking each filtered row against FTS5
  cost 35-47 us a row, 140-500 ms at 1M (``bench/view_queries.py``). A contentless table cannot delete rows on
  SQLite 3.40, so a changed result or review gets a new FTS row and ``rows.doc`` points at the current one;
  stale ones drop out of the join.
- ``facets``: counts per status, temperature, position and review, kept as rows change: counting 1M rows on each
  page would cost 60-130 ms.

A result written with ``INSERT OR REPLACE`` gets a rowid above every other, so ``results.rowid > mark`` finds
everything new since the last sync. The prompts are re-read when an attempt rewrites them, and everything is
rebuilt when the run's key or its database file changes (``run --fresh``).
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .store import DB_NAME

INDEX_NAME = "view.db"
VERSION = 2  # the index's schema: another one is deleted and rebuilt
CHUNK = 2000
PAGE = 50
# A shorter prefix merges every term it starts (``s*``: 3.5 s at 1M); it is searched as a whole word instead.
MIN_PREFIX = 3
INSERT_DOC = "INSERT INTO fts (rowid, prompt, responses, explanation, tags) VALUES (?, ?, ?, ?, ?)"
INCONSISTENT = "judge passes disagree"  # verdicts.Inconsistent.reason (not imported: this module loads no judge)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rows (
    pos INTEGER PRIMARY KEY, prompt_id TEXT NOT NULL UNIQUE, status TEXT NOT NULL,
    chosen_t REAL, chosen_pos INTEGER, reviewed TEXT, doc INTEGER NOT NULL UNIQUE);
CREATE INDEX IF NOT EXISTS rows_status ON rows(status, pos);
CREATE INDEX IF NOT EXISTS rows_t ON rows(chosen_t, pos) WHERE status = 'pair';
CREATE INDEX IF NOT EXISTS rows_cp ON rows(chosen_pos, pos) WHERE status = 'pair';
CREATE INDEX IF NOT EXISTS rows_t_cp ON rows(chosen_t, chosen_pos, pos) WHERE status = 'pair';
CREATE INDEX IF NOT EXISTS rows_reviewed ON rows(reviewed, pos) WHERE reviewed IS NOT NULL;
CREATE VIRTUAL TABLE IF NOT EXISTS fts USING fts5(
    prompt, responses, explanation, tags, content='', tokenize='unicode61 remove_diacritics 2');
CREATE TABLE IF NOT EXISTS facets (name TEXT NOT NULL, value TEXT NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (name, value));
"""


@dataclass(frozen=True)
class Filters:
    """What the table is narrowed to; every field ``None`` or empty means no narrowing."""

    status: str | None = None
    chosen_t: float | None = None
    chosen_pos: int | None = None
    reviewed: str | None = None  # "any", "flag" or "swap"
    search: str | None = None
    field: str | None = None  # search only this column: "prompt", "responses" or "explanation"

    def empty(self) -> bool:
        return not (self.status or self.chosen_t is not None or self.chosen_pos is not None or self.reviewed)


@dataclass(frozen=True)
class Indexed:
    """What one result contributes to the index."""

    status: str
    chosen_t: float | None
    chosen_pos: int | None
    responses: str
    explanation: str


def indexed(status: str | None, data: dict[str, Any] | None) -> Indexed:
    """A stored result (``results.status`` and its JSON) as the index sees it: pure, so it is tested alone."""
    d = data or {}
    if status is None:
        return Indexed("pending", None, None, "", "")
    if status == "pair":
        texts = [str(text) for _, text in d.get("responses") or []]
        return Indexed(
            "pair", d.get("chosen_t"), d.get("chosen_position"), "\n".join(texts), d.get("explanation") or ""
        )
    if status == "revision":
        rounds = d.get("rounds") or []
        texts = [d.get("initial_response") or ""]
        texts += [f"{r.get('critique_response', '')}\n{r.get('revision_response', '')}" for r in rounds]
        return Indexed("revision", None, None, "\n".join(texts), "")
    kept = [str(text) for _, text in d.get("responses") or []]
    reason = f"{d.get('stage', '')}: {d.get('reason', '')}\n{d.get('detail', '')}"
    return Indexed("inconsistent" if d.get("reason") == INCONSISTENT else status, None, None, "\n".join(kept), reason)


FIELDS = ("prompt", "responses", "explanation")


def fts_query(text: str, field: str | None = None) -> str | None:
    """A person's search as an FTS5 query: every word must occur (``word*`` is a prefix), in ``field`` if given.
    FTS5's own syntax is not exposed, so no search is a syntax error."""
    words = [w for w in re.findall(r"\w+\*?", text) if w.rstrip("*")]
    terms = [f'"{w.rstrip("*")}"' + ("*" if w.endswith("*") and len(w) - 1 >= MIN_PREFIX else "") for w in words]
    if not terms:
        return None
    columns = field if field in FIELDS else " ".join(FIELDS)
    return f"{{{columns}}} : ({' '.join(terms)})"


def _t(value: float) -> str:
    return f"t{round(float(value) * 100)}"


def tags(row: Indexed, reviewed: str | None) -> str:
    """A row's filter values as words for the ``tags`` column."""
    words = [f"s{row.status}"]
    if row.chosen_t is not None:
        words.append(_t(row.chosen_t))
    if row.chosen_pos is not None:
        words.append(f"p{row.chosen_pos}")
    if reviewed:
        words += ["rany", f"r{reviewed}"]
    return " ".join(words)


def filter_tags(f: Filters) -> list[str]:
    """The ``tags`` words a row must have to pass the filters."""
    words = [f"s{f.status}"] if f.status else []
    if f.chosen_t is not None:
        words.append(_t(f.chosen_t))
    if f.chosen_pos is not None:
        words.append(f"p{f.chosen_pos}")
    if f.reviewed:
        words.append(f"r{f.reviewed}")
    return words


def _facet_items(row: Indexed, reviewed: str | None) -> Iterator[tuple[str, str]]:
    yield "status", row.status
    if row.status == "pair":
        yield "chosen_t", repr(float(row.chosen_t)) if row.chosen_t is not None else "None"
        yield "chosen_pos", str(row.chosen_pos)
    if reviewed:
        yield "reviewed", reviewed


class ViewIndex:
    """``view.db`` beside a run's store, kept in step with it by :meth:`sync`. Not thread-safe: the viewer calls it
    from one worker thread."""

    def __init__(self, run_dir: Path, run_key: str) -> None:
        self.source = run_dir / DB_NAME
        self.run_key = run_key
        self.run, self.inode = self._open_store()
        self.path = run_dir / INDEX_NAME
        self.db = self._open_index()
        self._seen: tuple[int, str] | None = None  # (the store's data_version, the run key) last synced

    def _open_store(self) -> tuple[sqlite3.Connection, int]:
        run = sqlite3.connect(f"file:{self.source}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
        run.execute("PRAGMA busy_timeout = 5000")
        return run, os.stat(self.source).st_ino

    def _open_index(self) -> sqlite3.Connection:
        """``view.db``, or a new one when it is damaged or of another schema (it is derived: rebuilt from the store)."""
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            if db.execute("PRAGMA user_version").fetchone()[0] == VERSION:
                return self._prepared(db)
            db.close()
        except sqlite3.DatabaseError:
            pass
        for suffix in ("", "-wal", "-shm"):
            Path(str(self.path) + suffix).unlink(missing_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute(f"PRAGMA user_version = {VERSION}")
        return self._prepared(db)

    @staticmethod
    def _prepared(db: sqlite3.Connection) -> sqlite3.Connection:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=OFF")  # derived data: a crash costs a rebuild, never a wrong row
        db.executescript(SCHEMA)
        return db

    def close(self) -> None:
        self.run.close()
        self.db.close()

    # -- following the run --------------------------------------------------------------------------------
    def _meta(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT key, value FROM meta"))

    def _identity(self) -> list[Any]:
        """What must match for the index to be this run's: the file, the run, its key, and the prompts' version
        (``prompt_sets``: one row per rewrite, written with the prompts). Read inside a snapshot of the store."""
        first = self.run.execute("SELECT MIN(started) FROM attempts").fetchone()[0]
        generation = self.run.execute("SELECT MAX(id) FROM prompt_sets").fetchone()[0]
        return [VERSION, self.inode, first, self.run_key, generation]

    def replaced(self) -> bool:
        """Whether ``run --fresh`` replaced the store (a new file at the path): then reopen it. An open connection
        would go on reading the deleted file."""
        try:
            inode = os.stat(self.source).st_ino
        except FileNotFoundError:  # between the unlink and the new file: the next sync sees it
            return False
        if inode == self.inode:
            return False
        self.run.close()
        self.run, self.inode = self._open_store()
        self._seen = None
        return True

    def sync(self) -> int:
        """Bring the index up to the store's last commit; returns how many rows changed. Cheap when nothing did.
        A failure leaves no transaction open (the next sync starts clean) and is raised."""
        self.replaced()
        seen = (int(self.run.execute("PRAGMA data_version").fetchone()[0]), self.run_key)
        if seen == self._seen and self._meta().get("identity"):
            return 0
        try:
            changed = self._sync()
        except BaseException:
            for db in (self.db, self.run):
                if db.in_transaction:
                    db.execute("ROLLBACK")
            self._seen = None
            raise
        self._seen = seen
        return changed

    def _sync(self) -> int:
        meta = self._meta()
        self.run.execute("BEGIN")  # the identity and the prompts from one snapshot
        try:
            identity = self._identity()
            known = json.loads(meta["identity"]) if meta.get("identity") else None
            # A resumed run rewrites the same prompts: compare them (2.2 s at 1M) instead of a rebuild (minutes).
            same = known is not None and known[:-1] == identity[:-1] and known != identity and self._same_prompts()
        finally:
            self.run.execute("COMMIT")
        if known != identity and not same:
            return self.rebuild()
        if same:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('identity', ?)", (json.dumps(identity),))
        return self._follow(int(meta.get("mark", "0"))) + self._reviews()

    def _same_prompts(self) -> bool:
        """Whether the store's prompts are the indexed rows, position by position."""
        stored = self.run.execute("SELECT position, id FROM prompts ORDER BY position")
        rows = self.db.execute("SELECT pos, prompt_id FROM rows ORDER BY pos")
        while True:
            a, b = stored.fetchmany(CHUNK), rows.fetchmany(CHUNK)
            if a != b:
                return False
            if not a:
                return True

    def rebuild(self) -> int:
        """Index every prompt from scratch (about 4 minutes per million on 2 cores)."""
        db = self.db
        db.execute("BEGIN")
        for table in ("rows", "facets", "meta"):
            db.execute(f"DELETE FROM {table}")
        db.execute("INSERT INTO fts (fts) VALUES ('delete-all')")  # a contentless table's only way to empty
        self.run.execute("BEGIN")  # one snapshot of the store: the identity, the mark and the rows agree
        try:
            identity = json.dumps(self._identity())
            mark = self.run.execute("SELECT COALESCE(MAX(rowid), 0) FROM results").fetchone()[0]
            reviews = self._stored_reviews()
            found = self.run.execute(
                "SELECT p.position, p.id, p.text, r.status, r.data FROM prompts p "
                "LEFT JOIN results r ON r.prompt_id = p.id AND r.run_key = ? ORDER BY p.position",
                (self.run_key,),
            )
            n = 0
            facets: dict[tuple[str, str], int] = {}
            while batch := found.fetchmany(CHUNK):
                rows, fts = [], []
                for pos, pid, text, status, data in batch:
                    row = indexed(status, json.loads(data) if data else None)
                    n += 1
                    rows.append((pos, pid, row.status, row.chosen_t, row.chosen_pos, reviews.get(pid), n))
                    fts.append((n, text, row.responses, row.explanation, tags(row, reviews.get(pid))))
                    for item in _facet_items(row, reviews.get(pid)):
                        facets[item] = facets.get(item, 0) + 1
                db.executemany("INSERT INTO rows VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
                db.executemany(INSERT_DOC, fts)
        finally:
            self.run.execute("COMMIT")
        db.executemany("INSERT INTO facets VALUES (?, ?, ?)", ((k, v, c) for (k, v), c in facets.items()))
        db.executemany(
            "INSERT INTO meta VALUES (?, ?)", (("identity", identity), ("mark", str(mark)), ("next_fts", str(n + 1)))
        )
        db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # else the rebuild's WAL, as large as the index, stays
        return n

    def _stored_reviews(self) -> dict[str, str]:
        found = self.run.execute("SELECT prompt_id, action FROM reviews WHERE run_key = ?", (self.run_key,))
        return {str(pid): str(action) for pid, action in found}

    def _bump(self, items: Iterable[tuple[str, str]], by: int) -> None:
        self.db.executemany(
            "INSERT INTO facets VALUES (?, ?, ?) ON CONFLICT (name, value) DO UPDATE SET n = n + excluded.n",
            ((name, value, by) for name, value in items),
        )

    def _follow(self, mark: int) -> int:
        """Index the results written since ``mark``, a chunk at a time."""
        changed = 0
        next_fts = int(self._meta().get("next_fts", "1"))
        while True:
            found = self.run.execute(
                "SELECT r.rowid, r.prompt_id, r.status, r.data, p.text FROM results r "
                "JOIN prompts p ON p.id = r.prompt_id WHERE r.rowid > ? AND r.run_key = ? ORDER BY r.rowid LIMIT ?",
                (mark, self.run_key, CHUNK),
            ).fetchall()
            if not found:
                break
            db = self.db
            db.execute("BEGIN")
            for rowid, pid, status, data, text in found:
                mark = rowid
                old = db.execute(
                    "SELECT pos, status, chosen_t, chosen_pos, reviewed FROM rows WHERE prompt_id = ?", (pid,)
                ).fetchone()
                if old is None:  # a result for a prompt this attempt no longer has
                    continue
                pos, o_status, o_t, o_pos, reviewed = old
                self._bump(_facet_items(Indexed(o_status, o_t, o_pos, "", ""), reviewed), -1)
                row = indexed(status, json.loads(data))
                self._bump(_facet_items(row, reviewed), 1)
                db.execute(INSERT_DOC, (next_fts, text, row.responses, row.explanation, tags(row, reviewed)))
                db.execute(
                    "UPDATE rows SET status = ?, chosen_t = ?, chosen_pos = ?, doc = ? WHERE pos = ?",
                    (row.status, row.chosen_t, row.chosen_pos, next_fts, pos),
                )
                next_fts += 1
                changed += 1
            db.executemany(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)", (("mark", str(mark)), ("next_fts", str(next_fts)))
            )
            db.execute("COMMIT")
        return changed

    def _reviews(self) -> int:
        """Reviews are few and made by hand: compare them whole."""
        stored = self._stored_reviews()
        indexed_now = dict(self.db.execute("SELECT prompt_id, reviewed FROM rows WHERE reviewed IS NOT NULL"))
        changes = {
            pid: stored.get(pid)
            for pid in stored.keys() | indexed_now.keys()
            if stored.get(pid) != indexed_now.get(pid)
        }
        if not changes:
            return 0
        next_fts = int(self._meta().get("next_fts", "1"))
        self.db.execute("BEGIN")
        for pid, action in changes.items():
            found = self.run.execute(
                "SELECT p.text, r.status, r.data FROM prompts p "
                "LEFT JOIN results r ON r.prompt_id = p.id AND r.run_key = ? WHERE p.id = ?",
                (self.run_key, pid),
            ).fetchone()
            if found is None or not self.db.execute("SELECT 1 FROM rows WHERE prompt_id = ?", (pid,)).fetchone():
                continue  # a review of a prompt this attempt does not have: nothing to count
            if pid in indexed_now:
                self._bump([("reviewed", indexed_now[pid])], -1)
            if action is not None:
                self._bump([("reviewed", action)], 1)
            text, status, data = found
            row = indexed(status, json.loads(data) if data else None)  # its tags change: a new document
            self.db.execute(INSERT_DOC, (next_fts, text, row.responses, row.explanation, tags(row, action)))
            self.db.execute("UPDATE rows SET reviewed = ?, doc = ? WHERE prompt_id = ?", (action, next_fts, pid))
            next_fts += 1
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('next_fts', ?)", (str(next_fts),))
        self.db.execute("COMMIT")
        return len(changes)

    # -- reading -------------------------------------------------------------------------------------------
    def facets(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for name, value, n in self.db.execute("SELECT name, value, n FROM facets WHERE n > 0 ORDER BY name, value"):
            out.setdefault(str(name), {})[str(value)] = int(n)
        return out

    def _where(self, f: Filters) -> tuple[list[str], list[Any]] | None:
        """SQL conditions on ``rows r`` for the filters, or None when they cannot match anything."""
        where: list[str] = []
        params: list[Any] = []
        if f.chosen_t is not None or f.chosen_pos is not None:
            if f.status not in (None, "pair"):
                return None  # only pairs have a chosen candidate
            where.append("r.status = 'pair'")
            if f.chosen_t is not None:
                where.append("r.chosen_t = ?")
                params.append(f.chosen_t)
            if f.chosen_pos is not None:
                where.append("r.chosen_pos = ?")
                params.append(f.chosen_pos)
        elif f.status:
            where.append("r.status = ?")
            params.append(f.status)
        if f.reviewed == "any":
            where.append("r.reviewed IS NOT NULL")
        elif f.reviewed:
            where.append("r.reviewed = ?")
            params.append(f.reviewed)
        return where, params

    def _sizes(self, f: Filters) -> dict[str, int]:
        """Rows each given filter leaves, from the facets, keyed by the index that serves it."""
        facets = self.facets()
        sizes: dict[str, int] = {}
        if f.status:
            sizes["rows_status"] = facets.get("status", {}).get(f.status, 0)
        t = facets.get("chosen_t", {}).get(repr(float(f.chosen_t)), 0) if f.chosen_t is not None else None
        pos = facets.get("chosen_pos", {}).get(str(f.chosen_pos), 0) if f.chosen_pos is not None else None
        if t is not None and pos is not None:
            sizes["rows_t_cp"] = min(t, pos)
        elif t is not None:
            sizes["rows_t"] = t
        elif pos is not None:
            sizes["rows_cp"] = pos
        if f.reviewed:
            reviewed = facets.get("reviewed", {})
            sizes["rows_reviewed"] = sum(reviewed.values()) if f.reviewed == "any" else reviewed.get(f.reviewed, 0)
        return sizes

    def page(self, f: Filters, after: int = -1, limit: int = PAGE + 1) -> list[tuple[int, int]]:
        """(position, paging key) of the next ``limit`` rows after ``after``: by position, or for a search by FTS
        row (the order rows were indexed), so that a page of any depth costs the same (keyset paging)."""
        built = self._where(f)
        if built is None:
            return []
        where, params = built
        sizes = self._sizes(f)
        if any(n == 0 for n in sizes.values()):
            return []  # a filter no row passes
        if f.search:
            query = fts_query(f.search, f.field)
            if query is None:
                return []
            wanted = filter_tags(f)
            if wanted:  # the filters as words: FTS5 intersects the doclists
                query += " AND tags : (" + " ".join(f'"{w}"' for w in wanted) + ")"
            cond = " AND ".join(["fts MATCH ?", "fts.rowid > ?", *where])  # where: rechecks the few rows found
            sql = (
                f"SELECT r.pos, fts.rowid FROM fts JOIN rows r ON r.doc = fts.rowid WHERE {cond} "
                "ORDER BY fts.rowid LIMIT ?"
            )
            return [(int(a), int(b)) for a, b in self.db.execute(sql, [query, after, *params, limit])]
        # Driven from the index of the narrowest filter: SQLite, without statistics, walked the 70k failures to
        # find the 200 reviewed ones (and ANALYZE made other plans worse; measured at 1M).
        hint = f"INDEXED BY {min(sizes, key=sizes.__getitem__)} " if sizes else ""
        sql = (
            f"SELECT r.pos, r.pos FROM rows r {hint}WHERE {' AND '.join([*where, 'r.pos > ?'])} ORDER BY r.pos LIMIT ?"
        )
        return [(int(a), int(b)) for a, b in self.db.execute(sql, [*params, after, limit])]

    def page_and_count(self, f: Filters, after: int, cap: int = 1000) -> tuple[list[tuple[int, int]], tuple[int, bool]]:
        """A page and the count, from one query when they can share it (a first page counted by query)."""
        if after == -1 and not self._counted_by_facets(f):
            keys = self.page(f, -1, cap + 1)
            return keys[: PAGE + 1], (min(len(keys), cap), len(keys) > cap)
        return self.page(f, after), self.count(f, cap)

    @staticmethod
    def _counted_by_facets(f: Filters) -> bool:
        return (
            not f.search
            and sum(x is not None and x != "" for x in (f.status, f.chosen_t, f.chosen_pos, f.reviewed)) <= 1
        )

    def count(self, f: Filters, cap: int = 1000) -> tuple[int, bool]:
        """(rows matching, whether there are more than ``cap``): exact from the facets for one filter and no
        search, else counted up to ``cap``."""
        if self._counted_by_facets(f):
            sizes = self._sizes(f)
            return (min(sizes.values()) if sizes else sum(self.facets().get("status", {}).values())), False
        n = len(self.page(f, -1, cap + 1))
        return min(n, cap), n > cap
