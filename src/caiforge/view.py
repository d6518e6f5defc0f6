"""``caiforge view RUN_DIR``: a local web page over a run's store, with human review.

Served by aiohttp's web server on 127.0.0.1 only. Plain HTML and forms: every page reads the same with JavaScript
off. One small script of ours (``data/view.js``, the only one the Content-Security-Policy allows: no inline script,
no other origin) refreshes the counts while a run goes. Model text is hostile input: everything shown is escaped
with ``html.escape``, and the policy would stop an inline script even if an escape were missed.

- The run's database is read through a read-only connection while the run may still be writing it (WAL lets
  readers in); a review is one short write with a busy timeout. The table reads ``view.db``, an index the viewer
  keeps beside the store (:mod:`caiforge.view_index`): FTS5 search and an index per filter, fast at 1M rows.
- Requests whose ``Host`` is not the viewer's own address are refused (DNS rebinding); so are POSTs whose
  ``Origin`` is another site's, or that lack the per-launch token printed in the URL.
- Paging is keyset (by position, or by index row for a search), so a page costs the same at any depth.
"""

from __future__ import annotations

import asyncio
import html
import json
import secrets
import sqlite3
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from importlib.resources import files
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

from aiohttp import web

from .errors import InputError
from .manifest import Manifest
from .records import RunDescriptor
from .report import PLOTS_DIR
from .store import DB_NAME, Store
from .view_index import FIELDS, PAGE, Filters, ViewIndex, indexed

T = TypeVar("T")

STATUSES = ("pair", "failure", "inconsistent", "pending", "revision")
REVIEWED = ("any", "flag", "swap")
PLOTS = ("temperatures.png", "positions.png", "failures.png", "lengths.png", "tokens.png", "chosen_prob.png")
CSP = (
    "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; img-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # no-referrer would make a form POST send "Origin: null", refused
    "Cache-Control": "no-store",
}
STYLE = (
    "body{font-family:sans-serif;margin:1.5em;max-width:80em}table{border-collapse:collapse;width:100%}"
    "td,th{border:1px solid #ccc;padding:.3em;vertical-align:top;text-align:left}.chosen{background:#e6f4ea}"
    ".rejected{background:#fce8e6}.warning{background:#fff4ce;padding:.4em}pre{white-space:pre-wrap;margin:0}"
    "nav a{margin-right:1em}"
    "form.filters{margin:.5em 0}form.filters label{margin-right:.6em}img{max-width:48%;margin:.3em}"
)
TOKEN_COOKIE = "caiforge_view_"  # + the port: browsers keep one cookie jar for every port of a host


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


@dataclass(frozen=True)
class Row:
    position: int
    prompt_id: str
    prompt: str
    status: str
    data: dict[str, Any] | None
    review: str | None
    note: str | None = None
    key: int = 0  # the paging key: the position, or for a search the index's FTS row
    version: str = ""  # when its result was written: a review names the version it was made on


# A prompt, its result under the run's key and its review; the two placeholders are the run key.
SELECT = (
    "SELECT p.position, p.id, p.text, r.status, r.data, v.action, v.note, r.created FROM prompts p "
    "LEFT JOIN results r ON r.prompt_id = p.id AND r.run_key = ? "
    "LEFT JOIN reviews v ON v.prompt_id = p.id AND v.run_key = ?"
)


def _row(found: tuple[Any, ...]) -> Row:
    pos, pid, text, status, data, action, note, created = found
    parsed = json.loads(data) if data else None
    shown = indexed(status, parsed).status
    return Row(pos, pid, text, shown, parsed, action, note, pos, repr(created))


