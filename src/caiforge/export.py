"""A run's files streamed from its store (``run`` ends with it), ``caiforge export`` (every format, from the store
alone: no model is called, no server is needed) and ``caiforge blend``.

:func:`write_outputs` reads the store in passes and never holds the records: one pass in input order writes
the seed's JSON arrays and ``failures.jsonl`` while it counts and collects the usable pairs' ids; the ids are
split; then one pass per split, in the split's order, feeds every format's files of that split; the seed's
blend files, if asked for, take one more pass each in their shuffled order. The records and the split
assignment are exactly those ``run`` wrote its files from, so the same store gives byte-identical files. A run
that is not finished exports what is finished and says how much is missing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

from . import __version__
from .card import blend_card
from .config import BlendSpec, RunConfig, build_config
from .dataset import Ids
from .errors import InputError
from .formats import Row, Table, clean, run_rows, split_files
from .inputs import check_blend_files, read_text
from .manifest import Counts, Manifest
from .mix import DEFAULT_RATIOS, Ref, RunPair, Source, leak_key, mix, nemo_pairs, parse_source, trl_pairs
from .outputs import write_files, write_stream, write_streams
from .records import PairRecord, Record, Reviews, RunDescriptor, pairs_of, pending, records
from .store import DB_NAME, Store
from .template import PromptTemplate
from .writers import Blend, Dataset, Formatted, Options, Tally, blend_files, check, failure_files, record_files


def blend_of(cfg: RunConfig) -> Blend | None:
    """The seed's ``--blend-with`` files, read (they are outside files: small beside a run)."""
    if cfg.blend_with is None:
        return None
    texts = {
        split: {kind: [read_text(path, f"blend {kind}") for path in spec[kind]] for kind in ("prompts", "comparisons")}
        for split, spec in cfg.blend_with.splits.items()
    }
    return Blend(name=cfg.blend_with.name, texts=texts)


def options_of(cfg: RunConfig, blend: bool = True) -> Options:
    """The dataset options of ``cfg`` (the blend's files read here)."""
    return Options(
        template=cfg.template,
        ratios=cfg.splits,
        shuffle=cfg.shuffle,
        seed=cfg.seed,
        prefix=cfg.output_filename_prefix,
        judge_mode=cfg.judge.mode,
        blend=blend_of(cfg) if blend else None,
    )


def dataset_of(cfg: RunConfig, found: Iterable[Record], blend: bool = True) -> Dataset:
    """The records in memory with the options of ``cfg``: the in-memory form, for small inputs and tests."""
    options = options_of(cfg, blend)
    rest = {f.name: getattr(options, f.name) for f in fields(Options) if f.name != "template"}
    return Dataset.build(found, options.template, **rest)


@dataclass(frozen=True, kw_only=True)
class Written:
    files: list[str]  # relative to the folder, in the order written
    tally: Tally  # the manifest's counts
    splits: dict[str, Ids]  # the usable pairs' ids per split, in each split's order (flagged ones left out)
    reviews: dict[str, int] = field(default_factory=dict)  # pairs flagged (left out) and swapped by a person


def run_table(
    store: Store,
    descriptor: RunDescriptor,
    options: Options,
    splits: Mapping[str, Sequence[str]],
    reviews: Reviews | None = None,
) -> Table:
    """A run's rows per split, read from its store in the split's order each time a split is written."""

    def rows(name: str) -> Iterator[Row]:
        return run_rows(pairs_of(store, descriptor, splits[name], reviews), options.template, options.judge_mode)

    return Table(sizes={name: len(ids) for name, ids in splits.items()}, rows=rows, prefix=options.prefix)


def write_table(directory: Path, table: Table, formats: Iterable[str]) -> list[str]:
    """Every format's files, one pass over each split feeding all of that split's files at once."""
    written: list[str] = []
    formats = tuple(formats)
    for name in table.sizes:
        encoders = split_files(formats, name, table.prefix)
        if encoders:
            written += write_streams(directory, encoders, table.rows(name))
    return written


