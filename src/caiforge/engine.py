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
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Generic, Protocol, TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from .backends.base import Backend
from .errors import BadModelOutput, RateLimited, TransientError, Unreachable
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
    """What the summary and manifest report, per role (and per endpoint of a role)."""

    requests: Counter[str] = field(default_factory=Counter)  # sent
    retries: Counter[str] = field(default_factory=Counter)
    cached: Counter[str] = field(default_factory=Counter)  # answered from the store
    tokens: Counter[str] = field(default_factory=Counter)  # "<role>_prompt", "<role>_completion"
    failures: Counter[str] = field(default_factory=Counter)  # by "stage: reason" (filled by the runner)
    concurrency: dict[str, dict[str, int]] = field(default_factory=dict)  # where AIMD settled, summed per role
    endpoints: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # per role, each endpoint's figures

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": dict(self.requests),
            "retries": dict(self.retries),
            "cached": dict(self.cached),
            "tokens": dict(self.tokens),
            "failures": dict(self.failures),
            "concurrency": self.concurrency,
            "endpoints": self.endpoints,
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
    # Slow start's first window, doubled each round trip until a sign of congestion. The session starts
    # self-hosted servers at their ceiling and hosted APIs (a key) here: see session.endpoint_settings.
    start: int = 32
    failures_to_rest: int = 5  # errors in a row (5xx, timeouts) after which one of several endpoints is rested
    rest_base: float = 1.0  # the first rest, in seconds; doubled at each rest in a row
    rest_max: float = 30.0


class ReplyCache(Protocol):
    """Where finished requests are kept (the run's store)."""

    def get_reply(self, key: str) -> Reply | None: ...

    def put_reply(self, key: str, role: str, reply: Reply) -> None: ...


Endpoints = tuple[Backend, EndpointSettings] | Sequence[tuple[Backend, EndpointSettings]]


def _now() -> float:
    """The event loop's clock (monotonic), which asyncio.sleep keeps: rests are slept out on it."""
    return asyncio.get_running_loop().time()


class _Endpoint:
    """One server of a role: its own in-flight limit, pace and health, and the figures the manifest reports."""

    def __init__(self, backend: Backend, settings: EndpointSettings) -> None:
        self.backend, self.settings = backend, settings
        self.address = str(getattr(backend, "url", backend.kind))
        self.limiter = Limiter(settings.concurrency)
        self.aimd = Aimd(self.limiter, self.limiter.limit, start=settings.start) if settings.adaptive else None
        self.pacer = Pacer(settings.rpm)
        self.errors_in_row = 0
        self.rest_until = 0.0  # loop time before which no request is sent here
        self.rests_in_row = 0
        self.rests = 0
        self.sent = self.ok = self.errors = 0
        self.latency_total = self.latency_max = 0.0

    @property
    def outstanding(self) -> int:
        return self.limiter.in_flight + self.limiter.waiting

    def usable(self, now: float) -> bool:
        """Not resting; once a rest is over, one request at a time probes it until one succeeds."""
        return self.rest_until <= now and not (self.rests_in_row and self.limiter.in_flight)

    def succeeded(self, latency: float) -> None:
        self.ok += 1
        self.errors_in_row = self.rests_in_row = 0
        self.latency_total += latency
        self.latency_max = max(self.latency_max, latency)

    def failed(self, exc: TransientError, several: bool) -> None:
        """A refused connection rests the endpoint at once, a run of errors after ``failures_to_rest``; a 429
        is the server pacing us (the adaptive limit's business), not ill health. Only when the role has
        others to send to: a lone endpoint is waited for by the retries' backoff instead."""
        self.errors += 1
        if isinstance(exc, RateLimited):
            return
        self.errors_in_row += 1
        down = isinstance(exc, Unreachable) or self.errors_in_row >= self.settings.failures_to_rest
        if several and down and self.rest_until <= _now():
            self.rest()

    def rest(self) -> None:
        s = self.settings
        self.rest_until = _now() + min(s.rest_max, s.rest_base * 2**self.rests_in_row)
        self.rests_in_row += 1
        self.rests += 1
        self.errors_in_row = 0

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

    def figures(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "requests": self.sent,
            "ok": self.ok,
            "errors": self.errors,
            "rests": self.rests,
            "mean_latency_ms": round(1000 * self.latency_total / self.ok, 1) if self.ok else None,
            "max_latency_ms": round(1000 * self.latency_max, 1),
            "concurrency": self.report(),
        }


