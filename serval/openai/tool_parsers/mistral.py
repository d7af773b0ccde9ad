"""`mistral`: calls after the `[TOOL_CALLS]` token. Before tokenizer v11 a JSON array,
`[TOOL_CALLS] [{"name": "f", "arguments": {...}}, ...]`; from v11 one `[TOOL_CALLS]name{...}` (or
`[TOOL_CALLS]name[ARGS]{...}`) per call. Both forms are read; text before and after the calls is content."""
from __future__ import annotations

import re

from serval.openai.tool_parsers.base import ToolParser, partial_marker_length
from serval.openai.tool_parsers.json_scan import DONE, INVALID, JsonCallReader, JsonValueScanner

TOOL_CALLS, ARGS = "[TOOL_CALLS]", "[ARGS]"
_NAME = re.compile(r"[A-Za-z0-9_.\-]*")


class MistralToolParser(ToolParser):
    special_tokens = (TOOL_CALLS, ARGS)

    def __init__(self, tools: list[dict] | None = None) -> None:
        super().__init__(tools)
        self._state = "text"
        self._reader: JsonCallReader | None = None
        self._name = ""
        self._arguments = JsonValueScanner()
        self._waiting_arguments = ""  # read before the call is sure enough to open
        self._call_open = False

    def _consume(self, final: bool) -> None:
        while self._step(final):
            pass
        if final:
            if self._state == "array_call" and not self._reader.started:
                self._emit_text(self._reader.raw)
            elif self._state == "arguments" and not self._call_open:
                self._emit_text(self._name + self._waiting_arguments)
            self._emit_text(self._buffer)
            self._buffer = ""
            self._finish_text()

    def _step(self, final: bool) -> bool:
        """One transition; False when it needs more text."""
        state, buffer = self._state, self._buffer
        if state == "text":
            position = buffer.find(TOOL_CALLS)
            if position < 0:
                keep = 0 if final else partial_marker_length(buffer, TOOL_CALLS)
                self._emit_text(buffer[:len(buffer) - keep])
                self._buffer = buffer[len(buffer) - keep:]
                return False
            self._emit_text(buffer[:position])
            self._buffer, self._state = buffer[position + len(TOOL_CALLS):], "after_marker"
            return True
        if state == "arguments":
            return self._read_arguments()
        stripped = buffer.lstrip()
        if state in ("after_marker", "array_item", "array_separator") and not stripped:
            return False
        if state == "after_marker":
            self._state = "array_item" if stripped.startswith("[") else "name"
            self._buffer = stripped[1:] if stripped.startswith("[") else stripped
        elif state == "array_item":
            self._state = "array_call" if stripped.startswith("{") else "text"
            self._buffer, self._reader = stripped, JsonCallReader(self)
        elif state == "array_call":
            consumed, outcome = self._reader.feed(buffer)
            self._buffer = buffer[consumed:]
            if outcome is None:
                return False
            if outcome == "invalid" and not self._reader.started:
                self._emit_text(self._reader.raw)
            self._state = "array_separator" if outcome == "done" else "text"
        elif state == "array_separator":
            self._state = {",": "array_item", "]": "text"}.get(stripped[0], "text")
            self._buffer = stripped[1:] if stripped[0] in ",]" else stripped
        elif state == "name":
            return self._read_name(final)
        elif buffer.startswith(TOOL_CALLS):  # "after_call": the next v11 call
            self._buffer, self._state = buffer[len(TOOL_CALLS):], "name"
        elif TOOL_CALLS.startswith(buffer) and not final:
            return False
        else:
            self._state = "text"
        return True

    def _read_name(self, final: bool) -> bool:
        name = _NAME.match(self._buffer).group()
        rest = self._buffer[len(name):]
        if rest.startswith(ARGS):
            rest = rest[len(ARGS):]
        elif not final and ARGS.startswith(rest):
            return False
        if not rest.strip() and not final:
            return False
        if name and rest.lstrip().startswith("{"):
            self._name, self._buffer, self._state = name, rest.lstrip(), "arguments"
            self._arguments, self._waiting_arguments = JsonValueScanner(), ""
        else:  # not a call after all
            self._emit_text(name)
            self._buffer, self._state = rest, "text"
        return True

    def _read_arguments(self) -> bool:
        fragment = ""
        for index, char in enumerate(self._buffer):
            outcome = self._arguments.push(char)
            if outcome == INVALID:
                if not self._call_open:
                    self._emit_text(self._name + self._waiting_arguments)
                self._emit_arguments(fragment)
                self._buffer, self._state, self._call_open = self._buffer[index:], "text", False
                return True
            if self._call_open:
                fragment += char
            else:
                self._waiting_arguments += char
                if len("".join(self._waiting_arguments.split())) > 1:
                    self._start_call(self._name)
                    fragment, self._waiting_arguments, self._call_open = self._waiting_arguments, "", True
            if outcome == DONE:
                self._emit_arguments(fragment)
                self._buffer, self._state, self._call_open = self._buffer[index + 1:], "after_call", False
                return True
        self._emit_arguments(fragment)
        self._buffer = ""
        return False
