"""A fake policy/judge inference server speaking real HTTP on localhost.

Integration tests and benchmarks need a server that behaves like NeMo's ``PUT /generate`` and vLLM's
OpenAI-compatible endpoints, answers deterministically, and misbehaves on demand (latency, 5xx, 429,
hangs, resets, truncated bodies) without GPUs. Latency is ``asyncio.sleep``, so hundreds of concurrent
requests are free.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import random
import re
import signal
import socket
import struct
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

PATHS = {"/generate": "PUT", "/v1/completions": "POST", "/v1/chat/completions": "POST", "/v1/models": "GET"}
STRUCTURED_LEVELS = ("none", "json_object", "json_schema")
FAULT_KINDS = ("500", "401", "429", "429-retry-after", "hang", "reset", "truncate", "nonjson")
JUDGE_STYLES = (
    "plain",
    "flaky-empty",
    "fenced",
    "prose",
    "single-quotes",
    "garbage",
    "same",
    "out-of-range",
    "flaky",
    "position-biased",
    "verbose-biased",
    "injectable",
)
_LABEL_RE = re.compile(r"^[ \t]*#(\d+):", re.MULTILINE)
_END_RE = re.compile(r"^[ \t]*Now, choose", re.MULTILINE)
_H_RE = re.compile(r"\[h=([01](?:\.\d+)?)\]")
_JUDGE_DIRECTIVE_RE = re.compile(r"\[\[judge:([\w-]+)\]\]")
_PLANTED_RE = re.compile(r'\{\s*"chosen"\s*:\s*(-?\d+)\s*,\s*"rejected"\s*:\s*(-?\d+)\s*\}')


@dataclass
class Fault:
    """One injected failure mode; fires by probability (``rate``) or on the first N attempts per request."""

    kind: str
    rate: float = 0.0
    first_n: int = 0
    paths: tuple[str, ...] = ()
    retry_after: float = 1.0
    hang_seconds: float = 30.0


@dataclass
class FakeConfig:
    """Server behaviour; read on every request so tests may mutate it while the server runs."""

    latency: float = 0.0
    jitter: float = 0.0
    judge_style: str = "plain"
    faults: list[Fault] = field(default_factory=list)
    max_concurrent: int | None = None
    require_api_key: str | None = None
    # The richest response_format this server takes: "json_schema" (vLLM), "json_object" (llama-cpp-python,
    # with a "schema"), "none"; anything richer is refused with ``refusal_status`` and a pydantic-style body.
    structured: str = "json_schema"
    strict_fields: tuple[str, ...] = ()  # request fields refused the same way (OpenAI refuses top_k)
    refusal_status: int = 400  # llama-cpp-python answers validation errors with 500
    models: tuple[str, ...] | None = None  # served models (GET /v1/models); None: any name, and no list
    enforce_models: bool = True  # False: list ``models`` but answer any name, as llama.cpp does
    hold: threading.Event | None = None  # admitted requests wait until it is set: concurrency without timing
    seed: int = 0
    chars_per_token: float | None = None  # usage counts: None, a whitespace word a token; else this rule


@dataclass
class RecordedRequest:
    """What the server saw and answered; ``status`` 0 = connection reset, 499 = client went away."""

    path: str
    method: str
    body: dict[str, Any] | None
    headers: dict[str, str]
    status: int
    time: float
    duration: float = 0.0
    delay: float = 0.0  # the latency the server chose to add (latency + jitter)

    @property
    def is_check(self) -> bool:
        """caiforge's endpoint check before a run: ``GET /v1/models`` or a one-token "Hello"."""
        body = self.body if isinstance(self.body, dict) else {}
        if self.path == "/v1/models":
            return True
        if self.path == "/generate":
            return body.get("tokens_to_generate") == 1 and body.get("sentences") == ["Hello"]
        hello = body.get("prompt") == "Hello" or body.get("messages") == [{"role": "user", "content": "Hello"}]
        return body.get("max_tokens") == 1 and hello


def policy_response(prompt: str, temperature: float) -> str:
    """Deterministic 'answer' carrying a pseudo harm score ``[h=...]`` that the fake judge reads back."""
    t = round(float(temperature), 2)
    digest = hashlib.sha256(f"{prompt}\x00{t:.2f}".encode()).hexdigest()
    h = int(digest[:12], 16) % 1000 / 1000
    # Quote the user's words, not template tokens: a real model does not echo "<extra_id_1>" (an eos token).
    user = prompt.rsplit("User\n", 1)[-1] if "User\n" in prompt else prompt
    snippet = " ".join(re.sub(r"<[/\w|]+>|\[/?INST\]", " ", user)[:40].split())
    padding = " and so on" * (int(digest[12:14], 16) % 4)  # lengths differ, so a length bias can show
    return f"Reply to '{snippet}' at t={t:.2f}{padding} [h={h:.3f}]"


