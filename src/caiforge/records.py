"""A run's results as typed records, read from its store alone: no backend, engine or model is loaded.

The run descriptor says what the results were made under (pipeline, temperatures, judge spec, each
endpoint's identity, the config); :func:`records` yields, in input order, a :class:`PairRecord` or a
:class:`FailureRecord` for every prompt that has an outcome under that descriptor, after the failures that
belong to no prompt (bad input records), one row at a time; :func:`pairs_of` reads given pairs in a given
order (a split's), a batch at a time. Output writers are pure functions of these records, which they see one at
a time, so no output needs the run in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, TypeVar

from .keys import content_key, sha256_text
from .store import Store

R = TypeVar("R")


def prompt_id(text: str) -> str:
    """A prompt's stable id: the same text is the same prompt in every run and every file."""
    return sha256_text(text)[:16]


@dataclass(frozen=True, kw_only=True)
class RunDescriptor:
    """What determines a run's results; results made under another descriptor are not this run's."""

    pipeline: str
    settings: dict[str, Any]  # the pipeline's own (RL-CAI: temperatures, judge spec)
    identities: dict[str, dict[str, Any]]  # per role, the endpoint's identity
    config: dict[str, Any] = field(default_factory=dict)  # the public config: template, splits, seed, ...
    attempt: int | None = None

    def key(self) -> str:
        return content_key("run", pipeline=self.pipeline, settings=self.settings, identities=self.identities)

    def save(self, store: Store) -> None:
        store.set_descriptor(self.key(), asdict(self))

    @classmethod
    def load(cls, store: Store) -> RunDescriptor | None:
        found = store.descriptor()
        return cls(**found[1]) if found else None


Responses = dict[float, str]  # candidate text by temperature, in the run's temperature order


def _shallow(record: Any) -> dict[str, Any]:
    """A record's fields as a dict in declaration order, without copying their values (they are immutable here
    or replaced by the caller)."""
    return {f.name: getattr(record, f.name) for f in fields(record)}


def _responses_json(responses: Responses) -> list[list[Any]]:
    return [[t, text] for t, text in responses.items()]


def _responses(data: list[list[Any]] | None) -> Responses | None:
    return None if data is None else {float(t): str(text) for t, text in data}


@dataclass(frozen=True, kw_only=True)
class PairRecord:
    """A judged prompt: its candidates by temperature and the judge's choice among them."""

    prompt_id: str
    prompt: str
    responses: Responses
    chosen_t: float
    rejected_t: float
    explanation: str
    order_t: tuple[float, ...] = ()  # temperatures in the order the judge saw them
    chosen_position: int | None = None
    rejected_position: int | None = None
    consistent: bool | None = None
    chosen_prob: float | None = None
    principle: str | None = None
    merged: dict[float, list[float]] = field(default_factory=dict)

    @property
    def chosen(self) -> str:
        return self.responses[self.chosen_t]

    @property
    def rejected(self) -> str:
        return self.responses[self.rejected_t]

    def swapped(self) -> PairRecord:
        """The pair a person judged the other way round: chosen and rejected exchanged, with their positions,
        and the soft label turned (P(chosen) becomes 1 - P)."""
        prob = None if self.chosen_prob is None else round(1.0 - self.chosen_prob, 6)
        return replace(
            self,
            chosen_t=self.rejected_t,
            rejected_t=self.chosen_t,
            chosen_position=self.rejected_position,
            rejected_position=self.chosen_position,
            chosen_prob=prob,
        )

    def to_json(self) -> dict[str, Any]:
        data = _shallow(self)  # asdict's deep copy was a tenth of the pipeline's own CPU (profiled)
        data["responses"] = _responses_json(self.responses)
        data["merged"] = [[t, ms] for t, ms in self.merged.items()]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PairRecord:
        responses = _responses(data["responses"]) or {}
        return cls(
            **{
                **data,
                "responses": responses,
                "order_t": tuple(data.get("order_t") or ()),
                "merged": {float(t): [float(m) for m in ms] for t, ms in data.get("merged") or []},
            }
        )


@dataclass(frozen=True, kw_only=True)
class FailureRecord:
    """Why a prompt (or an input record, ``prompt is None``) has no pair; ``responses`` when its candidates
    were all made before it failed."""

    prompt_id: str | None
    prompt: str | None
    stage: str
    reason: str
    detail: str = ""
    source: str | None = None
    line: int | None = None
    responses: Responses | None = None

    def record(self) -> dict[str, Any]:
        """One line of ``failures.jsonl``."""
        out: dict[str, Any] = {"prompt": self.prompt, "stage": self.stage, "reason": self.reason}
        if self.detail:
            out["detail"] = self.detail
        if self.source is not None:
            out["source"], out["line"] = self.source, self.line
        return out

    def to_json(self) -> dict[str, Any]:
        data = _shallow(self)
        data["responses"] = None if self.responses is None else _responses_json(self.responses)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FailureRecord:
        return cls(**{**data, "responses": _responses(data.get("responses"))})


