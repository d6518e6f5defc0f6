"""The SL seed's blend of the CAI records with a helpfulness set (``--helpfulness-dataset-path``).

As ``blend_cai_sft_dataset`` does: every helpfulness record, then every CAI record, each checked with the seed's
rule (the keys ``system``, ``conversations``, ``mask``, ``dataset``; every turn with ``from`` and ``value``), shuffled
with NumPy's legacy ``RandomState(seed).permutation``, the generator the seed's global ``np.random.seed`` drives,
so the same seed gives the seed's order. Unlike the seed, a bad record stops the run before any request, naming
its file and line, instead of an ``assert`` after hours of generation.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import InputError
from .inputs import json_lines
from .outputs import write_json, write_stream

REQUIRED = ("system", "conversations", "mask", "dataset")


def problem(record: Any) -> str | None:
    """Why a record is not a NeMo SFT chat record, or None."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        return f"missing {', '.join(repr(k) for k in missing)} (a NeMo SFT record has {', '.join(REQUIRED)})"
    turns = record["conversations"]
    if not isinstance(turns, list):
        return "'conversations' must be a list of turns"
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            return f"conversations[{i}] needs 'from' and 'value'"
    return None


def read_sft(path: Path, what: str = "helpfulness dataset") -> list[dict[str, Any]]:
    """Every record of a NeMo SFT JSONL file, checked; the first bad one is an InputError naming its line."""
    records = []
    for number, record in json_lines(path, what):
        why = problem(record)
        if why is not None:
            raise InputError(f"{path}:{number}: {why}")
        records.append(record)
    if not records:
        raise InputError(f"{path}: the {what} holds no records")
    return records


def summary_path(output: Path) -> Path:
    """The seed's name, bug for bug: ``str.replace(".json", ".summary.json")``, so ``x.jsonl`` gives
    ``x.summary.jsonl``; a script that looks for the seed's summary finds it. A name without ``.json``, which
    the seed would overwrite with its summary, gets ``.summary.json`` appended."""
    found = Path(str(output).replace(".json", ".summary.json"))
    return found if found != output else output.with_name(output.name + ".summary.json")


def blend(helpfulness: Path, cai: Path, output: Path, seed: int) -> dict[str, int]:
    """Write the blend over ``output`` (which may be ``cai``) and the seed's summary beside it."""
    import numpy as np  # the legacy generator is what reproduces the seed's order; imported only to blend

    samples = read_sft(helpfulness)
    helpful = len(samples)
    samples += read_sft(cai, "CAI samples file") if cai.stat().st_size else []
    order = np.random.RandomState(seed).permutation(len(samples))

    def lines() -> Iterator[str]:
        for i in order:
            yield json.dumps(samples[int(i)]) + "\n"

    write_stream(output, lines())
    write_json(
        summary_path(output),
        {"input_files": [str(helpfulness), str(output)], "output_file": str(output), "prompt_template": "chat"},
    )
    return {"helpfulness": helpful, "cai": len(samples) - helpful, "blended": len(samples)}
