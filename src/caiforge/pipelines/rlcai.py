"""RL-CAI, per prompt: the policy's candidates at every temperature, then as soon as they exist, the judge's
verdict (no stage barrier). Returns a :class:`PairRecord` or raises :class:`StageFailed` naming its stage."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import BackendError, StageFailed
from ..judge import CopiedDecision
from ..records import PairRecord
from ..request import Ask, Request
from ..verdicts import Inconsistent, JudgeSpec, TooFewCandidates, decide

NAME = "rl-cai"
ROLES = ("policy", "judge")  # role -> the config section its endpoint is built from is the same name
# Labels the judge could not stand behind say something about the data, not about a broken run.
NOT_COUNTED = (Inconsistent, TooFewCandidates, CopiedDecision)


@dataclass(frozen=True, kw_only=True)
class Settings:
    temperatures: tuple[float, ...]
    judge: JudgeSpec

    def describe(self) -> dict[str, Any]:
        """For the run descriptor: what determines this pipeline's results."""
        return {"temperatures": list(self.temperatures), "judge": self.judge.key_parts()}


def totals(settings: Settings, prompts: int) -> dict[str, int]:
    """Progress bars: candidate requests, and prompts through the judge."""
    return {"candidates": prompts * len(settings.temperatures), "judge": prompts}


class RlCai:
    def __init__(self, settings: Settings, ask: Mapping[str, Ask], advance: Callable[[str], None]) -> None:
        self.s, self._policy, self._judge, self._advance = settings, ask["policy"], ask["judge"], advance

    async def _candidate(self, prompt: str, temperature: float) -> str:
        reply = await self._policy(Request(messages=[{"role": "user", "content": prompt}], temperature=temperature))
        self._advance("candidates")
        return reply.text

    async def __call__(self, item: tuple[str, str]) -> PairRecord:
        try:
            return await self._pair(*item)
        finally:
            self._advance("judge")

    async def _pair(self, pid: str, prompt: str) -> PairRecord:
        temps = self.s.temperatures
        results = await asyncio.gather(*(self._candidate(prompt, t) for t in temps), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, BackendError):
                raise result
        errors = [r for r in results if isinstance(r, BackendError)]
        if errors:
            raise StageFailed("candidates", errors[0])
        responses = {t: str(text) for t, text in zip(temps, results, strict=True)}
        try:
            v = await decide(self._judge, self.s.judge, prompt, list(responses.values()))
        except BackendError as exc:
            stage = "candidates" if isinstance(exc, TooFewCandidates) else "judge"
            raise StageFailed(
                stage, exc, counts=not isinstance(exc, NOT_COUNTED), keep={"responses": responses}
            ) from exc
        return PairRecord(
            prompt_id=pid,
            prompt=prompt,
            responses=responses,
            chosen_t=temps[v.chosen],
            rejected_t=temps[v.rejected],
            explanation=v.explanation,
            order_t=tuple(temps[i] for i in v.order),
            chosen_position=v.chosen_position,
            rejected_position=v.rejected_position,
            consistent=v.consistent,
            chosen_prob=v.chosen_prob,
            principle=v.principle,
            merged={temps[k]: [temps[m] for m in ms] for k, ms in v.merged.items()},
        )
