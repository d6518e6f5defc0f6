"""What a reader of SL-CAI data must know before training on it, counted as the records stream past.

The paper and its readers name the failure modes: revisions that only refuse (evasive models), revisions that
change nothing, and a few instructions doing all the work. Pure: fed one record at a time, it holds counts only.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .manifest import Manifest
from .records import RevisionRecord

# A mere refusal: the answer opens by declining and says little else. Both conditions, so a revision that
# declines the harmful part and then helps with the rest is not counted.
REFUSAL = re.compile(
    r"^\W*(i\s*(?:'m|am)\s+(?:sorry|afraid|not able|unable)|i\s+(?:can\s*not|can't|cannot|won't|will not|must "
    r"(?:decline|refuse)|refuse|do not feel comfortable|don't feel comfortable)|sorry,|as an ai\b|i apologi[sz]e)",
    re.IGNORECASE,
)
REFUSAL_MAX_WORDS = 40


def is_mere_refusal(text: str) -> bool:
    return bool(REFUSAL.match(text.strip())) and len(text.split()) <= REFUSAL_MAX_WORDS


def _summary(values: list[int]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "median": 0.0}
    return {"mean": round(statistics.fmean(values), 1), "median": float(statistics.median(values))}


@dataclass
class QualityTally:
    """Counts of revised prompts: refusals, unchanged, lengths in words before and after, instruction use."""

    revised: int = 0
    refusals: int = 0
    unchanged: int = 0
    initial_words: list[int] = field(default_factory=list)  # 8 bytes a prompt: the medians need them
    revised_words: list[int] = field(default_factory=list)
    instructions: Counter[int] = field(default_factory=Counter)

    def add(self, record: RevisionRecord) -> None:
        self.revised += 1
        final = record.revision
        self.refusals += is_mere_refusal(final)
        self.unchanged += final.strip() == record.initial_response.strip()
        self.initial_words.append(len(record.initial_response.split()))
        self.revised_words.append(len(final.split()))
        for r in record.rounds:
            self.instructions[r.instruction] += 1

    def figures(self, instruction_count: int) -> dict[str, Any]:
        n = self.revised
        return {
            "revised": n,
            "mere_refusal_rate": round(self.refusals / n, 4) if n else None,
            "unchanged_rate": round(self.unchanged / n, 4) if n else None,
            "words_initial": _summary(self.initial_words),
            "words_revised": _summary(self.revised_words),
            "instruction_use": [self.instructions.get(i, 0) for i in range(instruction_count)],
            "refusal_rule": f"opens by declining and has at most {REFUSAL_MAX_WORDS} words",
        }


def report_lines(manifest: Manifest) -> list[str]:
    """A revise run's ``report.md``: the quality figures and how often each instruction was drawn."""
    r, counts = manifest.revise, manifest.counts
    q = r.get("quality", {})
    lines = ["# caiforge revise report", ""]
    for warning in manifest.warnings:
        lines += [f"> **Warning.** {warning}", ""]
    lines += [
        "## Summary",
        "",
        f"- {counts.revised} revisions of {counts.unique_prompts} unique prompts, {counts.failures} failures "
        f"({', '.join(f'{k} {v}' for k, v in manifest.failures_by_reason.items()) or 'none'}).",
        f"- {r.get('revisions', 1)} critique/revision round(s) a prompt.",
        "",
        "## Revisions",
        "",
    ]
    if not q.get("revised"):
        return [*lines, "Skipped because the run has no revisions."]
    before, after = q["words_initial"], q["words_revised"]
    lines += [
        "| | |",
        "|---|---|",
        f"| mere refusals | {100 * q['mere_refusal_rate']:.1f}% ({q['refusal_rule']}) |",
        f"| unchanged from the initial answer | {100 * q['unchanged_rate']:.1f}% |",
        f"| words, mean | {before['mean']:g} -> {after['mean']:g} |",
        f"| words, median | {before['median']:g} -> {after['median']:g} |",
        "",
        "A high refusal share means the revisions teach evasiveness rather than harmlessness; a high unchanged "
        "share means the critiques found nothing to change (or the policy ignored them).",
        "",
        "## Instructions",
        "",
        "| instruction | times drawn |",
        "|---|---|",
        *(f"| {i} | {n} |" for i, n in enumerate(q.get("instruction_use", []))),
    ]
    return lines
