"""The request engine: it schedules requests to endpoints and knows nothing about what they are for.

Pipelines call one cached :meth:`Engine.ask` per request. Everything per endpoint lives here: the in-flight
limit (adaptive, TCP-style), the requests-per-minute pacer, dynamic batching for backends that take batches
(whose timer flushes the last partial batch, which the seed silently dropped), retries with backoff on
transient errors, and resends of unusable replies. Every reply is committed to the store before it is used,
keyed by the request's content and the endpoint's identity, so a rerun sends nothing that already finished.
Roles are names: any number of them, each an endpoint with its own settings.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Generic, Protocol, TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from .backends.base import Backend
from .errors import BadModelOutput, RateLimited, TransientError
from .limits import Aimd, Limiter, Pacer
from .request import Ask, Reply, Request

K = TypeVar("K")
T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[K, T, R]):
    """Dynamic batching: items wait in per-key queues; a free sender takes up to ``size`` of one key and sends.

    Batches are formed when a sender is free, not when items arrive, so under load the queues fill and
    batches are full; when idle, a partial batch leaves after ``linger`` seconds (never dropped). ``senders``
    bounds the batches in flight. Keys are never mixed in a batch (NeMo takes one temperature per request).
    """

    def __init__(self, size: int, senders: int, linger: float, run: Callable[[K, list[T]], Awaitable[list[R]]]):
        self._size, self._senders, self._linger, self._run = size, senders, linger, run
        self._queues: dict[K, list[tuple[T, asyncio.Future[R]]]] = {}
        self._active: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None

    async def submit(self, key: K, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(key, []).append((item, future))
        if len(self._queues[key]) >= self._size:
            self._start_sender()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._linger, self._on_timer)
        return await future

    def _on_timer(self) -> None:
        self._timer = None
        if any(self._queues.values()):
            self._start_sender()

    def _start_sender(self) -> None:
        if len(self._active) < self._senders:
            task = asyncio.get_running_loop().create_task(self._sender())
            self._active.add(task)
            task.add_done_callback(self._active.discard)

    def _take(self) -> tuple[K, list[tuple[T, asyncio.Future[R]]]] | None:
        """The fullest queue's first ``size`` items (oldest first within it)."""
        queues = [(len(q), k) for k, q in self._queues.items() if q]
        if not queues:
            return None
        _, key = max(queues, key=lambda lk: lk[0])
        queue = self._queues[key]
        batch, self._queues[key] = queue[: self._size], queue[self._size :]
        return key, batch

    async def _sender(self) -> None:
        while (taken := self._take()) is not None:
            key, batch = taken
            try:
                results = await self._run(key, [item for item, _ in batch])
            except Exception as exc:  # handed to every waiter, who decides; nothing is swallowed
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            except BaseException:
                for _, future in batch:
                    future.cancel()
                raise
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)

    async def aclose(self) -> None:
        """Cancel batches still in flight (on interrupt); their waiters are cancelled with them."""
        if self._timer is not None:
            self._timer.cancel()
        for task in list(self._active):
            task.cancel()
        if self._active:
            await asyncio.gather(*list(self._active), return_exceptions=True)


@dataclass
class Stats:
    """What the summary and manifest report, per role."""

    requests: Counter[str] = field(default_factory=Counter)  # sent
    retries: Counter[str] = field(default_factory=Counter)
    cached: Counter[str] = field(default_factory=Counter)  # answered from the store
    tokens: Counter[str] = field(default_factory=Counter)  # "<role>_prompt", "<role>_completion"
    failures: Counter[str] = field(default_factory=Counter)  # by "stage: reason" (filled by the runner)
    concurrency: dict[str, dict[str, int]] = field(default_factory=dict)  # where AIMD settled

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": dict(self.requests),
            "retries": dict(self.retries),
            "cached": dict(self.cached),
            "tokens": dict(self.tokens),
            "failures": dict(self.failures),
            "concurrency": self.concurrency,
        }


@dataclass(frozen=True, kw_only=True)
class EndpointSettings:
    concurrency: int
    rpm: float | None = None
    adaptive: bool = True
    max_retries: int = 8  # transient errors; x3 for 429
    output_retries: int = 0  # resends of a request whose reply came back unusable
    backoff_base: float = 0.5
    backoff_max: float = 60.0
    linger: float = 0.02  # how long a partial batch waits for company


class ReplyCache(Protocol):
    """Where finished requests are kept (the run's store)."""

    def get_reply(self, key: str) -> Reply | None: ...

    def put_reply(self, key: str, role: str, reply: Reply) -> None: ...


