"""`mistral`: Magistral's thinking, `[THINK]reasoning[/THINK]answer`, as vLLM's `--reasoning-parser mistral` reads
it. `[THINK]` and `[/THINK]` are control tokens of Mistral's tokenizer from v13 (Magistral Small / Medium 2509).

The model opens the thought itself (the prompt does not), so output without `[THINK]` is all content, and output
that opens the thought without closing it is all reasoning from the marker on (it stopped mid-thought). Text
before `[THINK]` is content (a well-prompted model writes none); a stray `[/THINK]` before any `[THINK]` is
dropped. `enable_thinking` does not apply: the system prompt asks Magistral to think, not the template."""
from __future__ import annotations

from serval.openai.reasoning.base import ReasoningDelta, ReasoningParser
from serval.openai.tool_grammar import with_reasoning
from serval.openai.tool_parsers.base import partial_marker_length

THINK_START, THINK_END = "[THINK]", "[/THINK]"


class MistralReasoningParser(ReasoningParser):
    think_start, think_end = THINK_START, THINK_END
    special_tokens = (THINK_START, THINK_END)

    def __init__(self, chat_template_kwargs: dict | None = None) -> None:
        super().__init__(chat_template_kwargs)
        self._state = "before"

    @classmethod
    def thinking_enabled(cls, chat_template_kwargs: dict | None) -> bool:
        # the grammar's thought is optional, so a constraint always leaves room for one, as the parser reads one
        return True

    @classmethod
    def constrain_after_reasoning(cls, grammar: str, added_tokens) -> str:
        # the thought is optional as a whole: output without [THINK] is content, so no free text may precede
        return with_reasoning(grammar, added_tokens, THINK_START, THINK_END, thought_optional=True)

    def _consume(self, final: bool) -> ReasoningDelta:
        before = ""
        while self._state == "before":
            found = [(self._buffer.find(marker), marker) for marker in (THINK_START, THINK_END)]
            found = [item for item in found if item[0] >= 0]
            if not found:
                keep = 0 if final else max(partial_marker_length(self._buffer, marker)
                                           for marker in (THINK_START, THINK_END))
                before += self._buffer[:len(self._buffer) - keep]
                self._buffer = self._buffer[len(self._buffer) - keep:]
                break
            position, marker = min(found)
            before += self._buffer[:position]
            self._buffer = self._buffer[position + len(marker):]
            if marker == THINK_START:
                self._state = "reasoning"
        if before:
            self._content.append(before)
        delta = ReasoningDelta() if self._state == "before" else super()._consume(final)
        delta.content = before + delta.content
        return delta
