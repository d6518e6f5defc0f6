"""Backend registry: the kind named on the command line -> a factory. Add a server kind here."""

from __future__ import annotations

from collections.abc import Callable

from ..config import RunConfig
from ..errors import InputError
from .base import Completion, JudgeBackend, PolicyBackend
from .nemo import NemoPolicy
from .openai import OpenAIJudge, OpenAIPolicy

__all__ = ["Completion", "JudgeBackend", "PolicyBackend", "make_judge", "make_policy"]

LOCAL_HINT = (
    "the embedded local model is not available yet; point at a server instead: "
    "--policy-url http://HOST:PORT/v1 --policy-model NAME (OpenAI-compatible) or --host H --port P (NeMo), "
    "and --judge-url URL --judge-model NAME or --ngc-api-key KEY for the judge"
)


def _local(role: str) -> Callable[[RunConfig], object]:
    def factory(cfg: RunConfig) -> object:
        raise InputError(f"{role}: {LOCAL_HINT}")

    return factory


POLICIES: dict[str, Callable[[RunConfig], object]] = {
    "nemo": NemoPolicy,
    "openai-completions": lambda cfg: OpenAIPolicy(cfg, chat=False),
    "openai-chat": lambda cfg: OpenAIPolicy(cfg, chat=True),
    "local": _local("policy"),
}
JUDGES: dict[str, Callable[[RunConfig], object]] = {
    "openai": OpenAIJudge,
    "local": _local("judge"),
}


def make_policy(cfg: RunConfig) -> PolicyBackend:
    return POLICIES[cfg.policy.backend or "local"](cfg)  # type: ignore[return-value]


def make_judge(cfg: RunConfig) -> JudgeBackend:
    return JUDGES[cfg.judge.backend or "local"](cfg)  # type: ignore[return-value]
