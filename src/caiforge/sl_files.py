"""The SL-CAI files, as NeMo-Aligner's ``generate_sl_cai_dataset.py`` writes them, from revision records.

Pure encoders (see :mod:`caiforge.writers`): the same records always give the same bytes, streamed one record at
a time. Layouts, key order and escaping follow the seed (``json.dumps`` defaults, ``indent=4`` arrays); like every
caiforge JSON array, the critique/revision file ends with a newline, which the seed's ``json.dump`` leaves off.
"""

from __future__ import annotations

from typing import Any

from .records import FailureRecord, RevisionRecord
from .writers import FAILURES_FILE, Encoder, JsonArray, JsonLines

LOG_DIR = "cai_output"
CRITIQUE_REVISION_FILE = f"{LOG_DIR}/cai_critique_revision_samples.json"
SAMPLES_FILE = f"{LOG_DIR}/cai_samples.jsonl"
DEFAULT_OUTPUT_FILE = "cai_revisions_aligner_chat_template.jsonl"
SFT_DATASET = "sl_cai_samples"

Item = RevisionRecord | FailureRecord


def nemo_sft_record(prompt: str, response: str, dataset: str = SFT_DATASET) -> dict[str, Any]:
    """NeMo's SFT chat record (``GPTSFTChatDataset``), in the seed's key order."""
    return {
        "system": "",
        "conversations": [
            {"from": "User", "value": prompt, "label": None},
            {"from": "Assistant", "value": response, "label": None},
        ],
        "mask": "User",
        "dataset": dataset,
    }


def _sft_lines(item: Item) -> list[dict[str, Any]]:
    return [nemo_sft_record(item.prompt, item.revision)] if isinstance(item, RevisionRecord) else []


def critique_revision_entry(item: Item) -> dict[str, Any] | None:
    """The seed's six keys. With several rounds they describe the last one (whose revision is the SFT answer),
    and ``rounds`` lists every round in order, each with its instruction's index."""
    if not isinstance(item, RevisionRecord):
        return None
    last = item.rounds[-1]
    entry: dict[str, Any] = {
        "initial_prompt": item.prompt,
        "initial_response": item.initial_response,
        "critique_prompt": last.critique_prompt,
        "critique_response": last.critique_response,
        "revision_prompt": last.revision_prompt,
        "revision_response": last.revision_response,
    }
    if len(item.rounds) > 1:
        entry["rounds"] = [
            {
                "instruction": r.instruction,
                "critique_prompt": r.critique_prompt,
                "critique_response": r.critique_response,
                "revision_prompt": r.revision_prompt,
                "revision_response": r.revision_response,
            }
            for r in item.rounds
        ]
    return entry


def _failure_lines(item: Item) -> list[dict[str, Any]]:
    return [item.record()] if isinstance(item, FailureRecord) else []


def seed_files(output_name: str) -> dict[str, Encoder[Item]]:
    """Paths relative to the SFT file's folder: the SFT file, and the seed's ``cai_output/`` beside it."""
    return {
        output_name: JsonLines(_sft_lines),
        CRITIQUE_REVISION_FILE: JsonArray(critique_revision_entry),
        SAMPLES_FILE: JsonLines(_sft_lines),
    }


def failure_file() -> dict[str, Encoder[Item]]:
    return {FAILURES_FILE: JsonLines(_failure_lines)}
