"""The one protocol every backend implements, and the :class:`Kind` that registers a server kind.

Backends only move bytes and translate errors into :mod:`caiforge.errors`; limits, retries, batching and
storage belong to the engine. A new server kind is one module in this package that defines ``KINDS``: the
registry (:mod:`caiforge.backends`) finds it, and the CLI choices, backend inference and the "which model does
what" line follow from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import BadModelOutput
from ..request import Reply, Request

if TYPE_CHECKING:
    from ..config import RunConfig


@dataclass(frozen=True, kw_only=True)
class Capabilities:
    batch: int = 1  # requests per call: NeMo takes a batch, OpenAI servers one
    logprobs: bool = False  # can return top log-probabilities (soft labels)
    json_schema: bool = False  # can constrain a reply to a JSON schema


class Backend(Protocol):
    kind: str
    capabilities: Capabilities
    default_concurrency: int  # requests in flight when the user sets none

    def identity(self) -> dict[str, Any]:
        """What determines a reply besides the request (model, template, sampling): part of every store key."""
        ...

    async def send(self, requests: list[Request]) -> list[Reply | BadModelOutput]:
        """One call (``len(requests) <= capabilities.batch``); raises BackendError when the call failed as a
        whole, returns BadModelOutput in place of a reply that came back unusable."""
        ...

    async def check(self) -> str | None:
        """The cheapest call that proves the endpoint serves this run; raises EndpointError (one line) when it
        cannot, returns a note worth printing, or None."""
        ...

    def adaptations(self) -> tuple[dict[str, Any], list[str]]:
        """What the endpoint turned out to need (for the manifest), and one sentence per change (summary)."""
        ...

    async def aclose(self) -> None: ...


class LocalBackend:
    """Backends without a server: nothing to check, nothing adapted, nothing to close."""

    async def check(self) -> str | None:
        return None  # loading the model already proved it usable

    def adaptations(self) -> tuple[dict[str, Any], list[str]]:
        return {}, []

    async def aclose(self) -> None:
        return None


@dataclass(frozen=True, kw_only=True)
class Kind:
    """A server kind as the configuration names it (``--policy-backend nemo``).

    ``infer`` says whether a role's settings point at this kind when no kind is named (higher ``priority``
    wins); ``resolve`` fills this kind's defaults into the role's settings or raises ValueError; ``where`` is
    the words for the "which model does what" line."""

    name: str
    roles: tuple[str, ...]
    make: Callable[[RunConfig, str], Backend]
    where: Callable[[RunConfig, str], str]
    infer: Callable[[Any], bool] = lambda section: False
    priority: int = 0
    resolve: Callable[[Any], Any] = lambda section: section
