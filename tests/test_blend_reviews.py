"""Human reviews (the viewer's flag and swap) in ``caiforge blend``: a run source leaves its flagged pairs out and
gives its swapped ones swapped, and the blend's manifest and card count them as ``export`` does."""

from __future__ import annotations

import json
from pathlib import Path

from caiforge.cli import main
from caiforge.records import RunDescriptor
from caiforge.store import Store
from conftest import run_on

PROMPTS = [f"Blend review prompt {i}: how do I do a bad thing?" for i in range(10)]


def review(run: Path, actions: dict[str, str]) -> None:
    """Reviews by prompt text, written as the viewer writes them."""
    ids = {row["prompt"]: row["prompt_id"] for rows in trl_rows(run).values() for row in rows.values()}
    store = Store(run / "caiforge.db")
    try:
        descriptor = RunDescriptor.load(store)
        assert descriptor is not None
        for prompt, action in actions.items():
            store.set_review(descriptor.key(), ids[prompt], action, note="checked by hand")
    finally:
        store.close()


def trl_rows(folder: Path) -> dict[str, dict[str, dict]]:
    """Each split's TRL rows by prompt text (a blend's rows and a run's share it)."""
    return {
        split: {
            row["prompt"]: row for row in map(json.loads, (folder / "trl" / f"{split}.jsonl").read_text().splitlines())
        }
        for split in ("train", "test")
    }


def blend(out: Path, *sources: str) -> tuple[dict, dict[str, dict[str, dict]], str]:
    """``caiforge blend`` of ``sources`` into ``out``: its manifest, TRL rows and card."""
    assert main(["blend", *sources, "--format", "trl,nemo-rm", "--seed", "5", "--output-dir", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    return manifest, trl_rows(out), (out / "README.md").read_text(encoding="utf-8")


def outside_file(path: Path) -> Path:
    rows = [{"prompt": f"outside question {i}", "chosen": f"safe {i}", "rejected": f"unsafe {i}"} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def every_prompt(rows: dict[str, dict[str, dict]]) -> dict[str, dict]:
    merged = {prompt: row for split in rows.values() for prompt, row in split.items()}
    assert len(merged) == sum(len(split) for split in rows.values())  # no prompt in two splits
    return merged


def test_blend_leaves_flagged_pairs_out_writes_swapped_ones_swapped_and_counts_both(
    run_cli, fake, tmp_path, constitution
):
    run = run_on(run_cli, fake, tmp_path, constitution, prompts=PROMPTS)
    assert run.code == 0, run.stderr
    outside = str(outside_file(tmp_path / "outside.jsonl"))
    manifest, rows, card = blend(tmp_path / "before", str(run.out), "--source", outside)
    # no reviews: no reviews field anywhere, as in the run's own manifest, and no row in the card
    assert "reviews" not in manifest and "reviews" not in run.json("manifest.json")
    assert all("reviews" not in s for s in manifest["blend"]["sources"])
    assert "human reviews" not in card
    before = every_prompt(rows)
    assert set(before) == set(PROMPTS) | {f"outside question {i}" for i in range(4)}

    train = sorted(trl_rows(run.out)["train"])
    flagged, swapped = train[0], train[1]
    review(run.out, {flagged: "flag", swapped: "swap"})
    manifest, rows, card = blend(tmp_path / "after", str(run.out), "--source", outside)
    after = every_prompt(rows)
    assert flagged not in after and set(after) == set(before) - {flagged}  # absent from every split
    old, new = before[swapped], after[swapped]
    assert (new["chosen"], new["rejected"]) == (old["rejected"], old["chosen"])
    assert all(after[p] == before[p] for p in set(after) - {swapped})
    comparisons = [
        json.loads(line)["text"]
        for split in ("train", "test")
        for line in (tmp_path / "after" / f"cai_rlaif_{split}_comparisons_with_chat_prompt.jsonl")
        .read_text(encoding="utf-8")
        .splitlines()
    ]
    assert len(comparisons) == 2 * len(after)
    assert not any(flagged in text for text in comparisons)

    assert manifest["reviews"] == {"flagged": 1, "swapped": 1}
    sources = {Path(s["path"]).name: s for s in manifest["blend"]["sources"]}
    assert sources[run.out.name]["reviews"] == {"flagged": 1, "swapped": 1}
    assert sources[run.out.name]["rows"] == len(PROMPTS) - 1
    assert "reviews" not in sources["outside.jsonl"]
    assert manifest["counts"]["pairs"] == len(after)
    assert "| human reviews | 1 pairs flagged and left out, 1 swapped" in card


def test_a_swap_counts_only_when_the_blend_takes_the_pair(run_cli, fake, tmp_path, constitution):
    """A sampled run source: a swapped pair the sample left out is not in the files, so it is not counted."""
    run = run_on(run_cli, fake, tmp_path, constitution, prompts=PROMPTS)
    assert run.code == 0, run.stderr
    source = f"{run.out}:4"
    manifest, rows, _ = blend(tmp_path / "before", "--source", source)
    assert "reviews" not in manifest
    taken = set(every_prompt(rows))
    assert len(taken) == 4
    left = sorted(set(PROMPTS) - taken)
    review(run.out, {sorted(taken)[0]: "swap", left[0]: "swap"})
    manifest, rows, card = blend(tmp_path / "after", "--source", source)
    assert set(every_prompt(rows)) == taken  # the same sample: no pair was flagged
    assert manifest["reviews"] == {"flagged": 0, "swapped": 1}
    assert manifest["blend"]["sources"][0]["reviews"] == {"flagged": 0, "swapped": 1}
    assert "| human reviews | 0 pairs flagged and left out, 1 swapped" in card
