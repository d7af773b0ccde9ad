"""`llama3_json`: Llama 3.1 / 3.2 JSON calls, `{"name": "f", "parameters": {...}}` (or "arguments"), optionally
after `<|python_tag|>`, several separated by `;`. A call is the whole answer: the output must open with the tag or
with `{`; otherwise (and after the calls) it is plain text."""
from __future__ import annotations

from serval.openai.tool_parsers.base import ToolParser
from serval.openai.tool_parsers.json_scan import JsonCallReader

PYTHON_TAG = "<|python_tag|>"
ARGUMENT_KEYS = ("parameters", "arguments")


class Llama3JsonToolParser(ToolParser):
    special_tokens = (PYTHON_TAG,)

    def __init__(self, tools: list[dict] | None = None) -> None:
        super().__init__(tools)
        self._state = "start"
        self._reader: JsonCallReader | None = None

    def _consume(self, final: bool) -> None:
        while True:
            if self._state == "start":
                stripped = self._buffer.lstrip()
                if stripped.startswith(PYTHON_TAG):
                    stripped = stripped[len(PYTHON_TAG):].lstrip()
                if not final and (not stripped or PYTHON_TAG.startswith(stripped)):
                    return
                if stripped.startswith("{"):
                    self._buffer, self._state = stripped, "call"
                    self._reader = JsonCallReader(self, ARGUMENT_KEYS, arguments_required=True)
                else:
                    self._state = "text"
            elif self._state == "text":
                self._emit_text(self._buffer)
                self._buffer = ""
                if final:
                    self._finish_text()
                return
            elif self._state == "call":
                consumed, outcome = self._reader.feed(self._buffer)
                self._buffer = self._buffer[consumed:]
                if outcome is None and not final:
                    return
                if outcome == "done":
                    self._state = "separator"
                    continue
                if not self._reader.started:
                    self._emit_text(self._reader.raw)
                self._state = "text"
            else:  # between calls: `;` and another object, or the end of the calls
                stripped = self._buffer.lstrip()
                if not stripped and not final:
                    return
                if stripped.startswith(";"):
                    after = stripped[1:].lstrip()
                    if not after and not final:
                        return
                    if after.startswith("{"):
                        self._buffer, self._state = after, "call"
                        self._reader = JsonCallReader(self, ARGUMENT_KEYS, arguments_required=True)
                        continue
                elif stripped.startswith("{"):  # calls separated by a newline only
                    self._buffer, self._state = stripped, "call"
                    self._reader = JsonCallReader(self, ARGUMENT_KEYS, arguments_required=True)
                    continue
                self._state = "text"
