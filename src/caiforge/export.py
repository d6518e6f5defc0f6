"""``caiforge export``: every format, from a run's store alone (no model is called, no server is needed).

The records and the split assignment are exactly those ``run`` wrote its files from, so the same store gives
byte-identical files. A run that is not finished exports what is finished and says how much is missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .card import blend_card
from .config import BlendSpec, RunConfig, build_config
from .errors import InputError
from .formats import FORMATS, run_table
from .inputs import check_blend_files, read_text
from .manifest import Counts, Manifest
from .mix import DEFAULT_RATIOS, Pair, Source, mix, nemo_pairs, parse_source, trl_pairs
from .outputs import write_files
from .records import Record, RunDescriptor, pending, records
from .store import DB_NAME, Store
from .template import PromptTemplate
from .writers import WRITERS, Blend, Dataset


def dataset_of(cfg: RunConfig, found: list[Record], blend: bool = True) -> Dataset:
    """The writers' input: the records and the dataset options of ``cfg`` (the blend's files read here)."""
    mixed = None
    if blend and cfg.blend_with is not None:
        texts = {
            split: {
                kind: [read_text(path, f"blend {kind}") for path in spec[kind]] for kind in ("prompts", "comparisons")
            }
            for split, spec in cfg.blend_with.splits.items()
        }
        mixed = Blend(name=cfg.blend_with.name, texts=texts)
    return Dataset.build(
        found,
        cfg.template,
        ratios=cfg.splits,
        shuffle=cfg.shuffle,
        seed=cfg.seed,
        prefix=cfg.output_filename_prefix,
        judge_mode=cfg.judge.mode,
        blend=mixed,
    )


def format_files(data: Dataset, splits: dict[str, list[str]], formats: tuple[str, ...]) -> dict[str, str | bytes]:
    table = run_table(data, splits)
    files: dict[str, str | bytes] = {}
    for name in formats:
        files.update(FORMATS[name](table))
    return files


def stored_config(descriptor: RunDescriptor) -> RunConfig:
    """The run's config as its descriptor keeps it (secrets were never there)."""
    data: dict[str, Any] = {k: v for k, v in descriptor.config.items()}
    for role in ("policy", "judge"):
        data[role] = {k: v for k, v in (data.get(role) or {}).items() if k != "api_key_set"}
    return build_config(data)


@dataclass(frozen=True, kw_only=True)
class Exported:
    output_dir: Path
    files: list[str]
    pairs: int
    pending: int
    prompts: int


@dataclass(frozen=True, kw_only=True)
class Stored:
    cfg: RunConfig
    records: list[Record]
    pending: int
    prompts: int


def read_run(run_dir: Path) -> Stored:
    """A run's config and records from its store alone."""
    if not (run_dir / DB_NAME).is_file():
        raise InputError(f"{run_dir}: not a caiforge run (no {DB_NAME})")
    store = Store.open(run_dir)  # the folder lock: a run still writing it would change the files under us
    try:
        descriptor = RunDescriptor.load(store)
        if descriptor is None:
            raise InputError(
                f"{run_dir}: the store describes no run (made before caiforge 0.2?); rerun the same `caiforge run` "
                "command once to resume it, then export"
            )
        return Stored(
            cfg=stored_config(descriptor),
            records=list(records(store, descriptor)),
            pending=pending(store, descriptor),
            prompts=store.count_results(descriptor.key())[0],
        )
    finally:
        store.close()


def export(run_dir: Path, formats: tuple[str, ...], output_dir: Path | None = None) -> Exported:
    run = read_run(run_dir)
    data = dataset_of(run.cfg, run.records, blend=False)
    files = format_files(data, data.assign_splits(), formats)
    out = output_dir or run_dir
    out.mkdir(parents=True, exist_ok=True)
    write_files(out, files)
    return Exported(
        output_dir=out, files=sorted(files), pairs=len(data.usable), pending=run.pending, prompts=run.prompts
    )


def blend_run(run_dir: Path, spec: BlendSpec, output_dir: Path | None = None) -> Exported:
    """The seed's ``--blend-with`` files from a run's store: the same bytes ``run --blend-with`` writes."""
    run = read_run(run_dir)
    if set(spec.splits) != set(run.cfg.splits):
        raise InputError(
            f"--blend-with must name exactly the run's splits {sorted(run.cfg.splits)}, it names {sorted(spec.splits)}"
        )
    check_blend_files(spec.splits)
    data = dataset_of(run.cfg.model_copy(update={"blend_with": spec}), run.records)
    files = {k: v for k, v in WRITERS["seed"](data, data.assign_splits()).items() if k.startswith("blend_")}
    out = output_dir or run_dir
    out.mkdir(parents=True, exist_ok=True)
    write_files(out, files)
    return Exported(
        output_dir=out, files=sorted(files), pairs=len(data.usable), pending=run.pending, prompts=run.prompts
    )


