"""Rebuild a run's files from its store: the seed's four kinds of files, blends, failures and the manifest.

Everything is read back from the durable store by content key, so the files of an interrupted-then-resumed
run equal those of an uninterrupted one. Each file is written atomically (temporary file, then rename), so a
crash never leaves half a dataset behind.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .candidates import candidate_record, generation_key
from .config import RunConfig
from .dataset import Pair, blend, format_pair, jsonl, nemo_split_files, split
from .engine import EngineSettings
from .inputs import read_text
from .store import Failure, Store
from .verdicts import Verdict, verdict_key

CANDIDATES_FILE = "cai_candidate_dataset.json"
PREFERENCES_FILE = "cai_preference_dataset.json"
FAILURES_FILE = "failures.jsonl"
MANIFEST_FILE = "manifest.json"


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any, indent: int | None = 4) -> None:
    write_atomic(path, json.dumps(data, indent=indent) + "\n")


@dataclass
class Collected:
    """What the store holds for this run's prompts, in input order."""

    candidates: list[dict[str, str]] = field(default_factory=list)
    pairs: list[Pair] = field(default_factory=list)


def collect(
    prompts: list[str],
    store: Store,
    settings: EngineSettings,
    policy_identity: dict[str, Any],
    judge_identity: dict[str, Any],
) -> Collected:
    out = Collected()
    temps = settings.temperatures
    for prompt in prompts:
        gens = [store.get_generation(generation_key(prompt, t, policy_identity)) for t in temps]
        if any(g is None for g in gens):
            continue
        responses = {t: g.response for t, g in zip(temps, gens, strict=True) if g is not None}
        out.candidates.append(candidate_record(prompt, responses))
        assert settings.judge is not None
        stored = store.get_verdict(verdict_key(prompt, list(responses.values()), settings.judge, judge_identity))
        if stored is None:
            continue
        v = Verdict.from_json(stored)
        out.pairs.append(
            Pair(
                prompt,
                responses,
                temps[v.chosen],
                temps[v.rejected],
                v.explanation,
                order_t=tuple(temps[i] for i in v.order),
                chosen_position=v.chosen_position,
                rejected_position=v.rejected_position,
                consistent=v.consistent,
                chosen_prob=v.chosen_prob,
                principle=v.principle,
                merged={temps[k]: [temps[m] for m in ms] for k, ms in v.merged.items()},
            )
        )
    return out


def split_file_names(prefix: str, split_name: str) -> tuple[str, str]:
    stem = f"{prefix}_{split_name}" if prefix else split_name
    return f"{stem}_prompts_with_chat_prompt.jsonl", f"{stem}_comparisons_with_chat_prompt.jsonl"


def write_dataset(cfg: RunConfig, collected: Collected, store: Store) -> dict[str, int]:
    """The seed's files (plus blends); returns pairs written per split. Unusable pairs become failures."""
    out = cfg.output_dir
    write_json(out / CANDIDATES_FILE, collected.candidates)
    write_json(out / PREFERENCES_FILE, [pair.record() for pair in collected.pairs])
    usable: list[tuple[str, str, str]] = []
    for pair in collected.pairs:
        formatted = format_pair(cfg.template, pair)
        if isinstance(formatted, str):
            store.put_failure(Failure(pair.prompt, "dataset", formatted))
        else:
            usable.append(formatted)
    counts: dict[str, int] = {}
    rng = random.Random(cfg.seed)
    for split_name, items in split(usable, cfg.splits, cfg.shuffle, cfg.seed).items():
        prompts_text, comparisons_text = nemo_split_files(items)
        names = split_file_names(cfg.output_filename_prefix, split_name)
        write_atomic(out / names[0], prompts_text)
        write_atomic(out / names[1], comparisons_text)
        counts[split_name] = len(items)
        if cfg.blend_with is not None:
            spec = cfg.blend_with.splits[split_name]
            for kind, own, name in (("prompts", prompts_text, names[0]), ("comparisons", comparisons_text, names[1])):
                external = [read_text(path, f"blend {kind}") for path in spec[kind]]
                write_atomic(out / f"blend_{cfg.blend_with.name}_with_{name}", blend(external, own, kind, rng))
    return counts


def write_failures(path: Path, failures: list[Failure]) -> None:
    write_atomic(path, jsonl([f.record() for f in failures]))
