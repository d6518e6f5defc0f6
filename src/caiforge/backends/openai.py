"""OpenAI-compatible servers (vLLM, NIM/NGC, TGI, SGLang, llama.cpp, Ollama): completions and chat.

``openai-completions`` applies the prompt template client-side; ``openai-chat`` sends messages and lets the
server's own chat template do it. The judge (kind ``openai``) is chat with the seed's request: temperature and
top_p nudged by 1e-7 (NVIDIA's hosted API refuses 0), ``max_tokens``, ``seed``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, SecretStr

from ..config import DEFAULT_JUDGE_URL, KEY_ENV
from ..errors import BadModelOutput, Refused, TransientError
from ..request import Reply, Request, TopLogprobs
from ..template import PromptTemplate
from .adapt import EndpointAdapter
from .base import Capabilities, Kind
from .checks import check_openai
from .http import HttpClient, Transport

if TYPE_CHECKING:
    from ..config import RunConfig

POLICY_KEY_ENV, JUDGE_KEY_ENV = KEY_ENV["policy"], KEY_ENV["judge"]


class OpenAIOptions(BaseModel):
    """Everything one OpenAI-compatible endpoint needs, for one role."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    kind: str
    role: str
    url: str  # the full endpoint URL
    model: str
    chat: bool
    api_key: SecretStr | None = None
    template: PromptTemplate | None = None  # completions: formats a user turn; both: cuts replies at eos
    system: str | None = None  # chat: prepended as a system message
    fixed: dict[str, Any] = {}  # sent with every request (top_p, top_k, stop, ...)
    temperature: float | None = None  # when the request names none
    temperature_offset: float = 0.0
    greedy: bool = False
    max_tokens: int = 1024
    structured: bool = False  # ask for JSON schemas where the request carries one
    identity: dict[str, Any]
    timeout: float = 300.0
    key_env: str = POLICY_KEY_ENV
    key_flag: str | None = None
    url_flag: str = "--policy-url"
    model_flag: str = "--policy-model"


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


def top_logprobs(choice: dict[str, Any]) -> TopLogprobs | None:
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


class OpenAIBackend:
    default_concurrency = 256

    def __init__(self, options: OpenAIOptions, transport: Transport | None = None) -> None:
        self.o = options
        self.kind = options.kind
        self.url = options.url
        self.capabilities = Capabilities(logprobs=options.chat, json_schema=options.chat)
        # A vLLM or NIM server takes hundreds at once (the adaptive limit backs off where one does not); a hosted
        # judge is rate-limited, and the limit halves on its 429s.
        self.default_concurrency = 256 if options.role == "policy" else 64
        key = options.api_key.get_secret_value() if options.api_key else None
        self._http = HttpClient(options.timeout, key, transport)
        self._adapter = EndpointAdapter(options.role, self.url, structured=options.structured)

    async def check(self) -> str | None:
        o = self.o
        return await check_openai(
            self._http,
            role=o.role,
            url=self.url,
            model=o.model,
            chat=o.chat,
            url_flag=o.url_flag,
            model_flag=o.model_flag,
            key_env=o.key_env,
            key_flag=o.key_flag,
        )

    def adaptations(self) -> tuple[dict[str, Any], list[str]]:
        return self._adapter.report(structured=self.o.structured), list(self._adapter.notes)

    def identity(self) -> dict[str, Any]:
        return self.o.identity

    def payload(self, request: Request) -> dict[str, Any]:
        o = self.o
        payload: dict[str, Any] = {"model": o.model}
        if o.chat:  # a raw prompt is one user turn to a chat endpoint: there is no "as is" for chat
            turns = request.messages or [{"role": "user", "content": request.prompt or ""}]
            system = [{"role": "system", "content": o.system}] if o.system else []
            payload["messages"] = [*system, *turns]
        elif request.prompt is not None:
            payload["prompt"] = request.prompt
        else:
            user = request.user_turn
            if o.template is None:
                raise BadModelOutput(f"{self.url}: a completions endpoint needs a prompt template")
            try:  # a completions endpoint has no chat template of its own: several turns go through ours
                payload["prompt"] = (
                    o.template.format_prompt(user) if user is not None else o.template.format_messages(request.messages)
                )
            except ValueError as exc:
                raise BadModelOutput(f"{self.url}: {exc}") from exc
        temperature = request.temperature if request.temperature is not None else o.temperature
        if temperature is not None:
            payload["temperature"] = 0.0 if o.greedy else o.temperature_offset + temperature
        payload["max_tokens"] = request.max_tokens or o.max_tokens
        payload.update(o.fixed)
        if request.seed is not None:
            payload["seed"] = request.seed
        if request.logprobs:
            payload["logprobs"], payload["top_logprobs"] = True, 20  # OpenAI's maximum
        return payload

    async def send(self, requests: list[Request]) -> list[Reply | BadModelOutput]:
        return [await self._one(request) for request in requests]

    async def _one(self, request: Request) -> Reply | BadModelOutput:
        schema = request.schema if self.o.structured else None
        data = await post_adapting(self._http, self._adapter, self.url, self.payload(request), schema)
        choice = _first_choice(data, self.url)
        text = (choice.get("message") or {}).get("content") if self.o.chat else choice.get("text")
        if not isinstance(text, str):
            return BadModelOutput(f"POST {self.url}: reply has no {'message content' if self.o.chat else 'text'}")
        if self.o.template is not None:
            text = self.o.template.strip_eos(text)
        prompt_tokens, completion_tokens = _usage(data)
        return Reply(
            text=text,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            top_logprobs=top_logprobs(choice),
        )

    async def aclose(self) -> None:
        await self._http.aclose()


