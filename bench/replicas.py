"""Scaling over several endpoints per role: 1, 2 and 4 fake servers that each admit 64 requests at a time and
answer 429 beyond, as a vLLM replica behind a concurrency cap does. Every server serves both roles; caiforge
is given all of them (``--policy-url`` and ``--judge-url`` repeated) with default flags otherwise.

The ideal is every server's 64 slots busy for the whole run: ``64 * servers / latency`` requests a second,
five requests a prompt (four candidates, one judgment).

    .venv/bin/python bench/replicas.py --prompts 2000 --latency 0.2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from servers import CONSTITUTION, start_server

ADMITS = 64


def start(latency: float) -> tuple[subprocess.Popen[str], str]:
    return start_server("--latency", str(latency), "--max-concurrent", str(ADMITS), "--models", "fake")


def one(servers: int, prompts: int, latency: float, work: Path) -> tuple[float, dict[str, object]]:
    procs = [start(latency) for _ in range(servers)]
    try:
        path = work / "prompts.jsonl"
        path.write_text("".join(json.dumps({"prompt": f"Replica bench prompt {i}"}) + "\n" for i in range(prompts)))
        (work / "constitution.txt").write_text(CONSTITUTION)
        cmd = [sys.executable, "-m", "caiforge", "run", "--red-teaming-file-path", str(path)]
        cmd += ["--sys-prompt-constitution-file-path", str(work / "constitution.txt"), "--quiet"]
        cmd += ["--policy-backend", "openai-chat", "--policy-model", "fake", "--judge-model", "fake"]
        cmd += ["--output-dir", str(work / f"out-{servers}")]
        for _, url in procs:
            cmd += ["--policy-url", f"{url}/v1", "--judge-url", f"{url}/v1"]
        started = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        elapsed = time.perf_counter() - started
        manifest = json.loads((work / f"out-{servers}" / "manifest.json").read_text())
        return elapsed, manifest["stats"]
    finally:
        for proc, _ in procs:
            proc.terminate()
            proc.wait(timeout=10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=2000)
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--servers", type=int, nargs="*", default=[1, 2, 4])
    args = ap.parse_args()
    print("| servers | wall s | prompts/s | ideal | of ideal | 429s retried | requests per server (policy, judge) |")
    print("|---|---|---|---|---|---|---|")
    for n in args.servers:
        with tempfile.TemporaryDirectory() as tmp:
            elapsed, stats = one(n, args.prompts, args.latency, Path(tmp))
        ideal = ADMITS * n / args.latency / 5
        measured = args.prompts / elapsed
        endpoints: dict[str, list[dict[str, int]]] = stats["endpoints"]  # type: ignore[assignment]
        per_server = [
            sum(e["requests"] for e in endpoints[role] if e["address"].startswith(addr))
            for addr in sorted({e["address"].rsplit("/v1", 1)[0] for e in endpoints["policy"]})
            for role in ("policy", "judge")
        ]
        retries: dict[str, int] = stats["retries"]  # type: ignore[assignment]
        print(
            f"| {n} | {elapsed:.1f} | {measured:.0f} | {ideal:.0f} | {measured / ideal:.0%} | "
            f"{sum(retries.values())} | {per_server} |"
        )


if __name__ == "__main__":
    main()