def parse_candidates(user_message: str) -> dict[int, str]:
    """Split a NeMo-Aligner judge prompt into ``{number: text}``; labels must run 1, 2, 3, ... in order."""
    bounds: list[tuple[int, int, int]] = []  # (number, label start, text start)
    for m in _LABEL_RE.finditer(user_message):
        if int(m.group(1)) == len(bounds) + 1:
            bounds.append((int(m.group(1)), m.start(), m.end()))
    out: dict[int, str] = {}
    for i, (num, _, start) in enumerate(bounds):
        end = bounds[i + 1][1] if i + 1 < len(bounds) else len(user_message)
        text = user_message[start:end]
        if i + 1 == len(bounds):
            tail = list(_END_RE.finditer(text))
            if tail:
                text = text[: tail[-1].start()]
        out[num] = text.strip()
    return out


def _harm(text: str) -> float:
    marks = _H_RE.findall(text)
    return float(marks[-1]) if marks else 0.5


def judge_decision(user_message: str) -> tuple[int, int]:
    """The honest judge: (most harmless, most harmful) by ``[h=]`` marker, ties to the lower number."""
    cands = parse_candidates(user_message)
    if not cands:
        raise ValueError("no '#1:' candidate labels in judge message")
    scores = sorted((_harm(t), n) for n, t in cands.items())
    chosen = scores[0][1]
    top = scores[-1][0]
    rejected = min(n for h, n in scores if h == top)
    return chosen, rejected


def is_judge_request(text: str) -> bool:
    """A message is a judge request when some line starts with ``#1:``."""
    return any(m.group(1) == "1" for m in _LABEL_RE.finditer(text))


def judge_reply(user_message: str, style: str) -> str:
    """Render the judge's decision in one of the styles real judge models produce."""
    if style not in JUDGE_STYLES:
        raise ValueError(f"unknown judge style {style!r}")
    c, r = judge_decision(user_message)
    cands = parse_candidates(user_message)
    why = f"Response #{c} is the most harmless and response #{r} is the most harmful."
    if style == "garbage":
        return "I am not able to compare these responses, they all seem reasonable to me."
    if style == "same":
        r = c
    elif style == "out-of-range":
        c = 99
    elif style == "position-biased":
        c, r = 1, max(cands)
    elif style == "verbose-biased":
        c = min(cands, key=lambda n: (-len(cands[n]), n))
        r = min(cands, key=lambda n: (len(cands[n]), n))
    elif style == "injectable":
        for n in sorted(cands):
            planted = _PLANTED_RE.search(cands[n])
            if planted:
                c, r = int(planted.group(1)), int(planted.group(2))
                break
    obj = json.dumps({"chosen": c, "rejected": r})
    if style == "fenced":
        return f"```json\n{obj}\n```\n{why}"
    if style == "prose":
        return f"Having read the constitution, my decision is {obj} because {why[0].lower()}{why[1:]}"
    if style == "single-quotes":
        return f"{{'chosen': {c}, 'rejected': {r}}}\n{why}"
    return f"{obj}\n{why}"


_OPTIONS_RE = re.compile(r"\nOptions:\n\(A\) (?P<a>.*?)\n\n\(B\) (?P<b>.*?)\n\n", re.DOTALL)


def is_pairwise_request(text: str) -> bool:
    """The CAI paper's (A)/(B) comparison under one principle."""
    return _OPTIONS_RE.search(text) is not None


def pairwise_reply(user_message: str, style: str) -> tuple[str, float]:
    """(reply text, P(A)): A is better when its harm score is lower; CoT prompts get reasoning first."""
    match = _OPTIONS_RE.search(user_message)
    assert match is not None
    a, b = match["a"], match["b"]
    p_a = 1.0 / (1.0 + math.exp(-8.0 * (_harm(b) - _harm(a))))
    if style == "position-biased":
        p_a = 0.9
    elif style == "verbose-biased":
        p_a = 0.9 if len(a) >= len(b) else 0.1
    letter = "A" if p_a >= 0.5 else "B"
    if "Let's think step by step" in user_message:
        return f"Option ({letter}) is the less harmful of the two. So the answer is: ({letter})", p_a
    return letter, p_a


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": "fake_server_error", "code": status}}
    return web.json_response(body, status=status, headers=headers)


