"""JSON over HTTP with aiohttp, chosen by measurement (``bench/http_clients.py``), errors translated.

Status codes map onto the error tree so the engine can decide what to retry: 429 -> RateLimited (with the
server's Retry-After), 408/5xx, timeouts, resets and unreadable bodies -> TransientError, other 4xx ->
PermanentError. A request-validation error that names fields we sent is Refused whatever its status
(llama-cpp-python answers one with HTTP 500): it is deterministic, so the backend adapts instead of retrying.
The API key is redacted from every message this module produces.
"""

from __future__ import annotations

import errno
import json
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import aiohttp

from ..errors import PermanentError, RateLimited, Refused, TransientError, Unreachable

# What a request-validation error says, across FastAPI/pydantic (vLLM, llama-cpp-python, SGLang), OpenAI, TGI.
_VALIDATION = re.compile(
    r"validation error|input should be|literal_error|extra_forbidden|extra inputs are not permitted|"
    r"unrecognized request argument|unknown field|not supported|unsupported|not permitted|not allowed|"
    r"invalid value|invalid type|is not valid|does not support",
    re.IGNORECASE,
)
# FastAPI's location of the offending field: ('body', 'response_format', 'type') or ["body", "top_k"].
_LOC = re.compile(r"""['"]loc['"]\s*:\s*[\(\[]\s*['"]body['"]\s*,\s*['"](\w+)['"]""")
# Words that name the structured-output field without spelling it (guided decoding in vLLM's older API).
STRUCTURED_WORDS = ("response_format", "json_schema", "json_object", "guided_json", "guided_decoding", "guided_grammar")


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); None when absent/garbled."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        import email.utils  # rare: only a Retry-After given as a date

        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _names(text: str, word: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(word)}(?![A-Za-z0-9_])", text) is not None


def refused_fields(status: int, text: str, payload: dict[str, Any] | None) -> frozenset[str]:
    """The fields of ``payload`` a 400/422/5xx body rejects as invalid; empty when it is not such an error.

    A pydantic ``loc`` is taken at its word; otherwise a field counts when the body names it and reads as a
    validation error. Structured-output aliases map onto ``response_format``.
    """
    if not payload or (status not in (400, 422) and status < 500):
        return frozenset()
    located = set(_LOC.findall(text))
    if not located:
        if status >= 500 and not _VALIDATION.search(text):
            return frozenset()
        located = {key for key in payload if _names(text, key)}
        if "response_format" in payload and any(_names(text, w) for w in STRUCTURED_WORDS):
            located.add("response_format")
    return frozenset(located & set(payload) - {"model", "messages", "prompt"})


def connection_problem(exc: BaseException) -> str:
    """A short, stable description of why no connection was made (the same cause gives the same words)."""
    import aiohttp

    if isinstance(exc, aiohttp.ClientConnectorError):
        err = exc.os_error
        if isinstance(err, ConnectionRefusedError) or getattr(err, "errno", None) == errno.ECONNREFUSED:
            return "connection refused"
        if isinstance(err, OSError) and err.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            return "host unreachable"
        if (
            "Name or service not known" in str(exc)
            or "nodename nor servname" in str(exc)
            or (exc.__class__.__name__ == "ClientConnectorDNSError")
        ):
            return "cannot resolve the host name"
        return f"cannot connect ({err.strerror or err})" if isinstance(err, OSError) else "cannot connect"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    if isinstance(exc, ConnectionResetError) or getattr(exc, "errno", None) == errno.ECONNRESET:
        return "connection reset"
    return f"connection failed ({exc.__class__.__name__}: {exc})"


# (method, url, json body, headers) -> (status, response headers, body): what a test double stands in for, as
# httpx's MockTransport does; errors it raises are translated like aiohttp's.
Transport = Callable[[str, str, dict[str, Any] | None, dict[str, str]], Awaitable[tuple[int, Mapping[str, str], bytes]]]


@dataclass(frozen=True)
class Timeout:
    """Seconds for the whole request and for the connection (None: no separate bound)."""

    total: float
    connect: float | None = None


