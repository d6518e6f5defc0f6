"""``caiforge blend`` over several sources: the invariants hold whatever the sources (no model, no server)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from caiforge.template import PromptTemplate
from caiforge.testing.fake_server import FakeConfig, FakeServer
from conftest import CONSTITUTION, server_flags, write_prompts

A = [f"How would someone do harmful thing number {i}?" for i in range(10)]
B = [f"How would someone do harmful thing number {i}?" for i in range(5, 15)]  # 5..9 are in both runs


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> list[Path]:
    from caiforge.cli import main

    root = tmp_path_factory.mktemp("blend")
    (root / "constitution.txt").write_text(CONSTITUTION, encoding="utf-8")
    out = []
    with FakeServer(FakeConfig()) as server:
        for name, prompts in (("a", A), ("b", B)):
            file = write_prompts(root / f"{name}.jsonl", prompts)
            args = ["--red-teaming-file-path", str(file), "--sys-prompt-constitution-file-path"]
            args += [str(root / "constitution.txt"), *server_flags(server), "--seed", str(len(out) + 7)]
            assert main([*args, "--output-dir", str(root / name), "--quiet"]) == 0
            out.append(root / name)
    return out


def trl_file(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def outside(n: int, tag: str) -> list[dict]:
    return [{"prompt": f"{tag} question {i}", "chosen": f"safe {i}", "rejected": f"unsafe {i}"} for i in range(n)]


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def blend(tmp_path: Path, two_runs: list[Path], out: str, *extra: str) -> tuple[int, Path]:
    from caiforge.cli import main

    test_file = trl_file(tmp_path / "test.jsonl", outside(4, "named"))
    loose = trl_file(tmp_path / "extra.jsonl", outside(10, "loose"))
    args = ["blend", *map(str, two_runs), "--source", str(test_file), "--source", f"{loose}:5"]
    code = main([*args, "--format", "nemo-rm,trl,trl-kto", "--output-dir", str(tmp_path / out), *extra])
    return code, tmp_path / out


def test_every_pair_is_counted_once_and_no_prompt_is_in_two_splits(two_runs, tmp_path):
    code, out = blend(tmp_path, two_runs, "mixed")
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    sources = {Path(s["path"]).name: s for s in manifest["blend"]["sources"]}
    assert {k: (s["rows"], s["taken"]) for k, s in sources.items()} == {
        "a": (10, 10),
        "b": (10, 10),
        "test.jsonl": (4, 4),
        "extra.jsonl": (10, 5),
    }
    rows = {split: lines(out / "trl" / f"{split}.jsonl") for split in ("train", "test")}
    assert manifest["counts"]["splits"] == {k: len(v) for k, v in rows.items()}
    assert manifest["counts"]["pairs"] == sum(s["taken"] for s in sources.values()) == 29
    assert {r["prompt"] for r in rows["test"]} >= {f"named question {i}" for i in range(4)}  # named by its file
    prompts = {split: {" ".join(r["prompt"].split()).lower() for r in v} for split, v in rows.items()}
    assert not prompts["train"] & prompts["test"]
    # the five prompts in both runs: each run put them somewhere; every copy now sits in one split
    shared = [p.lower() for p in A[5:]]
    for prompt in shared:
        where = [split for split, v in prompts.items() if prompt in v]
        assert len(where) == 1, prompt
    kto = [r for split in ("train", "test") for r in lines(out / "trl-kto" / f"{split}.jsonl")]
    assert len(kto) == 2 * 29 and {r["source"] for r in kto} == {"a", "b", "test.jsonl", "extra.jsonl"}


def test_leaks_are_moved_to_test_and_counted(two_runs, tmp_path):
    """Where the two runs split a shared prompt differently, every copy goes to test, and the count says so."""
    from caiforge.export import dataset_of, open_run
    from caiforge.records import records

    before = {}
    for run in two_runs:
        with open_run(run) as stored:
            data = dataset_of(stored.cfg, records(stored.store, stored.descriptor), blend=False)
        by_id = {p.prompt_id: p.prompt for p in data.pairs}
        for split, ids in data.assign_splits().items():
            for pid in ids:
                before.setdefault(by_id[pid].lower(), []).append(split)
    expected_moves = sum(sum(1 for s in splits if s != "test") for splits in before.values() if len(set(splits)) > 1)
    assert expected_moves > 0, "the fixture must produce a leak to test this"
    code, out = blend(tmp_path, two_runs, "leaks")
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["blend"]["leaks_moved"] == expected_moves
    test_prompts = {r["prompt"].lower() for r in lines(out / "trl" / "test.jsonl")}
    assert all(p in test_prompts for p, s in before.items() if len(set(s)) > 1)


def test_chosen_and_rejected_stay_adjacent_in_the_reward_model_files(two_runs, tmp_path):
    code, out = blend(tmp_path, two_runs, "adjacent")
    assert code == 0
    template = PromptTemplate()
    for split in ("train", "test"):
        comparisons = lines(out / f"cai_rlaif_{split}_comparisons_with_chat_prompt.jsonl")
        trl = lines(out / "trl" / f"{split}.jsonl")
        assert len(comparisons) == 2 * len(trl)
        for row, chosen, rejected in zip(trl, comparisons[::2], comparisons[1::2], strict=True):
            assert chosen["text"] == template.format_with_response(row["prompt"], row["chosen"])
            assert rejected["text"] == template.format_with_response(row["prompt"], row["rejected"])


def test_the_same_seed_gives_the_same_files_and_another_seed_another_order(two_runs, tmp_path):
    first = blend(tmp_path, two_runs, "one", "--seed", "3")[1]
    second = blend(tmp_path, two_runs, "two", "--seed", "3")[1]
    other = blend(tmp_path, two_runs, "three", "--seed", "4")[1]
    files = sorted(p.relative_to(first) for p in first.rglob("*.jsonl"))
    assert files and all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
    assert any((first / f).read_bytes() != (other / f).read_bytes() for f in files)


def test_a_folder_source_and_a_weight(two_runs, tmp_path):
    from caiforge.cli import main

    folder = tmp_path / "hh"
    folder.mkdir()
    trl_file(folder / "train.jsonl", outside(10, "folder train"))
    trl_file(folder / "test.jsonl", outside(2, "folder test"))
    out = tmp_path / "folder-out"
    assert main(["blend", "--source", f"{folder}:0.5", "--output-dir", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["blend"]["sources"][0]["taken"] == 6
    assert manifest["counts"]["pairs"] == 6
    assert (out / "README.md").read_text(encoding="utf-8").startswith("---\nconfigs:\n")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"prompt": "p", "chosen": "a"}\n', ":1: missing column rejected"),
        ('{"prompt": "p", "chosen": "a", "rejected": "a"}\n', ":1: chosen and rejected are the same text"),
        ("", "no rows (an empty file)"),
        (
            '{"prompt": "p", "chosen": "a", "rejected": "b"}\n'
            '{"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}\n',
            ":2: 'prompt' is messages here but not in earlier rows (mixed types)",
        ),
        ('{"prompt": "p", "chosen": 3, "rejected": "b"}\n', ":1: 'chosen' must be a string or a list of messages"),
    ],
)
def test_bad_outside_data_is_one_line_naming_file_and_row(tmp_path, capsys, content, message):
    from caiforge.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text(content, encoding="utf-8")
    assert main(["blend", "--source", str(bad), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and str(bad) in err and err.count("\n") == 1 and "Traceback" not in err


def test_asking_for_more_pairs_than_a_source_has_is_an_error(tmp_path, capsys):
    from caiforge.cli import main

    file = trl_file(tmp_path / "small.jsonl", outside(3, "small"))
    assert main(["blend", "--source", f"{file}:10", "--output-dir", str(tmp_path / "o")]) == 2
    assert "asked for 10 pairs, the source has 3" in capsys.readouterr().err


def test_the_seeds_nemo_files_are_read_back_as_pairs(two_runs, tmp_path):
    """--blend-with NeMo files in a blend of sources: prompt line i with comparison lines 2i and 2i+1; a run's
    own reward-model files give back exactly its pairs."""
    from caiforge.cli import main

    run = two_runs[0]
    spec = {"name": "own"}
    for split in ("train", "test"):
        files = [str(run / f"cai_rlaif_{split}_{kind}_with_chat_prompt.jsonl") for kind in ("prompts", "comparisons")]
        spec[split] = {"prompts": [files[0]], "comparisons": [files[1]]}
    out = tmp_path / "nemo"
    assert main(["blend", "--blend-with", repr(spec), "--format", "trl", "--output-dir", str(out)]) == 0
    for split in ("train", "test"):
        ours = sorted((r["prompt"], r["chosen"], r["rejected"]) for r in lines(out / "trl" / f"{split}.jsonl"))
        theirs = sorted((r["prompt"], r["chosen"], r["rejected"]) for r in lines(run / "trl" / f"{split}.jsonl"))
        assert ours == theirs and ours
