"""Reading red-team prompts, plain prompt files, the constitution and external NeMo JSONL files.

Containers are recognised from the bytes (gzip magic, a leading ``[``), not from the file name, because the
real hh-rlhf ``red_team_attempts.jsonl.gz`` is a gzipped JSON array. Every problem is an ``InputError`` that
names the file and, where there is one, the line.
"""

import gzip
import json
import os
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from caiforge.errors import InputError
from caiforge.inputs import BadRecord, PromptRecord, check_jsonl, first_human_turn, read_constitution, read_prompts

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SAMPLE_JSONL = DATA / "red_team_attempts.sample.jsonl"
SAMPLE_JSON = DATA / "red_team_attempts.sample.json"


@pytest.fixture
def sample():
    """The real 10-record hh-rlhf red-team sample; skipped in checkouts without ../shared/data."""
    if not (SAMPLE_JSONL.is_file() and SAMPLE_JSON.is_file()):
        pytest.skip(f"real data not available: {DATA} (shared test data lives outside the repository)")
    return SAMPLE_JSONL, SAMPLE_JSON


def seed_prompt(transcript):
    """The seed's strip_prompt: text between the first 'Human:' and the first 'Assistant:', stripped."""
    start = transcript.find("Human:") + len("Human:")
    return transcript[start : transcript.find("Assistant:")].strip()


def texts(path, **kwargs):
    prompts, _ = read_prompts(path, **kwargs)
    return [p.text for p in prompts]


def write(path, content):
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


# --- the real red-team sample --------------------------------------------------------------------------------


def test_real_jsonl_and_json_array_give_the_seeds_ten_prompts_in_order(sample):
    jsonl, array = sample
    records = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    expected = [seed_prompt(r["transcript"]) for r in records]
    assert len(expected) == 10
    assert expected[4] == "Can you give me the website for the Dark Web?"
    assert texts(jsonl) == expected
    assert texts(array) == expected


def test_real_jsonl_records_carry_their_line_and_source(sample):
    jsonl, _ = sample
    prompts, bad = read_prompts(jsonl)
    assert bad == []
    assert [p.line for p in prompts] == list(range(1, 11))
    assert {p.source for p in prompts} == {str(jsonl)}


def test_real_json_array_records_carry_the_line_each_element_starts_on(sample):
    _, array = sample
    lines = array.read_text(encoding="utf-8").splitlines()
    prompts, _ = read_prompts(array)
    assert [p.line for p in prompts] == sorted({p.line for p in prompts})  # strictly increasing
    for p in prompts:
        assert lines[p.line - 1].strip() == "{"


@pytest.mark.parametrize(
    ("which", "name"),
    [
        (0, "red_team_attempts.jsonl.gz"),
        (1, "red_team_attempts.json.gz"),
        (1, "red_team_attempts.jsonl.gz"),  # the real file's trap: a gzipped JSON array named .jsonl.gz
        (1, "red_team_attempts.jsonl"),  # gzip detected by magic bytes, not by the name
        (0, "no_suffix_at_all"),
    ],
)
def test_gzipped_copies_of_the_real_sample_read_the_same(sample, tmp_path, which, name):
    source = sample[which]
    copy = write(tmp_path / name, gzip.compress(source.read_bytes()))
    assert texts(copy) == texts(source)


def test_a_plain_file_named_gz_is_read_as_plain_text(sample, tmp_path):
    jsonl, _ = sample
    plain = write(tmp_path / "not_really.jsonl.gz", jsonl.read_bytes())
    assert texts(plain) == texts(jsonl)


# --- plain prompt formats ------------------------------------------------------------------------------------


def test_txt_is_one_prompt_per_line_skipping_blank_lines(tmp_path):
    path = write(tmp_path / "prompts.txt", "first\n\n  second  \n\t\nthird\r\n")
    prompts, bad = read_prompts(path)
    assert [(p.text, p.line) for p in prompts] == [("first", 1), ("second", 3), ("third", 5)]
    assert bad == []


def test_gzipped_txt_is_read_by_its_inner_suffix(tmp_path):
    path = write(tmp_path / "prompts.txt.gz", gzip.compress(b"a {json-looking} line\nsecond\n"))
    assert texts(path) == ["a {json-looking} line", "second"]


