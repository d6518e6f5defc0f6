"""The paper's labelling: principles, soft labels from log-probabilities, hard labels, the CoT clamp."""

from __future__ import annotations

import math

import pytest

from caiforge.errors import InputError
from caiforge.principles import hard_label, label, load_principles, pairwise_messages, pick, pick_pair, soft_label


def top(**logprobs: float) -> list[dict[str, float]]:
    return [{"token": token, "logprob": lp} for token, lp in logprobs.items()]


def test_soft_label_is_the_normalised_probability_of_a():
    p = soft_label([top(A=math.log(0.6), B=math.log(0.2), C=math.log(0.1))])
    assert p == pytest.approx(0.75)


def test_soft_label_reads_the_first_position_where_the_letters_are_in_play():
    positions = [
        top(**{"(": -0.1, "The": -3.0}),
        [{"token": " B", "logprob": math.log(0.3)}, {"token": "A", "logprob": math.log(0.1)}],
    ]
    assert soft_label(positions) == pytest.approx(0.25)


def test_soft_label_with_one_letter_only_is_certain_and_without_letters_is_none():
    assert soft_label([top(A=-0.5, X=-1.0)]) == 1.0
    assert soft_label([top(X=-0.1)]) is None
    assert soft_label(None) is None


@pytest.mark.parametrize(
    ("text", "cot", "expected"),
    [
        ("A", False, "A"),
        ("(B)", False, "B"),
        (" B) because", False, "B"),
        ("Neither", False, None),
        ("A seems kind but... So the answer is: (B)", True, "B"),
        ("no final answer", True, None),
    ],
)
def test_hard_label(text, cot, expected):
    assert hard_label(text, cot) == expected


def test_label_prefers_log_probabilities_and_clamps_chain_of_thought():
    assert label("B", [top(A=math.log(0.9), B=math.log(0.1))], cot=False) == pytest.approx(0.9)
    assert label("B", None, cot=False) == 0.0
    assert label("... So the answer is: (A)", None, cot=True) == 0.6
    assert label("... So the answer is: (B)", None, cot=True) == 0.4


def test_principles_from_yaml_list_mapping_or_paragraphs():
    assert load_principles("- one\n- two\n", "f") == ["one", "two"]
    assert load_principles("principles:\n  - one\n", "f") == ["one"]
    assert load_principles("First principle,\nwrapped.\n\nSecond one.\n", "f") == [
        "First principle, wrapped.",
        "Second one.",
    ]
    with pytest.raises(InputError, match="f: the principles list"):
        load_principles("- ''\n", "f")


def test_sampling_is_seeded_and_covers_the_choices():
    items = ["a", "b", "c"]
    assert pick(items, 1, "p") == pick(items, 1, "p")
    assert {pick(items, s, "p") for s in range(50)} == set(items)
    pairs = {pick_pair(4, s, "p") for s in range(100)}
    assert all(i != j for i, j in pairs) and len(pairs) == 12


def test_pairwise_prompt_has_the_principle_and_both_options():
    (message,) = pairwise_messages("Which is kinder?", "hi", "one", "two", cot=False)
    assert "Which is kinder?" in message["content"] and "(A) one" in message["content"]
    assert message["content"].endswith("The answer is: (")
    (cot,) = pairwise_messages("Which is kinder?", "hi", "one", "two", cot=True)
    assert cot["content"].endswith("Let's think step by step:")


def test_broken_principles_yaml_is_an_error_with_its_line_not_one_garbage_principle():
    with pytest.raises(InputError, match=r"^p.yaml:\d+: invalid YAML"):
        load_principles('principles:\n  - fine\n  - "unclosed\n  - next\n', "p.yaml")
