"""The dataset stage as pure functions: preference records, splits, NeMo's chat-formatted lines, blending.

Everything here is a deterministic function of the stored pairs and the seed, which is what lets an
interrupted-then-resumed run write the same files as an uninterrupted one, and lets later exporters reuse it.
"""

from __future__ import annotations

import json
import random
from array import array
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar, overload

from .candidates import candidate_key
from .records import PairRecord
from .template import PromptTemplate

T = TypeVar("T")


def preference_record(pair: PairRecord) -> dict[str, Any]:
    """One entry of the seed's ``cai_preference_dataset.json``, plus what the judge saw (in ``raw``)."""
    raw: dict[str, Any] = {
        "chosen_response_key": candidate_key(pair.chosen_t),
        "rejected_response_key": candidate_key(pair.rejected_t),
        "explanation": pair.explanation,
        "all_responses": {candidate_key(t): text for t, text in pair.responses.items()},
    }
    if pair.order_t:
        raw["judge_order"] = [candidate_key(t) for t in pair.order_t]
        raw["chosen_position"], raw["rejected_position"] = pair.chosen_position, pair.rejected_position
    if pair.consistent is not None:
        raw["consistent"] = pair.consistent
    if pair.principle is not None:
        raw["principle"] = pair.principle
    if pair.merged:
        raw["merged"] = {candidate_key(t): [candidate_key(m) for m in ms] for t, ms in pair.merged.items()}
    record: dict[str, Any] = {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected, "raw": raw}
    if pair.chosen_prob is not None:
        record["chosen_prob"] = pair.chosen_prob
    return record


def split_sizes(n: int, splits: dict[str, float]) -> dict[str, int]:
    """Largest-remainder sizes that sum to ``n``; every split gets one item when there are enough."""
    total = sum(splits.values())  # validated to be 1 within 1e-6; normalise so rounding never loses items
    exact = {name: n * ratio / total for name, ratio in splits.items()}
    sizes = {name: min(n, int(value)) for name, value in exact.items()}
    by_remainder = sorted(splits, key=lambda name: (-(exact[name] - sizes[name]), list(splits).index(name)))
    i = 0
    while sum(sizes.values()) < n:
        sizes[by_remainder[i % len(by_remainder)]] += 1
        i += 1
    while sum(sizes.values()) > n:
        sizes[max(sizes, key=lambda k: sizes[k])] -= 1
    if n >= len(splits):
        for name in splits:
            if sizes[name] == 0:
                donor = max(sizes, key=lambda k: sizes[k])
                sizes[donor] -= 1
                sizes[name] += 1
    return sizes


def shuffled(n: int, rng: random.Random) -> array[int]:
    """``range(n)`` shuffled as ``rng.shuffle`` shuffles any list of ``n`` items (the permutation depends on the
    length alone), in 8 bytes an index: the order a million lines will be written in, without the lines."""
    order = array("q", range(n))
    rng.shuffle(order)
    return order


def split_order(n: int, splits: dict[str, float], shuffle: bool, seed: int) -> Iterator[tuple[str, Sequence[int]]]:
    """Each split's positions among ``n`` items, in the split's order: the one assignment behind :func:`split`."""
    order: Sequence[int] = shuffled(n, random.Random(seed)) if shuffle else range(n)
    start = 0
    for name, size in split_sizes(n, splits).items():
        yield name, order[start : start + size]
        start += size


def split(items: Sequence[T], splits: dict[str, float], shuffle: bool, seed: int) -> dict[str, list[T]]:
    """Deterministic split: the same items, ratios and seed always give the same splits (in this order)."""
    return {name: [items[i] for i in part] for name, part in split_order(len(items), splits, shuffle, seed)}


