"""The dataset stage: seed-shaped preference records, deterministic splits, NeMo's JSONL lines and blending."""

import json
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from caiforge.config import DEFAULT_TEMPERATURES, build_config
from caiforge.dataset import blend, format_pair, nemo_split_files, preference_record, split, split_sizes
from caiforge.records import PairRecord
from caiforge.template import PromptTemplate


@st.composite
def ratio_dicts(draw, max_splits=6):
    """Split ratios that sum to 1 (up to float rounding), as a user would type them."""
    weights = draw(st.lists(st.integers(1, 1000), min_size=1, max_size=max_splits))
    total = sum(weights)
    return {f"split{i}": w / total for i, w in enumerate(weights)}


# --- split_sizes ---------------------------------------------------------------------------------------------


def test_split_sizes_of_the_seed_default_ratios():
    assert split_sizes(10, {"train": 0.8, "test": 0.2}) == {"train": 8, "test": 2}
    assert split_sizes(0, {"train": 0.8, "test": 0.2}) == {"train": 0, "test": 0}


def test_split_sizes_give_leftovers_to_the_largest_remainders():
    assert split_sizes(10, {"a": 0.45, "b": 0.35, "c": 0.2}) == {"a": 5, "b": 3, "c": 2}  # 4.5, 3.5, 2.0
    assert split_sizes(7, {"a": 0.5, "b": 0.3, "c": 0.2}) == {"a": 4, "b": 2, "c": 1}  # 3.5, 2.1, 1.4


def test_every_split_gets_an_item_when_there_are_enough():
    assert split_sizes(3, {"train": 0.98, "val": 0.01, "test": 0.01}) == {"train": 1, "val": 1, "test": 1}
    assert split_sizes(10, {"train": 0.98, "val": 0.01, "test": 0.01}) == {"train": 8, "val": 1, "test": 1}


def test_with_fewer_items_than_splits_some_splits_stay_empty():
    sizes = split_sizes(1, {"train": 0.5, "val": 0.3, "test": 0.2})
    assert sum(sizes.values()) == 1
    assert sizes["train"] == 1


@given(n=st.integers(0, 5000), splits=ratio_dicts())
def test_split_sizes_sum_to_n_and_are_never_negative(n, splits):
    sizes = split_sizes(n, splits)
    assert list(sizes) == list(splits)
    assert sum(sizes.values()) == n
    assert min(sizes.values()) >= 0


@given(n=st.integers(0, 5000), splits=ratio_dicts())
def test_every_split_is_non_empty_when_n_is_at_least_the_number_of_splits(n, splits):
    sizes = split_sizes(n, splits)
    if n >= len(splits):
        assert min(sizes.values()) >= 1


@given(n=st.integers(0, 5000), splits=ratio_dicts())
def test_sizes_stay_within_one_of_the_exact_share_unless_fixed_up(n, splits):
    sizes = split_sizes(n, splits)
    exact = {name: n * ratio for name, ratio in splits.items()}
    tiny = sum(1 for value in exact.values() if value < 1)  # splits the ">= 1 item" rule may have lifted
    for name in splits:
        if tiny == 0 or n < len(splits):  # no fix-up happened: pure largest-remainder rounding
            assert abs(sizes[name] - exact[name]) < 1 + 1e-9
        else:  # a lifted split got 1 item; the donor lost at most one item per lifted split
            assert abs(sizes[name] - exact[name]) < 1 + tiny + 1e-9


def test_split_sizes_sum_to_n_for_ratios_the_config_accepts():
    splits = build_config({"splits": {"train": 0.8, "test": 0.1999991}}).splits  # accepted: off by 9e-7
    assert sum(split_sizes(10_000_000, splits).values()) == 10_000_000


# --- split ---------------------------------------------------------------------------------------------------


def test_split_without_shuffle_keeps_the_input_order():
    items = [f"p{i}" for i in range(10)]
    assert split(items, {"train": 0.8, "test": 0.2}, shuffle=False, seed=1) == {
        "train": items[:8],
        "test": items[8:],
    }


def test_split_is_deterministic_for_the_same_seed():
    items = list(range(50))
    splits = {"train": 0.7, "val": 0.1, "test": 0.2}
    assert split(items, splits, shuffle=True, seed=1234) == split(items, splits, shuffle=True, seed=1234)


def test_split_order_depends_on_the_seed():
    items = list(range(50))
    first = split(items, {"train": 0.8, "test": 0.2}, shuffle=True, seed=1)
    second = split(items, {"train": 0.8, "test": 0.2}, shuffle=True, seed=2)
    assert first != second
    assert first["train"] + first["test"] != items  # it really shuffled


