"""The same input through the local engine and the Ray engine (``--engine ray``), wall time of each.

Ray runs twice: cold (the run starts and stops its own local instance, what ``caiforge run --engine ray`` does
on a machine with no cluster) and warm (an instance already running, as on a cluster after ``ray start``), so the
start-up cost and the steady-state cost are seen apart. Every run must give the local run's dataset files.

    .venv/bin/python bench/ray_vs_local.py --prompts 2000 --latency 0.05

Needs ``caiforge[ray]`` (``make test-ray`` installs it). The fake server runs in its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from caiforge import build_config, run
from servers import CONSTITUTION, start_server

NOT_DATA = ("caiforge.db", "caiforge.db-wal", "caiforge.db-shm", "caiforge.db.lock", "manifest.json", "README.md")


def data_files(out: Path) -> dict[str, bytes]:
    files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    return {k: v for k, v in files.items() if k not in NOT_DATA and not k.startswith("report")}


def one_run(url: str, workdir: Path, name: str, args: argparse.Namespace, **engine: Any) -> float:
    cfg = build_config(
        {
            "prompts_path": workdir / "prompts.jsonl",
            "constitution_path": workdir / "constitution.txt",
            "output_dir": workdir / name,
            "policy": {
                "backend": "openai-chat",
                "url": f"{url}/v1",
                "model": "fake",
                "concurrency": args.policy_concurrency,
            },
            "judge": {"backend": "openai", "url": f"{url}/v1", "model": "fake", "concurrency": args.judge_concurrency},
            "quiet": True,
            **engine,
        }
    )
    started = time.perf_counter()
    result = run(cfg, fresh=True)
    elapsed = time.perf_counter() - started
    assert result.pairs == args.prompts, result.summary()
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=2000)
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--policy-concurrency", type=int, default=64)
    ap.add_argument("--judge-concurrency", type=int, default=32)
    ap.add_argument("--actors", type=int, default=None, help="Ray actors (default: one per 2 CPUs)")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a loopback instance of our own
    import ray

    temps, lat = 4, args.latency
    ideal = args.prompts / min(args.policy_concurrency / (lat * temps), args.judge_concurrency / lat)
    ray_cfg = {"engine": "ray", "ray_actors": args.actors}
    proc, url = start_server("--latency", str(lat))
    rows: list[tuple[str, float]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            lines = (json.dumps({"prompt": f"Bench prompt {i}"}) + "\n" for i in range(args.prompts))
            (work / "prompts.jsonl").write_text("".join(lines), encoding="utf-8")
            (work / "constitution.txt").write_text(CONSTITUTION, encoding="utf-8")
            rows.append(("local", one_run(url, work, "local", args)))
            rows.append(("ray, cold (starts and stops its own instance)", one_run(url, work, "cold", args, **ray_cfg)))
            started = time.perf_counter()
            ray.init(include_dashboard=False, logging_level="WARNING", log_to_driver=False)
            ray_start = time.perf_counter() - started
            try:
                rows.append(("ray, warm (instance already running)", one_run(url, work, "warm", args, **ray_cfg)))
            finally:
                ray.shutdown()
            expected = data_files(work / "local")
            for name in ("cold", "warm"):
                assert data_files(work / name) == expected, f"ray ({name}) wrote other files than local"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    print(f"\n{args.prompts} prompts, {temps} temperatures, latency {lat * 1000:.0f} ms, {os.cpu_count()} CPUs")
    print(f"policy {args.policy_concurrency} / judge {args.judge_concurrency} requests in flight in all\n")
    print("| engine | wall s | of ideal |")
    print("|---|---|---|")
    for name, elapsed in rows:
        print(f"| {name} | {elapsed:.1f} | {ideal / elapsed:.0%} |")
    print(f"\nideal (every request slot busy): {ideal:.1f} s; ray.init of a local instance alone: {ray_start:.1f} s")
    print("Every Ray run wrote the local run's dataset files, byte for byte.")


if __name__ == "__main__":
    main()
