"""The think-section splitter every reasoning format shares: `<think>reasoning</think>content`, streamed.

The opening tag is optional (templates such as DeepSeek-R1's and Qwen3-Thinking's put it in the prompt), so
generation starts inside the thought unless thinking was turned off (`enable_thinking: false` in
`chat_template_kwargs`). Output that never closes the thought is all reasoning: the model stopped mid-thought.
"""
from __future__ import annotations

from dataclasses import dataclass

from serval.openai.tool_grammar import with_reasoning
from serval.openai.tool_parsers.base import partial_marker_length


@dataclass
class ReasoningDelta:
    reasoning: str = ""
    content: str = ""

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content)


@dataclass
class ExtractedReasoning:
    reasoning: str | None
    content: str | None


class ReasoningParser:
    think_start = "<think>"
    think_end = "</think>"
    # markers that end the thought without being eaten by it (they begin the answer)
    implicit_ends: tuple[str, ...] = ()
    # markers that are special tokens in their model's vocabulary (kept in the text: skip_special_tokens=False)
    special_tokens: tuple[str, ...] = ()
    # tokens that end the model's turn in this format, beyond the model's EOS: added to the request's stop tokens
    stop_tokens: tuple[str, ...] = ()

    def __init__(self, chat_template_kwargs: dict | None = None) -> None:
        self._state = "start" if self.thinking_enabled(chat_template_kwargs) else "content"
        self._buffer = ""
        self._reasoning: list[str] = []
        self._content: list[str] = []

    @classmethod
    def thinking_enabled(cls, chat_template_kwargs: dict | None) -> bool:
        """Whether the template opens a thought for this request: on unless `enable_thinking` is false."""
        return (chat_template_kwargs or {}).get("enable_thinking", True) is not False

    @property
    def reasoning_ended(self) -> bool:
        return self._state == "content"

    @classmethod
    def constrain_after_reasoning(cls, grammar: str, added_tokens) -> str:
        """`grammar` (top rule `constraint`) after a free reasoning section in this format."""
        return with_reasoning(grammar, added_tokens, cls.think_start, cls.think_end)

    def feed(self, text: str) -> ReasoningDelta:
        self._buffer += text
        return self._consume(final=False)

    def finish(self) -> ReasoningDelta:
        return self._consume(final=True)

    def extract(self, text: str) -> ExtractedReasoning:
        self.feed(text)
        self.finish()
        return self.result()

    def result(self) -> ExtractedReasoning:
        return ExtractedReasoning(reasoning="".join(self._reasoning) or None, content="".join(self._content) or None)

    def _consume(self, final: bool) -> ReasoningDelta:
        delta = ReasoningDelta()
        if self._state == "start":
            if self._buffer.startswith(self.think_start):
                self._buffer, self._state = self._buffer[len(self.think_start):], "reasoning"
            elif final or not self.think_start.startswith(self._buffer):
                self._state = "reasoning"
            else:
                return delta
        if self._state == "reasoning":
            ends = [(self._buffer.find(marker), marker) for marker in (self.think_end, *self.implicit_ends)]
            ends = [item for item in ends if item[0] >= 0]
            if ends:
                position, marker = min(ends)
                delta.reasoning = self._buffer[:position]
                skip = len(marker) if marker == self.think_end else 0
                self._buffer, self._state = self._buffer[position + skip:], "content"
            else:
                keep = 0 if final else max(partial_marker_length(self._buffer, marker)
                                           for marker in (self.think_end, *self.implicit_ends))
                delta.reasoning = self._buffer[:len(self._buffer) - keep]
                self._buffer = self._buffer[len(self._buffer) - keep:]
        if self._state == "content":
            delta.content, self._buffer = self._buffer, ""
        if delta.reasoning:
            self._reasoning.append(delta.reasoning)
        if delta.content:
            self._content.append(delta.content)
        return delta
