"""The one concurrency engine: it owns tasks, limits, batching, retries and the durable record.

Each prompt is a coroutine: its candidates are requested at every temperature, and as soon as they exist it
goes to the judge (no stage barrier). Requests wait on a per-endpoint :class:`Limiter`; NeMo-style backends
that take batches get per-prompt requests grouped by a :class:`Batcher`, whose timer flushes the last partial
batch (the seed silently dropped it). Every finished request is committed to the store before it is used, so
a rerun with the same settings sends nothing that already finished.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from .backends import Completion, JudgeBackend, PolicyBackend
from .candidates import generation_key
from .errors import BackendError, BadModelOutput, RateLimited, RunAborted, TransientError
from .judge import CopiedDecision
from .keys import content_key
from .limits import Aimd, Limiter, Pacer
from .progress import Progress
from .store import Failure, Generation, Store
from .verdicts import Inconsistent, JudgeSpec, TooFewCandidates, Verdict, decide, verdict_key

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
    """What the summary and manifest report."""

    requests: Counter[str] = field(default_factory=Counter)  # sent, per role
    retries: Counter[str] = field(default_factory=Counter)
    cached: Counter[str] = field(default_factory=Counter)  # answered from the store
    tokens: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)  # by "stage: reason"
    concurrency: dict[str, dict[str, int]] = field(default_factory=dict)  # per role: where AIMD settled

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": dict(self.requests),
            "retries": dict(self.retries),
            "cached": dict(self.cached),
            "tokens": dict(self.tokens),
            "failures": dict(self.failures),
            "concurrency": self.concurrency,
        }


@dataclass(frozen=True)
class EngineSettings:
    temperatures: tuple[float, ...]
    judge: JudgeSpec | None
    seed: int
    max_retries: int
    parse_retries: int
    policy_concurrency: int
    judge_concurrency: int
    policy_rpm: float | None = None
    judge_rpm: float | None = None
    adaptive: bool = True
    max_failure_rate: float = 1.0
    failure_window: int = 50  # the rate is over the last this many prompts, once at least 20 finished
    linger: float = 0.02
    backoff_base: float = 0.5
    backoff_max: float = 60.0


class Engine:
    def __init__(
        self,
        policy: PolicyBackend | None,
        judge: JudgeBackend | None,
        store: Store,
        settings: EngineSettings,
        progress: Progress | None = None,
    ) -> None:
        self.policy, self.judge, self.store, self.s = policy, judge, store, settings
        self.progress = progress or Progress({}, quiet=True)
        self.stats = Stats()
        self.limiters = {"policy": Limiter(settings.policy_concurrency), "judge": Limiter(settings.judge_concurrency)}
        self.aimd = {role: Aimd(lim, lim.limit) for role, lim in self.limiters.items()} if settings.adaptive else {}
        self.pacers = {"policy": Pacer(settings.policy_rpm), "judge": Pacer(settings.judge_rpm)}
        self._outcomes: collections.deque[bool] = collections.deque(maxlen=settings.failure_window)
        self._details: Counter[str] = Counter()  # the words of each failure, to quote the commonest on a stop
        self.policy_identity = policy.identity() if policy else {}
        self.judge_identity = judge.identity() if judge else {}
        self._batcher: Batcher[float, str, Completion | BadModelOutput] | None = None
        if policy is not None:

            async def send(temperature: float, prompts: list[str]) -> list[Completion | BadModelOutput]:
                return await self._call("policy", lambda: policy.generate(prompts, temperature))

            self._batcher = Batcher(policy.max_batch_size, settings.policy_concurrency, settings.linger, send)
        self._jitter = random.Random(settings.seed)

    # -- retries ----------------------------------------------------------------------------------------
    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, RateLimited) and exc.retry_after is not None:
            return exc.retry_after + self._jitter.uniform(0, 0.1 * exc.retry_after + 0.05)
        ceiling = min(self.s.backoff_max, self.s.backoff_base * 2 ** (state.attempt_number - 1))
        return self._jitter.uniform(0, ceiling)  # full jitter

    def _stop(self, state: RetryCallState) -> bool:
        """Errors get ``max_retries``; a 429 is the server pacing us, not a failure, so it gets three times as
        many (with backoff up to a minute, about an hour of waiting): a quota that never lifts still ends, as a
        recorded failure and, across many prompts, as a --max-failure-rate stop."""
        exc = state.outcome.exception() if state.outcome else None
        budget = self.s.max_retries * (3 if isinstance(exc, RateLimited) else 1)
        return state.attempt_number > budget

    async def _call(self, role: str, fn: Callable[[], Awaitable[R]]) -> R:
        """One request under the endpoint's pace and limit, retried on transient errors with backoff outside it."""
        limiter, aimd, pacer = self.limiters[role], self.aimd.get(role), self.pacers[role]

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

        def before_sleep(state: RetryCallState) -> None:
            self.stats.retries[role] += 1

        retrying = AsyncRetrying(
            stop=self._stop,
            wait=self._wait,
            retry=retry_if_exception_type(TransientError),
            before_sleep=before_sleep,
            reraise=True,
        )
        return await retrying(once)

    # -- candidates -------------------------------------------------------------------------------------
    async def generate(self, prompt: str, temperature: float) -> str:
        """One candidate, from the store when it was made before; raises BackendError when it cannot be."""
        key = generation_key(prompt, temperature, self.policy_identity)
        stored = self.store.get_generation(key)
        if stored is not None:
            self.stats.cached["policy"] += 1
            self.progress.advance("candidates")
            return stored.response
        result: Completion | BadModelOutput | None = None
        for _ in range(self.s.parse_retries + 1):
            assert self._batcher is not None
            result = await self._batcher.submit(temperature, prompt)
            if isinstance(result, Completion):
                break
        if not isinstance(result, Completion):
            raise result or BadModelOutput("no result")
        self.store.put_generation(
            key, prompt, temperature, Generation(result.text, result.prompt_tokens, result.completion_tokens)
        )
        self._count_tokens("policy", result)
        self.progress.advance("candidates")
        return result.text

    # -- judge ------------------------------------------------------------------------------------------
    async def ask_judge(
        self,
        messages: list[dict[str, str]],
        *,
        seed: int,
        schema: dict[str, Any] | None,
        logprobs: bool,
        max_tokens: int | None,
    ) -> Completion:
        """One judge request, answered from the store when it was made before (replies are kept raw)."""
        judge = self.judge
        assert judge is not None
        key = content_key(
            "judge-call",
            messages=messages,
            judge=self.judge_identity,
            seed=seed,
            schema=schema,
            logprobs=logprobs,
            max_tokens=max_tokens,
        )
        stored = self.store.get_call(key)
        if stored is not None:
            self.stats.cached["judge"] += 1
            return Completion(stored[0], stored[2], stored[3], stored[1])
        reply = await self._call(
            "judge", lambda: judge.chat(messages, seed=seed, schema=schema, logprobs=logprobs, max_tokens=max_tokens)
        )
        self.store.put_call(key, reply.text, reply.top_logprobs, reply.prompt_tokens, reply.completion_tokens)
        self._count_tokens("judge", reply)
        return reply

    async def verdict(self, prompt: str, candidates: list[str]) -> Verdict:
        """The judge's verdict on one prompt's candidates; raises BackendError when there is none."""
        spec = self.s.judge
        assert spec is not None
        key = verdict_key(prompt, candidates, spec, self.judge_identity)
        stored = self.store.get_verdict(key)
        if stored is not None:
            return Verdict.from_json(stored)
        verdict = await decide(self.ask_judge, spec, prompt, candidates)
        self.store.put_verdict(key, prompt, verdict.to_json())
        return verdict

    def _concurrency(self, role: str) -> dict[str, int]:
        if role in self.aimd:
            return self.aimd[role].report()
        lim = self.limiters[role]
        return {
            "limit": lim.limit,
            "highest": lim.limit,
            "lowest": lim.limit,
            "ceiling": lim.limit,
            "decreases": 0,
            "peak_in_flight": lim.peak,
        }

    def _count_tokens(self, role: str, completion: Completion) -> None:
        self.stats.tokens[f"{role}_prompt"] += completion.prompt_tokens or 0
        self.stats.tokens[f"{role}_completion"] += completion.completion_tokens or 0

    # -- prompts ----------------------------------------------------------------------------------------
    def _fail(self, prompt: str, stage: str, exc: BackendError) -> None:
        self.store.put_failure(Failure(prompt, stage, exc.reason, str(exc)))
        self.stats.failures[f"{stage}: {exc.reason}"] += 1
        self._details[str(exc)[:200]] += 1
        # Labels the judge could not stand behind say something about the data, not about a broken run.
        self._outcome(isinstance(exc, (Inconsistent, TooFewCandidates, CopiedDecision)))

    def _outcome(self, ok: bool) -> None:
        """Stop a run that is failing wholesale (a dead server, a wrong key) instead of burning the input."""
        self._outcomes.append(ok)
        failed = self._outcomes.count(False)
        if len(self._outcomes) >= min(20, self.s.failure_window) and failed / len(self._outcomes) > (
            self.s.max_failure_rate
        ):
            top = ", ".join(f"{reason} ({n})" for reason, n in self.stats.failures.most_common(3))
            detail, times = self._details.most_common(1)[0]
            raise RunAborted(
                f"stopped: {failed} of the last {len(self._outcomes)} prompts failed, above --max-failure-rate "
                f"{self.s.max_failure_rate:g}; most common: {top}; most common detail ({times}x): {detail}. "
                "Finished work is kept and every failure is in failures.jsonl: fix the cause, then "
                "Rerun the same command to continue."
            )

    async def _process(self, prompt: str) -> None:
        results = await asyncio.gather(*(self.generate(prompt, t) for t in self.s.temperatures), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, BackendError):
                raise result
        errors = [r for r in results if isinstance(r, BackendError)]
        if errors:
            self.progress.advance("judge")
            self._fail(prompt, "candidates", errors[0])
            return
        try:
            await self.verdict(prompt, [str(r) for r in results])
        except BackendError as exc:
            self.progress.advance("judge")
            self._fail(prompt, "candidates" if isinstance(exc, TooFewCandidates) else "judge", exc)
            return
        self.progress.advance("judge")
        self._outcome(True)

    async def run(self, prompts: list[str]) -> Stats:
        """Process every prompt; each ends in the store as a judgment or a recorded failure."""
        batch = self.policy.max_batch_size if self.policy else 1
        window = asyncio.Semaphore(self.s.policy_concurrency * batch + 2 * self.s.judge_concurrency)

        async def guarded(prompt: str) -> None:
            try:
                await self._process(prompt)
            finally:
                window.release()

        tasks: set[asyncio.Task[None]] = set()
        crashed: list[BaseException] = []

        def done(task: asyncio.Task[None]) -> None:
            tasks.discard(task)
            if not task.cancelled() and task.exception() is not None:
                crashed.append(task.exception())  # a bug or RunAborted, not a bad response: stop, loudly

        try:
            for prompt in prompts:
                await window.acquire()
                if crashed:
                    raise crashed[0]
                task = asyncio.create_task(guarded(prompt))
                tasks.add(task)
                task.add_done_callback(done)
            await asyncio.gather(*list(tasks))
        finally:
            for task in list(tasks):
                task.cancel()
            if tasks:
                await asyncio.gather(*list(tasks), return_exceptions=True)
            if self._batcher is not None:
                await self._batcher.aclose()
            self.stats.concurrency = {role: self._concurrency(role) for role in self.limiters}
        if crashed:
            raise crashed[0]
        return self.stats
