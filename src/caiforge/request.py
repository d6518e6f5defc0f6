"""One request type for every backend and every pipeline: a chat or a raw prompt, plus sampling overrides.

Pipelines say *what* to ask (:class:`Request`); the engine decides when and where (limits, retries, the store);
a backend says how its server wants it. Every field left ``None`` means "the endpoint's configured default".
A request's store key is a content hash of the request and of the endpoint's identity, so a rerun with the same
settings finds every finished request and a changed setting redoes only what it changes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .keys import content_key

Message = dict[str, str]  # {"role": ..., "content": ...}
TopLogprobs = list[list[dict[str, Any]]]  # per generated position, the likeliest tokens: {"token", "logprob"}


@dataclass(frozen=True, kw_only=True)
class Request:
    """``messages`` for a chat (the backend applies its chat template), or ``prompt``: raw text sent as is."""

    messages: list[Message] = field(default_factory=list)
    prompt: str | None = None
    temperature: float | None = None
    seed: int | None = None
    max_tokens: int | None = None
    schema: dict[str, Any] | None = None  # constrain the reply to this JSON schema where the endpoint can
    logprobs: bool = False  # ask for the top log-probabilities of each generated position

    def __post_init__(self) -> None:
        if (self.prompt is None) == (not self.messages):
            raise ValueError("a request has either messages or a raw prompt")

    @property
    def user_turn(self) -> str | None:
        """The text of a single-turn chat (one user message), which every backend can template."""
        if len(self.messages) == 1 and self.messages[0].get("role") == "user":
            return self.messages[0]["content"]
        return None

    def batch_key(self) -> tuple[Any, ...]:
        """Requests that may share one batched call: NeMo takes one set of sampling settings per call, and
        collates chats turn by turn, so chats of several turns share a call only with the same role sequence."""
        roles = tuple(m["role"] for m in self.messages)
        return (self.temperature, self.seed, self.max_tokens, self.logprobs, self.schema is not None, roles)

    def key(self, identity: dict[str, Any]) -> str:
        """The store key. The two shapes caiforge 0.1 sent keep 0.1's keys (``generation``: one user turn at a
        temperature; ``judge-call``: a chat with a seed), so a 0.1 store resumes without a request sent again."""
        user = self.user_turn
        if (
            user is not None
            and self.seed is None
            and self.max_tokens is None
            and self.schema is None
            and (not self.logprobs)
        ):
            return content_key("generation", prompt=user, temperature=self.temperature, policy=identity)
        extra: dict[str, Any] = {}
        if self.temperature is not None:
            extra["temperature"] = self.temperature
        if self.prompt is not None:
            extra["prompt"] = self.prompt
        return content_key(
            "judge-call",
            messages=self.messages,
            judge=identity,
            seed=self.seed,
            schema=self.schema,
            logprobs=self.logprobs,
            max_tokens=self.max_tokens,
            **extra,
        )


@dataclass(frozen=True, kw_only=True)
class Reply:
    text: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    top_logprobs: TopLogprobs | None = None
    cached: bool = False  # answered from the store, not by the endpoint


Ask = Callable[[Request], Awaitable[Reply]]  # one role's cached, limited, retried way to the model
