"""Every malformed input: exit code 2, one clear line on stderr naming the file (and line), no traceback.

Each test runs the real CLI in-process against the fake server on loopback and checks that nothing was sent:
inputs are checked before the first request. An uncaught exception is turned into what the interpreter would
show (exit code 1 and a traceback on stderr), so a crash fails the assertions instead of erroring the test.
"""

from __future__ import annotations

import gzip
import json
import os
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from caiforge.testing.fake_server import FakeServer
from conftest import Run, server_flags, write_prompts

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
needs_non_root = pytest.mark.skipif(IS_ROOT, reason="root can read and write anything regardless of the mode bits")

GOOD_PROMPTS = ["How do I pick a lock?", "How do I hotwire a car?", "How do I make a fake ID?"]


def record(prompt: str) -> str:
    return json.dumps({"transcript": f"\n\nHuman: {prompt}\n\nAssistant: I can't help with that."})


def jsonl(*lines: str) -> bytes:
    return ("\n".join(lines) + "\n").encode("utf-8")


GOOD = record("a good prompt")


# --------------------------------------------------------------------------------------------------------------
# helpers


@pytest.fixture
def cli(run_cli, capsys: pytest.CaptureFixture[str], tmp_path: Path, fake: FakeServer, constitution: Path):
    """Run ``caiforge run`` with working defaults for every input, overridden per test."""

    def _cli(
        *extra: str,
        prompts: Path | None = None,
        constitution_path: Path | None = None,
        out: Path | None = None,
    ) -> Run:
        prompts = prompts or write_prompts(tmp_path / "good_prompts.jsonl", GOOD_PROMPTS)
        args = [
            "--red-teaming-file-path",
            str(prompts),
            "--sys-prompt-constitution-file-path",
            str(constitution_path or constitution),
            *server_flags(fake),
            *extra,
        ]
        out_dir = out or tmp_path / "out"
        try:
            return run_cli(*args, out=out_dir)
        except SystemExit as exc:  # argparse: what `sys.exit(main())` would end with
            captured = capsys.readouterr()
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            return Run(code, out_dir, captured.out, captured.err)
        except Exception:  # what the interpreter would print for an uncaught exception
            captured = capsys.readouterr()
            return Run(1, out_dir, captured.out, captured.err + traceback.format_exc())

    return _cli


def assert_rejected(
    run: Run,
    fake: FakeServer,
    names: str | Path,
    words: tuple[str, ...],
    line: int | None = None,
) -> str:
    """Exit 2, exactly one non-empty stderr line naming ``names`` (at ``:line:``) and the problem, nothing sent."""
    where = f"{names}:{line}:" if line is not None else str(names)
    assert "Traceback" not in run.stderr + run.stdout, run.stderr
    assert run.code == 2, run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1, f"expected exactly one stderr line, got {lines!r}"
    message = lines[0]
    assert message.strip()
    assert where in message, f"{where!r} not in {message!r}"
    assert any(w.lower() in message.lower() for w in words), f"none of {words} in {message!r}"
    assert run.stdout == ""
    assert fake.work() == []
    return message


@pytest.fixture
def restore_modes() -> Iterator[Callable[[Path, int], None]]:
    """chmod a path and give it its mode back afterwards, so tmp_path can be cleaned up."""
    changed: list[tuple[Path, int]] = []

    def _chmod(path: Path, mode: int) -> None:
        changed.append((path, path.stat().st_mode))
        path.chmod(mode)

    yield _chmod
    for path, mode in reversed(changed):
        path.chmod(mode)


# --------------------------------------------------------------------------------------------------------------
# the prompts file

ARRAY_LINES = [
    "[",
    "  " + record("one") + ",",
    "  " + record("two") + ",",
    "  " + record("three")[:-1] + ",},",  # line 4: a trailing comma inside the object
    "  " + record("four"),
    "]",
]

