"""``caiforge revise`` throughput against the fake server at a fixed latency, beside the ideal and the seed.

Each prompt is a chain of 1 + 2R requests (initial, then a critique and a revision per round), each waiting for
the last. With C requests in flight at latency L the ideal is min(C / L, N * (1 + 2R) / (L * (1 + 2R))) requests
a second: every slot busy, or, with fewer prompts than slots, every chain running at once, so the ideal wall time
is max(N * (1 + 2R) * L / C, (1 + 2R) * L). NeMo's batches of B carry B requests each: C * B in flight. The seed
sends one batch per stage and waits for it, stage after stage, batch after batch: (1 + 2R) * L per batch of B.

    .venv/bin/python bench/revise_throughput.py --prompts 2000 --latency 0.2

The fake server runs in its own process so that its CPU is not charged to caiforge's event loop.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from caiforge import revise, revise_config
from servers import start_server


def one_run(kind: str, url: str, n: int, workdir: Path, conc: int, batch: int, rounds: int) -> tuple[float, int]:
    prompts = workdir / f"prompts-{kind}.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Revise bench prompt {kind} {i}"}) + "\n" for i in range(n)))
    host, port = url.removeprefix("http://").split(":")
    policy = (
        {"backend": "nemo", "host": host, "port": int(port), "batch_size": batch, "concurrency": conc}
        if kind == "nemo"
        else {"backend": "openai-chat", "url": f"{url}/v1", "model": "fake", "concurrency": conc}
    )
    cfg = revise_config(
        {
            "prompts_path": prompts,
            "output_dir": workdir / f"out-{kind}",
            "policy": policy,
            "quiet": True,
            "revise": {"revisions": rounds},
        }
    )
    started = time.perf_counter()
    result = revise(cfg, fresh=True)
    elapsed = time.perf_counter() - started
    assert result.revised == n, result.summary()
    return elapsed, result.stats.requests["policy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=2000)
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--revisions", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=256, help="OpenAI requests in flight (caiforge's default)")
    ap.add_argument("--nemo-batch", type=int, default=32, help="the SL seed's --batch_size")
    ap.add_argument("--nemo-concurrency", type=int, default=4)
    args = ap.parse_args()
    n, lat, steps = args.prompts, args.latency, 1 + 2 * args.revisions
    proc, url = start_server("--latency", str(lat))
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for kind in ("openai-chat", "nemo"):
                conc = args.nemo_concurrency if kind == "nemo" else args.concurrency
                batch = args.nemo_batch if kind == "nemo" else 1
                elapsed, calls = one_run(kind, url, n, Path(tmp), conc, batch, args.revisions)
                ideal = max(n * steps * lat / (conc * batch), steps * lat)
                rows.append((kind, conc, batch, elapsed, calls, n * steps / elapsed, n * steps / ideal, ideal))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    seed = -(-n // args.nemo_batch) * steps * lat
    print(f"\n{n} prompts, {args.revisions} round(s): {n * steps} requests, latency {lat * 1000:.0f} ms\n")
    print("| policy | slots x batch | wall s | calls | requests/s | ideal requests/s | of ideal |")
    print("|---|---|---|---|---|---|---|")
    for kind, conc, batch, elapsed, calls, rate, ideal_rate, _ in rows:
        print(
            f"| {kind} | {conc} x {batch} | {elapsed:.1f} | {calls} | {rate:.0f} | {ideal_rate:.0f} | "
            f"{rate / ideal_rate:.0%} |"
        )
    print(
        f"\nThe seed (one batch of {args.nemo_batch} a stage at a time): {seed:.0f} s, "
        f"{n * steps / seed:.0f} requests/s."
    )


if __name__ == "__main__":
    main()
