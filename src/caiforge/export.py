"""``caiforge export``: every format, from a run's store alone (no model is called, no server is needed).

The records and the split assignment are exactly those ``run`` wrote its files from, so the same store gives
byte-identical files. A run that is not finished exports what is finished and says how much is missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import BlendSpec, RunConfig, build_config
from .errors import InputError
from .formats import FORMATS, run_table
from .inputs import check_jsonl, read_text
from .outputs import write_files
from .records import Record, RunDescriptor, pending, records
from .store import DB_NAME, Store
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
            prompts=sum(1 for _ in store.results(descriptor.key())),
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
    for split in spec.splits.values():
        for path in split["prompts"]:
            check_jsonl(path, "blend prompts")
        for path in split["comparisons"]:
            check_jsonl(path, "blend comparisons", even_lines=True)
    data = dataset_of(run.cfg.model_copy(update={"blend_with": spec}), run.records)
    files = {k: v for k, v in WRITERS["seed"](data, data.assign_splits()).items() if k.startswith("blend_")}
    out = output_dir or run_dir
    out.mkdir(parents=True, exist_ok=True)
    write_files(out, files)
    return Exported(
        output_dir=out, files=sorted(files), pairs=len(data.usable), pending=run.pending, prompts=run.prompts
    )
