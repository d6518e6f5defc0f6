"""Benchmark async HTTP clients for caiforge's OpenAI-compatible backend.

Why: caiforge keeps ~64-256 JSON POSTs (chat completions) in flight against an OpenAI-compatible
server over plain HTTP, usually on small (2-core) machines where the client's CPU per request
decides how much is left for everything else. This script picks the HTTP client by measurement
instead of by reputation.

What: a minimal aiohttp server runs in a *separate process* (so its CPU is not charged to the
client) on 127.0.0.1 with a random port; it answers ``POST /v1/chat/completions`` with a ~1 KB
chat-completion JSON after ``asyncio.sleep(latency)``. Each client sends N ~3 KB chat requests
under an ``asyncio.Semaphore(C)`` through one reused session/client:

* ``aiohttp``        - ``ClientSession(TCPConnector(limit=C))``, ``await resp.json()``
* ``httpx``          - ``AsyncClient(limits=Limits(max_connections=C, max_keepalive_connections=C))``,
  ``resp.json()``
* ``aiohttp+orjson`` - as ``aiohttp`` with orjson for dumps/loads (only if orjson is importable)

Reported per client (median over ``--repeat`` runs): wall time, requests/s, client process CPU
seconds (``time.process_time``) per 1000 requests, p50/p99 request latency, each beside the ideal
(``C / latency`` req/s) when latency > 0. Output: a markdown table on stdout and the same data as
JSON in ``bench/results/http_clients.json``. ``--latency`` takes one or more values (default
0.0 and 0.2). A run with latency > 0 cannot finish faster than ``N * latency / C`` seconds (15.6 s
for 5000 requests at 0.2 s and C=64), so those runs are capped at ``--latency-requests`` (2000).

Run (about 2 minutes with the defaults on 2 cores)::

    .venv/bin/python bench/http_clients.py
    .venv/bin/python bench/http_clients.py --requests 2000 --concurrency 256 --latency 0.2 --repeat 1
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.metadata
import json
import math
import multiprocessing as mp
import os
import platform
import socket
import statistics
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
import httpx
from aiohttp import web

try:
    import orjson
except ImportError:  # optional third contender
    orjson = None

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "http_clients.json"
CHAT_PATH = "/v1/chat/completions"
STATS_PATH = "/_bench/cpu"
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
REQUEST_TIMEOUT_S = 60.0

# One request: a function that sends the payload and returns the parsed JSON body.
SendFn = Callable[[], Awaitable[Any]]


# --------------------------------------------------------------------------- payloads


def build_request_payload() -> dict[str, Any]:
    """A realistic ~3 KB chat request: ~2 KB system prompt (constitution) plus a user turn."""
    principle = (
        "Identify specific ways in which the assistant's last response is harmful, unethical, "
        "racist, sexist, toxic, dangerous, or illegal, and rewrite it to remove such content. "
    )
    system = ("You are a careful critique-and-revision assistant. " + principle * 12)[:2048]
    user = (
        "Human: Can you help me write a polite email asking my landlord to fix the heating? "
        "It has been broken for two weeks and the apartment is very cold at night.\n\n"
        "Assistant: Sure. Here is a short, polite email you can adapt: 'Dear Mr. Smith, I hope "
        "you are well. I am writing to let you know that the heating in apartment 4B has not "
        "worked for the past two weeks. Could you please arrange a repair at your earliest "
        "convenience? Thank you very much.'\n\nCritiqueRequest: " + principle + "\n\nCritique:"
    )
    return {
        "model": MODEL,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "temperature": 0.7,
        "top_p": 0.95,
        "max_tokens": 256,
        "stop": ["\n\nHuman:", "\n\nCritiqueRequest:"],
        "stream": False,
        "n": 1,
    }


def build_response_body() -> bytes:
    """A realistic ~1 KB OpenAI chat-completion response."""
    content = (
        "The response is polite and helpful and contains no harmful, unethical, racist, sexist, "
        "toxic, dangerous or illegal content. It could be improved by suggesting the tenant keep "
        "a written record of the request and mention any relevant tenancy obligations, but it is "
        "appropriate as written. No revision is needed for safety; a small clarity edit would add "
        "the exact dates the heating failed and offer times when access to the flat is possible. "
        "Revision: Dear Mr. Smith, the heating in apartment 4B has not worked since 12 November. "
        "Could you please arrange a repair this week? I am at home after 5 pm. Thank you."
    )
    body = {
        "id": "chatcmpl-9f1c2b7e4a3d4e8f9a0b1c2d3e4f5a6b",
        "object": "chat.completion",
        "created": 1_732_780_000,
        "model": MODEL,
        "system_fingerprint": "fp_44709d6fcb",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "tool_calls": []},
                "logprobs": None,
                "finish_reason": "stop",
                "stop_reason": None,
            }
        ],
        "usage": {"prompt_tokens": 712, "completion_tokens": 96, "total_tokens": 808},
    }
    return json.dumps(body).encode()


# --------------------------------------------------------------------------- server process


def _serve(latency: float, conn: Connection) -> None:
    """Server process entry point: bind a random port, report it through ``conn``, serve forever."""
    body = build_response_body()

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        if latency > 0:
            await asyncio.sleep(latency)
        return web.Response(body=body, content_type="application/json")

    async def cpu(_request: web.Request) -> web.Response:
        return web.json_response({"process_time": time.process_time()})

    async def main() -> None:
        app = web.Application()
        app.router.add_post(CHAT_PATH, chat)
        app.router.add_get(STATS_PATH, cpu)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        site = web.SockSite(runner, sock, backlog=1024)
        await site.start()
        conn.send(sock.getsockname()[1])
        conn.close()
        await asyncio.Event().wait()

    asyncio.run(main())


class ServerProcess:
    """The benchmark server in a child process; usable as a context manager."""

    def __init__(self, latency: float) -> None:
        self.latency = latency
        ctx = mp.get_context("spawn")
        self._parent, child = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_serve, args=(latency, child), daemon=True)
        self._child = child
        self.port = 0

    def __enter__(self) -> ServerProcess:
        self._proc.start()
        self._child.close()
        if not self._parent.poll(30):
            self._proc.kill()
            raise RuntimeError("benchmark server did not start within 30 s")
        self.port = int(self._parent.recv())
        return self

    def __exit__(self, *_exc: object) -> None:
        self._proc.terminate()
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float:
        """Server process CPU time so far (fetched synchronously, outside any timed region)."""
        with urllib.request.urlopen(self.base_url + STATS_PATH, timeout=10) as resp:
            return float(json.load(resp)["process_time"])


# --------------------------------------------------------------------------- clients


@dataclass
class RunResult:
    wall_s: float
    rps: float
    cpu_s_per_1k: float
    p50_ms: float
    p99_ms: float
    errors: int
    server_cpu_util: float  # server CPU seconds / wall seconds (1.0 = server saturated one core)


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    idx = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[idx]


async def _drive(send: SendFn, n: int, concurrency: int) -> tuple[list[float], int]:
    """Send ``n`` requests with at most ``concurrency`` in flight; return latencies (s) and errors."""
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    errors = 0

    async def one() -> None:
        nonlocal errors
        async with sem:
            t0 = time.perf_counter()
            try:
                data = await send()
                if not data["choices"][0]["message"]["content"]:
                    raise ValueError("empty completion")
            except Exception:
                errors += 1
                return
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(one() for _ in range(n)))
    return latencies, errors


async def _measure(send: SendFn, n: int, concurrency: int, server: ServerProcess) -> RunResult:
    await _drive(send, concurrency, concurrency)  # warm-up: open the connection pool, not timed
    gc.collect()
    srv0 = server.cpu_seconds()
    cpu0, t0 = time.process_time(), time.perf_counter()
    latencies, errors = await _drive(send, n, concurrency)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    srv_cpu = server.cpu_seconds() - srv0
    latencies.sort()
    return RunResult(
        wall_s=wall,
        rps=n / wall,
        cpu_s_per_1k=cpu / n * 1000,
        p50_ms=_percentile(latencies, 0.50) * 1000,
        p99_ms=_percentile(latencies, 0.99) * 1000,
        errors=errors,
        server_cpu_util=srv_cpu / wall,
    )


async def run_aiohttp(
    server: ServerProcess, payload: dict[str, Any], n: int, c: int, use_orjson: bool = False
) -> RunResult:
    url = server.base_url + CHAT_PATH
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    session_kwargs: dict[str, Any] = {}
    loads: Callable[[str], Any] = json.loads
    if use_orjson:
        assert orjson is not None
        session_kwargs["json_serialize"] = lambda obj: orjson.dumps(obj).decode()
        loads = orjson.loads
    connector = aiohttp.TCPConnector(limit=c)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, **session_kwargs) as session:

        async def send() -> Any:
            async with session.post(url, json=payload) as resp:
                resp.raise_for_status()
                return await resp.json(loads=loads)

        return await _measure(send, n, c, server)


async def run_httpx(server: ServerProcess, payload: dict[str, Any], n: int, c: int) -> RunResult:
    url = server.base_url + CHAT_PATH
    # max_keepalive_connections defaults to 20; leaving it there would make httpx close and
    # reopen connections whenever more than 20 are in flight, which is not a fair comparison.
    limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
    async with httpx.AsyncClient(limits=limits, timeout=REQUEST_TIMEOUT_S) as client:

        async def send() -> Any:
            resp = await client.post(url, json=payload)
            resp.raise_for_status()
            return resp.json()

        return await _measure(send, n, c, server)


ClientRunner = Callable[[ServerProcess, dict[str, Any], int, int], Awaitable[RunResult]]


def client_runners() -> dict[str, ClientRunner]:
    runners: dict[str, ClientRunner] = {"aiohttp": run_aiohttp, "httpx": run_httpx}
    if orjson is not None:

        async def run_aiohttp_orjson(s: ServerProcess, p: dict[str, Any], n: int, c: int) -> RunResult:
            return await run_aiohttp(s, p, n, c, use_orjson=True)

        runners["aiohttp+orjson"] = run_aiohttp_orjson
    return runners


# --------------------------------------------------------------------------- reporting


def _median_result(runs: list[RunResult]) -> RunResult:
    fields = RunResult.__dataclass_fields__
    med = {name: statistics.median(getattr(r, name) for r in runs) for name in fields}
    med["errors"] = sum(r.errors for r in runs)
    return RunResult(**med)


def _ideal(latency: float, n: int, c: int) -> dict[str, float | None]:
    if latency <= 0:
        return {"rps": None, "wall_s": None, "p50_ms": None, "p99_ms": None}
    return {
        "rps": c / latency,
        "wall_s": math.ceil(n / c) * latency,
        "p50_ms": latency * 1000,
        "p99_ms": latency * 1000,
    }


def _cell(measured: float, ideal: float | None, fmt: str) -> str:
    if ideal is None:
        return f"{measured:{fmt}} (—)"
    return f"{measured:{fmt}} ({ideal:{fmt}})"


def render_table(rows: list[dict[str, Any]]) -> str:
    header = (
        "| latency s | N | client | wall s (ideal) | req/s (ideal) | client CPU s / 1k req "
        "| p50 ms (ideal) | p99 ms (ideal) | server CPU util | errors |"
    )
    lines = [header, "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        m, i = row["median"], row["ideal"]
        lines.append(
            f"| {row['latency_s']:.1f} | {row['requests']} | {row['client']} "
            f"| {_cell(m['wall_s'], i['wall_s'], '.2f')} "
            f"| {_cell(m['rps'], i['rps'], '.0f')} "
            f"| {m['cpu_s_per_1k']:.3f} "
            f"| {_cell(m['p50_ms'], i['p50_ms'], '.1f')} "
            f"| {_cell(m['p99_ms'], i['p99_ms'], '.1f')} "
            f"| {m['server_cpu_util']:.0%} "
            f"| {m['errors']} |"
        )
    return "\n".join(lines)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=5000, help="requests per measured run")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight (and pool size)")
    parser.add_argument(
        "--latency",
        type=float,
        nargs="+",
        default=[0.0, 0.2],
        help="server-side delay(s) in seconds; each value is benchmarked (default: 0.0 and 0.2)",
    )
    parser.add_argument(
        "--latency-requests",
        type=int,
        default=2000,
        help="cap on requests per run when latency > 0 (a run takes at least N*latency/C seconds; "
        "2000 keeps the default run near 2 minutes on 2 cores; 0 = no cap, use --requests)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per client; the median is reported")
    parser.add_argument("--output", type=Path, default=RESULTS_PATH, help="JSON results file")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.repeat < 1:
        parser.error("--requests, --concurrency and --repeat must be >= 1")
    if min(args.latency) < 0 or args.latency_requests < 0:
        parser.error("--latency and --latency-requests must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runners = client_runners()
    payload = build_request_payload()
    request_bytes = len(json.dumps(payload).encode())
    response_bytes = len(build_response_body())
    print(
        f"# HTTP client benchmark: N={args.requests} (cap {args.latency_requests} when latency > 0) "
        f"C={args.concurrency} repeat={args.repeat} "
        f"latency={args.latency} request={request_bytes} B response={response_bytes} B "
        f"clients={list(runners)} cpus={os.cpu_count()}",
        file=sys.stderr,
    )
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for latency in args.latency:
        n = args.requests
        if latency > 0 and args.latency_requests:
            n = min(n, args.latency_requests)
        runs: dict[str, list[RunResult]] = {name: [] for name in runners}
        with ServerProcess(latency) as server:
            for rep in range(args.repeat):
                names = list(runners)
                names = names[rep % len(names) :] + names[: rep % len(names)]  # rotate order per repeat
                for name in names:
                    result = asyncio.run(runners[name](server, payload, n, args.concurrency))
                    runs[name].append(result)
                    print(
                        f"  latency={latency} rep={rep + 1} {name}: {result.rps:.0f} req/s, "
                        f"{result.cpu_s_per_1k:.3f} CPU s/1k, errors={result.errors}",
                        file=sys.stderr,
                    )
        for name, results in runs.items():
            rows.append(
                {
                    "latency_s": latency,
                    "client": name,
                    "requests": n,
                    "concurrency": args.concurrency,
                    "median": asdict(_median_result(results)),
                    "ideal": _ideal(latency, n, args.concurrency),
                    "runs": [asdict(r) for r in results],
                }
            )

    table = render_table(rows)
    print(table)
    elapsed = time.perf_counter() - started
    print(
        f"\nmedian of {args.repeat} runs; ideal = C/latency req/s, ceil(N/C)*latency wall, latency p50/p99; "
        f"server CPU util = server-process CPU s / wall s (~100% means the server, not the client, "
        f"limits throughput); total {elapsed:.0f} s"
    )

    report = {
        "benchmark": "http_clients",
        "description": "concurrent OpenAI-style JSON POSTs against a local aiohttp server in another process",
        "params": {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "latencies_s": args.latency,
            "latency_requests_cap": args.latency_requests,
            "repeat": args.repeat,
            "request_bytes": request_bytes,
            "response_bytes": response_bytes,
        },
        "environment": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "aiohttp": _version("aiohttp"),
            "httpx": _version("httpx"),
            "orjson": _version("orjson"),
        },
        "results": rows,
        "markdown": table,
        "elapsed_s": elapsed,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