def write_outputs(
    store: Store,
    descriptor: RunDescriptor,
    options: Options,
    directory: Path,
    *,
    seed_files: bool,
    formats: Iterable[str] = (),
    blend: bool = False,
    keep_failures: bool = False,
    on_preference: Callable[[dict[str, Any]], None] | None = None,
) -> Written:
    """A run's files from its store, streamed: with ``seed_files`` the candidates, preferences and failures
    (in input order, while the counts are taken), then ``formats`` per split, then the seed's blend files.
    ``on_preference`` sees each entry of the preference file as it is written (the report counts them)."""
    tally = Tally(keep_failures=keep_failures)
    checked = tally.count(check(options.template, r) for r in records(store, descriptor))
    encoders = {**record_files(on_preference), **failure_files()}
    files = write_streams(directory, encoders, checked) if seed_files else []
    deque(checked, maxlen=0)  # without the seed's files the pass only counts (and collects the usable ids)
    reviews = Reviews.of(store, descriptor)
    splits = reviewed_splits(options.assign(tally.usable), reviews)
    files += write_table(directory, run_table(store, descriptor, options, splits, reviews), formats)
    if blend and options.blend is not None:

        def own(split_name: str, ranks: list[int]) -> list[Formatted]:
            ids = [splits[split_name][k] for k in ranks]
            return [_nemo(options.template, pair) for pair in pairs_of(store, descriptor, ids, reviews)]

        for name, lines in blend_files(options.blend, options.prefix, splits, options.seed, own):
            write_stream(directory / name, lines)
            files.append(name)
    return Written(files=files, tally=tally, splits=splits, reviews=review_counts(reviews, splits))


def reviewed_splits(splits: dict[str, Ids], reviews: Reviews) -> dict[str, Ids]:
    """Each split without the pairs a person flagged. The assignment is made first, so a flag removes its pair
    and moves no other pair to another split."""
    if not reviews.flagged:
        return splits
    return {name: Ids(pid for pid in ids if pid not in reviews.flagged) for name, ids in splits.items()}


