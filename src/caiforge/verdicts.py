"""From candidates to a verdict: hygiene, the order the judge sees, one or two passes, and the labelling mode.

The judge is reached through one injected ``ask`` function (the engine's, bound to the judge role: cached,
limited, retried), so this module is the whole judging policy and nothing else. Modes:

- ``whole`` (the seed's): the whole constitution as system prompt, every distinct candidate numbered, the judge
  names ``{"chosen": x, "rejected": y}``. Candidates are shown in a seeded random order and quoted between
  markers the policy cannot predict; a decision that repeats one planted inside a candidate is refused.
- ``principle`` / ``principle-cot`` (the CAI paper's): two candidates compared as (A)/(B) under one sampled
  principle; the label is P(A) from log-probabilities where the endpoint gives them (clamped to 40-60% with
  chain-of-thought).

With ``passes=2`` the judge is asked again with the order reversed, and a pair is kept only when both agree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import BackendError, BadModelOutput
from .judge import (
    CopiedDecision,
    NoOption,
    decision_schema,
    distinct,
    judge_messages,
    parse_decision,
    planted_decisions,
    quote_tag,
    shown_order,
)
from .keys import sha256_text
from .principles import label, pairwise_messages, pick, pick_pair
from .request import Ask, Request

ANSWER_TOKENS = 4  # room for "(", " " or "Answer:" before the letter; the soft label reads the letter's position


class TooFewCandidates(BackendError):
    reason = "fewer than two distinct candidates"


class Inconsistent(BadModelOutput):
    reason = "judge passes disagree"


@dataclass(frozen=True)
class JudgeSpec:
    """Everything about *how* to judge; part of every verdict's key."""

    constitution: str
    seed: int
    mode: str = "whole"
    passes: int = 1
    layout: str = "caiforge"  # "seed": the seed's prompt byte for byte, fixed order, no markers
    structured: bool = True  # ask for a JSON schema where the endpoint supports it
    principles: tuple[str, ...] = ()
    parse_retries: int = 3
    max_tokens: int = 1024

    def key_parts(self) -> dict[str, Any]:
        parts = asdict(self)
        parts["constitution"] = sha256_text(self.constitution)
        parts["principles"] = sha256_text("\n".join(self.principles))
        return parts


@dataclass(frozen=True, kw_only=True)
class Verdict:
    """Indices refer to the candidate list as given (temperature order)."""

    chosen: int
    rejected: int
    explanation: str
    order: list[int]  # candidate indices in the order the judge saw them (first pass)
    chosen_position: int  # 1-based, in that order
    rejected_position: int
    consistent: bool | None = None  # None with one pass
    chosen_prob: float | None = None  # soft label (principle modes)
    principle: str | None = None
    merged: dict[int, list[int]] = field(default_factory=dict)


async def whole_pass(ask: Ask, spec: JudgeSpec, prompt: str, texts: list[str], tag: str | None) -> tuple[int, int, str]:
    """One numbered multiple choice; (chosen, rejected) as 1-based positions in ``texts``."""
    messages = judge_messages(spec.constitution, prompt, texts, tag)
    planted = planted_decisions(texts) if tag is not None else set()
    schema = decision_schema(len(texts)) if spec.structured else None
    errors: list[str] = []
    last: BadModelOutput | None = None
    for attempt in range(spec.parse_retries + 1):
        text = ""
        try:
            reply = await ask(
                Request(messages=messages, seed=spec.seed + attempt, schema=schema, max_tokens=spec.max_tokens)
            )
            text = reply.text
            decision = parse_decision(text, len(texts))
            if (decision.chosen, decision.rejected) in planted:
                raise CopiedDecision(
                    f"the reply repeats the decision {decision.chosen}/{decision.rejected} written inside a candidate"
                )
        except BadModelOutput as exc:  # no content at all, or no usable decision: another seed
            last = exc
            errors.append(text or str(exc))
            continue
        return decision.chosen, decision.rejected, decision.explanation
    assert last is not None
    raise type(last)(f"{last} (after {len(errors)} attempts; last reply: {errors[-1][:300]!r})")