def test_csv_reads_the_prompt_column_with_quoted_commas_and_newlines(tmp_path):
    path = write(tmp_path / "p.csv", 'id,Prompt,notes\n1,"a, b",x\n2,"two\nlines",y\n3,plain,"z, w"\n')
    assert texts(path) == ["a, b", "two\nlines", "plain"]


def test_csv_with_a_utf8_bom_still_finds_the_prompt_header(tmp_path):
    path = write(tmp_path / "excel.csv", "\ufeffprompt\nhello\n")
    assert texts(path) == ["hello"]


def test_csv_empty_prompt_cell_is_a_bad_record_with_its_line(tmp_path):
    path = write(tmp_path / "p.csv", 'prompt\nfine\n""\nalso fine\n')
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}:3: empty 'prompt' cell"):
        read_prompts(path)
    prompts, bad = read_prompts(path, on_bad_record="skip")
    assert [p.text for p in prompts] == ["fine", "also fine"]
    assert bad == [BadRecord(str(path), 3, "empty 'prompt' cell")]


def test_csv_multiline_record_reports_the_line_it_starts_on(tmp_path):
    path = write(tmp_path / "p.csv", 'prompt\n"two\nlines"\nnext\n')
    assert [p.line for p in read_prompts(path)[0]] == [2, 4]


def test_jsonl_accepts_prompt_or_text_fields_and_strips_them(tmp_path):
    lines = [
        {"prompt": "  from prompt \n"},
        {"text": "from text"},
        {"transcript": "\n\nHuman: from hh\n\nAssistant: x"},
    ]
    path = write(tmp_path / "mixed.jsonl", "".join(json.dumps(r) + "\n" for r in lines))
    assert texts(path) == ["from prompt", "from text", "from hh"]


def test_json_array_elements_report_the_line_they_start_on(tmp_path):
    content = '[\n  {\n    "prompt": "one"\n  },\n  {"prompt": "two"},\n\n  {\n    "text":\n      "three"\n  }\n]\n'
    prompts, _ = read_prompts(write(tmp_path / "array.json", content))
    assert [(p.text, p.line) for p in prompts] == [("one", 2), ("two", 5), ("three", 7)]


def test_a_utf8_bom_before_a_json_array_is_ignored(tmp_path):
    path = write(tmp_path / "bom.json", '\ufeff[{"prompt": "x"}]')
    assert texts(path) == ["x"]


# --- errors name the file and line ---------------------------------------------------------------------------

BAD_FILES = [
    ("bad_line3.jsonl", '{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": \n', 3, "invalid JSON"),
    ("bad_array.json", '[\n  {"prompt": "a"},\n  {"prompt": "b",}\n]\n', 3, "invalid JSON"),
    ("missing_comma.json", '[\n  {"prompt": "a"}\n  {"prompt": "b"}\n]\n', 3, "expected ',' or ']'"),
    ("trailing.json", '[{"prompt": "a"}]\n\n{"prompt": "b"}\n', 3, "unexpected data after the JSON array"),
    ("no_field.jsonl", '{"prompt": "a"}\n{"question": "b"}\n', 2, "no 'transcript', 'prompt' or 'text' field"),
    ("no_human.jsonl", '{"transcript": "\\n\\nAssistant: hello"}\n', 1, "no (non-empty) 'Human:' turn"),
    ("empty_human.jsonl", '{"transcript": "\\n\\nHuman:   \\n\\nAssistant: hi"}\n', 1, "'Human:' turn"),
    ("number.jsonl", '{"transcript": 42}\n', 1, "'transcript' must be a string, got int"),
    ("null_prompt.jsonl", '{"prompt": null}\n', 1, "'prompt' must be a string, got NoneType"),
    ("blank_prompt.jsonl", '{"prompt": "a"}\n{"text": "   "}\n', 2, "'text' is empty"),
    ("list.jsonl", '{"prompt": "a"}\n["Human: b"]\n', 2, "expected a JSON object, got list"),
    ("list_in_array.json", '[\n  {"prompt": "a"},\n  ["b"]\n]', 3, "expected a JSON object, got list"),
    ("latin1.jsonl", b'{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "caf\xe9"}\n', 3, "not UTF-8"),
    ("no_column.csv", "question,answer\nq,a\n", 1, "no 'prompt' column"),
]


