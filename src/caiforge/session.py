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
from .errors import InputError, RunAborted
from .progress import Progress
from .store import Store

T = TypeVar("T")
# A run allocates a few dozen short-lived objects per request while hundreds of requests wait in flight, so
# CPython's default young-generation threshold (700) ran the collector ~1,400 times for 10,000 requests:
# 1.4 s of 7.6 s of CPU (bench/cpu_per_request.py). At 10,000 it runs ~30 times (0.4 s). Restored on exit.
GC_THRESHOLD = 10_000


def endpoint_settings(cfg: RunConfig, section: str, backend: Backend) -> EndpointSettings:
    """A role's endpoint settings from its config section (``policy``, ``judge``, ...)."""
    s = getattr(cfg, section)
    return EndpointSettings(
        concurrency=s.concurrency or backend.default_concurrency,
        rpm=s.rpm,
        adaptive=cfg.adaptive_concurrency,
        max_retries=cfg.max_retries,
        output_retries=s.output_retries,
        backoff_base=cfg.retry_backoff,
    )


def make_backends(cfg: RunConfig, roles: Mapping[str, str]) -> dict[str, Backend]:
    """Each role's backend, built from its config section (``roles``: role -> section)."""
    return {role: backends.make(cfg, section) for role, section in roles.items()}


def make_engine(cfg: RunConfig, roles: Mapping[str, str], made: Mapping[str, Backend], cache: ReplyCache) -> Engine:
    """The engine over ``made`` (from :func:`make_backends`), with each role's endpoint settings."""
    endpoints = {role: (b, endpoint_settings(cfg, roles[role], b)) for role, b in made.items()}
    return Engine(endpoints, cache, seed=cfg.seed)


async def check_endpoints(made: Mapping[str, Backend], quiet: bool) -> list[str]:
    """Every endpoint at once: one line per endpoint that cannot serve. Returns the notes worth keeping."""
    unique = list({id(b): b for b in made.values()}.values())
    results = await asyncio.gather(*(b.check() for b in unique), return_exceptions=True)
    problems: list[str] = []
    notes: list[str] = []
    for result in results:
        if isinstance(result, InputError):
            problems.append(str(result))
        elif isinstance(result, BaseException):
            raise result
        elif result:
            notes.append(result)
            if not quiet:
                print(f"caiforge: note: {result}", file=sys.stderr)
    if problems:
        raise InputError("\ncaiforge: error: ".join(problems))
    return notes


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
        self.backends: dict[str, Backend] = {}
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
            self.notes = await check_endpoints(self.backends, self.cfg.quiet)
            self._store = Store.open(self.cfg.output_dir, fresh=self._fresh)
            self._store.begin_attempt(self._attempt)
            self._engine = make_engine(self.cfg, self.roles, self.backends, self._store)
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
                for backend in {id(b): b for b in self.backends.values()}.values():
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
        for role, backend in self.backends.items():
            report[role], said = backend.adaptations()
            notes += said
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
