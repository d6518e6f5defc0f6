"""``--engine ray``: the same RL-CAI pipeline, sharded over a Ray cluster, for runs that outgrow one machine.

The prompts become a Ray Dataset; ``map_batches`` hands blocks of them to a fixed pool of actors
(``ActorPoolStrategy``). Each actor builds the backends and the engine exactly as a local run does
(:func:`session.make_backends`, :func:`session.make_engine`) and drives its batch through the same async core
(:func:`runner.run_each` over :class:`rlcai.RlCai`), so a seed gives the same dataset on either engine. Actors
hold no store: each batch comes back with its outcomes, the replies it obtained and its stats, and the driver
commits them to the run's store as they arrive, so resume, export and the report work unchanged.

Ray costs seconds of start-up and about a gigabyte, so it is never the default, and ``ray`` is imported here
only (it is the optional extra ``caiforge[ray]``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import math
import pickle
import signal
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.data
from ray.util.debug import log_once

from . import session
from .backends import Backend
from .config import RunConfig
from .engine import Engine, ReplyCache, Stats
from .errors import BackendError, CaiforgeError, StageFailed
from .pipelines import rlcai
from .records import PairRecord
from .request import Reply
from .runner import Budget, FailureRate, Outcome, run_each
from .store import DB_NAME, Store

Item = tuple[str, str]  # (prompt id, prompt)
ROLES = {role: role for role in rlcai.ROLES}  # role -> config section, as the local run has it
CALLS_PER_ACTOR = 4  # batches one actor works on at once: a slow prompt holds up only its own batch
ACTOR_CPUS = 0.5  # an actor waits on the network, not on a core: two share one (measured for issue 11)
STAT_FIELDS = ("requests", "retries", "cached", "tokens")
STOP_GRACE = 5.0  # seconds a stopped run waits for the next batch, when Ray's iterator lets go of the dataset

# The replies a batch obtained, by key: set per batch, so batches that share an actor's engine stay apart.
_BATCH: contextvars.ContextVar[dict[str, tuple[str, Reply]] | None] = contextvars.ContextVar("batch", default=None)


class RemoteBackendError(BackendError):
    """A backend error raised in an actor, rebuilt on the driver with its words and its reason (what a failure
    record keeps and what ``--max-failure-rate`` counts)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class _BatchCache:
    """The actor's ReplyCache: the current batch's replies in memory, then (on the driver's node only, where the
    file is the run's own) the run's store read-only, so a resumed prompt reuses what a past attempt obtained."""

    def __init__(self, store: ReplyCache | None) -> None:
        self._store = store

    def get_reply(self, key: str) -> Reply | None:
        batch = _BATCH.get()
        if batch is not None and key in batch:
            return batch[key][1]
        return self._store.get_reply(key) if self._store is not None else None

    def put_reply(self, key: str, role: str, reply: Reply) -> None:
        batch = _BATCH.get()
        assert batch is not None, "a reply outside any batch"
        batch[key] = (role, reply)


def _share(cfg: RunConfig, made: Mapping[str, list[Backend]], actors: int) -> RunConfig:
    """Each actor's part of every endpoint's concurrency and pace: the flags are totals, as in a local run, so
    adding actors spreads the client work without sending an endpoint more than it was given."""
    update: dict[str, Any] = {}
    for role, section in ROLES.items():
        s = getattr(cfg, section)
        total = s.concurrency or made[role][0].default_concurrency
        update[section] = s.model_copy(
            update={"concurrency": max(1, math.ceil(total / actors)), "rpm": s.rpm / actors if s.rpm else None}
        )
    return cfg.model_copy(update=update)


def _stats_of(stats: Stats) -> dict[str, Counter[str]]:
    return {name: Counter(getattr(stats, name)) for name in STAT_FIELDS}


def _failure_data(failure: StageFailed) -> dict[str, Any]:
    """A StageFailed as plain data: an exception with its own constructor does not pickle back."""
    return {
        "stage": failure.stage,
        "reason": failure.reason,
        "detail": str(failure),
        "counts": failure.counts,
        "keep": failure.keep,
    }


def _failure(data: dict[str, Any]) -> StageFailed:
    error = RemoteBackendError(data["detail"], data["reason"])
    return StageFailed(data["stage"], error, counts=data["counts"], keep=data["keep"])