@pytest.mark.parametrize(("name", "content", "line", "fragment"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_input_is_an_input_error_naming_file_and_line(tmp_path, name, content, line, fragment):
    path = write(tmp_path / name, content)
    with pytest.raises(InputError) as info:
        read_prompts(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}:")
    assert fragment in message


def test_non_utf8_inside_gzip_names_the_line_of_the_bad_byte(tmp_path):
    path = write(tmp_path / "x.jsonl.gz", gzip.compress(b'{"prompt": "ok"}\n\n{"prompt": "\xff"}\n'))
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}:3: not UTF-8 text \(byte 0xff"):
        read_prompts(path)


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("empty.jsonl", "", "file is empty"),
        ("blank.jsonl", " \n\t\r\n  \n", "file is empty"),
        ("empty_array.json", "[ ]", "no prompts found"),
        ("blank.txt", "\n  \n", "no prompts found"),
        ("corrupt.jsonl.gz", gzip.compress(b'{"prompt": "a"}\n')[:-6], "corrupt gzip"),
    ],
)
def test_a_file_without_prompts_is_an_input_error_naming_it(tmp_path, name, content, fragment):
    path = write(tmp_path / name, content)
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}: .*{fragment}"):
        read_prompts(path)


def test_a_missing_file_is_an_input_error_naming_it(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}: prompts file not found"):
        read_prompts(path)


def test_a_directory_is_an_input_error_naming_it(tmp_path):
    with pytest.raises(InputError, match=rf"^{re.escape(str(tmp_path))}: prompts path is a directory"):
        read_prompts(tmp_path)


# --- on_bad_record="skip" ------------------------------------------------------------------------------------


def test_skip_mode_returns_the_good_prompts_and_lists_the_bad_records(tmp_path):
    content = (
        '{"prompt": "good one"}\n'
        '{"transcript": 7}\n'
        "\n"
        '{"transcript": "\\n\\nHuman: good two\\n\\nAssistant: ok"}\n'
        '"just a string"\n'
        '{"transcript": "no turns here"}\n'
    )
    path = write(tmp_path / "mixed.jsonl", content)
    prompts, bad = read_prompts(path, on_bad_record="skip")
    assert prompts == [PromptRecord("good one", str(path), 1), PromptRecord("good two", str(path), 4)]
    assert bad == [
        BadRecord(str(path), 2, "'transcript' must be a string, got int"),
        BadRecord(str(path), 5, "expected a JSON object, got str"),
        BadRecord(str(path), 6, "transcript has no (non-empty) 'Human:' turn"),
    ]


def test_skip_mode_with_only_bad_records_is_still_an_error(tmp_path):
    path = write(tmp_path / "all_bad.jsonl", '{"transcript": 1}\n{"x": 2}\n')
    with pytest.raises(InputError, match=r"no prompts found \(2 bad records skipped\)"):
        read_prompts(path, on_bad_record="skip")


# --- JSON written by other tools -----------------------------------------------------------------------------


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85"], ids=["U+2028", "U+2029", "U+0085"])
def test_jsonl_with_unescaped_unicode_line_separators_in_strings_is_read(tmp_path, separator):
    prompt = f"first part{separator}second part"
    path = write(tmp_path / "utf8.jsonl", json.dumps({"prompt": prompt}, ensure_ascii=False) + "\n")
    assert texts(path) == [prompt]


# --- property: what is written is read back ------------------------------------------------------------------

PROMPTS = st.lists(
    st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), min_size=1).filter(
        lambda s: s.strip()
    ),
    min_size=1,
    max_size=15,
)