Record = PairRecord | FailureRecord


@dataclass(frozen=True, kw_only=True)
class Round:
    """One critique and revision (SL-CAI): the instruction used (its index in the run's list) and both replies."""

    instruction: int
    critique_prompt: str
    critique_response: str
    revision_prompt: str
    revision_response: str


@dataclass(frozen=True, kw_only=True)
class RevisionRecord:
    """A revised prompt (``caiforge revise``): the initial response, then each round built on the last."""

    prompt_id: str
    prompt: str
    initial_response: str
    rounds: tuple[Round, ...]

    @property
    def revision(self) -> str:
        return self.rounds[-1].revision_response

    def to_json(self) -> dict[str, Any]:
        data = _shallow(self)
        data["rounds"] = [_shallow(r) for r in self.rounds]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RevisionRecord:
        return cls(**{**data, "rounds": tuple(Round(**r) for r in data["rounds"])})


def revisions(store: Store, descriptor: RunDescriptor) -> Iterator[RevisionRecord | FailureRecord]:
    """:func:`records` for a ``revise`` run: input failures, then each prompt's revision or failure."""
    for stage, reason, detail, source, line in store.failures(descriptor.attempt):
        yield FailureRecord(
            prompt_id=None, prompt=None, stage=stage, reason=reason, detail=detail or "", source=source, line=line
        )
    for result in store.results(descriptor.key()):
        if result.data is not None:
            is_revision = result.status == "revision"
            yield RevisionRecord.from_json(result.data) if is_revision else FailureRecord.from_json(result.data)


def records(store: Store, descriptor: RunDescriptor | None = None) -> Iterator[Record]:
    """Input failures of the run's last attempt, then every prompt's outcome in input order (pending prompts,
    which have none yet, are left out)."""
    descriptor = descriptor or RunDescriptor.load(store)
    if descriptor is None:
        return
    for stage, reason, detail, source, line in store.failures(descriptor.attempt):
        yield FailureRecord(
            prompt_id=None, prompt=None, stage=stage, reason=reason, detail=detail or "", source=source, line=line
        )
    for result in store.results(descriptor.key()):
        if result.data is None:
            continue
        yield PairRecord.from_json(result.data) if result.status == "pair" else FailureRecord.from_json(result.data)


PAIRS_BATCH = 500  # ids per query: well under SQLite's 32,766 host parameters, and few records held at once


def pairs_of(
    store: Store, descriptor: RunDescriptor, ids: Iterable[str], reviews: Reviews | None = None
) -> Iterator[PairRecord]:
    """The pairs of ``ids``, in that order (a split's rank order), read a batch at a time: random reads by
    primary key, so writing a split never holds more than one batch of records. With ``reviews``, a pair a
    person swapped comes out swapped (flagged ones are the caller's to leave out of ``ids``)."""
    found = _of(store, descriptor, ids, "pair", PairRecord.from_json)
    if reviews is None or not reviews.swapped:
        return found
    return (p.swapped() if p.prompt_id in reviews.swapped else p for p in found)


@dataclass(frozen=True)
class Reviews:
    """A run's human reviews: flagged pairs are left out of every export, swapped ones exchanged."""

    flagged: frozenset[str] = frozenset()
    swapped: frozenset[str] = frozenset()

    @classmethod
    def of(cls, store: Store, descriptor: RunDescriptor) -> Reviews:
        found = store.reviews(descriptor.key())
        return cls(
            frozenset(p for p, (a, _, _) in found.items() if a == "flag"),
            frozenset(p for p, (a, _, _) in found.items() if a == "swap"),
        )


def _of(
    store: Store, descriptor: RunDescriptor, ids: Iterable[str], status: str, decode: Callable[[dict[str, Any]], R]
) -> Iterator[R]:
    key, batch = descriptor.key(), []
    for pid in ids:
        batch.append(pid)
        if len(batch) == PAIRS_BATCH:
            yield from _batch(store, key, batch, status, decode)
            batch = []
    yield from _batch(store, key, batch, status, decode)


def _batch(store: Store, key: str, ids: list[str], status: str, decode: Callable[[dict[str, Any]], R]) -> Iterator[R]:
    found = {pid: data for pid, found_status, data in store.results_of(key, ids) if found_status == status}
    for pid in ids:
        data = found.get(pid)
        if data is None:
            raise LookupError(f"prompt {pid} has no {status} under this run's descriptor (the store changed?)")
        yield decode(data)


def pending(store: Store, descriptor: RunDescriptor) -> int:
    """Prompts of the run with no outcome yet (an interrupted run)."""
    total, finished = store.count_results(descriptor.key())
    return total - finished


def revisions_of(store: Store, descriptor: RunDescriptor, ids: Iterable[str]) -> Iterator[RevisionRecord]:
    """:func:`pairs_of` for a revise run: the revisions of ``ids``, in that order, a batch at a time."""
    return _of(store, descriptor, ids, "revision", RevisionRecord.from_json)