class _Role:
    """A role's endpoints, interchangeable (one identity, so one store key): each request goes to the usable
    endpoint with the fewest requests outstanding, and a retry may go to another."""

    def __init__(self, name: str, endpoints: list[_Endpoint], engine: Engine) -> None:
        self.name, self.endpoints = name, endpoints
        self.settings = endpoints[0].settings
        first = endpoints[0].backend
        self.identity = first.identity()
        for other in endpoints[1:]:
            if other.backend.identity() != self.identity:
                raise ValueError(f"the {name} endpoints differ in model or settings; a role's endpoints must agree")
        self.batcher: Batcher[tuple[Any, ...], Request, Reply | BadModelOutput] | None = None
        if first.capabilities.batch > 1:

            async def send(_: tuple[Any, ...], requests: list[Request]) -> list[Reply | BadModelOutput]:
                return await engine._call(self, requests)

            senders = sum(e.settings.concurrency for e in endpoints)
            self.batcher = Batcher(first.capabilities.batch, senders, self.settings.linger, send)

        def before_sleep(state: RetryCallState) -> None:
            engine.stats.retries[name] += 1

        # Built once: per-call callables would each be garbage in a cycle (measured: GC work doubled).
        self.retry_policy: dict[str, Any] = {
            "stop": partial(engine._stop, self.settings),
            "wait": partial(engine._wait, self),
            "retry": retry_if_exception_type(TransientError),
            "before_sleep": before_sleep,
            "reraise": True,
        }

    async def choose(self) -> _Endpoint:
        """The usable endpoint with the fewest outstanding requests; when all rest, wait for the first back."""
        while True:
            now = _now()
            best: _Endpoint | None = None
            for e in self.endpoints:
                if e.usable(now) and (best is None or e.outstanding < best.outstanding):
                    best = e
            if best is not None:
                return best
            back = min((e.rest_until for e in self.endpoints if e.rest_until > now), default=now)
            await asyncio.sleep(max(0.01, back - now))

    def any_usable(self) -> bool:
        now = _now()
        return any(e.usable(now) for e in self.endpoints)

    async def one(self, engine: Engine, request: Request) -> Reply | BadModelOutput:
        if self.batcher is not None:
            return await self.batcher.submit(request.batch_key(), request)
        results = await engine._call(self, [request])
        return results[0]