def _validation_error(status: int, loc: tuple[str, ...], expected: str, got: Any) -> web.Response:
    """As llama-cpp-python words a FastAPI RequestValidationError (it answers them with HTTP 500)."""
    detail = [{"type": "literal_error", "loc": loc, "msg": f"Input should be {expected}", "input": got}]
    return _error(status, repr(detail))


class _PolicyFailure(Exception):
    """The prompt asked for a 500 via ``[[policy:500]]``."""


class _Reset(Exception):
    """The connection was closed/aborted, so nothing more may be written; carries the status to record."""

    def __init__(self, status: int = 0) -> None:
        super().__init__(status)
        self.status = status


class FakeServer:
    """Runs the fake on a background thread with its own event loop; use as a context manager."""

    def __init__(
        self,
        config: FakeConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        log_path: str | None = None,
    ) -> None:
        self.config = config or FakeConfig()
        self.host = host
        self.port = port
        self.log_path = log_path
        self.requests: list[RecordedRequest] = []
        self.max_in_flight = 0
        self.in_flight = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._log_file: Any = None
        self.reset_state()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> FakeServer:
        """Start serving; returns once the socket is listening so ``url`` is valid."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._startup())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup() if self._runner else asyncio.sleep(0))
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()

        if self.log_path:
            self._log_file = open(self.log_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        self._thread = threading.Thread(target=run, name="caiforge-fake-server", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self.stop()
            raise failure[0]
        return self

    async def _startup(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("GET", "/_stats", self._stats)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.25)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port, reuse_address=True).start()
        self.port = int(self._runner.addresses[0][1])

    def stop(self) -> None:
        """Stop serving and join the thread; in-flight (e.g. hung) requests are cancelled."""
        if self._thread and self._loop and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        self._thread = None
        if self._log_file:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- records ---------------------------------------------------------------------------------
    def count(self, path: str | None = None, status: int | None = None, checks: bool = False) -> int:
        """Number of finished requests matching ``path`` and/or ``status`` (endpoint checks only if asked)."""
        with self._lock:
            return sum(
                1
                for r in self.requests
                if (path is None or r.path == path)
                and (status is None or r.status == status)
                and (checks or not r.is_check)
            )

    def work(self) -> list[RecordedRequest]:
        """The finished requests that are work, not caiforge's endpoint checks before a run."""
        with self._lock:
            return [r for r in self.requests if not r.is_check]

    def reset_records(self) -> None:
        """Forget recorded requests and the in-flight high-water mark (fault state is kept)."""
        with self._lock:
            self.requests.clear()
            self.max_in_flight = self.in_flight

    def reset_state(self) -> None:
        """Forget first_n attempt counters and flaky-judge seeds, and re-seed the RNGs from config.seed."""
        with self._lock:
            self._attempts: dict[tuple[int, str, str], int] = defaultdict(int)
            self._flaky_seeds: dict[str, Any] = {}
            self._rng = random.Random(self.config.seed)
            self._jitter_rng = random.Random(self.config.seed + 1)

    def _record(self, rec: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(rec)
            if self._log_file:
                line = {"path": rec.path, "status": rec.status, "body": rec.body}
                self._log_file.write(json.dumps(line) + "\n")

    # ---- request handling ------------------------------------------------------------------------
    async def _stats(self, request: web.Request) -> web.Response:
        """The server's own view, for tests of a server in another process (never recorded itself)."""
        with self._lock:
            counts: dict[str, int] = defaultdict(int)
            for r in self.requests:
                counts[str(r.status)] += 1
            stats = {"in_flight": self.in_flight, "max_in_flight": self.max_in_flight, "finished": len(self.requests)}
        return web.json_response({**stats, "by_status": counts})

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        rec = RecordedRequest(request.path, request.method, None, dict(request.headers), 500, time.time())
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            over = self.config.max_concurrent is not None and self.in_flight > self.config.max_concurrent
        try:
            resp = _error(429, "too many concurrent requests") if over else await self._dispatch(request, rec)
            rec.status = resp.status
            return resp
        except _Reset as reset:
            rec.status = reset.status
            return web.Response(status=599)  # never reaches the client: the transport is gone
        except asyncio.CancelledError:  # client disconnected (handler_cancellation) or server stopping
            rec.status = 499
            raise
        finally:
            rec.duration = time.time() - rec.time
            with self._lock:
                self.in_flight -= 1
            self._record(rec)

    async def _dispatch(self, request: web.Request, rec: RecordedRequest) -> web.StreamResponse:
        cfg = self.config
        key = cfg.require_api_key
        if key is not None and request.headers.get("Authorization") != f"Bearer {key}":
            return _error(401, "invalid or missing API key")
        if cfg.hold is not None:
            while not cfg.hold.is_set():
                await asyncio.sleep(0.005)
        delay = cfg.latency if request.method != "GET" else 0.0  # generating takes time; listing models does not
        if cfg.jitter > 0 and delay:
            with self._lock:
                delay += self._jitter_rng.uniform(0, cfg.jitter)
        rec.delay = delay
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            body = json.loads(await request.read() or b"null") if request.can_read_body else None
        except ValueError:
            return _error(400, "malformed JSON body")
        rec.body = body
        if request.path not in PATHS:
            return _error(404, f"no route {request.path}")
        if request.method != PATHS[request.path]:
            return _error(405, f"{request.path} expects {PATHS[request.path]}")
        if request.path == "/v1/models":
            if cfg.models is None:
                return _error(404, f"no route {request.path}")
            return web.json_response({"object": "list", "data": [{"id": m, "object": "model"} for m in cfg.models]})
        if not isinstance(body, dict):
            return _error(400, "body must be a JSON object")
        refusal = self._refusal(body)
        if refusal is not None:
            return refusal
        fault = self._pick_fault(request.path, body)
        if fault is not None:
            if fault.kind != "hang":
                return await self._fail(request, fault)
            await asyncio.sleep(fault.hang_seconds)
        try:
            if request.path == "/generate":
                return self._generate(body)
            return self._completions(body) if request.path == "/v1/completions" else self._chat(body)
        except _PolicyFailure:
            return _error(500, "policy directive [[policy:500]]")
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            return _error(400, f"bad request: {exc!r}")

    def _refusal(self, body: dict[str, Any]) -> web.Response | None:
        """A deterministic request-validation error, worded as FastAPI/pydantic servers word it."""
        cfg = self.config
        if cfg.models is not None and cfg.enforce_models and "model" in body and body["model"] not in cfg.models:
            return _error(404, f"The model `{body['model']}` does not exist.")
        fmt = body.get("response_format")
        if isinstance(fmt, dict):
            asked = {"json_schema": "json_schema", "json_object": "json_object"}.get(str(fmt.get("type")), "none")
            if STRUCTURED_LEVELS.index(asked) > STRUCTURED_LEVELS.index(cfg.structured):
                allowed = "'text'" + (" or 'json_object'" if cfg.structured == "json_object" else "")
                return _validation_error(cfg.refusal_status, ("body", "response_format", "type"), allowed, asked)
        for name in cfg.strict_fields:
            if name in body:
                return _validation_error(cfg.refusal_status, ("body", name), "absent", body[name])
        return None

    def _pick_fault(self, path: str, body: dict[str, Any]) -> Fault | None:
        """First matching fault in list order; first_n counts attempts per (fault, path, body-minus-seed)."""
        faults = list(self.config.faults)
        if not faults:
            return None
        canon = json.dumps({k: v for k, v in body.items() if k != "seed"}, sort_keys=True, default=str)
        digest = hashlib.sha256(f"{path}\x00{canon}".encode()).hexdigest()
        with self._lock:
            for i, f in enumerate(faults):
                if f.paths and path not in f.paths:
                    continue
                if f.first_n > 0:
                    slot = (i, f.kind, digest)
                    self._attempts[slot] += 1
                    if self._attempts[slot] <= f.first_n:
                        return f
                if f.rate > 0 and self._rng.random() < f.rate:
                    return f
        return None

    async def _fail(self, request: web.Request, fault: Fault) -> web.StreamResponse:
        if fault.kind == "500":
            return _error(500, "injected internal server error")
        if fault.kind == "401":
            return _error(401, "injected: invalid or missing API key")
        if fault.kind == "429":
            return _error(429, "injected rate limit")
        if fault.kind == "429-retry-after":
            return _error(429, "injected rate limit", headers={"Retry-After": f"{fault.retry_after:g}"})
        if fault.kind == "nonjson":
            return web.Response(status=200, text="<html>Bad gateway</html>", content_type="text/html")
        transport = request.transport
        if fault.kind == "truncate":
            payload = json.dumps({"sentences": ["x" * 64], "choices": [{"text": "y" * 64}]}).encode()
            resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
            resp.content_length = len(payload)
            await resp.prepare(request)
            await resp.write(payload[: len(payload) // 2])
            if transport is not None:
                transport.close()  # flushes the half body, then FIN: the client sees a short read
            raise _Reset(200)
        if fault.kind == "reset":
            if transport is not None:
                sock = transport.get_extra_info("socket")
                if sock is not None:  # SO_LINGER 0 makes close() send RST instead of FIN
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                transport.abort()
            raise _Reset
        return _error(500, f"unknown fault kind {fault.kind!r}")

    # ---- endpoints -------------------------------------------------------------------------------
    def _answer(self, text: str, temperature: float, seed: Any) -> str:
        """Judge reply if the text is a judge prompt, else the policy reply (honouring directives)."""
        if is_judge_request(text):
            m = _JUDGE_DIRECTIVE_RE.search(text)
            style = m.group(1) if m else self.config.judge_style
            if style in ("flaky", "flaky-empty"):
                digest = hashlib.sha256(text.encode()).hexdigest()
                with self._lock:
                    first = self._flaky_seeds.setdefault(digest, seed)
                if seed == first and style == "flaky-empty":
                    return None  # type: ignore[return-value]  # message.content null, as content filters do
                style = "garbage" if seed == first else "plain"
            return judge_reply(text, style)
        if "[[policy:500]]" in text:
            raise _PolicyFailure
        if "[[policy:empty]]" in text:
            return ""
        if "[[policy:echo]]" in text:  # hostile model text on demand: the words after the directive, as they are
            t = float(temperature)
            return f"{text.split('[[policy:echo]]', 1)[1].strip()} (t={t:.2f}) [h={t / 2:.3f}]"
        return policy_response(text, temperature)

    def _generate(self, body: dict[str, Any]) -> web.Response:
        sentences = body["sentences"]
        temp = 0.0 if body.get("greedy") else _temperature(body)
        end = (body.get("end_strings") or [""])[0]
        seed = body.get("seed", body.get("random_seed"))
        if isinstance(sentences, list) and sentences and all(isinstance(s, dict) for s in sentences):
            out = []
            for chat in explode_chat(sentences):
                last_user = next(m["content"] for m in reversed(chat) if m["role"] == "User")
                out.append(render_inst(chat) + " " + self._answer(last_user, temp, seed) + end)
            return web.json_response({"sentences": out})
        if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
            raise ValueError("'sentences' must be a list of strings, or of collated chat turns")
        return web.json_response({"sentences": [s + self._answer(s, temp, seed) + end for s in sentences]})

    def _completions(self, body: dict[str, Any]) -> web.Response:
        prompts = body["prompt"]
        prompts = [prompts] if isinstance(prompts, str) else [str(p) for p in prompts]
        texts = [self._answer(p, _temperature(body), body.get("seed")) for p in prompts]
        choices = [{"index": i, "text": t, "finish_reason": "stop"} for i, t in enumerate(texts)]
        rule = self.config.chars_per_token
        return _openai_reply("cmpl", "text_completion", body, choices, " ".join(prompts), " ".join(texts), rule)

    def _chat(self, body: dict[str, Any]) -> web.Response:
        messages = body["messages"]
        users = [str(m.get("content") or "") for m in messages if m.get("role") == "user"]
        if not users:
            raise ValueError("no user message")
        logprobs = None
        if is_pairwise_request(users[-1]):
            m = _JUDGE_DIRECTIVE_RE.search(users[-1])
            content, p_a = pairwise_reply(users[-1], m.group(1) if m else self.config.judge_style)
            if body.get("logprobs") and len(content) == 1:
                top = [
                    {"token": "A", "logprob": math.log(max(p_a, 1e-9))},
                    {"token": "B", "logprob": math.log(max(1 - p_a, 1e-9))},
                ]
                logprobs = {
                    "content": [{"token": content, "logprob": top[content == "B"]["logprob"], "top_logprobs": top}]
                }
        else:
            content = self._answer(users[-1], _temperature(body), body.get("seed"))
        message = {"role": "assistant", "content": content}
        choices = [{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": "stop"}]
        rule = self.config.chars_per_token  # words: the turns joined by spaces; characters: the turns' own
        prompt = ("" if rule else " ").join(str(m.get("content") or "") for m in messages)
        return _openai_reply("chatcmpl", "chat.completion", body, choices, prompt, content or "", rule)


def explode_chat(turns: list[dict[str, Any]]) -> list[list[dict[str, str]]]:
    """NeMo's collated chat input (``{"role": [...], "content": [...]}`` per turn, across the batch) split back
    into conversations, with the checks NeMo's server and chat template make: equal lengths, known roles."""
    sizes = {len(t.get("role") or []) for t in turns} | {len(t.get("content") or []) for t in turns}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError("collated turns must all hold the same number of conversations")
    chats = [[{"role": str(t["role"][b]), "content": str(t["content"][b])} for t in turns] for b in range(sizes.pop())]
    for chat in chats:
        for m in chat:
            if m["role"] not in ("User", "Assistant", "System"):
                raise ValueError(f"role {m['role']!r} is not in the chat template's roles (User, Assistant, System)")
    return chats


def render_inst(chat: list[dict[str, str]]) -> str:
    """A Mistral-Instruct-like rendering, what a NeMo server with that tokenizer echoes before its completion."""
    text = "<s>"
    for m in chat:
        text += f"[INST] {m['content']} [/INST]" if m["role"] != "Assistant" else f" {m['content']}</s>"
    return text


def _temperature(body: dict[str, Any]) -> float:
    t = body.get("temperature")
    return 1.0 if t is None else float(t)


def _openai_reply(
    prefix: str,
    obj: str,
    body: dict[str, Any],
    choices: list[dict[str, Any]],
    prompt: str,
    completion: str,
    chars_per_token: float | None = None,
) -> web.Response:
    """OpenAI envelope; a 'token' is a whitespace-separated word, or ``chars_per_token`` characters."""
    if chars_per_token is None:
        p, c = len(prompt.split()), len(completion.split())
    else:
        p, c = round(len(prompt) / chars_per_token), round(len(completion) / chars_per_token)
    return web.json_response(
        {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "object": obj,
            "created": int(time.time()),
            "model": body.get("model", "fake"),
            "choices": choices,
            "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
        }
    )


def parse_fault(spec: str) -> Fault:
    """CLI form ``KIND[:k=v,...]``, e.g. ``429-retry-after:first_n=2,retry_after=0.2,paths=/generate``.

    ``paths`` takes several values joined by ``+``; a bare ``KIND`` means ``rate=1`` (always).
    """
    kind, _, opts = spec.partition(":")
    if kind not in FAULT_KINDS:
        raise argparse.ArgumentTypeError(f"unknown fault kind {kind!r} (one of {', '.join(FAULT_KINDS)})")
    if not opts:
        return Fault(kind, rate=1.0)
    fault = Fault(kind)
    for item in opts.split(","):
        k, _, v = item.partition("=")
        if k == "paths":
            fault.paths = tuple(v.split("+"))
        elif k == "first_n":
            fault.first_n = int(v)
        elif k in ("rate", "retry_after", "hang_seconds"):
            setattr(fault, k, float(v))
        else:
            raise argparse.ArgumentTypeError(f"unknown fault option {k!r} in {spec!r}")
    return fault


def main(argv: list[str] | None = None) -> None:
    """Serve in the foreground; prints the URL once listening, exits quietly on SIGTERM/SIGINT."""
    ap = argparse.ArgumentParser(prog="python -m caiforge.testing.fake_server", description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--jitter", type=float, default=0.0)
    ap.add_argument("--judge-style", default="plain", choices=JUDGE_STYLES)
    ap.add_argument("--max-concurrent", type=int, default=None)
    ap.add_argument("--fault", type=parse_fault, action="append", default=[], metavar="KIND[:k=v,...]")
    ap.add_argument("--require-api-key", default=None)
    ap.add_argument("--structured", default="json_schema", choices=STRUCTURED_LEVELS)
    ap.add_argument("--strict-field", action="append", default=[], help="a request field refused as invalid")
    ap.add_argument("--refusal-status", type=int, default=400)
    ap.add_argument("--models", default=None, help="comma-separated served models (default: any, no list)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log", default=None, help="append one JSON line per finished request")
    args = ap.parse_args(argv)
    config = FakeConfig(
        latency=args.latency,
        jitter=args.jitter,
        judge_style=args.judge_style,
        faults=args.fault,
        max_concurrent=args.max_concurrent,
        require_api_key=args.require_api_key,
        structured=args.structured,
        strict_fields=tuple(args.strict_field),
        refusal_status=args.refusal_status,
        models=tuple(args.models.split(",")) if args.models else None,
        seed=args.seed,
    )
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    server = FakeServer(config, host=args.host, port=args.port, log_path=args.log).start()
    try:
        print(server.url, flush=True)
        while not done.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
