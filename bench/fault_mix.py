"""Pairs lost under each fault mix, and what it cost in retries and time.

Runs the whole pipeline against the fake server with faults injected on every endpoint (each request has the
given chance of the fault), default retry budget and timeouts shortened to fit a benchmark.

    .venv/bin/python bench/fault_mix.py [--prompts 200]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from caiforge import build_config, run
from caiforge.testing.fake_server import FakeConfig, FakeServer, Fault

MIXES: dict[str, list[Fault]] = {
    "none": [],
    "429 no Retry-After 20%": [Fault("429", rate=0.2)],
    "429 Retry-After 20%": [Fault("429-retry-after", rate=0.2, retry_after=0.1)],
    "500 20%": [Fault("500", rate=0.2)],
    "hang 5%": [Fault("hang", rate=0.05, hang_seconds=10.0)],
    "reset 10%": [Fault("reset", rate=0.1)],
    "truncated 10%": [Fault("truncate", rate=0.1)],
    "non-JSON 10%": [Fault("nonjson", rate=0.1)],
    "all of them, 30% in all": [
        Fault("429", rate=0.05),
        Fault("500", rate=0.05),
        Fault("reset", rate=0.05),
        Fault("truncate", rate=0.05),
        Fault("nonjson", rate=0.05),
        Fault("hang", rate=0.05, hang_seconds=10.0),
    ],
    "500 60% (heavy)": [Fault("500", rate=0.6)],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--latency", type=float, default=0.02)
    args = ap.parse_args()
    print(
        f"\n{args.prompts} prompts x 4 temperatures, {args.latency * 1000:.0f} ms latency, max 8 retries, 2 s timeout\n"
    )
    print("| faults per request | pairs | lost | failures | retries | requests | wall s |")
    print("|---|---|---|---|---|---|---|")
    losses: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        prompts.write_text(
            "".join(json.dumps({"prompt": f"Fault bench prompt {i}"}) + "\n" for i in range(args.prompts))
        )
        constitution = Path(tmp) / "constitution.txt"
        constitution.write_text('Answer {"chosen": x, "rejected": y}.\n')
        for name, faults in MIXES.items():
            with FakeServer(FakeConfig(latency=args.latency, faults=faults, seed=1)) as server:
                cfg = build_config(
                    {
                        "prompts_path": prompts,
                        "constitution_path": constitution,
                        "output_dir": Path(tmp) / name.replace(" ", "_").replace("%", ""),
                        "policy": {"url": f"{server.url}/v1", "model": "p"},
                        "judge": {"url": f"{server.url}/v1", "model": "j"},
                        "request_timeout": 2.0,
                        "retry_backoff": 0.05,
                        "max_failure_rate": 1.0,
                        "quiet": True,
                    }
                )
                started = time.perf_counter()
                result = run(cfg, fresh=True)
                elapsed = time.perf_counter() - started
                s = result.stats
                lost = args.prompts - result.pairs
                print(
                    f"| {name} | {result.pairs} | {lost} | {len(result.failures)} | "
                    f"{sum(s.retries.values())} | {sum(s.requests.values())} | {elapsed:.1f} |"
                )
                losses += [f"{name}: {f.stage}: {f.reason}: {f.detail[:300]}" for f in result.failures]
    if losses:
        print("\nwhy pairs were lost:\n" + "\n".join(losses))


if __name__ == "__main__":
    main()