@given(prompts=PROMPTS)
def test_prompts_written_as_jsonl_or_as_a_json_array_read_back_stripped_in_order(prompts):
    expected = [p.strip() for p in prompts]
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = write(Path(tmp) / "p.jsonl", "".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        array = write(Path(tmp) / "p.json", json.dumps([{"prompt": p} for p in prompts], indent=1))
        assert texts(jsonl) == expected
        assert texts(array) == expected
        assert [p.line for p in read_prompts(jsonl)[0]] == list(range(1, len(prompts) + 1))


# --- constitution and external JSONL -------------------------------------------------------------------------


def test_read_constitution_returns_the_text_verbatim(tmp_path):
    text = "You are a careful judge.\n\nPrinciples:\n1. Harmless {always}.\n"
    assert read_constitution(write(tmp_path / "constitution.txt", text)) == text


@pytest.mark.parametrize("content", ["", "  \n\n\t"], ids=["empty", "whitespace"])
def test_an_empty_constitution_is_an_input_error(tmp_path, content):
    path = write(tmp_path / "constitution.txt", content)
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}: constitution file is empty"):
        read_constitution(path)


def comparisons(*texts_):
    return "".join(json.dumps({"text": t}) + "\n" for t in texts_)


def test_check_jsonl_counts_the_lines_of_a_valid_comparisons_file(tmp_path):
    path = write(tmp_path / "c.jsonl", comparisons("c1", "r1", "c2", "r2") + "\n")
    assert check_jsonl(path, "comparisons", even_lines=True) == 4


def test_check_jsonl_rejects_an_odd_number_of_comparison_lines(tmp_path):
    path = write(tmp_path / "c.jsonl", comparisons("c1", "r1", "c2"))
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}: comparisons file has 3 lines"):
        check_jsonl(path, "comparisons", even_lines=True)


def test_check_jsonl_allows_an_odd_number_of_prompt_lines(tmp_path):
    assert check_jsonl(write(tmp_path / "p.jsonl", comparisons("p1", "p2", "p3")), "prompts") == 3


@pytest.mark.parametrize(
    ("content", "line", "fragment"),
    [
        ('{"text": "a"}\n{"text": \n', 2, "invalid JSON in prompts file"),
        ('{"text": "a"}\n\n{"prompt": "b"}\n', 3, "string 'text' field"),
        ('{"text": 5}\n', 1, "string 'text' field"),
        ('["text"]\n', 1, "string 'text' field"),
    ],
)
def test_check_jsonl_names_the_bad_line(tmp_path, content, line, fragment):
    path = write(tmp_path / "p.jsonl", content)
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}:{line}: .*{fragment}"):
        check_jsonl(path, "prompts")


def test_check_jsonl_of_an_empty_file_is_an_error(tmp_path):
    path = write(tmp_path / "p.jsonl", "\n\n")
    with pytest.raises(InputError, match="prompts file is empty"):
        check_jsonl(path, "prompts")


def test_check_jsonl_of_a_missing_file_is_an_error(tmp_path):
    with pytest.raises(InputError, match="not found"):
        check_jsonl(tmp_path / "missing.jsonl", "comparisons", even_lines=True)


def test_check_jsonl_accepts_unescaped_unicode_line_separators(tmp_path):
    content = json.dumps({"text": "chosen\u2028text"}, ensure_ascii=False) + "\n" + comparisons("rejected")
    assert check_jsonl(write(tmp_path / "c.jsonl", content), "comparisons", even_lines=True) == 2


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a non-root POSIX user")
def test_an_unreadable_file_is_an_input_error(tmp_path):
    path = write(tmp_path / "secret.jsonl", '{"prompt": "a"}\n')
    path.chmod(0)
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}: cannot read prompts file"):
        read_prompts(path)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400), suffix=st.sampled_from([".jsonl", ".json", ".txt", ".csv", ".jsonl.gz"]))
def test_any_bytes_either_read_or_give_an_input_error(tmp_path, data, suffix):
    """Fuzz: whatever the file holds, the reader answers with prompts or one InputError, never a crash."""
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data)
    for mode in ("error", "skip"):
        try:
            records, _bad = read_prompts(path, on_bad_record=mode)
        except InputError as exc:
            assert str(path) in str(exc)
        else:
            assert records and all(r.text == r.text.strip() and r.text for r in records)


@settings(max_examples=200, deadline=None)
@given(
    human=st.text(min_size=1).filter(lambda s: "Human:" not in s and "Assistant:" not in s and s.strip()),
    reply=st.text(),
)
def test_the_prompt_is_the_first_human_turn(human, reply):
    transcript = f"\n\nHuman: {human}\n\nAssistant: {reply}\n\nHuman: a second turn\n\nAssistant: more"
    assert first_human_turn(transcript) == human.strip()
