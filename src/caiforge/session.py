"""One lifecycle for every command that sends requests (``run``, ``eval-judge``, and those to come).

A :class:`Session` makes each role's backend, checks every endpoint before the first real request, takes the
output folder's lock and store, records the attempt, builds the engine and the progress bars, and on every
path out (success, failure, Ctrl-C, SIGTERM, a refused lock) closes what it opened, in reverse. :func:`run_sync`
is the synchronous edge: ``asyncio.run`` once, SIGTERM and Ctrl-C turned into a clean, resumable stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from . import backends
from .backends import Backend
from .config import RunConfig
from .engine import EndpointSettings, Engine, ReplyCache
from .errors import InputError, RunAborted, Unreachable
from .progress import Progress
from .store import COMMIT_INTERVAL, Store

T = TypeVar("T")
# A run allocates a few dozen short-lived objects per request while hundreds of requests wait in flight, so
# CPython's default young-generation threshold (700) ran the collector ~1,400 times for 10,000 requests:
# 1.4 s of 7.6 s of CPU (bench/cpu_per_request.py). At 10,000 it runs ~30 times (0.4 s). Restored on exit.
GC_THRESHOLD = 10_000


def endpoint_settings(cfg: RunConfig, section: str, backend: Backend) -> EndpointSettings:
    """A role's endpoint settings from its config section (``policy``, ``judge``, ...).

    Slow start only for hosted APIs (a key is set): they refuse what is over their quota, while a self-hosted
    server (vLLM, NeMo, TGI) queues what it cannot serve at once, so the first round trip may fill the ceiling.
    Measured (bench/startup.py, 128 prompts at 200 ms): from 32, the requests took 1.3 s; from the ceiling,
    0.8 s. A 429 still halves the window either way."""
    s = getattr(cfg, section)
    concurrency = s.concurrency or backend.default_concurrency
    hosted = getattr(s, "api_key", None) is not None
    return EndpointSettings(
        concurrency=concurrency,
        start=EndpointSettings.start if hosted else concurrency,
        rpm=s.rpm,
        adaptive=cfg.adaptive_concurrency,
        max_retries=cfg.max_retries,
        output_retries=s.output_retries,
        backoff_base=cfg.retry_backoff,
    )


def make_backends(cfg: RunConfig, roles: Mapping[str, str]) -> dict[str, list[Backend]]:
    """Each role's backends, one per endpoint, built from its config section (``roles``: role -> section)."""
    return {role: backends.make_all(cfg, section) for role, section in roles.items()}


def make_engine(
    cfg: RunConfig, roles: Mapping[str, str], made: Mapping[str, list[Backend]], cache: ReplyCache
) -> Engine:
    """The engine over ``made`` (from :func:`make_backends`), with each endpoint's settings."""
    endpoints = {role: [(b, endpoint_settings(cfg, roles[role], b)) for b in bs] for role, bs in made.items()}
    return Engine(endpoints, cache, seed=cfg.seed)


async def check_endpoints(made: Mapping[str, list[Backend]], quiet: bool) -> tuple[list[str], list[Backend]]:
    """Every endpoint at once: one line per endpoint that cannot serve. Returns the notes worth keeping, and
    the endpoints that were unreachable while another of their role answered: those start rested (a replica
    still starting, or down for now), and the run goes on without them until a probe finds them back."""
    unique = list({id(b): b for bs in made.values() for b in bs}.values())
    checked = await asyncio.gather(*(b.check() for b in unique), return_exceptions=True)
    results = {id(b): result for b, result in zip(unique, checked, strict=True)}
    problems: list[str] = []
    notes: list[str] = []
    down: list[Backend] = []
    for bs in made.values():
        answered = [b for b in bs if not isinstance(results[id(b)], BaseException)]
        for b in bs:
            result = results[id(b)]
            if isinstance(result, InputError):
                if answered and isinstance(result.__cause__, Unreachable):
                    down.append(b)
                    notes.append(f"{result}; going on with the other {len(answered)} endpoint(s) and trying it again")
                elif str(result) not in problems:
                    problems.append(str(result))
            elif isinstance(result, BaseException):
                raise result
            elif result and result not in notes:
                notes.append(result)
    if problems:
        raise InputError("\ncaiforge: error: ".join(problems))
    if not quiet:
        for note in notes:
            print(f"caiforge: note: {note}", file=sys.stderr)
    return notes, down


