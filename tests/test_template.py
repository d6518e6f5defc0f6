"""PromptTemplate renders and cuts text exactly as NeMo-Aligner's ``UserAssistantPromptTemplate`` does.

The seed's behaviour is re-implemented below in a few lines (``seed_format``, ``seed_comparison_line``,
``seed_extract``) and compared with caiforge on generated strings, so a NeMo user switching tools gets
byte-identical prompts, comparison lines and extracted responses.
"""

import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st

from caiforge.errors import InputError
from caiforge.template import PromptTemplate, unescape

SEED_DEFAULTS = {
    "user_format": "<extra_id_1>User\n{MESSAGE}\n<extra_id_1>Assistant\n",
    "assistant_format": "{MESSAGE}\n",
    "system_format": "<extra_id_0>System\n{MESSAGE}\n",
    "system_default_message": "",
    "bos_token": None,
    "eos_token": "<extra_id_1>",
    "response_extract_pattern": "<extra_id_1>Assistant\n",
}


# --- the seed, re-implemented from examples/nlp/cai/cai_utils.py and generate_rl_cai_dataset.py -------------


def seed_format(cfg, user, assistant=None):
    """UserAssistantPromptTemplate.format_messages for [user] or [user, assistant]."""
    text = cfg["bos_token"] if cfg["bos_token"] is not None else ""
    if cfg["system_format"] is not None and cfg["system_default_message"] is not None:
        text += cfg["system_format"].format(MESSAGE=cfg["system_default_message"])
    text += (cfg["user_format"] or "{MESSAGE}").format(MESSAGE=user)
    if assistant is not None:
        text += (cfg["assistant_format"] or "{MESSAGE}").format(MESSAGE=assistant)
    return text


def seed_comparison_line(cfg, user, assistant):
    """process_samples: prompt + response, stripped, with eos appended unless already there."""
    text = seed_format(cfg, user, assistant).strip()
    return text if text.endswith(cfg["eos_token"]) else text + cfg["eos_token"]


def seed_extract(cfg, message):
    """PromptTemplate.extract_response: after the LAST pattern, stripped, cut at the LAST eos."""
    message = message.strip()
    at = message.rfind(cfg["response_extract_pattern"])
    if at < 0:
        return None
    response = message[at + len(cfg["response_extract_pattern"]) :].strip()
    if cfg["eos_token"] is not None and response.rfind(cfg["eos_token"]) >= 0:
        response = response[: response.rfind(cfg["eos_token"])]
    return response


# --- strategies ----------------------------------------------------------------------------------------------

NO_BRACES = st.text(alphabet=st.characters(blacklist_characters="{}", blacklist_categories=("Cs",)), max_size=30)
TOKENS = st.sampled_from(["<extra_id_1>", "<extra_id_0>", "Assistant\n", "[/INST]", "</s>", "\n", " ", "x"])
# Text that often contains the default pattern, eos and whitespace in awkward places.
MODEL_TEXT = st.lists(st.one_of(TOKENS, NO_BRACES), max_size=12).map("".join)


def role_format():
    return st.builds(lambda before, after: before + "{MESSAGE}" + after, NO_BRACES, NO_BRACES)


@st.composite
def seed_configs(draw):
    """Template settings the seed accepts (it asserts system_default_message is None without a system_format)."""
    system_format = draw(st.one_of(st.none(), role_format()))
    return {
        "user_format": draw(st.one_of(st.just(""), role_format())),
        "assistant_format": draw(st.one_of(st.just(""), role_format())),
        "system_format": system_format,
        "system_default_message": None if system_format is None else draw(st.one_of(st.none(), NO_BRACES)),
        "bos_token": draw(st.one_of(st.none(), NO_BRACES)),
        "eos_token": draw(st.one_of(st.just("<extra_id_1>"), st.just("</s>"), NO_BRACES.filter(bool))),
        "response_extract_pattern": draw(
            st.one_of(st.just("<extra_id_1>Assistant\n"), st.just("[/INST]"), NO_BRACES.filter(bool))
        ),
    }


# --- parity with the seed ------------------------------------------------------------------------------------


def test_defaults_are_the_seeds_extra_id_chat_format():
    assert PromptTemplate().model_dump() == SEED_DEFAULTS


def test_default_prompt_has_an_empty_system_turn_then_the_user_turn():
    assert PromptTemplate().format_prompt("Hi?") == (
        "<extra_id_0>System\n\n<extra_id_1>User\nHi?\n<extra_id_1>Assistant\n"
    )


def test_default_comparison_line_ends_with_eos_instead_of_the_assistant_newline():
    assert PromptTemplate().format_with_response("Hi?", "Hello.") == (
        "<extra_id_0>System\n\n<extra_id_1>User\nHi?\n<extra_id_1>Assistant\nHello.<extra_id_1>"
    )


