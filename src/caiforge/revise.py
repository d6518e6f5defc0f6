"""``caiforge revise``: the SL-CAI stage (critique and revision) on the engine, store and session of ``run``.

A drop-in for NeMo-Aligner's ``generate_sl_cai_dataset.py``: the same flags and files, but every prompt ends
as a revision or a recorded failure (no last batch dropped), each step is stored as it is answered (a rerun
continues), and the summary, manifest, card and report say what the revisions are like.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from . import __version__, backends, bundled
from .card import TOY_POLICY_WARNING, revision_card
from .config import RunConfig
from .dataset import Ids
from .engine import Stats
from .errors import InputError, RunAborted
from .export import write_table
from .formats import Row, Table
from .inputs import BadRecord, PromptRecord, iter_prompts
from .instructions import Instructions, load_few_shot, load_instructions
from .keys import sha256_text
from .manifest import Counts, Manifest, RunStats, Timings
from .outputs import write_atomic, write_streams
from .pipeline import budget_of, prepare_output_dir, record_outcome, versions
from .pipelines import slcai
from .quality import QualityTally
from .records import FailureRecord, RevisionRecord, RunDescriptor, prompt_id, revisions, revisions_of
from .report import write_report
from .request import Message
from .runner import FailureRate, run_each
from .seq_length import DIR as LONG_DIR
from .seq_length import STATISTICS_FILE as LONG_STATS
from .seq_length import TokenCount, load_counter, remove_long
from .session import Session, run_sync
from .sft_blend import blend, read_sft, summary_path
from .sl_files import DEFAULT_OUTPUT_FILE, SAMPLES_FILE, failure_file, seed_files
from .sl_formats import halves, pair_rows, sft_files
from .store import DB_NAME, Store
from .template import PromptTemplate
from .writers import Options

INSTRUCTIONS = "critique_revision.yaml"
FEW_SHOT = "few_shot.json"


@dataclass(frozen=True, kw_only=True)
class ReviseInputs:
    prompts_path: Path
    records: int  # good input records taken (the first --num-examples), duplicates included
    bad: list[BadRecord]
    instructions: Instructions
    instructions_path: Path
    few_shot: tuple[Message, ...]
    few_shot_source: str
    count_tokens: TokenCount | None = None  # --max-seq-length's tokenizer

    def prompts(self, cfg: RunConfig) -> Iterator[tuple[str, str]]:
        taken = 0
        for record in iter_prompts(self.prompts_path, cfg.on_bad_record):
            if isinstance(record, PromptRecord):
                if taken == self.records:
                    return
                taken += 1
                yield prompt_id(record.text), record.text


def output_file(cfg: RunConfig) -> Path:
    return cfg.revise.output_filepath or cfg.output_dir / DEFAULT_OUTPUT_FILE


def load_inputs(cfg: RunConfig) -> ReviseInputs:
    """Read and check every input before any request: prompts, instructions, few-shot dialogs."""
    r = cfg.revise
    path = cfg.prompts_path or bundled.path(bundled.PROMPTS)
    limit = r.num_examples if r.num_examples > 0 else None
    records, bad = 0, []
    for record in iter_prompts(path, cfg.on_bad_record):
        if isinstance(record, PromptRecord):
            if limit is not None and records == limit:
                break
            records += 1
        else:
            bad.append(record)
    if records == 0:
        raise InputError(f"{path}: no prompts to revise")
    instructions_path = r.instructions_path or bundled.path(INSTRUCTIONS)
    instructions = load_instructions(instructions_path)
    if r.few_shot_path is not None:
        few_shot, source = load_few_shot(r.few_shot_path), str(r.few_shot_path)
    elif instructions.few_shot:
        few_shot, source = instructions.few_shot, f"{instructions_path} (system_chat)"
    else:
        few_shot, source = load_few_shot(bundled.path(FEW_SHOT)), "bundled"
    t = cfg.template
    if cfg.policy.backend == "openai-completions" and not (t.user_format and t.assistant_format):
        raise InputError(
            "--policy-backend openai-completions: a completions endpoint has no chat template, and revise sends whole "
            "conversations; give --user_format and --assistant_format (e.g. '[INST] {MESSAGE} [/INST]' and "
            "'{MESSAGE}</s> '), or use --policy-backend openai-chat"
        )
    if r.helpfulness_path is not None:
        read_sft(r.helpfulness_path)  # every record checked before any request (the seed asserts at the end)
    count_tokens = load_counter(r.tokenizer_model, r.tokenizer_library) if r.max_seq_length else None
    if output_file(cfg).exists() and output_file(cfg).is_dir():
        raise InputError(f"{output_file(cfg)}: --output-filepath is a directory")
    return ReviseInputs(
        prompts_path=path,
        records=records,
        bad=bad,
        instructions=instructions,
        instructions_path=instructions_path,
        few_shot=few_shot,
        few_shot_source=source,
        count_tokens=count_tokens,
    )


@dataclass
class ReviseResult:
    output_dir: Path
    output_file: Path
    counts: dict[str, Any]
    quality: dict[str, Any]
    failures: Counter[str]
    stats: Stats
    elapsed: float
    manifest: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def revised(self) -> int:
        return int(self.counts["revised"])

    def summary(self) -> str:
        c, q, s = self.counts, self.quality, self.stats
        lines = [
            f"caiforge: {c['revised']} revisions from {c['unique_prompts']} unique prompts "
            f"({c['duplicate_prompts']} duplicates merged) in {self.elapsed:.1f}s",
        ]
        if self.failures:
            detail = "; ".join(f"{reason} {n}" for reason, n in self.failures.most_common())
            total = sum(self.failures.values())
            lines.append(f"  failures: {total} ({detail}) -> {self.output_dir / 'failures.jsonl'}")
        else:
            lines.append("  failures: 0")
        if q["revised"]:
            lines.append(
                f"  revisions: {100 * q['mere_refusal_rate']:.1f}% mere refusals, {100 * q['unchanged_rate']:.1f}% "
                f"unchanged; words {q['words_initial']['mean']:g} -> {q['words_revised']['mean']:g} (mean)"
            )
            use = ", ".join(f"#{i} {k}" for i, k in enumerate(q["instruction_use"]))
            lines.append(f"  instructions drawn: {use}")
        lines.append(
            f"  policy requests: {s.requests['policy']} sent, {s.retries['policy']} retried, "
            f"{s.cached['policy']} reused from {DB_NAME}"
        )
        tin, tout = s.tokens["policy_prompt"], s.tokens["policy_completion"]
        if tin or tout:
            lines.append(f"  policy tokens: {tin:,} in, {tout:,} out")
        blend = self.manifest.get("revise", {}).get("blend")
        if blend:
            lines.append(
                f"  blend: {blend['cai']} CAI + {blend['helpfulness']} helpfulness records, shuffled -> "
                f"{self.output_file} (the CAI records alone: cai_output/cai_samples.jsonl)"
            )
        long = self.manifest.get("revise", {}).get("long_dialogs")
        if long:
            lines.append(
                f"  long dialogs: {long['removed']} over {long['max_seq_length']} tokens ({long['removed_cai']} of "
                f"them CAI, recorded as failures) left out of {self.output_file.parent / LONG_DIR}/"
            )
        lines.append(f"  output: {self.output_file}")
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  WARNING: {w}" for w in self.warnings]
        return "\n".join(lines)


def warnings_of(cfg: RunConfig) -> list[str]:
    return [TOY_POLICY_WARNING] if cfg.policy.backend == "local" and cfg.local.model_path is None else []


async def revise_async(cfg: RunConfig, fresh: bool = False) -> ReviseResult:
    started_wall, started = time.time(), time.monotonic()
    inputs = load_inputs(cfg)
    if not cfg.quiet:
        print(
            f"caiforge: policy: {backends.describe(cfg, 'policy')}; {len(inputs.instructions.items)} critique/"
            f"revision instructions, {len(inputs.few_shot) // 2} few-shot exchanges, {cfg.revise.revisions} round(s)",
            file=sys.stderr,
        )
    prepare_output_dir(cfg.output_dir)
    output_file(cfg).parent.mkdir(parents=True, exist_ok=True)
    settings = slcai.Settings(
        instructions=inputs.instructions.items,
        few_shot=inputs.few_shot,
        revisions=cfg.revise.revisions,
        seed=cfg.seed,
        temperature=cfg.revise.temperature,
    )
    public = cfg.public_dict(slcai.NAME)
    async with Session(cfg, {role: role for role in slcai.ROLES}, public, fresh) as session:
        store, engine = session.store, session.engine
        for bad in inputs.bad:
            store.put_failure(stage="input", reason="bad record", detail=bad.reason, source=bad.source, line=bad.line)
        unique = store.set_prompts(inputs.prompts(cfg))
        descriptor = RunDescriptor(
            pipeline=slcai.NAME,
            settings=settings.describe(),
            identities={role: engine.identity(role) for role in slcai.ROLES},
            config=public,
            attempt=store.attempt,
        )
        descriptor.save(store)
        run_key = descriptor.key()
        session.show_progress(slcai.totals(settings, store.count_pending(run_key)))
        pipeline = slcai.SlCai(settings, {r: engine.asker(r) for r in slcai.ROLES}, session.progress.advance)
        rate = FailureRate(cfg.max_failure_rate)
        try:
            await run_each(
                store.pending(run_key),
                pipeline,
                partial(record_outcome, store, run_key, status="revision"),
                window=2 * engine.capacity(),
                rate=rate,
                budget=budget_of(cfg, engine.stats),
            )
        except RunAborted:
            write_streams(cfg.output_dir, failure_file(), revisions(store, descriptor))
            raise
        finally:
            engine.stats.failures = rate.failures
            session.progress.close()
            await engine.aclose()
        endpoint_report, adapted = session.adaptations()
        notes = session.notes + adapted
        endpoint_report["notes"] = notes
        result = write_revise(cfg, store, descriptor, inputs, unique, engine.stats, notes, endpoint_report)
        result.elapsed = time.monotonic() - started
        session.finish()
    _finish_manifest(cfg, result, started_wall)
    return result


def write_revise(
    cfg: RunConfig,
    store: Store,
    descriptor: RunDescriptor,
    inputs: ReviseInputs,
    unique: int,
    stats: Stats,
    notes: list[str],
    endpoint_report: dict[str, Any],
) -> ReviseResult:
    """The seed's files and ``failures.jsonl``, streamed from the store; the counts taken on the way."""
    quality, failures = QualityTally(), Counter[str]()
    revised, unchanged = Ids(), set[str]()  # 8 bytes a revised prompt; the unchanged ones are few

    def counted() -> Iterator[RevisionRecord | FailureRecord]:
        for item in revisions(store, descriptor):
            if isinstance(item, RevisionRecord):
                quality.add(item)
                revised.append(item.prompt_id)
                if item.revision.strip() == item.initial_response.strip():
                    unchanged.add(item.prompt_id)
            else:
                failures[f"{item.stage}: {item.reason}"] += 1
            yield item

    out = output_file(cfg)
    written = write_streams(out.parent, seed_files(out.name), counted())
    blended: dict[str, int] = {}
    if cfg.revise.helpfulness_path is not None:  # as the seed: the blend replaces the SFT file
        blended = blend(cfg.revise.helpfulness_path, out.parent / SAMPLES_FILE, out, cfg.seed)
        written.append(os.path.relpath(summary_path(out), out.parent))
    long: dict[str, Any] = {}
    too_long: list[FailureRecord] = []
    limit = cfg.revise.max_seq_length
    if limit is not None and inputs.count_tokens is not None:
        removed, cai = remove_long(out, limit, inputs.count_tokens)
        written += [os.path.relpath(removed["output_file"], out.parent), f"{LONG_DIR}/{LONG_STATS}"]
        long = {"max_seq_length": limit, "removed": removed["num_removed_ids"], "removed_cai": len(cai)}
        for prompt, n in cai:
            detail = f"{n} tokens, over --max-seq-length {limit}: left out of {LONG_DIR}/ (kept in {out.name})"
            too_long.append(
                FailureRecord(
                    prompt_id=prompt_id(prompt), prompt=prompt, stage="dataset", reason="over length", detail=detail
                )
            )
            failures["dataset: over length"] += 1
    write_streams(cfg.output_dir, failure_file(), itertools.chain(revisions(store, descriptor), too_long))
    files = [_relative(out.parent / name, cfg.output_dir) for name in written]
    if too_long:  # dropped: not in the trainer files, not counted as revised (they stay in the seed's files)
        dropped = {f.prompt_id for f in too_long}
        revised = Ids(pid for pid in revised if pid not in dropped)
    sft, pairs = trainer_files(cfg, store, descriptor, revised, unchanged)
    files += sft.files + pairs.files
    figures = quality.figures(len(inputs.instructions.items))
    counts = {
        "input_records": inputs.records,
        "bad_records": len(inputs.bad),
        "unique_prompts": unique,
        "duplicate_prompts": inputs.records - unique,
        "revised": len(revised),
        "failures": sum(failures.values()),
        "splits": sft.sizes,
    }
    manifest = Manifest(
        caiforge=__version__,
        pipeline=slcai.NAME,
        config=cfg.public_dict(slcai.NAME),
        counts=Counts(**counts),
        failures_by_reason=dict(sorted(failures.items())),
        stats=RunStats(**stats.as_dict()),
        policy=descriptor.identities["policy"],
        endpoints=endpoint_report,
        versions=versions(),
        attempt=store.attempt,
        database=DB_NAME,
        warnings=warnings_of(cfg),
        files=files,
        revise={
            "instructions": {
                "source": str(inputs.instructions_path),
                "form": inputs.instructions.form,
                "count": len(inputs.instructions.items),
                "sha256": sha256_text(repr(descriptor.settings["instructions"])),
            },
            "few_shot": {"source": inputs.few_shot_source, "turns": len(inputs.few_shot)},
            "revisions": cfg.revise.revisions,
            "quality": figures,
            **({"blend": {**blended, "helpfulness_path": str(cfg.revise.helpfulness_path)}} if blended else {}),
            **({"long_dialogs": long} if long else {}),
            **({"pairs": {**pairs.sizes, "unchanged_kept_as_sft": pairs.left_out}} if cfg.revise.pairs else {}),
        },
    )
    return ReviseResult(
        cfg.output_dir, out, counts, figures, failures, stats, 0.0, manifest.dump(), manifest.warnings, notes
    )


