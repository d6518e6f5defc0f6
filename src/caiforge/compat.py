"""The seed's two Python functions, same names and signatures, running on caiforge's engine.

Differences are fixes, not features: no last batch is dropped, and a judge that names the same response twice
gets another try instead of a random pair (``None`` when it never gives a valid decision, as the seed returns
``None`` for replies it cannot parse).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from .backends import make_judge, make_policy
from .config import Sampling, build_config
from .engine import Engine, EngineSettings
from .errors import BadModelOutput
from .inputs import read_prompts
from .store import Store
from .verdicts import JudgeSpec

SAMPLING_KEYS = tuple(Sampling.model_fields)  # the seed's inference_config keys, minus host/port


def _settings(temperatures: tuple[float, ...], constitution: str, seed: int, concurrency: int) -> EngineSettings:
    """The seed's judging: its layout, fixed order, one pass, plain-text decisions."""
    return EngineSettings(
        temperatures=temperatures,
        judge=JudgeSpec(constitution=constitution, seed=seed, layout="seed", structured=False),
        seed=seed,
        max_retries=6,
        parse_retries=3,
        policy_concurrency=concurrency,
        judge_concurrency=1,
    )


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
        policy = make_policy(cfg)
        engine = Engine(policy, None, Store(Path(":memory:")), _settings(temps, "", 0, policy.default_concurrency))
        try:
            rows = await asyncio.gather(*(asyncio.gather(*(engine.generate(p, t) for t in temps)) for p in prompts))
        finally:
            await policy.aclose()
        return [
            {"prompt": p, **{f"response_t={t}": r for t, r in zip(temps, row, strict=True)}}
            for p, row in zip(prompts, rows, strict=True)
        ]

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
            "judge": {"backend": "openai", "url": ngc_url, "model": ngc_model, "api_key": ngc_api_key or None},
            "policy": {"backend": "nemo"},
        }
    )

    async def main() -> dict[str, Any] | None:
        judge = make_judge(cfg)
        engine = Engine(None, judge, Store(Path(":memory:")), _settings((0.0, 1.0), system_prompt, seed, 1))
        try:
            verdict = await engine.verdict(prompt, candidates)
        except BadModelOutput:
            return None
        finally:
            await judge.aclose()
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