def policy_options(cfg: RunConfig, chat: bool) -> OpenAIOptions:
    p, s, t = cfg.policy, cfg.policy.sampling, cfg.template
    assert p.url and p.model
    kind = "openai-chat" if chat else "openai-completions"
    identity: dict[str, Any] = {"backend": kind, "model": p.model, "sampling": s.model_dump(mode="json")}
    if chat:
        identity["system"] = t.system_default_message or ""
    else:
        identity["template"] = t.model_dump()
    fixed: dict[str, Any] = {"top_p": s.top_p, "top_k": s.top_k, "repetition_penalty": s.repetition_penalty}
    if s.end_strings:
        fixed["stop"] = list(s.end_strings)
    return OpenAIOptions(
        kind=kind,
        role="policy",
        url=endpoint(p.url, "/chat/completions" if chat else "/completions"),
        model=p.model,
        chat=chat,
        api_key=p.api_key,
        template=t,
        system=t.system_default_message or None,
        fixed=fixed,
        greedy=s.greedy,
        max_tokens=s.tokens_to_generate,
        identity=identity,
        timeout=cfg.request_timeout,
    )


def judge_options(cfg: RunConfig) -> OpenAIOptions:
    j = cfg.judge
    assert j.url
    return OpenAIOptions(
        kind="openai",
        role="judge",
        url=endpoint(j.url, "/chat/completions"),
        model=j.model,
        chat=True,
        api_key=j.api_key,
        fixed={"top_p": 1e-7 + j.top_p, "stream": False},
        temperature=j.temperature,
        temperature_offset=1e-7,
        max_tokens=j.max_tokens,
        structured=j.structured == "auto",
        identity={
            "backend": "openai",
            "model": j.model,
            "temperature": j.temperature,
            "top_p": j.top_p,
            "max_tokens": j.max_tokens,
        },
        timeout=cfg.request_timeout,
        key_env=JUDGE_KEY_ENV,
        key_flag="--ngc-api-key",
        url_flag="--judge-url",
        model_flag="--judge-model",
    )


def _needs_url_and_model(kind: str) -> Any:
    def resolve(section: Any) -> Any:
        if not section.url:
            raise ValueError(f"--policy-backend {kind} needs --policy-url (e.g. http://127.0.0.1:8000/v1)")
        if not section.model:
            raise ValueError(f"--policy-backend {kind} needs --policy-model (the served model name)")
        return section

    return resolve


def _judge_url(section: Any) -> Any:
    return section if section.url else section.model_copy(update={"url": DEFAULT_JUDGE_URL})


KINDS = (
    Kind(
        name="openai-chat",
        roles=("policy",),
        make=lambda cfg, role: OpenAIBackend(policy_options(cfg, chat=True)),
        where=lambda cfg, role: f"openai-chat {cfg.policy.model} at {cfg.policy.url}",
        infer=lambda section: bool(section.url),
        priority=20,
        resolve=_needs_url_and_model("openai-chat"),
    ),
    Kind(
        name="openai-completions",
        roles=("policy",),
        make=lambda cfg, role: OpenAIBackend(policy_options(cfg, chat=False)),
        where=lambda cfg, role: f"openai-completions {cfg.policy.model} at {cfg.policy.url}",
        resolve=_needs_url_and_model("openai-completions"),
    ),
    Kind(
        name="openai",
        roles=("judge",),
        make=lambda cfg, role: OpenAIBackend(judge_options(cfg)),
        where=lambda cfg, role: f"{cfg.judge.model} at {cfg.judge.url}",
        infer=lambda section: bool(section.url) or section.api_key is not None,
        priority=20,
        resolve=_judge_url,
    ),
)
