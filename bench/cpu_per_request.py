"""Client CPU per request, end to end (store included), at 0 ms server latency: what caiforge itself costs.

The fake server runs in its own process, so this process's CPU time (user + system, from ``getrusage``) is
caiforge's alone: reading inputs, scheduling, HTTP, the store and the output files. Divided by the requests
sent (policy + judge), it is the client's cost per request.

    .venv/bin/python bench/cpu_per_request.py --prompts 2000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
from pathlib import Path

from caiforge import build_config, run
from servers import CONSTITUTION, start_server


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def one(url: str, n: int, work: Path, kind: str) -> tuple[float, int]:
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"CPU bench prompt {i}"}) + "\n" for i in range(n)))
    (work / "constitution.txt").write_text(CONSTITUTION)
    host, port = url.removeprefix("http://").split(":")
    policy = (
        {"backend": "nemo", "host": host, "port": int(port), "batch_size": 32}
        if kind == "nemo"
        else {"backend": "openai-chat", "url": f"{url}/v1", "model": "fake", "concurrency": 64}
    )
    cfg = build_config(
        {
            "prompts_path": prompts,
            "constitution_path": work / "constitution.txt",
            "output_dir": work / "out",
            "policy": policy,
            "judge": {"backend": "openai", "url": f"{url}/v1", "model": "fake", "concurrency": 32},
            "quiet": True,
        }
    )
    before = cpu_seconds()
    result = run(cfg, fresh=True)
    spent = cpu_seconds() - before
    assert result.pairs == n, result.summary()
    sent = sum(result.stats.requests.values())
    return spent, sent


def pin(core: int) -> None:
    """Server on one core, client on the other (when there are two): sharing a core made runs vary by 30%."""
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {core})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--policy", choices=("openai-chat", "nemo"), default="openai-chat")
    args = ap.parse_args()
    pin(1)  # the server started next inherits this core ...
    proc, url = start_server("--latency", "0.0")
    pin(0)  # ... and the client moves to the other one
    per_request: list[float] = []
    try:
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                spent, sent = one(url, args.prompts, Path(tmp), args.policy)
                per_request.append(1000 * spent / sent)
                print(f"{args.prompts} prompts, {sent} requests, {spent:.2f} s CPU: {per_request[-1]:.3f} ms/request")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    print(f"median {statistics.median(per_request):.3f} ms CPU per request ({args.policy} policy, openai judge)")


if __name__ == "__main__":
    main()