@dataclass(frozen=True, kw_only=True)
class Blended:
    output_dir: Path
    files: list[str]
    manifest: Manifest


def _run_source(run_dir: Path, amount: str | None) -> tuple[Source, RunConfig]:
    run = read_run(run_dir)
    data = dataset_of(run.cfg, run.records, blend=False)
    table = run_table(data, data.assign_splits())
    pairs = [
        Pair(prompt=row.prompt, chosen=row.chosen, rejected=row.rejected, split=name, source=run_dir.name)
        for name, rows in table.splits.items()
        for row in rows
    ]
    return Source(name=run_dir.name, path=str(run_dir), kind="run", pairs=pairs, amount=amount), run.cfg


def _outside_source(path: Path, amount: str | None, ratios: dict[str, float]) -> Source:
    """A TRL JSONL/Parquet file (named by its split, or split by the ratios) or a folder of split files."""
    if path.is_dir():
        files = {p.stem: p for p in sorted(path.glob("*.parquet"))} | {p.stem: p for p in sorted(path.glob("*.jsonl"))}
        if not files:
            raise InputError(f"{path}: a source folder needs split files such as train.jsonl or test.parquet")
        pairs = [pair for stem, file in files.items() for pair in trl_pairs(file, stem, path.name)]
    elif path.is_file():
        pairs = trl_pairs(path, path.stem if path.stem in ratios else None, path.name)
    else:
        raise InputError(f"{path}: no such file or folder")
    return Source(name=path.name, path=str(path), kind="trl", pairs=pairs, amount=amount)


def blend_many(
    run_dirs: list[Path],
    given: list[str],
    spec: BlendSpec | None,
    formats: tuple[str, ...],
    output_dir: Path,
    seed: int | None = None,
) -> Blended:
    """Runs and outside datasets into one set of splits, in every format asked for; no model is called."""
    sources: list[Source] = []
    base: RunConfig | None = None
    for run_dir in run_dirs:
        source, cfg = _run_source(run_dir, None)
        sources.append(source)
        base = base or cfg
    parsed = [parse_source(text) for text in given]
    for path, amount in parsed:
        if (path / DB_NAME).is_file():
            source, cfg = _run_source(path, amount)
            sources.append(source)
            base = base or cfg
    ratios = dict(base.splits) if base else dict(DEFAULT_RATIOS)
    template = base.template if base else PromptTemplate()
    for path, amount in parsed:
        if not (path / DB_NAME).is_file():
            sources.append(_outside_source(path, amount, ratios))
    if spec is not None:
        check_blend_files(spec.splits)
        for split, paths in spec.splits.items():
            if len(paths["prompts"]) != len(paths["comparisons"]):
                raise InputError(f"--blend-with: split {split!r} needs one comparisons file per prompts file")
            for prompts, comparisons in zip(paths["prompts"], paths["comparisons"], strict=True):
                pairs = nemo_pairs(prompts, comparisons, template, split, spec.name)
                sources.append(Source(name=spec.name, path=str(comparisons), kind="nemo", pairs=pairs))
    if not sources:
        raise InputError("blend: name at least one run folder, --source or --blend-with")
    seed = seed if seed is not None else (base.seed if base else 1234)
    prefix = base.output_filename_prefix if base else "cai_rlaif"
    mixed = mix(sources, ratios, template, seed, prefix)
    files: dict[str, str | bytes] = {}
    for name in formats:
        files.update(FORMATS[name](mixed.table))
    manifest = Manifest(
        caiforge=__version__,
        counts=Counts(pairs=sum(mixed.splits.values()), splits=mixed.splits),
        formats=list(formats),
        files=sorted(files),
        blend={
            "seed": seed,
            "ratios": ratios,
            "sources": [s.report() for s in mixed.sources],
            "leaks_moved": mixed.leaks_moved,
        },
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    write_files(output_dir, files)
    manifest.write(output_dir)
    write_files(output_dir, {"README.md": blend_card(manifest)})
    return Blended(output_dir=output_dir, files=sorted(files), manifest=manifest)
