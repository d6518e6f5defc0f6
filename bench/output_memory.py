"""Peak RSS and time of writing a finished run's files from its store, at N pairs (issue #11: memory flat in N).

For each N a child process fills a store with N synthetic finished results through the Store API (prompts, the
run descriptor, one ``PairRecord``/``FailureRecord`` JSON per prompt: about 2 KB each, as a real RL-CAI run at
four temperatures). A second child, started fresh, calls ``pipeline.write_run`` on it (the function ``run`` ends
with) and reports its wall time and its peak RSS (``ru_maxrss``), so filling the store never counts. The report
(``report.md`` and its plots) reads the files back; it is left out by default (``--with-report`` adds it) to
measure the writers alone. pandas is not a dependency of caiforge, but the dev install has it (for
``datasets``), and pyarrow imports it at its first conversion: ``--without-pandas`` hides it, as a plain
``pip install caiforge`` would.

    flock /tmp/caiforge-cpu.lock .venv/bin/python bench/output_memory.py --n 10000 100000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FORMATS = ["nemo-rm", "nemo-dpo", "nemo-rl", "trl", "trl-kto"]
TEMPERATURES = [0.01, 0.51, 1.01, 1.51]
TARGET_MB = 300  # the whole client at 1M prompts (issue #11)


def _config(out: Path) -> object:
    from caiforge.config import build_config

    return build_config(
        {
            "output_dir": out,
            "formats": FORMATS,
            "judge": {"mode": "principle", "passes": 2, "backend": "openai", "url": "http://x/v1", "model": "m"},
            "policy": {"backend": "openai-chat", "url": "http://x/v1", "model": "m"},
        }
    )


def _words(rng: random.Random, n: int) -> str:
    vocab = ["the", "answer", "safe", "harm", "refuse", "café", "because", "people", "would", "never", "help"]
    return " ".join(rng.choice(vocab) for _ in range(n))


def fill(out: Path, n: int) -> None:
    """N prompts: 1 in 50 a failure (half with all candidates kept), 1 in 200 an unusable pair (empty chosen)."""
    from caiforge.records import FailureRecord, PairRecord, RunDescriptor, prompt_id
    from caiforge.store import Store

    cfg = _config(out)
    out.mkdir(parents=True, exist_ok=True)
    store = Store.open(out, fresh=True)
    attempt = store.begin_attempt({})
    rng = random.Random(n)
    prompts = [(prompt_id(f"p{i}"), f"p{i}") for i in range(n)]
    descriptor = RunDescriptor(
        pipeline="rlcai",
        settings={"temperatures": TEMPERATURES},
        identities={"policy": {"backend": "bench", "model": "m"}, "judge": {"backend": "bench", "model": "m"}},
        config=cfg.public_dict(),  # type: ignore[attr-defined]
        attempt=attempt,
    )
    store.set_prompts(prompts)
    descriptor.save(store)
    key = descriptor.key()
    store.put_failure(stage="input", reason="bad record", detail="not JSON", source="in.jsonl", line=3)
    store.db.execute("BEGIN")
    for i, (pid, _) in enumerate(prompts):
        prompt = f"p{i} " + _words(rng, 30) + (" \u2028 \U0001f600" if i % 97 == 0 else "")
        responses = {t: _words(rng, 60) for t in TEMPERATURES}
        if i % 50 == 7:
            kept = responses if i % 100 == 7 else None
            record = FailureRecord(
                prompt_id=pid,
                prompt=prompt,
                stage="judge",
                reason="inconsistent",
                detail="passes disagree",
                responses=kept,
            )
            store.put_result(pid, key, "failure", record.to_json())
            continue
        if i % 200 == 11:
            responses[0.01] = "   "
        order = tuple(rng.sample(TEMPERATURES, 4))
        pair = PairRecord(
            prompt_id=pid,
            prompt=prompt,
            responses=responses,
            chosen_t=0.01,
            rejected_t=1.51,
            explanation=_words(rng, 40),
            order_t=order,
            chosen_position=order.index(0.01),
            rejected_position=order.index(1.51),
            consistent=True,
            chosen_prob=round(rng.random(), 4),
            principle=_words(rng, 12),
        )
        store.put_result(pid, key, "pair", pair.to_json())
    store.db.execute("COMMIT")
    store.close()


class _NoPandas:
    """A meta-path finder that makes ``import pandas`` fail, as where it is not installed."""

    def find_spec(self, name: str, path: object, target: object = None) -> None:
        if name.split(".")[0] == "pandas":
            raise ImportError("pandas hidden by bench/output_memory.py --without-pandas")


def write(out: Path, with_report: bool, without_pandas: bool = False) -> dict[str, float]:
    """``write_run`` on the filled store, in this (fresh) process; the figures as one JSON line."""
    if without_pandas:
        sys.meta_path.insert(0, _NoPandas())  # type: ignore[arg-type]
    import caiforge.pipeline as pipeline
    from caiforge.engine import Stats
    from caiforge.records import RunDescriptor
    from caiforge.store import Store

    if not with_report:
        pipeline.write_report = lambda output_dir, pairs=None: output_dir  # type: ignore[assignment,return-value]
    cfg = _config(out)
    store = Store.open(out)
    descriptor = RunDescriptor.load(store)
    assert descriptor is not None
    n = store.count_results(descriptor.key())[0]
    inputs = pipeline.Inputs(path=out / "prompts.jsonl", records=n, bad=[], constitution="c", unique=n)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.monotonic()
    result = pipeline.write_run(cfg, store, descriptor, inputs, Stats(), [], {}, time.time(), started)  # type: ignore[arg-type]
    elapsed = time.monotonic() - started
    store.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and "caiforge.db" not in p.name)
    return {"pairs": result.pairs, "seconds": elapsed, "peak_mb": peak, "import_mb": base, "output_mb": size / 2**20}


def child(*args: str) -> str:
    done = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--with-report", action="store_true", help="also write report.md and its plots")
    parser.add_argument("--without-pandas", action="store_true", help="hide pandas, as a plain install has none")
    parser.add_argument("--keep", type=Path, help="fill and write under this folder and keep it")
    parser.add_argument("--_fill", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--_write", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._fill:
        fill(args._fill, args.n[0])
        return
    if args._write:
        print(json.dumps(write(args._write, args.with_report, args.without_pandas)))
        return
    print(
        f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}; target: under {TARGET_MB} MB at 1M; "
        f"report {'in' if args.with_report else 'left out'}; pandas {'hidden' if args.without_pandas else 'importable'}"
    )
    for n in args.n:
        root = args.keep or Path(tempfile.mkdtemp(prefix="caiforge-outmem-"))
        out = root / f"n{n}"
        try:
            t = time.monotonic()
            child("--_fill", str(out), "--n", str(n))
            filled = time.monotonic() - t
            db_mb = (out / "caiforge.db").stat().st_size / 2**20
            extra = ["--with-report"] * args.with_report + ["--without-pandas"] * args.without_pandas
            figures = json.loads(child("--_write", str(out), *extra))
            print(
                f"N={n:>9,}: write_run {figures['seconds']:7.1f} s, peak RSS {figures['peak_mb']:7.1f} MB "
                f"(after imports {figures['import_mb']:.1f} MB); {figures['pairs']:,} pairs, "
                f"{figures['output_mb']:,.0f} MB of files from a {db_mb:,.0f} MB store (filled in {filled:.0f} s)",
                flush=True,
            )
        finally:
            if args.keep is None:
                shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
