"""Output writers: pure functions from a run's records and split assignment to file contents.

Each writer takes a :class:`Dataset` and returns ``{file name: text}``; :data:`WRITERS` names them (the seed's
files today; every trainer's format next). Nothing here reads a file, a config or the store, so the same
records always give the same bytes, whether written at the end of ``run`` or later from the store alone.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .candidates import candidate_record
from .dataset import blend, format_pair, jsonl, nemo_split_files, preference_record, split
from .records import FailureRecord, PairRecord, Record
from .template import PromptTemplate

CANDIDATES_FILE = "cai_candidate_dataset.json"
PREFERENCES_FILE = "cai_preference_dataset.json"
FAILURES_FILE = "failures.jsonl"

Formatted = tuple[str, str, str]  # NeMo's (prompt, chosen line, rejected line)


@dataclass(frozen=True, kw_only=True)
class Blend:
    """The seed's ``--blend-with``: a name, and per split the external files' texts (read by the caller)."""

    name: str
    texts: dict[str, dict[str, list[str]]]  # split -> "prompts"/"comparisons" -> file contents


@dataclass(frozen=True, kw_only=True)
class Dataset:
    records: list[Record]  # input failures, then every prompt's outcome in input order
    template: PromptTemplate
    ratios: dict[str, float]
    shuffle: bool
    seed: int
    prefix: str = ""
    judge_mode: str = "whole"
    blend: Blend | None = None
    usable: dict[str, Formatted] = field(default_factory=dict)  # prompt id -> formatted pair
    unusable: list[FailureRecord] = field(default_factory=list)  # pairs the dataset stage cannot use

    @classmethod
    def build(cls, records: list[Record], template: PromptTemplate, **options: Any) -> Dataset:
        """Formats every pair once; a pair that cannot be used becomes a ``dataset`` failure."""
        usable: dict[str, Formatted] = {}
        unusable: list[FailureRecord] = []
        for r in records:
            if isinstance(r, PairRecord):
                formatted = format_pair(template, r)
                if isinstance(formatted, str):
                    unusable.append(
                        FailureRecord(prompt_id=r.prompt_id, prompt=r.prompt, stage="dataset", reason=formatted)
                    )
                else:
                    usable[r.prompt_id] = formatted
        return cls(records=records, template=template, usable=usable, unusable=unusable, **options)

    @property
    def pairs(self) -> list[PairRecord]:
        return [r for r in self.records if isinstance(r, PairRecord)]

    def failures(self) -> list[FailureRecord]:
        """Every failure in input order: input records first, then per prompt (the dataset stage's included)."""
        late = {f.prompt_id: f for f in self.unusable}
        out: list[FailureRecord] = []
        for r in self.records:
            if isinstance(r, FailureRecord):
                out.append(r)
            elif r.prompt_id in late:
                out.append(late[r.prompt_id])
        return out

    def assign_splits(self) -> dict[str, list[str]]:
        """Each usable pair's split, by prompt id, in each split's order: one assignment for every writer."""
        return split(list(self.usable), self.ratios, self.shuffle, self.seed)


def split_file_names(prefix: str, split_name: str) -> tuple[str, str]:
    stem = f"{prefix}_{split_name}" if prefix else split_name
    return f"{stem}_prompts_with_chat_prompt.jsonl", f"{stem}_comparisons_with_chat_prompt.jsonl"


def seed_files(data: Dataset, splits: dict[str, list[str]]) -> dict[str, str | bytes]:
    """NeMo-Aligner's files: candidates, preferences, per split the reward model's prompts and comparisons
    (and blends). The JSON arrays are written with the seed's ``indent=4``."""
    files: dict[str, str | bytes] = {}
    candidates = []
    for r in data.records:
        responses = r.responses if r.prompt is not None else None
        if responses is not None and r.prompt is not None:
            candidates.append(candidate_record(r.prompt, responses))
    files[CANDIDATES_FILE] = json.dumps(candidates, indent=4) + "\n"
    files[PREFERENCES_FILE] = json.dumps([preference_record(p) for p in data.pairs], indent=4) + "\n"
    rng = random.Random(data.seed)
    for split_name, ids in splits.items():
        prompts_text, comparisons_text = nemo_split_files([data.usable[pid] for pid in ids])
        names = split_file_names(data.prefix, split_name)
        files[names[0]], files[names[1]] = prompts_text, comparisons_text
        if data.blend is not None:
            external = data.blend.texts[split_name]
            for kind, own, name in (("prompts", prompts_text, names[0]), ("comparisons", comparisons_text, names[1])):
                files[f"blend_{data.blend.name}_with_{name}"] = blend(external[kind], own, kind, rng)
    return files


def failures_file(data: Dataset, splits: dict[str, list[str]]) -> dict[str, str | bytes]:
    return {FAILURES_FILE: jsonl([f.record() for f in data.failures()])}


Writer = Callable[[Dataset, dict[str, list[str]]], dict[str, str | bytes]]
WRITERS: dict[str, Writer] = {"seed": seed_files, "failures": failures_file}
