"""`openai_gptoss`: gpt-oss's reasoning in OpenAI's harmony format (see tool_parsers/harmony_reader), as vLLM's
`--reasoning-parser openai_gptoss` serves it: analysis messages (and messages to built-in tools) are reasoning,
final and preamble messages are content, calls to functions are left to the `openai` tool parser. Output cut
mid-analysis is all reasoning. `enable_thinking` does not apply: gpt-oss always writes its channels."""
from __future__ import annotations

from serval.openai.reasoning.base import ReasoningDelta, ReasoningParser
from serval.openai.tool_grammar import in_final_message, with_analysis
from serval.openai.tool_parsers.harmony_reader import SPECIAL_TOKENS, TURN_ENDS, HarmonyReader


class HarmonyReasoningParser(ReasoningParser):
    special_tokens = SPECIAL_TOKENS
    stop_tokens = TURN_ENDS

    def __init__(self, chat_template_kwargs: dict | None = None) -> None:
        super().__init__(chat_template_kwargs)
        self._reader = HarmonyReader()
        self._answer_started = False

    @property
    def reasoning_ended(self) -> bool:
        return self._answer_started

    @classmethod
    def constrain_after_reasoning(cls, grammar: str, added_tokens) -> str:
        return with_analysis(in_final_message(grammar, added_tokens), added_tokens)

    def _consume(self, final: bool) -> ReasoningDelta:
        delta = ReasoningDelta()
        events, self._buffer = self._reader.feed(self._buffer, final), ""
        for event in events:
            kind = event.header.kind
            if event.kind == "open" and kind != "reasoning":
                self._answer_started = True
            if event.kind != "text" or kind == "call":
                continue
            if kind == "reasoning":
                delta.reasoning += event.text
                self._reasoning.append(event.text)
            else:
                delta.content += event.text
                self._content.append(event.text)
        return delta
