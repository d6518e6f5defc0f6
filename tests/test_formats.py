"""Every trainer format, held to its reader's rules, and ``export`` writing them from the store alone.

NeMo-RL and NeMo-Aligner cannot be installed here, so their readers' rules are asserted directly (each test
names the upstream reader). ``datasets`` loads the JSONL and Parquet files as TRL's trainers would.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from caiforge.testing.fake_server import FakeConfig, FakeServer
from conftest import CONSTITUTION, server_flags, write_prompts

PROMPTS = [f"How would someone do harmful thing number {i}?" for i in range(12)]
ALL = "nemo-rm,nemo-dpo,nemo-rl,trl,trl-kto"
EOS, HEADER = "<extra_id_1>", "<extra_id_1>Assistant\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One run per judge mode with every format, against a fake server that is gone afterwards."""
    from caiforge.cli import main

    root = tmp_path_factory.mktemp("formats")
    prompts = write_prompts(root / "prompts.jsonl", PROMPTS)
    (root / "constitution.txt").write_text(CONSTITUTION, encoding="utf-8")
    out = {}
    with FakeServer(FakeConfig()) as server:
        for mode in ("whole", "principle"):
            constitution = ["--sys-prompt-constitution-file-path", str(root / "constitution.txt")] * (mode == "whole")
            args = ["--red-teaming-file-path", str(prompts), *constitution, *server_flags(server)]
            args += ["--judge-mode", mode, "--format", ALL, "--output-dir", str(root / mode), "--quiet"]
            assert main(args) == 0
            out[mode] = root / mode
    return out


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def splits(run: Path, folder: str) -> list[Path]:
    return sorted((run / folder).glob("*.jsonl"))


def test_nemo_rl_rows_have_two_ranked_completions_and_no_task_name(runs):
    """nemo_rl/data/datasets/preference_datasets/preference_dataset.py and nemo_rl/data/processors.py:
    preference_preprocessor: "context" messages, exactly two completions with distinct ranks (0 is preferred);
    the reader adds task_name itself and fails on a file that has one."""
    pairs = {p["prompt"]: p for p in json.loads((runs["whole"] / "cai_preference_dataset.json").read_text())}
    seen = 0
    for path in splits(runs["whole"], "nemo-rl"):
        for row in rows(path):
            assert set(row) == {"context", "completions"}
            assert [m["role"] for m in row["context"]] == ["user"]
            assert all(set(m) == {"role", "content"} for m in row["context"])
            ranks = sorted(c["rank"] for c in row["completions"])
            assert ranks == [0, 1]
            best = next(c for c in row["completions"] if c["rank"] == 0)["completion"]
            assert best == [{"role": "assistant", "content": pairs[row["context"][0]["content"]]["chosen"]}]
            seen += 1
    assert seen == len(PROMPTS)


def test_nemo_rm_files_have_an_even_line_count_with_chosen_first(runs):
    """nemo_aligner/data/nlp/datasets.py: RewardModelDataset reads comparison lines two at a time, chosen then
    rejected, and drops the last line of an odd file."""
    for split in ("train", "test"):
        prompts = rows(runs["whole"] / f"cai_rlaif_{split}_prompts_with_chat_prompt.jsonl")
        comparisons = rows(runs["whole"] / f"cai_rlaif_{split}_comparisons_with_chat_prompt.jsonl")
        assert len(comparisons) == 2 * len(prompts) and len(comparisons) % 2 == 0
        dpo = rows(runs["whole"] / "nemo-dpo" / f"{split}.jsonl")
        for prompt, chosen, rejected, row in zip(prompts, comparisons[::2], comparisons[1::2], dpo, strict=True):
            assert chosen["text"] == row["prompt"] + row["chosen_response"] and prompt["text"] == row["prompt"]
            assert rejected["text"] == row["prompt"] + row["rejected_response"]


def test_nemo_dpo_prompt_is_a_prefix_that_no_token_can_straddle(runs):
    """nemo_aligner/data/nlp/datasets.py: DPOModelDataset tokenizes prompt and prompt + response and requires the
    first to be a prefix of the second; the prompt ends with the assistant header's newline and each response
    starts with a non-space and ends with the end-of-turn marker, so no token merges across the boundary."""
    for path in splits(runs["whole"], "nemo-dpo"):
        for row in rows(path):
            assert set(row) == {"prompt", "chosen_response", "rejected_response"}
            assert row["prompt"].endswith(HEADER)
            for key in ("chosen_response", "rejected_response"):
                assert row[key].endswith(EOS) and row[key][:1].strip(), row[key]


