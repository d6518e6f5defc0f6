"""Each endpoint is checked with the cheapest call its protocol has before the run sends a real request.

A typo in a port, a refused key or a wrong model name should cost two seconds and one clear line, not
minutes of retries ending in "transient error". OpenAI-compatible servers get ``GET /v1/models``; when the
list does not name our model, one single-token request settles it (llama.cpp answers whatever it loaded,
vLLM refuses an unknown name). NeMo gets a one-token generate.
"""

from __future__ import annotations

from typing import Any

from ..errors import InputError, PermanentError, TransientError, Unreachable
from .http import HttpClient, Timeout

CHECK_TIMEOUT = Timeout(total=10, connect=2)


class EndpointError(InputError):
    """An endpoint that cannot serve the run; the message is one line: where, what, and what to type."""


def base_url(url: str) -> str:
    """``http://h:8000/v1/chat/completions`` -> ``http://h:8000/v1``."""
    url = url.rstrip("/")
    for tail in ("/chat/completions", "/completions"):
        if url.endswith(tail):
            return url[: -len(tail)]
    return url


def _key_hint(key_env: str, key_flag: str | None) -> str:
    flag = f" (or pass {key_flag})" if key_flag else ""
    return f"export {key_env}=<your key>{flag}"


async def check_openai(
    http: HttpClient,
    *,
    role: str,
    url: str,
    model: str,
    chat: bool,
    url_flag: str,
    model_flag: str,
    key_env: str,
    key_flag: str | None = None,
) -> str | None:
    """Raises EndpointError when the endpoint cannot serve; returns a note worth printing, if any."""
    base = base_url(url)
    where = f"{role} endpoint {base}"
    try:
        listing = await http.request_json("GET", f"{base}/models", timeout=CHECK_TIMEOUT)
    except Unreachable as exc:
        raise EndpointError(f"{where}: {exc.problem}; start the server there, or fix {url_flag}") from exc
    except TransientError as exc:
        return f"{where}: GET /models did not answer cleanly ({str(exc)[:120]}); going on"
    except PermanentError as exc:
        if exc.status in (401, 403):
            raise EndpointError(
                f"{where}: HTTP {exc.status}, the API key was refused or is missing; {_key_hint(key_env, key_flag)}"
            ) from exc
        if exc.status in (404, 405):
            return None  # no model list here: the first request will tell
        raise EndpointError(f"{where}: GET /models failed: {str(exc)[:200]}") from exc
    served = [str(m.get("id")) for m in listing.get("data") or [] if isinstance(m, dict)]
    if model in served:
        return None
    probe: dict[str, Any] = {"model": model, "max_tokens": 1}
    if chat:
        probe["messages"] = [{"role": "user", "content": "Hello"}]
    else:
        probe["prompt"] = "Hello"
    try:
        await http.request_json("POST", url, probe, timeout=CHECK_TIMEOUT)
    except PermanentError as exc:
        if exc.status in (400, 404, 422) and "model" in str(exc).lower():
            some = ", ".join(served[:5]) + (", ..." if len(served) > 5 else "")
            fix = f"use {model_flag} {served[0]}" if served else f"fix {model_flag}"
            raise EndpointError(f"{where}: model {model!r} is not served there (it serves: {some}); {fix}") from exc
        return None  # some other refusal: the run adapts to it or records it
    except TransientError:
        return None
    return None if not served else f"{where}: model {model!r} is not in its list ({served[0]}, ...), but it answers"


async def check_nemo(http: HttpClient, url: str) -> None:
    """One-token generate on NeMo's ``PUT /generate``."""
    payload = {"sentences": ["Hello"], "tokens_to_generate": 1, "temperature": 1.0, "add_BOS": False}
    try:
        await http.request_json("PUT", url, payload, timeout=CHECK_TIMEOUT)
    except Unreachable as exc:
        fix = "start the NeMo server, or fix --host/--port"
        raise EndpointError(f"policy endpoint {url}: {exc.problem}; {fix}") from exc
    except TransientError:
        pass  # reachable; a busy or flaky server is the run's to retry
    except PermanentError as exc:
        raise EndpointError(f"policy endpoint {url}: a one-token generate failed: {str(exc)[:200]}") from exc
