"""What every tool-call parser shares: the delta and call records, and the feed/finish/extract protocol.

A parser is a streaming state machine over the generated text. `feed(text_delta)` returns what became certain
with that text (plain content, the start of a call, argument fragments); text that might still be the start of a
call marker is held back until the next delta decides it. `finish()` flushes what is held at the end of
generation. `extract(text)` is feed + finish on the whole text, so a streamed response and a non-streamed one
are the same parse, whatever the chunking.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field


def make_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class FunctionDelta:
    name: str | None = None
    arguments: str | None = None


@dataclass
class ToolCallDelta:
    """One entry of a stream chunk's `delta.tool_calls`: the first for a call carries id, type and name."""
    index: int
    function: FunctionDelta
    id: str | None = None
    type: str | None = None

    def to_openai(self) -> dict:
        function = {key: value for key, value in (("name", self.function.name),
                                                   ("arguments", self.function.arguments)) if value is not None}
        item = {"index": self.index, "function": function}
        if self.id is not None:
            item["id"], item["type"] = self.id, self.type
        return item


@dataclass
class ParserDelta:
    """What one fed text delta produced: content to send, and tool-call deltas in order."""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.tool_calls)


@dataclass
class ToolCall:
    """A whole call, as `message.tool_calls[i]` of a non-streamed response."""
    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ExtractedToolCalls:
    content: str | None
    tool_calls: list[ToolCall]

    @property
    def tools_called(self) -> bool:
        return bool(self.tool_calls)


def partial_marker_length(text: str, marker: str) -> int:
    """How many characters at the end of `text` could be the start of `marker` (held back until decided)."""
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:length]):
            return length
    return 0


class ToolParser:
    """The base of every format: subclasses implement `_consume(final)`, reading `self._buffer` and calling
    `_emit_text`, `_start_call` and `_emit_arguments`."""

    # Markers that are special tokens in their model's vocabulary: the text fed must be detokenized with
    # skip_special_tokens=False, or the markers vanish before the parser sees them.
    special_tokens: tuple[str, ...] = ()
    # A format whose reasoning and calls share one markup (harmony's channels) reads the raw output, reasoning
    # included: the reasoning parser then only supplies reasoning, and this parser's grammar covers the reasoning.
    reads_reasoning = False
    # tokens that end the model's turn in this format, beyond the model's EOS: added to the request's stop tokens
    stop_tokens: tuple[str, ...] = ()

    def __init__(self, tools: list[dict] | None = None) -> None:
        # name -> JSON schema of the parameters, for formats whose values are typed by the schema
        self.tool_schemas = {tool["function"]["name"]: tool["function"].get("parameters") or {}
                             for tool in (tools or []) if tool.get("function")}
        self._buffer = ""
        self._pending = ParserDelta()
        self._held_whitespace = ""
        self._calls: list[ToolCall] = []
        self._content: list[str] = []

    def feed(self, text: str) -> ParserDelta:
        self._buffer += text
        self._consume(final=False)
        return self._take()

    def finish(self) -> ParserDelta:
        self._consume(final=True)
        return self._take()

    def extract(self, text: str) -> ExtractedToolCalls:
        self.feed(text)
        self.finish()
        return self.result()

    def result(self) -> ExtractedToolCalls:
        """Everything parsed so far, whole: what a non-streamed response carries."""
        content = "".join(self._content)
        return ExtractedToolCalls(content=content or None, tool_calls=list(self._calls))

    def _consume(self, final: bool) -> None:
        raise NotImplementedError

    def _take(self) -> ParserDelta:
        delta, self._pending = self._pending, ParserDelta()
        return delta

    def _emit_text(self, text: str) -> None:
        """Plain text between calls. Trailing whitespace waits for what follows: before a call or at the end of a
        response with calls it is dropped (so content is not a stray "\\n\\n"), before more text it is sent."""
        text = self._held_whitespace + text
        stripped = text.rstrip()
        self._held_whitespace = text[len(stripped):]
        self._emit_content(stripped)

    def _drop_held_whitespace(self) -> None:
        self._held_whitespace = ""

    def _finish_text(self) -> None:
        if not self._calls:
            self._emit_content(self._held_whitespace)
        self._held_whitespace = ""

    def _emit_content(self, text: str) -> None:
        if text:
            self._pending.content += text
            self._content.append(text)

    def _start_call(self, name: str) -> None:
        self._drop_held_whitespace()
        call = ToolCall(id=make_call_id(), name=name, arguments="")
        self._calls.append(call)
        self._pending.tool_calls.append(ToolCallDelta(index=len(self._calls) - 1, id=call.id, type="function",
                                                      function=FunctionDelta(name=name, arguments="")))

    def _emit_arguments(self, fragment: str) -> None:
        if not fragment:
            return
        call = self._calls[-1]
        call.arguments += fragment
        index = len(self._calls) - 1
        last = self._pending.tool_calls[-1] if self._pending.tool_calls else None
        if last is not None and last.index == index and last.id is None:  # the header delta carries no arguments
            last.function.arguments = (last.function.arguments or "") + fragment
        else:
            self._pending.tool_calls.append(ToolCallDelta(index=index, function=FunctionDelta(arguments=fragment)))
