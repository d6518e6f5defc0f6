"""caiforge: Constitutional-AI (RLAIF) preference datasets from AI feedback.

A faster, resumable, honest drop-in for NeMo-Aligner's ``generate_rl_cai_dataset.py``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .compat import generate_ai_preference, generate_cai_rlaif_candidate_dataset
from .config import RunConfig, build_config
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
from .template import PromptTemplate

__all__ = [
    "BackendError",
    "BadModelOutput",
    "CaiforgeError",
    "InputError",
    "PermanentError",
    "PromptTemplate",
    "RateLimited",
    "RunAborted",
    "RunConfig",
    "RunResult",
    "TransientError",
    "__version__",
    "build_config",
    "generate_ai_preference",
    "generate_cai_rlaif_candidate_dataset",
    "run",
    "run_async",
]
