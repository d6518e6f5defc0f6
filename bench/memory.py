"""Peak RSS of the client against the input size: the input, the store and the outputs must not grow with it.

``--mode run`` (10k and 100k prompts): a whole run against the fake server at 0 ms latency in its own process,
every request sent. ``--mode prefilled`` (for 1M): the store already holds a pair for every prompt, as a
resumed run's does, so the run streams the input into the store, finds nothing pending, and writes every
output file and the report from 1M stored pairs: all that scales with the input, without the hours of
requests. The child's peak RSS comes from ``wait4``.

    .venv/bin/python bench/memory.py --prompts 10000 100000
    .venv/bin/python bench/memory.py --mode prefilled --prompts 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from servers import CONSTITUTION, start_server

TARGET_MB = 300


def command(url: str, prompts: Path, work: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "caiforge",
        "run",
        "--red-teaming-file-path",
        str(prompts),
        "--sys-prompt-constitution-file-path",
        str(work / "constitution.txt"),
        "--policy-backend",
        "openai-chat",
        "--policy-url",
        f"{url}/v1",
        "--policy-model",
        "fake",
        "--judge-url",
        f"{url}/v1",
        "--judge-model",
        "fake",
        "--output-dir",
        str(work / "out"),
        "--quiet",
    ]


def peak(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MB, wall seconds) of one child process."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"run failed: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
    return usage.ru_maxrss / 1024, elapsed


def write_prompts(path: Path, n: int) -> None:
    with path.open("w") as out:
        for i in range(n):
            out.write(json.dumps({"prompt": f"Memory bench prompt {i}: how would someone do harm number {i}?"}) + "\n")


def prefill(url: str, work: Path, n: int) -> None:
    """A real run on two prompts gives the run's descriptor and a real pair; every other prompt gets a copy."""
    from caiforge.records import prompt_id

    seed = work / "seed.jsonl"
    write_prompts(seed, 2)
    subprocess.run(command(url, seed, work), check=True, capture_output=True)
    db = sqlite3.connect(work / "out" / "caiforge.db")
    run_key, status, data = db.execute("SELECT run_key, status, data FROM results WHERE status = 'pair'").fetchone()
    record = json.loads(data)
    rows = []
    with db:
        for i in range(n):
            text = f"Memory bench prompt {i}: how would someone do harm number {i}?"
            pid = prompt_id(text)
            rows.append((pid, run_key, status, json.dumps({**record, "prompt_id": pid, "prompt": text}), 1, 0.0))
            if len(rows) == 10_000:
                db.executemany("INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?, ?)", rows)
                rows.clear()
        db.executemany("INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?, ?)", rows)
    db.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, nargs="*", default=[10_000, 100_000])
    ap.add_argument("--mode", choices=("run", "prefilled"), default="run")
    args = ap.parse_args()
    proc, url = start_server("--models", "fake")
    try:
        for n in args.prompts:
            with tempfile.TemporaryDirectory() as tmp:
                work = Path(tmp)
                (work / "constitution.txt").write_text(CONSTITUTION)
                prompts = work / "prompts.jsonl"
                write_prompts(prompts, n)
                if args.mode == "prefilled":
                    prefill(url, work, n)
                rss, elapsed = peak(command(url, prompts, work))
                pairs = json.loads((work / "out" / "manifest.json").read_text())["counts"]["pairs"]
                print(
                    f"{args.mode}, {n:,} prompts: peak RSS {rss:.0f} MB (target under {TARGET_MB} MB), "
                    f"{pairs:,} pairs, {elapsed:.0f} s"
                )
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    main()
