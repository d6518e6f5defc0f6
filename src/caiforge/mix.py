"""``caiforge blend`` over several sources: runs and outside preference datasets, into one set of splits.

Sources are read into one row type, checked (one line naming the file, the row and the problem for bad data),
sampled by weight or count with a seed of their own, and split: a run keeps its own assignment, a file named
by a split goes to that split, any other file is split by the first run's ratios. A prompt found in two
splits is a leak: all its rows move to one split (test wins, then the later split) and the moves are counted.
Rows are pairs, so chosen and rejected never part. The result is a :class:`~caiforge.formats.Table` that every
format writes.

A run's pairs are held by reference (:class:`RunPair`: id, split, a 16-byte digest of the prompt for the leak
check) and read from its store again, a batch at a time in the order they are written, so a blend holds no
run's records; outside files are read whole (they are the small side of a blend).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .dataset import split as split_items
from .errors import InputError
from .formats import Row, Table, clean, context
from .inputs import json_lines, lines_of, read_text
from .records import PairRecord, prompt_id
from .template import PromptTemplate

DEFAULT_RATIOS = {"train": 0.8, "test": 0.2}
ROWS_BATCH = 1000  # rows resolved per read of the runs' stores


def leak_key(prompt: str) -> bytes:
    """Which prompts count as the same for the leak check (whitespace and case aside), in 16 bytes."""
    return hashlib.blake2b(_key(prompt).encode("utf-8", "surrogatepass"), digest_size=16).digest()


@dataclass(frozen=True, kw_only=True)
class Pair:
    prompt: str
    chosen: str
    rejected: str
    split: str | None  # None: split by the ratios
    source: str

    @property
    def key(self) -> bytes:
        return leak_key(self.prompt)


Fetch = Callable[[list[str]], Iterable[PairRecord]]  # a run's pairs by prompt id, in that order


@dataclass(frozen=True, slots=True)
class RunPair:
    """A run's pair by reference; its texts are read from the run's store (``fetch``) when it is written."""

    prompt_id: str
    key: bytes
    split: str
    source: str
    fetch: Fetch


Ref = Pair | RunPair


@dataclass(kw_only=True)
class Source:
    name: str
    path: str
    kind: str  # "run", "trl", "nemo"
    pairs: list[Ref]
    amount: str | None = None  # as given: a weight (0 < w <= 1) or a count
    kept: list[Ref] = field(default_factory=list)  # the sample the blend took (set by ``take``)

    def report(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "kind": self.kind,
            "rows": len(self.pairs),
            "amount": self.amount,
            "taken": len(self.kept),
        }


@dataclass(kw_only=True)
class Mixed:
    table: Table
    sources: list[Source]
    leaks_moved: int = 0

    @property
    def splits(self) -> dict[str, int]:
        return dict(self.table.sizes)


def parse_source(text: str) -> tuple[Path, str | None]:
    """``PATH`` or ``PATH:AMOUNT`` (a weight in (0, 1] or a whole count); a path may itself hold colons."""
    head, sep, tail = text.rpartition(":")
    if sep and head and _amount(tail, text) is not None:
        return Path(head), tail
    return Path(text), None


def _amount(tail: str, given: str) -> float | int | None:
    try:
        value = float(tail)
    except ValueError:
        return None
    if "." not in tail and value >= 1 and value == int(value):
        return int(value)
    if 0 < value <= 1:
        return value
    raise InputError(f"--source {given}: the amount must be a weight in (0, 1] or a whole count, got {tail!r}")


def take(source: Source, seed: int) -> list[Ref]:
    """The source's sample (in its own order), seeded by the blend's seed and the source's path."""
    pairs = source.pairs
    if source.amount is None:
        chosen = pairs
    else:
        amount = _amount(source.amount, source.path)
        n = round(len(pairs) * amount) if isinstance(amount, float) else int(amount or 0)
        if n > len(pairs):
            raise InputError(f"{source.path}: asked for {n} pairs, the source has {len(pairs)}")
        keep = sorted(random.Random(f"{seed}|{source.path}").sample(range(len(pairs)), n))
        chosen = [pairs[i] for i in keep]
    source.kept = chosen
    return chosen