class RunView:
    """What the pages read: the run's store (read-only) for a prompt, its index (``view.db``) for the table. Used
    from one worker thread: SQLite stays off the event loop."""

    def __init__(self, run_dir: Path) -> None:
        path = run_dir / DB_NAME
        if not path.is_file():
            raise InputError(f"{run_dir}: not a caiforge run (no {DB_NAME})")
        self.run_dir, self.path = run_dir, path
        store = Store(path)  # brings an older store up to date (the reviews table), then lets go
        try:
            described = store.descriptor()
        finally:
            store.close()
        if described is None:
            raise InputError(f"{run_dir}: the store describes no run yet")
        self.run_key, self.descriptor = described[0], RunDescriptor(**described[1])
        self.index = ViewIndex(run_dir, self.run_key)
        self.live_served = 0

    @property
    def db(self) -> sqlite3.Connection:
        """The store, read-only: the index's connection, which it reopens when ``run --fresh`` replaces the file."""
        return self.index.run

    def _descriptor(self) -> tuple[str, RunDescriptor] | None:
        found = self.db.execute("SELECT key, data FROM descriptor WHERE id = 1").fetchone()
        return None if found is None else (str(found[0]), RunDescriptor(**json.loads(found[1])))

    def close(self) -> None:
        self.index.close()

    def sync(self) -> None:
        """Follow the run: a new descriptor (settings changed) re-keys the index, which then rebuilds."""
        self.index.replaced()
        described = self._descriptor()
        if described is not None and described[0] != self.run_key:  # None: a fresh run not yet described
            self.run_key, self.descriptor = described
            self.index.run_key = self.run_key
        self.index.sync()

    def judge_mode(self) -> str | None:
        """The run's judge mode (one per run key, so a mode filter is decided here, not per row)."""
        judge = self.descriptor.settings.get("judge")
        if not isinstance(judge, dict):
            return None
        passes = int(judge.get("passes") or 1)
        return f"{judge.get('mode', 'whole')}, {passes} pass{'es' if passes > 1 else ''}"

    def rows(self, keys: list[tuple[int, int]]) -> list[Row]:
        """The rows of these (position, paging key) pairs, read from the store, in that order."""
        if not keys:
            return []
        marks = ",".join("?" * len(keys))
        found = self.db.execute(
            f"{SELECT} WHERE p.position IN ({marks})", (self.run_key, self.run_key, *(pos for pos, _ in keys))
        )
        by_pos = {row.position: row for row in map(_row, found)}
        return [replace(by_pos[pos], key=key) for pos, key in keys if pos in by_pos]

    def one(self, prompt_id: str) -> Row | None:
        self.index.replaced()
        found = self.db.execute(f"{SELECT} WHERE p.id = ?", (self.run_key, self.run_key, prompt_id)).fetchone()
        return None if found is None else _row(found)

    def warnings(self) -> list[str]:
        """What the run's manifest says every reader must be told (a toy judge, ...), once the run has one."""
        try:
            return Manifest.read(self.run_dir).warnings
        except InputError:
            return []

    def running(self) -> bool:
        found = self.db.execute("SELECT status FROM attempts ORDER BY id DESC LIMIT 1").fetchone()
        return found is not None and found[0] == "running"

    def live(self) -> dict[str, Any]:
        """The counts the page refreshes while a run goes (``live_served``: how often, a record for tests)."""
        self.live_served += 1
        self.sync()
        return {"counts": self.index.facets().get("status", {}), "running": self.running()}

    def review(self, prompt_id: str, action: str | None, note: str | None) -> None:
        """One short write through the store (no folder lock: a run may hold it while a person reviews)."""
        store = Store(self.path)
        try:
            store.set_review(self.run_key, prompt_id, action, note)
        finally:
            store.close()


VIEW = web.AppKey("view", RunView)  # the app's RunView, for whoever holds the runner (tests)


def _page(title: str, body: str, script: bool = False) -> web.Response:
    tag = "<script src='/static/view.js' defer></script>" if script else ""
    text = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{STYLE}</style>{tag}"
        f"</head><body><nav><a href='/'>prompts</a><a href='/report'>report</a></nav><h1>{esc(title)}</h1>{body}"
        "</body></html>"
    )
    return web.Response(text=text, content_type="text/html", headers=HEADERS)


def _summary(row: Row) -> str:
    d = row.data or {}
    if row.status == "pair":
        return (
            f"chosen t={esc(d.get('chosen_t'))} (#{esc(d.get('chosen_position'))}), "
            f"rejected t={esc(d.get('rejected_t'))} (#{esc(d.get('rejected_position'))})"
        )
    if row.status in ("failure", "inconsistent"):
        return f"{esc(d.get('stage'))}: {esc(d.get('reason'))}"
    if row.status == "revision":
        return f"{len(d.get('rounds') or [])} round(s)"
    return ""


def _number(text: str | None, kind: type[float] | type[int]) -> Any:
    try:
        return None if not text else kind(text)
    except ValueError:
        return None


def _select(name: str, label: str, values: list[str], chosen: str | None) -> str:
    options = "".join(
        f"<option value='{esc(v)}'{' selected' if v == chosen else ''}>{esc(v or 'all')}</option>"
        for v in ["", *values]
    )
    return f"<label>{esc(label)} <select name='{name}'>{options}</select></label>"


