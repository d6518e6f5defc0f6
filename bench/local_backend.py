"""Cost of caiforge's local backend over plain llama-cpp-python, and the wall time of the default run.

Both sides generate the same responses (same weights, prompts, temperatures, seeds, max tokens, threads); the
plain side sends them one at a time through ``create_chat_completion``, the backend side goes through the whole
engine (limiter, retries, store commits, worker thread) and decodes a prompt's candidates in one batch, as a run
does. Before batching the target was an overhead under 10% in tokens/s; now the backend is faster. Run alone
on the machine: llama.cpp is CPU-bound and anything else running skews both sides.

    .venv/bin/python bench/local_backend.py [--prompts 12] [--max-tokens 64] [--default-run]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from caiforge import build_config
from caiforge.backends.local import LocalModelBackend, default_threads, policy_options
from caiforge.bundled import PROMPTS, path
from caiforge.engine import EndpointSettings, Engine
from caiforge.inputs import read_prompts
from caiforge.request import Request
from caiforge.store import Store

TEMPS = (0.01, 0.51, 1.01, 1.51)


def plain(
    prompts: list[str], max_tokens: int, seeds: dict[tuple[str, float], int], threads: int, policy: LocalModelBackend
) -> tuple[int, float]:
    """The same requests through ``create_chat_completion`` one at a time, on the weights the backend loaded (the
    bundled model's f16 copy, with flash attention): what is left between the two is batching and the engine."""
    from llama_cpp import Llama

    f16 = policy.identity().get("weights") == "f16"
    llm = Llama(model_path=policy._model.llm.model_path, n_ctx=4096, n_threads=threads, verbose=False, flash_attn=f16)
    tokens, started = 0, time.perf_counter()
    for prompt in prompts:
        for t in TEMPS:
            out = llm.create_chat_completion(
                messages=[{"role": "user", "content": prompt}],
                temperature=t,
                top_p=0.95,
                top_k=50,
                repeat_penalty=1.0,
                max_tokens=max_tokens,
                seed=seeds[(prompt, t)],
            )
            tokens += out["usage"]["completion_tokens"]
    return tokens, time.perf_counter() - started


def ask(prompt: str, t: float) -> Request:
    return Request(messages=[{"role": "user", "content": prompt}], temperature=t)


def backend(prompts: list[str], max_tokens: int, threads: int) -> tuple[int, float, LocalModelBackend]:
    cfg = build_config(
        {"policy": {"backend": "local", "sampling": {"tokens_to_generate": max_tokens}}, "local": {"threads": threads}}
    )
    policy = LocalModelBackend(policy_options(cfg))
    settings = EndpointSettings(concurrency=policy.default_concurrency, max_retries=0)  # a prompt's candidates at once

    async def go() -> tuple[float, int]:
        with tempfile.TemporaryDirectory() as tmp:
            engine = Engine({"policy": (policy, settings)}, Store(Path(tmp) / "bench.db"), seed=cfg.seed)
            started = time.perf_counter()
            await asyncio.gather(*(engine.ask("policy", ask(p, t)) for p in prompts for t in TEMPS))
            elapsed = time.perf_counter() - started
            return elapsed, engine.stats.tokens["policy_completion"]

    elapsed, tokens = asyncio.run(go())
    return tokens, elapsed, policy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--default-run", action="store_true", help="also time `caiforge run` on the bundled defaults")
    args = ap.parse_args()
    prompts = [r.text for r in read_prompts(path(PROMPTS))[0][: args.prompts]]
    rows = []
    for _ in range(args.repeat):
        b_tokens, b_time, policy = backend(prompts, args.max_tokens, args.threads)
        seeds = {(p, t): policy._seed(ask(p, t)) for p in prompts for t in TEMPS}
        p_tokens, p_time = plain(prompts, args.max_tokens, seeds, args.threads, policy)
        rows.append((p_tokens / p_time, b_tokens / b_time, p_tokens, b_tokens))
    plain_tps = max(r[0] for r in rows)
    backend_tps = max(r[1] for r in rows)
    result = {
        "generations": len(prompts) * len(TEMPS),
        "threads": args.threads,
        "max_tokens": args.max_tokens,
        "plain_tokens_per_s": round(plain_tps, 1),
        "backend_tokens_per_s": round(backend_tps, 1),
        "overhead_pct": round(100 * (1 - backend_tps / plain_tps), 1),
        "same_token_count": all(r[2] == r[3] for r in rows),  # the texts are equal too: tests/test_local_model.py
    }
    if args.default_run:
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "caiforge", "run", "--quiet"], cwd=tmp, check=True, stdout=subprocess.DEVNULL
            )
            result["default_run_wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
