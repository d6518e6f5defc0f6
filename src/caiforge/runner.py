"""Runs a per-item coroutine over every item: a bounded window in flight, every outcome handed on, and a stop
when the run is failing wholesale (a dead server, a wrong key) instead of burning the whole input.

Knows nothing about what the items are: a pipeline returns a record or raises :class:`StageFailed`; anything
else is a bug or an interrupt, and stops the run loudly.
"""

from __future__ import annotations

import asyncio
import collections
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Generic, TypeVar

from .errors import RunAborted, StageFailed

T = TypeVar("T")
R = TypeVar("R")


class FailureRate:
    """The share of failures among the last ``window`` items, once ``min(20, window)`` have finished."""

    def __init__(self, max_rate: float, window: int = 50) -> None:
        self.max_rate, self._outcomes = max_rate, collections.deque[bool](maxlen=window)
        self.failures: Counter[str] = Counter()  # "stage: reason"
        self._details: Counter[str] = Counter()  # the words of each failure, to quote the commonest on a stop

    def add(self, failure: StageFailed | None) -> None:
        if failure is not None:
            self.failures[f"{failure.stage}: {failure.reason}"] += 1
            self._details[str(failure)[:200]] += 1
        self._outcomes.append(failure is None or not failure.counts)
        failed, n = self._outcomes.count(False), len(self._outcomes)
        if n >= min(20, self._outcomes.maxlen or 20) and failed / n > self.max_rate:
            top = ", ".join(f"{reason} ({k})" for reason, k in self.failures.most_common(3))
            detail, times = self._details.most_common(1)[0]
            raise RunAborted(
                f"stopped: {failed} of the last {n} prompts failed, above --max-failure-rate "
                f"{self.max_rate:g}; most common: {top}; most common detail ({times}x): {detail}. "
                "Finished work is kept and every failure is in failures.jsonl: fix the cause, then "
                "Rerun the same command to continue."
            )


class Budget:
    """``--max-tokens`` / ``--max-cost``: checked as each item finishes, against the tokens the servers reported
    so far in this invocation; over it, the run stops as a failure-rate stop does (finished work kept)."""

    def __init__(
        self,
        spent: Callable[[], tuple[int, int]],
        max_tokens: int | None = None,
        max_cost: float | None = None,
        cost: Callable[[int, int], float | None] = lambda _in, _out: None,
    ) -> None:
        self.spent, self.max_tokens, self.max_cost, self.cost = spent, max_tokens, max_cost, cost
        self.done = 0

    def check(self) -> None:
        self.done += 1
        tokens_in, tokens_out = self.spent()
        tokens = tokens_in + tokens_out
        cost = self.cost(tokens_in, tokens_out)
        over = (self.max_tokens is not None and tokens >= self.max_tokens) or (
            self.max_cost is not None and cost is not None and cost >= self.max_cost
        )
        if over:
            spent = f"{tokens:,} tokens" + (f", ${cost:,.4f}" if cost is not None else "")
            limits = ", ".join(
                f for f in (
                    f"--max-tokens {self.max_tokens:,}" if self.max_tokens is not None else "",
                    f"--max-cost {self.max_cost:g}" if self.max_cost is not None else "",
                ) if f
            )  # fmt: skip
            raise RunAborted(
                f"stopped at the budget: {spent} used in this invocation ({limits}); {self.done} prompts finished "
                "in it. Finished work is kept: rerun the same command (each rerun has the budget anew) to continue."
            )


class Outcome(Generic[T, R]):
    __slots__ = ("failure", "item", "record")

    def __init__(self, item: T, record: R | None, failure: StageFailed | None) -> None:
        self.item, self.record, self.failure = item, record, failure


async def run_each(
    items: Iterable[T],
    work: Callable[[T], Awaitable[R]],
    on_outcome: Callable[[Outcome[T, R]], None],
    *,
    window: int,
    rate: FailureRate,
    budget: Budget | None = None,
) -> None:
    """Every item ends in ``on_outcome`` (a record or a failure) unless the run stops; at most ``window`` run at
    once, so memory stays bounded and a prompt's next request leaves as soon as its last one is answered."""
    slots = asyncio.Semaphore(window)
    tasks: set[asyncio.Task[None]] = set()
    crashed: list[BaseException] = []

    async def one(item: T) -> None:
        try:
            try:
                record = await work(item)
            except StageFailed as failure:
                on_outcome(Outcome(item, None, failure))
                rate.add(failure)
            else:
                on_outcome(Outcome(item, record, None))
                rate.add(None)
            if budget is not None:
                budget.check()
        finally:
            slots.release()

    def done(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            crashed.append(exc)  # a bug or RunAborted, not a bad response: stop, loudly

    try:
        for item in items:
            await slots.acquire()
            if crashed:
                raise crashed[0]
            task = asyncio.create_task(one(item))
            tasks.add(task)
            task.add_done_callback(done)
        await asyncio.gather(*list(tasks))
    finally:
        for task in list(tasks):
            task.cancel()
        if tasks:
            await asyncio.gather(*list(tasks), return_exceptions=True)
    if crashed:
        raise crashed[0]
