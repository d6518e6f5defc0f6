"""``caiforge view RUN_DIR``: a local web page over a run's store, with human review.

Served by aiohttp's web server on 127.0.0.1 only. Plain HTML, no script at all: every page reads the same with
JavaScript off, and the Content-Security-Policy forbids scripts, so model text cannot run even if an escape were
missed. Model text is hostile input: everything shown is escaped with ``html.escape``.

- The run's database is read through a read-only connection while the run may still be writing it (WAL lets
  readers in); a review is one short write with a busy timeout.
- Requests whose ``Host`` is not the viewer's own address are refused (DNS rebinding); so are POSTs whose
  ``Origin`` is another site's, or that lack the per-launch token printed in the URL.
- Paging is by input position (keyset), filters are SQL on the server, so a page costs the same at 1M rows.
"""

from __future__ import annotations

import html
import json
import secrets
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from .errors import InputError
from .records import RunDescriptor
from .store import DB_NAME, Store

PAGE = 50
STATUSES = ("pair", "failure", "pending", "revision")
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; form-action 'self'; frame-ancestors 'none'"
STYLE = (
    "body{font-family:sans-serif;margin:1.5em;max-width:80em}table{border-collapse:collapse;width:100%}"
    "td,th{border:1px solid #ccc;padding:.3em;vertical-align:top;text-align:left}.chosen{background:#e6f4ea}"
    ".rejected{background:#fce8e6}pre{white-space:pre-wrap;margin:0}nav a{margin-right:1em}"
)
TOKEN_COOKIE = "caiforge_view"


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


# A prompt, its result under the run's key and its review; the two placeholders are the run key.
SELECT = (
    "SELECT p.position, p.id, p.text, r.status, r.data, v.action FROM prompts p "
    "LEFT JOIN results r ON r.prompt_id = p.id AND r.run_key = ? "
    "LEFT JOIN reviews v ON v.prompt_id = p.id AND v.run_key = ?"
)


def _row(found: tuple[Any, ...]) -> Row:
    pos, pid, text, status, data, action = found
    return Row(pos, pid, text, status or "pending", json.loads(data) if data else None, action)


class RunView:
    """What the pages read: the run's prompts, results and reviews, by SQL on a read-only connection."""

    def __init__(self, run_dir: Path) -> None:
        path = run_dir / DB_NAME
        if not path.is_file():
            raise InputError(f"{run_dir}: not a caiforge run (no {DB_NAME})")
        self.path = path
        Store(path).close()  # brings an older store up to date (the reviews table), then lets go
        self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        self.db.execute("PRAGMA busy_timeout = 5000")
        found = self.db.execute("SELECT key, data FROM descriptor WHERE id = 1").fetchone()
        if found is None:
            raise InputError(f"{run_dir}: the store describes no run yet")
        self.run_key = str(found[0])
        self.descriptor = RunDescriptor(**json.loads(found[1]))

    def close(self) -> None:
        self.db.close()

    def rows(self, status: str | None, search: str | None, reviewed: bool, after: int) -> list[Row]:
        where, params = ["p.position > ?"], [self.run_key, self.run_key, after]
        if status == "pending":
            where.append("r.status IS NULL")
        elif status:
            where.append("r.status = ?")
            params.append(status)
        if search:
            where.append("(p.text LIKE ? ESCAPE '\\' OR r.data LIKE ? ESCAPE '\\')")
            like = "%" + search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            params += [like, like]
        if reviewed:
            where.append("v.action IS NOT NULL")
        sql = f"{SELECT} WHERE {' AND '.join(where)} ORDER BY p.position LIMIT {PAGE + 1}"
        return [_row(found) for found in self.db.execute(sql, params)]

    def one(self, prompt_id: str) -> Row | None:
        found = self.db.execute(f"{SELECT} WHERE p.id = ?", (self.run_key, self.run_key, prompt_id)).fetchone()
        return None if found is None else _row(found)

    def counts(self) -> dict[str, int]:
        rows = self.db.execute(
            "SELECT COALESCE(r.status, 'pending'), COUNT(*) FROM prompts p "
            "LEFT JOIN results r ON r.prompt_id = p.id AND r.run_key = ? GROUP BY 1",
            (self.run_key,),
        )
        return {str(k): int(n) for k, n in rows}

    def review(self, prompt_id: str, action: str | None, note: str | None) -> None:
        """One short write through the store (no folder lock: a run may hold it while a person reviews)."""
        store = Store(self.path)
        try:
            store.set_review(self.run_key, prompt_id, action, note)
        finally:
            store.close()


