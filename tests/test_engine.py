"""The request engine on its own: in-process backends, an in-memory store, no network and no CAI."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

import virtual_clock as vclock
from caiforge.backends import Capabilities
from caiforge.engine import EndpointSettings, Engine
from caiforge.errors import BadModelOutput, TransientError, Unreachable
from caiforge.request import Reply, Request
from caiforge.store import Store


class Echo:
    """A backend as a plain function: answers each request with its text; scripted failures come first."""

    kind = "echo"
    default_concurrency = 4

    def __init__(self, name: str = "echo", batch: int = 1, script: list[Any] | None = None, gate: Any = None):
        self.name, self.capabilities = name, Capabilities(batch=batch)
        self.script = list(script or [])  # per call: an exception to raise, or "bad" for an unusable reply
        self.calls: list[list[Request]] = []
        self.in_flight = self.peak = 0
        self.gate = gate

    def identity(self) -> dict[str, Any]:
        return {"backend": self.name}

    async def send(self, requests: list[Request]) -> list[Reply | BadModelOutput]:
        self.calls.append(requests)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            step = self.script.pop(0) if self.script else None
            if isinstance(step, Exception):
                raise step
            if step == "bad":
                return [BadModelOutput("no text") for _ in requests]
            return [Reply(text=f"{self.name}: {r.user_turn} @ {r.temperature}", completion_tokens=2) for r in requests]
        finally:
            self.in_flight -= 1

    async def check(self) -> str | None:
        return None

    def adaptations(self) -> tuple[dict[str, Any], list[str]]:
        return {}, []

    async def aclose(self) -> None:
        return None


def user(text: str, t: float | None = None) -> Request:
    return Request(messages=[{"role": "user", "content": text}], temperature=t)


def settings(**kw: Any) -> EndpointSettings:
    return EndpointSettings(**{"concurrency": 4, "adaptive": False, "backoff_base": 0.0, "linger": 0.01, **kw})


@pytest.fixture
def store(tmp_path: Path):
    s = Store(tmp_path / "t.db")
    yield s
    s.close()


def test_a_request_asked_twice_is_sent_once_and_the_second_answer_comes_from_the_store(store):
    backend = Echo()
    engine = Engine({"policy": (backend, settings())}, store)

    async def main() -> tuple[Reply, Reply]:
        first = await engine.ask("policy", user("hi", 0.5))
        return first, await engine.ask("policy", user("hi", 0.5))

    first, second = asyncio.run(main())
    assert len(backend.calls) == 1
    assert first.text == second.text == "echo: hi @ 0.5"
    assert (first.cached, second.cached) == (False, True)
    assert engine.stats.requests["policy"] == 1 and engine.stats.cached["policy"] == 1
    assert engine.stats.tokens["policy_completion"] == 2


def test_the_key_holds_the_endpoints_identity_so_another_model_is_asked_again(store):
    a, b = Echo("a"), Echo("b")
    asyncio.run(Engine({"policy": (a, settings())}, store).ask("policy", user("hi", 0.5)))
    reply = asyncio.run(Engine({"policy": (b, settings())}, store).ask("policy", user("hi", 0.5)))
    assert reply.text == "b: hi @ 0.5" and len(b.calls) == 1


def test_batches_fill_up_and_the_last_partial_batch_is_sent_not_dropped(store):
    backend = Echo(batch=4)
    engine = Engine({"policy": (backend, settings(concurrency=1))}, store)

    async def main() -> list[Reply]:
        requests = [user(f"p{i}", t) for t in (0.1, 0.9) for i in range(10)]
        replies = await asyncio.gather(*(engine.ask("policy", r) for r in requests))
        await engine.aclose()
        return replies

    replies = asyncio.run(main())
    assert len(replies) == 20 and all(r.text.startswith("echo: p") for r in replies)
    assert sum(len(c) for c in backend.calls) == 20
    assert all(len({r.temperature for r in call}) == 1 for call in backend.calls)  # never mixed in a batch
    assert sorted(len(c) for c in backend.calls) == [2, 2, 4, 4, 4, 4]


def test_transient_errors_are_retried_and_counted(store):
    backend = Echo(script=[TransientError("reset"), TransientError("502")])
    engine = Engine({"judge": (backend, settings())}, store)
    reply = asyncio.run(engine.ask("judge", user("x")))
    assert reply.text == "echo: x @ None"
    assert engine.stats.requests["judge"] == 3 and engine.stats.retries["judge"] == 2


def test_retries_end_and_the_error_is_raised(store):
    backend = Echo(script=[TransientError("down")] * 10)
    engine = Engine({"judge": (backend, settings(max_retries=2))}, store)
    with pytest.raises(TransientError, match="down"):
        asyncio.run(engine.ask("judge", user("x")))
    assert len(backend.calls) == 3  # the first try and two retries


def test_an_unusable_reply_is_asked_again_up_to_output_retries_and_never_stored(store):
    flaky = Echo(script=["bad", "bad"])
    engine = Engine({"policy": (flaky, settings(output_retries=2))}, store)
    assert asyncio.run(engine.ask("policy", user("x", 1.0))).text == "echo: x @ 1.0"
    assert len(flaky.calls) == 3

    never = Echo(script=["bad"] * 5)
    engine = Engine({"judge": (never, settings(output_retries=0))}, store)
    with pytest.raises(BadModelOutput):
        asyncio.run(engine.ask("judge", user("y")))
    assert len(never.calls) == 1
    assert store.get_reply(user("y").key(never.identity())) is None


def test_roles_are_data_each_endpoint_keeps_its_own_limit(store):
    """A third role (a critic) is one more entry: its own backend, limit and counters."""

    async def main() -> dict[str, Echo]:
        gate = asyncio.Event()
        backends = {"policy": Echo("p", gate=gate), "critic": Echo("c", gate=gate), "judge": Echo("j", gate=gate)}
        limits = {"policy": 3, "critic": 1, "judge": 2}
        engine = Engine({r: (b, settings(concurrency=limits[r])) for r, b in backends.items()}, store)
        tasks = [asyncio.create_task(engine.ask(r, user(f"{r}{i}"))) for r in backends for i in range(6)]
        while sum(b.in_flight for b in backends.values()) < sum(limits.values()):
            await asyncio.sleep(0)
        for _ in range(50):  # nothing else gets in while the gate is shut
            await asyncio.sleep(0)
        assert {r: b.in_flight for r, b in backends.items()} == limits
        gate.set()
        await asyncio.gather(*tasks)
        assert {r: engine.stats.requests[r] for r in backends} == {r: 6 for r in backends}
        return backends

    backends = asyncio.run(main())
    assert {r: b.peak for r, b in backends.items()} == {"policy": 3, "critic": 1, "judge": 2}


def test_an_unknown_role_is_a_clear_error(store):
    engine = Engine({"policy": (Echo(), settings())}, store)
    with pytest.raises(KeyError, match="no endpoint for role 'critic'"):
        engine.asker("critic")


def test_a_request_is_a_chat_or_a_raw_prompt_never_both_or_neither():
    with pytest.raises(ValueError, match="either messages or a raw prompt"):
        Request()
    with pytest.raises(ValueError, match="either messages or a raw prompt"):
        Request(messages=[{"role": "user", "content": "a"}], prompt="b")
    assert Request(prompt="raw").user_turn is None


# -- several endpoints per role ---------------------------------------------------------------------------
class Down(Echo):
    """An endpoint that refuses connections until ``up`` is set: what a killed replica looks like."""

    def __init__(self, name: str = "echo") -> None:
        super().__init__(name)
        self.up = False
        self.refused = 0

    async def send(self, requests: list[Request]) -> list[Reply | BadModelOutput]:
        if not self.up:
            self.refused += 1
            raise Unreachable("connection refused: http://127.0.0.1:9/v1", "connection refused")
        return await super().send(requests)


def test_requests_go_to_the_endpoint_with_the_fewest_outstanding(store):
    gate = asyncio.Event()
    a, b = Echo(gate=gate), Echo(gate=gate)  # same identity: interchangeable replicas
    engine = Engine({"policy": [(a, settings(concurrency=8)), (b, settings(concurrency=8))]}, store)

    async def main() -> None:
        tasks = [asyncio.create_task(engine.ask("policy", user(f"p{i}"))) for i in range(10)]
        for _ in range(50):
            await asyncio.sleep(0)
        assert (a.in_flight, b.in_flight) == (5, 5)  # each new request went to the less loaded one
        gate.set()
        await asyncio.gather(*tasks)
        await engine.aclose()

    asyncio.run(main())
    assert len(a.calls) == len(b.calls) == 5
    figures = engine.stats.endpoints["policy"]
    assert [f["requests"] for f in figures] == [5, 5] and engine.stats.concurrency["policy"]["limit"] == 16


def test_a_down_endpoint_is_rested_its_requests_go_elsewhere_and_a_probe_brings_it_back(store):
    down, up = Down(), Echo()
    rest = {"rest_base": 10.0, "backoff_base": 1.0}
    engine = Engine({"policy": [(down, settings(**rest)), (up, settings(**rest))]}, store)

    async def main() -> list[Reply]:
        first = await asyncio.gather(*(engine.ask("policy", user(f"p{i}")) for i in range(6)))
        assert down.refused == 1  # refused once, then rested: nothing more is sent there
        down.up = True  # the replica comes back; after its rest a probe finds it
        await asyncio.sleep(10.5)
        later = [await engine.ask("policy", user(f"q{i}")) for i in range(4)]
        await engine.aclose()
        return [*first, *later]

    replies = vclock.run(main())
    assert len(replies) == 10 and all(r.text.startswith("echo:") for r in replies)  # no request was lost
    assert len(up.calls) + len(down.calls) == 10 and len(down.calls) >= 1  # probed and used again
    rested, healthy = engine.stats.endpoints["policy"]
    assert (rested["rests"], rested["errors"], healthy["rests"]) == (1, 1, 0)
    assert engine.stats.retries["policy"] == 1  # the refused request was sent again, at once, to the other


def test_a_lone_endpoint_is_never_rested_its_errors_are_retried_with_backoff(store):
    lone = Echo(script=[Unreachable("refused", "connection refused")] * 2)
    engine = Engine({"policy": (lone, settings(backoff_base=1.0))}, store)

    async def main() -> Reply:
        reply = await engine.ask("policy", user("x"))
        await engine.aclose()
        return reply

    assert vclock.run(main()).text == "echo: x @ None"
    assert engine.stats.endpoints["policy"][0]["rests"] == 0 and engine.stats.retries["policy"] == 2


def test_endpoints_of_one_role_must_agree_on_everything_but_the_address(store):
    with pytest.raises(ValueError, match="differ in model or settings"):
        Engine({"policy": [(Echo("a"), settings()), (Echo("b"), settings())]}, store)


def test_batches_go_to_several_nemo_like_endpoints_and_the_last_partial_batch_is_sent(store):
    gate = asyncio.Event()
    a, b = Echo(batch=4, gate=gate), Echo(batch=4, gate=gate)
    engine = Engine({"policy": [(a, settings(concurrency=1)), (b, settings(concurrency=1))]}, store)

    async def main() -> list[Reply]:
        tasks = [asyncio.create_task(engine.ask("policy", user(f"p{i}", 0.5))) for i in range(10)]
        for _ in range(20):
            await asyncio.sleep(0)
        assert (a.in_flight, b.in_flight) == (1, 1)  # one batch each, at once
        gate.set()
        replies = await asyncio.gather(*tasks)
        await engine.aclose()
        return replies

    assert len(asyncio.run(main())) == 10
    sizes = sorted(len(c) for c in a.calls + b.calls)
    assert sum(sizes) == 10 and a.calls and b.calls and sizes[-1] == 4
