"""One exception tree for caiforge.

    CaiforgeError
    ├── InputError            bad flags, bad files: exit code 2, one line on stderr, never a traceback
    ├── RunAborted            the run stopped on purpose (Ctrl-C, SIGTERM, failure rate): resumable
    ├── StageFailed           a pipeline could not finish one item: its stage, its cause, whether it counts
    └── BackendError          a request to a model failed
        ├── TransientError    worth retrying: 429, 5xx, timeouts, connection resets, truncated bodies
        │   ├── RateLimited   429, with the server's Retry-After when it sent one
        │   └── Unreachable   no connection was made (refused, unknown host, connect timeout)
        ├── PermanentError    not worth retrying: 4xx other than 408/429, a bad URL
        │   └── Refused       a request-validation error naming fields we sent (any status): adapt, never retry
        └── BadModelOutput    the model answered, but not usably (no decision, ids out of range, ...)

Lower-layer errors (aiohttp, json, OSError) are translated with ``raise X(...) from exc`` at the edge that
sees them, so the engine only ever reasons about this tree.
"""

from __future__ import annotations


class CaiforgeError(Exception):
    """Base of every error caiforge raises on purpose."""


class InputError(CaiforgeError):
    """A usage or input problem the user can fix; the message names the file, line and problem."""


class RunAborted(CaiforgeError):
    """The run stopped before finishing; what was done is kept and a rerun continues from there."""


class StageFailed(CaiforgeError):
    """One item (a prompt) ends as a recorded failure: at ``stage``, because of ``error``.

    ``counts`` says whether it counts against ``--max-failure-rate`` (a judge that cannot stand behind a label
    says something about the data, not about a broken run); ``keep`` is what the item made before it failed
    (a prompt's candidates), kept with the failure."""

    def __init__(self, stage: str, error: BackendError, *, counts: bool = True, keep: dict[str, object] | None = None):
        super().__init__(str(error))
        self.stage, self.error, self.counts, self.keep = stage, error, counts, keep or {}

    @property
    def reason(self) -> str:
        return self.error.reason


class BackendError(CaiforgeError):
    """A model request did not give a usable answer."""

    reason = "backend error"


class TransientError(BackendError):
    """Retrying the same request later may well succeed."""

    reason = "transient error"


class RateLimited(TransientError):
    """HTTP 429; ``retry_after`` is the server's hint in seconds, if it gave one."""

    reason = "rate limited (429)"

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unreachable(TransientError):
    """No connection was made; ``problem`` says why in words that are the same for the same cause."""

    def __init__(self, message: str, problem: str) -> None:
        super().__init__(message)
        self.problem = problem


class PermanentError(BackendError):
    """Retrying cannot help (bad request, unauthorised, not found)."""

    reason = "permanent error"

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Refused(PermanentError):
    """The server rejected fields of the request (e.g. ``response_format``, ``top_k``) as invalid.

    Deterministic whatever the status (llama-cpp-python answers a validation error with HTTP 500): sending the
    same body again cannot succeed, so the backend steps down (drops the field, or a simpler structured-output
    form) instead of retrying.
    """

    reason = "request refused"

    def __init__(self, message: str, status: int | None, fields: frozenset[str]) -> None:
        super().__init__(message, status)
        self.fields = fields


class BadModelOutput(BackendError):
    """The model answered but its text is unusable; retried with another seed, then recorded."""

    reason = "bad model output"
