"""Output writers: pure, streaming encoders from a run's records and split assignment to file contents.

A file is an :class:`Encoder`: it turns each item it is fed (a record, in input order, or a pair of a split, in
the split's order) into the text that item adds to the file, then says how the file ends. A file of a million
pairs is so written one item at a time (``outputs.write_streams`` does the I/O, ``export.write_outputs`` the
passes over the store) and never held whole; :func:`render` joins the chunks in memory instead, for small
inputs and tests. Nothing here reads a file, a config or the store, so the same records always give the same
bytes, whether written at the end of ``run`` or later from the store alone.

:data:`WRITERS` keeps the seed's files and ``failures.jsonl`` in their in-memory form (``{file name: text}``
from a :class:`Dataset` held in memory), built from the same encoders.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Generic, Protocol, TypeVar

from .candidates import candidate_record
from .dataset import Ids, blend_units, format_pair, preference_record, shuffled, split_order
from .records import FailureRecord, PairRecord, Record
from .template import PromptTemplate

CANDIDATES_FILE = "cai_candidate_dataset.json"
PREFERENCES_FILE = "cai_preference_dataset.json"
FAILURES_FILE = "failures.jsonl"

Formatted = tuple[str, str, str]  # NeMo's (prompt, chosen line, rejected line)
Chunk = str | bytes
T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)


class Encoder(Protocol[T_contra]):
    """One output file, fed its items in order: ``add`` gives what an item adds, ``end`` how the file ends."""

    def add(self, item: T_contra) -> Chunk: ...

    def end(self) -> Chunk: ...


class JsonLines(Generic[T]):
    """JSON Lines, newline-terminated: the seed's ``json.dumps`` defaults (ASCII-escaped) unless ``ascii`` is
    off (the trainer formats write UTF-8)."""

    def __init__(self, lines: Callable[[T], Iterable[dict[str, Any]]], ascii: bool = True) -> None:
        self.lines, self.ascii = lines, ascii

    def add(self, item: T) -> str:
        return "".join(json.dumps(line, ensure_ascii=self.ascii) + "\n" for line in self.lines(item))

    def end(self) -> str:
        return ""


class JsonArray(Generic[T]):
    """The seed's one-JSON-array files, ``json.dumps(entries, indent=4) + "\\n"``, one entry at a time and the
    same bytes: an entry one level in is its own ``indent=4`` text with every line indented four spaces (JSON
    escapes a newline inside a string, so every newline of the text is the layout's)."""

    def __init__(self, entry: Callable[[T], dict[str, Any] | None]) -> None:
        self.entry, self.count = entry, 0

    def add(self, item: T) -> str:
        entry = self.entry(item)
        if entry is None:
            return ""
        head = ",\n    " if self.count else "[\n    "
        self.count += 1
        return head + json.dumps(entry, indent=4).replace("\n", "\n    ")

    def end(self) -> str:
        return "\n]\n" if self.count else "[]\n"


class Lines:
    """A file whose items are already its text (the blend's lines)."""

    def add(self, item: Chunk) -> Chunk:
        return item

    def end(self) -> str:
        return ""


def render(encoders: Mapping[str, Encoder[T]], items: Iterable[T]) -> dict[str, str | bytes]:
    """Every file in memory: ``write_streams`` without the disk (small inputs and tests)."""
    chunks: dict[str, list[Chunk]] = {name: [] for name in encoders}
    for item in items:
        for name, encoder in encoders.items():
            chunks[name].append(encoder.add(item))
    files: dict[str, str | bytes] = {}
    for name, encoder in encoders.items():
        parts = [*chunks[name], encoder.end()]
        binary = any(isinstance(p, bytes) for p in parts)
        files[name] = (
            b"".join(p if isinstance(p, bytes) else p.encode() for p in parts)
            if binary
            else "".join(p for p in parts if isinstance(p, str))
        )
    return files


# -- the dataset stage, one record at a time ------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Blend:
    """The seed's ``--blend-with``: a name, and per split the external files' texts (read by the caller)."""

    name: str
    texts: dict[str, dict[str, list[str]]]  # split -> "prompts"/"comparisons" -> file contents


@dataclass(frozen=True, kw_only=True)
class Options:
    """What the files depend on besides the records: the template, the splits, the seed, names and a blend."""

    template: PromptTemplate
    ratios: dict[str, float]
    shuffle: bool
    seed: int
    prefix: str = ""
    judge_mode: str = "whole"
    blend: Blend | None = None

    def assign(self, usable: Sequence[str]) -> dict[str, Ids]:
        """Each usable pair's split, by prompt id (in input order), in each split's order: one assignment for
        every writer (as :func:`~caiforge.dataset.split` gives it), 8 bytes an id."""
        ids = usable if isinstance(usable, Ids) else Ids(usable)
        return {name: ids.take(part) for name, part in split_order(len(ids), self.ratios, self.shuffle, self.seed)}


@dataclass(frozen=True, slots=True)
class Checked:
    """A record with what the dataset stage made of it: a usable pair's NeMo lines, or why a pair is unusable."""

    record: Record
    nemo: Formatted | None = None
    unusable: FailureRecord | None = None


def check(template: PromptTemplate, record: Record) -> Checked:
    """Formats a pair once; a pair that cannot be used becomes a ``dataset`` failure in its place."""
    if not isinstance(record, PairRecord):
        return Checked(record)
    formatted = format_pair(template, record)
    if isinstance(formatted, str):
        why = FailureRecord(prompt_id=record.prompt_id, prompt=record.prompt, stage="dataset", reason=formatted)
        return Checked(record, unusable=why)
    return Checked(record, nemo=formatted)


@dataclass(kw_only=True)
class Tally:
    """The manifest's counts, accumulated as the records stream past, and the usable pairs' ids (the one thing
    the split assignment must hold: 8 bytes a pair)."""

    keep_failures: bool = False  # also keep each failure, without its candidates (the run's summary lists them)
    judged: int = 0  # pairs the judge made, usable or not
    with_candidates: int = 0  # prompts whose candidates all exist
    consistent: int = 0  # pairs whose two passes agreed
    reasons: Counter[tuple[str, str]] = field(default_factory=Counter)  # failures by (stage, reason)
    usable: Ids = field(default_factory=Ids)  # usable pairs' prompt ids, in input order
    kept: list[FailureRecord] = field(default_factory=list)

    @property
    def failures(self) -> int:
        return sum(self.reasons.values())

    def add(self, checked: Checked) -> Checked:
        r = checked.record
        if r.prompt is not None and r.responses is not None:
            self.with_candidates += 1
        failure = r if isinstance(r, FailureRecord) else checked.unusable
        if isinstance(r, PairRecord):
            self.judged += 1
            self.consistent += bool(r.consistent)
            if checked.nemo is not None:
                self.usable.append(r.prompt_id)
        if failure is not None:
            self.reasons[failure.stage, failure.reason] += 1
            if self.keep_failures:
                self.kept.append(replace(failure, responses=None))
        return checked

    def count(self, checked: Iterable[Checked]) -> Iterator[Checked]:
        return (self.add(c) for c in checked)


def _candidates(c: Checked) -> dict[str, Any] | None:
    r = c.record
    return candidate_record(r.prompt, r.responses) if r.prompt is not None and r.responses is not None else None


def _preference(c: Checked) -> dict[str, Any] | None:
    return preference_record(c.record) if isinstance(c.record, PairRecord) else None


def _failure_lines(c: Checked) -> list[dict[str, Any]]:
    failure = c.record if isinstance(c.record, FailureRecord) else c.unusable
    return [] if failure is None else [failure.record()]


def record_files(
    on_preference: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Encoder[Checked]]:
    """The seed's files in input order: every prompt's candidates, every judged pair (``indent=4`` arrays).
    ``on_preference`` sees each preference entry as it is written (the report counts them so, instead of reading
    the file back)."""

    def preference(c: Checked) -> dict[str, Any] | None:
        entry = _preference(c)
        if entry is not None and on_preference is not None:
            on_preference(entry)
        return entry

    return {CANDIDATES_FILE: JsonArray(_candidates), PREFERENCES_FILE: JsonArray(preference)}


def failure_files() -> dict[str, Encoder[Checked]]:
    """``failures.jsonl``: input records first, then per prompt in input order (the dataset stage's included)."""
    return {FAILURES_FILE: JsonLines(_failure_lines)}


def split_file_names(prefix: str, split_name: str) -> tuple[str, str]:
    stem = f"{prefix}_{split_name}" if prefix else split_name
    return f"{stem}_prompts_with_chat_prompt.jsonl", f"{stem}_comparisons_with_chat_prompt.jsonl"


def _nemo_prompts(f: Formatted) -> list[dict[str, str]]:
    return [{"text": f[0]}]


def _nemo_comparisons(f: Formatted) -> list[dict[str, str]]:
    return [{"text": f[1]}, {"text": f[2]}]


def nemo_files(prefix: str, split_name: str) -> dict[str, Encoder[Formatted]]:
    """NeMo-Aligner's reward-model files of one split, fed its pairs' lines in the split's order."""
    prompts, comparisons = split_file_names(prefix, split_name)
    return {prompts: JsonLines(_nemo_prompts), comparisons: JsonLines(_nemo_comparisons)}


# -- the seed's blend ----------------------------------------------------------------------------------------

Lookup = Callable[[str, list[int]], list[Formatted]]  # (split, ranks in it) -> those pairs' NeMo lines
BLEND_CHUNK = 1000  # lines placed per lookup of the run's own pairs


def blend_files(
    blend: Blend, prefix: str, splits: Mapping[str, Sequence[str]], seed: int, own: Lookup
) -> Iterator[tuple[str, Iterator[str]]]:
    """(name, lines) of each blend file, in the seed's order: all lines shuffled with one ``Random(seed)`` over
    the splits (prompts, then comparisons), a comparison's two lines kept together. The shuffle is of indices,
    so the run's own lines are looked up (``own``) a chunk at a time, in the order they are written."""
    rng = random.Random(seed)
    for split_name, ids in splits.items():
        names = split_file_names(prefix, split_name)
        for kind, name in (("prompts", names[0]), ("comparisons", names[1])):
            external = blend_units(blend.texts[split_name][kind], kind)
            order = shuffled(len(external) + len(ids), rng)  # now, so the files take the rng in the seed's order
            lines = _blend_lines(order, external, kind, partial(own, split_name))
            yield f"blend_{blend.name}_with_{name}", lines


def _blend_lines(
    order: Sequence[int], external: list[list[str]], kind: str, own: Callable[[list[int]], list[Formatted]]
) -> Iterator[str]:
    n = len(external)
    for start in range(0, len(order), BLEND_CHUNK):
        chunk = order[start : start + BLEND_CHUNK]
        ranks = [i - n for i in chunk if i >= n]
        looked = dict(zip(ranks, own(ranks), strict=True))
        for i in chunk:
            if i < n:
                yield "".join(external[i])
            elif kind == "prompts":
                yield json.dumps({"text": looked[i - n][0]}) + "\n"
            else:
                formatted = looked[i - n]
                yield json.dumps({"text": formatted[1]}) + "\n" + json.dumps({"text": formatted[2]}) + "\n"


# -- the in-memory form ---------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Dataset(Options):
    """A dataset held in memory (tests, the failures file of a stopped run); a run's files stream instead."""

    records: list[Record]  # input failures, then every prompt's outcome in input order
    usable: dict[str, Formatted] = field(default_factory=dict)  # prompt id -> formatted pair
    unusable: list[FailureRecord] = field(default_factory=list)  # pairs the dataset stage cannot use

    @classmethod
    def build(cls, records: Iterable[Record], template: PromptTemplate, **options: Any) -> Dataset:
        """Formats every pair once; a pair that cannot be used becomes a ``dataset`` failure."""
        found = list(records)
        usable: dict[str, Formatted] = {}
        unusable: list[FailureRecord] = []
        for r in found:
            c = check(template, r)
            if isinstance(r, PairRecord) and c.nemo is not None:
                usable[r.prompt_id] = c.nemo
            elif c.unusable is not None:
                unusable.append(c.unusable)
        return cls(records=found, template=template, usable=usable, unusable=unusable, **options)

    @property
    def pairs(self) -> list[PairRecord]:
        return [r for r in self.records if isinstance(r, PairRecord)]

    def checked(self) -> list[Checked]:
        late = {f.prompt_id: f for f in self.unusable}
        return [
            Checked(r, nemo=self.usable.get(r.prompt_id), unusable=late.get(r.prompt_id))
            if isinstance(r, PairRecord)
            else Checked(r)
            for r in self.records
        ]

    def failures(self) -> list[FailureRecord]:
        """Every failure in input order: input records first, then per prompt (the dataset stage's included)."""
        out: list[FailureRecord] = []
        for c in self.checked():
            failure = c.record if isinstance(c.record, FailureRecord) else c.unusable
            if failure is not None:
                out.append(failure)
        return out

    def assign_splits(self) -> dict[str, Ids]:
        return self.assign(list(self.usable))


def seed_files(data: Dataset, splits: Mapping[str, Sequence[str]]) -> dict[str, str | bytes]:
    """NeMo-Aligner's files: candidates, preferences, per split the reward model's prompts and comparisons
    (and blends). The JSON arrays are written with the seed's ``indent=4``."""
    files = render(record_files(), data.checked())
    for split_name, ids in splits.items():
        files.update(render(nemo_files(data.prefix, split_name), [data.usable[pid] for pid in ids]))
    if data.blend is not None:

        def own(split_name: str, ranks: list[int]) -> list[Formatted]:
            return [data.usable[splits[split_name][k]] for k in ranks]

        for name, lines in blend_files(data.blend, data.prefix, splits, data.seed, own):
            files[name] = "".join(lines)
    return files


def failures_file(data: Dataset, splits: Mapping[str, Sequence[str]]) -> dict[str, str | bytes]:
    return render(failure_files(), data.checked())


Writer = Callable[[Dataset, Mapping[str, Sequence[str]]], dict[str, str | bytes]]
WRITERS: dict[str, Writer] = {"seed": seed_files, "failures": failures_file}
