"""The judge prompt layout and the reading of the judge's ``{"chosen": x, "rejected": y}`` decision.

Judge replies are untrusted model text: they are parsed, never evaluated, and anything doubtful raises a
:class:`BadModelOutput` subclass (which the engine retries), never any other exception.
"""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from caiforge.errors import BadModelOutput
from caiforge.judge import (
    Decision,
    InvalidDecision,
    NoDecision,
    SameDecision,
    judge_messages,
    parse_decision,
)

# --- judge_messages ------------------------------------------------------------------------------------------


def test_judge_messages_use_the_seeds_layout_byte_for_byte():
    messages = judge_messages("CONSTITUTION", "P", ["R1", "R2"])
    assert messages == [
        {"role": "system", "content": "CONSTITUTION"},
        {
            "role": "user",
            "content": "\n FULL TEXT: P\n #1: \n R1\n\n #2: \n R2\n\nNow, choose the pair of responses as instructed:",
        },
    ]


def test_judge_messages_number_every_candidate_from_one():
    content = judge_messages("c", "prompt", ["a", "b", "c", "d"])[1]["content"]
    assert content.count("\n #") == 4
    assert content.index("#1: \n a") < content.index("#2: \n b") < content.index("#3: \n c") < content.index("#4:")


def test_judge_messages_keep_the_constitution_verbatim_as_the_system_prompt():
    constitution = "  Be harmless.\n\n1. No violence {ever}.\n"
    assert judge_messages(constitution, "p", ["a", "b"])[0] == {"role": "system", "content": constitution}


# --- parse_decision: accepted shapes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ('{"chosen": 2, "rejected": 1}', (2, 1)),
        ('```json\n{"chosen": 3, "rejected": 4}\n```', (3, 4)),
        ('After weighing them all:\n{"chosen": 1, "rejected": 4}\nbecause #4 helps.', (1, 4)),
        ("{'chosen': 2, 'rejected': 1}", (2, 1)),
        ('{"chosen": "#2", "rejected": "#3"}', (2, 3)),
        ('{"chosen": "Response 3", "rejected": "Response 1"}', (3, 1)),
        ("{'chosen': 'Response 3', 'rejected': '#1'}", (3, 1)),
        ('{"rejected": 1, "chosen": 2}', (2, 1)),
        ("{'rejected': 4, 'chosen': 3}", (3, 4)),
        ('{"Chosen": 2, "Rejected": 1}', (2, 1)),
        ('{"chosen": "2", "rejected": "1"}', (2, 1)),
        ('Note {this aside}. {"chosen": 2, "rejected": 1}', (2, 1)),
        ('{"scores": [1, 2]} then {"chosen": 4, "rejected": 2}', (4, 2)),
    ],
    ids=[
        "plain-json",
        "json-fence",
        "prose-around",
        "python-dict",
        "hash-ids",
        "response-n-ids",
        "python-dict-string-ids",
        "reversed-keys",
        "python-dict-reversed",
        "capitalised-keys",
        "string-digits",
        "earlier-braces-skipped",
        "earlier-object-without-keys",
    ],
)
def test_parse_decision_reads_the_ids(reply, expected):
    decision = parse_decision(reply, 4)
    assert (decision.chosen, decision.rejected) == expected


def test_explanation_is_the_text_after_the_object():
    reply = 'I pick: {"chosen": 2, "rejected": 1}\n\nResponse 2 declines politely; #1 gives instructions.'
    assert parse_decision(reply, 2) == Decision(2, 1, "Response 2 declines politely; #1 gives instructions.")


def test_explanation_drops_the_closing_code_fence():
    reply = '```json\n{"chosen": 1, "rejected": 2}\n```\nThe first refuses.'
    assert parse_decision(reply, 2).explanation == "The first refuses."


def test_explanation_inside_the_fence_keeps_its_text_but_not_the_fence():
    reply = '```\n{"chosen": 1, "rejected": 2}\nThe first refuses.\n```'
    assert parse_decision(reply, 2).explanation == "The first refuses."


def test_explanation_is_empty_when_nothing_follows():
    assert parse_decision('{"chosen": 1, "rejected": 2}', 2).explanation == ""


# --- parse_decision: refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    ["", "I prefer the second response.", "chosen: 2, rejected: 1", '{"chosen": 2}', "{'best': 1, 'worst': 2}"],
    ids=["empty", "prose", "no-braces", "one-key", "other-keys"],
)
def test_a_reply_without_a_decision_object_is_no_decision(reply):
    with pytest.raises(NoDecision):
        parse_decision(reply, 4)


def test_none_as_reply_is_no_decision():
    with pytest.raises(NoDecision):
        parse_decision(None, 4)


