"""NeMo's text-generation server (``megatron_gpt_eval.py``): ``PUT /generate`` with a batch of sentences.

The server echoes prompt + completion; the response is cut out with the template's extract pattern and eos
token, as the seed does. Temperature gets the seed's +1e-8 so that 0 is accepted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from ..config import Sampling
from ..errors import BadModelOutput, TransientError
from ..request import Reply, Request
from ..template import PromptTemplate
from .base import Capabilities, Kind
from .checks import check_nemo
from .http import HttpClient, Transport

if TYPE_CHECKING:
    from ..config import RunConfig


NEMO_ROLES = {"user": "User", "assistant": "Assistant", "system": "System"}  # what NeMo's chat templates name


class NemoOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    host: str = "localhost"
    port: int = 5656
    model: str = "nemo"  # names the model in store keys: a server restarted elsewhere must not void hours of work
    batch_size: int = 128
    template: PromptTemplate = PromptTemplate()
    sampling: Sampling = Sampling()
    timeout: float = 300.0
    apply_chat_template: bool = True


class NemoBackend:
    kind = "nemo"
    default_concurrency = 4  # the server works through batches one at a time; a few keep it busy

    def __init__(self, options: NemoOptions, transport: Transport | None = None) -> None:
        self.o = options
        self.capabilities = Capabilities(batch=options.batch_size)
        self.url = f"http://{options.host}:{options.port}/generate"
        self._http = HttpClient(options.timeout, transport=transport)

    async def check(self) -> str | None:
        await check_nemo(self._http, self.url)
        return None

    def adaptations(self) -> tuple[dict[str, Any], list[str]]:
        return {"url": self.url}, []

    def identity(self) -> dict[str, Any]:
        found: dict[str, Any] = {
            "backend": "nemo",
            "model": self.o.model,
            "template": self.o.template.model_dump(),
            "sampling": self.o.sampling.model_dump(mode="json"),
        }
        if not self.o.apply_chat_template:  # only then: the keys of every run before it stay as they were
            found["apply_chat_template"] = False
        return found

    def _sentences(self, requests: list[Request]) -> list[Any]:
        """Strings through the template, or (``apply_chat_template`` off: every chat, one turn or many) the seed's
        collated message lists: one ``{"role": [...], "content": [...]}`` per turn, across the batch, which the
        server splits back into conversations. The engine batches only chats of the same role sequence
        (``Request.batch_key``), which collation needs."""
        if self.o.apply_chat_template or any(r.prompt is not None for r in requests):
            return [self._sentence(r) for r in requests]
        turns = len(requests[0].messages)
        return [
            {
                "role": [NEMO_ROLES.get(r.messages[i]["role"], r.messages[i]["role"]) for r in requests],
                "content": [r.messages[i]["content"] for r in requests],
            }
            for i in range(turns)
        ]

    def _sentence(self, request: Request) -> str:
        if request.prompt is not None:
            return request.prompt
        user = request.user_turn
        if user is not None:
            return self.o.template.format_prompt(user)
        try:
            return self.o.template.format_messages(request.messages)
        except ValueError as exc:
            raise BadModelOutput(f"{self.url}: {exc}") from exc

    async def send(self, requests: list[Request]) -> list[Reply | BadModelOutput]:
        """One batch; every request in it shares the first one's sampling (the engine batches by batch_key)."""
        s, first = self.o.sampling, requests[0]
        temperature = first.temperature if first.temperature is not None else 1.0
        payload = {
            "sentences": self._sentences(requests),
            "tokens_to_generate": first.max_tokens or s.tokens_to_generate,
            "temperature": temperature + 1e-8,
            "add_BOS": s.add_bos,
            "top_k": s.top_k,
            "top_p": s.top_p,
            "greedy": s.greedy,
            "all_probs": s.all_probs,
            "repetition_penalty": s.repetition_penalty,
            "min_tokens_to_generate": s.min_tokens_to_generate,
        }
        if s.end_strings is not None:  # absent, as the seed sends it when no --end_strings was given
            payload["end_strings"] = list(s.end_strings)
        if first.seed is not None:
            payload["random_seed"] = first.seed
        data = await self._http.request_json("PUT", self.url, payload)
        sentences = data.get("sentences")
        if not isinstance(sentences, list) or len(sentences) != len(requests):
            got = len(sentences) if isinstance(sentences, list) else type(sentences).__name__
            raise TransientError(f"PUT {self.url}: expected {len(requests)} sentences, got {got}")
        out: list[Reply | BadModelOutput] = []
        pattern = self.o.template.response_extract_pattern
        for sentence in sentences:
            response = self.o.template.extract_response(sentence) if isinstance(sentence, str) else None
            if response is None:
                out.append(BadModelOutput(f"response pattern {pattern!r} not in the generated text"))
            else:
                out.append(Reply(text=response))
        return out

    async def aclose(self) -> None:
        await self._http.aclose()


def options(cfg: RunConfig) -> NemoOptions:
    p = cfg.policy
    return NemoOptions(
        host=p.host or "localhost",
        port=p.port or 5656,
        model=p.model or "nemo",
        batch_size=p.batch_size,
        template=cfg.template,
        sampling=p.sampling,
        timeout=cfg.request_timeout,
        apply_chat_template=p.apply_chat_template,
    )


def _defaults(section: Any) -> Any:
    return section.model_copy(update={"host": section.host or "localhost", "port": section.port or 5656})


KINDS = (
    Kind(
        name="nemo",
        roles=("policy",),
        make=lambda cfg, role: NemoBackend(options(cfg)),
        where=lambda cfg, role: f"NeMo at {cfg.policy.host}:{cfg.policy.port}",
        infer=lambda section: bool(section.host or section.port),
        priority=10,
        resolve=_defaults,
    ),
)