@given(n=st.integers(0, 300), splits=ratio_dicts(), shuffle=st.booleans(), seed=st.integers(0, 2**32))
def test_split_loses_and_duplicates_nothing(n, splits, shuffle, seed):
    items = [f"item-{i}" for i in range(n)]
    out = split(items, splits, shuffle=shuffle, seed=seed)
    joined = [item for part in out.values() for item in part]
    assert sorted(joined) == sorted(items)
    assert {name: len(part) for name, part in out.items()} == split_sizes(n, splits)
    if not shuffle:
        assert joined == items


def Pair(prompt, responses, chosen_t, rejected_t, explanation):
    return PairRecord(
        prompt_id="p",
        prompt=prompt,
        responses=responses,
        chosen_t=chosen_t,
        rejected_t=rejected_t,
        explanation=explanation,
    )


# --- preference_record ---------------------------------------------------------------------------------------------

RESPONSES = {0.01: "r0", 0.51: "r1", 1.01: "r2", 1.51: "r3"}


def test_pair_record_has_the_seeds_shape():
    pair = Pair("How do I pick a lock?", RESPONSES, chosen_t=0.51, rejected_t=1.51, explanation="#2 refuses.")
    record = preference_record(pair)
    assert record == {
        "prompt": "How do I pick a lock?",
        "chosen": "r1",
        "rejected": "r3",
        "raw": {
            "chosen_response_key": "response_t=0.51",
            "rejected_response_key": "response_t=1.51",
            "explanation": "#2 refuses.",
            "all_responses": {
                "response_t=0.01": "r0",
                "response_t=0.51": "r1",
                "response_t=1.01": "r2",
                "response_t=1.51": "r3",
            },
        },
    }
    assert list(record) == ["prompt", "chosen", "rejected", "raw"]
    assert json.loads(json.dumps(record)) == record


def test_default_temperatures_name_the_seeds_response_columns():
    # the seed's np.arange(0.01, 2.01, 0.5).tolist()
    responses = {t: f"text at {t}" for t in DEFAULT_TEMPERATURES}
    pair = Pair("p", responses, DEFAULT_TEMPERATURES[0], DEFAULT_TEMPERATURES[1], "")
    keys = preference_record(pair)["raw"]["all_responses"]
    assert list(keys) == ["response_t=0.01", "response_t=0.51", "response_t=1.01", "response_t=1.51"]


# --- format_pair and nemo_split_files ------------------------------------------------------------------------

TEMPLATE = PromptTemplate()


def test_format_pair_strips_and_formats_like_the_seeds_process_samples():
    pair = Pair("\n  Why?  \n", {0.01: "  Because.\n", 1.01: "No.\n\n"}, 0.01, 1.01, "")
    assert format_pair(TEMPLATE, pair) == (
        "<extra_id_0>System\n\n<extra_id_1>User\nWhy?\n<extra_id_1>Assistant\n",
        "<extra_id_0>System\n\n<extra_id_1>User\nWhy?\n<extra_id_1>Assistant\nBecause.<extra_id_1>",
        "<extra_id_0>System\n\n<extra_id_1>User\nWhy?\n<extra_id_1>Assistant\nNo.<extra_id_1>",
    )


@pytest.mark.parametrize(
    ("prompt", "chosen", "rejected", "reason"),
    [
        ("q", "", "fine", "empty chosen response"),
        ("q", " \n ", "fine", "empty chosen response"),
        ("q", "fine", "", "empty rejected response"),
        ("q", "fine", "\n\n", "empty rejected response"),
        ("  ", "fine", "fine", "empty prompt"),
    ],
)
def test_format_pair_says_why_an_unusable_pair_is_dropped(prompt, chosen, rejected, reason):
    assert format_pair(TEMPLATE, Pair(prompt, {0.01: chosen, 0.51: rejected}, 0.01, 0.51, "")) == reason


def test_nemo_split_files_write_one_prompt_line_and_two_comparison_lines_per_pair():
    formatted = [("P1", "P1 chosen", "P1 rejected"), ("P2 café\nline", "P2 chosen", "P2 rejected")]
    prompts, comparisons = nemo_split_files(formatted)
    assert prompts == '{"text": "P1"}\n{"text": "P2 caf\\u00e9\\nline"}\n'
    assert comparisons.endswith("\n")
    assert [json.loads(line) for line in comparisons.splitlines()] == [
        {"text": "P1 chosen"},
        {"text": "P1 rejected"},
        {"text": "P2 chosen"},
        {"text": "P2 rejected"},
    ]


def test_nemo_split_files_of_no_pairs_are_empty():
    assert nemo_split_files([]) == ("", "")