@pytest.mark.parametrize(
    "reply",
    [
        '{"chosen": 5, "rejected": 1}',
        '{"chosen": 0, "rejected": 1}',
        '{"chosen": 1, "rejected": -2}',
        '{"chosen": "#9", "rejected": 1}',
    ],
)
def test_ids_outside_the_candidates_are_invalid(reply):
    with pytest.raises(InvalidDecision, match=r"1\.\.4"):
        parse_decision(reply, 4)


@pytest.mark.parametrize("reply", ['{"chosen": 2, "rejected": 2}', "{'chosen': '#3', 'rejected': 'Response 3'}"])
def test_the_same_id_twice_is_refused_not_replaced_by_a_random_pair(reply):
    with pytest.raises(SameDecision):
        parse_decision(reply, 4)


@pytest.mark.parametrize(
    "value",
    ["true", "false", "null", "2.5", '"2 or 3"', '"2.0"', '"none"', "[2]", '{"id": 2}'],
)
def test_ids_that_are_not_exactly_one_integer_are_no_decision(value):
    with pytest.raises(NoDecision):
        parse_decision(f'{{"chosen": {value}, "rejected": 1}}', 4)


def test_an_integral_float_id_is_no_decision():
    with pytest.raises(NoDecision):
        parse_decision('{"chosen": 2.0, "rejected": 1}', 4)


def test_the_reply_is_never_evaluated_as_code(tmp_path, monkeypatch):
    marker = tmp_path / "hacked"
    monkeypatch.chdir(tmp_path)
    reply = f"{{\"chosen\": __import__('os').system('touch {marker}'), \"rejected\": 1}}"
    with pytest.raises(NoDecision):
        parse_decision(reply, 4)
    python_dict = f"{{'chosen': __import__('pathlib').Path('{marker}').touch(), 'rejected': 1}}"
    with pytest.raises(NoDecision):
        parse_decision(python_dict, 4)
    assert not marker.exists()


@pytest.mark.parametrize("value", ["1" * 5000, '"#' + "2" * 5000 + '"'], ids=["json-int", "digit-string"])
def test_a_huge_number_is_a_bad_model_output(value):
    with pytest.raises(BadModelOutput):
        parse_decision(f'{{"chosen": {value}, "rejected": 1}}', 4)


def test_a_deeply_nested_reply_is_a_bad_model_output():
    with pytest.raises(BadModelOutput):
        parse_decision('{"chosen": ' + "[" * 100_000, 4)


# --- properties ----------------------------------------------------------------------------------------------

SURROUNDING = st.text(alphabet=st.characters(blacklist_characters="{", blacklist_categories=("Cs",)), max_size=60)


def render_id(style, number):
    return {"int": str(number), "str": f'"{number}"', "hash": f'"#{number}"', "resp": f'"Response {number}"'}[style]


@st.composite
def decisions(draw):
    n = draw(st.integers(2, 8))
    chosen, rejected = draw(st.lists(st.integers(1, n), min_size=2, max_size=2, unique=True))
    style_c, style_r = draw(st.sampled_from(["int", "str", "hash", "resp"])), draw(st.sampled_from(["int", "str"]))
    pairs = [f'"chosen": {render_id(style_c, chosen)}', f'"rejected": {render_id(style_r, rejected)}']
    if draw(st.booleans()):
        pairs.reverse()
    body = "{" + ", ".join(pairs) + "}"
    if draw(st.booleans()):  # the single-quoted Python dict some judges write
        body = body.replace('"', "'")
    if draw(st.booleans()):
        body = "```json\n" + body + "\n```"
    return n, chosen, rejected, body


@given(decision=decisions(), before=SURROUNDING, after=SURROUNDING)
def test_any_valid_decision_in_any_brace_free_prose_is_read_exactly(decision, before, after):
    n, chosen, rejected, body = decision
    parsed = parse_decision(before + body + after, n)
    assert (parsed.chosen, parsed.rejected) == (chosen, rejected)


FRAGMENTS = st.sampled_from(['{"chosen": ', "{'rejected': ", '"#', "Response ", "1", "2", "9", ", ", "}", "```", "'"])


@given(text=st.one_of(st.text(), st.lists(st.one_of(FRAGMENTS, st.text(max_size=3)), max_size=12).map("".join)))
def test_any_text_gives_a_valid_decision_or_a_bad_model_output(text):
    try:
        decision = parse_decision(text, 3)
    except BadModelOutput:
        return
    assert 1 <= decision.chosen <= 3
    assert 1 <= decision.rejected <= 3
    assert decision.chosen != decision.rejected


def test_a_json_dumped_decision_round_trips():
    assert parse_decision(json.dumps({"chosen": 7, "rejected": 8}), 8) == Decision(7, 8, "")
