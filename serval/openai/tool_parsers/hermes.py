"""`hermes`: Hermes 2 Pro, Qwen2.5 and Qwen3 calls, `<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>`,
any number of them, with plain text before, between and after."""
from __future__ import annotations

from serval.openai.tool_parsers.base import ToolParser, partial_marker_length
from serval.openai.tool_parsers.json_scan import JsonCallReader

CALL_START, CALL_END = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):

    def __init__(self, tools: list[dict] | None = None) -> None:
        super().__init__(tools)
        self._state = "text"
        self._reader: JsonCallReader | None = None

    def _consume(self, final: bool) -> None:
        while True:
            if self._state == "text":
                position = self._buffer.find(CALL_START)
                if position < 0:
                    keep = 0 if final else partial_marker_length(self._buffer, CALL_START)
                    self._emit_text(self._buffer[:len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep:]
                    if final:
                        self._finish_text()
                    return
                self._emit_text(self._buffer[:position])
                self._buffer = self._buffer[position + len(CALL_START):]
                self._state, self._reader = "call", JsonCallReader(self)
            elif self._state == "call":
                consumed, outcome = self._reader.feed(self._buffer)
                self._buffer = self._buffer[consumed:]
                if outcome is None and not final:
                    return
                if outcome == "done":
                    self._state = "end"
                    continue
                if not self._reader.started:  # never was a call: its text is content
                    self._emit_text(CALL_START + self._reader.raw)
                self._state = "text"
            else:  # after the call object: the closing tag, if the model wrote it
                stripped = self._buffer.lstrip()
                if stripped.startswith(CALL_END):
                    self._buffer = stripped[len(CALL_END):]
                elif not final and CALL_END.startswith(stripped):
                    return
                self._state = "text"
