"""Several endpoints per role, on real servers on loopback: balanced, rested when one dies, interchangeable.

Assertions read what each server recorded and what the run wrote (its manifest and summary); nothing is timed.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from caiforge.testing.fake_server import FakeConfig, FakeServer
from conftest import write_prompts

PROMPTS = [f"Replica prompt {i}: how would someone pick a lock?" for i in range(40)]


def replica_flags(servers: list[FakeServer], policy: str = "openai-chat") -> list[str]:
    flags = ["--policy-backend", policy, "--policy-model", "fake", "--judge-backend", "openai", "--judge-model", "fake"]
    for s in servers:
        if policy == "nemo":
            continue
        flags += ["--policy-url", f"{s.url}/v1"]
    if policy == "nemo":
        flags += ["--nemo-servers", ",".join(f"{s.host}:{s.port}" for s in servers)]
    for s in servers:
        flags += ["--judge-url", f"{s.url}/v1"]
    return flags


def run_on_replicas(
    run_cli, servers, tmp_path: Path, constitution: Path, *extra: str, name: str = "out", prompts: list[str] = PROMPTS
):
    path = write_prompts(tmp_path / "prompts.jsonl", prompts)
    return run_cli(
        "--red-teaming-file-path",
        str(path),
        "--sys-prompt-constitution-file-path",
        str(constitution),
        *replica_flags(servers),
        *extra,
        out=tmp_path / name,
    )


def stop_after(server: FakeServer, requests: int, then: threading.Event | None = None) -> threading.Thread:
    """Kill ``server`` once it has answered ``requests`` requests of work: a replica dying mid-run. ``then`` is
    set once it is down (the other replicas' hold: the work they held is still to come, so some must reach it)."""

    def watch() -> None:
        while server.count() < requests:
            threading.Event().wait(0.002)
        server.stop()
        if then is not None:
            then.set()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_three_replicas_share_the_work_and_one_killed_mid_run_loses_no_pair(run_cli, tmp_path, constitution):
    # a and c hold what they admit until b is down, so b serves its 20 whatever the timing, and every judge
    # request is still to come when it dies: the balancer sends some to b (none outstanding there), refused.
    held = threading.Event()
    a_cfg, b_cfg, c_cfg = (
        FakeConfig(latency=0.01, hold=held),
        FakeConfig(latency=0.01),
        FakeConfig(latency=0.01, hold=held),
    )
    with FakeServer(a_cfg) as a, FakeServer(b_cfg) as b, FakeServer(c_cfg) as c:
        watcher = stop_after(b, 20, then=held)
        result = run_on_replicas(run_cli, [a, b, c], tmp_path, constitution, "--max-retries", "3")
        watcher.join(timeout=5)
        served = [s.count(status=200) for s in (a, b, c)]
    assert result.code == 0, result.stderr
    manifest = result.json("manifest.json")
    assert manifest["counts"]["pairs"] == len(PROMPTS) and manifest["counts"]["failures"] == 0
    assert all(n > 0 for n in served) and served[1] >= 20  # every replica worked; b until it was killed
    policy, judge = manifest["stats"]["endpoints"]["policy"], manifest["stats"]["endpoints"]["judge"]
    assert [e["address"] for e in policy] == [f"{s.url}/v1/chat/completions" for s in (a, b, c)]
    assert sum(e["ok"] for e in policy + judge) == sum(served)  # the servers' records and ours agree
    killed = [policy[1], judge[1]]
    assert sum(e["errors"] for e in killed) >= 1 and sum(e["rests"] for e in killed) >= 1
    assert all(e["rests"] == 0 for e in (policy[0], policy[2], judge[0], judge[2]))
    assert f"{b.url}/v1/chat/completions:" in result.stdout  # the summary reports each endpoint


def test_a_resumed_run_may_use_other_endpoints_and_sends_nothing_again(run_cli, tmp_path, constitution):
    half = len(PROMPTS) // 2
    with FakeServer() as a, FakeServer() as b:
        first = run_on_replicas(run_cli, [a, b], tmp_path, constitution, prompts=PROMPTS[:half])
    assert first.code == 0, first.stderr
    with FakeServer() as c:  # another address altogether: the store key holds no address
        again = run_on_replicas(run_cli, [c], tmp_path, constitution)
        work = c.count()
    assert again.code == 0
    assert work == 5 * (len(PROMPTS) - half)  # 4 candidates and a judgment for each new prompt, nothing more
    assert again.json("manifest.json")["counts"]["pairs"] == len(PROMPTS)


class Refusing:
    """A port bound but never listening: connections to it are refused, and no other server can take it (a
    stopped server's port may be handed to the next one that binds)."""

    host = "127.0.0.1"

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind((self.host, 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{self.host}:{self.port}"

    def close(self) -> None:
        self.sock.close()


def test_a_replica_down_at_the_start_is_noted_and_the_run_goes_on_with_the_others(run_cli, tmp_path, constitution):
    dead = Refusing()
    with FakeServer() as alive:
        result = run_on_replicas(run_cli, [alive, dead], tmp_path, constitution)
        assert alive.count() > 0
    assert result.code == 0, result.stderr
    assert "connection refused" in result.stdout and "going on with the other 1 endpoint(s)" in result.stdout
    assert result.json("manifest.json")["counts"]["pairs"] == len(PROMPTS)


def test_every_replica_down_at_the_start_is_an_error_before_any_request(run_cli, tmp_path, constitution):
    dead = [Refusing() for _ in range(2)]
    result = run_on_replicas(run_cli, dead, tmp_path, constitution)
    assert result.code == 2 and "connection refused" in result.stderr


def test_nemo_takes_several_servers(run_cli, tmp_path, constitution):
    with FakeServer() as a, FakeServer() as b:
        prompts = write_prompts(tmp_path / "prompts.jsonl", PROMPTS)
        result = run_cli(
            "--red-teaming-file-path",
            str(prompts),
            "--sys-prompt-constitution-file-path",
            str(constitution),
            *replica_flags([a, b], policy="nemo"),
            "--batch-size",
            "4",
            out=tmp_path / "out",
        )
        generate = [s.count(path="/generate") for s in (a, b)]
    assert result.code == 0, result.stderr
    assert sum(generate) >= 4 * len(PROMPTS) // 4 and all(n > 0 for n in generate)
    assert result.json("manifest.json")["counts"]["pairs"] == len(PROMPTS)
