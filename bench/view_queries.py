"""Server-side time of ``caiforge view``'s answers over a run of 1M stored pairs (issue 13: the first page and each
filter or search under 100 ms).

Why: the viewer is meant for whole runs, and a run of a million prompts is where a table scan, a count or a
search driven from the wrong side stops being invisible. The figure is the ``Server-Timing: app;dur=`` header
every response carries (the handler's time, SQLite included, the network and the browser left out); the wall
clock of the round trip over loopback is printed beside it for scale.

What: a synthetic run folder is filled through the Store API, fast: an RL-CAI descriptor (four temperatures, the
bundled constitution's judge spec in ``whole`` mode, one pass), the prompts, then every result in one
``executemany`` (about 89.7% pairs, 7% transient failures, 3% inconsistent, 0.3% pending) with four candidates of
300-600 characters drawn from a seeded Zipf vocabulary of 3,000 words (so a search meets common words, rare
ones and prefixes), and 200 reviews. The folder is reused when a complete one of the same size and seed is there
(``bench.json`` says so). The viewer is then started in this process (``view.serve``): its first launch builds
``view.db`` (timed), and each query is sent ``--reps`` times, the queries interleaved so that no answer is only
the repetition of the one before.

    .venv/bin/python bench/view_queries.py --prompts 20000
    flock /tmp/caiforge-cpu.lock .venv/bin/python bench/view_queries.py --prompts 1000000 --json /tmp/view.json
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import html
import json
import os
import platform
import random
import re
import shutil
import sqlite3
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlencode

TARGET_MS = 100.0
TEMPERATURES = [0.01, 0.51, 1.01, 1.51]
DATA_VERSION = 1  # bump when the synthetic data changes: a folder of another version is rebuilt
MARKER = "bench.json"
REVIEWS = 200
POOL = 1 << 22  # tokens drawn once from the Zipf vocabulary; every text is a window of it at a random offset
_HEAD = (  # common English first, by rank
    "the to and a of you is that it in for can this be not with i are or as how what would your help on "
    "if do people should about me my have will they there an safe harm but from someone could way because "
    "one at by make want know get like more any just all some other use information ask never question "
    "answer"
)
HEAD = tuple(_HEAD.split())
ABC = ("abcess", "abcissa", "abcoulomb", "abcedarian")  # a prefix search ``abc*`` meets these, at spread ranks
RARE = ("quixotry", "zephyrine", "obsidionite", "vellichor", "crwthist")
RARE_PER_TEXT = 1e-4  # six texts a row, five rare words: each in about 1.2 rows in 10,000
COMMON = "help"  # in most rows
TWO = 300  # the vocabulary rank of the second word of the two-word search (about 1 row in 7)


def vocabulary(rng: random.Random, size: int = 3000) -> list[str]:
    """Words by rank: common English first, then made-up words of 2-4 syllables, with the ``abc`` words spread."""
    words, seen = list(HEAD), set(HEAD)
    consonants, vowels = "bcdfghjklmnprstvwz", "aeiou"
    while len(words) < size - len(ABC):
        word = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(2, 4)))
        if rng.random() < 0.3:
            word += rng.choice(consonants)
        if word not in seen and word not in RARE:
            seen.add(word)
            words.append(word)
    for rank, word in zip((400, 1200, 2000, 2800), ABC, strict=True):
        words.insert(rank, word)
    return words


class Texts:
    """Texts of a given length in characters: windows of one long Zipf-distributed token stream."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.vocab = vocabulary(rng)
        weights, total = [], 0.0
        for rank in range(len(self.vocab)):
            total += 1.0 / (rank + 1)
            weights.append(total)
        self.tokens = rng.choices(self.vocab, cum_weights=weights, k=POOL)
        # the mean word (and space) length, to turn characters into a word count
        self.per_word = sum(len(w) + 1 for w in self.tokens[:100_000]) / 100_000

    def text(self, low: int, high: int) -> str:
        rng = self.rng
        k = max(1, int(rng.randint(low, high) / self.per_word))
        start = rng.randrange(POOL - k)
        words = self.tokens[start : start + k]
        if rng.random() < RARE_PER_TEXT:
            words = [*words]
            words[rng.randrange(k)] = rng.choice(RARE)
        return " ".join(words).capitalize() + "."

    def rank_of(self, word: str) -> int:
        return self.vocab.index(word)


