"""Nothing lost: kill -9 and resume, SIGTERM/Ctrl-C, faults of every kind, adaptive concurrency, rate caps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from caiforge.store import DURABILITY_BOUND
from caiforge.testing.fake_server import FakeConfig, FakeServer, Fault
from conftest import server_flags, stored_keys, write_prompts

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


def default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


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


def test_kill_9_then_rerun_repeats_only_what_was_in_flight_or_finished_within_the_commit_interval(
    server_process, tmp_path, constitution
):
    """The store commits every COMMIT_INTERVAL (50 ms), not every reply: a kill -9 loses what was in flight
    plus what finished since the last commit, which is at most DURABILITY_BOUND (100 ms) old. The client's
    own event log (each write and commit, as it happened) says exactly which replies those were."""
    server = server_process("--latency", "0.02", "--jitter", "0.02")
    prompts_file = write_prompts(tmp_path / "prompts.jsonl", prompts(120))
    flags = ("--policy-concurrency", "8", "--judge-concurrency", "4")
    out, events = tmp_path / "out", tmp_path / "events.log"
    cmd = caiforge_cmd(server, prompts_file, constitution, out, *flags)
    client = [sys.executable, str(Path(__file__).parent / "durability_client.py"), *cmd[3:]]
    killed = subprocess.Popen(client, env={**os.environ, "CAIFORGE_EVENT_LOG": str(events)})
    # 12 in flight at 20-40 ms: the 350 requests still to go after the 250th take over 0.5 s, so the kill lands
    # mid-run whatever the load. The deadline only guards against a hang.
    deadline = time.monotonic() + 600
    while len(server.entries()) < 250 and time.monotonic() < deadline and killed.poll() is None:
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    log = [line.split() for line in events.read_text().splitlines()]
    last_commit = max(i for i, (what, _, _) in enumerate(log) if what == "commit")
    committed = {k for what, k, _ in log[:last_commit] if what == "put"}
    lost = {k: float(t) for what, k, t in log[last_commit:] if what == "put"}
    durable = stored_keys(out)
    assert committed <= durable and not (durable & set(lost))  # a commit survives kill -9; nothing else does
    # The bound, on the client's own clock: every reply lost was stored after the last commit, within one commit
    # interval of the first of them (the write that finds its transaction COMMIT_INTERVAL old commits it). Each
    # event is logged a few microseconds after the store read its clock, so only a 50 ms stall inside that window
    # could push the span past DURABILITY_BOUND: rarer than 1 in 10,000 runs. (Measured against the test's own
    # clock instead, the kill's latency and this process's scheduling were charged to the client: CI failed so.)
    if lost:
        span = max(lost.values()) - min(lost.values())
        assert span < DURABILITY_BOUND, sorted(lost.values())

    server.wait_idle()  # what was in flight is answered (logged 200) or cut off (logged 499) before we count
    first = server.entries()
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    sent_again = stored_keys(out) - durable
    repeated = sent_again & (committed | set(lost))
    stored = len(committed) + len(lost)
    print(f"\nkill -9 after {stored} stored replies: {len(lost)} uncommitted, {len(repeated)} repeated")
    assert repeated <= set(lost)  # nothing committed was asked again
    second = server.entries()[len(first) :]
    assert len(second) == len(sent_again)  # the rerun sent each missing request once, and nothing else
    assert len(durable) + len(sent_again) == 120 * 5

    clean = subprocess.run(
        caiforge_cmd(server, prompts_file, constitution, tmp_path / "clean", *flags),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert clean.returncode == 0, clean.stderr
    for name in DATASET_FILES:
        assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_stop_cleanly_and_say_how_to_resume(server_process, tmp_path, constitution, sig):
    server = server_process("--latency", "0.1")
    prompts_file = write_prompts(tmp_path / "prompts.jsonl", prompts(60))
    limits = ("--policy-concurrency", "4", "--judge-concurrency", "4")
    cmd = caiforge_cmd(server, prompts_file, constitution, tmp_path / "out", *limits)
    # A shell without job control starts background jobs with SIGINT ignored, and Python then leaves it
    # ignored: give the run the disposition a terminal gives it, whatever started this test.
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    while len(server.entries()) < 20:
        time.sleep(0.02)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in stderr
    assert "Rerun the same command" in stderr
    server.wait_idle()
    first = server.entries()
    done_before = {key(e) for e in first if e["status"] == 200}
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["pairs"] == 60
    # A clean stop commits everything it finished: only what was in flight when the signal came (4 + 4) was
    # answered by the server and never stored, so only that may be asked again.
    repeated = sum(1 for e in server.entries()[len(first) :] if key(e) in done_before)
    assert repeated <= 8


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
    # A request is lost only if all its 21 attempts fault. The worst mix faults 30% of attempts, independently
    # (the server draws each from its RNG): 0.3**21 = 1e-11 per request, about 2e-9 for the 150 requests of a
    # run, far below 1 in 10,000. (With 10 retries it was 0.3**11 * 150 = 2.7e-4: too often.)
    run = run_prompts(
        run_cli,
        fake,
        tmp_path,
        constitution,
        30,
        "--max-retries",
        "20",
        "--retry-backoff",
        "0.01",
        "--request-timeout",
        "0.5",
    )
    assert run.code == 0, run.stderr
    assert run.jsonl("failures.jsonl") == []
    assert len(run.json("cai_preference_dataset.json")) == 30
    stats = run.json("manifest.json")["stats"]
    faulted = sum(1 for r in fake.work() if r.status != 200)  # a truncated body is logged as 200
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
        "--policy-concurrency",
        "2",
        "--judge-concurrency",
        "2",
        policy="openai-completions",
    )
    # Two requests a role in flight hold at most 2 x 4 prompts at once (window = 2 x capacity): the stop at the
    # 20th failure leaves at most 20 + 8 + 1 judged, however fast the server answers.
    assert run.code == 1
    assert "--max-failure-rate" in run.stderr and "transient error" in run.stderr
    assert "Rerun the same command" in run.stderr
    assert fake.count("/v1/chat/completions") <= 29  # stopped early, not after burning every prompt
    failures = run.jsonl("failures.jsonl")  # streamed from the store on the way out: one line per failed prompt
    assert 20 <= len(failures) <= 29 and len({f["prompt"] for f in failures}) == len(failures)
    assert all(f["reason"] for f in failures)


def test_adaptive_concurrency_backs_off_from_what_the_server_refuses(run_cli, tmp_path, constitution):
    """Policy and judge servers that each admit 4 requests at a time and refuse the rest with 429.

    Asserted on what the servers saw. Every 429 makes AIMD cut its limit (the first cut is unconditional), so
    a role that was refused at all has decreased: that holds whatever the timing. The policy is always refused:
    with 600 requests queued its limit doubles past 4 within a few round trips, and for the server never to
    see 5 at once the client would have to spend 10 ms on each send throughout the run (it spends well under
    1 ms). Fixed at 32, every round trip sends 28 requests the server must refuse; adaptive halves on each
    refusal, so it is refused less.
    """
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
        admitted_peak = {"policy": policy.max_in_flight, "judge": judge.max_in_flight}
        conc = adaptive.json("manifest.json")["stats"]["concurrency"]
        policy.reset_records()
        judge.reset_records()
        fixed = run_cli(*args, "--fixed-concurrency", out=tmp_path / "fixed")
        assert fixed.code == 0, fixed.stderr
        refused_fixed = {"policy": policy.count(status=429), "judge": judge.count(status=429)}
    print(
        f"\nservers admit 4: adaptive settled at policy {conc['policy']}, judge {conc['judge']}; server peaks "
        f"{admitted_peak}; 429s adaptive {refused} vs fixed {refused_fixed}"
    )
    assert len(adaptive.json("cai_preference_dataset.json")) == 150
    assert len(fixed.json("cai_preference_dataset.json")) == 150
    for role in ("policy", "judge"):
        assert refused[role] == 0 or conc[role]["decreases"] >= 1, role
    assert refused["policy"] >= 1 and conc["policy"]["decreases"] >= 1
    assert refused["policy"] < refused_fixed["policy"]


def test_rpm_cap_spaces_requests_evenly(run_cli, fake, tmp_path, constitution):
    started = time.time()  # the server stamps arrivals with time.time()
    run = run_prompts(run_cli, fake, tmp_path, constitution, 8, "--judge-rpm", "600")
    assert run.code == 0, run.stderr
    starts = sorted(r.time for r in fake.work() if "FULL TEXT" in json.dumps(r.body))
    assert len(starts) == 8
    # The pacer hands out start slots 0.1 s apart (600/min) and a request reaches the server only after its
    # slot, so the 8th arrives at least 0.7 s after the first slot, which is after the run began. Delays on
    # a loaded machine only push arrivals later. Unpaced, all 8 would arrive within a few milliseconds.
    # (The exact spacing is asserted on a virtual clock in test_limits.)
    assert starts[-1] - started >= 0.7


def test_two_runs_on_one_output_folder_are_refused(server_process, tmp_path, constitution):
    # 160 policy requests at 0.5 s, 2 at a time: the first run lasts at least 40 s, whatever the load, while
    # the second needs only to start Python and try the lock.
    server = server_process("--latency", "0.5")
    prompts_file = write_prompts(tmp_path / "prompts.jsonl", prompts(40))
    cmd = caiforge_cmd(server, prompts_file, constitution, tmp_path / "out", "--policy-concurrency", "2")
    first = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    while not server.entries():
        time.sleep(0.02)
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.poll() is None, "the first run ended before the second tried the folder"
    assert second.returncode == 2
    assert "another caiforge process is using this folder" in second.stderr
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=120)
    # The lock went with the process; the rerun may use more connections (concurrency is not part of a key).
    after = subprocess.run(
        [*cmd, "--policy-concurrency", "32", "--judge-concurrency", "32"], capture_output=True, text=True, timeout=600
    )
    assert after.returncode == 0, after.stderr
