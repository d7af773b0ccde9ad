"""Request: one sequence's engine state, read and written by the scheduler, KV cache manager, runner and sampler.

Nothing else keeps a parallel copy. What the user sees of it (text, logprobs, stop reason) is the output
processor's (serval.engine.output_processor.SequenceState). With n > 1 each sample is its own Request (index
0..n-1) sharing a parent_request_id; the output processor joins them into one RequestOutput.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from serval.pooling_params import PoolingParams
from serval.sampling_params import SamplingParams

if TYPE_CHECKING:  # llguidance loads only when a request asks for structured output
    from serval.engine.structured_output import GrammarState
    from serval.lora.adapter import LoRAAdapter


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
    # With a hybrid KV cache (serval.engine.kv_groups) the block tables are here, one per KV cache group, and
    # block_ids stays empty.
    kv_group_block_ids: list[list[int]] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hash of each full block of all_token_ids
    num_cached_tokens: int = -1  # prefix-cache hit tokens when first scheduled; -1 until then
    num_preemptions: int = 0
    generator: torch.Generator | None = None

    # Prompt positions whose logprob is computed (when asked for): after a preemption they are not computed again.
    num_prompt_logprobs_computed: int = 0
    # serval.engine.structured_output.GrammarState when sampling_params.structured_outputs is set: the sampler masks
    # with it, the output processor advances it on each accepted token and finishes the request when it terminates.
    grammar: GrammarState | None = None
    # Speculative decoding (serval.engine.spec_decode): tokens proposed to follow all_token_ids, verified in the next
    # step; what the request's verify steps drafted and accepted, for its acceptance length.
    spec_token_ids: list[int] = field(default_factory=list)
    num_spec_steps: int = 0
    num_spec_draft_tokens: int = 0
    num_spec_accepted_tokens: int = 0
    # Set for a pooling request (--runner pooling): prefill only, its hidden states pooled instead of sampled
    # (serval.engine.pooling); sampling_params is then unused.
    pooling_params: PoolingParams | None = None
    # The LoRA adapter the request runs with (serval.lora), held until it ends; None: the base model.
    lora_adapter: LoRAAdapter | None = None
    # vLLM's cache_salt: mixed into the first block's prefix-cache key, so only requests with the same salt share
    # cached blocks (a tenant's prompts can't be probed through another's cache hits).
    cache_salt: str | None = None

    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)

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
    def lora_int_id(self) -> int:
        """The adapter's id; 0 for the base model."""
        return 0 if self.lora_adapter is None else self.lora_adapter.adapter_id

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