@given(user=NO_BRACES, assistant=NO_BRACES)
def test_default_template_matches_the_seed(user, assistant):
    template = PromptTemplate()
    assert template.format_prompt(user) == seed_format(SEED_DEFAULTS, user)
    assert template.format_turns(user, assistant) == seed_format(SEED_DEFAULTS, user, assistant)
    assert template.format_with_response(user, assistant) == seed_comparison_line(SEED_DEFAULTS, user, assistant)


@given(cfg=seed_configs(), user=NO_BRACES, assistant=NO_BRACES)
def test_any_seed_valid_template_renders_like_the_seed(cfg, user, assistant):
    template = PromptTemplate(**cfg)
    assert template.format_prompt(user) == seed_format(cfg, user)
    assert template.format_with_response(user, assistant) == seed_comparison_line(cfg, user, assistant)


@given(message=MODEL_TEXT)
def test_default_extract_response_matches_the_seed(message):
    assert PromptTemplate().extract_response(message) == seed_extract(SEED_DEFAULTS, message)


@given(cfg=seed_configs(), message=MODEL_TEXT)
def test_any_template_extracts_like_the_seed(cfg, message):
    template = PromptTemplate(**cfg)
    message += cfg["response_extract_pattern"] + message  # make the pattern-present case common
    assert template.extract_response(message) == seed_extract(cfg, message)


# --- extract_response, by example ----------------------------------------------------------------------------


def test_extract_takes_the_text_after_the_last_pattern_and_cuts_at_the_last_eos():
    generated = (
        "<extra_id_1>User\nq\n<extra_id_1>Assistant\nfirst<extra_id_1>"
        "<extra_id_1>Assistant\n  a <extra_id_1> b <extra_id_1> tail  "
    )
    assert PromptTemplate().extract_response(generated) == "a <extra_id_1> b "


def test_extract_returns_none_when_the_pattern_is_missing():
    assert PromptTemplate().extract_response("no assistant marker here") is None


def test_extract_of_a_full_prompt_plus_completion_gives_the_completion():
    template = PromptTemplate()
    assert template.extract_response(template.format_prompt("q") + "The answer.<extra_id_1>") == "The answer."


# --- braces: caiforge substitutes with str.replace, so braces are ordinary text ------------------------------


def test_braces_in_messages_survive_unchanged():
    template = PromptTemplate()
    user = 'print({"a": 1}) and {MESSAGE} and {0} and {'
    assistant = "def f(): return {x for x in y}"
    assert template.format_prompt(user) == seed_format(SEED_DEFAULTS, user)
    assert user in template.format_prompt(user)
    assert template.format_with_response(user, assistant).endswith(assistant + "<extra_id_1>")


def test_a_template_with_literal_json_braces_renders_them_where_the_seed_would_raise():
    template = PromptTemplate(user_format='{"role": "user", "content": "{MESSAGE}"}', system_format=None)
    assert template.format_prompt("hi") == '{"role": "user", "content": "hi"}'
    with pytest.raises(KeyError):
        seed_format({**SEED_DEFAULTS, "user_format": template.user_format, "system_format": None}, "hi")


def test_a_seed_template_with_escaped_braces_renders_like_the_seed():
    cfg = {**SEED_DEFAULTS, "user_format": '{{"q": "{MESSAGE}"}}', "system_format": None}
    cfg["system_default_message"] = None
    assert PromptTemplate(**cfg).format_prompt("hi") == seed_format(cfg, "hi") == '{"q": "hi"}'


# --- validation and unescaping -------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["user_format", "assistant_format", "system_format"])
def test_a_role_format_without_the_placeholder_is_rejected(field):
    with pytest.raises(pydantic.ValidationError, match=r"\{MESSAGE\}"):
        PromptTemplate(**{field: "<extra_id_1>User\n"})


def test_a_role_format_with_two_placeholders_is_rejected():
    with pytest.raises(pydantic.ValidationError):
        PromptTemplate(user_format="{MESSAGE} {MESSAGE}")


def test_an_empty_user_or_assistant_format_means_the_bare_message_as_in_the_seed():
    template = PromptTemplate(user_format="", assistant_format="", system_format=None, eos_token="</s>")
    assert template.format_prompt("q") == "q"
    assert template.format_with_response("q", "a") == "qa</s>"


def test_unescape_turns_a_typed_backslash_n_into_a_newline():
    assert unescape("a\\nb") == "a\nb"
    assert unescape("<extra_id_1>User\\n{MESSAGE}\\t") == "<extra_id_1>User\n{MESSAGE}\t"


def test_unescape_leaves_text_without_escapes_alone():
    assert unescape("[INST] {MESSAGE} [/INST]") == "[INST] {MESSAGE} [/INST]"


def test_unescape_of_a_dangling_backslash_is_an_input_error():
    with pytest.raises(InputError, match="cannot unescape"):
        unescape("ends with \\")