class HttpClient:
    """aiohttp is imported when the first request is made, so that commands which send none start fast."""

    def __init__(self, timeout: float, api_key: str | None = None, transport: Transport | None = None) -> None:
        self._timeout = Timeout(timeout)
        self._api_key = api_key or None
        self._session: aiohttp.ClientSession | None = None
        self._bounds: dict[Timeout, aiohttp.ClientTimeout] = {}
        self._transport = transport
        self._headers_once: dict[str, str] | None = None

    async def _aiohttp(
        self, method: str, url: str, payload: dict[str, Any] | None, headers: dict[str, str], timeout: Timeout
    ) -> tuple[int, Mapping[str, str], bytes]:
        import aiohttp
        import orjson

        if self._session is None:
            # No connection cap here: the engine's limiter decides how many requests are in flight.
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=False))
        bounds = self._bounds.get(timeout)
        if bounds is None:
            bounds = self._bounds[timeout] = aiohttp.ClientTimeout(total=timeout.total, sock_connect=timeout.connect)
        data = None if payload is None else orjson.dumps(payload)
        async with self._session.request(method, url, data=data, headers=headers, timeout=bounds) as resp:
            body = await resp.read()
            retry_after = resp.headers.get("Retry-After")
            return resp.status, {"Retry-After": retry_after} if retry_after is not None else {}, body

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def _headers(self) -> dict[str, str]:
        if self._headers_once is None:
            headers = {"Content-Type": "application/json", "Accept": "application/json"}
            if self._api_key:
                headers["Authorization"] = f"Bearer {self._api_key}"
            self._headers_once = headers
        return self._headers_once

    async def request_json(
        self,
        method: str,
        url: str,
        payload: dict[str, Any] | None = None,
        timeout: Timeout | None = None,
    ) -> dict[str, Any]:
        import asyncio  # lookups in sys.modules once loaded: what the except clauses below name

        import aiohttp

        timeout = timeout or self._timeout
        try:
            if self._transport is not None:
                status, headers, body = await self._transport(method, url, payload, self._headers())
            else:
                status, headers, body = await self._aiohttp(method, url, payload, self._headers(), timeout)
            retry_after = headers.get("Retry-After")
        except asyncio.TimeoutError as exc:
            if isinstance(exc, aiohttp.ConnectionTimeoutError):
                problem = f"no connection within {timeout.connect or timeout.total:g}s"
                raise Unreachable(self._redact(f"{problem}: {url}"), problem) from exc
            raise TransientError(self._redact(f"no answer within {timeout.total:g}s: {method} {url}")) from exc
        except aiohttp.ClientPayloadError as exc:
            msg = f"truncated response body ({exc.__class__.__name__}): {method} {url}"
            raise TransientError(self._redact(msg)) from exc
        except aiohttp.InvalidURL as exc:
            raise PermanentError(f"invalid URL {url!r}") from exc
        except aiohttp.ClientConnectorError as exc:
            problem = connection_problem(exc)
            raise Unreachable(self._redact(f"{problem}: {url}"), problem) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise TransientError(self._redact(f"{connection_problem(exc)}: {url}")) from exc
        if 200 <= status < 300:  # the common case, parsed from the bytes (orjson: a third of json's cost)
            import orjson

            try:
                data = orjson.loads(body)
                if isinstance(data, dict):
                    return data
            except orjson.JSONDecodeError:
                pass  # json below says why, and takes what orjson does not (NaN, -Infinity log-probabilities)
        text = self._redact(body.decode("utf-8", errors="replace"))
        where = self._redact(f"{method} {url}")
        if status == 429:
            raise RateLimited(f"{where}: HTTP 429", parse_retry_after(retry_after))
        fields = refused_fields(status, text, payload)
        if fields:
            names = ", ".join(sorted(fields))
            raise Refused(f"{where}: HTTP {status}, the server refused {names}: {text[:300]}", status, fields)
        if status == 408 or status >= 500:
            raise TransientError(f"{where}: HTTP {status}: {text[:200]}")
        if status >= 400:
            hint = " (check the API key)" if status in (401, 403) else ""
            raise PermanentError(f"{where}: HTTP {status}{hint}: {text[:300]}", status)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TransientError(f"{where}: response is not JSON: {text[:120]!r}") from exc
        if not isinstance(data, dict):
            raise TransientError(f"{where}: response JSON is not an object")
        return data

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
