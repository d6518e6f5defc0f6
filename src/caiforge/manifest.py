"""The run manifest (``manifest.json``), typed: written by ``run``, read by the card, the report and exporters.

Reading is lenient (every field has a default and unknown fields are ignored), so ``caiforge report`` works on
a folder written by an older version; writing leaves out what was never set (the consistency counts of a
one-pass run), so the file says only what the run measured.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import InputError

MANIFEST_FILE = "manifest.json"


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", defer_build=True)


class Counts(_Lenient):
    input_records: int = 0
    bad_records: int = 0
    unique_prompts: int = 0
    duplicate_prompts: int = 0
    with_candidates: int = 0
    judged: int = 0
    pairs: int = 0
    splits: dict[str, int] = {}
    failures: int = 0
    consistency_rate: float | None = None  # with two passes: the share of judged prompts whose passes agreed
    inconsistent: int | None = None
    revised: int | None = None  # revise: prompts with a revision


class RunStats(_Lenient):
    """Per role: requests sent, retried, answered from the store; tokens; failures; where concurrency settled."""

    requests: dict[str, int] = {}
    retries: dict[str, int] = {}
    cached: dict[str, int] = {}
    tokens: dict[str, int] = {}  # "<role>_prompt", "<role>_completion"
    failures: dict[str, int] = {}
    concurrency: dict[str, dict[str, int]] = {}
    endpoints: dict[str, list[dict[str, Any]]] = {}  # per role, each endpoint: requests, errors, rests, latency


class Timings(_Lenient):
    started: float | None = None
    finished: float | None = None
    elapsed_s: float | None = None


class Manifest(_Lenient):
    caiforge: str = ""
    config: dict[str, Any] = {}  # the public config (no secrets)
    counts: Counts = Counts()
    failures_by_reason: dict[str, int] = {}
    stats: RunStats = RunStats()
    constitution_sha256: str = ""
    policy: dict[str, Any] = {}  # the endpoint's identity
    judge: dict[str, Any] = {}  # the endpoint's identity, with mode, passes and layout
    endpoints: dict[str, Any] = {}  # what each endpoint turned out to need, and the notes that say so
    versions: dict[str, str] = {}
    timings: Timings = Timings()
    attempt: int | None = None
    database: str = "caiforge.db"
    warnings: list[str] = []
    formats: list[str] = []  # trainer formats written besides the seed's files
    files: list[str] = []  # every dataset file written, relative to the run folder
    blend: dict[str, Any] = {}  # a blend: its seed, ratios, sources (rows, amount, taken) and leaks moved
    reviews: dict[str, int] = {}  # pairs a person flagged (left out of every export) and swapped (caiforge view)
    pipeline: str = "rl-cai"  # "sl-cai": a revise run
    revise: dict[str, Any] = {}  # revise: instructions, few-shot turns, rounds, and the quality figures

    def judge_config(self) -> dict[str, Any]:
        judge = self.config.get("judge")
        return judge if isinstance(judge, dict) else {}

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_unset=True)

    def write(self, directory: Path) -> None:
        from .outputs import write_json

        write_json(directory / MANIFEST_FILE, self.dump(), indent=2)

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        """The manifest is what marks a folder as a run; without it there is nothing trustworthy to read."""
        try:
            data = json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            return cls.model_validate(data)
        except (OSError, ValueError, ValidationError) as exc:
            raise InputError(f"{directory}: not a caiforge run (no manifest.json)") from exc
