"""``caiforge run``: read and check the inputs, run the RL-CAI pipeline over every prompt in one session, then
write the files, the manifest, the card and the report from the store.

This is the asynchronous entry point; :func:`run` is the synchronous wrapper for the CLI and for Python users
(``asyncio.run`` once, at the edge).
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

from . import __version__, backends, bundled
from .card import TOY_JUDGE_WARNING, dataset_card
from .config import RunConfig
from .engine import Stats
from .errors import InputError, RunAborted
from .export import options_of, write_outputs
from .inputs import BadRecord, PromptRecord, check_blend_files, iter_prompts, read_constitution
from .keys import sha256_text
from .manifest import Counts, Manifest, RunStats, Timings
from .outputs import FAILURES_FILE, write_atomic, write_streams
from .pipelines import rlcai
from .principles import load_principles
from .records import FailureRecord, PairRecord, RevisionRecord, RunDescriptor, prompt_id, records
from .report import PairTally, write_report
from .runner import Budget, FailureRate, Outcome, run_each
from .session import Session, run_sync
from .store import DB_NAME, Store
from .verdicts import Inconsistent, JudgeSpec
from .writers import check, failure_files


@dataclass
class RunResult:
    output_dir: Path
    counts: dict[str, Any]
    failures: list[FailureRecord]
    stats: Stats
    elapsed: float
    manifest: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # how endpoints were adapted to (fields dropped, ...)

    @property
    def pairs(self) -> int:
        return int(self.counts["pairs"])

    def summary(self) -> str:
        c, s = self.counts, self.stats
        lines = [
            f"caiforge: {c['pairs']} pairs from {c['unique_prompts']} unique prompts "
            f"({c['duplicate_prompts']} duplicates merged) in {self.elapsed:.1f}s",
            "  splits: " + ", ".join(f"{k} {v}" for k, v in c["splits"].items()),
        ]
        by_reason = Counter(f"{f.stage}: {f.reason}" for f in self.failures)
        if by_reason:
            detail = "; ".join(f"{reason} {n}" for reason, n in by_reason.most_common())
            lines.append(f"  failures: {len(self.failures)} ({detail}) -> {self.output_dir / FAILURES_FILE}")
        else:
            lines.append("  failures: 0")
        for role in rlcai.ROLES:
            conc = s.concurrency.get(role)
            settled = (
                f"; concurrency settled at {conc.get('limit', 0)} (lowest {conc.get('lowest', 0)}, ceiling "
                f"{conc.get('ceiling', 0)}, peak {conc.get('peak_in_flight', 0)} in flight)"
                if conc
                else ""
            )
            lines.append(
                f"  {role} requests: {s.requests[role]} sent, {s.retries[role]} retried, "
                f"{s.cached[role]} reused from {DB_NAME}{settled}"
            )
            endpoints = s.endpoints.get(role, [])
            if len(endpoints) > 1:
                for e in endpoints:
                    mean = e["mean_latency_ms"]
                    lines.append(
                        f"    {e['address']}: {e['requests']} sent, {e['errors']} errors, rested {e['rests']}x, "
                        f"mean latency {'-' if mean is None else f'{mean:.0f} ms'}"
                    )
            tin, tout = s.tokens[f"{role}_prompt"], s.tokens[f"{role}_completion"]
            if tin or tout:
                lines.append(f"  {role} tokens: {tin:,} in, {tout:,} out")
        if c.get("consistency_rate") is not None:
            lines.append(
                f"  consistency: two passes in opposite orders agreed on {100 * c['consistency_rate']:.1f}% "
                f"of judged prompts ({c['inconsistent']} inconsistent, recorded as failures)"
            )
        lines.append(f"  output: {self.output_dir}")
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  WARNING: {w}" for w in self.warnings]
        return "\n".join(lines)


def prepare_output_dir(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: output path exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{path}: cannot create output directory: {exc.strerror or exc}") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputError(f"{path}: output directory is not writable")


def versions() -> dict[str, str]:
    out = {"caiforge": __version__, "python": platform.python_version()}
    for dist in ("aiohttp", "pydantic", "tenacity"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


@dataclass(frozen=True, kw_only=True)
class Inputs:
    """What the inputs hold; the prompts themselves stream from the file into the store, never into a list."""

    path: Path
    records: int  # good records read, duplicates included
    bad: list[BadRecord]
    constitution: str
    principles: tuple[str, ...] = ()
    unique: int = 0  # once stored: prompts after duplicates are merged (by the hash of their text)

    def prompts(self, on_bad_record: str) -> Iterator[tuple[str, str]]:
        """(id, text) of every good record, duplicates included, read again from the file."""
        for record in iter_prompts(self.path, on_bad_record):
            if isinstance(record, PromptRecord):
                yield prompt_id(record.text), record.text


def load_judging(cfg: RunConfig) -> tuple[str, tuple[str, ...]]:
    """The constitution (bundled by default: instructions for ``whole``, principles for the paper's modes)."""
    principled = cfg.judge.mode != "whole"
    path = cfg.constitution_path or bundled.path(bundled.PRINCIPLES if principled else bundled.CONSTITUTION)
    constitution = read_constitution(path)
    return constitution, tuple(load_principles(constitution, str(path))) if principled else ()


def judge_spec(cfg: RunConfig, constitution: str, principles: tuple[str, ...]) -> JudgeSpec:
    j = cfg.judge
    return JudgeSpec(
        constitution=constitution,
        seed=cfg.seed,
        mode=j.mode,
        passes=j.passes,
        layout=j.layout,
        structured=j.structured == "auto",
        principles=principles,
        parse_retries=j.parse_retries,
        max_tokens=j.max_tokens,
    )


def load_inputs(cfg: RunConfig) -> Inputs:
    """Read and check every input file; raises InputError before any request is sent."""
    path = cfg.prompts_path or bundled.path(bundled.PROMPTS)
    records, bad = 0, []
    for record in iter_prompts(path, cfg.on_bad_record):  # a first pass checks every record, in constant memory
        if isinstance(record, PromptRecord):
            records += 1
        else:
            bad.append(record)
    constitution, principles = load_judging(cfg)
    if cfg.blend_with is not None:
        check_blend_files(cfg.blend_with.splits)
    return Inputs(path=path, records=records, bad=bad, constitution=constitution, principles=principles)


def describe(cfg: RunConfig) -> str:
    """Which models do what, said before the first request (an exported NGC_API_KEY picks the hosted judge)."""
    j = cfg.judge
    text = (
        f"caiforge: policy: {backends.describe(cfg, 'policy')}; judge: {backends.describe(cfg, 'judge')} "
        f"({j.mode}, {j.passes} pass(es))"
    )
    if j.backend == "openai" and j.api_key is not None and j.url:
        url = j.url.lower()
        if url.startswith("http://") and not any(h in url for h in ("//127.", "//localhost", "//[::1]")):
            text += "\ncaiforge: warning: the judge API key is sent over plain http to a non-loopback host"
    return text


def run_warnings(cfg: RunConfig) -> list[str]:
    """What every reader of this run must be told, in the summary, the manifest and the dataset card."""
    if cfg.judge.backend == "local" and cfg.local.model_path is None:
        return [TOY_JUDGE_WARNING]
    return []


def budget_of(cfg: RunConfig, stats: Stats) -> Budget | None:
    """The run's ``--max-tokens``/``--max-cost``, counted from every role's reported tokens."""
    b = cfg.budget
    if b.max_tokens is None and b.max_cost is None:
        return None

    def spent() -> tuple[int, int]:
        t = stats.tokens
        prompt = sum(v for k, v in t.items() if k.endswith("_prompt"))
        return prompt, sum(v for k, v in t.items() if k.endswith("_completion"))

    return Budget(spent, b.max_tokens, b.max_cost, b.cost)


def record_outcome(
    store: Store, run_key: str, outcome: Outcome[tuple[str, str], PairRecord | RevisionRecord], status: str = "pair"
) -> None:
    """A prompt's record (a ``status`` result: ``pair``, ``revision``) or failure, committed as it finishes."""
    pid, prompt = outcome.item
    if outcome.record is not None:
        store.put_result(pid, run_key, status, outcome.record.to_json())
        return
    failure = outcome.failure
    assert failure is not None
    responses = failure.keep.get("responses")
    record = FailureRecord(
        prompt_id=pid,
        prompt=prompt,
        stage=failure.stage,
        reason=failure.reason,
        detail=str(failure),
        responses=responses if isinstance(responses, dict) else None,
    )
    store.put_result(pid, run_key, "failure", record.to_json())


async def run_async(cfg: RunConfig, fresh: bool = False) -> RunResult:
    started_wall, started = time.time(), time.monotonic()
    inputs = load_inputs(cfg)
    if not cfg.quiet:
        print(describe(cfg), file=sys.stderr)
    prepare_output_dir(cfg.output_dir)  # a bad input, output folder included, stops before any request
    spec = judge_spec(cfg, inputs.constitution, inputs.principles)
    settings = rlcai.Settings(temperatures=cfg.temperatures, judge=spec)
    async with Session(cfg, {role: role for role in rlcai.ROLES}, cfg.public_dict(), fresh) as session:
        store, engine = session.store, session.engine
        for bad in inputs.bad:
            store.put_failure(stage="input", reason="bad record", detail=bad.reason, source=bad.source, line=bad.line)
        inputs = replace(inputs, unique=store.set_prompts(inputs.prompts(cfg.on_bad_record)))
        descriptor = RunDescriptor(
            pipeline=rlcai.NAME,
            settings=settings.describe(),
            identities={role: engine.identity(role) for role in rlcai.ROLES},
            config=cfg.public_dict(),
            attempt=store.attempt,
        )
        descriptor.save(store)
        run_key = descriptor.key()
        items = store.pending(run_key)  # finished prompts are not asked again, even from the store
        session.show_progress(rlcai.totals(settings, store.count_pending(run_key)))
        pipeline = rlcai.RlCai(settings, {r: engine.asker(r) for r in rlcai.ROLES}, session.progress.advance)
        rate = FailureRate(cfg.max_failure_rate)
        window = 2 * engine.capacity()  # prompts in flight: enough to keep every endpoint full, and no more
        on_outcome = partial(record_outcome, store, run_key)
        budget = budget_of(cfg, engine.stats)
        try:
            if cfg.engine == "ray":
                from .ray_runner import run_on_ray  # caiforge[ray]: imported only when asked for

                await run_on_ray(
                    cfg,
                    settings,
                    items,
                    on_outcome,
                    rate=rate,
                    cache=store,
                    stats=engine.stats,
                    advance=session.progress.advance,
                    budget=budget,
                )
            else:
                await run_each(items, pipeline, on_outcome, window=window, rate=rate, budget=budget)
        except RunAborted:
            # Stopped on purpose (--max-failure-rate): say why in the file a user opens first.
            # Streamed from the store like every other output: an abort at 1M prompts holds no record list.
            template = options_of(cfg).template
            write_streams(cfg.output_dir, failure_files(), (check(template, r) for r in records(store, descriptor)))
            raise
        finally:
            engine.stats.failures = rate.failures
            session.progress.close()  # before the summary is printed
            await engine.aclose()  # settles the concurrency figures the manifest reports
            if cfg.engine == "ray":  # the driver's engine sent nothing: its figures would mislead
                engine.stats.concurrency, engine.stats.endpoints = {}, {}
        endpoint_report, adapted = session.adaptations()
        notes = session.notes + adapted
        endpoint_report["notes"] = notes
        result = write_run(cfg, store, descriptor, inputs, engine.stats, notes, endpoint_report, started_wall, started)
        session.finish()
        return result


def write_run(
    cfg: RunConfig,
    store: Store,
    descriptor: RunDescriptor,
    inputs: Inputs,
    stats: Stats,
    notes: list[str],
    endpoint_report: dict[str, Any],
    started_wall: float,
    started: float,
) -> RunResult:
    """Every file of a finished run, streamed from its store (no record is held: ``export.write_outputs``); the
    manifest's counts and the report's are taken in the same pass."""
    pairs = PairTally()  # the report's, from the preference entries as they are written
    written = write_outputs(
        store,
        descriptor,
        options_of(cfg),
        cfg.output_dir,
        seed_files=True,
        formats=("nemo-rm", *cfg.formats),
        blend=True,
        keep_failures=True,
        on_preference=pairs.add,
    )
    splits, tally = written.splits, written.tally
    store.set_splits((pid, name, rank) for name, ids in splits.items() for rank, pid in enumerate(ids))
    n = inputs.unique
    split_counts = {name: len(ids) for name, ids in splits.items()}
    counts: dict[str, Any] = {
        "input_records": inputs.records,
        "bad_records": len(inputs.bad),
        "unique_prompts": n,
        "duplicate_prompts": inputs.records - n,
        "with_candidates": tally.with_candidates,
        "judged": tally.judged,
        "pairs": sum(split_counts.values()),
        "splits": split_counts,
        "failures": tally.failures,
    }
    if cfg.judge.passes >= 2:  # MT-Bench's consistency: the share of judged prompts whose passes agreed
        inconsistent = sum(k for (_, reason), k in tally.reasons.items() if reason == Inconsistent.reason)
        total = tally.consistent + inconsistent
        counts["consistency_rate"] = round(tally.consistent / total, 4) if total else None
        counts["inconsistent"] = inconsistent
    by_reason: Counter[str] = Counter()
    for (stage, reason), k in tally.reasons.items():
        by_reason[f"{stage}: {reason}"] += k
    elapsed = time.monotonic() - started
    warnings = run_warnings(cfg)
    manifest = Manifest(
        caiforge=__version__,
        config=cfg.public_dict(),
        counts=Counts(**counts),
        failures_by_reason=dict(sorted(by_reason.items())),
        stats=RunStats(**stats.as_dict()),
        constitution_sha256=sha256_text(inputs.constitution),
        policy=descriptor.identities["policy"],
        judge={
            **descriptor.identities["judge"],
            "mode": cfg.judge.mode,
            "passes": cfg.judge.passes,
            "layout": cfg.judge.layout,
        },
        endpoints=endpoint_report,
        versions=versions(),
        timings=Timings(started=started_wall, finished=time.time(), elapsed_s=round(elapsed, 3)),
        attempt=store.attempt,
        database=DB_NAME,
        warnings=warnings,
        formats=list(cfg.formats),
        files=sorted(written.files),
        **({"reviews": written.reviews} if written.reviews else {}),
    )
    manifest.write(cfg.output_dir)
    write_atomic(cfg.output_dir / "README.md", dataset_card(manifest))
    write_report(cfg.output_dir, pairs)
    return RunResult(cfg.output_dir, counts, tally.kept, stats, elapsed, manifest.dump(), warnings, notes)


def run(cfg: RunConfig, fresh: bool = False) -> RunResult:
    """Synchronous entry point; SIGTERM and Ctrl-C stop cleanly and keep everything finished so far."""
    return run_sync(lambda: run_async(cfg, fresh=fresh), cfg.output_dir)