async def pairwise(ask: Ask, spec: JudgeSpec, principle: str, prompt: str, a: str, b: str) -> float:
    """P(A is better) under one principle."""
    cot = spec.mode == "principle-cot"
    messages = pairwise_messages(principle, prompt, a, b, cot)
    replies: list[str] = []
    for attempt in range(spec.parse_retries + 1):
        try:
            reply = await ask(
                Request(
                    messages=messages,
                    seed=spec.seed + attempt,
                    logprobs=not cot,
                    max_tokens=spec.max_tokens if cot else ANSWER_TOKENS,
                )
            )
        except BadModelOutput as exc:
            replies.append(str(exc))
            continue
        p = label(reply.text, reply.top_logprobs, cot)
        if p is not None:
            return p
        replies.append(reply.text)
    raise NoOption(f"no (A)/(B) answer after {len(replies)} attempts; last reply: {replies[-1][:300]!r}")


async def decide(ask: Ask, spec: JudgeSpec, prompt: str, candidates: list[str]) -> Verdict:
    """The verdict for one prompt, or a BackendError saying why there is none."""
    kept = distinct(candidates)
    if len(kept.indices) < 2:
        raise TooFewCandidates(
            f"{len(kept.indices)} distinct non-empty candidate(s) of {len(candidates)} "
            f"({len(kept.empty)} empty, {sum(len(v) for v in kept.merged.values())} duplicates)"
        )
    if spec.mode == "whole":
        return await _decide_whole(ask, spec, prompt, candidates, kept.indices, kept.merged)
    return await _decide_pairwise(ask, spec, prompt, candidates, kept.indices, kept.merged)


async def _decide_whole(
    ask: Ask, spec: JudgeSpec, prompt: str, candidates: list[str], kept: list[int], merged: dict[int, list[int]]
) -> Verdict:
    if spec.layout == "seed":
        order, tag = list(kept), None
    else:
        order = [kept[i] for i in shown_order(len(kept), spec.seed, prompt)]
        tag = quote_tag(spec.seed, prompt)
    orders = [order, order[::-1]][: spec.passes]
    results = []
    for shown in orders:
        c, r, explanation = await whole_pass(ask, spec, prompt, [candidates[i] for i in shown], tag)
        results.append((shown[c - 1], shown[r - 1], explanation, c, r))
    chosen, rejected, explanation, c_pos, r_pos = results[0]
    if len(results) == 2 and results[1][:2] != (chosen, rejected):
        raise Inconsistent(
            f"in the shown order the judge chose #{c_pos} over #{r_pos}; reversed, it chose "
            f"#{results[1][3]} over #{results[1][4]} (different candidates)"
        )
    return Verdict(
        chosen=chosen,
        rejected=rejected,
        explanation=explanation,
        order=order,
        chosen_position=c_pos,
        rejected_position=r_pos,
        consistent=True if spec.passes == 2 else None,
        merged=merged,
    )


async def _decide_pairwise(
    ask: Ask, spec: JudgeSpec, prompt: str, candidates: list[str], kept: list[int], merged: dict[int, list[int]]
) -> Verdict:
    i, j = pick_pair(len(kept), spec.seed, prompt)
    a, b = kept[i], kept[j]
    principle = pick(list(spec.principles), "principle", spec.seed, prompt)
    p_a = [await pairwise(ask, spec, principle, prompt, candidates[a], candidates[b])]
    if spec.passes == 2:
        p_a.append(1.0 - await pairwise(ask, spec, principle, prompt, candidates[b], candidates[a]))
        if (p_a[0] > 0.5) != (p_a[1] > 0.5):
            raise Inconsistent(f"P(first wins) was {p_a[0]:.2f} in one order and {p_a[1]:.2f} reversed")
    mean = sum(p_a) / len(p_a)
    chosen, rejected = (a, b) if mean >= 0.5 else (b, a)
    prob = mean if chosen == a else 1.0 - mean
    return Verdict(
        chosen=chosen,
        rejected=rejected,
        explanation=f"principle: {principle}",
        order=[a, b],
        chosen_position=1 if chosen == a else 2,
        rejected_position=2 if chosen == a else 1,
        consistent=True if spec.passes == 2 else None,
        chosen_prob=round(prob, 6),
        principle=principle,
        merged=merged,
    )


async def prefer(ask: Ask, spec: JudgeSpec, prompt: str, first: str, second: str) -> int:
    """1 or 2: the position the judge prefers when shown (first, second), in one pass (``eval-judge``)."""
    if spec.mode == "whole":
        tag = quote_tag(spec.seed, prompt) if spec.layout == "caiforge" else None
        chosen, _, _ = await whole_pass(ask, spec, prompt, [first, second], tag)
        return chosen
    principle = pick(list(spec.principles), "principle", spec.seed, prompt)
    return 1 if await pairwise(ask, spec, principle, prompt, first, second) >= 0.5 else 2
