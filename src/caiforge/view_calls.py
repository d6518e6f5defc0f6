"""One prompt's requests and raw replies, rebuilt from the store alone, for the viewer's prompt page.

The store keeps replies by content key, not by prompt. So the viewer runs the prompt's pipeline again, with an
``ask`` that only reads the store: each request the pipeline makes is keyed as the engine keys it (the request
and the endpoint identity recorded in the descriptor), and its stored reply is returned. Nothing is sent. What the
page shows is exactly what the run asked, both judge passes and every parse retry included, with each reply's
tokens. A request that is not in the store ends the replay, and the page says so: the prompt is pending or failed
there.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from .errors import BackendError, InputError, StageFailed
from .records import RunDescriptor
from .request import Reply, Request


@dataclass(frozen=True)
class Call:
    role: str
    label: str
    request: str  # the request as JSON, as the pipeline made it
    reply: str
    prompt_tokens: int | None
    completion_tokens: int | None


class NotStored(BackendError):
    reason = "not in the store"


def _label(request: Request) -> str:
    parts = [f"{len(request.messages)} message(s)" if request.messages else "raw prompt"]
    for name in ("temperature", "seed", "max_tokens"):
        value = getattr(request, name)
        if value is not None:
            parts.append(f"{name} {value}")
    if request.logprobs:
        parts.append("logprobs")
    return ", ".join(parts)


def _pipeline(descriptor: RunDescriptor, ask: dict[str, Any]) -> Any:
    """The run's pipeline, rebuilt from its descriptor (and for RL-CAI the constitution file its config names,
    checked against the hash the descriptor holds)."""
    if descriptor.pipeline == "sl-cai":
        from .instructions import Instruction
        from .pipelines import slcai

        s = descriptor.settings
        revise = slcai.Settings(
            instructions=tuple(Instruction(c, r) for c, r in s["instructions"]),
            few_shot=tuple(s["few_shot"]),
            revisions=int(s["revisions"]),
            seed=int(s["seed"]),
            temperature=s["temperature"],
        )
        return slcai.SlCai(revise, ask, lambda _: None)
    from .export import stored_config
    from .pipeline import judge_spec, load_judging
    from .pipelines import rlcai

    cfg = stored_config(descriptor)
    spec = judge_spec(cfg, *load_judging(cfg))
    if spec.key_parts() != descriptor.settings.get("judge"):
        raise InputError("the constitution file changed since the run, so its judge requests cannot be rebuilt")
    settings = rlcai.Settings(temperatures=tuple(descriptor.settings["temperatures"]), judge=spec)
    return rlcai.RlCai(settings, ask, lambda _: None)


def calls(db: sqlite3.Connection, descriptor: RunDescriptor, prompt_id: str, prompt: str) -> list[Call] | str:
    """The requests the pipeline made for ``prompt``, in order, or why they cannot be shown (``db``: the store)."""
    made: list[Call] = []

    def asker(role: str) -> Any:
        identity = descriptor.identities[role]

        async def ask(request: Request) -> Reply:
            found = db.execute(
                "SELECT text, prompt_tokens, completion_tokens, top_logprobs FROM replies WHERE key = ?",
                (request.key(identity),),
            ).fetchone()
            shown = json.dumps(
                {k: v for k, v in vars(request).items() if v not in (None, False, [])}, ensure_ascii=False, indent=1
            )
            if found is None:
                made.append(Call(role, _label(request), shown, "(not in the store: never answered)", None, None))
                raise NotStored("not answered")
            text, prompt_tokens, completion_tokens, top = found
            made.append(Call(role, _label(request), shown, text, prompt_tokens, completion_tokens))
            return Reply(
                text=text,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                top_logprobs=json.loads(top) if top else None,
                cached=True,
            )

        return ask

    try:
        pipeline = _pipeline(descriptor, {role: asker(role) for role in descriptor.identities})
        asyncio.run(pipeline((prompt_id, prompt)))
    except (StageFailed, BackendError):
        pass  # the replay stops where the run stopped (the last call says why): what was made is what is shown
    except InputError as exc:
        return str(exc)
    return made
