"""The candidate stage as pure functions: names, keys and records of the policy's responses."""

from __future__ import annotations


def candidate_key(temperature: float) -> str:
    """The seed's column name, ``response_t=0.51``: ``str`` of the float, as its numpy list prints."""
    return f"response_t={temperature}"


def temperature_of(key: str) -> float | None:
    """The temperature a ``response_t=...`` column names; None for any other key."""
    try:
        return float(key.removeprefix("response_t=")) if key.startswith("response_t=") else None
    except ValueError:
        return None


def candidate_label(key: str) -> str:
    """``response_t=0.51`` -> ``t=0.51``: the short name plots use."""
    return key.removeprefix("response_")


def candidate_record(prompt: str, responses: dict[float, str]) -> dict[str, str]:
    """One row of ``cai_candidate_dataset.json``."""
    return {"prompt": prompt, **{candidate_key(t): text for t, text in responses.items()}}
