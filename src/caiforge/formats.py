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
from dataclasses import dataclass, field
from typing import Any

from .dataset import nemo_split_files
from .records import PairRecord
from .template import PromptTemplate
from .writers import Dataset, Formatted, split_file_names

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


def clean(text: str) -> str:
    """As the seed's ``process_samples``: the NeMo files and every other format use the same texts."""
    return text.strip().strip("\n")


@dataclass(frozen=True, kw_only=True)
class Row:
    """One pair as every format needs it; ``meta`` has the same keys in every row of a table."""

    prompt_id: str
    prompt: str
    chosen: str
    rejected: str
    context: list[dict[str, str]]  # the prompt as chat messages (system, if any, then user)
    nemo: Formatted  # (prompt, chosen line, rejected line) through the chat template
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Table:
    splits: dict[str, list[Row]]  # in the run's split order, each split in its assigned order
    prefix: str = ""  # of the NeMo reward-model file names


def context(template: PromptTemplate, prompt: str) -> list[dict[str, str]]:
    system = template.system_default_message
    return [*([{"role": "system", "content": system}] if system else []), {"role": "user", "content": prompt}]


def run_table(data: Dataset, splits: dict[str, list[str]]) -> Table:
    """A run's pairs with their metadata: temperatures, the judge's explanation and mode, and the soft label
    in the modes that give one."""
    pairs: dict[str, PairRecord] = {p.prompt_id: p for p in data.pairs}
    out: dict[str, list[Row]] = {}
    for name, ids in splits.items():
        out[name] = []
        for pid in ids:
            pair = pairs[pid]
            meta: dict[str, Any] = {
                "chosen_temperature": float(pair.chosen_t),
                "rejected_temperature": float(pair.rejected_t),
                "explanation": pair.explanation,
                "judge_mode": data.judge_mode,
            }
            if data.judge_mode in SOFT_LABEL_MODES:
                meta["chosen_prob"] = float(pair.chosen_prob if pair.chosen_prob is not None else 1.0)
            prompt = clean(pair.prompt)
            out[name].append(
                Row(
                    prompt_id=pid,
                    prompt=prompt,
                    chosen=clean(pair.chosen),
                    rejected=clean(pair.rejected),
                    context=context(data.template, prompt),
                    nemo=data.usable[pid],
                    meta=meta,
                )
            )
    return Table(splits=out, prefix=data.prefix)


Files = dict[str, str | bytes]


def nemo_dpo(table: Table) -> Files:
    """``{"prompt", "chosen_response", "rejected_response"}``: the prompt through the chat template up to the
    assistant header, each response with the end-of-turn marker. ``prompt + response`` is the comparison line
    the reward model reads, so the tokenized prompt is a prefix of it (the prompt ends in the header's
    newline, the response starts with a non-space)."""
    out: Files = {}
    for name, rows in table.splits.items():
        lines = []
        for row in rows:
            prompt, chosen, rejected = row.nemo
            lines.append(
                {
                    "prompt": prompt,
                    "chosen_response": chosen[len(prompt) :],
                    "rejected_response": rejected[len(prompt) :],
                }
            )
        out[f"nemo-dpo/{name}.jsonl"] = jsonl(lines)
    return out


def nemo_rl(table: Table) -> Files:
    """``{"context": [messages], "completions": [{"rank": 0, ...chosen}, {"rank": 1, ...rejected}]}``; no
    ``task_name`` (NeMo-RL's reader adds it and fails on a file that has one)."""
    out: Files = {}
    for name, rows in table.splits.items():
        lines = [
            {
                "context": row.context,
                "completions": [
                    {"rank": 0, "completion": [{"role": "assistant", "content": row.chosen}]},
                    {"rank": 1, "completion": [{"role": "assistant", "content": row.rejected}]},
                ],
            }
            for row in rows
        ]
        out[f"nemo-rl/{name}.jsonl"] = jsonl(lines)
    return out


TRL_COLUMNS = ["prompt", "chosen", "rejected", "prompt_id"]
KTO_META = ("judge_mode", "source")  # the metadata that describes a row, not a pair


def _trl_rows(rows: list[Row], conversational: bool) -> Rows:
    out: Rows = []
    for row in rows:
        if conversational:
            texts: dict[str, Any] = {
                "prompt": row.context,
                "chosen": [{"role": "assistant", "content": row.chosen}],
                "rejected": [{"role": "assistant", "content": row.rejected}],
            }
        else:
            texts = {"prompt": row.prompt, "chosen": row.chosen, "rejected": row.rejected}
        out.append({**texts, "prompt_id": row.prompt_id, **row.meta})
    return out


def _both(folder: str, name: str, rows: Rows, columns: list[str]) -> Files:
    return {f"{folder}/{name}.jsonl": jsonl(rows), f"{folder}/{name}.parquet": parquet(rows, columns)}


def trl(table: Table) -> Files:
    """TRL's explicit-prompt preference format: ``trl/`` (standard: strings) and ``trl-conversational/``
    (lists of ``{"role", "content"}``), JSONL and Parquet per split; OpenRLHF reads the conversational one."""
    out: Files = {}
    for name, rows in table.splits.items():
        out.update(_both("trl", name, _trl_rows(rows, conversational=False), TRL_COLUMNS))
        out.update(_both("trl-conversational", name, _trl_rows(rows, conversational=True), TRL_COLUMNS))
    return out


def trl_kto(table: Table) -> Files:
    """TRL's unpaired preference format: each pair gives a desirable and an undesirable row."""
    out: Files = {}
    for name, rows in table.splits.items():
        lines: Rows = []
        for row in rows:
            meta = {"prompt_id": row.prompt_id, **{k: v for k, v in row.meta.items() if k in KTO_META}}
            for completion, label in ((row.chosen, True), (row.rejected, False)):
                lines.append({"prompt": row.prompt, "completion": completion, "label": label, **meta})
        out.update(_both("trl-kto", name, lines, ["prompt", "completion", "label", "prompt_id"]))
    return out


def nemo_rm(table: Table) -> Files:
    """The seed's reward-model files, per split (NeMo-Aligner ``RewardModelDataset``: comparison lines in
    (chosen, rejected) pairs, so every file has an even line count). ``run`` always writes them."""
    out: Files = {}
    for name, rows in table.splits.items():
        prompts, comparisons = nemo_split_files([row.nemo for row in rows])
        names = split_file_names(table.prefix, name)
        out[names[0]], out[names[1]] = prompts, comparisons
    return out


Format = Callable[[Table], Files]
FORMATS: dict[str, Format] = {
    "nemo-rm": nemo_rm,
    "nemo-dpo": nemo_dpo,
    "nemo-rl": nemo_rl,
    "trl": trl,
    "trl-kto": trl_kto,
}
# The config validates --format against config.FORMAT_NAMES (it may not import this layer); a test keeps
# the two equal.
