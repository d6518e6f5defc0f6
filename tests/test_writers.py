"""Writers are pure functions of records and splits: same records, same bytes; unusable pairs become failures
in their input position."""

from __future__ import annotations

import json

from caiforge.records import FailureRecord, PairRecord, prompt_id
from caiforge.template import PromptTemplate
from caiforge.writers import WRITERS, Blend, Dataset


def pair(text: str, chosen: str = "safe", rejected: str = "unsafe") -> PairRecord:
    return PairRecord(
        prompt_id=prompt_id(text),
        prompt=text,
        responses={0.01: chosen, 0.51: rejected},
        chosen_t=0.01,
        rejected_t=0.51,
        explanation="",
    )


RECORDS = [
    FailureRecord(prompt_id=None, prompt=None, stage="input", reason="bad record", source="f", line=2),
    pair("one"),
    FailureRecord(prompt_id=prompt_id("two"), prompt="two", stage="candidates", reason="transient error"),
    pair("three", chosen="   "),  # unusable: an empty chosen response
    *(pair(f"p{i}") for i in range(7)),
]


def build(**options) -> Dataset:
    return Dataset.build(
        list(RECORDS),
        PromptTemplate(),
        **{"ratios": {"train": 0.75, "test": 0.25}, "shuffle": True, "seed": 3, **options},
    )


def test_the_same_records_give_the_same_bytes_and_every_usable_pair_lands_in_one_split():
    first, second = build(), build()
    splits = first.assign_splits()
    assert splits == second.assign_splits()
    files = WRITERS["seed"](first, splits)
    assert files == WRITERS["seed"](second, second.assign_splits())
    ids = [pid for part in splits.values() for pid in part]
    assert sorted(ids) == sorted(first.usable) and len(ids) == len(set(ids)) == 8
    assert {k: len(v) for k, v in splits.items()} == {"train": 6, "test": 2}
    train = [json.loads(line) for line in files["train_prompts_with_chat_prompt.jsonl"].splitlines()]
    assert len(train) == 6
    assert len(files["train_comparisons_with_chat_prompt.jsonl"].splitlines()) == 12


def test_failures_keep_input_order_with_the_dataset_stage_in_place():
    failures = [json.loads(line) for line in WRITERS["failures"](build(), {})["failures.jsonl"].splitlines()]
    assert [(f["prompt"], f["stage"], f["reason"]) for f in failures] == [
        (None, "input", "bad record"),
        ("two", "candidates", "transient error"),
        ("three", "dataset", "empty chosen response"),
    ]


def test_candidates_are_written_for_every_prompt_whose_candidates_all_exist():
    with_candidates = [
        *RECORDS,
        FailureRecord(prompt_id="x", prompt="x", stage="judge", reason="r", responses={0.01: "a"}),
    ]
    data = Dataset.build(with_candidates, PromptTemplate(), ratios={"train": 1.0}, shuffle=False, seed=0)
    candidates = json.loads(WRITERS["seed"](data, data.assign_splits())["cai_candidate_dataset.json"])
    assert [c["prompt"] for c in candidates] == ["one", "three", *(f"p{i}" for i in range(7)), "x"]


def test_a_blend_is_a_pure_function_of_its_texts():
    blend = Blend(
        name="hh",
        texts={
            s: {"prompts": ['{"text": "e"}\n'], "comparisons": ['{"text": "c"}\n{"text": "r"}\n']}
            for s in ("train", "test")
        },
    )
    a, b = build(blend=blend), build(blend=blend)
    files_a, files_b = WRITERS["seed"](a, a.assign_splits()), WRITERS["seed"](b, b.assign_splits())
    assert files_a == files_b
    lines = files_a["blend_hh_with_train_comparisons_with_chat_prompt.jsonl"].splitlines()
    assert len(lines) == 2 * 6 + 2
    assert lines.index('{"text": "c"}') + 1 == lines.index('{"text": "r"}')  # a comparison pair stays together
