"""Shared fixtures: a real fake server on loopback, the real sample data (skipped when absent), a CLI runner."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from caiforge.cli import main
from caiforge.testing.fake_server import FakeConfig, FakeServer, RecordedRequest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CONSTITUTION = (
    "You are a careful judge of harmlessness. Read the prompt and the numbered responses, then answer with\n"
    '{"chosen": <number of the most harmless response>, "rejected": <number of the least harmless>}\n'
    "followed by a short explanation.\n\nPrinciples:\n- Do not help with violence or crime.\n"
)


def shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"real data {name} not found at {SHARED_DATA} (only in the caiforge workspace)")
    return path


@pytest.fixture(autouse=True)
def no_keys_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """An NGC_API_KEY exported on the machine would send the judge to NVIDIA's hosted API: tests set keys."""
    for name in ("NGC_API_KEY", "CAIFORGE_POLICY_API_KEY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    with FakeServer(FakeConfig()) as server:
        yield server


@pytest.fixture
def constitution(tmp_path: Path) -> Path:
    path = tmp_path / "constitution.txt"
    path.write_text(CONSTITUTION, encoding="utf-8")
    return path


def write_prompts(path: Path, prompts: list[str]) -> Path:
    """Prompts as hh-rlhf red-team JSON Lines records."""
    lines = [json.dumps({"transcript": f"\n\nHuman: {p}\n\nAssistant: I can't help with that."}) for p in prompts]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@dataclass
class Run:
    code: int
    out: Path
    stdout: str
    stderr: str

    def json(self, name: str) -> Any:
        return json.loads((self.out / name).read_text(encoding="utf-8"))

    def jsonl(self, name: str) -> list[Any]:
        return [json.loads(line) for line in (self.out / name).read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str], tmp_path: Path):
    """Run ``caiforge`` in-process with the given flags; returns exit code, output dir and captured text."""

    def _run(*args: str, out: Path | None = None) -> Run:
        out = out or tmp_path / "out"
        code = main([*args, "--output-dir", str(out), "--quiet"])
        captured = capsys.readouterr()
        return Run(code, out, captured.out, captured.err)

    return _run


def server_flags(server: FakeServer, policy: str = "openai-chat") -> list[str]:
    """Flags pointing both roles at the fake server."""
    if policy == "nemo":
        pol = ["--host", "127.0.0.1", "--port", str(server.port)]
    else:
        pol = ["--policy-backend", policy, "--policy-url", f"{server.url}/v1", "--policy-model", "fake-policy"]
    return [*pol, "--judge-url", f"{server.url}/v1", "--judge-model", "fake-judge"]


def run_on(
    run_cli,
    server,
    tmp_path: Path,
    constitution: Path,
    *extra: str,
    prompts: list[str],
    policy: str = "openai-chat",
    name: str = "out",
) -> Run:
    """A run of ``prompts`` against ``server`` for both roles, into ``tmp_path / name``."""
    path = write_prompts(tmp_path / f"{name}.jsonl", prompts)
    return run_cli(
        "--red-teaming-file-path",
        str(path),
        "--sys-prompt-constitution-file-path",
        str(constitution),
        *server_flags(server, policy),
        *extra,
        out=tmp_path / name,
    )


class ServerProcess:
    """The fake server in its own process, logging each finished request as a JSON line."""

    def __init__(self, tmp: Path, *flags: str) -> None:
        self.log = tmp / f"server-{time.monotonic_ns()}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "caiforge.testing.fake_server", "--port", "0", "--log", str(self.log), *flags],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()
        self.port = int(self.url.rsplit(":", 1)[1])

    def entries(self) -> list[dict]:
        """Finished work requests, as the server logged them (caiforge's endpoint checks left out)."""
        if not self.log.exists():
            return []
        text = self.log.read_text()
        # The server may be writing a line right now (a line longer than its buffer lands in pieces): read only
        # the lines it has finished.
        complete = text[: text.rfind("\n") + 1]
        rows = [json.loads(line) for line in complete.splitlines() if line.strip()]
        return [e for e in rows if not RecordedRequest(e["path"], "", e["body"], {}, e["status"], 0).is_check]

    def stats(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/_stats", timeout=30) as resp:
            return json.loads(resp.read())

    def wait_idle(self, limit: float = 120) -> None:
        """Until the server has nothing in flight: what the client left behind has been answered or cut off.
        The limit only guards against a hang; under any load the server gets there, just later."""
        deadline = time.monotonic() + limit
        while self.stats()["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.stats()["in_flight"] == 0

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture
def server_process(tmp_path):
    servers: list[ServerProcess] = []

    def start(*flags: str) -> ServerProcess:
        servers.append(ServerProcess(tmp_path, *flags))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def stored_keys(out: Path) -> set[str]:
    """The store keys of every reply a run's database holds (what a rerun will not ask again)."""
    db = sqlite3.connect(out / "caiforge.db")
    try:
        return {row[0] for row in db.execute("SELECT key FROM replies")}
    finally:
        db.close()
