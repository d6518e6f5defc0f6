"""Nothing lost: kill -9 and resume, SIGTERM/Ctrl-C, faults of every kind, adaptive concurrency, rate caps."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from caiforge.testing.fake_server import FakeConfig, FakeServer, Fault
from conftest import server_flags, write_prompts

DATASET_FILES = (
    "cai_candidate_dataset.json",
    "cai_preference_dataset.json",
    "cai_rlaif_train_prompts_with_chat_prompt.jsonl",
    "cai_rlaif_train_comparisons_with_chat_prompt.jsonl",
    "cai_rlaif_test_prompts_with_chat_prompt.jsonl",
    "cai_rlaif_test_comparisons_with_chat_prompt.jsonl",
)


def prompts(n: int) -> list[str]:
    return [f"Resilience prompt {i}: how would I do a bad thing?" for i in range(n)]


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
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

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


def caiforge_cmd(server, prompts_file: Path, constitution: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "caiforge",
        "run",
        "--red-teaming-file-path",
        str(prompts_file),
        "--sys-prompt-constitution-file-path",
        str(constitution),
        "--output-dir",
        str(out),
        "--quiet",
        *server_flags(server),
        *extra,
    ]


def run_prompts(run_cli, fake, tmp_path, constitution, n: int, *extra: str, policy: str = "openai-chat"):
    prompts_file = write_prompts(tmp_path / "prompts.jsonl", prompts(n))
    return run_cli(
        "--red-teaming-file-path",
        str(prompts_file),
        "--sys-prompt-constitution-file-path",
        str(constitution),
        *server_flags(fake, policy),
        *extra,
    )


def key(entry: dict) -> str:
    return json.dumps(entry["body"], sort_keys=True)


def test_kill_9_then_rerun_repeats_at_most_the_requests_in_flight_and_writes_the_same_dataset(
    server_process, tmp_path, constitution
):
    server = server_process("--latency", "0.05")
    prompts_file = write_prompts(tmp_path / "prompts.jsonl", prompts(120))
    flags = ("--policy-concurrency", "8", "--judge-concurrency", "4")
    killed = subprocess.Popen(caiforge_cmd(server, prompts_file, constitution, tmp_path / "out", *flags))
    deadline = time.monotonic() + 60
    while len(server.entries()) < 250 and time.monotonic() < deadline and killed.poll() is None:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=10)
    assert killed.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    time.sleep(0.3)  # let the server finish what was in flight
    first = server.entries()
    done_before = {key(e) for e in first if e["status"] == 200}
    assert 200 <= len(done_before) < 120 * 5

    resumed = subprocess.run(
        caiforge_cmd(server, prompts_file, constitution, tmp_path / "out", *flags),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stderr
    second = server.entries()[len(first) :]
    repeated = sum(1 for e in second if key(e) in done_before)
    cut = sum(1 for e in first if e["status"] != 200)
    print(f"\nkill -9 after {len(done_before)} answered requests ({cut} cut off in flight): {repeated} repeated")
    assert repeated <= 8 + 4  # at most what was in flight when the process died
    assert len(done_before) + len(second) - repeated == 120 * 5  # every request answered exactly once more or less

    clean = subprocess.run(
        caiforge_cmd(server, prompts_file, constitution, tmp_path / "clean", *flags),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert clean.returncode == 0, clean.stderr
    for name in DATASET_FILES:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_stop_cleanly_and_say_how_to_resume(server_process, tmp_path, constitution, sig):
    server = server_process("--latency", "0.1")
    prompts_file = write_prompts(tmp_path / "prompts.jsonl", prompts(60))
    cmd = caiforge_cmd(server, prompts_file, constitution, tmp_path / "out", "--policy-concurrency", "4")
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    while len(server.entries()) < 20:
        time.sleep(0.02)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "Traceback" not in stderr
    assert "Rerun the same command" in stderr
    finished = len([e for e in server.entries() if e["status"] == 200])
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["pairs"] == 60
    assert sum(manifest["stats"]["cached"].values()) >= finished - 8


FAULT_MIXES = {
    "429 without Retry-After": [Fault("429", rate=0.3)],
    "429 with Retry-After": [Fault("429-retry-after", rate=0.3, retry_after=0.05)],
    "5xx": [Fault("500", rate=0.3)],
    "hung requests": [Fault("hang", rate=0.1, hang_seconds=5.0)],
    "connection resets": [Fault("reset", rate=0.2)],
    "truncated bodies": [Fault("truncate", rate=0.2)],
    "non-JSON bodies": [Fault("nonjson", rate=0.2)],
    "all at once": [
        Fault("429", rate=0.05),
        Fault("500", rate=0.05),
        Fault("reset", rate=0.05),
        Fault("truncate", rate=0.05),
        Fault("nonjson", rate=0.05),
        Fault("hang", rate=0.03, hang_seconds=5.0),
    ],
}


@pytest.mark.parametrize("mix", list(FAULT_MIXES))
def test_no_pair_is_lost_to_transient_faults(run_cli, fake, tmp_path, constitution, mix):
    fake.config.faults = FAULT_MIXES[mix]
    fake.config.seed = 7
    run = run_prompts(
        run_cli,
        fake,
        tmp_path,
        constitution,
        30,
        "--max-retries",
        "10",
        "--retry-backoff",
        "0.01",
        "--request-timeout",
        "0.5",
    )
    assert run.code == 0, run.stderr
    assert run.jsonl("failures.jsonl") == []
    assert len(run.json("cai_preference_dataset.json")) == 30
    stats = run.json("manifest.json")["stats"]
    faulted = sum(1 for r in fake.requests if r.status != 200)  # a truncated body is logged as 200
    assert sum(stats["retries"].values()) >= max(1, faulted)


def test_persistent_faults_are_recorded_with_their_reason(run_cli, fake, tmp_path, constitution):
    fake.config.faults = [Fault("500", rate=1.0, paths=("/v1/chat/completions",))]
    run = run_prompts(
        run_cli,
        fake,
        tmp_path,
        constitution,
        5,
        "--max-retries",
        "2",
        "--retry-backoff",
        "0.01",
        policy="openai-completions",
    )
    assert run.code == 1
    failures = run.jsonl("failures.jsonl")
    assert len(failures) == 5
    assert {(f["stage"], f["reason"]) for f in failures} == {("judge", "transient error")}
    assert all("HTTP 500" in f["detail"] for f in failures)
    assert fake.count("/v1/chat/completions") == 5 * 3  # the budget, then recorded
    assert len(run.json("cai_candidate_dataset.json")) == 5  # candidates kept for a rerun


def test_a_run_failing_wholesale_stops_with_a_clear_message(run_cli, fake, tmp_path, constitution):
    fake.config.faults = [Fault("500", rate=1.0, paths=("/v1/chat/completions",))]
    run = run_prompts(
        run_cli,
        fake,
        tmp_path,
        constitution,
        200,
        "--max-retries",
        "0",
        "--max-failure-rate",
        "0.5",
        policy="openai-completions",
    )
    assert run.code == 1
    assert "--max-failure-rate" in run.stderr and "transient error" in run.stderr
    assert "Rerun the same command" in run.stderr
    assert fake.count("/v1/chat/completions") < 200  # stopped early, not after burning every prompt


def test_adaptive_concurrency_settles_near_what_the_server_admits(run_cli, tmp_path, constitution):
    """Policy and judge servers that each admit 4 requests at a time and refuse the rest with 429."""
    config = FakeConfig(latency=0.05, max_concurrent=4)
    with FakeServer(config) as policy, FakeServer(config) as judge:
        prompts_file = write_prompts(tmp_path / "prompts.jsonl", prompts(150))
        args = (
            "--red-teaming-file-path",
            str(prompts_file),
            "--sys-prompt-constitution-file-path",
            str(constitution),
            "--policy-url",
            f"{policy.url}/v1",
            "--policy-model",
            "p",
            "--judge-url",
            f"{judge.url}/v1",
            "--policy-concurrency",
            "32",
            "--judge-concurrency",
            "32",
            "--retry-backoff",
            "0.05",
            "--max-retries",
            "30",
        )
        adaptive = run_cli(*args, out=tmp_path / "adaptive")
        assert adaptive.code == 0, adaptive.stderr
        refused = {"policy": policy.count(status=429), "judge": judge.count(status=429)}
        conc = adaptive.json("manifest.json")["stats"]["concurrency"]
        policy.reset_records()
        judge.reset_records()
        fixed = run_cli(*args, "--fixed-concurrency", out=tmp_path / "fixed")
        assert fixed.code == 0, fixed.stderr
        refused_fixed = {"policy": policy.count(status=429), "judge": judge.count(status=429)}
    print(
        f"\nservers admit 4: adaptive settled at policy {conc['policy']}, judge {conc['judge']}; "
        f"429s adaptive {refused} vs fixed {refused_fixed}"
    )
    assert len(adaptive.json("cai_preference_dataset.json")) == 150
    assert conc["policy"]["decreases"] >= 1
    assert conc["policy"]["limit"] <= 8  # settled near the 4 the server admits, not at the ceiling of 32
    assert conc["judge"]["peak_in_flight"] <= 4 or conc["judge"]["decreases"] >= 1
    assert refused["policy"] < refused_fixed["policy"] / 2


def test_rpm_cap_spaces_requests_evenly(run_cli, fake, tmp_path, constitution):
    run = run_prompts(run_cli, fake, tmp_path, constitution, 8, "--judge-rpm", "600")
    assert run.code == 0, run.stderr
    # Arrival times at the server: one every 0.1 s (600/min). Arrival jitters (a first connection is slow to
    # open), so the test asks for no burst (never three within 0.1 s) and the right overall pace.
    starts = sorted(r.time for r in fake.requests if "FULL TEXT" in json.dumps(r.body))
    assert len(starts) == 8
    assert min(c - a for a, c in zip(starts, starts[2:], strict=False)) >= 0.1
    assert starts[-1] - starts[0] >= 0.6


def test_two_runs_on_one_output_folder_are_refused(server_process, tmp_path, constitution):
    server = server_process("--latency", "0.2")
    prompts_file = write_prompts(tmp_path / "prompts.jsonl", prompts(40))
    cmd = caiforge_cmd(server, prompts_file, constitution, tmp_path / "out", "--policy-concurrency", "2")
    first = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    while not server.entries():
        time.sleep(0.02)
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert second.returncode == 2
    assert "another caiforge process is using this folder" in second.stderr
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=30)
    after = subprocess.run(cmd, capture_output=True, text=True, timeout=120)  # the lock went with the process
    assert after.returncode == 0, after.stderr