class PromptWorker:
    """One Ray actor: the engine over the run's endpoints, shared by the batches it works on at once."""

    def __init__(
        self, cfg: RunConfig, settings: rlcai.Settings, actors: int, driver_node: str, store_path: str
    ) -> None:
        self._cfg, self._settings, self._actors = cfg, settings, actors
        self._driver_node, self._store_path = driver_node, Path(store_path)
        self._engine: Engine | None = None
        self._made: dict[str, list[Backend]] = {}
        self._store: Store | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._starting = asyncio.Lock()
        self._reported = _stats_of(Stats())

    async def _ready(self) -> Engine:
        """Built on the actor's event loop at the first batch (the HTTP sessions live on that loop), and the
        endpoints checked as the session checks them, so an actor learns what each endpoint needs the same way."""
        async with self._starting:
            if self._engine is None:
                self._loop = asyncio.get_running_loop()
                self._made = session.make_backends(self._cfg, ROLES)
                _, down = await session.check_endpoints(self._made, quiet=True)
                here = ray.get_runtime_context().get_node_id() == self._driver_node
                self._store = Store(self._store_path) if here and self._store_path.exists() else None
                cfg = _share(self._cfg, self._made, self._actors)
                self._engine = session.make_engine(cfg, ROLES, self._made, _BatchCache(self._store))
                for backend in down:
                    self._engine.rest(backend)
            return self._engine

    async def _close(self) -> None:
        try:
            if self._engine is not None:
                await self._engine.aclose()
        finally:
            for backend in {id(b): b for bs in self._made.values() for b in bs}.values():
                await backend.aclose()
            if self._store is not None:
                self._store.close()

    def __del__(self) -> None:
        """Ray Data drops the actor's UDF when the pool shuts down gracefully: close the HTTP sessions on their
        own loop then. Nothing can be said from here, and nothing is lost if it fails (every result has left)."""
        loop = self._loop
        if loop is not None and loop.is_running() and not loop.is_closed():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._close(), loop).result(timeout=10)

    async def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        engine = await self._ready()
        items = [(str(pid), str(prompt)) for pid, prompt in zip(batch["pid"], batch["prompt"], strict=True)]
        replies: dict[str, tuple[str, Reply]] = {}
        advanced: Counter[str] = Counter()
        outcomes: list[Outcome[Item, PairRecord]] = []

        def step(stage: str) -> None:  # counted here, shown by the driver's bars
            advanced[stage] += 1

        pipeline = rlcai.RlCai(self._settings, {r: engine.asker(r) for r in rlcai.ROLES}, step)
        token = _BATCH.set(replies)
        try:
            # Never stops on failures: the driver sees every outcome and decides (--max-failure-rate).
            await run_each(items, pipeline, outcomes.append, window=max(1, len(items)), rate=FailureRate(1.0))
        finally:
            _BATCH.reset(token)
        now = _stats_of(engine.stats)
        delta = {name: now[name] - self._reported[name] for name in STAT_FIELDS}  # what this actor did since
        self._reported = now
        payload = {
            "outcomes": [
                {
                    "item": o.item,
                    "pair": o.record.to_json() if o.record is not None else None,
                    "failure": _failure_data(o.failure) if o.failure is not None else None,
                }
                for o in outcomes
            ],
            "replies": [(key, role, dataclasses.asdict(reply)) for key, (role, reply) in replies.items()],
            "stats": {name: dict(counter) for name, counter in delta.items()},
            "advanced": dict(advanced),
        }
        return {"payload": np.array([pickle.dumps(payload)], dtype=object)}


def _connect(cfg: RunConfig) -> bool:
    """Ray, as asked: the cluster at ``--ray-address``, one already running in this process, or a local
    instance of our own. Returns whether we started it (only then is it ours to shut down)."""
    if cfg.ray_address is None and ray.is_initialized():
        return False
    # ray.init makes SIGTERM exit the process at once; the session's handler turns it into a resumable stop
    # with everything closed, so it is put back.
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        if cfg.ray_address is not None:
            ray.init(address=cfg.ray_address, ignore_reinit_error=True, **_quiet(cfg))
            return False
        ray.init(include_dashboard=False, **_quiet(cfg))
        return True
    finally:
        if sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, sigterm)


def _quiet(cfg: RunConfig) -> dict[str, Any]:
    return {"logging_level": logging.WARNING, "log_to_driver": False} if cfg.quiet else {}


