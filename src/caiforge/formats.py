"""Every trainer's layout, as pure functions of a run's pairs and split assignment.

Each format reads the same :class:`~caiforge.writers.Dataset` (records, template, options) and the one split
assignment, and returns ``{relative path: text or bytes}``. The readers named in each docstring are the
ground truth for the layout; ``tests/test_formats.py`` holds our files to their rules.

- ``nemo-dpo``: NeMo-Aligner's DPO JSONL (``nemo_aligner/data/nlp/datasets.py: DPOModelDataset``).
- ``nemo-rl``: NeMo-RL's ``PreferenceDataset`` JSONL (``nemo_rl/data/datasets/preference_datasets/
  preference_dataset.py``; ``nemo_rl/data/processors.py: preference_preprocessor``).
- ``trl``: TRL's preference format, standard (strings) and conversational (messages), JSONL and Parquet.
- ``trl-kto``: TRL's unpaired form (``prompt``, ``completion``, ``label``), two rows per pair.

Every column has one type in every row (``datasets`` decides a column's type from its rows, and turns a
column whose rows mix types into ``Json``); optional metadata is a column in every row or in none.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

from .dataset import nemo_split_files
from .records import PairRecord
from .writers import Dataset, split_file_names

SOFT_LABEL_MODES = ("principle", "principle-cot")

Rows = list[dict[str, Any]]


def _line(row: dict[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False) + "\n"


def jsonl(rows: Rows) -> str:
    return "".join(_line(row) for row in rows)


def parquet(rows: Rows, columns: list[str]) -> bytes:
    """One Parquet file; the schema is inferred once over all rows (one type per column), no timestamps."""
    import pyarrow as pa  # type: ignore[import-untyped]
    import pyarrow.parquet as pq  # type: ignore[import-untyped]

    table = pa.Table.from_pylist(rows) if rows else pa.table({c: pa.array([], pa.string()) for c in columns})
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def _by_id(data: Dataset) -> dict[str, PairRecord]:
    return {p.prompt_id: p for p in data.pairs}


def _clean(text: str) -> str:
    """As the seed's ``process_samples``: the NeMo files and every other format use the same texts."""
    return text.strip().strip("\n")


def _metadata(data: Dataset, pair: PairRecord) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "prompt_id": pair.prompt_id,
        "chosen_temperature": float(pair.chosen_t),
        "rejected_temperature": float(pair.rejected_t),
        "explanation": pair.explanation,
        "judge_mode": data.judge_mode,
    }
    if data.judge_mode in SOFT_LABEL_MODES:
        meta["chosen_prob"] = float(pair.chosen_prob if pair.chosen_prob is not None else 1.0)
    return meta


def nemo_dpo(data: Dataset, splits: dict[str, list[str]]) -> dict[str, str | bytes]:
    """``{"prompt", "chosen_response", "rejected_response"}``: the prompt through the chat template up to the
    assistant header, each response with the end-of-turn marker. ``prompt + response`` is the comparison line
    the reward model reads, so the tokenized prompt is a prefix of it (the prompt ends in the header's
    newline, the response starts with a non-space)."""
    out: dict[str, str | bytes] = {}
    for name, ids in splits.items():
        rows = []
        for pid in ids:
            prompt, chosen, rejected = data.usable[pid]
            rows.append(
                {
                    "prompt": prompt,
                    "chosen_response": chosen[len(prompt) :],
                    "rejected_response": rejected[len(prompt) :],
                }
            )
        out[f"nemo-dpo/{name}.jsonl"] = jsonl(rows)
    return out


def nemo_rl(data: Dataset, splits: dict[str, list[str]]) -> dict[str, str | bytes]:
    """``{"context": [messages], "completions": [{"rank": 0, ...chosen}, {"rank": 1, ...rejected}]}``; no
    ``task_name`` (NeMo-RL's reader adds it and fails on a file that has one)."""
    pairs, out = _by_id(data), dict[str, str | bytes]()
    for name, ids in splits.items():
        rows = []
        for pid in ids:
            pair = pairs[pid]
            rows.append(
                {
                    "context": _context(data, pair),
                    "completions": [
                        {"rank": 0, "completion": [{"role": "assistant", "content": _clean(pair.chosen)}]},
                        {"rank": 1, "completion": [{"role": "assistant", "content": _clean(pair.rejected)}]},
                    ],
                }
            )
        out[f"nemo-rl/{name}.jsonl"] = jsonl(rows)
    return out