class Ids(Sequence[str]):
    """Prompt ids in order, 8 bytes each: an id is 16 hex digits (``records.prompt_id``), kept as the number
    it spells, so a million ids take 8 MB rather than 70. Any other id turns the whole sequence into a plain
    list of strings (the same ids, the same order)."""

    def __init__(self, ids: Iterable[str] = ()) -> None:
        self._packed: array[int] | None = array("Q")
        self._plain: list[str] = []
        for pid in ids:
            self.append(pid)

    def append(self, pid: str) -> None:
        if self._packed is not None:
            try:
                value = int(pid, 16)
            except ValueError:
                value = -1
            if 0 <= value < 1 << 64 and f"{value:016x}" == pid:
                self._packed.append(value)
                return
            self._plain, self._packed = list(self), None
        self._plain.append(pid)

    def take(self, positions: Iterable[int]) -> Ids:
        """The ids at these positions, in this order (a split)."""
        out = Ids()
        if self._packed is None:
            out._plain, out._packed = [self._plain[i] for i in positions], None
        else:
            out._packed = array("Q", (self._packed[i] for i in positions))
        return out

    def __len__(self) -> int:
        return len(self._plain) if self._packed is None else len(self._packed)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> Ids: ...

    def __getitem__(self, index: int | slice) -> str | Ids:
        if isinstance(index, slice):
            return self.take(range(len(self))[index])
        return self._plain[index] if self._packed is None else f"{self._packed[index]:016x}"

    def __iter__(self) -> Iterator[str]:
        if self._packed is None:
            return iter(self._plain)
        return (f"{value:016x}" for value in self._packed)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and not isinstance(other, str) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Ids({list(self)!r})"


def format_pair(template: PromptTemplate, pair: PairRecord) -> tuple[str, str, str] | str:
    """(prompt, chosen line, rejected line) as the seed's ``process_samples``, or why the pair cannot be used."""
    body = pair.prompt.strip().strip("\n")
    chosen = pair.chosen.strip().strip("\n")
    rejected = pair.rejected.strip().strip("\n")
    if not body:
        return "empty prompt"
    if not chosen or not rejected:
        return "empty " + ("chosen" if not chosen else "rejected") + " response"
    return (
        template.format_prompt(body),
        template.format_with_response(body, chosen),
        template.format_with_response(body, rejected),
    )


def jsonl(records: list[dict[str, Any]]) -> str:
    """JSON Lines with the seed's ``json.dumps`` defaults (ASCII-escaped), newline-terminated."""
    return "".join(json.dumps(record) + "\n" for record in records)


def nemo_split_files(formatted: list[tuple[str, str, str]]) -> tuple[str, str]:
    """Contents of ``*_prompts_with_chat_prompt.jsonl`` and ``*_comparisons_with_chat_prompt.jsonl``."""
    prompts = [{"text": prompt} for prompt, _, _ in formatted]
    comparisons: list[dict[str, str]] = []
    for _, chosen, rejected in formatted:
        comparisons += [{"text": chosen}, {"text": rejected}]
    return jsonl(prompts), jsonl(comparisons)


def _lines(text: str) -> list[str]:
    # split on "\n" only: U+2028 and friends may stand unescaped inside a JSON string (str.splitlines breaks them)
    return [line.rstrip("\r") + "\n" for line in text.split("\n") if line.strip()]


def blend_units(texts: list[str], kind: str) -> list[list[str]]:
    """The lines of each text as the blend moves them: one line a prompt, a (chosen, rejected) pair a
    comparison."""
    if kind == "prompts":
        return [[line] for text in texts for line in _lines(text)]
    units = []
    for text in texts:
        lines = _lines(text)
        units += [lines[i : i + 2] for i in range(0, len(lines), 2)]
    return units


def blend(external: list[str], own: str, kind: str, rng: random.Random) -> str:
    """The seed's blend: all lines shuffled; for comparisons, (chosen, rejected) line pairs stay together."""
    units = blend_units([*external, own], kind)
    rng.shuffle(units)
    return "".join(line for unit in units for line in unit)
