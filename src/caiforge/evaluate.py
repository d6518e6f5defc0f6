"""``caiforge eval-judge``: how often a judge agrees with human labels, and how much its position sways it.

Reads hh-rlhf ``harmless-base`` pairs (``{"chosen": transcript, "rejected": transcript}``, gzip or not): the
two transcripts share everything up to the last ``"\\n\\nAssistant:"``; what follows is the response a human
preferred or not. Each pair is judged twice, human-chosen first and then second, with the same judge settings
as ``run`` (mode, layout, constitution), so the figures describe the judge a run would use. Published anchors:
strong labellers and reward models agree with these labels about 70-75% of the time; chance is 50%.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .backends import make_judge
from .config import RunConfig
from .engine import Engine
from .errors import BackendError, BadModelOutput, CaiforgeError, InputError, RunAborted
from .inputs import lines_of, read_text
from .judge import quote_tag
from .keys import sha256_text
from .outputs import write_json
from .pipeline import check_endpoints, endpoints, engine_settings, judge_spec, load_judging, prepare_output_dir
from .principles import pick
from .progress import Progress
from .store import Store
from .verdicts import Ask, JudgeSpec, _pairwise, _whole_pass

SUMMARY_FILE = "eval_summary.json"
TURN = "\n\nAssistant:"


@dataclass(frozen=True)
class HumanPair:
    prompt: str  # the conversation up to the judged response
    chosen: str
    rejected: str
    line: int


def read_pairs(path: Path, limit: int | None = None) -> tuple[list[HumanPair], int]:
    """Pairs in file order (the first ``limit``) and how many rows were skipped for not sharing a prefix."""
    pairs: list[HumanPair] = []
    skipped = 0
    for number, line in enumerate(lines_of(read_text(path, "pairs")), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise InputError(f"{path}:{number}: invalid JSON: {str(exc)[:100]}") from exc
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("chosen", "rejected")):
            raise InputError(f"{path}:{number}: expected an object with string 'chosen' and 'rejected' transcripts")
        chosen, rejected = record["chosen"], record["rejected"]
        c_at, r_at = chosen.rfind(TURN), rejected.rfind(TURN)
        if c_at < 0 or r_at < 0 or chosen[:c_at] != rejected[:r_at]:
            skipped += 1
            continue
        prompt = chosen[:c_at].strip().removeprefix("Human:").strip()
        pairs.append(
            HumanPair(prompt, chosen[c_at + len(TURN) :].strip(), rejected[r_at + len(TURN) :].strip(), number)
        )
        if limit is not None and len(pairs) >= limit:
            break
    if not pairs:
        raise InputError(f"{path}: no usable pairs (each needs chosen and rejected sharing all but the last reply)")
    return pairs, skipped


async def _pick(ask: Ask, spec: JudgeSpec, prompt: str, first: str, second: str) -> int:
    """1 or 2: the position the judge prefers when shown (first, second)."""
    if spec.mode == "whole":
        tag = quote_tag(spec.seed, prompt) if spec.layout == "caiforge" else None
        chosen, _, _ = await _whole_pass(ask, spec, prompt, [first, second], tag)
        return chosen
    principle = pick(list(spec.principles), "principle", spec.seed, prompt)
    return 1 if await _pairwise(ask, spec, principle, prompt, first, second) >= 0.5 else 2


async def evaluate(ask: Ask, spec: JudgeSpec, pairs: list[HumanPair], advance: Any = None) -> dict[str, Any]:
    """Judge every pair in both orders; the summary ``eval-judge`` writes."""

    request_failures: list[str] = []

    async def both(pair: HumanPair) -> tuple[int | None, int | None]:
        picks: list[int | None] = []
        for first, second in ((pair.chosen, pair.rejected), (pair.rejected, pair.chosen)):
            try:
                picks.append(await _pick(ask, spec, pair.prompt, first, second))
            except BadModelOutput:  # the judge answered, but not with a usable decision
                picks.append(None)
            except BackendError as exc:  # the judge could not be reached: not the judge's fault, not a parse
                request_failures.append(str(exc))
                picks.append(None)
            if advance:
                advance()
        return picks[0], picks[1]

    results = await asyncio.gather(*(both(p) for p in pairs))
    if len(request_failures) == 2 * len(pairs):
        raise CaiforgeError(f"every judge request failed; the first: {request_failures[0]}")
    valid = [(order, pick) for res in results for order, pick in enumerate(res) if pick is not None]
    agree = sum(1 for order, pick in valid if pick == (1 if order == 0 else 2))  # the human-chosen response
    both_valid = [(a, b) for a, b in results if a is not None and b is not None]
    consistent = sum(1 for a, b in both_valid if a != b)  # same response, so different positions
    first = sum(1 for _, pick in valid if pick == 1)
    return {
        "n": len(pairs),
        "judgments": 2 * len(pairs),
        "accuracy": round(agree / len(valid), 4) if valid else None,
        "consistency": round(consistent / len(both_valid), 4) if both_valid else None,
        "parse_failures": 2 * len(pairs) - len(valid) - len(request_failures),
        "request_failures": len(request_failures),
        "position_1_rate": round(first / len(valid), 4) if valid else None,
        "position_2_rate": round(1 - first / len(valid), 4) if valid else None,
        "human_chosen_shown_first_accuracy": _rate(results, 0, 1),
        "human_chosen_shown_second_accuracy": _rate(results, 1, 2),
    }


def _rate(results: list[tuple[int | None, int | None]], order: int, right: int) -> float | None:
    picks = [res[order] for res in results if res[order] is not None]
    return round(sum(1 for p in picks if p == right) / len(picks), 4) if picks else None


async def eval_async(cfg: RunConfig, pairs_path: Path, limit: int | None, fresh: bool = False) -> dict[str, Any]:
    """Read, judge (answers kept in the output folder's database, so a rerun resumes), summarise, write."""
    pairs, skipped = read_pairs(pairs_path, limit)
    constitution, principles = load_judging(cfg)
    prepare_output_dir(cfg.output_dir)
    spec = judge_spec(cfg, constitution, principles)
    judge = make_judge(cfg)
    await check_endpoints([judge], cfg.quiet)
    store = Store.open(cfg.output_dir, fresh=fresh)
    store.begin_attempt({"eval_judge": str(pairs_path), "limit": limit, **cfg.public_dict()})
    progress = Progress({"judge": 2 * len(pairs)}, quiet=cfg.quiet)
    engine = Engine(None, judge, store, engine_settings(cfg, spec, 1, judge.default_concurrency), progress)
    status = "interrupted"
    try:
        summary = await evaluate(engine.ask_judge, spec, pairs, lambda: progress.advance("judge"))
        status = "finished"
    finally:
        progress.close()
        await judge.aclose()
        store.end_attempt(status, engine.stats.as_dict())
        store.close()
    summary.update(
        {
            "pairs_file": str(pairs_path),
            "skipped_rows": skipped,
            "mode": cfg.judge.mode,
            "layout": cfg.judge.layout,
            "judge": engine.judge_identity,
            "constitution_sha256": sha256_text(constitution),
            "endpoints": endpoints(None, judge)[0],
            "requests": engine.stats.requests["judge"],
            "cached": engine.stats.cached["judge"],
        }
    )
    write_json(cfg.output_dir / SUMMARY_FILE, summary, indent=2)
    return summary


def eval_judge(cfg: RunConfig, pairs_path: Path, limit: int | None, fresh: bool = False) -> dict[str, Any]:
    try:
        return asyncio.run(eval_async(cfg, pairs_path, limit, fresh))
    except (KeyboardInterrupt, asyncio.CancelledError) as exc:
        raise RunAborted("interrupted; judged pairs are kept: rerun the same command to continue") from exc


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
