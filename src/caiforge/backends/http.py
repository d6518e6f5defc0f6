"""JSON over HTTP with aiohttp, chosen by measurement (``bench/http_clients.py``), errors translated.

Status codes map onto the error tree so the engine can decide what to retry: 429 -> RateLimited (with the
server's Retry-After), 408/5xx, timeouts, resets and unreadable bodies -> TransientError, other 4xx ->
PermanentError. The API key is redacted from every message this module produces.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from typing import Any

import aiohttp

from ..errors import PermanentError, RateLimited, TransientError


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); None when absent/garbled."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class HttpClient:
    def __init__(self, timeout: float, api_key: str | None = None) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._api_key = api_key or None
        self._session: aiohttp.ClientSession | None = None

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    async def request_json(self, method: str, url: str, payload: dict[str, Any]) -> dict[str, Any]:
        if self._session is None:
            # No connection cap here: the engine's limiter decides how many requests are in flight.
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, connector=aiohttp.TCPConnector(limit=0, force_close=False)
            )
        try:
            async with self._session.request(method, url, json=payload, headers=self._headers()) as resp:
                body = await resp.read()
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
        except asyncio.TimeoutError as exc:
            raise TransientError(self._redact(f"{method} {url}: no answer within {self._timeout.total:g}s")) from exc
        except aiohttp.ClientPayloadError as exc:
            msg = f"{method} {url}: truncated response body ({exc.__class__.__name__})"
            raise TransientError(self._redact(msg)) from exc
        except aiohttp.InvalidURL as exc:
            raise PermanentError(f"invalid URL {url!r}") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise TransientError(self._redact(f"{method} {url}: connection failed: {exc!r}")) from exc
        text = body.decode("utf-8", errors="replace")
        if status == 429:
            raise RateLimited(self._redact(f"{method} {url}: HTTP 429"), parse_retry_after(retry_after))
        if status == 408 or status >= 500:
            raise TransientError(self._redact(f"{method} {url}: HTTP {status}: {text[:200]}"))
        if status >= 400:
            hint = " (check the API key)" if status in (401, 403) else ""
            raise PermanentError(self._redact(f"{method} {url}: HTTP {status}{hint}: {text[:300]}"), status)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TransientError(self._redact(f"{method} {url}: response is not JSON: {text[:120]!r}")) from exc
        if not isinstance(data, dict):
            raise TransientError(self._redact(f"{method} {url}: response JSON is not an object"))
        return data

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
