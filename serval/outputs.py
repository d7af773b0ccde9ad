"""Output objects, shaped like vLLM's so users switching engines keep their code."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # 1 = the most likely token
    decoded_token: str | None = None


# One dict per position: token id -> Logprob (the chosen token and the top-k alternatives).
SampleLogprobs = list[dict[int, Logprob]]
# The first prompt position has no logprob, as in vLLM.
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    # LLM.chat with tools or a reasoning parser: the calls parsed out of `text` (serval.openai.tool_parsers'
    # ToolCall: id, name, arguments) and the think section; `text` stays the raw output.
    tool_calls: list | None = None
    reasoning_content: str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0
    # Speculative decoding: mean tokens per verify step (accepted drafts + 1); None where it never speculated.
    spec_decode_acceptance_length: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0