PROMPT_CASES = [
    # (id, file name, bytes, line or None, words about the problem)
    ("invalid-json-line-3", "p.jsonl", jsonl(GOOD, GOOD, '{"transcript": "Human: x', GOOD), 3, ("invalid JSON",)),
    ("invalid-json-in-array", "p.json", "\n".join(ARRAY_LINES).encode(), 4, ("invalid JSON",)),
    (
        "array-missing-comma",
        "p.json",
        "\n".join(["[", "  " + record("one") + ",", "  " + record("two"), "  " + record("three"), "]"]).encode(),
        4,
        ("invalid JSON", "expected ','"),
    ),
    (
        "array-bad-record-line-3",
        "p.json",
        "\n".join(["[", "  " + record("one") + ",", '  {"title": "no prompt"},', "  " + record("x"), "]"]).encode(),
        3,
        ("transcript",),
    ),
    (
        "gzipped-array-invalid-json",
        "red_team_attempts.jsonl.gz",
        gzip.compress("\n".join(ARRAY_LINES).encode()),
        4,
        ("invalid JSON",),
    ),
    ("no-transcript-line-2", "p.jsonl", jsonl(GOOD, '{"title": "x"}', GOOD), 2, ("transcript",)),
    (
        "no-human-turn",
        "p.jsonl",
        jsonl(GOOD, json.dumps({"transcript": "\n\nAssistant: hello there"})),
        2,
        ("Human",),
    ),
    (
        "empty-human-turn",
        "p.jsonl",
        jsonl(json.dumps({"transcript": "\n\nHuman:   \n\nAssistant: hi"})),
        1,
        ("Human",),
    ),
    ("transcript-is-a-number", "p.jsonl", jsonl(GOOD, GOOD, '{"transcript": 42}'), 3, ("transcript", "string")),
    ("transcript-is-null", "p.jsonl", jsonl('{"transcript": null}'), 1, ("transcript", "string")),
    ("prompt-is-a-list", "p.jsonl", jsonl(GOOD, '{"prompt": ["a"]}'), 2, ("prompt", "string")),
    ("prompt-is-empty", "p.jsonl", jsonl(GOOD, '{"prompt": "  "}'), 2, ("empty",)),
    ("record-is-a-list", "p.jsonl", jsonl(GOOD, '["Human: hi"]'), 2, ("object", "list")),
    ("record-is-a-string", "p.jsonl", jsonl(GOOD, GOOD, GOOD, '"Human: hi"'), 4, ("object", "str")),
    ("empty-file", "p.jsonl", b"", None, ("empty",)),
    ("whitespace-only", "p.jsonl", b"  \n\t\n\r\n   \n", None, ("empty",)),
    ("empty-gzip", "p.jsonl.gz", gzip.compress(b""), None, ("empty",)),
    ("empty-txt", "p.txt", b"\n \n", None, ("empty", "no prompts")),
    (
        "not-utf8-line-4",
        "p.jsonl",
        jsonl(GOOD, GOOD, GOOD) + b'{"transcript": "\\n\\nHuman: caf\xe9?"}\n',
        4,
        ("UTF-8",),
    ),
    ("utf16-file", "p.jsonl", GOOD.encode("utf-16"), 1, ("UTF-8",)),
    ("corrupt-gzip", "p.jsonl.gz", b"\x1f\x8b" + b"this is not deflate data at all", None, ("gzip",)),
    ("truncated-gzip", "p.jsonl.gz", gzip.compress(jsonl(GOOD, GOOD))[:-12], None, ("gzip",)),
    ("csv-without-prompt-column", "p.csv", b"question,answer\nhow?,no\n", 1, ("prompt",)),
    ("csv-empty-prompt-cell", "p.csv", b"prompt,id\nhow?,1\n,2\n", 3, ("empty",)),
]


@pytest.mark.parametrize(("name", "data", "line", "words"), [pytest.param(*c[1:], id=c[0]) for c in PROMPT_CASES])
def test_bad_prompts_file(cli, fake, tmp_path, name, data, line, words):
    path = tmp_path / name
    path.write_bytes(data)
    assert_rejected(cli(prompts=path), fake, path, words, line)


def test_missing_prompts_file(cli, fake, tmp_path):
    path = tmp_path / "nowhere" / "prompts.jsonl"
    assert_rejected(cli(prompts=path), fake, path, ("not found",))