class _Endpoint:
    def __init__(self, role: str, backend: Backend, settings: EndpointSettings, engine: Engine) -> None:
        self.role, self.backend, self.settings = role, backend, settings
        self.identity = backend.identity()
        self.limiter = Limiter(settings.concurrency)
        self.aimd = Aimd(self.limiter, self.limiter.limit) if settings.adaptive else None
        self.pacer = Pacer(settings.rpm)
        self.batcher: Batcher[tuple[Any, ...], Request, Reply | BadModelOutput] | None = None
        if backend.capabilities.batch > 1:

            async def send(_: tuple[Any, ...], requests: list[Request]) -> list[Reply | BadModelOutput]:
                return await engine._call(self, partial(backend.send, requests))

            self.batcher = Batcher(backend.capabilities.batch, settings.concurrency, settings.linger, send)

        def before_sleep(state: RetryCallState) -> None:
            engine.stats.retries[role] += 1

        # Built once: per-call callables would each be garbage in a cycle (measured: GC work doubled).
        self.retry_policy: dict[str, Any] = {
            "stop": partial(engine._stop, settings),
            "wait": partial(engine._wait, settings),
            "retry": retry_if_exception_type(TransientError),
            "before_sleep": before_sleep,
            "reraise": True,
        }

    async def one(self, engine: Engine, request: Request) -> Reply | BadModelOutput:
        if self.batcher is not None:
            return await self.batcher.submit(request.batch_key(), request)
        results = await engine._call(self, partial(self.backend.send, [request]))
        return results[0]

    def report(self) -> dict[str, int]:
        if self.aimd is not None:
            return self.aimd.report()
        lim = self.limiter.limit
        return {
            "limit": lim,
            "highest": lim,
            "lowest": lim,
            "ceiling": lim,
            "decreases": 0,
            "peak_in_flight": self.limiter.peak,
        }


class Engine:
    def __init__(
        self, endpoints: Mapping[str, tuple[Backend, EndpointSettings]], cache: ReplyCache, seed: int = 0
    ) -> None:
        self.cache = cache
        self.stats = Stats()
        self._endpoints = {role: _Endpoint(role, b, s, self) for role, (b, s) in endpoints.items()}
        self._jitter = random.Random(seed)

    def identity(self, role: str) -> dict[str, Any]:
        return self._endpoints[role].identity

    def endpoints(self) -> dict[str, tuple[Backend, EndpointSettings]]:
        return {role: (e.backend, e.settings) for role, e in self._endpoints.items()}

    def asker(self, role: str) -> Ask:
        """``ask`` bound to one role: what a pipeline is given."""
        if role not in self._endpoints:
            raise KeyError(f"no endpoint for role {role!r}")
        return partial(self.ask, role)

    async def ask(self, role: str, request: Request) -> Reply:
        """The reply to ``request`` from ``role``'s endpoint, or from the store when it was asked before.

        Raises BackendError when there is none: transient errors are retried first, and an unusable reply is
        asked again up to the endpoint's ``output_retries`` (a sampled answer may come out fine next time)."""
        endpoint = self._endpoints[role]
        key = request.key(endpoint.identity)
        stored = self.cache.get_reply(key)
        if stored is not None:
            self.stats.cached[role] += 1
            return stored
        result: Reply | BadModelOutput = BadModelOutput("no reply")
        for _ in range(endpoint.settings.output_retries + 1):
            result = await endpoint.one(self, request)
            if isinstance(result, Reply):
                break
        if isinstance(result, BadModelOutput):
            raise result
        self.cache.put_reply(key, role, result)
        self.stats.tokens[f"{role}_prompt"] += result.prompt_tokens or 0
        self.stats.tokens[f"{role}_completion"] += result.completion_tokens or 0
        return result

    # -- retries ----------------------------------------------------------------------------------------
    def _wait(self, settings: EndpointSettings, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, RateLimited) and exc.retry_after is not None:
            return exc.retry_after + self._jitter.uniform(0, 0.1 * exc.retry_after + 0.05)
        ceiling = min(settings.backoff_max, settings.backoff_base * 2 ** (state.attempt_number - 1))
        return self._jitter.uniform(0, ceiling)  # full jitter

    @staticmethod
    def _stop(settings: EndpointSettings, state: RetryCallState) -> bool:
        """Errors get ``max_retries``; a 429 is the server pacing us, not a failure, so it gets three times as
        many (with backoff up to a minute, about an hour of waiting): a quota that never lifts still ends, as a
        recorded failure and, across many prompts, as a --max-failure-rate stop."""
        exc = state.outcome.exception() if state.outcome else None
        budget = settings.max_retries * (3 if isinstance(exc, RateLimited) else 1)
        return state.attempt_number > budget

    async def _call(self, endpoint: _Endpoint, fn: Callable[[], Awaitable[R]]) -> R:
        """One call under the endpoint's pace and limit, retried on transient errors with backoff outside it."""
        role, limiter, aimd, pacer = endpoint.role, endpoint.limiter, endpoint.aimd, endpoint.pacer

        async def once() -> R:
            async with limiter:
                await pacer.wait()  # paced from the moment it may really start: no catch-up burst
                self.stats.requests[role] += 1
                started = time.monotonic()
                try:
                    result = await fn()
                except RateLimited:
                    if aimd:
                        aimd.on_rate_limited()
                    raise
                if aimd:
                    aimd.on_success(time.monotonic() - started)
                return result

        retrying = AsyncRetrying(**endpoint.retry_policy)  # one per call: tenacity keeps per-call state
        return await retrying(once)

    async def aclose(self) -> None:
        """Cancel batches still in flight (on interrupt) and record where each endpoint's concurrency settled."""
        for endpoint in self._endpoints.values():
            if endpoint.batcher is not None:
                await endpoint.batcher.aclose()
        self.stats.concurrency = {role: e.report() for role, e in self._endpoints.items()}
