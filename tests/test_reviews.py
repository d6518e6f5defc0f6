"""Human reviews (the viewer's flag and swap) change the next export: flagged pairs left out, swapped ones
exchanged, no other pair moved to another split, both counted."""

from __future__ import annotations

import json

from caiforge.cli import main
from caiforge.records import RunDescriptor
from caiforge.store import Store
from conftest import run_on


def review(out, actions: dict[str, str]) -> None:
    store = Store(out / "caiforge.db")
    try:
        descriptor = RunDescriptor.load(store)
        assert descriptor is not None
        for prompt_id, action in actions.items():
            store.set_review(descriptor.key(), prompt_id, action, note="checked by hand")
    finally:
        store.close()


def trl_rows(folder) -> dict[str, dict[str, dict]]:
    return {
        split: {
            row["prompt_id"]: row
            for row in map(json.loads, (folder / "trl" / f"{split}.jsonl").read_text().splitlines())
        }
        for split in ("train", "test")
    }


def test_export_leaves_flagged_pairs_out_and_writes_swapped_ones_swapped(run_cli, fake, tmp_path, constitution, capsys):
    prompts = [f"Review prompt {i}: how do I do a bad thing?" for i in range(10)]
    result = run_on(run_cli, fake, tmp_path, constitution, "--judge-mode", "principle", prompts=prompts)
    assert result.code == 0, result.stderr
    before = trl_rows(result.out)
    train = sorted(before["train"])
    flagged, swapped = train[0], train[1]
    review(result.out, {flagged: "flag", swapped: "swap"})
    capsys.readouterr()
    assert main(["export", str(result.out), "--format", "trl,nemo-rl", "--output-dir", str(tmp_path / "x")]) == 0
    printed = capsys.readouterr().out
    assert "1 flagged pairs left out, 1 written swapped" in printed
    after = trl_rows(tmp_path / "x")
    assert set(after["train"]) == set(before["train"]) - {flagged}  # no other pair changed split
    assert set(after["test"]) == set(before["test"])
    old, new = before["train"][swapped], after["train"][swapped]
    assert (new["chosen"], new["rejected"]) == (old["rejected"], old["chosen"])
    assert (new["chosen_temperature"], new["rejected_temperature"]) == (
        old["rejected_temperature"], old["chosen_temperature"])  # fmt: skip
    assert abs(new["chosen_prob"] - (1 - old["chosen_prob"])) < 1e-6
    unchanged = set(after["train"]) - {swapped}
    assert all(after["train"][p] == before["train"][p] for p in unchanged)
    nemo_rl = [json.loads(line) for line in (tmp_path / "x" / "nemo-rl" / "train.jsonl").read_text().splitlines()]
    assert len(nemo_rl) == len(after["train"])


def test_a_cleared_review_restores_the_pair_and_a_rerun_counts_reviews_in_manifest_and_card(
    run_cli, fake, tmp_path, constitution
):
    prompts = [f"Review prompt {i}: how do I do a bad thing?" for i in range(6)]
    first = run_on(run_cli, fake, tmp_path, constitution, prompts=prompts)
    assert first.code == 0
    ids = sorted(trl_rows(first.out)["train"])
    review(first.out, {ids[0]: "flag"})
    again = run_on(run_cli, fake, tmp_path, constitution, prompts=prompts)  # resumes: nothing sent, files rewritten
    assert again.code == 0
    assert again.json("manifest.json")["reviews"] == {"flagged": 1, "swapped": 0}
    assert "1 pairs flagged and left out" in (again.out / "README.md").read_text()
    assert ids[0] not in trl_rows(again.out)["train"]
    review(first.out, {})
    store = Store(first.out / "caiforge.db")
    descriptor = RunDescriptor.load(store)
    assert descriptor is not None
    store.set_review(descriptor.key(), ids[0], None)
    store.close()
    assert main(["export", str(first.out), "--format", "trl"]) == 0
    assert ids[0] in trl_rows(first.out)["train"]
