"""Request: one sequence's whole state, read and written by the scheduler, KV cache manager, runner and sampler.

Nothing else keeps a parallel copy. With n > 1 each sample is its own Request (index 0..n-1) sharing a
parent_request_id; the engine joins them into one RequestOutput.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from serval.outputs import Logprob
from serval.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    # A step that held the request raised, or its grammar rejected a token: the output is not to be trusted
    # (vLLM's FinishReason.ERROR).
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None
    max_model_len: int
    prompt: str | None = None
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    parent_request_id: str | None = None
    index: int = 0  # which of the parent's n samples this is
    arrival_order: int = 0  # set by the scheduler: ties in arrival_time can't reorder requests

    status: RequestStatus = RequestStatus.WAITING
    all_token_ids: list[int] = field(default_factory=list)  # prompt + output, appended in place
    output_token_ids: list[int] = field(default_factory=list)
    # Tokens whose K/V are in the cache (prefix hits included). Tokens [num_computed_tokens, num_tokens)
    # still need a forward pass; when a step brings it to num_tokens, a new token is sampled.
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hash of each full block of all_token_ids
    num_cached_tokens: int = -1  # prefix-cache hit tokens when first scheduled; -1 until then
    num_preemptions: int = 0
    generator: torch.Generator | None = None

    output_text: str = ""
    detokenizer: Any = None  # serval.engine.detokenizer.IncrementalDetokenizer
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    stop_reason: int | str | None = None
    # serval.guard.structured.GrammarState when sampling_params.structured_outputs is set: the sampler masks
    # with it, the engine advances it on each accepted token and finishes the request when it terminates.
    grammar: Any = None

    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)
        if self.sampling_params.logprobs is not None:
            self.logprobs = []
        if self.sampling_params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def max_tokens(self) -> int:
        """Output tokens allowed: the request's max_tokens, capped by what fits in max_model_len."""
        room = self.max_model_len - self.num_prompt_tokens
        asked = self.sampling_params.max_tokens
        return room if asked is None else min(asked, room)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
