"""Reading a request body as OpenAI's API expects: a size limit, then strict JSON.

Strict means what OpenAI answers 400 for and Python's json module lets through: bad UTF-8, `Infinity` and `NaN`
(and numbers that overflow to them), nesting deep enough to exhaust the parser's recursion, and lone UTF-16
surrogates (`"\\ud800"`), which decode to strings that cannot be encoded again and would fail later, deep in a
tokenizer or a response writer, as a 500.

`read_json_body` is what handlers call; `parse_json_body` is the synchronous parsing step alone, for a caller
that already holds the bytes (the router forwards them).
"""
from __future__ import annotations

import asyncio
import json
import math
import re
from itertools import accumulate

from starlette.requests import Request

from serval.openai.errors import APIError

# Deep enough for any real request (a JSON schema nests three JSON levels per schema level), far below the
# recursion limit of the json module and of anything that walks the parsed value afterwards.
MAX_JSON_DEPTH = 128

# Bodies larger than this are parsed on a worker thread, so the event loop keeps serving /health and streams.
OFF_LOOP_BYTES = 256 * 1024

# A JSON string with its escapes, unrolled so the regex engine does not backtrack per character.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKETS = {ord("["), ord("{"), ord("]"), ord("}")}
_NOT_BRACKETS = bytes(b for b in range(256) if b not in _BRACKETS)
_OPENERS = {ord("["), ord("{")}
# A \u escape of a UTF-16 surrogate: only bodies holding one can decode to a lone surrogate.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


def payload_too_large(max_bytes: int, size: int | None = None) -> APIError:
    given = f" ({size} bytes)" if size is not None else ""
    return APIError(413, f"The request body is too large{given}; the limit is {max_bytes} bytes.",
                    code="request_too_large")


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The body, or APIError 413 once it passes `max_bytes`. Content-Length is checked before reading, and bytes
    are counted as they arrive, so a chunked body (no Content-Length) is cut off at the limit too."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
        raise payload_too_large(max_bytes, int(declared))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise payload_too_large(max_bytes)
        chunks.append(chunk)
    body = b"".join(chunks)
    # Starlette caches the body here; later `await request.body()` or `request.json()` calls then read it
    # instead of a consumed stream.
    request._body = body
    return body


async def read_json_body(request: Request, max_bytes: int) -> object:
    """The body parsed as strict JSON (see `parse_json_body`), after the size limit of `read_body`. Large bodies
    are parsed off the event loop."""
    data = await read_body(request, max_bytes)
    if len(data) > OFF_LOOP_BYTES:
        return await asyncio.to_thread(parse_json_body, data)
    return parse_json_body(data)


def parse_json_body(data: bytes) -> object:
    """Parse a request body as strict JSON, or raise APIError 400 saying what is wrong (and where, for a lone
    surrogate). CPU-bound for large bodies: call it from a thread when `data` is big."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise APIError(400, f"The body is not valid UTF-8 (byte {error.start}).") from error
    if nests_deeper_than(data, MAX_JSON_DEPTH):
        raise APIError(400, f"The body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep.")
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except APIError:
        raise
    except json.JSONDecodeError as error:
        raise APIError(400, f"The body is not valid JSON: {error.msg} (line {error.lineno} column "
                            f"{error.colno}).") from error
    except RecursionError as error:
        raise APIError(400, "The body nests JSON too deeply.") from error
    except ValueError as error:  # an integer longer than Python converts (sys.get_int_max_str_digits)
        raise APIError(400, f"The body is not valid JSON: {error}") from error
    if _SURROGATE_ESCAPE.search(data):
        where = lone_surrogate_path(value)
        if where is not None:
            where = where[:200]
            raise APIError(400, f"{where or 'The body'} holds a lone UTF-16 surrogate (an unpaired \\ud800-"
                                "\\udfff escape), which is not valid Unicode text.", param=where or None)
    return value


def json_object(value: object) -> dict:
    """`value` if it is a JSON object, else APIError 400: every OpenAI request body is an object."""
    if not isinstance(value, dict):
        raise APIError(400, f"The body must be a JSON object, got {_json_type(value)}.")
    return value


def nests_deeper_than(data: bytes, limit: int) -> bool:
    """Whether arrays and objects nest more than `limit` levels deep in `data`, found without parsing it (brackets
    inside strings don't count). Runs in C except for one step per `limit` brackets, so it can run before the
    parser does, on any body."""
    brackets = _JSON_STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    depth = 0
    for start in range(0, len(brackets), limit):
        chunk = brackets[start:start + limit]
        openers = chunk.count(b"[") + chunk.count(b"{")
        # Inside this chunk the depth never rises above depth + openers; look closer only where that could pass
        # the limit.
        if depth + openers > limit and depth + _peak(chunk) > limit:
            return True
        depth += 2 * openers - len(chunk)
    return False


def _peak(brackets: bytes) -> int:
    return max(accumulate(1 if byte in _OPENERS else -1 for byte in brackets))


def lone_surrogate_path(value: object, path: str = "") -> str | None:
    """The path (`messages[0].content`, `model`; '' for the body itself) of the first string or key in `value`
    holding a lone surrogate, or None."""
    if isinstance(value, str):
        return path if _has_lone_surrogate(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            name = key.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")[:100]
            key_path = f"{path}.{name}" if path else name
            if _has_lone_surrogate(key):
                return key_path
            found = lone_surrogate_path(item, key_path)
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = lone_surrogate_path(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _reject_constant(name: str):
    raise APIError(400, f"The body holds {name}, which is not a JSON number; give a finite number.")


def _finite_float(literal: str) -> float:
    number = float(literal)
    if not math.isfinite(number):
        raise APIError(400, f"The number {literal[:40]} is out of range; give a finite number.")
    return number


def _json_type(value: object) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
