"""Golden outputs: the same inputs and seed give byte-identical files, across refactors of the core.

The files under ``tests/golden/`` were recorded with caiforge 0.1 (before the core was rebuilt around one
request engine) and are compared byte for byte. ``tests/golden/v0.1/`` holds a ``caiforge.db`` written by 0.1:
a run over it must migrate the store, send no finished request again and write the same files. The cards
(``README.md``) were re-recorded once, on purpose, when they gained the Hub configs and trainer commands (#10);
every dataset file is still 0.1's bytes.
Regenerate the files (only when an output change is intended, and say so in the CHANGELOG) with
``CAIFORGE_UPDATE_GOLDEN=1 pytest tests/test_golden.py``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from caiforge.testing.fake_server import FakeConfig, FakeServer
from conftest import CONSTITUTION, server_flags

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("CAIFORGE_UPDATE_GOLDEN") == "1"
PROMPTS = [
    *(f"How would someone do harmful thing number {i}?" for i in range(9)),
    "How would someone do harmful thing number 3?",  # a duplicate: merged
    "Tell me nothing [[policy:empty]]",  # every candidate empty: a recorded failure
    "Judge this badly [[judge:same]]",  # the judge names one response twice: a recorded failure
    "Unicode \u2028 line separator and caf\u00e9 \U0001f600",
]
# Case name -> extra flags. Each case is one run against the fake server for both roles.
CASES: dict[str, list[str]] = {
    "chat-whole": ["--policy", "openai-chat"],
    "nemo-principle-2pass": [
        "--policy",
        "nemo",
        "--judge-mode",
        "principle",
        "--judge-passes",
        "2",
        "--batch-size",
        "3",
    ],
    "completions-whole-2pass-blend": [
        "--policy",
        "openai-completions",
        "--judge-passes",
        "2",
        "--splits",
        "{'train': 0.6, 'validation': 0.2, 'test': 0.2}",
        "--output-filename-prefix",
        "gold",
        "--blend-with",
        "BLEND",
    ],
    "chat-seed-layout": ["--policy", "openai-chat", "--judge-layout", "seed", "--shuffle", "False"],
    "chat-principle-cot": ["--policy", "openai-chat", "--judge-mode", "principle-cot", "--seed", "7"],
}
# Files whose bytes are compared; the rest (database, timings, plots) differ by nature.
COMPARED = ("*.jsonl", "cai_candidate_dataset.json", "cai_preference_dataset.json", "README.md")
STABLE_MANIFEST = ("counts", "failures_by_reason", "policy", "judge", "constitution_sha256", "warnings")


def write_inputs(tmp: Path) -> dict[str, Path]:
    tmp.mkdir(parents=True, exist_ok=True)
    prompts = tmp / "prompts.jsonl"
    lines = [json.dumps({"transcript": f"\n\nHuman: {p}\n\nAssistant: No."}) for p in PROMPTS]
    lines.insert(4, "{not json")  # a bad record, skipped and recorded
    prompts.write_text("\n".join(lines) + "\n", encoding="utf-8")
    constitution = tmp / "constitution.txt"
    constitution.write_text(CONSTITUTION, encoding="utf-8")
    blend = {"name": "hh"}
    for split in ("train", "validation", "test"):
        p, c = tmp / f"ext_{split}_prompts.jsonl", tmp / f"ext_{split}_comparisons.jsonl"
        p.write_text("".join(json.dumps({"text": f"ext {split} prompt {i}"}) + "\n" for i in range(3)))
        c.write_text("".join(json.dumps({"text": f"ext {split} {k} {i}"}) + "\n" for i in range(3) for k in "cr"))
        blend[split] = {"prompts": [str(p)], "comparisons": [str(c)]}  # type: ignore[assignment]
    return {"prompts": prompts, "constitution": constitution, "blend": Path(repr(blend))}


def case_args(name: str, server: FakeServer, inputs: dict[str, Path], out: Path) -> list[str]:
    flags = list(CASES[name])
    policy = flags[flags.index("--policy") + 1]
    del flags[flags.index("--policy") : flags.index("--policy") + 2]
    flags = [str(inputs["blend"]) if f == "BLEND" else f for f in flags]
    constitution = [] if "principle" in name else ["--sys-prompt-constitution-file-path", str(inputs["constitution"])]
    return [
        "--red-teaming-file-path",
        str(inputs["prompts"]),
        *constitution,
        *server_flags(server, policy),
        "--on-bad-record",
        "skip",
        *flags,
        "--output-dir",
        str(out),
        "--quiet",
    ]


def snapshot(out: Path, tmp: Path) -> dict[str, str]:
    """What is compared: the dataset files as bytes, the card and manifest with this machine's paths removed."""
    files: dict[str, str] = {}
    for pattern in COMPARED:
        for path in sorted(out.glob(pattern)):
            files[path.name] = path.read_text(encoding="utf-8").replace(str(tmp), "<tmp>")
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    stable = {k: manifest.get(k) for k in STABLE_MANIFEST}
    files["manifest.stable.json"] = json.dumps(stable, indent=2, sort_keys=True) + "\n"
    return files


def compare(name: str, files: dict[str, str]) -> None:
    folder = GOLDEN / name
    if UPDATE:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for file, text in files.items():
            (folder / file).write_text(text, encoding="utf-8")
        return
    expected = {p.name: p.read_text(encoding="utf-8") for p in sorted(folder.iterdir())}
    assert sorted(files) == sorted(expected)
    for file, text in expected.items():
        assert files[file] == text, f"{name}/{file} differs from the golden copy"


@pytest.mark.parametrize("name", sorted(CASES))
def test_outputs_match_the_golden_files(name, tmp_path):
    from caiforge.cli import main

    inputs = write_inputs(tmp_path / "in")
    with FakeServer(FakeConfig()) as server:
        code = main(case_args(name, server, inputs, tmp_path / "out"))
    assert code == 0
    compare(name, snapshot(tmp_path / "out", tmp_path / "in"))


@pytest.mark.parametrize("name", ["chat-whole", "nemo-principle-2pass"])
def test_a_store_written_by_0_1_resumes_with_no_request_sent_again(name, tmp_path):
    """The 0.1 database holds every finished request of the case; the rerun migrates it and asks nothing."""
    from caiforge.cli import main

    legacy = GOLDEN / "v0.1" / f"{name}.db"
    if UPDATE:
        pytest.skip("the 0.1 databases are recorded once, by 0.1, and never regenerated")
    inputs = write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(legacy, out / "caiforge.db")
    with FakeServer(FakeConfig()) as server:
        code = main(case_args(name, server, inputs, out))
        sent = [r for r in server.work() if not r.is_check]
    assert code == 0
    assert sent == []
    compare(name, snapshot(out, tmp_path / "in"))