def _descriptor_parts() -> tuple[dict[str, Any], dict[str, Any]]:
    """The settings a real ``caiforge run`` with defaults records (the bundled constitution's judge spec, so a
    prompt's page can replay it), and that run's public config."""
    from caiforge.config import build_config
    from caiforge.pipeline import judge_spec, load_judging
    from caiforge.pipelines import rlcai

    cfg = build_config({})
    spec = judge_spec(cfg, *load_judging(cfg))
    return rlcai.Settings(temperatures=tuple(TEMPERATURES), judge=spec).describe(), cfg.public_dict()


def build(folder: Path, n: int, seed: int) -> dict[str, Any]:
    """Fill ``folder/caiforge.db`` with ``n`` prompts and their results (or reuse a complete one)."""
    marker = folder / MARKER
    wanted = {"prompts": n, "seed": seed, "data": DATA_VERSION}
    if marker.is_file():
        found = json.loads(marker.read_text())
        if {k: found.get(k) for k in wanted} == wanted and found.get("complete"):
            return {**found, "reused": True}
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)

    from caiforge.records import FailureRecord, PairRecord, RunDescriptor
    from caiforge.store import Store

    started = time.perf_counter()
    rng = random.Random(seed)
    texts = Texts(rng)
    settings, config = _descriptor_parts()
    store = Store(folder / "caiforge.db")
    # One bulk load: a rollback journal instead of the WAL (which would grow to the size of the whole file before
    # its checkpoint), and a cache that holds the primary-key indexes of random hex ids.
    store.db.execute("PRAGMA journal_mode=DELETE")
    store.db.execute("PRAGMA cache_size=-400000")
    attempt = store.begin_attempt({})
    ids = [f"{rng.getrandbits(64):016x}" for _ in range(n)]
    unique = store.set_prompts((pid, texts.text(60, 260)) for pid in ids)
    if unique != n:
        raise SystemExit(f"{n - unique} repeated ids: pick another --seed")
    descriptor = RunDescriptor(
        pipeline="rl-cai",
        settings=settings,
        identities={
            "policy": {"backend": "openai-chat", "model": "bench-policy", "url": "http://127.0.0.1:9/v1"},
            "judge": {"backend": "openai", "model": "bench-judge", "url": "http://127.0.0.1:9/v1"},
        },
        config=config,
        attempt=attempt,
    )
    descriptor.save(store)
    key = descriptor.key()
    counts = {"pair": 0, "failure": 0, "inconsistent": 0, "pending": 0}
    chosen_weights = [0.4, 0.7, 0.9, 1.0]  # cumulative: low temperatures win more often, as in real runs

    def results() -> Any:
        prompts = store.db.cursor().execute("SELECT id, text FROM prompts ORDER BY position")
        now = time.time()
        for pid, prompt in prompts:
            u = rng.random()
            if u < 0.003:
                counts["pending"] += 1
                continue
            responses = {t: texts.text(300, 600) for t in TEMPERATURES}
            if u < 0.033:
                counts["inconsistent"] += 1
                data = FailureRecord(
                    prompt_id=pid,
                    prompt=prompt,
                    stage="judge",
                    reason="judge passes disagree",
                    detail="pass 1 chose t=0.01, pass 2 chose t=1.51",
                    responses=responses,
                ).to_json()
                yield pid, key, "failure", json.dumps(data), attempt, now
                continue
            if u < 0.103:
                counts["failure"] += 1
                judged = rng.random() < 0.5  # half failed at the judge, with every candidate kept
                data = FailureRecord(
                    prompt_id=pid,
                    prompt=prompt,
                    stage="judge" if judged else "policy",
                    reason="transient error",
                    detail="HTTP 503 Service Unavailable after 8 retries",
                    responses=responses if judged else None,
                ).to_json()
                yield pid, key, "failure", json.dumps(data), attempt, now
                continue
            counts["pair"] += 1
            order = tuple(rng.sample(TEMPERATURES, 4))
            chosen = TEMPERATURES[bisect.bisect(chosen_weights, rng.random() * 0.999999)]
            rejected = rng.choice([t for t in TEMPERATURES if t != chosen])
            data = PairRecord(
                prompt_id=pid,
                prompt=prompt,
                responses=responses,
                chosen_t=chosen,
                rejected_t=rejected,
                explanation=texts.text(150, 400),
                order_t=order,
                chosen_position=order.index(chosen) + 1,
                rejected_position=order.index(rejected) + 1,
            ).to_json()
            yield pid, key, "pair", json.dumps(data), attempt, now

    store.db.execute("BEGIN")
    store.db.executemany("INSERT INTO results VALUES (?, ?, ?, ?, ?, ?)", results())
    store.db.execute("COMMIT")
    pairs = [pid for (pid,) in store.db.execute("SELECT prompt_id FROM results WHERE status = 'pair' ORDER BY rowid")]
    for pid in rng.sample(pairs, min(REVIEWS, len(pairs))):
        store.set_review(key, pid, rng.choice(("flag", "swap")), "bench review" if rng.random() < 0.5 else None)
    del pairs
    store.db.execute("PRAGMA journal_mode=WAL")  # as a run leaves it
    store.close()
    figures = {
        **wanted,
        "complete": True,
        "seconds": round(time.perf_counter() - started, 1),
        "counts": counts,
        "reviews": min(REVIEWS, counts["pair"]),
        "words": {
            "common": COMMON,
            "rare": RARE[0],
            "second": texts.vocab[TWO],
            "prefix": "abc",
            "ranks": {COMMON: texts.rank_of(COMMON), texts.vocab[TWO]: TWO},
        },
    }
    marker.write_text(json.dumps(figures, indent=1) + "\n")
    return {**figures, "reused": False}


