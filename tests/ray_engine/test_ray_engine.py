"""``--engine ray`` on a local Ray instance gives the local engine's dataset, byte for byte, from the same
requests; its results land in the run's store, so a resumed Ray run asks only for what is missing.

``make test-ray`` installs ``caiforge[ray]`` and runs this folder; the default ``make test`` does not collect it.
Ray starts once for the whole session: it costs seconds and about a gigabyte.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="make test-ray installs caiforge[ray]")

from caiforge.cli import main  # noqa: E402
from caiforge.store import DB_NAME, Store  # noqa: E402
from caiforge.testing.fake_server import FakeConfig, FakeServer, Fault, RecordedRequest  # noqa: E402
from conftest import CONSTITUTION, server_flags, stored_keys, write_prompts  # noqa: E402

PROMPTS = [f"How would someone do harmful thing number {i}?" for i in range(24)]
# The store, and what reports on the run rather than on the data (timings, requests sent, the client's concurrency).
RUN_FILES = ("caiforge.db", "caiforge.db-wal", "caiforge.db-shm", "caiforge.db.lock", "manifest.json", "README.md")


@pytest.fixture(scope="session", autouse=True)
def ray_instance() -> Iterator[None]:
    """One local instance for every test here (start-up and shut-down cost 8-11 s on these machines)."""
    saved = {name: os.environ.get(name) for name in ("RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED")}
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, object_store_memory=200_000_000, include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, Path]:
    constitution = tmp_path / "constitution.txt"
    constitution.write_text(CONSTITUTION, encoding="utf-8")
    return write_prompts(tmp_path / "prompts.jsonl", PROMPTS), constitution


def run(server: FakeServer, inputs: tuple[Path, Path], out: Path, *extra: str, policy: str = "openai-chat") -> int:
    prompts, constitution = inputs
    args = ["--red-teaming-file-path", str(prompts), "--sys-prompt-constitution-file-path", str(constitution)]
    return main([*args, *server_flags(server, policy), *extra, "--output-dir", str(out), "--quiet"])


def dataset_files(out: Path) -> dict[str, bytes]:
    """Every data file the run wrote: not its store, manifest, card or report."""
    files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    return {name: data for name, data in files.items() if name not in RUN_FILES and not name.startswith("report")}


def bodies(requests: list[RecordedRequest]) -> list[str]:
    return sorted(json.dumps(r.body, sort_keys=True) for r in requests)


def results(out: Path) -> dict[str, str]:
    """Each prompt's result status in the run's store."""
    store = Store(out / DB_NAME)
    try:
        rows = store.db.execute("SELECT p.text, r.status FROM prompts p JOIN results r ON r.prompt_id = p.id")
        return dict(rows.fetchall())
    finally:
        store.close()


def test_ray_gives_the_local_dataset_from_the_same_requests(tmp_path, inputs):
    with FakeServer(FakeConfig(latency=0.01)) as server:
        assert run(server, inputs, tmp_path / "local", "--seed", "7") == 0
        local = server.work()
        server.reset_records()
        assert run(server, inputs, tmp_path / "ray", "--seed", "7", "--engine", "ray", "--ray-actors", "2") == 0
        remote = server.work()
    files = dataset_files(tmp_path / "local")
    assert "cai_preference_dataset.json" in files and any(name.startswith("trl/") for name in files)
    assert dataset_files(tmp_path / "ray") == files
    assert len(remote) == len(local) == len(PROMPTS) * 5  # four candidates and one verdict a prompt
    assert bodies(remote) == bodies(local)
    assert results(tmp_path / "ray") == dict.fromkeys(PROMPTS, "pair")
    manifest = json.loads((tmp_path / "ray" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["stats"]["requests"] == {"policy": len(PROMPTS) * 4, "judge": len(PROMPTS)}
    assert manifest["config"]["engine"] == "ray"


def test_a_resumed_ray_run_asks_only_for_the_prompts_without_results(tmp_path, inputs):
    _, constitution = inputs
    half = write_prompts(tmp_path / "half.jsonl", PROMPTS[::2])
    with FakeServer(FakeConfig()) as server:
        assert run(server, (half, constitution), tmp_path / "ray") == 0  # half the prompts finish, locally
        assert len(results(tmp_path / "ray")) == len(PROMPTS) // 2
        server.reset_records()
        assert run(server, inputs, tmp_path / "ray", "--engine", "ray") == 0
        resumed = server.work()
        assert run(server, inputs, tmp_path / "local") == 0
    policy = [r for r in resumed if r.body and r.body.get("model") == "fake-policy"]
    assert len(resumed) == len(PROMPTS) // 2 * 5
    assert {r.body["messages"][-1]["content"] for r in policy if r.body} == set(PROMPTS[1::2])
    assert results(tmp_path / "ray") == dict.fromkeys(PROMPTS, "pair")
    assert dataset_files(tmp_path / "ray") == dataset_files(tmp_path / "local")
    manifest = json.loads((tmp_path / "ray" / "manifest.json").read_text(encoding="utf-8"))
    assert not any(manifest["stats"]["cached"].values())  # finished prompts never reach an actor


def test_a_ray_run_resumes_a_failed_prompt_with_only_its_missing_request(tmp_path, inputs):
    """A prompt whose judge failed has its candidates in the store: on the driver's node an actor reads them from
    there, so the resumed run sends only the judge's requests, as a local run would."""
    out = tmp_path / "ray"
    judge_down = Fault("500", rate=1.0, paths=("/v1/chat/completions",))  # the policy is on /v1/completions
    with FakeServer(FakeConfig(faults=[judge_down])) as server:
        run(server, inputs, out, "--max-failure-rate", "1", "--max-retries", "0", policy="openai-completions")
        assert set(results(out).values()) == {"failure"}
        server.reset_records()
        server.config.faults = []
        assert run(server, inputs, out, "--engine", "ray", policy="openai-completions") == 0
        resumed = server.work()
    assert len(resumed) == len(PROMPTS)
    assert all(r.path == "/v1/chat/completions" for r in resumed)
    assert results(out) == dict.fromkeys(PROMPTS, "pair")


def test_a_failing_ray_run_stops_at_the_failure_rate_and_keeps_its_work(tmp_path, inputs, capsys):
    out = tmp_path / "ray"
    judge_down = Fault("500", rate=1.0, paths=("/v1/chat/completions",))
    with FakeServer(FakeConfig(faults=[judge_down])) as server:
        code = run(server, inputs, out, "--engine", "ray", "--max-retries", "0", policy="openai-completions")
    assert code == 1
    assert "above --max-failure-rate" in capsys.readouterr().err
    assert len((out / "failures.jsonl").read_text(encoding="utf-8").splitlines()) >= 20


def test_a_ray_run_stops_at_its_token_budget_and_a_rerun_finishes(tmp_path, inputs, capsys):
    out = tmp_path / "ray"
    with FakeServer(FakeConfig()) as server:
        code = run(server, inputs, out, "--engine", "ray", "--max-tokens", "300")
        stopped = capsys.readouterr().err
        durable = stored_keys(out)
        first = len(server.work())
        assert run(server, inputs, out, "--engine", "ray") == 0
        again = len(server.work()) - first
    assert code == 1 and "stopped at the budget" in stopped and "--max-tokens 300" in stopped
    # Ray hands results over a block at a time, so a block's replies may all be stored before the stop
    assert 0 < len(durable) <= len(PROMPTS) * 5
    assert again == len(PROMPTS) * 5 - len(durable)  # nothing stored is asked again
    assert set(results(out).values()) == {"pair"}
