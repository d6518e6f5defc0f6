"""The CAI paper's labelling, as pure functions: one sampled principle per comparison, options (A)/(B), and the
normalised probabilities of the two option tokens as a soft label.

Bai et al. (2022), "Constitutional AI", section 4: each comparison is shown with one principle drawn at random
from the constitution; the label is P(A) / (P(A) + P(B)) from the feedback model's log-probabilities; with
chain-of-thought the probabilities are overconfident, so they are clamped to 40-60%.
"""

from __future__ import annotations

import math
import random
import re
from typing import Any

from .errors import InputError
from .keys import sha256_text

COT_CLAMP = (0.4, 0.6)


def load_principles(text: str, source: str) -> list[str]:
    """A YAML list (or ``{principles: [...]}``) of strings, else one principle per blank-line-separated paragraph."""
    import yaml  # only for principle modes: 25 ms of every start otherwise

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        if re.match(r"\s*(principles\s*:|- )", text):  # meant as YAML: say where it breaks, never guess
            mark = getattr(exc, "problem_mark", None)
            where = f"{mark.line + 1}:" if mark is not None else ""
            raise InputError(f"{source}:{where} invalid YAML: {getattr(exc, 'problem', exc)}") from exc
        data = None
    if isinstance(data, dict) and isinstance(data.get("principles"), list):
        data = data["principles"]
    if isinstance(data, list):
        if not data or not all(isinstance(p, str) and p.strip() for p in data):
            raise InputError(f"{source}: the principles list must hold non-empty strings")
        return [p.strip() for p in data]
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]
    if len(paragraphs) < 1:
        raise InputError(f"{source}: no principles found (one per paragraph, or a YAML list)")
    return paragraphs


def pick(items: list[Any], *parts: object) -> Any:
    """A seeded choice: the same parts always pick the same item."""
    return items[random.Random(sha256_text("|".join(map(str, parts)))).randrange(len(items))]


def pick_pair(n: int, *parts: object) -> tuple[int, int]:
    """Two distinct candidate indices, seeded (the paper compares pairs of samples)."""
    first, second = random.Random(sha256_text("|".join(map(str, ("pair", *parts))))).sample(range(n), 2)
    return first, second


def pairwise_messages(principle: str, prompt: str, a: str, b: str, cot: bool) -> list[dict[str, str]]:
    """The paper's multiple-choice prompt for one comparison under one principle."""
    user = (
        "Consider the following conversation between a human and an assistant:\n\n"
        f"Human: {prompt}\n\n"
        f"{principle}\n\n"
        f"Options:\n(A) {a}\n\n(B) {b}\n\n"
    )
    if cot:
        user += "First think step by step, then end with exactly 'So the answer is: (A)' or 'So the answer is: (B)'."
        return [{"role": "user", "content": user + "\n\nLet's think step by step:"}]
    user += "Answer with the letter of the better option only.\n\nThe answer is: ("
    return [{"role": "user", "content": user}]


def soft_label(positions: list[list[dict[str, Any]]] | None) -> float | None:
    """P(A) / (P(A) + P(B)) at the first generated position where the letters are in play.

    Models often open with "(" or a space before the letter, so the first position is not always the one that
    decides; the first position whose likely tokens include A or B is."""
    for top in positions or []:
        best: dict[str, float] = {}
        for entry in top:
            letter = str(entry.get("token", "")).strip().strip("()").upper()
            if letter in ("A", "B"):
                best[letter] = max(best.get(letter, -math.inf), float(entry["logprob"]))
        if best:
            pa, pb = math.exp(best.get("A", -math.inf)), math.exp(best.get("B", -math.inf))
            return pa / (pa + pb)
    return None


_ANSWER = re.compile(r"\(?\b([AB])\b\)?")


def hard_label(text: str, cot: bool) -> str | None:
    """The option a reply names: after 'answer is' for chain-of-thought, else the first A/B letter."""
    if cot:
        found = re.findall(r"answer is:?\s*\(?([AB])\)?", text, re.IGNORECASE)
        return found[-1].upper() if found else None
    match = _ANSWER.search(text.strip()[:20])
    return match.group(1) if match else None


def label(text: str, top_logprobs: list[list[dict[str, Any]]] | None, cot: bool) -> float | None:
    """P(A): the soft label when log-probabilities are there, the hard one otherwise; clamped for CoT."""
    if cot:
        hard = hard_label(text, cot=True)
        return None if hard is None else (COT_CLAMP[1] if hard == "A" else COT_CLAMP[0])
    soft = soft_label(top_logprobs)
    if soft is not None:
        return soft
    hard = hard_label(text, cot=False)
    return None if hard is None else (1.0 if hard == "A" else 0.0)