def size_mb(folder: Path, name: str) -> dict[str, float]:
    return {
        suffix or "db": round(p.stat().st_size / 2**20, 1)
        for suffix in ("", "-wal", "-shm")
        if (p := folder / f"{name}{suffix}").is_file()
    }


def queries(n: int, words: dict[str, str], mode: str) -> list[tuple[str, dict[str, Any]]]:
    """(label, query string parameters) of every answer measured; the next pages and the prompt page are added
    from the answers themselves."""
    common, rare, second = words["common"], words["rare"], words["second"]
    return [
        ("first page", {}),
        (f"deep page (after={int(n * 0.9)})", {"after": int(n * 0.9)}),
        ("status=pair", {"status": "pair"}),
        ("status=failure", {"status": "failure"}),
        ("status=inconsistent", {"status": "inconsistent"}),
        ("status=pending", {"status": "pending"}),
        ("t=1.51", {"t": "1.51"}),
        ("pos=2", {"pos": "2"}),
        ("t=0.01&pos=4", {"t": "0.01", "pos": "4"}),
        (f"mode={mode}", {"mode": mode}),
        ("reviewed=any", {"reviewed": "any"}),
        ("reviewed=swap", {"reviewed": "swap"}),
        ("status=failure&reviewed=any (none)", {"status": "failure", "reviewed": "any"}),
        (f"q={common} (common)", {"q": common}),
        (f"q={rare} (rare)", {"q": rare}),
        ("q=abc* (prefix)", {"q": "abc*"}),
        ("q=ba* (two-letter prefix)", {"q": "ba*"}),
        ("q=s* (one-letter prefix)", {"q": "s*"}),
        (f"q={common} {second} (two words)", {"q": f"{common} {second}"}),
        (f"q=the {common} (two common words)", {"q": f"the {common}"}),
        (f"q={common}&reviewed=any (rare filter)", {"q": common, "reviewed": "any"}),
        (f"q={common}&status=pair (common filter)", {"q": common, "status": "pair"}),
        (f"q={common}&status=inconsistent (3% filter)", {"q": common, "status": "inconsistent"}),
        (f"q={common}&status=pending (0.3% filter)", {"q": common, "status": "pending"}),
        (f"q={rare}&status=pair", {"q": rare, "status": "pair"}),
        (f"q={common}&t=1.51&pos=4", {"q": common, "t": "1.51", "pos": "4"}),
        (f"q={common}&in=prompt", {"q": common, "in": "prompt"}),
        (f"q={second}&in=explanation", {"q": second, "in": "explanation"}),
    ]


def _next(body: str) -> str | None:
    found = re.search(r"<a id='next' href='([^']*)'", body)
    return html.unescape(found.group(1)) if found else None


def _matched(body: str) -> str:
    found = re.search(r"<p id='matched'>([^<]*)</p>", body)
    rows = body.count("<tr><td>")
    return f"{html.unescape(found.group(1)) if found else '?'}, {rows} shown"


