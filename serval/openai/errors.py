"""Errors as OpenAI's clients expect them: one APIError with the fields of OpenAI's error body, and
InvalidArgument, the ValueError the engine and SamplingParams raise with the name of the argument at fault.

The server and the router answer every failure with `APIError.response()`; nobody parses exception text.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING

from starlette.responses import JSONResponse

if TYPE_CHECKING:
    from pydantic import ValidationError

    from serval.guard.decisions import GuardRejection


class InvalidArgument(ValueError):
    """A request argument out of its allowed range. `param` is the OpenAI body field it came from."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param


def parse_json_object(value: str | dict | None) -> dict | None:
    """A JSON-object argument (a flag's JSON text, or a dict from Python) as a dict with string keys; None stays
    None. ValueError says what is wrong; callers name the argument."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"not JSON ({error})") from None
    if value is not None and (not isinstance(value, dict) or not all(isinstance(key, str) for key in value)):
        raise ValueError("must be a JSON object")
    return value


class APIError(Exception):
    """An error with the fields of OpenAI's error body, its HTTP status and any headers (Retry-After)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    @classmethod
    def from_rejection(cls, rejection: "GuardRejection") -> "APIError":
        headers = {"Retry-After": str(rejection.retry_after)} if rejection.retry_after is not None else None
        return cls(rejection.status, rejection.message, type=rejection.type, param=rejection.param,
                   code=rejection.code, headers=headers)

    @classmethod
    def from_invalid_argument(cls, error: ValueError, default_param: str | None = None) -> "APIError":
        param = error.param if isinstance(error, InvalidArgument) else default_param
        return cls(400, str(error), param=param)

    @classmethod
    def from_validation_error(cls, error: "ValidationError") -> "APIError":
        first = error.errors()[0]
        # A validator that raised InvalidArgument knows the field better than the location it ran at (the body,
        # for a check across fields such as tool_choice against tools).
        wrapped = first.get("ctx", {}).get("error")
        if isinstance(wrapped, InvalidArgument):
            # inside a list item (messages.0), the item's place comes first: its validator knows only itself
            loc = first["loc"]
            item = max((i for i, part in enumerate(loc) if isinstance(part, int)), default=-1)
            place = _field_path(loc[:item + 1])
            return cls(400, str(wrapped), param=f"{place}.{wrapped.param}" if place else wrapped.param)
        param = _field_path(first["loc"]) or None
        message = "; ".join(dict.fromkeys(f"{_field_path(e['loc']) or 'body'}: {e['msg']}" for e in error.errors()))
        return cls(400, message, param=param)

    @classmethod
    def overloaded(cls, message: str, retry_after: int = 1) -> "APIError":
        return cls(429, message, type="rate_limit_error", code="rate_limit_exceeded",
                   headers={"Retry-After": str(retry_after)})

    @classmethod
    def unavailable(cls, message: str, retry_after: int | None = None) -> "APIError":
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        return cls(503, message, type="server_error", headers=headers)


# Parts of a pydantic error location that name a member of a union ('str', 'list[str]', 'constrained-int',
# 'TextPart'), not a body field: a client's param is `stop`, not `stop.str`.
_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none", "any", "bytes"}


def _field_path(loc: tuple) -> str:
    return ".".join(str(part) for part in loc
                    if not (isinstance(part, str) and (part in _TYPE_NAMES or "[" in part or "-" in part
                                                        or part[:1].isupper())))
