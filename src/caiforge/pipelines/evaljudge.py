"""eval-judge, per human-labelled pair: the judge's pick with the human-chosen response shown first, then
second. An unusable reply or a failed request is a missing pick (counted apart), never a guess."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import BackendError, BadModelOutput
from ..request import Ask
from ..verdicts import JudgeSpec, prefer

NAME = "eval-judge"
ROLES = ("judge",)


@dataclass(frozen=True, kw_only=True)
class HumanPair:
    prompt: str  # the conversation up to the judged response
    chosen: str
    rejected: str
    line: int


@dataclass(frozen=True, kw_only=True)
class Judged:
    picks: tuple[int | None, int | None]  # position picked with the human-chosen response first, then second
    request_failures: tuple[str, ...] = ()


class EvalJudge:
    def __init__(self, spec: JudgeSpec, ask: Ask, advance: Callable[[str], None]) -> None:
        self.spec, self._ask, self._advance = spec, ask, advance

    async def __call__(self, pair: HumanPair) -> Judged:
        picks: list[int | None] = []
        failed: list[str] = []
        for first, second in ((pair.chosen, pair.rejected), (pair.rejected, pair.chosen)):
            try:
                picks.append(await prefer(self._ask, self.spec, pair.prompt, first, second))
            except BadModelOutput:  # the judge answered, but not with a usable decision
                picks.append(None)
            except BackendError as exc:  # the judge could not be reached: not the judge's fault, not a parse
                failed.append(str(exc))
                picks.append(None)
            self._advance("judge")
        return Judged(picks=(picks[0], picks[1]), request_failures=tuple(failed))


def _rate(results: list[Judged], order: int, right: int) -> float | None:
    picks = [r.picks[order] for r in results if r.picks[order] is not None]
    return round(sum(1 for p in picks if p == right) / len(picks), 4) if picks else None


def summarise(results: list[Judged]) -> dict[str, Any]:
    """Accuracy against the human label, consistency under swapped order, and position rates."""
    n = len(results)
    request_failures = sum(len(r.request_failures) for r in results)
    valid = [(order, pick) for r in results for order, pick in enumerate(r.picks) if pick is not None]
    agree = sum(1 for order, pick in valid if pick == (1 if order == 0 else 2))  # the human-chosen response
    both_valid = [r.picks for r in results if None not in r.picks]
    consistent = sum(1 for a, b in both_valid if a != b)  # same response, so different positions
    first = sum(1 for _, pick in valid if pick == 1)
    return {
        "n": n,
        "judgments": 2 * n,
        "accuracy": round(agree / len(valid), 4) if valid else None,
        "consistency": round(consistent / len(both_valid), 4) if both_valid else None,
        "parse_failures": 2 * n - len(valid) - request_failures,
        "request_failures": request_failures,
        "position_1_rate": round(first / len(valid), 4) if valid else None,
        "position_2_rate": round(1 - first / len(valid), 4) if valid else None,
        "human_chosen_shown_first_accuracy": _rate(results, 0, 1),
        "human_chosen_shown_second_accuracy": _rate(results, 1, 2),
    }