def _key(prompt: str) -> str:
    return " ".join(prompt.split()).lower()


def resolve_leaks(assigned: list[tuple[str, Ref]], order: list[str]) -> tuple[list[tuple[str, Ref]], int]:
    """A prompt in two splits would leak train into test: every row of it goes to the winning split (test,
    else the latest in ``order``). Returns the rows and how many moved."""
    rank = {name: (len(order) + 1 if name == "test" else i) for i, name in enumerate(order)}
    where: dict[bytes, str] = {}
    for name, pair in assigned:
        key = pair.key
        if key not in where or rank.get(name, -1) > rank.get(where[key], -1):
            where[key] = name
    moved = sum(1 for name, pair in assigned if where[pair.key] != name)
    return [(where[pair.key], pair) for _, pair in assigned], moved


def mix(sources: list[Source], ratios: dict[str, float], template: PromptTemplate, seed: int, prefix: str) -> Mixed:
    order = list(ratios)
    assigned: list[tuple[str, Ref]] = []
    for source in sources:
        taken = take(source, seed)
        for name in {p.split for p in taken if p.split is not None} - set(order):
            order.append(name)
        named = [(p.split, p) for p in taken if p.split is not None]
        loose = [p for p in taken if p.split is None]
        by_ratio = split_items(loose, ratios, True, seed)
        assigned += [(str(name), p) for name, p in named]
        assigned += [(name, p) for name, part in by_ratio.items() for p in part]
    assigned, moved = resolve_leaks(assigned, order)
    rng = random.Random(seed)
    splits: dict[str, list[Ref]] = {}
    for name in order:
        refs = [p for split_name, p in assigned if split_name == name]
        rng.shuffle(refs)  # the permutation depends on the length alone: as shuffling the rows themselves
        splits[name] = refs
    table = Table(
        sizes={name: len(refs) for name, refs in splits.items()},
        rows=lambda name: _rows(splits[name], template),
        prefix=prefix,
    )
    return Mixed(table=table, sources=sources, leaks_moved=moved)


def _rows(refs: list[Ref], template: PromptTemplate) -> Iterator[Row]:
    """A split's rows in order, the runs' pairs read a batch at a time from their stores."""
    for start in range(0, len(refs), ROWS_BATCH):
        chunk = refs[start : start + ROWS_BATCH]
        wanted: dict[int, tuple[Fetch, list[str]]] = {}
        for ref in chunk:
            if isinstance(ref, RunPair):
                wanted.setdefault(id(ref.fetch), (ref.fetch, []))[1].append(ref.prompt_id)
        found: dict[tuple[int, str], PairRecord] = {}
        for run, (fetch, ids) in wanted.items():
            found.update(((run, p.prompt_id), p) for p in fetch(ids))
        for ref in chunk:
            if isinstance(ref, RunPair):
                record = found[id(ref.fetch), ref.prompt_id]
                ref = Pair(
                    prompt=clean(record.prompt),
                    chosen=clean(record.chosen),
                    rejected=clean(record.rejected),
                    split=ref.split,
                    source=ref.source,
                )
            yield _row(ref, template)


def _row(pair: Pair, template: PromptTemplate) -> Row:
    nemo = (
        template.format_prompt(pair.prompt),
        template.format_with_response(pair.prompt, pair.chosen),
        template.format_with_response(pair.prompt, pair.rejected),
    )
    return Row(
        prompt_id=prompt_id(pair.prompt),
        prompt=pair.prompt,
        chosen=pair.chosen,
        rejected=pair.rejected,
        context=context(template, pair.prompt),
        nemo=nemo,
        meta={"source": pair.source},
    )


# -- reading outside data -----------------------------------------------------------------------------------


