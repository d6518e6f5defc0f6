"""A revise run's trainer files: TRL's SFT formats, and with ``--pairs`` preference pairs in every format.

- ``trl-sft/<split>``: conversational SFT, ``{"messages": [user, assistant]}`` (``SFTTrainer`` applies the
  chat template), JSONL and Parquet;
- ``trl-sft-prompt-completion/<split>``: ``{"prompt", "completion"}`` (TRL's prompt-completion form, loss on the
  completion only), JSONL and Parquet;
- ``--pairs``: the final revision chosen and the initial response rejected, as llm-swarm's recipe makes them,
  written by :mod:`caiforge.formats` in each ``--format`` (TRL, NeMo DPO, NeMo-RL, NeMo RM, KTO).

Each split is halved by position in its seeded order: the first half is SFT data, the second preference pairs,
so no prompt is in both (llm-swarm's ``train_sft``/``train_prefs``). Pure encoders, fed records one at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from .dataset import Ids
from .formats import ParquetFile, Row, clean, context
from .records import RevisionRecord
from .template import PromptTemplate
from .writers import Encoder, JsonLines

SFT_COLUMNS = ["messages", "prompt_id"]
PROMPT_COMPLETION_COLUMNS = ["prompt", "completion", "prompt_id"]


def _messages(r: RevisionRecord) -> list[dict[str, Any]]:
    messages = [{"role": "user", "content": clean(r.prompt)}, {"role": "assistant", "content": clean(r.revision)}]
    return [{"messages": messages, "prompt_id": r.prompt_id}]


def _prompt_completion(r: RevisionRecord) -> list[dict[str, Any]]:
    return [{"prompt": clean(r.prompt), "completion": clean(r.revision), "prompt_id": r.prompt_id}]


def sft_files(split: str) -> dict[str, Encoder[RevisionRecord]]:
    return {
        f"trl-sft/{split}.jsonl": JsonLines(_messages, ascii=False),
        f"trl-sft/{split}.parquet": ParquetFile(_messages, SFT_COLUMNS),
        f"trl-sft-prompt-completion/{split}.jsonl": JsonLines(_prompt_completion, ascii=False),
        f"trl-sft-prompt-completion/{split}.parquet": ParquetFile(_prompt_completion, PROMPT_COMPLETION_COLUMNS),
    }


def pair_rows(records: Iterable[RevisionRecord], template: PromptTemplate) -> Iterator[Row]:
    """Revision chosen, initial response rejected (the caller leaves out revisions that changed nothing)."""
    for r in records:
        prompt, chosen, rejected = clean(r.prompt), clean(r.revision), clean(r.initial_response)
        nemo = (
            template.format_prompt(prompt),
            template.format_with_response(prompt, chosen),
            template.format_with_response(prompt, rejected),
        )
        yield Row(
            prompt_id=r.prompt_id,
            prompt=prompt,
            chosen=chosen,
            rejected=rejected,
            context=context(template, prompt),
            nemo=nemo,
            meta={"source": "sl-cai", "rounds": len(r.rounds)},
        )


def halves(ids: Ids) -> tuple[Ids, Ids]:
    """A split's first half (SFT) and second half (pairs), by position in its seeded order."""
    middle = (len(ids) + 1) // 2
    return ids.take(range(middle)), ids.take(range(middle, len(ids)))