@given(st.lists(st.tuples(st.text(), st.text(), st.text()), max_size=20))
def test_nemo_split_files_round_trip_any_text(formatted):
    prompts, comparisons = nemo_split_files(formatted)
    assert [json.loads(line)["text"] for line in prompts.split("\n")[:-1]] == [p for p, _, _ in formatted]
    expected = [text for _, chosen, rejected in formatted for text in (chosen, rejected)]
    assert [json.loads(line)["text"] for line in comparisons.split("\n")[:-1]] == expected


# --- blend ---------------------------------------------------------------------------------------------------


def comparisons_file(tag, n_pairs):
    """A comparisons file whose lines say which file and pair they come from, and which side they are."""
    return "".join(
        json.dumps({"text": f"{tag}:{i}:{side}"}) + "\n" for i in range(n_pairs) for side in ("chosen", "rejected")
    )


def prompts_file(tag, n):
    return "".join(json.dumps({"text": f"{tag}:{i}"}) + "\n" for i in range(n))


def texts(blended):
    return [json.loads(line)["text"] for line in blended.splitlines()]


def test_blend_keeps_each_chosen_line_right_before_its_rejected_line():
    external = [comparisons_file("hh", 6), comparisons_file("other", 4)]
    own = comparisons_file("own", 5)
    lines = texts(blend(external, own, "comparisons", random.Random(42)))
    assert len(lines) == 2 * (6 + 4 + 5)
    for chosen, rejected in zip(lines[0::2], lines[1::2], strict=True):
        assert chosen.endswith(":chosen")
        assert rejected == chosen.removesuffix(":chosen") + ":rejected"
    assert sorted(lines) == sorted(texts("".join([*external, own])))


def test_blend_of_comparisons_really_mixes_the_files():
    lines = texts(blend([comparisons_file("hh", 10)], comparisons_file("own", 10), "comparisons", random.Random(1)))
    assert lines != texts(comparisons_file("hh", 10) + comparisons_file("own", 10))


def test_blend_of_prompts_keeps_every_line_exactly_once():
    external = [prompts_file("hh", 7), prompts_file("other", 3)]
    own = prompts_file("own", 4)
    blended = blend(external, own, "prompts", random.Random(0))
    assert blended.endswith("\n")
    assert sorted(texts(blended)) == sorted(texts("".join([*external, own])))
    assert texts(blended) != texts("".join([*external, own]))


@pytest.mark.parametrize("kind", ["prompts", "comparisons"])
def test_blend_is_deterministic_for_a_seeded_rng(kind):
    external, own = [comparisons_file("hh", 8)], comparisons_file("own", 8)
    first = blend(external, own, kind, random.Random(1234))
    assert first == blend(external, own, kind, random.Random(1234))
    assert first != blend(external, own, kind, random.Random(4321))


def test_blend_adds_a_missing_final_newline_and_drops_blank_lines():
    external = ['{"text": "a:0:chosen"}\n\n{"text": "a:0:rejected"}']  # no final newline, a blank line
    blended = blend(external, comparisons_file("own", 1), "comparisons", random.Random(3))
    assert blended.count("\n") == 4
    assert all(line.strip() for line in blended.split("\n")[:-1])
    assert sorted(texts(blended)) == ["a:0:chosen", "a:0:rejected", "own:0:chosen", "own:0:rejected"]


@given(
    sizes=st.lists(st.integers(0, 6), min_size=1, max_size=4),
    own_pairs=st.integers(0, 6),
    seed=st.integers(0, 2**32),
)
def test_blend_pairing_holds_for_any_file_sizes_and_seed(sizes, own_pairs, seed):
    external = [comparisons_file(f"ext{i}", n) for i, n in enumerate(sizes)]
    lines = texts(blend(external, comparisons_file("own", own_pairs), "comparisons", random.Random(seed)))
    assert len(lines) == 2 * (sum(sizes) + own_pairs)
    assert len(set(lines)) == len(lines)
    for chosen, rejected in zip(lines[0::2], lines[1::2], strict=True):
        assert (chosen.rsplit(":", 1)[1], rejected.rsplit(":", 1)[1]) == ("chosen", "rejected")
        assert chosen.rsplit(":", 1)[0] == rejected.rsplit(":", 1)[0]


def test_blend_keeps_lines_with_unescaped_unicode_line_separators_whole():
    chosen = json.dumps({"text": "ext:0:chosen \u2028 still the same line"}, ensure_ascii=False)
    external = [chosen + "\n" + json.dumps({"text": "ext:0:rejected"}) + "\n"]
    blended = blend(external, comparisons_file("own", 2), "comparisons", random.Random(5))
    lines = blended.split("\n")[:-1]
    assert len(lines) == 6
    assert chosen in lines
    assert lines[lines.index(chosen) + 1] == '{"text": "ext:0:rejected"}'