def _text_of(value: Any, role: str, where: str, field_name: str) -> str:
    """A string, or a conversation whose last message is ``role``'s (a single turn, as the run's pairs)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        if not all(isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value):
            raise InputError(f"{where}: {field_name!r} messages need string 'role' and 'content'")
        turns = [m for m in value if m["role"] != "system"]
        if len(turns) != 1 or turns[0]["role"] != role:
            raise InputError(f"{where}: {field_name!r} must be one {role} message (multi-turn is not supported)")
        return str(turns[0]["content"])
    raise InputError(f"{where}: {field_name!r} must be a string or a list of messages, got {type(value).__name__}")


def trl_pairs(path: Path, split: str | None, source: str) -> list[Pair]:
    """TRL's explicit-prompt preference rows, standard or conversational, from JSONL or Parquet."""
    rows = _read_rows(path)
    if not rows:
        raise InputError(f"{path}: no rows (an empty file)")
    shapes: set[str] = set()
    out: list[Pair] = []
    for number, row in rows:
        where = f"{path}:{number}"
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
        if missing:
            raise InputError(f"{where}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
        shape = "string" if isinstance(row["prompt"], str) else "messages"
        shapes.add(shape)
        if len(shapes) > 1:
            raise InputError(f"{where}: 'prompt' is {shape} here but not in earlier rows (mixed types)")
        prompt = clean(_text_of(row["prompt"], "user", where, "prompt"))
        chosen = clean(_text_of(row["chosen"], "assistant", where, "chosen"))
        rejected = clean(_text_of(row["rejected"], "assistant", where, "rejected"))
        if not prompt or not chosen or not rejected:
            raise InputError(f"{where}: an empty prompt, chosen or rejected text")
        if chosen == rejected:
            raise InputError(f"{where}: chosen and rejected are the same text (a tie is not a preference)")
        out.append(Pair(prompt=prompt, chosen=chosen, rejected=rejected, split=split, source=source))
    return out


def _read_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # type: ignore[import-untyped]

        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises its own error types for a damaged file
            raise InputError(f"{path}: not a readable Parquet file: {str(exc)[:120]}") from exc
        return [(i + 1, row) for i, row in enumerate(table.to_pylist())]
    out = []
    for number, row in json_lines(path, "blend source"):
        if not isinstance(row, dict):
            raise InputError(f"{path}:{number}: a row must be a JSON object")
        out.append((number, row))
    return out


def nemo_pairs(
    prompts_path: Path, comparisons_path: Path, template: PromptTemplate, split: str, source: str
) -> list[Pair]:
    """The seed's files: prompt line i goes with comparison lines 2i (chosen) and 2i+1 (rejected), each the
    prompt through the template followed by the response and the end-of-turn marker."""
    prompts = [json.loads(x)["text"] for x in lines_of(read_text(prompts_path, "blend prompts")) if x.strip()]
    lines = [json.loads(x)["text"] for x in lines_of(read_text(comparisons_path, "blend comparisons")) if x.strip()]
    if len(lines) != 2 * len(prompts):
        raise InputError(
            f"{comparisons_path}: {len(lines)} comparison lines for {len(prompts)} prompts in {prompts_path}; "
            "there must be two per prompt, chosen then rejected"
        )
    out = []
    eos = template.eos_token or ""
    for i, formatted in enumerate(prompts):
        texts = []
        for number, line in ((2 * i + 1, lines[2 * i]), (2 * i + 2, lines[2 * i + 1])):
            if not line.startswith(formatted):
                raise InputError(f"{comparisons_path}:{number}: the line does not start with its prompt (line {i + 1})")
            body = line[len(formatted) :]
            texts.append(clean(body[: -len(eos)] if eos and body.endswith(eos) else body))
        prompt = _user_text(formatted, template)
        if texts[0] == texts[1]:
            raise InputError(f"{comparisons_path}:{2 * i + 1}: chosen and rejected are the same text (a tie)")
        out.append(Pair(prompt=prompt, chosen=texts[0], rejected=texts[1], split=split, source=source))
    return out


def _user_text(formatted: str, template: PromptTemplate) -> str:
    """The user's words inside a prompt formatted with ``template`` (the text around the user turn removed)."""
    before, _, after = template.user_format.partition("{MESSAGE}")
    start = formatted.find(before) + len(before) if before and before in formatted else 0
    end = formatted.rfind(after) if after and formatted.endswith(after) else len(formatted)
    return clean(formatted[start:end])
