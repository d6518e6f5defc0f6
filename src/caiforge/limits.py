"""How many requests an endpoint gets, and how often: a concurrency limit that adapts, and a smooth pacer.

Hosted judges refuse load (NVIDIA's catalog: about 40 requests a minute, 429 without Retry-After) and local
servers slow down when overloaded. :class:`Limiter` is the in-flight cap; :class:`Aimd` moves it the way TCP
moves a congestion window: additive increase while requests succeed at a steady latency, multiplicative
decrease on a 429 or when latency climbs well above the best seen, at most once per round trip so a burst of
refusals from one window counts once. :class:`Pacer` spaces requests evenly for a requests-per-minute quota
(no bursts, so the quota is never hit in the first second of each minute).
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field


class Limiter:
    """An in-flight cap whose ``limit`` may change at any time; waiters are served first come, first served."""

    def __init__(self, limit: int) -> None:
        self._limit = max(1, limit)
        self.in_flight = 0
        self.peak = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def set_limit(self, limit: int) -> None:
        self._limit = max(1, limit)
        self._wake()

    async def acquire(self) -> None:
        if self.in_flight < self._limit and not self._waiters:
            self._grant()
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # granted, then cancelled before it could be used: hand the slot on
            elif future in self._waiters:  # _wake may have dropped it already
                self._waiters.remove(future)
            raise

    def release(self) -> None:
        self.in_flight -= 1
        self._wake()

    def _grant(self) -> None:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)

    def _wake(self) -> None:
        while self._waiters and self.in_flight < self._limit:
            future = self._waiters.popleft()
            if not future.done():
                self._grant()
                future.set_result(None)

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()


@dataclass
class Aimd:
    """Adapts a :class:`Limiter` between 1 and ``ceiling`` from what the server says.

    Latency is judged on averages, not single requests: an LLM's answer time varies tenfold with its length, so
    congestion means the short-run average (last ~5 requests) well above the long-run one (last ~50).
    """

    limiter: Limiter
    ceiling: int
    start: int = 4  # slow start: double per round trip from here until the first sign of congestion
    decrease: float = 0.5  # on 429
    latency_decrease: float = 0.8  # on latency climbing
    latency_factor: float = 2.0  # short-run average over long-run average that counts as climbing
    warmup: int = 20  # successes before latency is trusted
    window: float = 0.0
    short: float = 0.0
    long: float = 0.0
    samples: int = 0
    last_decrease: float = field(default=float("-inf"))
    decreases: int = 0
    lowest: int = 0
    slow_start: bool = True
    highest: int = 0

    def __post_init__(self) -> None:
        self.window = float(min(self.ceiling, self.start))
        self.limiter.set_limit(int(self.window))
        self.lowest = self.limiter.limit

    def _apply(self) -> None:
        limit = max(1, min(self.ceiling, int(self.window)))
        if limit != self.limiter.limit:
            self.limiter.set_limit(limit)
            self.lowest = min(self.lowest, limit)
            self.highest = max(self.highest, limit)

    def _cut(self, factor: float) -> None:
        now = time.monotonic()
        if now - self.last_decrease < max(self.short, 0.05):
            return  # one decrease per round trip: a burst of refusals from one window is one signal
        self.window = max(1.0, min(self.window, float(self.limiter.in_flight)) * factor)
        self.slow_start = False
        self.last_decrease = now
        self.decreases += 1
        self._apply()

    def on_success(self, latency: float) -> None:
        self.samples += 1
        if self.samples == 1:
            self.short = self.long = latency
        self.short += 0.2 * (latency - self.short)
        self.long += 0.02 * (latency - self.long)
        if self.samples > self.warmup and self.short > self.latency_factor * self.long:
            self._cut(self.latency_decrease)
            return
        if self.limiter.in_flight < self.limiter.limit:
            return  # the limit was not what held requests back: success below it says nothing about above it
        step = 1.0 if self.slow_start else 1.0 / max(1.0, self.window)  # x2 per round trip, then +1
        self.window = min(float(self.ceiling), self.window + step)
        self._apply()

    def on_rate_limited(self) -> None:
        self._cut(self.decrease)

    def report(self) -> dict[str, int]:
        return {
            "limit": self.limiter.limit,
            "highest": self.highest,
            "lowest": self.lowest,
            "ceiling": self.ceiling,
            "decreases": self.decreases,
            "peak_in_flight": self.limiter.peak,
        }


class Pacer:
    """At most ``rpm`` request starts a minute, evenly spaced; ``None`` means unpaced."""

    def __init__(self, rpm: float | None) -> None:
        self.interval = 60.0 / rpm if rpm else 0.0
        self._next = 0.0

    async def wait(self) -> None:
        if not self.interval:
            return
        now = asyncio.get_running_loop().time()  # the clock asyncio.sleep keeps (monotonic; virtual in tests)
        start = max(now, self._next)
        self._next = start + self.interval  # reserve the slot before sleeping: callers queue in order
        if start > now:
            await asyncio.sleep(start - now)
