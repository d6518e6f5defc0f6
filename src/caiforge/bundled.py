"""The bundled defaults: a small red-team prompt set and a constitution, written for caiforge.

They let ``caiforge run`` work with no arguments; ``caiforge init`` copies them out for editing.
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

from .errors import InputError

PROMPTS = "red_team_prompts.jsonl"
CONSTITUTION = "constitution.txt"
PRINCIPLES = "principles.yaml"


def path(name: str) -> Path:
    """A bundled file on disk (package data is installed as plain files)."""
    return Path(str(resources.files("caiforge") / "data" / name))


def init(dest: Path, force: bool = False) -> list[Path]:
    """Copy the bundled prompts and constitution into ``dest``; never overwrite without ``force``."""
    targets = [dest / PROMPTS, dest / CONSTITUTION]
    existing = [t for t in targets if t.exists()]
    if existing and not force:
        raise InputError(f"{existing[0]}: already exists; pass --force to overwrite")
    dest.mkdir(parents=True, exist_ok=True)
    for target in targets:
        shutil.copyfile(path(target.name), target)
    return targets
