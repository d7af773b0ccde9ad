"""What rails produce: a Decision per match (for metrics and the audit log), and GuardRejection for a request
the guard refuses. Neither ever carries the matched text: only its category."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    rail: str        # input_pii, input_deny, injection, max_prompt_tokens, output_pii, output_deny, api_key, ...
    action: str      # block, redact, log, stop, allow(ed) or reject
    category: str    # what matched: a PII type, 'deny:<rule>', 'injection', 'requests_per_minute', ...
    score: float | None = None


class GuardRejection(Exception):
    """A request the guard refuses: an HTTP status and OpenAI's error fields, never the offending text."""

    def __init__(self, status: int, message: str, code: str, rail: str, param: str | None = None,
                 retry_after: int | None = None, type: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.rail, self.param = status, message, code, rail, param
        self.retry_after = retry_after
        self.type = type or {401: "authentication_error", 403: "permission_error",
                             429: "rate_limit_error"}.get(status, "invalid_request_error")