def _context(data: Dataset, pair: PairRecord) -> list[dict[str, str]]:
    system = data.template.system_default_message
    turns = [{"role": "system", "content": system}] if system else []
    return [*turns, {"role": "user", "content": _clean(pair.prompt)}]


TRL_COLUMNS = ["prompt", "chosen", "rejected", "prompt_id", "chosen_temperature", "rejected_temperature"]


def _trl_rows(data: Dataset, ids: list[str], conversational: bool) -> Rows:
    pairs, rows = _by_id(data), []
    for pid in ids:
        pair = pairs[pid]
        chosen, rejected = _clean(pair.chosen), _clean(pair.rejected)
        if conversational:
            row: dict[str, Any] = {
                "prompt": _context(data, pair),
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        else:
            row = {"prompt": _clean(pair.prompt), "chosen": chosen, "rejected": rejected}
        rows.append({**row, **_metadata(data, pair)})
    return rows


def _both(folder: str, name: str, rows: Rows, columns: list[str]) -> dict[str, str | bytes]:
    return {f"{folder}/{name}.jsonl": jsonl(rows), f"{folder}/{name}.parquet": parquet(rows, columns)}


def trl(data: Dataset, splits: dict[str, list[str]]) -> dict[str, str | bytes]:
    """TRL's explicit-prompt preference format: ``trl/`` (standard: strings) and ``trl-conversational/``
    (lists of ``{"role", "content"}``), JSONL and Parquet per split; OpenRLHF reads the conversational one."""
    out: dict[str, str | bytes] = {}
    for name, ids in splits.items():
        out.update(_both("trl", name, _trl_rows(data, ids, conversational=False), TRL_COLUMNS))
        out.update(_both("trl-conversational", name, _trl_rows(data, ids, conversational=True), TRL_COLUMNS))
    return out


def trl_kto(data: Dataset, splits: dict[str, list[str]]) -> dict[str, str | bytes]:
    """TRL's unpaired preference format: each pair gives a desirable and an undesirable row."""
    pairs, out = _by_id(data), dict[str, str | bytes]()
    for name, ids in splits.items():
        rows: Rows = []
        for pid in ids:
            pair = pairs[pid]
            meta = {"prompt_id": pid, "judge_mode": data.judge_mode}
            for completion, label in ((pair.chosen, True), (pair.rejected, False)):
                prompt = _clean(pair.prompt)
                rows.append({"prompt": prompt, "completion": _clean(completion), "label": label, **meta})
        out.update(_both("trl-kto", name, rows, ["prompt", "completion", "label", "prompt_id", "judge_mode"]))
    return out


def nemo_rm(data: Dataset, splits: dict[str, list[str]]) -> dict[str, str | bytes]:
    """The seed's reward-model files, per split (NeMo-Aligner ``RewardModelDataset``: comparison lines in
    (chosen, rejected) pairs, so every file has an even line count). ``run`` always writes them."""
    out: dict[str, str | bytes] = {}
    for name, ids in splits.items():
        prompts, comparisons = nemo_split_files([data.usable[pid] for pid in ids])
        names = split_file_names(data.prefix, name)
        out[names[0]], out[names[1]] = prompts, comparisons
    return out


Format = Callable[[Dataset, dict[str, list[str]]], dict[str, str | bytes]]
FORMATS: dict[str, Format] = {
    "nemo-rm": nemo_rm,
    "nemo-dpo": nemo_dpo,
    "nemo-rl": nemo_rl,
    "trl": trl,
    "trl-kto": trl_kto,
}
# The config validates --format against config.FORMAT_NAMES (it may not import this layer); a test keeps
# the two equal.
