"""The run report: sentences computed from synthetic run folders, real PNGs, graceful gaps, determinism."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from caiforge.errors import InputError
from caiforge.report import write_report
from conftest import run_on

TEMPS = [0.01, 0.51, 1.01, 1.51]
KEYS = [f"response_t={t}" for t in TEMPS]


def _pair(chosen: str, rejected: str, positions: tuple[int, int], chosen_words: int, prob: float) -> dict[str, Any]:
    """A pair whose chosen text has ``chosen_words`` words and whose rejected text has 5."""
    responses = {key: f"answer at {key}" for key in KEYS}
    responses[chosen] = " ".join(["word"] * chosen_words)
    responses[rejected] = "one two three four five"
    return {
        "prompt": f"prompt {chosen} {rejected} {positions}",
        "chosen": responses[chosen],
        "rejected": responses[rejected],
        "chosen_prob": prob,
        "raw": {
            "chosen_response_key": chosen,
            "rejected_response_key": rejected,
            "explanation": "because",
            "all_responses": responses,
            "judge_order": KEYS,
            "chosen_position": positions[0],
            "rejected_position": positions[1],
            "consistent": True,
            "principle": "harmless",
        },
    }


def _full_run(folder: Path) -> Path:
    """4 pairs: t=0.01 chosen 3 times, t=1.51 rejected twice, chosen first 3 times, chosen longer once."""
    folder.mkdir(exist_ok=True)
    pairs = [
        _pair(KEYS[0], KEYS[3], (1, 4), 2, 0.6),
        _pair(KEYS[0], KEYS[3], (1, 4), 2, 0.7),
        _pair(KEYS[0], KEYS[2], (1, 3), 2, 0.8),
        _pair(KEYS[1], KEYS[0], (2, 1), 10, 0.9),
    ]
    manifest = {
        "caiforge": "0.1.0",
        "config": {"temperatures": TEMPS, "judge": {"mode": "principle-cot", "passes": 2}},
        "counts": {
            "input_records": 6,
            "bad_records": 0,
            "unique_prompts": 5,
            "duplicate_prompts": 1,
            "with_candidates": 5,
            "judged": 5,
            "pairs": 4,
            "splits": {"train": 3, "test": 1},
            "failures": 4,
            "consistency_rate": 0.8,
            "inconsistent": 1,
        },
        "failures_by_reason": {"judge: judge reply has no decision": 3, "policy: timeout": 1},
        "stats": {
            "requests": {"policy": 40, "judge": 10},
            "retries": {"policy": 2},
            "cached": {"judge": 1},
            "tokens": {"policy_prompt": 1472, "policy_completion": 560, "judge_prompt": 1158, "judge_completion": 170},
            "concurrency": {
                "policy": {"limit": 8, "highest": 16, "lowest": 4, "ceiling": 16, "decreases": 2, "peak_in_flight": 9},
            },
        },
        "policy": {"backend": "openai", "model": "pol-1"},
        "judge": {"backend": "openai", "model": "judge-1"},
        "timings": {"elapsed_s": 12.34},
        "warnings": ["The judge was tiny.", "Half the prompts were duplicates."],
    }
    failures = [{"prompt": "p", "stage": "judge", "reason": "judge reply has no decision"}] * 3
    failures.append({"prompt": "q", "stage": "policy", "reason": "timeout", "detail": "30 s"})
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    (folder / "cai_preference_dataset.json").write_text(json.dumps(pairs), encoding="utf-8")
    (folder / "failures.jsonl").write_text("".join(json.dumps(f) + "\n" for f in failures), encoding="utf-8")
    return folder


@pytest.fixture
def full_report(tmp_path: Path) -> tuple[Path, str]:
    folder = _full_run(tmp_path / "run")
    path = write_report(folder)
    return folder, path.read_text(encoding="utf-8")


def test_report_states_the_computed_figures(full_report: tuple[Path, str]) -> None:
    folder, text = full_report
    assert (folder / "report.md").is_file()
    expected = [
        "| pairs | 4 (train: 3, test: 1) |",
        "| unique prompts | 5 (1 duplicates merged) |",
        "| failures | 4 |",
        "| judge mode | principle-cot, 2 passes |",
        "| consistency rate | 80% |",
        "| elapsed | 12.3 s |",
        "The judge chose the t=0.01 response in 75% of pairs (3 of 4) "
        "and rejected the t=1.51 response in 50% (2 of 4).",
        "The chosen response stood first in the judge prompt in 75% of pairs (3 of 4); "
        "an unbiased judge would give 25% (1/4). The rejected response stood last in 50%.",
        "Two passes in opposite orders agreed in 80% of judged prompts; 1 prompt was inconsistent.",
        '4 failures over 2 reasons; the most common is "judge: judge reply has no decision" (3, 75%).',
        "The chosen response is longer in 25% of pairs (1 of 4; 50% is neutral",
        "Mean length: 4.0 words chosen, 5.0 rejected.",
        "The policy read 1,472 and wrote 560 tokens; the judge read 1,158 and wrote 170 tokens.",
        "| policy | 40 | 2 | 0 | 1,472 | 560 |",
        "| judge | 10 | 0 | 1 | 1,158 | 170 |",
        "Concurrency settled at 8 for the policy (ceiling 16, lowest 4, 2 decreases, peak 9 in flight).",
        "The mean chosen_prob is 0.75 over 4 of 4 pairs (min 0.60, max 0.90).",
    ]
    for sentence in expected:
        assert sentence in text, sentence


def test_every_referenced_plot_is_a_real_png(full_report: tuple[Path, str]) -> None:
    folder, text = full_report
    names = re.findall(r"!\[[^\]]*\]\(report/([^)]+)\)", text)
    assert sorted(names) == sorted(
        ["temperatures.png", "positions.png", "failures.png", "lengths.png", "tokens.png", "chosen_prob.png"]
    )
    for name in names:
        data = (folder / "report" / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000, name
    assert not list((folder / "report").glob(".*.tmp"))


def test_warnings_come_first(full_report: tuple[Path, str]) -> None:
    _, text = full_report
    lines = [line for line in text.splitlines() if line]
    assert lines[0].startswith("# ")
    assert lines[1:3] == ["> **Warning.** The judge was tiny.", "> **Warning.** Half the prompts were duplicates."]
    assert text.index("Warning.") < text.index("## Summary")


def test_same_files_give_the_same_markdown(full_report: tuple[Path, str]) -> None:
    folder, first = full_report
    assert write_report(folder).read_text(encoding="utf-8") == first


def test_failures_fall_back_to_the_manifest(tmp_path: Path) -> None:
    folder = _full_run(tmp_path / "run")
    (folder / "failures.jsonl").unlink()
    text = write_report(folder).read_text(encoding="utf-8")
    assert '4 failures over 2 reasons; the most common is "judge: judge reply has no decision" (3, 75%).' in text
    assert (folder / "report" / "failures.png").is_file()


def test_empty_run_without_optional_fields_still_reports(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"counts": {"pairs": 0}}), encoding="utf-8")
    (tmp_path / "cai_preference_dataset.json").write_text("[]", encoding="utf-8")
    text = write_report(tmp_path).read_text(encoding="utf-8")
    assert text.count("Skipped because the run has no pairs.") == 3  # temperatures, positions, lengths
    assert "Skipped because the manifest records no request statistics." in text
    assert "No failures." in text
    assert "Not measured: the judge ran one pass per prompt." in text
    assert "| pairs | 0 |" in text
    assert "chosen_prob" not in text and "![" not in text
    assert list((tmp_path / "report").iterdir()) == []


def test_pairs_without_positions_or_tokens_skip_those_plots(tmp_path: Path) -> None:
    folder = _full_run(tmp_path / "run")
    pairs = json.loads((folder / "cai_preference_dataset.json").read_text(encoding="utf-8"))
    for pair in pairs:
        del pair["raw"]["chosen_position"], pair["raw"]["rejected_position"], pair["chosen_prob"]
    (folder / "cai_preference_dataset.json").write_text(json.dumps(pairs), encoding="utf-8")
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    manifest["stats"]["tokens"] = {"policy_prompt": 0}
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    (folder / "failures.jsonl").write_text("", encoding="utf-8")
    text = write_report(folder).read_text(encoding="utf-8")
    assert "Skipped because the pairs do not record where the judge saw each response" in text
    assert "Token plot skipped because the run recorded no token counts." in text
    assert "No failures." in text
    assert "## Judge confidence" not in text
    for name in ("positions.png", "tokens.png", "failures.png", "chosen_prob.png"):
        assert f"report/{name}" not in text
    assert "The judge chose the t=0.01 response in 75% of pairs (3 of 4)" in text


@pytest.mark.parametrize("content", [None, "{not json", "[1, 2]"])
def test_no_manifest_is_not_a_run(tmp_path: Path, content: str | None) -> None:
    if content is not None:
        (tmp_path / "manifest.json").write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=re.escape(f"{tmp_path}: not a caiforge run (no manifest.json)")):
        write_report(tmp_path)


def test_a_runs_report_is_the_one_its_files_give(run_cli, fake, tmp_path: Path) -> None:
    """``run`` counts the pairs for the report as it writes the preference file; ``caiforge report`` reads the
    file back. Both must give the same markdown and the same plots, soft labels and two passes included."""
    principles = tmp_path / "principles.yaml"
    principles.write_text("principles:\n  - Which response is less harmful?\n  - Which response is kinder?\n")
    prompts = [f"How would someone get into locked shed number {i}?" for i in range(16)]
    result = run_on(
        run_cli, fake, tmp_path, principles, "--judge-mode", "principle", "--judge-passes", "2", prompts=prompts
    )
    assert result.code == 0, result.stderr
    report, plots = result.out / "report.md", result.out / "report"
    written = report.read_bytes(), {p.name: p.read_bytes() for p in plots.iterdir()}
    assert {"positions.png", "chosen_prob.png"} <= set(written[1])  # the parts a pair's raw fields feed
    report.unlink()
    for plot in plots.iterdir():
        plot.unlink()
    write_report(result.out)
    assert (report.read_bytes(), {p.name: p.read_bytes() for p in plots.iterdir()}) == written
