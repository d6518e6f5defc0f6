"""The layers of docs/architecture.md hold: the import-linter contracts in pyproject.toml are kept.

A second, deliberately broken contract proves the check reads the real import graph (a check that cannot
fail proves nothing)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).parent / "lint-imports"


def lint(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT), "--config", str(config), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_every_layer_contract_is_kept():
    result = lint(ROOT / "pyproject.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_a_contract_the_code_breaks_is_reported(tmp_path):
    config = tmp_path / "broken.toml"
    config.write_text(
        '[tool.importlinter]\nroot_package = "caiforge"\n\n'
        "[[tool.importlinter.contracts]]\n"
        'name = "the run command does not use the engine (false)"\n'
        'type = "forbidden"\nsource_modules = ["caiforge.pipeline"]\nforbidden_modules = ["caiforge.engine"]\n',
        encoding="utf-8",
    )
    result = lint(config)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and "caiforge.pipeline -> caiforge.engine" in result.stdout