async def measure(folder: Path, reps: int, words: dict[str, str], n: int, breakdown: bool) -> dict[str, Any]:
    import aiohttp

    from caiforge import view, view_index

    spent: dict[str, float] = {}
    # Where an answer's time goes, timed from outside (src/ is not touched). Nested: ``count`` includes
    # ``page (count)`` when it counts a search by paging to 1,001, and ``rows`` includes ``page (table)``.
    if breakdown:
        for owner, name in (
            (view.RunView, "sync"),
            (view.RunView, "rows"),
            (view_index.ViewIndex, "count"),
            (view_index.ViewIndex, "page"),
            (view_index.ViewIndex, "facets"),
        ):
            original = getattr(owner, name)

            def timed(*args: Any, _f: Any = original, _name: str = name, **kwargs: Any) -> Any:
                t = time.perf_counter()
                try:
                    return _f(*args, **kwargs)
                finally:
                    key = _name if _name != "page" else "page (count)" if len(args) > 3 else "page (table)"
                    spent[key] = spent.get(key, 0.0) + (time.perf_counter() - t) * 1000

            setattr(owner, name, timed)

    had_index = (folder / view_index.INDEX_NAME).is_file()
    started = time.perf_counter()
    runner, url = await view.serve(folder)
    index_s = time.perf_counter() - started
    index_size = size_mb(folder, view_index.INDEX_NAME)
    base = url.split("/?", 1)[0]
    with sqlite3.connect(f"file:{folder / 'caiforge.db'}?mode=ro", uri=True) as db:
        mode = view.RunView.judge_mode(SimpleNamespace(descriptor=_stored_descriptor(db)))  # type: ignore[arg-type]
        pid = db.execute(
            "SELECT p.id FROM prompts p JOIN results r ON r.prompt_id = p.id "
            "WHERE p.position >= ? AND r.status = 'pair' ORDER BY p.position LIMIT 1",
            (n // 2,),
        ).fetchone()
    plan = [(label, "/?" + urlencode(params) if params else "/") for label, params in queries(n, words, mode)]
    times: dict[str, list[float]] = {}
    walls: dict[str, list[float]] = {}
    shown: dict[str, str] = {}
    parts: dict[str, dict[str, list[float]]] = {}
    try:
        async with aiohttp.ClientSession() as session:

            async def get(label: str, path: str) -> str:
                spent.clear()
                t = time.perf_counter()
                async with session.get(base + path) as response:
                    body = await response.text()
                    wall = (time.perf_counter() - t) * 1000
                    if response.status != 200:
                        raise SystemExit(f"{path}: HTTP {response.status}: {body[:300]}")
                    dur = float(response.headers["Server-Timing"].split("dur=", 1)[1])
                times.setdefault(label, []).append(dur)
                walls.setdefault(label, []).append(wall)
                for name, ms in spent.items():
                    parts.setdefault(label, {}).setdefault(name, []).append(ms)
                return body

            for _ in range(reps):
                follow: list[tuple[str, str]] = []
                for label, path in plan:
                    body = await get(label, path)
                    shown[label] = _matched(body) if path.startswith("/?") or path == "/" else ""
                    if label == f"q={words['common']} (common)" and (nxt := _next(body)):
                        follow.append((f"q={words['common']}, next page", nxt))
                    if label == "first page" and (nxt := _next(body)):
                        follow.append(("first page, next page", nxt))
                for label, path in follow:
                    body = await get(label, path)
                    shown[label] = _matched(body)
                if pid:
                    body = await get("/prompt/<id> (a pair)", f"/prompt/{pid[0]}")
                    shown["/prompt/<id> (a pair)"] = f"{body.count('<details')} request(s) shown"
                await get("/api/live", "/api/live")
                shown["/api/live"] = ""
    finally:
        await runner.cleanup()
    rows = []
    for label, durs in times.items():
        rows.append(
            {
                "query": label,
                "matched": shown.get(label, ""),
                "server_ms": [round(d, 2) for d in durs],
                "first_ms": round(durs[0], 2),
                "median_ms": round(statistics.median(durs), 2),
                "max_ms": round(max(durs), 2),
                "wall_median_ms": round(statistics.median(walls[label]), 2),
                "met": max(durs) < TARGET_MS,
                "median_met": statistics.median(durs) < TARGET_MS,
                "breakdown_median_ms": {k: round(statistics.median(v), 2) for k, v in parts.get(label, {}).items()},
            }
        )
    return {
        "index": {
            "first_launch": not had_index,
            "seconds": round(index_s, 1),
            "view_db_mb_while_serving": index_size,
            "view_db_mb_after": size_mb(folder, view_index.INDEX_NAME),
        },
        "mode": mode,
        "results": rows,
    }


def _stored_descriptor(db: sqlite3.Connection) -> Any:
    from caiforge.records import RunDescriptor

    return RunDescriptor(**json.loads(db.execute("SELECT data FROM descriptor WHERE id = 1").fetchone()[0]))


def word_rows(folder: Path, words: dict[str, str]) -> dict[str, int]:
    """How many rows each searched word is in (outside any timing: a full doclist count)."""
    with sqlite3.connect(folder / "view.db") as db:
        return {
            w: int(db.execute("SELECT count(*) FROM fts WHERE fts MATCH ?", (q,)).fetchone()[0])
            for w, q in (
                (words["common"], f'"{words["common"]}"'),
                (words["rare"], f'"{words["rare"]}"'),
                (words["second"], f'"{words["second"]}"'),
                ("abc*", '"abc"*'),
            )
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=1_000_000)
    ap.add_argument("--folder", type=Path, default=Path("/tmp/caiforge-view-bench"))
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--reps", type=int, default=5, help="times each query is sent (interleaved)")
    ap.add_argument("--fresh-index", action="store_true", help="delete view.db first: time a first launch")
    ap.add_argument("--breakdown", action="store_true", help="also time sync/count/page/rows/facets per answer")
    ap.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = ap.parse_args()

    print(f"machine: {os.cpu_count()} cores, python {platform.python_version()}, SQLite {sqlite3.sqlite_version}")
    built = build(args.folder, args.prompts, args.seed)
    store_size = size_mb(args.folder, "caiforge.db")
    how = "reused" if built["reused"] else "built"
    print(
        f"store: {args.prompts:,} prompts {how} in {args.folder} (filled in {built['seconds']} s), "
        f"caiforge.db {store_size.get('db', 0):,.0f} MB; {built['counts']}, {built['reviews']} reviews"
    )
    if args.fresh_index or not built["reused"]:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{args.folder / 'view.db'}{suffix}").unlink(missing_ok=True)
    words = built["words"]
    measured = asyncio.run(measure(args.folder, args.reps, words, args.prompts, args.breakdown))
    index = measured["index"]
    kind = "first launch: view.db built" if index["first_launch"] else "view.db reused (followed)"
    print(
        f"index: {kind} in {index['seconds']} s; view.db while serving {index['view_db_mb_while_serving']} MB, "
        f"after {index['view_db_mb_after']} MB"
    )
    found = word_rows(args.folder, words)
    print("words searched, rows containing them: " + ", ".join(f"{w} {c:,}" for w, c in found.items()))
    print(f"\nServer-Timing app;dur over {args.reps} answers each; target {TARGET_MS:.0f} ms for every answer\n")
    width = max(len(r["query"]) for r in measured["results"])
    print(f"{'query':<{width}}  {'first':>8}  {'median':>8}  {'max':>8}  {'wall med':>8}  target  met  matched")
    for r in measured["results"]:
        met = "yes" if r["met"] else ("median" if r["median_met"] else "NO")
        print(
            f"{r['query']:<{width}}  {r['first_ms']:8.2f}  {r['median_ms']:8.2f}  {r['max_ms']:8.2f}  "
            f"{r['wall_median_ms']:8.2f}  {TARGET_MS:4.0f}ms  {met:<4} {r['matched']}"
        )
        if args.breakdown and r["breakdown_median_ms"]:
            print(f"{'':<{width}}  " + ", ".join(f"{k} {v:.2f}" for k, v in r["breakdown_median_ms"].items()))
    slow = [r["query"] for r in measured["results"] if not r["met"]]
    print(f"\n{len(measured['results']) - len(slow)} of {len(measured['results'])} met the target on every answer")
    if slow:
        print("over 100 ms at least once: " + "; ".join(slow))
    if args.json:
        report = {
            "benchmark": "view_queries",
            "description": "Server-Timing of caiforge view's answers over a synthetic RL-CAI run",
            "params": {"prompts": args.prompts, "seed": args.seed, "reps": args.reps, "folder": str(args.folder)},
            "environment": {
                "python": platform.python_version(),
                "platform": platform.platform(),
                "cpu_count": os.cpu_count(),
                "sqlite": sqlite3.sqlite_version,
                "argv": sys.argv[1:],
            },
            "target_ms": TARGET_MS,
            "store": {**built, "caiforge_db_mb": store_size},
            "word_rows": found,
            **measured,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
