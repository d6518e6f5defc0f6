"""The seed's two Python functions, same names and signatures, running on caiforge's engine.

Differences are fixes, not features: no last batch is dropped, and a judge that names the same response twice
gets another try instead of a random pair (``None`` when it never gives a valid decision, as the seed returns
``None`` for replies it cannot parse).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from . import backends
from .candidates import candidate_record
from .config import RunConfig, Sampling, build_config
from .engine import Engine
from .errors import BadModelOutput
from .inputs import read_prompts
from .request import Request
from .session import endpoint_settings
from .store import Store
from .verdicts import JudgeSpec, decide

SAMPLING_KEYS = tuple(Sampling.model_fields)  # the seed's inference_config keys, minus host/port


def _engine(cfg: RunConfig, role: str) -> Engine:
    """One role's engine over an in-memory store: the seed's functions keep nothing between calls."""
    backend = backends.make(cfg, role)
    return Engine({role: (backend, endpoint_settings(cfg, role, backend))}, Store(Path(":memory:")), seed=cfg.seed)


def generate_cai_rlaif_candidate_dataset(
    batch_size: int,
    temperatures: list[float] | float,
    red_teaming_dataset_path: str,
    inference_config: dict[str, Any],
    prompt_template_config: dict[str, Any] | None = None,
) -> list[dict[str, str]]:
    """Candidates from a NeMo server (``inference_config`` holds ``host``, ``port`` and sampling flags)."""
    temps = tuple(temperatures) if isinstance(temperatures, (list, tuple)) else (float(temperatures),)
    sampling = {k: inference_config[k] for k in SAMPLING_KEYS if inference_config.get(k) is not None}
    cfg = build_config(
        {
            "prompts_path": red_teaming_dataset_path,
            "template": {k: v for k, v in (prompt_template_config or {}).items()},
            "policy": {
                "backend": "nemo",
                "host": inference_config.get("host", "localhost"),
                "port": inference_config.get("port", 5656),
                "batch_size": batch_size,
                "sampling": sampling,
            },
        }
    )
    records, _ = read_prompts(Path(red_teaming_dataset_path))
    prompts = list(dict.fromkeys(r.text for r in records))

    async def main() -> list[dict[str, str]]:
        engine = _engine(cfg, "policy")
        ask = engine.asker("policy")

        async def one(prompt: str, t: float) -> str:
            return (await ask(Request(messages=[{"role": "user", "content": prompt}], temperature=t))).text

        try:
            rows = await asyncio.gather(*(asyncio.gather(*(one(p, t) for t in temps)) for p in prompts))
        finally:
            await engine.aclose()
            for backend, _ in engine.endpoints().values():
                await backend.aclose()
        return [candidate_record(p, dict(zip(temps, row, strict=True))) for p, row in zip(prompts, rows, strict=True)]

    return asyncio.run(main())


def generate_ai_preference(
    sample: dict[str, Any], ngc_api_key: str, system_prompt: str, seed: int, ngc_url: str, ngc_model: str
) -> dict[str, Any] | None:
    """Judge one candidate record; the seed's preference dict, or ``None`` without a valid decision."""
    prompt = sample.get("prompt")
    keys = sorted(k for k in sample if k.startswith("response"))
    if not prompt or len(keys) < 2:
        return None
    candidates = [sample[k] for k in keys]
    cfg = build_config(
        {
            "judge": {
                "backend": "openai",
                "url": ngc_url,
                "model": ngc_model,
                "api_key": ngc_api_key or None,
                "concurrency": 1,
            },
            "policy": {"backend": "nemo"},
        }
    )

    # The seed's judging: its layout, fixed order, one pass, plain-text decisions.
    spec = JudgeSpec(constitution=system_prompt, seed=seed, layout="seed", structured=False)

    async def main() -> dict[str, Any] | None:
        engine = _engine(cfg, "judge")
        try:
            verdict = await decide(engine.asker("judge"), spec, prompt, candidates)
        except BadModelOutput:
            return None
        finally:
            await engine.aclose()
            for backend, _ in engine.endpoints().values():
                await backend.aclose()
        chosen, rejected = verdict.chosen, verdict.rejected
        return {
            "prompt": prompt,
            "chosen": candidates[chosen],
            "rejected": candidates[rejected],
            "raw": {
                "chosen_response_key": keys[chosen],
                "rejected_response_key": keys[rejected],
                "explanation": verdict.explanation,
                "all_responses": {k: sample[k] for k in keys},
            },
        }

    return asyncio.run(main())
