"""Tool-call parsers by vLLM's names (`--tool-call-parser NAME`): one small streaming state machine per format.

    parser = get_tool_parser("hermes")(tools=request_tools)   # one per response choice
    delta = parser.feed(text_delta)                            # ParserDelta: content + tool-call deltas
    delta = parser.finish()                                    # at the end of generation
    parser.result()                                            # ExtractedToolCalls: content, whole calls
"""
from __future__ import annotations

from serval.openai.errors import InvalidArgument
from serval.openai.tool_parsers.base import (ExtractedToolCalls, FunctionDelta, ParserDelta, ToolCall,
                                             ToolCallDelta, ToolParser)
from serval.openai.tool_parsers.deepseek import DeepSeekV3ToolParser, DeepSeekV31ToolParser
from serval.openai.tool_parsers.harmony import HarmonyToolParser
from serval.openai.tool_parsers.hermes import HermesToolParser
from serval.openai.tool_parsers.llama3_json import Llama3JsonToolParser
from serval.openai.tool_parsers.mistral import MistralToolParser
from serval.openai.tool_parsers.phi4_mini import Phi4MiniJsonToolParser
from serval.openai.tool_parsers.pythonic import PythonicToolParser
from serval.openai.tool_parsers.qwen3_xml import Qwen3XmlToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
    "mistral": MistralToolParser,
    "pythonic": PythonicToolParser,
    "qwen3_xml": Qwen3XmlToolParser,
    "qwen3_coder": Qwen3XmlToolParser,
    "deepseek_v3": DeepSeekV3ToolParser,
    "deepseek_v31": DeepSeekV31ToolParser,
    "openai": HarmonyToolParser,
    "phi4_mini_json": Phi4MiniJsonToolParser,
}


def get_tool_parser(name: str) -> type[ToolParser]:
    """The parser class for `--tool-call-parser NAME`; an unknown name is refused with the valid ones."""
    try:
        return TOOL_PARSERS[name]
    except KeyError:
        raise InvalidArgument("tool_call_parser", f"unknown tool call parser {name!r}; valid: "
                              f"{', '.join(sorted(TOOL_PARSERS))}") from None


__all__ = ["TOOL_PARSERS", "ExtractedToolCalls", "FunctionDelta", "ParserDelta", "ToolCall", "ToolCallDelta",
           "ToolParser", "get_tool_parser"]
