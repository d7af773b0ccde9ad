"""`phi4_mini_json`: Phi-4-mini's calls, a JSON array after the plain-text marker `functools`,
`functools[{"name": "f", "arguments": {...}}, ...]` ("parameters" read as "arguments", as vLLM reads it). The
marker is ordinary text in Phi-4-mini's vocabulary, not a special token. Text before and after the array is
content: a stream has sent it before the marker can be seen (vLLM, which does not stream this format, drops it).
An array that holds no call (`functools[]`, `functools[ text ]`) is content, marker included."""
from __future__ import annotations

from serval.openai.tool_parsers.base import ToolParser, partial_marker_length
from serval.openai.tool_parsers.json_scan import WHITESPACE, JsonCallReader

MARKER = "functools["
ARGUMENT_KEYS = ("arguments", "parameters")


class Phi4MiniJsonToolParser(ToolParser):

    def __init__(self, tools: list[dict] | None = None) -> None:
        super().__init__(tools)
        self._state = "text"
        self._reader: JsonCallReader | None = None
        # the array's text read since its last call was sent: content again if no call follows
        self._unsent = ""

    def _consume(self, final: bool) -> None:
        while self._step():
            pass
        if final:
            if self._state == "call" and not self._reader.started:
                self._unsent += self._reader.raw
            self._emit_text(self._unsent + self._buffer)
            self._unsent, self._buffer = "", ""
            self._finish_text()

    def _step(self) -> bool:
        """One transition; False when it needs more text."""
        state, buffer = self._state, self._buffer
        if state == "text":
            position = buffer.find(MARKER)
            if position < 0:
                keep = partial_marker_length(buffer, MARKER)
                self._emit_text(buffer[:len(buffer) - keep])
                self._buffer = buffer[len(buffer) - keep:]
                return False
            self._emit_text(buffer[:position])
            self._buffer, self._unsent, self._state = buffer[position + len(MARKER):], MARKER, "item"
            return True
        if state == "call":
            consumed, outcome = self._reader.feed(buffer)
            self._buffer = buffer[consumed:]
            if self._reader.started:
                self._unsent = ""
            if outcome is None:
                return False
            if outcome == "done":
                self._state = "separator"
                return True
            if not self._reader.started:
                self._unsent += self._reader.raw
            return self._fall_back()
        stripped = buffer.lstrip(WHITESPACE)
        if not stripped:
            return False
        self._unsent += buffer[:len(buffer) - len(stripped)]
        if (state, stripped[0]) == ("item", "{"):
            self._buffer, self._state = stripped, "call"
            self._reader = JsonCallReader(self, ARGUMENT_KEYS, arguments_required=True)
        elif (state, stripped[0]) == ("separator", ","):
            self._buffer, self._unsent, self._state = stripped[1:], self._unsent + ",", "item"
        elif (state, stripped[0]) == ("separator", "]"):
            self._buffer, self._unsent, self._state = stripped[1:], "", "text"
        else:
            self._buffer = stripped
            return self._fall_back()
        return True

    def _fall_back(self) -> bool:
        """Not (or no longer) an array of calls: what was read of it is content, and reading goes on as text."""
        self._emit_text(self._unsent)
        self._unsent, self._state = "", "text"
        return True