@dataclass
class Split:
    files: list[str] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)
    left_out: int = 0


def trainer_files(
    cfg: RunConfig, store: Store, descriptor: RunDescriptor, revised: Ids, unchanged: set[str]
) -> tuple[Split, Split]:
    """TRL's SFT files per split; with ``--pairs`` each split's second half as preference pairs in every
    ``--format`` (a revision that changed nothing is no pair: it stays SFT data, counted)."""
    options = Options(template=cfg.template, ratios=cfg.splits, shuffle=cfg.shuffle, seed=cfg.seed)
    sft, pairs = Split(), Split()
    pair_ids: dict[str, Ids] = {}
    for name, ids in options.assign(revised).items():
        sft_ids = ids
        if cfg.revise.pairs:
            sft_ids, second = halves(ids)
            pair_ids[name] = Ids(pid for pid in second if pid not in unchanged)
            for pid in second:
                if pid in unchanged:
                    sft_ids.append(pid)
            pairs.left_out += len(second) - len(pair_ids[name])
        sft.sizes[name] = len(sft_ids)
        sft.files += write_streams(cfg.output_dir, sft_files(name), revisions_of(store, descriptor, sft_ids))
    if cfg.revise.pairs:
        pairs.sizes = {name: len(ids) for name, ids in pair_ids.items()}

        def rows(name: str) -> Iterator[Row]:
            return pair_rows(revisions_of(store, descriptor, pair_ids[name]), pair_template(cfg))

        table = Table(sizes=pairs.sizes, rows=rows, prefix=cfg.output_filename_prefix)
        pairs.files = write_table(cfg.output_dir, table, cfg.formats)
    return sft, pairs


def pair_template(cfg: RunConfig) -> PromptTemplate:
    """The template of the pairs' NeMo files: the flags' when they name turn formats, else NeMo's ``<extra_id_*>``
    (``run``'s default). The SL seed's empty formats would glue prompt and answer into one string."""
    t = cfg.template
    return t if t.user_format and t.assistant_format else PromptTemplate()


def _relative(path: Path, base: Path) -> str:
    """A file's name in the manifest: relative to the run's folder, or absolute when it lies outside it."""
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def _finish_manifest(cfg: RunConfig, result: ReviseResult, started_wall: float) -> None:
    manifest = Manifest.model_validate(result.manifest)
    manifest.timings = Timings(started=started_wall, finished=time.time(), elapsed_s=round(result.elapsed, 3))
    manifest.write(cfg.output_dir)
    result.manifest = manifest.dump()
    write_atomic(cfg.output_dir / "README.md", revision_card(manifest))
    write_report(cfg.output_dir)


def revise(cfg: RunConfig, fresh: bool = False) -> ReviseResult:
    """Synchronous entry point; SIGTERM and Ctrl-C stop cleanly and keep every finished step."""
    return run_sync(lambda: revise_async(cfg, fresh=fresh), cfg.output_dir, "finished steps")