def _counts(counts: dict[str, int], running: bool) -> str:
    text = ", ".join(f"{k} {n}" for k, n in sorted(counts.items())) or "no prompts yet"
    return f"<p id='counts' data-live='1'>{esc(text)}{' (running)' if running else ''}</p>"


def app(view: RunView, token: str, allowed_hosts: set[str], worker: ThreadPoolExecutor) -> web.Application:
    async def db(call: Callable[[], T]) -> T:
        """SQLite in the one worker thread: the event loop never waits on the disk, and calls never overlap."""
        return await asyncio.get_running_loop().run_in_executor(worker, call)

    @web.middleware
    async def guard(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Any:
        started = time.perf_counter()
        if request.host not in allowed_hosts:  # DNS rebinding: a foreign name that resolves here
            return web.Response(status=403, text="forbidden: unknown Host")
        if request.method == "POST":
            origin = request.headers.get("Origin")
            if origin is not None and origin.split("://", 1)[-1] not in allowed_hosts:
                return web.Response(status=403, text="forbidden: foreign Origin")
            if request.headers.get("Sec-Fetch-Site") == "cross-site":
                return web.Response(status=403, text="forbidden: cross-site request")
            form = await request.post()
            if not secrets.compare_digest(str(form.get("token", "")), token):
                return web.Response(status=403, text="forbidden: the review token is missing or wrong")
        response = await handler(request)
        if request.query.get("token") == token:  # the printed URL: its holder may review from now on
            response.set_cookie(f"{TOKEN_COOKIE}{request.url.port}", token, httponly=True, samesite="Strict")
        # What the server spent on the request, for the benchmark and the browser's devtools.
        response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - started) * 1000:.2f}"
        return response

    def authorised(request: web.Request) -> bool:
        given = request.cookies.get(f"{TOKEN_COOKIE}{request.url.port}") or request.query.get("token") or ""
        return secrets.compare_digest(given, token)

    async def table(request: web.Request) -> web.Response:
        q = request.query
        f = Filters(
            status=q.get("status") if q.get("status") in STATUSES else None,
            chosen_t=_number(q.get("t"), float),
            chosen_pos=_number(q.get("pos"), int),
            reviewed=q.get("reviewed") if q.get("reviewed") in REVIEWED else None,
            search=(q.get("q") or "").strip() or None,
            field=q.get("in") if q.get("in") in FIELDS else None,
        )
        mode = q.get("mode") or None
        given = _number(q.get("after"), int)
        after = -1 if given is None else min(max(given, -1), 2**63 - 1)  # within SQLite's integers

        def read() -> tuple[list[Row], dict[str, dict[str, int]], tuple[int, bool], bool, str | None]:
            view.sync()
            if mode and mode != view.judge_mode():  # the run has one judge mode: another matches nothing
                keys: list[tuple[int, int]] = []
                matched = (0, False)
            else:
                keys, matched = view.index.page_and_count(f, after)
            return view.rows(keys), view.index.facets(), matched, view.running(), view.judge_mode()

        rows, facets, (matched, more_than), running, run_mode = await db(read)
        more, rows = len(rows) > PAGE, rows[:PAGE]
        keep = {
            "status": f.status,
            "t": q.get("t") if f.chosen_t is not None else None,
            "pos": q.get("pos") if f.chosen_pos is not None else None,
            "mode": mode,
            "reviewed": f.reviewed,
            "q": f.search,
            "in": f.field,
        }
        keep = {k: v for k, v in keep.items() if v}
        form = (
            "<form class='filters' method='get' action='/'>"
            + _select("status", "status", list(STATUSES), f.status)
            + _select("t", "chosen temperature", list(facets.get("chosen_t", {})), q.get("t"))
            + _select("pos", "chosen position", list(facets.get("chosen_pos", {})), q.get("pos"))
            + _select("mode", "judge mode", [run_mode] if run_mode else [], mode)
            + _select("reviewed", "reviewed", list(REVIEWED), f.reviewed)
            + f"<label>search <input name='q' value='{esc(f.search)}' placeholder='words, word*'></label>"
            + _select("in", "in", list(FIELDS), f.field)
            + " <button>filter</button></form>"
        )
        shown = f"{matched}{'+' if more_than else ''} match" if keep else f"{matched} prompts"
        body = "".join(
            f"<tr><td>{r.position}</td><td><a href='/prompt/{esc(r.prompt_id)}'>{esc(r.prompt[:200])}</a></td>"
            f"<td class='status'>{esc(r.status)}</td><td>{_summary(r)}</td><td>{esc(r.review or '')}</td></tr>"
            for r in rows
        )
        nxt = ""
        if more:
            nxt = f"<p><a id='next' href='/?{esc(urlencode({**keep, 'after': rows[-1].key}))}'>next page</a></p>"
        warnings = "".join(f"<p class='warning'><b>Warning.</b> {esc(w)}</p>" for w in view.warnings())
        return _page(
            f"caiforge run: {view.descriptor.pipeline}",
            f"{warnings}{_counts(facets.get('status', {}), running)}{form}<p id='matched'>{esc(shown)}</p>"
            "<table><tr><th>#</th><th>prompt</th><th>status</th><th>outcome</th>"
            f"<th>review</th></tr>{body}</table>{nxt}",
            script=True,
        )

    async def prompt(request: web.Request) -> web.Response:
        row = await db(lambda: view.one(request.match_info["id"]))
        if row is None:
            raise web.HTTPNotFound(text="no such prompt")
        d = row.data or {}
        parts = [f"<pre id='prompt'>{esc(row.prompt)}</pre><p>status: {esc(row.status)}</p>"]
        if row.status == "pair":
            cells = []
            for t, text in d.get("responses") or []:
                mark = "chosen" if t == d.get("chosen_t") else "rejected" if t == d.get("rejected_t") else ""
                cells.append(
                    f"<td class='{mark}'><b>t={esc(t)} {esc(mark)}</b><pre class='candidate'>{esc(text)}</pre></td>"
                )
            parts.append(f"<table><tr>{''.join(cells)}</tr></table>")
            labels = (
                ("shown order (temperatures)", d.get("order_t")),
                ("both passes agree", d.get("consistent")),
                ("P(chosen)", d.get("chosen_prob")),
                ("principle", d.get("principle")),
            )
            facts = ", ".join(f"{name}: {esc(value)}" for name, value in labels if value not in (None, "", []))
            parts.append(
                f"<h2>judge</h2><pre id='explanation'>{esc(d.get('explanation') or '(no explanation)')}</pre>"
                f"<p>{facts}</p>"
            )
            choices = "".join(
                f"<label><input type='radio' name='action' value='{a}'{' checked' if row.review == a else ''}> "
                f"{label}</label> "
                for a, label in (("flag", "flag as wrong"), ("swap", "swap chosen and rejected"), ("clear", "clear"))
            )
            note = f" ({esc(row.note)})" if row.note else ""
            parts.append(f"<h2>review</h2><p id='review'>current: {esc(row.review or 'none')}{note}</p>")
            if authorised(request):
                parts.append(
                    f"<form method='post' action='/review'><input type='hidden' name='token' value='{esc(token)}'>"
                    f"<input type='hidden' name='prompt_id' value='{esc(row.prompt_id)}'>"
                    f"<input type='hidden' name='version' value='{esc(row.version)}'>{choices}"
                    "<input name='note' placeholder='note (optional)'> <button id='save'>save</button></form>"
                )
            else:
                parts.append(
                    "<p>To review, open the URL <code>caiforge view</code> printed (it carries the token).</p>"
                )
        elif row.status == "revision":
            parts.append(f"<h2>initial response</h2><pre>{esc(d.get('initial_response'))}</pre>")
            for i, r in enumerate(d.get("rounds") or [], 1):
                parts.append(
                    f"<h2>round {i}</h2><p><i>{esc(r.get('critique_prompt'))}</i></p>"
                    f"<pre>{esc(r.get('critique_response'))}</pre><p><i>{esc(r.get('revision_prompt'))}</i></p>"
                    f"<pre class='revision'>{esc(r.get('revision_response'))}</pre>"
                )
        elif row.status in ("failure", "inconsistent"):
            parts.append(
                f"<h2>failure</h2><pre>{esc(d.get('stage'))}: {esc(d.get('reason'))}\n{esc(d.get('detail'))}</pre>"
            )
            for t, text in d.get("responses") or []:
                parts.append(f"<h3>candidate t={esc(t)}</h3><pre class='candidate'>{esc(text)}</pre>")
        parts.append(await db(lambda: _calls(view, row)))
        return _page(f"prompt {row.position}", "".join(parts))

    async def review(request: web.Request) -> web.Response:
        form = await request.post()
        pid, action = str(form.get("prompt_id", "")), str(form.get("action", ""))
        row = await db(lambda: view.one(pid))
        if row is None or row.status != "pair" or action not in ("flag", "swap", "clear"):
            raise web.HTTPBadRequest(text="review: a pair's prompt id and an action of flag, swap or clear")
        if str(form.get("version", "")) != row.version:  # the pair was remade (a rerun, run --fresh) since shown
            raise web.HTTPConflict(
                text="review: this pair changed since the page was shown; reload it and review again"
            )
        note = str(form.get("note") or "") or None
        await db(lambda: view.review(pid, None if action == "clear" else action, note))
        raise web.HTTPSeeOther(f"/prompt/{pid}")

    async def report(request: web.Request) -> web.Response:
        plots = view.run_dir / PLOTS_DIR
        shown = [name for name in PLOTS if (plots / name).is_file()]
        images = "".join(f"<img src='/plots/{name}' alt='{esc(name)}'>" for name in shown)
        live = await db(view.live)
        text = images or "<p>No plots yet: they are drawn when the run (or <code>caiforge report</code>) ends.</p>"
        return _page("report", _counts(live["counts"], live["running"]) + text, script=True)

    async def plot(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        path = view.run_dir / PLOTS_DIR / name
        if name not in PLOTS or not path.is_file():  # an allowlist: no path from the URL reaches the disk
            raise web.HTTPNotFound(text="no such plot")
        return web.Response(body=path.read_bytes(), content_type="image/png", headers=HEADERS)

    async def live(request: web.Request) -> web.Response:
        return web.json_response(await db(view.live), headers=HEADERS)

    script = files("caiforge").joinpath("data/view.js").read_text(encoding="utf-8")

    async def static(request: web.Request) -> web.Response:
        return web.Response(text=script, content_type="text/javascript", headers=HEADERS)

    application = web.Application(middlewares=[guard])
    application[VIEW] = view
    application.add_routes(
        [
            web.get("/", table),
            web.get("/prompt/{id}", prompt),
            web.post("/review", review),
            web.get("/report", report),
            web.get("/plots/{name}", plot),
            web.get("/api/live", live),
            web.get("/static/view.js", static),
        ]
    )
    return application


def _calls(view: RunView, row: Row) -> str:
    """Every request the pipeline made for this prompt, rebuilt from the store, with its raw reply and tokens."""
    from .view_calls import calls

    found = calls(view.db, view.descriptor, row.prompt_id, row.prompt)
    if isinstance(found, str):
        return f"<h2>requests</h2><p>{esc(found)}</p>"
    out = [f"<h2>requests ({len(found)})</h2>"]
    for i, call in enumerate(found, 1):
        tokens = f"tokens in {esc(call.prompt_tokens)}, out {esc(call.completion_tokens)}"
        out.append(
            f"<details class='call'><summary>{i}. {esc(call.role)}: {esc(call.label)} ({tokens})</summary>"
            f"<h4>request</h4><pre>{esc(call.request)}</pre><h4>reply</h4><pre>{esc(call.reply)}</pre></details>"
        )
    return "".join(out)


def _warm() -> None:
    """Import what a prompt's page replays with now: done on its first page, it cost 100-120 ms (1M bench)."""
    from . import export, pipeline, view_calls  # noqa: F401
    from .pipelines import rlcai, slcai  # noqa: F401


async def serve(run_dir: Path, port: int = 0, token: str | None = None) -> tuple[web.AppRunner, str]:
    """Start the viewer on 127.0.0.1; returns the runner (``await runner.cleanup()`` stops it) and the URL. The
    index is brought up to date first (about 2 minutes for a million prompts the first time; then incremental)."""
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="caiforge-view")
    loop = asyncio.get_running_loop()
    view = await loop.run_in_executor(worker, RunView, run_dir)
    await loop.run_in_executor(worker, view.sync)
    await loop.run_in_executor(worker, _warm)
    token = token or secrets.token_urlsafe(32)
    hosts: set[str] = set()
    application = app(view, token, hosts, worker)

    async def close(_: web.Application) -> None:
        await loop.run_in_executor(worker, view.close)
        worker.shutdown()

    application.on_cleanup.append(close)
    runner = web.AppRunner(application, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # port 0: the one given
    hosts.update({f"127.0.0.1:{bound}", f"localhost:{bound}"})
    return runner, f"http://127.0.0.1:{bound}/?{urlencode({'token': token})}"
