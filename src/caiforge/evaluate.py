"""``caiforge eval-judge``: how often a judge agrees with human labels, and how much its position sways it.

Reads hh-rlhf ``harmless-base`` pairs (``{"chosen": transcript, "rejected": transcript}``, gzip or not): the
two transcripts share everything up to the last ``"\\n\\nAssistant:"``; what follows is the response a human
preferred or not. Each pair is judged twice, human-chosen first and then second, with the same judge settings
as ``run`` (mode, layout, constitution), so the figures describe the judge a run would use. Published anchors:
strong labellers and reward models agree with these labels about 70-75% of the time; chance is 50%.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import RunConfig
from .errors import CaiforgeError, InputError
from .inputs import json_lines
from .keys import sha256_text
from .outputs import write_json
from .pipeline import judge_spec, load_judging, prepare_output_dir
from .pipelines import evaljudge
from .pipelines.evaljudge import EvalJudge, HumanPair, Judged
from .runner import FailureRate, Outcome, run_each
from .session import Session, run_sync

SUMMARY_FILE = "eval_summary.json"
TURN = "\n\nAssistant:"


def read_pairs(path: Path, limit: int | None = None) -> tuple[list[HumanPair], int]:
    """Pairs in file order (the first ``limit``) and how many rows were skipped for not sharing a prefix."""
    pairs: list[HumanPair] = []
    skipped = 0
    for number, record in json_lines(path, "pairs"):
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("chosen", "rejected")):
            raise InputError(f"{path}:{number}: expected an object with string 'chosen' and 'rejected' transcripts")
        chosen, rejected = record["chosen"], record["rejected"]
        c_at, r_at = chosen.rfind(TURN), rejected.rfind(TURN)
        if c_at < 0 or r_at < 0 or chosen[:c_at] != rejected[:r_at]:
            skipped += 1
            continue
        prompt = chosen[:c_at].strip().removeprefix("Human:").strip()
        pairs.append(
            HumanPair(
                prompt=prompt,
                chosen=chosen[c_at + len(TURN) :].strip(),
                rejected=rejected[r_at + len(TURN) :].strip(),
                line=number,
            )
        )
        if limit is not None and len(pairs) >= limit:
            break
    if not pairs:
        raise InputError(f"{path}: no usable pairs (each needs chosen and rejected sharing all but the last reply)")
    return pairs, skipped


async def eval_async(cfg: RunConfig, pairs_path: Path, limit: int | None, fresh: bool = False) -> dict[str, Any]:
    """Read, judge (answers kept in the output folder's database, so a rerun resumes), summarise, write."""
    pairs, skipped = read_pairs(pairs_path, limit)
    constitution, principles = load_judging(cfg)
    prepare_output_dir(cfg.output_dir)
    spec = judge_spec(cfg, constitution, principles)
    attempt = {"eval_judge": str(pairs_path), "limit": limit, **cfg.public_dict()}
    async with Session(cfg, {role: role for role in evaljudge.ROLES}, attempt, fresh) as session:
        engine = session.engine
        session.show_progress({"judge": 2 * len(pairs)})
        pipeline = EvalJudge(spec, engine.asker("judge"), session.progress.advance)
        judged: list[Judged | None] = [None] * len(pairs)
        index = {id(pair): i for i, pair in enumerate(pairs)}

        def keep(outcome: Outcome[HumanPair, Judged]) -> None:
            judged[index[id(outcome.item)]] = outcome.record

        window = 2 * engine.endpoints()["judge"][1].concurrency
        await run_each(pairs, pipeline, keep, window=window, rate=FailureRate(1.0))
        results = [j for j in judged if j is not None]
        if sum(len(j.request_failures) for j in results) == 2 * len(pairs):
            first = next(f for j in results for f in j.request_failures)
            raise CaiforgeError(f"every judge request failed; the first: {first}")
        summary = evaljudge.summarise(results)
        summary.update(
            {
                "pairs_file": str(pairs_path),
                "skipped_rows": skipped,
                "mode": cfg.judge.mode,
                "layout": cfg.judge.layout,
                "judge": engine.identity("judge"),
                "constitution_sha256": sha256_text(constitution),
                "endpoints": session.adaptations()[0],
                "requests": engine.stats.requests["judge"],
                "cached": engine.stats.cached["judge"],
            }
        )
        write_json(cfg.output_dir / SUMMARY_FILE, summary, indent=2)
        session.finish()
    return summary


def eval_judge(cfg: RunConfig, pairs_path: Path, limit: int | None, fresh: bool = False) -> dict[str, Any]:
    return run_sync(lambda: eval_async(cfg, pairs_path, limit, fresh), cfg.output_dir, "judged pairs")


def table(summary: dict[str, Any]) -> str:
    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}%"

    rows = [
        ("pairs", str(summary["n"])),
        ("accuracy vs human labels", pct(summary["accuracy"])),
        ("consistency under swapped order", pct(summary["consistency"])),
        ("parse failures", f"{summary['parse_failures']} of {summary['judgments']}"),
        ("chose position 1 / 2", f"{pct(summary['position_1_rate'])} / {pct(summary['position_2_rate'])}"),
        (
            "accuracy, human-chosen shown 1st / 2nd",
            f"{pct(summary['human_chosen_shown_first_accuracy'])} / "
            f"{pct(summary['human_chosen_shown_second_accuracy'])}",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows) + "\n(anchors: chance 50%; strong judges 70-75%)"
