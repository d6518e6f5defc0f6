"""The small protocols every backend implements; a new server kind is one file and one registry line.

Backends only move bytes and translate errors into :mod:`caiforge.errors`; limits, retries, batching and
storage belong to the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import BadModelOutput


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    # Per generated position, the most likely tokens: [[{"token", "logprob"}, ...], ...] (soft labels).
    top_logprobs: list[list[dict[str, Any]]] | None = None


class PolicyBackend(Protocol):
    """Writes candidate responses. ``generate`` gets raw user prompts; the backend applies the template."""

    max_batch_size: int  # prompts per request: NeMo takes a batch, OpenAI servers one
    default_concurrency: int  # requests in flight when the user sets no --policy-concurrency

    def identity(self) -> dict[str, Any]:
        """What determines the output besides prompt and temperature (model, template, sampling)."""
        ...

    async def generate(self, prompts: list[str], temperature: float) -> list[Completion | BadModelOutput]: ...

    async def check(self) -> str | None:
        """The cheapest call that proves the endpoint serves this run; raises EndpointError (one line) when it
        cannot, returns a note worth printing, or None."""
        ...

    def adaptations(self) -> tuple[dict[str, Any], list[str]]:
        """What the endpoint turned out to need (for the manifest), and one sentence per change (for the
        summary)."""
        ...

    async def aclose(self) -> None: ...


class JudgeBackend(Protocol):
    """Answers a chat (constitution as system message, numbered candidates as user message)."""

    default_concurrency: int

    def identity(self) -> dict[str, Any]: ...

    async def chat(
        self,
        messages: list[dict[str, str]],
        *,
        seed: int,
        schema: dict[str, Any] | None = None,
        logprobs: bool = False,
        max_tokens: int | None = None,
    ) -> Completion:
        """``schema`` constrains the reply where the endpoint can (JSON schema of the valid decisions);
        ``logprobs`` asks for the first position's top log-probabilities (soft labels)."""
        ...

    async def check(self) -> str | None: ...

    def adaptations(self) -> tuple[dict[str, Any], list[str]]: ...

    async def aclose(self) -> None: ...
