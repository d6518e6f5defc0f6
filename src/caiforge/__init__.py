"""caiforge: Constitutional-AI (RLAIF) preference datasets from AI feedback.

A faster, resumable, honest drop-in for NeMo-Aligner's ``generate_rl_cai_dataset.py``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

# Imported on first use (PEP 562): a command imports only what it runs, so `caiforge --help` stays fast.
_EXPORTS = {
    "generate_ai_preference": "compat",
    "generate_cai_rlaif_candidate_dataset": "compat",
    "RunConfig": "config",
    "build_config": "config",
    "revise_config": "config",
    "BackendError": "errors",
    "BadModelOutput": "errors",
    "CaiforgeError": "errors",
    "InputError": "errors",
    "PermanentError": "errors",
    "RateLimited": "errors",
    "RunAborted": "errors",
    "TransientError": "errors",
    "RunResult": "pipeline",
    "run": "pipeline",
    "run_async": "pipeline",
    "ReviseResult": "revise",
    "revise": "revise",
    "revise_async": "revise",
    "PromptTemplate": "template",
}

if TYPE_CHECKING:
    from .compat import generate_ai_preference, generate_cai_rlaif_candidate_dataset
    from .config import RunConfig, build_config, revise_config
    from .errors import (
        BackendError,
        BadModelOutput,
        CaiforgeError,
        InputError,
        PermanentError,
        RateLimited,
        RunAborted,
        TransientError,
    )
    from .pipeline import RunResult, run, run_async
    from .revise import ReviseResult, revise, revise_async
    from .template import PromptTemplate


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'caiforge' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "BackendError",
    "BadModelOutput",
    "CaiforgeError",
    "InputError",
    "PermanentError",
    "PromptTemplate",
    "RateLimited",
    "ReviseResult",
    "RunAborted",
    "RunConfig",
    "RunResult",
    "TransientError",
    "__version__",
    "build_config",
    "generate_ai_preference",
    "generate_cai_rlaif_candidate_dataset",
    "revise",
    "revise_async",
    "revise_config",
    "run",
    "run_async",
]
