"""OpenAI-compatible servers (vLLM, NIM/NGC, TGI, SGLang, llama.cpp, Ollama): completions and chat.

``openai-completions`` applies the prompt template client-side; ``openai-chat`` sends messages and lets the
server's own chat template do it. The judge is always chat, with the seed's request: temperature and top_p
nudged by 1e-7 (NVIDIA's hosted API refuses 0), ``max_tokens``, ``seed``.
"""

from __future__ import annotations

import os
from typing import Any

from ..config import RunConfig
from ..errors import BadModelOutput, Refused, TransientError
from .adapt import EndpointAdapter
from .base import Completion
from .checks import check_openai
from .http import HttpClient

POLICY_KEY_ENV = "CAIFORGE_POLICY_API_KEY"


async def post_adapting(
    http: HttpClient, adapter: EndpointAdapter, url: str, payload: dict[str, Any], schema: dict[str, Any] | None = None
) -> dict[str, Any]:
    """POST, stepping down on each refusal (each step changes the body, so this ends); never a blind resend."""
    while True:
        body = adapter.build(payload, schema)
        try:
            return await http.request_json("POST", url, body)
        except Refused as exc:
            if not adapter.adapt(exc, body):
                raise


def endpoint(url: str, path: str) -> str:
    """Accept a base URL (``.../v1``) or the full endpoint URL."""
    url = url.rstrip("/")
    return url if url.endswith(path) else url + path


def _usage(data: dict[str, Any]) -> tuple[int | None, int | None]:
    usage = data.get("usage")
    if not isinstance(usage, dict):
        return None, None
    return usage.get("prompt_tokens"), usage.get("completion_tokens")


def _first_choice(data: dict[str, Any], url: str) -> dict[str, Any]:
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise TransientError(f"POST {url}: reply has no choices")
    return choices[0]


def top_logprobs(choice: dict[str, Any]) -> list[list[dict[str, Any]]] | None:
    """OpenAI's ``logprobs.content[i].top_logprobs`` per position (vLLM, NIM, llama.cpp and OpenAI agree)."""
    content = (choice.get("logprobs") or {}).get("content")
    if not isinstance(content, list):
        return None
    positions = []
    for entry in content:
        top = entry.get("top_logprobs") if isinstance(entry, dict) else None
        if isinstance(top, list):
            positions.append(
                [{"token": str(t.get("token", "")), "logprob": float(t.get("logprob", -1e9))} for t in top]
            )
    return positions or None


