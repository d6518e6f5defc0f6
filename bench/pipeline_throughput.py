"""Pipeline throughput against the fake servers with a fixed latency, beside the ideal for the concurrency used.

The ideal is what a perfect scheduler would reach: every request slot busy all the time. For the OpenAI path
each prompt needs T policy requests and one judge request, so ideal = min(P / (L*T), J / L) prompts/s for P
policy and J judge slots at latency L. For NeMo a policy request carries a batch of B prompts:
min(P*B / (L*T), J / L). The seed (NeMo-Aligner's script) sends one judge request at a time: 1 / L at best.

    .venv/bin/python bench/pipeline_throughput.py --prompts 2000 --latency 0.2

The fake server runs in its own process so that its CPU is not charged to caiforge's event loop.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from caiforge import build_config, run
from servers import CONSTITUTION, start_server


def one_run(
    kind: str, url: str, n: int, workdir: Path, policy_conc: int, judge_conc: int, batch: int, adaptive: bool = True
) -> float:
    prompts = workdir / f"prompts-{kind}.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Bench prompt {kind} {i}"}) + "\n" for i in range(n)))
    constitution = workdir / "constitution.txt"
    constitution.write_text(CONSTITUTION)
    host, port = url.removeprefix("http://").split(":")
    policy = (
        {"backend": "nemo", "host": host, "port": int(port), "batch_size": batch, "concurrency": policy_conc}
        if kind == "nemo"
        else {"backend": "openai-chat", "url": f"{url}/v1", "model": "fake", "concurrency": policy_conc}
    )
    cfg = build_config(
        {
            "prompts_path": prompts,
            "constitution_path": constitution,
            "output_dir": workdir / f"out-{kind}",
            "policy": policy,
            "judge": {"backend": "openai", "url": f"{url}/v1", "model": "fake", "concurrency": judge_conc},
            "quiet": True,
            "adaptive_concurrency": adaptive,
        }
    )
    started = time.perf_counter()
    result = run(cfg, fresh=True)
    elapsed = time.perf_counter() - started
    assert result.pairs == n, result.summary()
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=2000)
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--policy-concurrency", type=int, default=64)
    ap.add_argument("--judge-concurrency", type=int, default=32)
    ap.add_argument("--nemo-batch", type=int, default=128)
    ap.add_argument("--nemo-concurrency", type=int, default=4)
    ap.add_argument("--fixed-concurrency", action="store_true", help="no adaptive concurrency (for comparison)")
    args = ap.parse_args()
    temps, lat = 4, args.latency
    proc, url = start_server("--latency", str(lat))
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for kind in ("openai-chat", "nemo"):
                pc = args.nemo_concurrency if kind == "nemo" else args.policy_concurrency
                batch = args.nemo_batch if kind == "nemo" else 1
                elapsed = one_run(
                    kind, url, args.prompts, Path(tmp), pc, args.judge_concurrency, batch, not args.fixed_concurrency
                )
                ideal = min(pc * batch / (lat * temps), args.judge_concurrency / lat)
                measured = args.prompts / elapsed
                rows.append((kind, pc, batch, args.judge_concurrency, elapsed, measured, ideal))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    print(f"\n{args.prompts} prompts, {temps} temperatures, latency {lat * 1000:.0f} ms per request\n")
    print("| policy | policy slots x batch | judge slots | wall s | prompts/s | ideal prompts/s | of ideal |")
    print("|---|---|---|---|---|---|---|")
    for kind, pc, batch, jc, elapsed, measured, ideal in rows:
        print(
            f"| {kind} | {pc} x {batch} | {jc} | {elapsed:.1f} | {measured:.1f} | {ideal:.1f} | "
            f"{measured / ideal:.0%} |"
        )
    print(f"\nThe seed's sequential judge caps it at {1 / lat:.1f} prompts/s at this latency.")


if __name__ == "__main__":
    main()