class Engine:
    def __init__(self, endpoints: Mapping[str, Endpoints], cache: ReplyCache, seed: int = 0) -> None:
        """``endpoints``: per role, one (backend, settings) or several interchangeable ones."""
        self.cache = cache
        self.stats = Stats()
        self._roles: dict[str, _Role] = {}
        for role, given in endpoints.items():
            pairs = [given] if isinstance(given, tuple) else list(given)
            if not pairs:
                raise ValueError(f"no endpoint for role {role!r}")
            self._roles[role] = _Role(role, [_Endpoint(b, s) for b, s in pairs], self)
        self._jitter = random.Random(seed)

    def identity(self, role: str) -> dict[str, Any]:
        return self._roles[role].identity

    def endpoints(self) -> dict[str, tuple[Backend, EndpointSettings]]:
        """Each role's first endpoint (they agree on everything but the address)."""
        return {role: (r.endpoints[0].backend, r.settings) for role, r in self._roles.items()}

    def capacity(self) -> int:
        """Requests that can be in flight at once over every endpoint (each batch counted by its size)."""
        return sum(
            e.settings.concurrency * e.backend.capabilities.batch for r in self._roles.values() for e in r.endpoints
        )

    def rest(self, backend: Backend) -> None:
        """Rest the endpoint served by ``backend`` (found down before the run began); a probe brings it back."""
        for r in self._roles.values():
            for e in r.endpoints:
                if e.backend is backend:
                    e.rest()

    def asker(self, role: str) -> Ask:
        """``ask`` bound to one role: what a pipeline is given."""
        if role not in self._roles:
            raise KeyError(f"no endpoint for role {role!r}")
        return partial(self.ask, role)

    async def ask(self, role: str, request: Request) -> Reply:
        """The reply to ``request`` from one of ``role``'s endpoints, or from the store when it was asked before.

        Raises BackendError when there is none: transient errors are retried first, and an unusable reply is
        asked again up to the endpoint's ``output_retries`` (a sampled answer may come out fine next time)."""
        r = self._roles[role]
        key = request.key(r.identity)
        stored = self.cache.get_reply(key)
        if stored is not None:
            self.stats.cached[role] += 1
            return stored
        result: Reply | BadModelOutput = BadModelOutput("no reply")
        for _ in range(r.settings.output_retries + 1):
            result = await r.one(self, request)
            if isinstance(result, Reply):
                break
        if isinstance(result, BadModelOutput):
            raise result
        self.cache.put_reply(key, role, result)
        self.stats.tokens[f"{role}_prompt"] += result.prompt_tokens or 0
        self.stats.tokens[f"{role}_completion"] += result.completion_tokens or 0
        return result

    # -- retries ----------------------------------------------------------------------------------------
    def _delay(self, settings: EndpointSettings, exc: BaseException | None, attempt: int) -> float:
        if isinstance(exc, RateLimited) and exc.retry_after is not None:
            return exc.retry_after + self._jitter.uniform(0, 0.1 * exc.retry_after + 0.05)
        ceiling = min(settings.backoff_max, settings.backoff_base * 2 ** (attempt - 1))
        return self._jitter.uniform(0, ceiling)  # full jitter

    @staticmethod
    def _give_up(settings: EndpointSettings, exc: BaseException | None, attempt: int) -> bool:
        """Errors get ``max_retries``; a 429 is the server pacing us, not a failure, so it gets three times as
        many (with backoff up to a minute, about an hour of waiting): a quota that never lifts still ends, as a
        recorded failure and, across many prompts, as a --max-failure-rate stop."""
        budget = settings.max_retries * (3 if isinstance(exc, RateLimited) else 1)
        return attempt > budget

    # tenacity numbers its attempts from 1, but runs from the second on (the first is bare): hence the + 1.
    def _wait(self, role: _Role, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        return self._retry_delay(role, exc, state.attempt_number + 1)

    def _stop(self, settings: EndpointSettings, state: RetryCallState) -> bool:
        exc = state.outcome.exception() if state.outcome else None
        return self._give_up(settings, exc, state.attempt_number + 1)

    def _retry_delay(self, role: _Role, exc: BaseException | None, attempt: int) -> float:
        """A refused connection is a down server, not a busy one: with another endpoint to go to, go now."""
        if isinstance(exc, Unreachable) and len(role.endpoints) > 1 and role.any_usable():
            return 0.0
        return self._delay(role.settings, exc, attempt)

    async def _once(self, role: _Role, requests: list[Request]) -> list[Reply | BadModelOutput]:
        """One call to the chosen endpoint, under its pace and limit."""
        endpoint = await role.choose()
        aimd = endpoint.aimd
        async with endpoint.limiter:
            await endpoint.pacer.wait()  # paced from the moment it may really start: no catch-up burst
            self.stats.requests[role.name] += 1
            endpoint.sent += 1
            started = time.monotonic()
            try:
                result = await endpoint.backend.send(requests)
            except TransientError as exc:
                endpoint.failed(exc, several=len(role.endpoints) > 1)
                if aimd and isinstance(exc, RateLimited):
                    aimd.on_rate_limited()
                raise
            latency = time.monotonic() - started
            endpoint.succeeded(latency)
            if aimd:
                aimd.on_success(latency)
            return result

    async def _call(self, role: _Role, requests: list[Request]) -> list[Reply | BadModelOutput]:
        """One call, retried on transient errors with backoff outside the limit (or at once elsewhere)."""
        try:  # the first attempt runs bare: tenacity's per-call set-up cost more than the request (profiled)
            return await self._once(role, requests)
        except TransientError as exc:
            if self._give_up(role.settings, exc, 1):
                raise
            self.stats.retries[role.name] += 1
            await asyncio.sleep(self._retry_delay(role, exc, 1))
        retrying = AsyncRetrying(**role.retry_policy)  # attempts 2 on; one per call: tenacity keeps state
        return await retrying(self._once, role, requests)

    async def aclose(self) -> None:
        """Cancel batches still in flight (on interrupt) and record where each endpoint's concurrency settled."""
        for r in self._roles.values():
            if r.batcher is not None:
                await r.batcher.aclose()
        self.stats.concurrency = {name: _summed([e.report() for e in r.endpoints]) for name, r in self._roles.items()}
        self.stats.endpoints = {name: [e.figures() for e in r.endpoints] for name, r in self._roles.items()}


def _summed(reports: list[dict[str, int]]) -> dict[str, int]:
    """One role's concurrency over its endpoints (the sum: what the role had in flight at most)."""
    if len(reports) == 1:
        return reports[0]
    return {k: sum(rep[k] for rep in reports) for k in reports[0]}