class OpenAIPolicy:
    """Policy on ``/completions`` (``chat=False``) or ``/chat/completions`` (``chat=True``)."""

    max_batch_size = 1
    default_concurrency = 64

    def __init__(self, cfg: RunConfig, chat: bool) -> None:
        assert cfg.policy.url and cfg.policy.model
        self._cfg, self._chat = cfg, chat
        self._template = cfg.template
        self._sampling = cfg.policy.sampling
        self.url = endpoint(cfg.policy.url, "/chat/completions" if chat else "/completions")
        key = cfg.policy.api_key.get_secret_value() if cfg.policy.api_key else os.environ.get(POLICY_KEY_ENV)
        self._http = HttpClient(cfg.request_timeout, key)
        self._adapter = EndpointAdapter("policy", self.url, structured=False)

    async def check(self) -> str | None:
        return await check_openai(
            self._http,
            role="policy",
            url=self.url,
            model=str(self._cfg.policy.model),
            chat=self._chat,
            url_flag="--policy-url",
            model_flag="--policy-model",
            key_env=POLICY_KEY_ENV,
        )

    def adaptations(self) -> tuple[dict[str, Any], list[str]]:
        return self._adapter.report(structured=False), list(self._adapter.notes)

    def identity(self) -> dict[str, Any]:
        ident: dict[str, Any] = {
            "backend": "openai-chat" if self._chat else "openai-completions",
            "model": self._cfg.policy.model,
            "sampling": self._sampling.model_dump(mode="json"),
        }
        if self._chat:
            ident["system"] = self._template.system_default_message or ""
        else:
            ident["template"] = self._template.model_dump()
        return ident

    def _payload(self, prompt: str, temperature: float) -> dict[str, Any]:
        s = self._sampling
        payload: dict[str, Any] = {
            "model": self._cfg.policy.model,
            "max_tokens": s.tokens_to_generate,
            "temperature": 0.0 if s.greedy else temperature,
            "top_p": s.top_p,
            "top_k": s.top_k,
            "repetition_penalty": s.repetition_penalty,
        }
        if self._chat:
            messages = []
            if self._template.system_default_message:
                messages.append({"role": "system", "content": self._template.system_default_message})
            payload["messages"] = [*messages, {"role": "user", "content": prompt}]
        else:
            payload["prompt"] = self._template.format_prompt(prompt)
        if s.end_strings:
            payload["stop"] = list(s.end_strings)
        return payload

    async def generate(self, prompts: list[str], temperature: float) -> list[Completion | BadModelOutput]:
        out: list[Completion | BadModelOutput] = []
        for prompt in prompts:
            data = await post_adapting(self._http, self._adapter, self.url, self._payload(prompt, temperature))
            choice = _first_choice(data, self.url)
            text = (choice.get("message") or {}).get("content") if self._chat else choice.get("text")
            if not isinstance(text, str):
                out.append(BadModelOutput(f"POST {self.url}: reply has no text"))
                continue
            out.append(Completion(self._template.strip_eos(text), *_usage(data)))
        return out

    async def aclose(self) -> None:
        await self._http.aclose()


class OpenAIJudge:
    default_concurrency = 32

    def __init__(self, cfg: RunConfig) -> None:
        assert cfg.judge.url
        self._cfg = cfg.judge
        self.url = endpoint(cfg.judge.url, "/chat/completions")
        key = cfg.judge.api_key.get_secret_value() if cfg.judge.api_key else None
        self._http = HttpClient(cfg.request_timeout, key)
        self._adapter = EndpointAdapter("judge", self.url, structured=cfg.judge.structured == "auto")

    async def check(self) -> str | None:
        return await check_openai(
            self._http,
            role="judge",
            url=self.url,
            model=self._cfg.model,
            chat=True,
            url_flag="--judge-url",
            model_flag="--judge-model",
            key_env="NGC_API_KEY",
            key_flag="--ngc-api-key",
        )

    def adaptations(self) -> tuple[dict[str, Any], list[str]]:
        return self._adapter.report(structured=True), list(self._adapter.notes)

    def identity(self) -> dict[str, Any]:
        j = self._cfg
        return {
            "backend": "openai",
            "model": j.model,
            "temperature": j.temperature,
            "top_p": j.top_p,
            "max_tokens": j.max_tokens,
        }

    async def chat(
        self,
        messages: list[dict[str, str]],
        *,
        seed: int,
        schema: dict[str, Any] | None = None,
        logprobs: bool = False,
        max_tokens: int | None = None,
    ) -> Completion:
        j = self._cfg
        payload: dict[str, Any] = {
            "model": j.model,
            "messages": messages,
            "temperature": 1e-7 + j.temperature,
            "top_p": 1e-7 + j.top_p,
            "max_tokens": max_tokens or j.max_tokens,
            "seed": seed,
            "stream": False,
        }
        if logprobs:
            payload["logprobs"], payload["top_logprobs"] = True, 20  # OpenAI's maximum
        data = await post_adapting(self._http, self._adapter, self.url, payload, schema)
        choice = _first_choice(data, self.url)
        content = (choice.get("message") or {}).get("content")
        if not isinstance(content, str):
            raise BadModelOutput(f"POST {self.url}: reply has no message content")
        return Completion(content, *_usage(data), top_logprobs(choice))

    async def aclose(self) -> None:
        await self._http.aclose()