def _actors(cfg: RunConfig) -> int:
    if cfg.ray_actors is not None:
        return cfg.ray_actors
    return max(1, int(ray.cluster_resources().get("CPU", 0)) // 2)


def _block_size(cfg: RunConfig, actors: int, prompts: int) -> int:
    """Prompts per batch: enough that an actor's batches in flight keep its share of the endpoints busy (the
    local engine's window is twice the requests in flight), few enough that results stream back steadily."""
    in_flight = (cfg.policy.concurrency or 64) + (cfg.judge.concurrency or 32)  # the HTTP kinds' defaults
    per_batch = math.ceil(2 * in_flight / actors / CALLS_PER_ACTOR)
    return max(1, min(per_batch, 1024, math.ceil(prompts / actors)))


def _unwrap(exc: BaseException) -> BaseException:
    """A caiforge error raised in an actor (a refused endpoint check, ...) is said as caiforge says it."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, CaiforgeError):
            return seen
        seen = getattr(seen, "cause", None) or seen.__cause__
    return exc


async def run_on_ray(
    cfg: RunConfig,
    settings: rlcai.Settings,
    items: Iterable[Item],
    on_outcome: Callable[[Outcome[Item, PairRecord]], None],
    *,
    rate: FailureRate,
    cache: ReplyCache,
    stats: Stats,
    advance: Callable[[str], None],
    budget: Budget | None = None,
) -> None:
    """Every prompt ends in ``on_outcome`` as in :func:`runner.run_each`, its replies in ``cache`` first and its
    requests in ``stats``; raises RunAborted when ``rate`` or ``budget`` says so."""
    todo = list(items)  # the store's pending prompts: those with a pair are not among them
    if not todo:
        return  # nothing to send: no cluster needed
    started_here = _connect(cfg)
    rows: _Rows | None = None
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # caiforge's own bars count the same work
        log_once("ray_data_progress_manager_disabled")  # and Ray need not warn that its own are off
        context.print_on_execution_start = not cfg.quiet
        if cfg.quiet:
            logging.getLogger("ray.data").setLevel(logging.ERROR)
        actors = _actors(cfg)
        size = _block_size(cfg, actors, len(todo))
        store_path = Path(getattr(cache, "path", cfg.output_dir / DB_NAME)).resolve()
        prompts = [{"pid": pid, "prompt": prompt} for pid, prompt in todo]
        dataset = ray.data.from_items(prompts, override_num_blocks=math.ceil(len(todo) / size)).map_batches(
            PromptWorker,
            batch_size=size,
            compute=ray.data.ActorPoolStrategy(
                size=actors,
                max_concurrent_calls_per_actor=CALLS_PER_ACTOR,
                max_tasks_in_flight_per_actor=2 * CALLS_PER_ACTOR,
            ),
            num_cpus=ACTOR_CPUS,
            fn_constructor_kwargs={
                "cfg": cfg,
                "settings": settings,
                "actors": actors,
                "driver_node": ray.get_runtime_context().get_node_id(),
                "store_path": str(store_path),
            },
        )
        rows = _Rows(dataset)
        async for payload in rows:
            _absorb(
                pickle.loads(payload), on_outcome, rate=rate, cache=cache, stats=stats, advance=advance, budget=budget
            )
    finally:
        if rows is not None:
            rows.stop(STOP_GRACE)
        if started_here:
            ray.shutdown()


class _Rows:
    """The dataset's rows as the actors finish them. Ray's iterator blocks, so it runs on a thread of its own
    and hands each row to the event loop; a daemon, so a stopped run never waits long for a batch on its way."""

    END = object()

    def __init__(self, dataset: Any) -> None:
        self._dataset, self._stop = dataset, threading.Event()
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._thread = threading.Thread(target=self._pump, name="caiforge-ray-results", daemon=True)
        self._thread.start()

    def _hand(self, value: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: the run is over
            self._loop.call_soon_threadsafe(self._queue.put_nowait, value)

    def _pump(self) -> None:
        try:
            for batch in self._dataset.iter_batches(batch_size=None, batch_format="numpy"):
                for payload in batch["payload"]:
                    self._hand(payload)
                if self._stop.is_set():
                    break  # leaving the loop closes Ray's iterator, which stops the dataset and its actors
        except BaseException as exc:  # handed to the driver, which raises it
            self._hand(exc)
        finally:
            self._hand(self.END)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while (value := await self._queue.get()) is not self.END:
            if isinstance(value, BaseException):
                raise _unwrap(value)
            yield value

    def stop(self, grace: float) -> None:
        """Ask the pump to stop at the next batch and wait up to ``grace`` seconds for it: a Ray instance shut
        down under a live iterator is started again by it, from this thread."""
        self._stop.set()
        self._thread.join(grace)


def _absorb(
    payload: dict[str, Any],
    on_outcome: Callable[[Outcome[Item, PairRecord]], None],
    *,
    rate: FailureRate,
    cache: ReplyCache,
    stats: Stats,
    advance: Callable[[str], None],
    budget: Budget | None = None,
) -> None:
    """One batch's results on the driver, in the local engine's order: replies stored before the outcomes that
    used them, then each outcome committed and counted."""
    for key, role, fields in payload["replies"]:
        cache.put_reply(key, role, Reply(**fields))
    for name, counts in payload["stats"].items():
        getattr(stats, name).update(counts)
    for stage, n in payload["advanced"].items():
        for _ in range(n):
            advance(stage)
    for outcome in payload["outcomes"]:
        item = (outcome["item"][0], outcome["item"][1])
        if outcome["pair"] is not None:
            on_outcome(Outcome(item, PairRecord.from_json(outcome["pair"]), None))
            rate.add(None)
        else:
            failure = _failure(outcome["failure"])
            on_outcome(Outcome(item, None, failure))
            rate.add(failure)
        if budget is not None:  # as run_each checks it: after each outcome, on the tokens reported so far
            budget.check()
