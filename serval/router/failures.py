"""Whose fault a backend's error answer is, and what a failed attempt carries back to the routing loop.

The routing loop retries a failure elsewhere and counts it against the backend's breaker only when the backend
is at fault. An answer the request caused (any 4xx, or a 5xx whose OpenAI error body blames the request) would
come back the same from every backend: retrying it only spreads it, and counting it lets a handful of bad
requests open every breaker of a healthy fleet.
"""
from __future__ import annotations

import json

from starlette.responses import Response

# OpenAI's error `type` says whose fault an error is, whatever the status: `invalid_request_error` is the
# request's, `server_error` the server's. vLLM names its types after its exception classes. An engine whose
# validation error escaped as a 500 still says the request was at fault here, and that is what we trust.
REQUEST_FAULT_TYPES = frozenset({"invalid_request_error", "BadRequestError", "NotFoundError"})
# Codes that only a request can cause, for servers that put the blame in `code` rather than `type`.
# `request_failed` is `serval serve`'s answer for the requests of an engine step that raised: the engine goes on
# serving, so the backend is healthy, and the request that broke the step would break a step on the next backend
# too, failing the requests batched with it there. So it is relayed, not retried, and not held against a breaker.
REQUEST_FAULT_CODES = frozenset({"context_length_exceeded", "invalid_value", "invalid_type",
                                 "missing_required_parameter", "model_not_found", "unsupported_request",
                                 "invalid_json", "request_failed"})


def error_fields(content: bytes) -> dict:
    """The `error` object of an OpenAI error body, or {} when the body is not one."""
    try:
        payload = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return {}
    error = payload.get("error") if isinstance(payload, dict) else None
    return error if isinstance(error, dict) else {}


def request_at_fault(status: int, content: bytes) -> bool:
    """True when the request, not the backend, caused this answer: any 4xx but 429 (the backend is busy), or a
    5xx whose OpenAI error body names the request as the cause."""
    if status == 429:
        return False
    if 400 <= status < 500:
        return True
    error = error_fields(content)
    return error.get("type") in REQUEST_FAULT_TYPES or error.get("code") in REQUEST_FAULT_CODES


class AttemptFailed(Exception):
    """An attempt that failed before anything reached the client.

    `reached_backend`: the backend may have read the request (anything but a refused connection), so the request
    itself could be what failed it; such failures are retried at most once. `response`: the backend's own answer
    (a 5xx or 429), relayed to the client when no retry is left. `attempt`: the Attempt it ended, set by the
    routing loop.
    """

    def __init__(self, outcome: str, detail: str, reached_backend: bool = True,
                 response: Response | None = None) -> None:
        super().__init__(detail)
        self.outcome, self.detail, self.reached_backend, self.response = outcome, detail, reached_backend, response
        self.attempt = None
