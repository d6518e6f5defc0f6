"""One lifecycle for every command: whatever path a session leaves by, what it opened is closed and the
attempt says how it ended."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from typing import Any

import pytest

from caiforge import build_config
from caiforge.backends import Capabilities
from caiforge.backends.checks import EndpointError
from caiforge.errors import InputError
from caiforge.session import Session
from caiforge.store import Store


class Recorder:
    kind = "recorder"
    default_concurrency = 2
    capabilities = Capabilities()

    def __init__(self, problem: str | None = None) -> None:
        self.problem, self.closed = problem, 0

    def identity(self) -> dict[str, Any]:
        return {"backend": "recorder"}

    async def send(self, requests: list[Any]) -> list[Any]:
        raise AssertionError("nothing is sent in these tests")

    async def check(self) -> str | None:
        if self.problem:
            raise EndpointError(self.problem)
        return None

    def adaptations(self) -> tuple[dict[str, Any], list[str]]:
        return {}, []

    async def aclose(self) -> None:
        self.closed += 1


@pytest.fixture
def made(monkeypatch):
    """Every backend the session makes, by role; the judge's endpoint check can be set to fail."""
    out: dict[str, Recorder] = {}
    problems: dict[str, str] = {}

    def make_all(cfg: Any, role: str) -> list[Recorder]:
        out[role] = Recorder(problems.get(role))
        return [out[role]]

    monkeypatch.setattr("caiforge.backends.make_all", make_all)
    return out, problems


def config(tmp_path):
    return build_config({"output_dir": tmp_path / "out", "quiet": True})


def attempts(tmp_path) -> list[tuple[str, dict[str, Any]]]:
    db = sqlite3.connect(tmp_path / "out" / "caiforge.db")
    try:
        return [
            (status, json.loads(stats or "{}")) for status, stats in db.execute("SELECT status, stats FROM attempts")
        ]
    finally:
        db.close()


def test_a_finished_session_records_its_attempt_and_closes_every_backend(tmp_path, made):
    backends, _ = made
    (tmp_path / "out").mkdir()

    async def main() -> None:
        async with Session(config(tmp_path), {"policy": "policy", "judge": "judge"}, {}) as session:
            assert session.engine.endpoints()["policy"][1].concurrency == 2
            session.finish()

    asyncio.run(main())
    assert {role: b.closed for role, b in backends.items()} == {"policy": 1, "judge": 1}
    [(status, stats)] = attempts(tmp_path)
    assert status == "finished" and set(stats["concurrency"]) == {"policy", "judge"}


def test_an_error_inside_leaves_the_attempt_interrupted_and_still_closes_everything(tmp_path, made):
    backends, _ = made
    (tmp_path / "out").mkdir()

    async def main() -> None:
        async with Session(config(tmp_path), {"policy": "policy", "judge": "judge"}, {}):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        asyncio.run(main())
    assert all(b.closed == 1 for b in backends.values())
    assert [status for status, _ in attempts(tmp_path)] == ["interrupted"]


def test_a_refused_folder_lock_closes_the_backends_it_made(tmp_path, made):
    backends, _ = made
    (tmp_path / "out").mkdir()
    holder = Store.open(tmp_path / "out")  # another run holds the folder
    try:

        async def main() -> None:
            async with Session(config(tmp_path), {"policy": "policy", "judge": "judge"}, {}):
                raise AssertionError("must not start")

        with pytest.raises(InputError, match="another caiforge process is using this folder"):
            asyncio.run(main())
    finally:
        holder.close()
    assert {role: b.closed for role, b in backends.items()} == {"policy": 1, "judge": 1}


def test_a_bad_endpoint_stops_before_the_store_is_touched(tmp_path, made):
    backends, problems = made
    problems["judge"] = "judge endpoint http://127.0.0.1:1/v1: connection refused"
    (tmp_path / "out").mkdir()

    async def main() -> None:
        async with Session(config(tmp_path), {"policy": "policy", "judge": "judge"}, {}):
            raise AssertionError("must not start")

    with pytest.raises(InputError, match="connection refused"):
        asyncio.run(main())
    assert all(b.closed == 1 for b in backends.values())
    assert not (tmp_path / "out" / "caiforge.db").exists()
