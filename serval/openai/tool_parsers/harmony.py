"""`openai`: gpt-oss calls in OpenAI's harmony format (see harmony_reader), as vLLM's `--tool-call-parser openai`
serves them. A `to=functions.NAME` message is a call; its body, the model's own characters, is the arguments
(streamed as it arrives, so the fragments concatenate to the whole-text arguments). Final and preamble
(commentary without recipient) messages are content; analysis is reasoning, which this parser reads past itself:
the markup of reasoning and calls is one, so the chat handler feeds it the raw output (`reads_reasoning`)."""
from __future__ import annotations

from serval.openai.tool_parsers.base import ToolParser
from serval.openai.tool_parsers.harmony_reader import SPECIAL_TOKENS, TURN_ENDS, HarmonyReader


class HarmonyToolParser(ToolParser):
    special_tokens = SPECIAL_TOKENS
    stop_tokens = TURN_ENDS
    reads_reasoning = True

    def __init__(self, tools: list[dict] | None = None) -> None:
        super().__init__(tools)
        self._reader = HarmonyReader()

    def _consume(self, final: bool) -> None:
        events, self._buffer = self._reader.feed(self._buffer, final), ""
        for event in events:
            kind = event.header.kind
            if kind == "call" and event.kind == "open":
                self._start_call(event.header.function_name)
            elif kind == "call" and event.kind == "text":
                self._emit_arguments(event.text)
            elif kind == "content" and event.kind == "text":
                self._emit_content(event.text)