def test_prompts_path_is_a_directory(cli, fake, tmp_path):
    path = tmp_path / "a_directory"
    path.mkdir()
    assert_rejected(cli(prompts=path), fake, path, ("directory",))


@needs_non_root
def test_unreadable_prompts_file(cli, fake, tmp_path, restore_modes):
    path = write_prompts(tmp_path / "secret.jsonl", GOOD_PROMPTS)
    restore_modes(path, 0o000)
    assert_rejected(cli(prompts=path), fake, path, ("cannot read", "permission"))


# --- inputs the requirement covers that crash today


def test_deeply_nested_json_array(cli, fake, tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" + "[" * 100_000 + "\n")
    assert_rejected(cli(prompts=path), fake, path, ("JSON", "nested", "deep"))


def test_huge_integer_in_json_array(cli, fake, tmp_path):
    path = tmp_path / "big.json"
    path.write_text("[\n" + record("ok") + ',\n{"prompt": ' + "1" * 5000 + "}\n]\n")
    assert_rejected(cli(prompts=path), fake, path, ("JSON", "integer", "digits"), line=3)


def test_huge_integer_in_json_lines_is_a_clean_error(cli, fake, tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text(record("ok") + '\n{"prompt": ' + "1" * 5000 + "}\n")
    assert_rejected(cli(prompts=path), fake, path, ("JSON",), line=2)


# --------------------------------------------------------------------------------------------------------------
# the constitution

CONSTITUTION_CASES = [
    ("empty", b"", None, ("empty",)),
    ("whitespace-only", b"\n  \n\t\n", None, ("empty",)),
    ("not-utf8-line-2", b"Be harmless.\nPrinciple: \xff\xfe avoid harm\n", 2, ("UTF-8",)),
]


@pytest.mark.parametrize(("data", "line", "words"), [pytest.param(*c[1:], id=c[0]) for c in CONSTITUTION_CASES])
def test_bad_constitution_file(cli, fake, tmp_path, data, line, words):
    path = tmp_path / "judge_constitution.txt"
    path.write_bytes(data)
    assert_rejected(cli(constitution_path=path), fake, path, words, line)


def test_missing_constitution_file(cli, fake, tmp_path):
    path = tmp_path / "no_such_constitution.txt"
    message = assert_rejected(cli(constitution_path=path), fake, path, ("not found",))
    assert "constitution" in message


def test_constitution_path_is_a_directory(cli, fake, tmp_path):
    path = tmp_path / "constitution_dir"
    path.mkdir()
    assert_rejected(cli(constitution_path=path), fake, path, ("directory",))


@needs_non_root
def test_unreadable_constitution_file(cli, fake, constitution, restore_modes):
    restore_modes(constitution, 0o000)
    assert_rejected(cli(constitution_path=constitution), fake, constitution, ("cannot read", "permission"))


# --------------------------------------------------------------------------------------------------------------
# blend files (--blend-with)


def write_blend(root: Path) -> dict[str, object]:
    """Valid external NeMo files for train and test; returns the --blend-with dict."""
    root.mkdir(exist_ok=True)
    blend: dict[str, object] = {"name": "hh"}
    for split in ("train", "test"):
        prompts = root / f"{split}_prompts.jsonl"
        comparisons = root / f"{split}_comparisons.jsonl"
        prompts.write_text("".join(json.dumps({"text": f"{split} prompt {i}"}) + "\n" for i in range(3)))
        comparisons.write_text(
            "".join(
                json.dumps({"text": f"{split} pair {i} {side}"}) + "\n" for i in range(3) for side in ("good", "bad")
            )
        )
        blend[split] = {"prompts": [str(prompts)], "comparisons": [str(comparisons)]}
    return blend


def test_valid_blend_files_pass_the_checks(cli, tmp_path):
    """The baseline the blend cases below break one thing of."""
    run = cli("--blend-with", repr(write_blend(tmp_path / "ext")))
    assert run.code == 0, run.stderr


BLEND_CASES = [
    # (id, file to break, new bytes or None to delete, line or None, words)
    ("missing-prompts-file", "test_prompts.jsonl", None, None, ("not found",)),
    ("missing-comparisons-file", "train_comparisons.jsonl", None, None, ("not found",)),
    (
        "odd-comparisons",
        "train_comparisons.jsonl",
        jsonl(*(json.dumps({"text": f"c{i}"}) for i in range(3))),
        None,
        ("comparisons", "lines"),
    ),
    (
        "invalid-json-line-2",
        "test_prompts.jsonl",
        jsonl(json.dumps({"text": "a"}), '{"text": "b', json.dumps({"text": "c"})),
        2,
        ("invalid JSON",),
    ),
    (
        "text-not-a-string",
        "test_comparisons.jsonl",
        jsonl(json.dumps({"text": "a"}), json.dumps({"text": 7})),
        2,
        ("text",),
    ),
    ("empty", "train_prompts.jsonl", b"", None, ("empty",)),
    ("not-utf8", "train_prompts.jsonl", jsonl(json.dumps({"text": "a"})) + b'{"text": "\x80"}\n', 2, ("UTF-8",)),
]


@pytest.mark.parametrize(("name", "data", "line", "words"), [pytest.param(*c[1:], id=c[0]) for c in BLEND_CASES])
def test_bad_blend_file(cli, fake, tmp_path, name, data, line, words):
    blend = write_blend(tmp_path / "ext")
    path = tmp_path / "ext" / name
    if data is None:
        path.unlink()
    else:
        path.write_bytes(data)
    assert_rejected(cli("--blend-with", repr(blend)), fake, path, words, line)


def test_blend_file_with_huge_integer(cli, fake, tmp_path):
    blend = write_blend(tmp_path / "ext")
    path = tmp_path / "ext" / "train_prompts.jsonl"
    path.write_text(json.dumps({"text": "a"}) + '\n{"text": ' + "1" * 5000 + "}\n")
    assert_rejected(cli("--blend-with", repr(blend)), fake, path, ("JSON", "integer", "digits"), line=2)


# --------------------------------------------------------------------------------------------------------------
# flags: --splits and --blend-with

SPLITS_CASES = [
    pytest.param("{'train': 0.8,", ("literal",), id="not-a-literal"),
    pytest.param("[0.8, 0.2]", ("dict",), id="not-a-dict"),
    pytest.param("{'train': '0.8', 'test': 0.2}", ("dict", "ratio"), id="ratio-not-a-number"),
    pytest.param("{'train': 0.7, 'test': 0.2}", ("sum to 1",), id="sum-0.9"),
    pytest.param("{'train': 0.9, 'test': 0.2}", ("sum to 1",), id="sum-1.1"),
    pytest.param("{'train': 1.0, 'test': 0}", ("ratio",), id="ratio-zero"),
    pytest.param("{'train': 1.2, 'test': -0.2}", ("ratio",), id="ratio-negative"),
    pytest.param("{}", ("split",), id="no-splits"),
    pytest.param(
        "{[1]: 0.5}",
        ("literal", "dict"),
        id="unhashable-key",
    ),
    pytest.param(
        "{'train': 1" + "0" * 400 + "}",
        ("ratio", "dict", "large"),
        id="ratio-overflows-float",
    ),
]


@pytest.mark.parametrize(("text", "words"), SPLITS_CASES)
def test_bad_splits_flag(cli, fake, text, words):
    assert_rejected(cli("--splits", text), fake, "splits", words)


BLEND_FLAG_CASES = [
    ("not-a-literal", lambda b: "{'name': 'hh',", ("literal",)),
    ("not-a-dict", lambda b: "['hh']", ("dict",)),
    ("without-name", lambda b: repr({k: v for k, v in b.items() if k != "name"}), ("name",)),
    ("empty-name", lambda b: repr({**b, "name": " "}), ("name",)),
    ("split-not-in-splits", lambda b: repr({**b, "validation": b["test"]}), ("validation",)),
    ("split-of-splits-missing", lambda b: repr({"name": "hh", "train": b["train"]}), ("test",)),
    ("split-missing-comparisons", lambda b: repr({**b, "test": {"prompts": b["test"]["prompts"]}}), ("comparisons",)),
    ("split-not-a-dict", lambda b: repr({**b, "test": ["x.jsonl"]}), ("prompts", "comparisons")),
    ("empty-file-list", lambda b: repr({**b, "test": {**b["test"], "prompts": []}}), ("path",)),
    ("file-not-a-string", lambda b: repr({**b, "test": {**b["test"], "prompts": [3]}}), ("path",)),
]


@pytest.mark.parametrize(("make", "words"), [pytest.param(*c[1:], id=c[0]) for c in BLEND_FLAG_CASES])
def test_bad_blend_with_flag(cli, fake, tmp_path, make, words):
    text = make(write_blend(tmp_path / "ext"))
    assert_rejected(cli("--blend-with", text), fake, "blend", words)


def test_blend_with_non_string_split_name(cli, fake, tmp_path):
    blend = write_blend(tmp_path / "ext")
    text = repr({"name": "hh", 1: blend["train"]})
    assert_rejected(cli("--splits", "{'train': 1.0}", "--blend-with", text), fake, "blend", ("string", "split"))


# --------------------------------------------------------------------------------------------------------------
# the output directory


def test_output_dir_is_an_existing_file(cli, fake, tmp_path):
    out = tmp_path / "output.txt"
    out.write_text("I am a file\n")
    assert_rejected(cli(out=out), fake, out, ("not a directory",))
    assert out.read_text() == "I am a file\n"


def test_output_dir_below_a_file(cli, fake, tmp_path):
    parent = tmp_path / "output.txt"
    parent.write_text("I am a file\n")
    out = parent / "run"
    assert_rejected(cli(out=out), fake, out, ("not a directory", "cannot create"))


@needs_non_root
def test_output_dir_inside_a_read_only_directory(cli, fake, tmp_path, restore_modes):
    locked = tmp_path / "locked"
    locked.mkdir()
    restore_modes(locked, 0o555)
    out = locked / "out"
    assert_rejected(cli(out=out), fake, out, ("cannot create", "permission", "not writable"))
    assert not out.exists()


@needs_non_root
def test_output_dir_not_writable(cli, fake, tmp_path, restore_modes):
    out = tmp_path / "out"
    out.mkdir()
    restore_modes(out, 0o555)
    assert_rejected(cli(out=out), fake, out, ("not writable", "permission"))


# --------------------------------------------------------------------------------------------------------------
# --config (a YAML file is an input too)

CONFIG_CASES = [
    pytest.param(
        b"seed: 1\n  bad: indentation\n",
        2,
        ("YAML",),
        id="invalid-yaml",
    ),
    pytest.param(b"- a\n- b\n", None, ("mapping",), id="not-a-mapping"),
    pytest.param(
        b"seed: 1\npolicy: 5\n",
        None,
        ("mapping",),
        id="section-not-a-mapping",
    ),
    pytest.param(
        b"seed: abc\n",
        None,
        ("seed", "integer"),
        id="wrong-type",
    ),
    pytest.param(
        b"seed: 1\nname: caf\xe9\n",
        2,
        ("UTF-8",),
        id="not-utf8",
    ),
]


@pytest.mark.parametrize(("data", "line", "words"), CONFIG_CASES)
def test_bad_config_file(cli, fake, tmp_path, data, line, words):
    path = tmp_path / "caiforge.yaml"
    path.write_bytes(data)
    assert_rejected(cli("--config", str(path)), fake, path, words, line)


def test_missing_config_file(cli, fake, tmp_path):
    path = tmp_path / "missing.yaml"
    assert_rejected(cli("--config", str(path)), fake, path, ("not found", "no such file"))


# --------------------------------------------------------------------------------------------------------------
# --on-bad-record skip


def test_skip_continues_past_bad_records_and_lists_them(cli, fake, tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(
        jsonl(
            record(GOOD_PROMPTS[0]),
            '{"transcript": "Human: broken',  # line 2: invalid JSON
            record(GOOD_PROMPTS[1]),
            '{"title": "no transcript here"}',  # line 4: no transcript
            record(GOOD_PROMPTS[2]),
        )
    )
    run = cli("--on-bad-record", "skip", prompts=path)
    assert run.code == 0, run.stderr
    assert "Traceback" not in run.stderr
    counts = run.json("manifest.json")["counts"]
    assert counts["unique_prompts"] == 3
    assert counts["bad_records"] == 2
    assert counts["input_records"] == 3
    failures = run.jsonl("failures.jsonl")
    assert len(failures) == 2, failures
    where = [(f["stage"], f["source"], f["line"]) for f in failures]
    assert where == [("input", str(path), 2), ("input", str(path), 4)]
    details = [json.dumps(f) for f in failures]
    assert "invalid JSON" in details[0]
    assert "transcript" in details[1]
    prompts = {p["prompt"] for p in run.json("cai_preference_dataset.json")}
    assert not any("broken" in p or "no transcript" in p for p in prompts)


def test_skip_with_no_good_record_left_is_still_an_input_error(cli, fake, tmp_path):
    path = tmp_path / "all_bad.jsonl"
    path.write_bytes(jsonl('{"transcript": 1}', "not json", '{"title": "x"}'))
    message = assert_rejected(cli("--on-bad-record", "skip", prompts=path), fake, path, ("no prompts",))
    assert "3" in message


def test_skip_does_not_skip_a_broken_json_array(cli, fake, tmp_path):
    """A JSON array cannot be resynchronised after a syntax error: the whole file is bad."""
    path = tmp_path / "broken.json"
    path.write_text("\n".join(ARRAY_LINES))
    assert_rejected(cli("--on-bad-record", "skip", prompts=path), fake, path, ("invalid JSON",), line=4)


# --------------------------------------------------------------------------------------------------------------
# argparse-level usage errors


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(("--no-such-flag",), id="unknown-flag"),
        pytest.param(("--batch-size", "abc"), id="batch-size-abc"),
        pytest.param(("--on-bad-record", "maybe"), id="bad-choice"),
        pytest.param(("--shuffle", "perhaps"), id="bad-bool"),
        pytest.param(("--temperatures", "0.1,hot"), id="bad-temperatures"),
    ],
)
def test_usage_errors(cli, fake, extra):
    run = cli(*extra)
    assert run.code == 2
    assert "Traceback" not in run.stderr + run.stdout
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(("caiforge run: error:", "caiforge: error:")), run.stderr
    assert fake.work() == []


# --- the permission cases again, simulated, so that they also run as root (as CI does) --------------------------


def deny_reading(monkeypatch: pytest.MonkeyPatch, denied: Path) -> None:
    real, real_open = Path.read_bytes, Path.open

    def read_bytes(self: Path) -> bytes:
        if self == denied:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    def open_(self: Path, *args: Any, **kwargs: Any) -> Any:  # the streaming readers open the file
        if self == denied:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    monkeypatch.setattr(Path, "open", open_)


def test_unreadable_prompts_file_even_as_root(cli, fake, tmp_path, monkeypatch):
    path = write_prompts(tmp_path / "secret.jsonl", GOOD_PROMPTS)
    deny_reading(monkeypatch, path)
    assert_rejected(cli(prompts=path), fake, path, ("cannot read", "permission"))


def test_unreadable_constitution_even_as_root(cli, fake, constitution, monkeypatch):
    deny_reading(monkeypatch, constitution)
    assert_rejected(cli(constitution_path=constitution), fake, constitution, ("cannot read", "permission"))


def test_output_dir_not_writable_even_as_root(cli, fake, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == out else real(p, mode))
    assert_rejected(cli(out=out), fake, out, ("not writable",))


def test_output_dir_in_a_read_only_directory_even_as_root(cli, fake, tmp_path, monkeypatch):
    out = tmp_path / "locked" / "out"
    real = Path.mkdir

    def mkdir(self: Path, *args: object, **kwargs: object) -> None:
        if self == out:
            raise PermissionError(13, "Permission denied", str(self))
        real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "mkdir", mkdir)
    assert_rejected(cli(out=out), fake, out, ("cannot create", "permission"))


@pytest.mark.parametrize("splits", ["{'train/x': 0.5, 'test': 0.5}", "{'..': 1.0}"])
def test_split_names_cannot_leave_the_output_folder(cli, fake, splits):
    result = cli("--splits", splits)
    assert result.code == 2 and "cannot contain" in result.stderr and fake.work() == []
