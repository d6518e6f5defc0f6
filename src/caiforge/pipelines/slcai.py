"""SL-CAI, per prompt: the policy's initial response (after the few-shot dialogs), then ``revisions`` rounds of
critique and revision under an instruction drawn for the prompt and round, each building on the last revision.

Every step is its own request, so it is stored as soon as it is answered (a rerun sends no finished step again)
and a prompt's next step leaves as soon as its last one exists; nothing waits for a batch. Returns a
:class:`RevisionRecord` or raises :class:`StageFailed` naming the step ("initial", "critique", "revision").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import BackendError, BadModelOutput, StageFailed
from ..instructions import Instruction
from ..principles import pick
from ..records import RevisionRecord, Round
from ..request import Ask, Message, Request

NAME = "sl-cai"
ROLES = ("policy",)
STEPS = ("initial", "critique", "revision")


@dataclass(frozen=True, kw_only=True)
class Settings:
    instructions: tuple[Instruction, ...]
    few_shot: tuple[Message, ...]
    revisions: int
    seed: int
    temperature: float | None  # the seed's --temperature (greedy by default, so it rarely matters)

    def describe(self) -> dict[str, Any]:
        """For the run descriptor: what determines this pipeline's results."""
        return {
            "instructions": [[i.critique, i.revision] for i in self.instructions],
            "few_shot": list(self.few_shot),
            "revisions": self.revisions,
            "seed": self.seed,
            "temperature": self.temperature,
        }

    def instruction(self, prompt_id: str, round_: int) -> int:
        """The instruction of a prompt's round: seeded by the prompt, not by its position, so a resumed or
        reordered run draws the same one (the seed draws by position: see docs/revise.md)."""
        return int(pick(list(range(len(self.instructions))), "sl-cai", self.seed, prompt_id, round_))


def totals(settings: Settings, prompts: int) -> dict[str, int]:
    """Progress bars: initial responses, critiques and revisions."""
    return {"initial": prompts, "critique": prompts * settings.revisions, "revision": prompts * settings.revisions}


class EmptyReply(BadModelOutput):
    reason = "empty reply"


class SlCai:
    def __init__(self, settings: Settings, ask: Mapping[str, Ask], advance: Callable[[str], None]) -> None:
        self.s, self._policy, self._advance = settings, ask["policy"], advance

    async def _say(self, step: str, messages: list[Message], done: dict[str, object]) -> str:
        try:
            reply = await self._policy(Request(messages=list(messages), temperature=self.s.temperature))
            if not reply.text.strip():
                raise EmptyReply(f"the policy's {step} is empty")
        except BackendError as exc:
            raise StageFailed(step, exc, keep=done) from exc
        finally:
            self._advance(step)
        return reply.text

    async def __call__(self, item: tuple[str, str]) -> RevisionRecord:
        pid, prompt = item
        messages: list[Message] = [*self.s.few_shot, {"role": "user", "content": prompt}]
        done: dict[str, object] = {}
        initial = last = await self._say("initial", messages, done)
        done["initial_response"] = initial
        rounds: list[Round] = []
        for r in range(self.s.revisions):
            index = self.s.instruction(pid, r)
            inst = self.s.instructions[index]
            messages += [{"role": "assistant", "content": last}, {"role": "user", "content": inst.critique}]
            critique = await self._say("critique", messages, done)
            messages += [{"role": "assistant", "content": critique}, {"role": "user", "content": inst.revision}]
            last = await self._say("revision", messages, done)
            rounds.append(
                Round(
                    instruction=index,
                    critique_prompt=inst.critique,
                    critique_response=critique,
                    revision_prompt=inst.revision,
                    revision_response=last,
                )
            )
            done["rounds"] = len(rounds)
        return RevisionRecord(prompt_id=pid, prompt=prompt, initial_response=initial, rounds=tuple(rounds))
