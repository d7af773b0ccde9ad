"""`pythonic`: Llama 3.2 / Llama 4 calls written as a Python list, `[get_weather(city="SF"), f(a=1)]`.

The list must open the answer (Llama 4 may wrap it in `<|python_start|>...<|python_end|>`). Each call is read
with `ast` (never eval) once its closing parenthesis arrives and sent whole; keyword values must be literals,
converted to JSON. A call that is not one (positional arguments, a non-literal, inf) is dropped, its siblings
kept."""
from __future__ import annotations

import ast
import json
import re

from serval.openai.tool_parsers.base import ToolParser

PYTHON_START, PYTHON_END = "<|python_start|>", "<|python_end|>"
_LIST_OPENING = re.compile(r"\[\s*[A-Za-z_][\w.]*\s*\(")
_OPENERS, _CLOSERS = "([{", ")]}"


def _could_open_list(text: str) -> bool:
    """Whether `text` may still grow into `[name(`."""
    for end in range(1, len(text) + 1):
        if not re.fullmatch(r"\[\s*([A-Za-z_][\w.]*\s*)?", text[:end]):
            return False
    return True


def _as_json_value(node: ast.expr):
    value = ast.literal_eval(node)
    if isinstance(value, tuple):
        value = list(value)
    json.dumps(value, allow_nan=False)  # refuses bytes, sets, inf and nan
    return value


def parse_call(source: str) -> tuple[str, str] | None:
    """`name(k=v, ...)` -> (name, arguments JSON), or None when it is not a call of literals."""
    try:
        node = ast.parse(source.strip(), mode="eval").body
        if not isinstance(node, ast.Call) or node.args:
            return None
        name = ast.unparse(node.func)
        if not re.fullmatch(r"[A-Za-z_][\w.]*", name):
            return None
        arguments = {keyword.arg: _as_json_value(keyword.value) for keyword in node.keywords if keyword.arg}
        if len(arguments) != len(node.keywords):
            return None
        return name, json.dumps(arguments, ensure_ascii=False, allow_nan=False)
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        return None


class PythonicToolParser(ToolParser):

    def __init__(self, tools: list[dict] | None = None) -> None:
        super().__init__(tools)
        self._state = "start"
        self._list_text = ""  # the list read so far, sent back as text if it never holds a call
        self._segment = ""
        self._depth = 0
        self._quote = ""
        self._escaped = False

    def _consume(self, final: bool) -> None:
        if self._state == "start":
            stripped = self._buffer.lstrip()
            if stripped.startswith(PYTHON_START):
                stripped = stripped[len(PYTHON_START):].lstrip()
            elif not final and PYTHON_START.startswith(stripped):
                return
            if _LIST_OPENING.match(stripped):
                self._buffer, self._state = stripped, "list"
            elif not final and _could_open_list(stripped):
                return
            else:
                self._state = "text"
        if self._state == "list":
            self._read_list()
        if self._state == "after":
            rest = self._buffer.lstrip()
            if rest.startswith(PYTHON_END):
                self._buffer, self._state = rest[len(PYTHON_END):], "text"
            elif final or not PYTHON_END.startswith(rest):
                self._state = "text"
        if self._state == "text":
            self._emit_text(self._buffer)
            self._buffer = ""
        if final:
            if self._state == "list" and not self._calls:
                self._emit_text(self._list_text)
            self._finish_text()

    def _read_list(self) -> None:
        for index, char in enumerate(self._buffer):
            self._list_text += char
            if self._quote:
                self._segment += char
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == self._quote:
                    self._quote = ""
                continue
            if char in "'\"":
                self._quote = char
            elif char in _OPENERS:
                self._depth += 1
                if self._depth == 1:
                    continue
            elif char in _CLOSERS:
                self._depth -= 1
                if self._depth == 0:  # the list closed
                    self._end_segment()
                    if not self._calls:  # a list, but not of calls
                        self._emit_text(self._list_text)
                    self._buffer, self._state = self._buffer[index + 1:], "after"
                    return
            if self._depth == 1 and char == ",":
                self._end_segment()
                continue
            self._segment += char
        self._buffer = ""

    def _end_segment(self) -> None:
        segment, self._segment = self._segment, ""
        if not segment.strip():
            return
        call = parse_call(segment)
        if call is not None:
            self._start_call(call[0])
            self._emit_arguments(call[1])
