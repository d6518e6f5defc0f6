"""A whole run: check every input before the first request, run the engine, rebuild the files from the store.

This is the asynchronous core's single entry point; :func:`run` is the synchronous wrapper for the CLI and
for Python users (``asyncio.run`` once, at the edge).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from . import __version__, bundled
from .backends import JudgeBackend, PolicyBackend, make_judge, make_policy
from .card import TOY_JUDGE_WARNING, dataset_card
from .config import RunConfig
from .dataset import Pair
from .engine import Engine, EngineSettings, Stats
from .errors import InputError, RunAborted
from .inputs import BadRecord, check_jsonl, read_constitution, read_prompts
from .keys import sha256_text
from .outputs import FAILURES_FILE, MANIFEST_FILE, collect, write_atomic, write_dataset, write_failures, write_json
from .principles import load_principles
from .progress import Progress
from .report import write_report
from .store import DB_NAME, Failure, Store
from .verdicts import Inconsistent, JudgeSpec


@dataclass
class RunResult:
    output_dir: Path
    counts: dict[str, Any]
    failures: list[Failure]
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
        for role in ("policy", "judge"):
            conc = s.concurrency.get(role, {})
            lines.append(
                f"  {role} requests: {s.requests[role]} sent, {s.retries[role]} retried, "
                f"{s.cached[role]} reused from {DB_NAME}; concurrency settled at {conc.get('limit', 0)} "
                f"(lowest {conc.get('lowest', 0)}, ceiling {conc.get('ceiling', 0)}, "
                f"peak {conc.get('peak_in_flight', 0)} in flight)"
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


def _versions() -> dict[str, str]:
    out = {"caiforge": __version__, "python": platform.python_version()}
    for dist in ("aiohttp", "pydantic", "tenacity"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


@dataclass(frozen=True)
class Inputs:
    prompts: list[str]  # unique, in first-seen order
    records: int  # good records read, duplicates included
    bad: list[BadRecord]
    constitution: str
    principles: tuple[str, ...] = ()


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


def engine_settings(cfg: RunConfig, spec: JudgeSpec, policy_concurrency: int, judge_concurrency: int) -> EngineSettings:
    return EngineSettings(
        temperatures=cfg.temperatures,
        judge=spec,
        seed=cfg.seed,
        max_retries=cfg.max_retries,
        parse_retries=cfg.judge.parse_retries,
        policy_concurrency=policy_concurrency,
        judge_concurrency=cfg.judge.concurrency or judge_concurrency,
        policy_rpm=cfg.policy.rpm,
        judge_rpm=cfg.judge.rpm,
        adaptive=cfg.adaptive_concurrency,
        max_failure_rate=cfg.max_failure_rate,
        backoff_base=cfg.retry_backoff,
    )


def load_inputs(cfg: RunConfig) -> Inputs:
    """Read and check every input file; raises InputError before any request is sent."""
    records, bad = read_prompts(cfg.prompts_path or bundled.path(bundled.PROMPTS), cfg.on_bad_record)
    constitution, principles = load_judging(cfg)
    if cfg.blend_with is not None:
        for spec in cfg.blend_with.splits.values():
            for path in spec["prompts"]:
                check_jsonl(path, "blend prompts")
            for path in spec["comparisons"]:
                check_jsonl(path, "blend comparisons", even_lines=True)
    unique = list(dict.fromkeys(r.text for r in records))
    return Inputs(unique, len(records), bad, constitution, principles)


def in_input_order(failures: Iterable[Failure], prompts: list[str]) -> list[Failure]:
    """Failures in the order of the input, not of completion: the same run writes the same file."""
    index = {prompt: i for i, prompt in enumerate(prompts)}
    return sorted(failures, key=lambda f: (index.get(f.prompt, -1) if f.prompt else -1, f.line or 0, f.stage))


def describe(cfg: RunConfig) -> str:
    """Which models do what, said before the first request (an exported NGC_API_KEY picks the hosted judge)."""
    p, j = cfg.policy, cfg.judge
    where = {"nemo": f"NeMo at {p.host}:{p.port}", "local": "the embedded local model"}.get(
        p.backend or "", f"{p.backend} {p.model} at {p.url}"
    )
    judge = "the embedded local model" if j.backend == "local" else f"{j.model} at {j.url}"
    text = f"caiforge: policy: {where}; judge: {judge} ({j.mode}, {j.passes} pass(es))"
    if j.backend == "openai" and j.api_key is not None and j.url:
        url = j.url.lower()
        if url.startswith("http://") and not any(h in url for h in ("//127.", "//localhost", "//[::1]")):
            text += "\ncaiforge: warning: the judge API key is sent over plain http to a non-loopback host"
    return text


async def check_endpoints(backends: Iterable[PolicyBackend | JudgeBackend], quiet: bool) -> list[str]:
    """Every endpoint at once, before the first real request: one line per endpoint that cannot serve.

    Returns the notes worth keeping (e.g. a server that answers a model name it does not list)."""
    backends = list(backends)
    results = await asyncio.gather(*(b.check() for b in backends), return_exceptions=True)
    problems: list[str] = []
    notes: list[str] = []
    for result in results:
        if isinstance(result, InputError):
            problems.append(str(result))
        elif isinstance(result, BaseException):
            raise result
        elif result:
            notes.append(result)
            if not quiet:
                print(f"caiforge: note: {result}", file=sys.stderr)
    if problems:
        for backend in backends:
            await backend.aclose()
        raise InputError("\ncaiforge: error: ".join(problems))
    return notes


def endpoints(policy: PolicyBackend | None, judge: JudgeBackend | None) -> tuple[dict[str, Any], list[str]]:
    """What each endpoint turned out to need, for the manifest, and the sentences that say so."""
    report: dict[str, Any] = {}
    notes: list[str] = []
    for role, backend in (("policy", policy), ("judge", judge)):
        if backend is not None:
            report[role], said = backend.adaptations()
            notes += said
    return report, notes


def consistency(pairs: list[Pair], failures: list[Failure], passes: int) -> dict[str, Any]:
    """With two passes: the share of judged prompts whose passes agreed (MT-Bench's consistency)."""
    if passes < 2:
        return {}
    inconsistent = sum(1 for f in failures if f.reason == Inconsistent.reason)
    agreed = sum(1 for p in pairs if p.consistent)
    total = agreed + inconsistent
    return {"consistency_rate": round(agreed / total, 4) if total else None, "inconsistent": inconsistent}


def run_warnings(cfg: RunConfig) -> list[str]:
    """What every reader of this run must be told, in the summary, the manifest and the dataset card."""
    if cfg.judge.backend == "local" and cfg.local.model_path is None:
        return [TOY_JUDGE_WARNING]
    return []


async def run_async(cfg: RunConfig, fresh: bool = False) -> RunResult:
    started_wall, started = time.time(), time.monotonic()
    inputs = load_inputs(cfg)
    if not cfg.quiet:
        print(describe(cfg), file=sys.stderr)
    prepare_output_dir(cfg.output_dir)  # a bad input, output folder included, stops before any request
    policy, judge = make_policy(cfg), make_judge(cfg)
    checked = await check_endpoints((policy, judge), cfg.quiet)
    spec = judge_spec(cfg, inputs.constitution, inputs.principles)
    settings = engine_settings(
        cfg, spec, cfg.policy.concurrency or policy.default_concurrency, judge.default_concurrency
    )
    store = Store.open(cfg.output_dir, fresh=fresh)
    store.begin_attempt(cfg.public_dict())
    for bad in inputs.bad:
        store.put_failure(Failure(None, "input", "bad record", bad.reason, bad.source, bad.line))
    n = len(inputs.prompts)
    progress = Progress({"candidates": n * len(cfg.temperatures), "judge": n}, quiet=cfg.quiet)
    engine = Engine(policy, judge, store, settings, progress)
    status = "interrupted"
    try:
        try:
            await engine.run(inputs.prompts)
        except RunAborted:
            # Stopped on purpose (--max-failure-rate): say why in the file a user opens first.
            write_failures(cfg.output_dir / FAILURES_FILE, in_input_order(store.failures(), inputs.prompts))
            raise
        finally:
            progress.close()
            await policy.aclose()
            await judge.aclose()
        endpoint_report, adapted = endpoints(policy, judge)
        notes = checked + adapted
        endpoint_report["notes"] = notes
        collected = collect(inputs.prompts, store, settings, engine.policy_identity, engine.judge_identity)
        splits = write_dataset(cfg, collected, store)
        failures = in_input_order(store.failures(), inputs.prompts)
        write_failures(cfg.output_dir / FAILURES_FILE, failures)
        elapsed = time.monotonic() - started
        counts = {
            "input_records": inputs.records,
            "bad_records": len(inputs.bad),
            "unique_prompts": n,
            "duplicate_prompts": inputs.records - n,
            "with_candidates": len(collected.candidates),
            "judged": len(collected.pairs),
            "pairs": sum(splits.values()),
            "splits": splits,
            "failures": len(failures),
            **consistency(collected.pairs, failures, cfg.judge.passes),
        }
        manifest = {
            "caiforge": __version__,
            "config": cfg.public_dict(),
            "counts": counts,
            "failures_by_reason": dict(sorted(Counter(f"{f.stage}: {f.reason}" for f in failures).items())),
            "stats": engine.stats.as_dict(),
            "constitution_sha256": sha256_text(inputs.constitution),
            "policy": engine.policy_identity,
            "judge": {
                **engine.judge_identity,
                "mode": cfg.judge.mode,
                "passes": cfg.judge.passes,
                "layout": cfg.judge.layout,
            },
            "endpoints": endpoint_report,
            "versions": _versions(),
            "timings": {"started": started_wall, "finished": time.time(), "elapsed_s": round(elapsed, 3)},
            "attempt": store.attempt,
            "database": DB_NAME,
        }
        warnings = run_warnings(cfg)
        manifest["warnings"] = warnings
        write_json(cfg.output_dir / MANIFEST_FILE, manifest, indent=2)
        write_atomic(cfg.output_dir / "README.md", dataset_card(manifest, warnings))
        write_report(cfg.output_dir)
        status = "finished"
        return RunResult(cfg.output_dir, counts, failures, engine.stats, elapsed, manifest, warnings, notes)
    finally:
        store.end_attempt(status, engine.stats.as_dict())
        store.close()


def run(cfg: RunConfig, fresh: bool = False) -> RunResult:
    """Synchronous entry point; SIGTERM and Ctrl-C stop cleanly and keep everything finished so far."""

    async def main() -> RunResult:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        assert task is not None
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread: no signals
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
        return await run_async(cfg, fresh=fresh)

    try:
        return asyncio.run(main())
    except (KeyboardInterrupt, asyncio.CancelledError) as exc:
        raise RunAborted(
            f"interrupted; finished requests are saved in {cfg.output_dir / DB_NAME}. "
            "Rerun the same command to continue where it stopped."
        ) from exc
