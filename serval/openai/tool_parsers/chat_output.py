"""One response choice's output parsing, as the chat handler drives it: the reasoning parser splits the think
section off, and what it passes on as content goes through the tool-call parser.

    parser = chat_output_parser(tool_call_parser="hermes", reasoning_parser="qwen3", tools=request.tool_dicts(),
                                tool_choice=request.resolved_tool_choice(), enable_auto_tool_choice=True,
                                chat_template_kwargs=request.chat_template_kwargs)
    for text_delta in stream:  delta = parser.feed(text_delta)   # ChatDelta: reasoning, content, tool_calls
    delta = parser.finish()                                      # at the end of generation
    output = parser.result()                                     # ChatOutput for a non-streamed response
"""
from __future__ import annotations

from dataclasses import dataclass, field

from serval.openai.errors import InvalidArgument
from serval.openai.reasoning import ReasoningParser, get_reasoning_parser
from serval.openai.tool_parsers import ToolCall, ToolCallDelta, ToolParser, get_tool_parser


@dataclass
class ChatDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)


@dataclass
class ChatOutput:
    reasoning: str | None
    content: str | None
    tool_calls: list[ToolCall]

    def finish_reason(self, engine_finish_reason: str | None) -> str | None:
        """OpenAI's: "tool_calls" when the answer is calls and generation ended by itself."""
        return "tool_calls" if self.tool_calls and engine_finish_reason == "stop" else engine_finish_reason


class ChatOutputParser:

    def __init__(self, reasoning: ReasoningParser | None = None, tools: ToolParser | None = None) -> None:
        self.reasoning = reasoning
        self.tools = tools
        self._reasoning_text: list[str] = []
        self._content: list[str] = []

    @property
    def reads_special_tokens(self) -> bool:
        """Whether the markers either parser reads are special tokens: then the output is detokenized with them."""
        return any(part is not None and type(part).special_tokens for part in (self.reasoning, self.tools))

    def stop_token_ids(self, added_vocab: dict[str, int], params_stop_token_ids: list[int] | None) -> list[int]:
        """The request's stop token ids with the tokens that end the turn in either parser's format (harmony's
        `<|return|>` and `<|call|>`, as vLLM stops gpt-oss: a call waits for its result)."""
        ids = list(params_stop_token_ids or [])
        for part in (self.reasoning, self.tools):
            if part is not None:
                ids += [added_vocab[token] for token in type(part).stop_tokens
                        if token in added_vocab and added_vocab[token] not in ids]
        return ids

    def feed(self, text: str) -> ChatDelta:
        return self._step(text, final=False)

    def finish(self) -> ChatDelta:
        return self._step("", final=True)

    def result(self) -> ChatOutput:
        reasoning = "".join(self._reasoning_text) or None
        if self.tools is not None:
            extracted = self.tools.result()
            return ChatOutput(reasoning=reasoning, content=extracted.content, tool_calls=extracted.tool_calls)
        return ChatOutput(reasoning=reasoning, content="".join(self._content) or None, tool_calls=[])

    def _step(self, text: str, final: bool) -> ChatDelta:
        delta = ChatDelta()
        if self.reasoning is not None:
            split = self.reasoning.finish() if final else self.reasoning.feed(text)
            delta.reasoning = split.reasoning
            self._reasoning_text.append(split.reasoning)
            if self.tools is None or not self.tools.reads_reasoning:
                text = split.content
        if self.tools is None:
            delta.content = text
            self._content.append(text)
            return delta
        parsed = [self.tools.feed(text)] + ([self.tools.finish()] if final else [])
        delta.content = "".join(part.content for part in parsed)
        delta.tool_calls = [call for part in parsed for call in part.tool_calls]
        return delta


def chat_output_parser(tool_call_parser: str | None, reasoning_parser: str | None, tools: list[dict],
                       tool_choice, enable_auto_tool_choice: bool = False,
                       chat_template_kwargs: dict | None = None) -> ChatOutputParser:
    """The parser for one choice. Tool calls are parsed with tools present and tool_choice not "none"; "auto" needs
    --enable-auto-tool-choice and --tool-call-parser (as in vLLM), "required" and a named function the parser whose
    format their grammar writes. Raises InvalidArgument("tool_choice", ...) otherwise: a 400."""
    reasoning = get_reasoning_parser(reasoning_parser)(chat_template_kwargs) if reasoning_parser else None
    if not tools or tool_choice == "none":
        return ChatOutputParser(reasoning, None)
    if tool_choice == "auto" and not (enable_auto_tool_choice and tool_call_parser):
        raise InvalidArgument("tool_choice", '"auto" tool choice requires the server to run with '
                              "--enable-auto-tool-choice and --tool-call-parser")
    if tool_call_parser is None:
        raise InvalidArgument("tool_choice", "tool_choice other than 'none' requires the server to run with "
                              "--tool-call-parser")
    return ChatOutputParser(reasoning, get_tool_parser(tool_call_parser)(tools))
