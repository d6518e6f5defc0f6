"""Every trainer's layout, as pure functions of a run's pairs and split assignment.

Each format is a function of a split's name (and the NeMo file prefix) that returns ``{relative path:
encoder}``. The encoders are fed the split's :class:`Row` objects one at a time, in the split's order, so
every file of every format is written in one pass over a split without holding it (Parquet a row group at a
time). The readers named in each docstring are the ground truth for the layout; ``tests/test_formats.py``
holds our files to their rules.

- ``nemo-dpo``: NeMo-Aligner's DPO JSONL (``nemo_aligner/data/nlp/datasets.py: DPOModelDataset``).
- ``nemo-rl``: NeMo-RL's ``PreferenceDataset`` JSONL (``nemo_rl/data/datasets/preference_datasets/
  preference_dataset.py``; ``nemo_rl/data/processors.py: preference_preprocessor``).
- ``trl``: TRL's preference format, standard (strings) and conversational (messages), JSONL and Parquet.
- ``trl-kto``: TRL's unpaired form (``prompt``, ``completion``, ``label``), two rows per pair.

Every column has one type in every row (``datasets`` decides a column's type from its rows, and turns a
column whose rows mix types into ``Json``); optional metadata is a column in every row or in none.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .records import PairRecord
from .template import PromptTemplate
from .writers import Encoder, Formatted, JsonLines, check, nemo_files

SOFT_LABEL_MODES = ("principle", "principle-cot")
ROW_GROUP = 5_000  # Parquet rows per row group (measured: 10k rows cost 36 MB more peak RSS, 2k no less than 5k)
ARROW_BATCH = 1024  # rows turned into Arrow arrays at a time: the most a Parquet file holds as Python objects

Rows = list[dict[str, Any]]
T = TypeVar("T")


class _Chunks:
    """A write-only file for pyarrow that hands back what was written since the last ``drain``; ``tell`` is
    the whole file's length (Parquet records each column chunk's offset)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self.closed = False

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self.parts.append(chunk)
        self.size += len(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def drain(self) -> bytes:
        out, self.parts = b"".join(self.parts), []
        return out


class ParquetFile(Generic[T]):
    """A Parquet file written a row group at a time, zstd, no timestamps; a file of at most ``row_group`` rows
    has the bytes ``pyarrow.parquet.write_table`` gives for all its rows at once.

    Rows become Arrow arrays ``ARROW_BATCH`` at a time (the schema inferred from the first rows as
    ``Table.from_pylist`` infers it: the first row's keys, each column's type from its values; every column has
    one type in every row, so it is the file's), and the arrays are joined into one row group when it is full.
    Arrow's memory comes from the system allocator, which gives it back between row groups (the default
    mimalloc pool kept about twice as much)."""

    def __init__(self, rows: Callable[[T], Rows], columns: list[str], row_group: int = ROW_GROUP) -> None:
        self.rows, self.columns, self.row_group = rows, columns, row_group
        self.pending: Rows = []  # rows not yet Arrow arrays
        self.batches: list[Any] = []  # Arrow record batches of the row group being filled
        self.buffered = 0  # rows in ``batches``
        self.sink = _Chunks()
        self.writer: Any = None
        self.schema: Any = None

    def add(self, item: T) -> bytes:
        out = b""
        for row in self.rows(item):
            self.pending.append(row)
            if len(self.pending) == ARROW_BATCH or self.buffered + len(self.pending) == self.row_group:
                self._convert()
            if self.buffered == self.row_group:
                out += self._flush()
        return out

    def end(self) -> bytes:
        import pyarrow as pa  # type: ignore[import-untyped]

        if self.pending:
            self._convert()
        if self.batches:
            self._write(self._table())
        elif self.writer is None:  # no rows: the columns, typed as strings
            self._write(pa.table({c: pa.array([], pa.string()) for c in self.columns}))
        self.writer.close()
        return self.sink.drain()

    def _convert(self) -> None:
        import pyarrow as pa

        pool, rows = pa.system_memory_pool(), self.pending
        if self.schema is None:
            names = list(rows[0])
            arrays = [pa.array([r.get(n) for r in rows], memory_pool=pool) for n in names]
            batch = pa.RecordBatch.from_arrays(arrays, names=names)
            self.schema = batch.schema
        else:
            arrays = [pa.array([r.get(f.name) for r in rows], type=f.type, memory_pool=pool) for f in self.schema]
            batch = pa.RecordBatch.from_arrays(arrays, schema=self.schema)
        self.batches.append(batch)
        self.buffered += len(rows)
        self.pending = []

    def _flush(self) -> bytes:
        self._write(self._table())
        return self.sink.drain()

    def _table(self) -> Any:
        """The row group's batches as one table of contiguous arrays (the bytes of one ``from_pylist``)."""
        import pyarrow as pa

        table = pa.Table.from_batches(self.batches, schema=self.schema).combine_chunks(pa.system_memory_pool())
        self.batches, self.buffered = [], 0
        return table

    def _write(self, table: Any) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq  # type: ignore[import-untyped]

        if self.writer is None:
            self.writer = pq.ParquetWriter(
                pa.PythonFile(self.sink, mode="w"),
                table.schema,
                compression="zstd",
                memory_pool=pa.system_memory_pool(),
            )
        self.writer.write_table(table)


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
    """Rows per split, made on demand: ``rows(split)`` gives a split's rows in its order, one at a time, each
    time it is called (a run's from its store, a blend's from its sources), so no split is ever held."""

    sizes: dict[str, int]  # rows per split, in the split order
    rows: Callable[[str], Iterable[Row]]
    prefix: str = ""  # of the NeMo reward-model file names


def context(template: PromptTemplate, prompt: str) -> list[dict[str, str]]:
    system = template.system_default_message
    return [*([{"role": "system", "content": system}] if system else []), {"role": "user", "content": prompt}]


def run_rows(pairs: Iterable[PairRecord], template: PromptTemplate, judge_mode: str) -> Iterator[Row]:
    """A run's usable pairs with their metadata: temperatures, the judge's explanation and mode, and the soft
    label in the modes that give one."""
    for pair in pairs:
        nemo = check(template, pair).nemo
        if nemo is None:
            raise ValueError(f"prompt {pair.prompt_id}: an unusable pair was assigned a split")
        meta: dict[str, Any] = {
            "chosen_temperature": float(pair.chosen_t),
            "rejected_temperature": float(pair.rejected_t),
            "explanation": pair.explanation,
            "judge_mode": judge_mode,
        }
        if judge_mode in SOFT_LABEL_MODES:
            meta["chosen_prob"] = float(pair.chosen_prob if pair.chosen_prob is not None else 1.0)
        prompt = clean(pair.prompt)
        yield Row(
            prompt_id=pair.prompt_id,
            prompt=prompt,
            chosen=clean(pair.chosen),
            rejected=clean(pair.rejected),
            context=context(template, prompt),
            nemo=nemo,
            meta=meta,
        )


Files = dict[str, Encoder[Row]]


def _nemo_dpo_lines(row: Row) -> Rows:
    prompt, chosen, rejected = row.nemo
    return [{"prompt": prompt, "chosen_response": chosen[len(prompt) :], "rejected_response": rejected[len(prompt) :]}]


def nemo_dpo(split: str, prefix: str) -> Files:
    """``{"prompt", "chosen_response", "rejected_response"}``: the prompt through the chat template up to the
    assistant header, each response with the end-of-turn marker. ``prompt + response`` is the comparison line
    the reward model reads, so the tokenized prompt is a prefix of it (the prompt ends in the header's
    newline, the response starts with a non-space)."""
    return {f"nemo-dpo/{split}.jsonl": JsonLines(_nemo_dpo_lines, ascii=False)}


def _nemo_rl_lines(row: Row) -> Rows:
    return [
        {
            "context": row.context,
            "completions": [
                {"rank": 0, "completion": [{"role": "assistant", "content": row.chosen}]},
                {"rank": 1, "completion": [{"role": "assistant", "content": row.rejected}]},
            ],
        }
    ]


def nemo_rl(split: str, prefix: str) -> Files:
    """``{"context": [messages], "completions": [{"rank": 0, ...chosen}, {"rank": 1, ...rejected}]}``; no
    ``task_name`` (NeMo-RL's reader adds it and fails on a file that has one)."""
    return {f"nemo-rl/{split}.jsonl": JsonLines(_nemo_rl_lines, ascii=False)}


TRL_COLUMNS = ["prompt", "chosen", "rejected", "prompt_id"]
KTO_COLUMNS = ["prompt", "completion", "label", "prompt_id"]
KTO_META = ("judge_mode", "source")  # the metadata that describes a row, not a pair


def _trl_standard(row: Row) -> Rows:
    return [
        {"prompt": row.prompt, "chosen": row.chosen, "rejected": row.rejected, "prompt_id": row.prompt_id, **row.meta}
    ]


def _trl_conversational(row: Row) -> Rows:
    texts: dict[str, Any] = {
        "prompt": row.context,
        "chosen": [{"role": "assistant", "content": row.chosen}],
        "rejected": [{"role": "assistant", "content": row.rejected}],
    }
    return [{**texts, "prompt_id": row.prompt_id, **row.meta}]


def _both(folder: str, split: str, rows: Callable[[Row], Rows], columns: list[str]) -> Files:
    return {
        f"{folder}/{split}.jsonl": JsonLines(rows, ascii=False),
        f"{folder}/{split}.parquet": ParquetFile(rows, columns),
    }


def trl(split: str, prefix: str) -> Files:
    """TRL's explicit-prompt preference format: ``trl/`` (standard: strings) and ``trl-conversational/``
    (lists of ``{"role", "content"}``), JSONL and Parquet per split; OpenRLHF reads the conversational one."""
    return {
        **_both("trl", split, _trl_standard, TRL_COLUMNS),
        **_both("trl-conversational", split, _trl_conversational, TRL_COLUMNS),
    }


def _kto_rows(row: Row) -> Rows:
    meta = {"prompt_id": row.prompt_id, **{k: v for k, v in row.meta.items() if k in KTO_META}}
    return [
        {"prompt": row.prompt, "completion": completion, "label": label, **meta}
        for completion, label in ((row.chosen, True), (row.rejected, False))
    ]


def trl_kto(split: str, prefix: str) -> Files:
    """TRL's unpaired preference format: each pair gives a desirable and an undesirable row."""
    return _both("trl-kto", split, _kto_rows, KTO_COLUMNS)


class _Nemo:
    """The NeMo files' encoder fed rows: each row's formatted lines."""

    def __init__(self, encoder: Encoder[Formatted]) -> None:
        self.encoder = encoder

    def add(self, item: Row) -> str | bytes:
        return self.encoder.add(item.nemo)

    def end(self) -> str | bytes:
        return self.encoder.end()


def nemo_rm(split: str, prefix: str) -> Files:
    """The seed's reward-model files, per split (NeMo-Aligner ``RewardModelDataset``: comparison lines in
    (chosen, rejected) pairs, so every file has an even line count). ``run`` always writes them."""
    return {name: _Nemo(encoder) for name, encoder in nemo_files(prefix, split).items()}


Format = Callable[[str, str], Files]  # (split, NeMo file prefix) -> that split's files
FORMATS: dict[str, Format] = {
    "nemo-rm": nemo_rm,
    "nemo-dpo": nemo_dpo,
    "nemo-rl": nemo_rl,
    "trl": trl,
    "trl-kto": trl_kto,
}
# The config validates --format against config.FORMAT_NAMES (it may not import this layer); a test keeps
# the two equal.


def split_files(formats: Iterable[str], split: str, prefix: str) -> Files:
    """Every file of one split in these formats, each name once (``run`` asks for nemo-rm twice)."""
    out: Files = {}
    for name in formats:
        for path, encoder in FORMATS[name](split, prefix).items():
            out.setdefault(path, encoder)
    return out
