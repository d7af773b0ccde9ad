"""`deepseek_v3` and `deepseek_v31`: DeepSeek's calls block, its markers special tokens spelled with full-width
bars and U+2581 (▁). V3 and R1-0528 write, for each call,

    <｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\n{...}\\n```<｜tool▁call▁end｜>

and V3.1 `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜>`, all between
`<｜tool▁calls▁begin｜>` and `<｜tool▁calls▁end｜>`. As in vLLM, the text before the block is content and
the text after it is dropped; a block holding no readable call is left as content, whole. A call starts once
its name is whole and its JSON arguments are past the opening brace; from then its arguments stream as the
model's own characters, and a call that breaks off keeps what was sent (a stream cannot take them back).
"""
from __future__ import annotations

import re

from serval.openai.tool_parsers.base import ToolParser, partial_marker_length
from serval.openai.tool_parsers.json_scan import DONE, INVALID, WHITESPACE, JsonValueScanner

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
MARKERS = (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP)


class DeepSeekV3ToolParser(ToolParser):
    special_tokens = MARKERS
    # what follows `<｜tool▁call▁begin｜>` up to the arguments: the call type, the name, the JSON fence
    header = re.compile(f"([^<\\n]*){SEP}([^\\n<`]+?)\\s*```(?:json)?[ \\t]*\\n")

    def __init__(self, tools: list[dict] | None = None) -> None:
        super().__init__(tools)
        self._state = "text"
        self._block_raw = ""  # the block's text while it holds no call: content if no call comes
        self._block_has_call = False
        self._name = ""
        self._arguments = JsonValueScanner()
        self._waiting_arguments = ""  # read before the call is sure enough to open
        self._call_open = False

    def _consume(self, final: bool) -> None:
        while getattr(self, f"_read_{self._state}")(final):
            pass
        if final:
            if self._state != "after" and not self._block_has_call:
                self._leave_block()
            self._buffer = ""
            self._finish_text()

    def _take_raw(self, length: int) -> None:
        piece, self._buffer = self._buffer[:length], self._buffer[length:]
        if not self._block_has_call:
            self._block_raw += piece

    def _leave_block(self) -> None:
        """Not a calls block after all: its text so far is content, and reading goes on as text."""
        self._emit_text(self._block_raw)
        self._block_raw, self._waiting_arguments, self._state = "", "", "text"

    def _malformed(self) -> bool:
        if self._block_has_call:
            self._state = "skip"
        else:
            self._leave_block()
        return True

    # each reader makes one transition and says whether another can follow without more text
    def _read_text(self, final: bool) -> bool:
        position = self._buffer.find(CALLS_BEGIN)
        if position < 0:
            keep = 0 if final else partial_marker_length(self._buffer, CALLS_BEGIN)
            self._emit_text(self._buffer[:len(self._buffer) - keep])
            self._buffer = self._buffer[len(self._buffer) - keep:]
            return False
        self._emit_text(self._buffer[:position])
        self._buffer, self._state = self._buffer[position:], "block"
        self._block_raw, self._block_has_call = "", False
        self._take_raw(len(CALLS_BEGIN))
        return True

    def _read_block(self, final: bool) -> bool:
        """Between calls: whitespace, then the next call or the end of the block."""
        stripped = self._buffer.lstrip()
        self._take_raw(len(self._buffer) - len(stripped))
        if stripped.startswith(CALL_BEGIN):
            self._take_raw(len(CALL_BEGIN))
            self._state = "header"
            return True
        if stripped.startswith(CALLS_END):
            if not self._block_has_call:
                return self._malformed()
            self._buffer, self._state = "", "after"
            return False
        if not final and (CALL_BEGIN.startswith(stripped) or CALLS_END.startswith(stripped)):
            return False
        return self._malformed()

    def _read_header(self, final: bool) -> bool:
        match = self.header.match(self._buffer)
        if match is None:
            if final or any(marker in self._buffer for marker in (CALL_BEGIN, CALL_END, CALLS_END)):
                return self._malformed()
            return False
        self._name = match.group(match.lastindex).strip()
        self._take_raw(match.end())
        self._arguments, self._waiting_arguments, self._state = JsonValueScanner(), "", "arguments"
        self._call_open = False
        return True

    def _read_arguments(self, final: bool) -> bool:
        fragment = ""
        for index, char in enumerate(self._buffer):
            if not self._call_open and not self._waiting_arguments.strip() and char not in WHITESPACE + "{":
                self._buffer = self._buffer[index:]
                return self._malformed()  # the arguments are an object
            outcome = self._arguments.push(char)
            if outcome == INVALID:
                self._emit_arguments(fragment)
                self._buffer = self._buffer[index:]
                return self._malformed()
            if self._call_open:
                fragment += char
            else:
                self._waiting_arguments += char
                if not self._block_has_call:
                    self._block_raw += char
                if len("".join(self._waiting_arguments.split())) > 1:  # `{x` is refused before it is a call
                    self._block_raw, self._block_has_call, self._call_open = "", True, True
                    self._start_call(self._name)
                    fragment, self._waiting_arguments = self._waiting_arguments, ""
            if outcome == DONE:
                self._emit_arguments(fragment)
                self._buffer, self._state = self._buffer[index + 1:], "skip"
                return True
        self._emit_arguments(fragment)
        self._buffer = ""
        return False

    def _read_skip(self, final: bool) -> bool:
        """After a call's arguments (the closing fence), or past a broken call: on to its end marker."""
        found = [(self._buffer.find(marker), marker) for marker in (CALL_END, CALL_BEGIN, CALLS_END)]
        found = [item for item in found if item[0] >= 0]
        if not found:
            keep = 0 if final else max(partial_marker_length(self._buffer, marker) for marker in MARKERS)
            self._buffer = self._buffer[len(self._buffer) - keep:]
            return False
        position, marker = min(found)
        self._buffer = self._buffer[position + (len(marker) if marker == CALL_END else 0):]
        self._state = "block"
        return True

    def _read_after(self, final: bool) -> bool:
        self._buffer = ""  # vLLM's reading: the answer ends with the calls block
        return False


class DeepSeekV31ToolParser(DeepSeekV3ToolParser):
    header = re.compile(f"([^<\\n]+?){SEP}")
