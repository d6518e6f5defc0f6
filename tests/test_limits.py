"""The request-rate machinery on its own: the limiter, AIMD and the pacer, with no server."""

from __future__ import annotations

import asyncio
import time

import pytest

import virtual_clock
from caiforge.limits import Aimd, Limiter, Pacer


def test_limiter_serves_first_come_first_served_and_its_limit_can_change():
    async def main() -> list[int]:
        limiter, order = Limiter(1), []

        async def job(i: int) -> None:
            async with limiter:
                order.append(i)
                await asyncio.sleep(0.01)

        await asyncio.gather(*(job(i) for i in range(5)))
        limiter.set_limit(3)
        assert limiter.limit == 3 and limiter.peak == 1
        return order

    assert asyncio.run(main()) == [0, 1, 2, 3, 4]


def test_a_cancelled_waiter_raises_cancelled_even_when_woken_in_the_same_turn():
    async def main() -> None:
        limiter = Limiter(1)
        await limiter.acquire()
        waiter = asyncio.ensure_future(limiter.acquire())
        await asyncio.sleep(0)
        waiter.cancel()
        limiter.release()  # wakes (and so removes) the cancelled waiter in the same turn
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await asyncio.wait_for(limiter.acquire(), 1)  # the slot was not lost
        assert limiter.in_flight == 1

    asyncio.run(main())


def test_aimd_halves_on_429_once_per_round_trip_and_climbs_back(monkeypatch):
    monkeypatch.setattr("caiforge.limits.time.monotonic", lambda: 1000.0)  # one instant: the burst is one signal
    limiter = Limiter(32)
    aimd = Aimd(limiter, ceiling=32)
    assert limiter.limit == 4  # slow start
    for _ in range(40):
        aimd.on_success(0.01)
    assert limiter.limit == 4  # successes below the limit do not raise it
    for _ in range(40):
        limiter.in_flight = limiter.limit  # the limit is what holds requests back
        aimd.on_success(0.01)
    assert limiter.limit == 32  # doubled per round trip up to the ceiling
    limiter.in_flight = 32
    aimd.on_rate_limited()
    aimd.on_rate_limited()  # the same burst: counted once
    assert limiter.limit == 16 and aimd.decreases == 1
    for _ in range(18):
        limiter.in_flight = limiter.limit
        aimd.on_success(0.01)
    assert limiter.limit == 17  # additive now: about +1 per window (16) of successes


def test_aimd_backs_off_when_latency_climbs():
    limiter = Limiter(16)
    aimd = Aimd(limiter, ceiling=16, start=16)
    for _ in range(40):
        aimd.on_success(0.1)
    limiter.in_flight = 16
    for _ in range(10):
        aimd.on_success(1.0)  # ten times slower than the long-run average
        time.sleep(0.06)
    assert aimd.decreases >= 1 and limiter.limit < 16


def test_pacer_spaces_requests_that_waited_behind_the_limiter():
    """Pace from when a request may really start: the ones queued behind a slow call must not burst.

    On a virtual clock the times are exact whatever the machine is doing: the first call holds the only slot
    for 0.5 s; the others then start one pacing interval (0.1 s at 600/min) apart, not all at once at 0.5.
    """

    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        limiter, pacer, starts = Limiter(1), Pacer(rpm=600), []

        async def job(i: int) -> None:
            async with limiter:
                await pacer.wait()
                starts.append(loop.time())
                await asyncio.sleep(0.5 if i == 0 else 0.0)

        await asyncio.gather(*(job(i) for i in range(5)))
        return starts

    assert virtual_clock.run(main()) == pytest.approx([0.0, 0.5, 0.6, 0.7, 0.8])


def test_pacer_without_a_limit_spaces_a_burst_evenly():
    async def main() -> list[float]:
        loop, pacer, starts = asyncio.get_running_loop(), Pacer(rpm=120), []

        async def job() -> None:
            await pacer.wait()
            starts.append(loop.time())

        await asyncio.gather(*(job() for _ in range(4)))
        return starts

    assert virtual_clock.run(main()) == pytest.approx([0.0, 0.5, 1.0, 1.5])