@pytest.mark.parametrize("mode", ["whole", "principle"])
def test_trl_columns_have_one_type_in_every_row(runs, mode):
    """TRL and ``datasets`` decide a column's type from its rows: every column is in every row with one type."""
    expected = {
        "prompt_id": str,
        "chosen_temperature": float,
        "rejected_temperature": float,
        "explanation": str,
        "judge_mode": str,
    }
    if mode == "principle":
        expected["chosen_prob"] = float  # soft labels only where the mode gives them
    for folder, text in (("trl", True), ("trl-conversational", False)):
        found = [row for path in splits(runs[mode], folder) for row in rows(path)]
        assert len(found) == len(PROMPTS)
        for row in found:
            assert set(row) == {"prompt", "chosen", "rejected", *expected}
            for key, kind in expected.items():
                assert type(row[key]) is kind, (folder, key, row[key])
            if text:
                assert all(isinstance(row[k], str) for k in ("prompt", "chosen", "rejected"))
            else:
                assert [m["role"] for m in row["prompt"]] == ["user"]
                assert [m["role"] for m in row["chosen"]] == [m["role"] for m in row["rejected"]] == ["assistant"]
                assert all(set(m) == {"role", "content"} for k in ("prompt", "chosen", "rejected") for m in row[k])
            assert row["judge_mode"] == mode


def test_kto_has_a_desirable_and_an_undesirable_row_per_pair(runs):
    standard = {r["prompt_id"]: r for p in splits(runs["whole"], "trl") for r in rows(p)}
    kto = [r for p in splits(runs["whole"], "trl-kto") for r in rows(p)]
    assert len(kto) == 2 * len(standard)
    for good, bad in zip(kto[::2], kto[1::2], strict=True):
        assert good["prompt_id"] == bad["prompt_id"] and (good["label"], bad["label"]) == (True, False)
        pair = standard[good["prompt_id"]]
        assert (good["completion"], bad["completion"]) == (pair["chosen"], pair["rejected"])


def test_datasets_loads_the_jsonl_and_parquet_with_the_types_trl_expects(runs, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    for kind in ("json", "parquet"):
        ext = "jsonl" if kind == "json" else "parquet"
        for folder in ("trl", "trl-conversational"):
            files = {s: str(runs["principle"] / folder / f"{s}.{ext}") for s in ("train", "test")}
            loaded = datasets.load_dataset(kind, data_files=files, cache_dir=str(tmp_path / "cache"))
            assert {s: len(loaded[s]) for s in files} == {"train": 10, "test": 2}
            features = loaded["train"].features
            if folder == "trl":
                assert all(features[k].dtype == "string" for k in ("prompt", "chosen", "rejected"))
            else:
                for k in ("prompt", "chosen", "rejected"):
                    message = features[k].feature if hasattr(features[k], "feature") else features[k][0]
                    assert {name: f.dtype for name, f in message.items()} == {"role": "string", "content": "string"}
            assert features["chosen_prob"].dtype == "float64"
            assert features["chosen_temperature"].dtype == "float64"


def test_export_rewrites_every_format_byte_for_byte_from_the_store_alone(runs, tmp_path):
    """No server is running here: the store is all ``export`` reads."""
    from caiforge.cli import main

    for mode, run in runs.items():
        out = tmp_path / mode
        assert main(["export", str(run), "--format", ALL, "--output-dir", str(out)]) == 0
        written = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
        assert len(written) == 4 + 2 + 2 + 8 + 4  # nemo-rm, nemo-dpo, nemo-rl, trl (2 flavours x 2 files), kto
        for rel in written:
            assert (out / rel).read_bytes() == (run / rel).read_bytes(), rel


def test_export_of_an_unfinished_run_writes_what_is_finished_and_says_what_is_missing(runs, tmp_path, capsys):
    from caiforge.cli import main

    run = tmp_path / "partial"
    shutil.copytree(runs["whole"], run)
    db = sqlite3.connect(run / "caiforge.db")
    with db:
        db.execute("DELETE FROM results WHERE prompt_id IN (SELECT id FROM prompts WHERE position < 3)")
    db.close()
    assert main(["export", str(run), "--format", "trl", "--output-dir", str(tmp_path / "x")]) == 0
    err = capsys.readouterr().err
    assert "3 of 12 prompts have no outcome yet" in err
    assert sum(len(rows(p)) for p in splits(tmp_path / "x", "trl")) == 9


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "csv"], "unknown format 'csv'"),
        (["--format", "trl"], "not a caiforge run (no caiforge.db)"),
    ],
)
def test_export_errors_are_one_line(tmp_path, capsys, args, message):
    from caiforge.cli import main

    assert main(["export", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_the_config_knows_exactly_the_registered_formats():
    from caiforge.config import FORMAT_NAMES
    from caiforge.formats import FORMATS

    assert tuple(FORMATS) == FORMAT_NAMES


def test_the_run_folder_is_a_dataset_its_card_describes(runs, tmp_path, monkeypatch):
    """The card's YAML configs make ``load_dataset(RUN_DIR, name)`` work on the folder as it is (and the Hub
    viewer, once uploaded)."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    card = (runs["whole"] / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\nconfigs:\n")
    for name, columns in (("trl", {"prompt", "chosen", "rejected"}), ("nemo-rl", {"context", "completions"})):
        loaded = datasets.load_dataset(str(runs["whole"]), name, cache_dir=str(tmp_path / "cache"))
        assert list(loaded) == ["train", "test"]
        assert {s: len(loaded[s]) for s in loaded} == {"train": 10, "test": 2}
        assert columns <= set(loaded["train"].column_names)
    assert "model.data.data_prefix={train:[cai_rlaif_train_comparisons_with_chat_prompt.jsonl]" in card


def tiny_tokenizer():
    """A tokenizer built in code (no hub): word-level over a small vocabulary, with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["hello world"], trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "<eos>"]))
    template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>", chat_template=template
    )