def _page(title: str, body: str) -> web.Response:
    text = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{STYLE}</style>"
        f"</head><body><nav><a href='/'>prompts</a></nav><h1>{esc(title)}</h1>{body}</body></html>"
    )
    return web.Response(text=text, content_type="text/html", headers={"Content-Security-Policy": CSP})


def _summary(row: Row) -> str:
    d = row.data or {}
    if row.status == "pair":
        return f"chosen t={esc(d.get('chosen_t'))}, rejected t={esc(d.get('rejected_t'))}"
    if row.status == "failure":
        return f"{esc(d.get('stage'))}: {esc(d.get('reason'))}"
    if row.status == "revision":
        return f"{len(d.get('rounds') or [])} round(s)"
    return ""


def app(view: RunView, token: str, allowed_hosts: set[str]) -> web.Application:
    @web.middleware
    async def guard(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Any:
        if request.host not in allowed_hosts:  # DNS rebinding: a foreign name that resolves here
            return web.Response(status=403, text="forbidden: unknown Host")
        if request.method == "POST":
            origin = request.headers.get("Origin")
            if origin is not None and origin.split("://", 1)[-1] not in allowed_hosts:
                return web.Response(status=403, text="forbidden: foreign Origin")
            form = await request.post()
            if not secrets.compare_digest(str(form.get("token", "")), token):
                return web.Response(status=403, text="forbidden: the review token is missing or wrong")
        response = await handler(request)
        if request.query.get("token") == token:  # the printed URL: its holder may review from now on
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict")
        return response

    def authorised(request: web.Request) -> bool:
        given = request.cookies.get(TOKEN_COOKIE) or request.query.get("token") or ""
        return secrets.compare_digest(given, token)

    async def table(request: web.Request) -> web.Response:
        q = request.query
        status = q.get("status") if q.get("status") in STATUSES else None
        search = q.get("q") or None
        reviewed = q.get("reviewed") == "1"
        after = int(q["after"]) if q.get("after", "").lstrip("-").isdigit() else -1
        rows = view.rows(status, search, reviewed, after)
        more, rows = len(rows) > PAGE, rows[:PAGE]
        counts = ", ".join(f"{esc(k)} {n}" for k, n in sorted(view.counts().items()))
        options = "".join(
            f"<option value='{s}'{' selected' if s == status else ''}>{s}</option>" for s in ("", *STATUSES)
        )
        form = (
            "<form method='get' action='/'>"
            f"<select name='status'>{options}</select> <input name='q' value='{esc(search)}' placeholder='search'> "
            f"<label><input type='checkbox' name='reviewed' value='1'{' checked' if reviewed else ''}> reviewed"
            "</label> <button>filter</button></form>"
        )
        body = "".join(
            f"<tr><td>{r.position}</td><td><a href='/prompt/{esc(r.prompt_id)}'>{esc(r.prompt[:200])}</a></td>"
            f"<td class='status'>{esc(r.status)}</td><td>{_summary(r)}</td><td>{esc(r.review or '')}</td></tr>"
            for r in rows
        )
        nxt = ""
        if more:
            keep = {k: v for k, v in (("status", status), ("q", search), ("reviewed", "1" if reviewed else None)) if v}
            nxt = f"<p><a id='next' href='/?{esc(urlencode({**keep, 'after': rows[-1].position}))}'>next page</a></p>"
        return _page(
            f"caiforge run: {view.descriptor.pipeline}",
            f"<p>{counts}</p>{form}<table><tr><th>#</th><th>prompt</th><th>status</th><th>outcome</th>"
            f"<th>review</th></tr>{body}</table>{nxt}",
        )

    async def prompt(request: web.Request) -> web.Response:
        row = view.one(request.match_info["id"])
        if row is None:
            raise web.HTTPNotFound(text="no such prompt")
        d = row.data or {}
        parts = [f"<h2>prompt</h2><pre>{esc(row.prompt)}</pre><p>status: {esc(row.status)}</p>"]
        if row.status == "pair":
            cells = []
            for t, text in d.get("responses") or []:
                mark = "chosen" if t == d.get("chosen_t") else "rejected" if t == d.get("rejected_t") else ""
                cells.append(
                    f"<td class='{mark}'><b>t={esc(t)} {esc(mark)}</b><pre class='candidate'>{esc(text)}</pre></td>"
                )
            parts.append(f"<table><tr>{''.join(cells)}</tr></table>")
            parts.append(
                f"<h2>judge</h2><pre>{esc(d.get('explanation'))}</pre><p>consistent: {esc(d.get('consistent'))}, "
                f"P(chosen): {esc(d.get('chosen_prob'))}, principle: {esc(d.get('principle'))}</p>"
            )
            choices = "".join(
                f"<label><input type='radio' name='action' value='{a}'{' checked' if row.review == a else ''}> "
                f"{label}</label> "
                for a, label in (("flag", "flag as wrong"), ("swap", "swap chosen and rejected"), ("clear", "clear"))
            )
            parts.append(f"<h2>review</h2><p>current: {esc(row.review or 'none')}</p>")
            if authorised(request):
                parts.append(
                    f"<form method='post' action='/review'><input type='hidden' name='token' value='{esc(token)}'>"
                    f"<input type='hidden' name='prompt_id' value='{esc(row.prompt_id)}'>{choices}"
                    "<input name='note' placeholder='note (optional)'> <button>save</button></form>"
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
        elif row.status == "failure":
            parts.append(
                f"<h2>failure</h2><pre>{esc(d.get('stage'))}: {esc(d.get('reason'))}\n{esc(d.get('detail'))}</pre>"
            )
        return _page("prompt", "".join(parts))

    async def review(request: web.Request) -> web.Response:
        form = await request.post()
        pid, action = str(form.get("prompt_id", "")), str(form.get("action", ""))
        row = view.one(pid)
        if row is None or row.status != "pair" or action not in ("flag", "swap", "clear"):
            raise web.HTTPBadRequest(text="review: a pair's prompt id and an action of flag, swap or clear")
        note = str(form.get("note") or "") or None
        view.review(pid, None if action == "clear" else action, note)
        raise web.HTTPSeeOther(f"/prompt/{pid}")

    application = web.Application(middlewares=[guard])
    application.add_routes([web.get("/", table), web.get("/prompt/{id}", prompt), web.post("/review", review)])
    return application


async def serve(run_dir: Path, port: int = 0, token: str | None = None) -> tuple[web.AppRunner, str]:
    """Start the viewer on 127.0.0.1; returns the runner (``await runner.cleanup()`` stops it) and the URL."""
    view = RunView(run_dir)
    token = token or secrets.token_urlsafe(16)
    hosts: set[str] = set()
    application = app(view, token, hosts)
    application.on_cleanup.append(lambda _: _close(view))
    runner = web.AppRunner(application, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # port 0: the one given
    hosts.update({f"127.0.0.1:{bound}", f"localhost:{bound}"})
    return runner, f"http://127.0.0.1:{bound}/?{urlencode({'token': token})}"


async def _close(view: RunView) -> None:
    view.close()