class Session:
    """``async with Session(cfg, roles, totals, attempt) as s:`` then ``s.engine``, ``s.store``, ``s.progress``;
    call :meth:`finish` when the work is done, or the attempt is recorded as interrupted."""

    def __init__(
        self,
        cfg: RunConfig,
        roles: Mapping[str, str],
        attempt: dict[str, Any],
        fresh: bool = False,
    ) -> None:
        self.cfg, self.roles, self._attempt, self._fresh = cfg, dict(roles), attempt, fresh
        self.backends: dict[str, list[Backend]] = {}
        self.notes: list[str] = []
        self.status = "interrupted"
        self._store: Store | None = None
        self._engine: Engine | None = None
        self.progress = Progress({}, quiet=True)

    @property
    def store(self) -> Store:
        assert self._store is not None, "the session is not open"
        return self._store

    @property
    def engine(self) -> Engine:
        assert self._engine is not None, "the session is not open"
        return self._engine

    def show_progress(self, totals: dict[str, int]) -> None:
        self.progress.close()
        self.progress = Progress(totals, quiet=self.cfg.quiet)

    def finish(self) -> None:
        self.status = "finished"

    async def __aenter__(self) -> Session:
        try:
            self.backends = make_backends(self.cfg, self.roles)
            self.notes, down = await check_endpoints(self.backends, self.cfg.quiet)
            self._store = Store.open(self.cfg.output_dir, fresh=self._fresh)
            self._store.begin_attempt(self._attempt)
            loop = asyncio.get_running_loop()
            store = self._store
            store.commit_interval = COMMIT_INTERVAL  # replies and results in one transaction per interval

            def commit_soon() -> None:
                loop.call_later(COMMIT_INTERVAL, store.commit)

            store.on_dirty = commit_soon
            self._engine = make_engine(self.cfg, self.roles, self.backends, self._store)
            for backend in down:
                self._engine.rest(backend)
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        """In reverse of opening; each step in a ``finally`` so one failing step never skips the next."""
        try:
            try:
                self.progress.close()
                if self._engine is not None:
                    await self._engine.aclose()
            finally:
                for backend in {id(b): b for bs in self.backends.values() for b in bs}.values():
                    await backend.aclose()
        finally:
            if self._store is not None:
                stats = self._engine.stats.as_dict() if self._engine is not None else {}
                if self._store.attempt is not None:
                    self._store.end_attempt(self.status, stats)
                self._store.close()

    def adaptations(self) -> tuple[dict[str, Any], list[str]]:
        """What each endpoint turned out to need, for the manifest, and the sentences that say so."""
        report: dict[str, Any] = {}
        notes: list[str] = []
        for role, made in self.backends.items():
            reports = []
            for backend in made:
                found, said = backend.adaptations()
                reports.append(found)
                notes += said
            report[role] = reports[0] if len(reports) == 1 else reports
        return report, notes


def run_sync(main: Callable[[], Awaitable[T]], output_dir: Path, what: str = "finished requests") -> T:
    """``asyncio.run`` once; SIGTERM and Ctrl-C stop cleanly and keep everything finished so far."""

    async def guarded() -> T:
        task = asyncio.current_task()
        assert task is not None
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread: no signals
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await main()

    thresholds = gc.get_threshold()
    gc.freeze()  # what is loaded by now (modules, the config) lives for the whole run: never scan it again
    gc.set_threshold(GC_THRESHOLD, *thresholds[1:])
    try:
        return asyncio.run(guarded())
    except (KeyboardInterrupt, asyncio.CancelledError) as exc:
        raise RunAborted(
            f"interrupted; {what} are saved in {output_dir / 'caiforge.db'}. "
            "Rerun the same command to continue where it stopped."
        ) from exc
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()