def test_trl_reads_both_flavours_with_its_own_data_utils(runs):
    """trl/data_utils.py: is_conversational, maybe_extract_prompt, maybe_apply_chat_template and
    unpair_preference_dataset, as TRL's trainers call them on a dataset."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl.data_utils import (
        is_conversational,
        maybe_apply_chat_template,
        maybe_extract_prompt,
        unpair_preference_dataset,
    )

    standard = rows(runs["principle"] / "trl" / "train.jsonl")
    conversational = rows(runs["principle"] / "trl-conversational" / "train.jsonl")
    tokenizer = tiny_tokenizer()
    for text, chat in zip(standard, conversational, strict=True):
        assert not is_conversational(text) and is_conversational(chat)
        assert maybe_extract_prompt(text) == text  # the prompt is explicit: nothing to extract
        assert maybe_extract_prompt(chat)["prompt"] == chat["prompt"]
        assert maybe_apply_chat_template(text, tokenizer) == text  # standard text is left as it is
        applied = maybe_apply_chat_template(chat, tokenizer)
        assert applied["prompt"] == f"<|user|>{text['prompt']}<eos><|assistant|>"
        assert applied["chosen"] == f"{text['chosen']}<eos>" and applied["rejected"] == f"{text['rejected']}<eos>"
    unpaired = unpair_preference_dataset(Dataset.from_list(standard))
    kto = rows(runs["principle"] / "trl-kto" / "train.jsonl")
    assert len(unpaired) == len(kto) == 2 * len(standard)
    theirs = sorted((r["prompt"], r["completion"], r["label"]) for r in unpaired)
    ours = sorted((r["prompt"], r["completion"], r["label"]) for r in kto)
    assert theirs == ours


def test_blend_writes_the_seeds_blend_files_from_a_finished_run_with_no_model(tmp_path):
    """The golden case ran with --blend-with under 0.1; a run without it, then ``caiforge blend``, gives the
    same bytes, with the server gone before the blend."""
    from caiforge.cli import main
    from test_golden import CASES, GOLDEN, case_args, write_inputs

    inputs = write_inputs(tmp_path / "in")
    name = "completions-whole-2pass-blend"
    flags = CASES[name]
    at = flags.index("--blend-with")
    CASES["no-blend"] = flags[:at] + flags[at + 2 :]
    try:
        with FakeServer(FakeConfig()) as server:
            assert main(case_args("no-blend", server, inputs, tmp_path / "run")) == 0
    finally:
        del CASES["no-blend"]
    assert not list((tmp_path / "run").glob("blend_*"))
    assert main(["blend", str(tmp_path / "run"), "--blend-with", str(inputs["blend"])]) == 0
    written = sorted(p.name for p in (tmp_path / "run").glob("blend_*"))
    expected = sorted(p.name for p in (GOLDEN / name).glob("blend_*"))
    assert written == expected and len(written) == 6
    for file in written:
        ours = (tmp_path / "run" / file).read_text(encoding="utf-8")
        assert ours == (GOLDEN / name / file).read_text(encoding="utf-8"), file
        lines = ours.splitlines()
        if "comparisons" in file:  # every chosen/rejected pair stays together: an even count, ours in order
            assert len(lines) % 2 == 0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "c"}\n', "comparisons file has 1 lines; it must alternate chosen/rejected"),
        ("", "comparisons file is empty"),
        ('{"text": "c"}\n{"txt": "r"}\n', ":2: blend comparisons line must be an object with a string 'text' field"),
    ],
)
def test_blend_refuses_bad_outside_files_in_one_line(runs, tmp_path, capsys, content, message):
    from caiforge.cli import main

    good = tmp_path / "p.jsonl"
    good.write_text('{"text": "p"}\n', encoding="utf-8")
    bad = tmp_path / "c.jsonl"
    bad.write_text(content, encoding="utf-8")
    spec = {"name": "x", **{s: {"prompts": [str(good)], "comparisons": [str(bad)]} for s in ("train", "test")}}
    assert main(["blend", str(runs["whole"]), "--blend-with", repr(spec), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and str(bad) in err and err.count("\n") == 1
