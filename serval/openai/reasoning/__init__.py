"""Reasoning parsers by vLLM's names (`--reasoning-parser NAME`): the think section goes to `reasoning_content`,
the rest to `content`, streamed as deltas.

    parser = get_reasoning_parser("qwen3")(chat_template_kwargs=request.chat_template_kwargs)
    delta = parser.feed(text_delta)      # ReasoningDelta(reasoning=..., content=...)
    delta = parser.finish()
"""
from __future__ import annotations

from serval.openai.errors import InvalidArgument
from serval.openai.reasoning.base import ExtractedReasoning, ReasoningDelta, ReasoningParser
from serval.openai.reasoning.harmony import HarmonyReasoningParser
from serval.openai.reasoning.mistral import MistralReasoningParser


class Qwen3ReasoningParser(ReasoningParser):
    """Qwen3 / Qwen3.5: a tool call also ends the thought, when the model skips `</think>` before calling."""
    implicit_ends = ("<tool_call>",)


class DeepSeekR1ReasoningParser(ReasoningParser):
    """DeepSeek-R1: the template opens `<think>`, so the output usually starts inside the thought."""


class DeepSeekV3ReasoningParser(DeepSeekR1ReasoningParser):
    """DeepSeek-V3.1's hybrid template: no thought unless `thinking` (or `enable_thinking`) is true in
    chat_template_kwargs, then R1's reading; vLLM's `deepseek_v3` defaults to off the same way."""

    @classmethod
    def thinking_enabled(cls, chat_template_kwargs: dict | None) -> bool:
        kwargs = chat_template_kwargs or {}
        return bool(kwargs.get("thinking") or kwargs.get("enable_thinking"))


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    "qwen3": Qwen3ReasoningParser,
    "deepseek_r1": DeepSeekR1ReasoningParser,
    "deepseek_v3": DeepSeekV3ReasoningParser,
    "openai_gptoss": HarmonyReasoningParser,
    "mistral": MistralReasoningParser,
}


def get_reasoning_parser(name: str) -> type[ReasoningParser]:
    try:
        return REASONING_PARSERS[name]
    except KeyError:
        raise InvalidArgument("reasoning_parser", f"unknown reasoning parser {name!r}; valid: "
                              f"{', '.join(sorted(REASONING_PARSERS))}") from None


__all__ = ["REASONING_PARSERS", "DeepSeekR1ReasoningParser", "DeepSeekV3ReasoningParser", "ExtractedReasoning",
           "HarmonyReasoningParser", "MistralReasoningParser",
           "Qwen3ReasoningParser", "ReasoningDelta", "ReasoningParser", "get_reasoning_parser"]
