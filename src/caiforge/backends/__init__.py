"""Backend registry: the kind named on the command line -> a factory. Add a server kind here."""

from __future__ import annotations

from collections.abc import Callable

from ..config import RunConfig
from .base import Completion, JudgeBackend, PolicyBackend
from .local import LocalJudge, LocalPolicy
from .nemo import NemoPolicy
from .openai import OpenAIJudge, OpenAIPolicy

__all__ = ["Completion", "JudgeBackend", "PolicyBackend", "make_judge", "make_policy"]

POLICIES: dict[str, Callable[[RunConfig], object]] = {
    "nemo": NemoPolicy,
    "openai-completions": lambda cfg: OpenAIPolicy(cfg, chat=False),
    "openai-chat": lambda cfg: OpenAIPolicy(cfg, chat=True),
    "local": LocalPolicy,
}
JUDGES: dict[str, Callable[[RunConfig], object]] = {
    "openai": OpenAIJudge,
    "local": LocalJudge,
}


def make_policy(cfg: RunConfig) -> PolicyBackend:
    return POLICIES[cfg.policy.backend or "local"](cfg)  # type: ignore[return-value]


def make_judge(cfg: RunConfig) -> JudgeBackend:
    return JUDGES[cfg.judge.backend or "local"](cfg)  # type: ignore[return-value]