def review_counts(reviews: Reviews, splits: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """What the reviews changed in these files: pairs left out, and pairs written swapped."""
    if not (reviews.flagged or reviews.swapped):
        return {}
    kept = sum(1 for ids in splits.values() for pid in ids if pid in reviews.swapped)
    return {"flagged": len(reviews.flagged), "swapped": kept}


def _nemo(template: PromptTemplate, pair: PairRecord) -> Formatted:
    nemo = check(template, pair).nemo
    if nemo is None:
        raise ValueError(f"prompt {pair.prompt_id}: an unusable pair was assigned a split")
    return nemo


def stored_config(descriptor: RunDescriptor) -> RunConfig:
    """The run's config as its descriptor keeps it (secrets were never there)."""
    data: dict[str, Any] = {k: v for k, v in descriptor.config.items()}
    for role in ("policy", "judge"):
        data[role] = {k: v for k, v in (data.get(role) or {}).items() if k != "api_key_set"}
    return build_config(data)


@dataclass(frozen=True, kw_only=True)
class Exported:
    reviews: dict[str, int] = field(default_factory=dict)
    output_dir: Path
    files: list[str]
    pairs: int
    pending: int
    prompts: int


@dataclass(frozen=True, kw_only=True)
class Stored:
    """A finished (or stopped) run's open store, what it describes and its config."""

    store: Store
    descriptor: RunDescriptor
    cfg: RunConfig

    def pending(self) -> int:
        return pending(self.store, self.descriptor)

    def prompts(self) -> int:
        return self.store.count_results(self.descriptor.key())[0]


@contextmanager
def open_run(run_dir: Path) -> Iterator[Stored]:
    """A run's store, held open (and locked: a run still writing it would change the files under us)."""
    if not (run_dir / DB_NAME).is_file():
        raise InputError(f"{run_dir}: not a caiforge run (no {DB_NAME})")
    store = Store.open(run_dir)
    try:
        descriptor = RunDescriptor.load(store)
        if descriptor is None:
            raise InputError(
                f"{run_dir}: the store describes no run (made before caiforge 0.2?); rerun the same `caiforge run` "
                "command once to resume it, then export"
            )
        if descriptor.pipeline != "rl-cai":
            raise InputError(
                f"{run_dir}: a `caiforge {'revise' if descriptor.pipeline == 'sl-cai' else descriptor.pipeline}` "
                "folder holds no preference pairs to export; `revise` writes its trainer files itself (rerun it "
                "with --pairs and --format: every step is reused from its store)"
            )
        yield Stored(store=store, descriptor=descriptor, cfg=stored_config(descriptor))
    finally:
        store.close()


def export(run_dir: Path, formats: tuple[str, ...], output_dir: Path | None = None) -> Exported:
    out = output_dir or run_dir
    with open_run(run_dir) as run:
        out.mkdir(parents=True, exist_ok=True)
        options = options_of(run.cfg, blend=False)
        written = write_outputs(run.store, run.descriptor, options, out, seed_files=False, formats=formats)
        missing, prompts = run.pending(), run.prompts()
    return Exported(
        output_dir=out,
        files=sorted(written.files),
        pairs=sum(len(ids) for ids in written.splits.values()),
        pending=missing,
        prompts=prompts,
        reviews=written.reviews,
    )


def blend_run(run_dir: Path, spec: BlendSpec, output_dir: Path | None = None) -> Exported:
    """The seed's ``--blend-with`` files from a run's store: the same bytes ``run --blend-with`` writes."""
    out = output_dir or run_dir
    with open_run(run_dir) as run:
        if set(spec.splits) != set(run.cfg.splits):
            raise InputError(
                f"--blend-with must name exactly the run's splits {sorted(run.cfg.splits)}, it names "
                f"{sorted(spec.splits)}"
            )
        check_blend_files(spec.splits)
        options = options_of(run.cfg.model_copy(update={"blend_with": spec}))
        out.mkdir(parents=True, exist_ok=True)
        written = write_outputs(run.store, run.descriptor, options, out, seed_files=False, blend=True)
        missing, prompts = run.pending(), run.prompts()
    return Exported(
        output_dir=out, files=sorted(written.files), pairs=len(written.tally.usable), pending=missing, prompts=prompts
    )


@dataclass(frozen=True, kw_only=True)
class Blended:
    output_dir: Path
    files: list[str]
    manifest: Manifest


def usable_splits(run: Stored, options: Options, reviews: Reviews | None = None) -> dict[str, Ids]:
    """The run's split assignment, from one counting pass over its records (no file written), without the
    pairs a person flagged (``reviews``, read from the run's store when not given)."""
    tally = Tally()
    deque(tally.count(check(options.template, r) for r in records(run.store, run.descriptor)), maxlen=0)
    return reviewed_splits(
        options.assign(tally.usable), Reviews.of(run.store, run.descriptor) if reviews is None else reviews
    )


@dataclass(frozen=True, kw_only=True)
class RunSource:
    """A run as a blend's source: its pairs by reference, its config and the reviews they were read under."""

    source: Source
    cfg: RunConfig
    reviews: Reviews


def _run_source(run: Stored, run_dir: Path, amount: str | None) -> RunSource:
    """A run's usable pairs by reference, in its split order; their texts are read again when written. Flagged
    pairs are left out and swapped ones come out swapped, as in ``export``."""
    reviews = Reviews.of(run.store, run.descriptor)
    splits = usable_splits(run, options_of(run.cfg, blend=False), reviews)
    fetch = partial(pairs_of, run.store, run.descriptor, reviews=reviews)
    pairs: list[Ref] = [
        RunPair(
            prompt_id=pair.prompt_id, key=leak_key(clean(pair.prompt)), split=name, source=run_dir.name, fetch=fetch
        )
        for name, ids in splits.items()
        for pair in pairs_of(run.store, run.descriptor, ids)
    ]
    source = Source(name=run_dir.name, path=str(run_dir), kind="run", pairs=pairs, amount=amount)
    return RunSource(source=source, cfg=run.cfg, reviews=reviews)


def blend_reviews(runs: Iterable[RunSource]) -> tuple[dict[int, dict[str, int]], dict[str, int]]:
    """What the runs' reviews changed in a blend's files, per run source (by ``id`` of its :class:`Source`) and
    summed, counted as ``export`` counts them: each run's flagged pairs, and its swapped pairs among those the
    blend took (``Source.kept``). Empty where nothing was reviewed."""
    each: dict[int, dict[str, int]] = {}
    for run in runs:
        taken = {run.source.name: [ref.prompt_id for ref in run.source.kept if isinstance(ref, RunPair)]}
        if counts := review_counts(run.reviews, taken):
            each[id(run.source)] = counts
    total = {key: sum(c[key] for c in each.values()) for key in ("flagged", "swapped")} if each else {}
    return each, total


def _outside_source(path: Path, amount: str | None, ratios: dict[str, float]) -> Source:
    """A TRL JSONL/Parquet file (named by its split, or split by the ratios) or a folder of split files."""
    if path.is_dir():
        files = {p.stem: p for p in sorted(path.glob("*.parquet"))} | {p.stem: p for p in sorted(path.glob("*.jsonl"))}
        if not files:
            raise InputError(f"{path}: a source folder needs split files such as train.jsonl or test.parquet")
        pairs: list[Ref] = [pair for stem, file in files.items() for pair in trl_pairs(file, stem, path.name)]
    elif path.is_file():
        pairs = list(trl_pairs(path, path.stem if path.stem in ratios else None, path.name))
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
    """Runs and outside datasets into one set of splits, in every format asked for; no model is called. The
    runs' stores stay open until the files are written: their pairs are read from them a batch at a time."""
    with ExitStack() as stack:
        opened: dict[Path, Stored] = {}

        runs: list[RunSource] = []

        def run_source(path: Path, amount: str | None) -> RunSource:
            where = path.resolve()
            if where not in opened:  # a run named twice is opened (and locked) once
                opened[where] = stack.enter_context(open_run(path))
            runs.append(_run_source(opened[where], path, amount))
            return runs[-1]

        sources: list[Source] = []
        base: RunConfig | None = None
        for run_dir in run_dirs:
            run = run_source(run_dir, None)
            sources.append(run.source)
            base = base or run.cfg
        parsed = [parse_source(text) for text in given]
        for path, amount in parsed:
            if (path / DB_NAME).is_file():
                run = run_source(path, amount)
                sources.append(run.source)
                base = base or run.cfg
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
                    nemo: list[Ref] = list(nemo_pairs(prompts, comparisons, template, split, spec.name))
                    sources.append(Source(name=spec.name, path=str(comparisons), kind="nemo", pairs=nemo))
        if not sources:
            raise InputError("blend: name at least one run folder, --source or --blend-with")
        seed = seed if seed is not None else (base.seed if base else 1234)
        prefix = base.output_filename_prefix if base else "cai_rlaif"
        mixed = mix(sources, ratios, template, seed, prefix)
        output_dir.mkdir(parents=True, exist_ok=True)
        files = write_table(output_dir, mixed.table, formats)
    reviewed, reviews = blend_reviews(runs)
    manifest = Manifest(
        caiforge=__version__,
        counts=Counts(pairs=sum(mixed.splits.values()), splits=mixed.splits),
        formats=list(formats),
        files=sorted(files),
        blend={
            "seed": seed,
            "ratios": ratios,
            "sources": [
                {**s.report(), **({"reviews": reviewed[id(s)]} if id(s) in reviewed else {})} for s in mixed.sources
            ],
            "leaks_moved": mixed.leaks_moved,
        },
        **({"reviews": reviews} if reviews else {}),
    )
    manifest.write(output_dir)
    write_files(output_dir, {"README.md": blend_card(manifest)})
    return Blended(output_dir=output_dir, files=sorted(files), manifest=manifest)
