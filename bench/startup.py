"""Start-up and a small run end to end, with default flags: what a user waits for before and after the work.

- ``caiforge --help``: the median of several fresh processes (imports only what the command uses);
- the first request: from the process start to the fake server's first record (the endpoint check), and to
  the first request of work;
- 128 prompts x 4 temperatures at 200 ms a request, default flags, report included: the process's wall time.
  The floor is about 0.65 s (two rounds of requests, 0.4 s, plus start-up and writing the files).

    .venv/bin/python bench/startup.py
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from caiforge.testing.fake_server import FakeConfig, FakeServer
from servers import CONSTITUTION

CAIFORGE = [sys.executable, "-m", "caiforge"]
TARGETS = {"help": 0.2, "first request": 0.3, "128 prompts": 1.5}


def timed(cmd: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - started


def small_run(work: Path, latency: float, *flags: str) -> tuple[float, float, float]:
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Start-up prompt {i}"}) + "\n" for i in range(128)))
    (work / "constitution.txt").write_text(CONSTITUTION)
    # A model list, as vLLM, NIM and llama.cpp serve: the endpoint check is then one GET, no probe request.
    with FakeServer(FakeConfig(latency=latency, models=("fake",))) as server:
        cmd = [
            *CAIFORGE,
            "run",
            "--red-teaming-file-path",
            str(prompts),
            "--sys-prompt-constitution-file-path",
            str(work / "constitution.txt"),
            "--policy-backend",
            "openai-chat",
            "--policy-url",
            f"{server.url}/v1",
            "--policy-model",
            "fake",
            "--judge-url",
            f"{server.url}/v1",
            "--judge-model",
            "fake",
            "--output-dir",
            str(work / "out"),
            "--quiet",
            *flags,
        ]
        started_wall, started = time.time(), time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        elapsed = time.perf_counter() - started
        first_any = min(r.time for r in server.requests) - started_wall
        first_work = min(r.time for r in server.requests if not r.is_check) - started_wall
    return elapsed, first_any, first_work


def main() -> None:
    extra = sys.argv[1:]  # flags for the 128-prompt run, to compare settings
    subprocess.run([*CAIFORGE, "--help"], check=True, capture_output=True)  # warm the file cache
    help_s = statistics.median(timed([*CAIFORGE, "--help"]) for _ in range(7))
    runs = []
    for _ in range(3):
        with tempfile.TemporaryDirectory() as tmp:
            runs.append(small_run(Path(tmp), 0.2, *extra))
    elapsed, first_any, first_work = (statistics.median(r[i] for r in runs) for i in range(3))
    print(f"caiforge --help: {help_s:.3f} s (target {TARGETS['help']} s)")  # records hold arrival times
    print(f"first request (the endpoint check) arrived {first_any:.3f} s after the start")
    print(f"first request of work arrived {first_work:.3f} s after the start (target {TARGETS['first request']} s)")
    print(f"128 prompts x 4 temperatures at 200 ms, defaults: {elapsed:.2f} s (target {TARGETS['128 prompts']} s)")


if __name__ == "__main__":
    main()
