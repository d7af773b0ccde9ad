"""LLMEngine: add requests, step, abort. The synchronous core that LLM and AsyncEngine drive.

One step = schedule → forward + sample → advance → per new token: detokenize, stop checks, outputs.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass

import torch

from serval.config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig
from serval.engine.detokenizer import IncrementalDetokenizer, find_stop_string, stop_holdback
from serval.engine.kv_cache import KVCacheManager
from serval.engine.model_runner import DecodeInFlight, ModelRunner, ModelRunnerOutput
from serval.engine.request import Request, RequestStatus
from serval.engine.scheduler import Scheduler, SchedulerOutput
from serval.model.default_model import default_model_path
from serval.model.loader import load_model
from serval.openai.errors import InvalidArgument
from serval.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from serval.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# What a prompt may be: text, token ids, or vLLM's dict forms {"prompt": ...} / {"prompt_token_ids": [...]}.
PromptType = str | list[int] | dict


@dataclass
class EngineStats:
    num_requests_running: int
    num_requests_waiting: int
    kv_cache_usage: float
    num_free_blocks: int
    num_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    num_prompt_tokens: int
    num_generation_tokens: int


@dataclass
class ProcessedRequest:
    """The user's request, validated: one prompt, n samples (each a Request)."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Request]
    # False: step() reports this request only once it has finished (vLLM's FINAL_ONLY output kind). Offline
    # generation needs nothing else, and building a RequestOutput for every running request every step is host
    # time the GPU waits for.
    stream: bool = True


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        model_path = config.model or default_model_path()
        self.device = config.torch_device()
        self.dtype = config.torch_dtype(_checkpoint_dtype(model_path))
        started = time.monotonic()
        self.model, self.hf_config = load_model(model_path, load_format=config.load_format, dtype=self.dtype,
                                                device=self.device, seed=config.seed,
                                                quantization=config.quantization)
        self.tokenizer = _load_tokenizer_or_none(model_path, config)
        self.config = _resolve_config(config, model_path, self.hf_config)
        # The model computes in self.dtype; the KV cache may be stored narrower (kv_cache_dtype="fp8").
        self.kv_cache_dtype = self.config.torch_kv_cache_dtype(self.dtype)
        num_blocks = _num_kv_blocks(self.config, self.model, self.kv_cache_dtype, self.device)
        self.kv_cache = KVCacheManager(num_blocks, self.config.block_size, self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.config, self.kv_cache)
        self.runner = ModelRunner(self.model, num_blocks, self.config.block_size, self.kv_cache_dtype, self.device,
                                  self.config.max_num_seqs, self.config.max_model_len, self.config.enforce_eager)
        self.vocab_size = self.model.vocab_size
        self.eos_token_id = _eos_token_id(self.hf_config, self.tokenizer)
        self.parents: dict[str, ProcessedRequest] = {}
        self.async_scheduling = (self.config.async_scheduling if self.config.async_scheduling is not None
                                 else self.runner.graphs is not None)
        # With asynchronous scheduling: the decode step queued on the device whose tokens are not processed yet.
        self.in_flight: DecodeInFlight | None = None
        self._grammar_compiler = None
        self.stepping: list[Request] = []  # the requests the current step holds, to fail if it raises
        self.num_consecutive_failed_steps = 0
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        logger.info("engine ready", extra={"model": self.config.model, "device": str(self.device),
                                           "dtype": str(self.dtype), "kv_cache_dtype": str(self.kv_cache_dtype),
                                           "num_kv_blocks": num_blocks,
                                           "max_model_len": self.config.max_model_len,
                                           "load_seconds": round(time.monotonic() - started, 2)})

    @classmethod
    def from_engine_args(cls, **kwargs) -> "LLMEngine":
        return cls(EngineConfig.from_kwargs(**kwargs))

    # ---- requests in ----
    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                token_ids = prompt["prompt_token_ids"]
                if not isinstance(token_ids, (list, tuple)):
                    raise InvalidArgument("prompt", f"invalid prompt_token_ids of type {type(token_ids).__name__}: "
                                                    "allowed a list of token ids")
                return prompt.get("prompt"), list(token_ids)
            if "prompt" not in prompt:
                raise InvalidArgument("prompt", f"invalid prompt {prompt!r}: a dict needs 'prompt' or 'prompt_token_ids'")
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidArgument("prompt", "invalid prompt: this engine has no tokenizer, so prompts must be token ids")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, list):
            return None, list(prompt)
        raise InvalidArgument("prompt", f"invalid prompt of type {type(prompt).__name__}: allowed str, list of token ids, "
                         "{'prompt': str} or {'prompt_token_ids': [...]}")

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None,
                    priority: int = 0, arrival_time: float | None = None, stream: bool = True) -> None:
        """Validate and queue a request; raises ValueError (and changes nothing) if it is invalid.
        stream=False: step() returns its output only when it has finished."""
        processed = self.process_inputs(request_id, prompt, params, priority, arrival_time)
        processed.stream = stream
        self.add_processed(processed)

    def process_inputs(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None,
                       priority: int = 0, arrival_time: float | None = None) -> ProcessedRequest:
        """Tokenize and validate without touching engine state (so a frontend thread may call it)."""
        params = params or SamplingParams()
        text, token_ids = self.tokenize_prompt(prompt)
        self._validate_prompt(token_ids, params)
        arrival_time = time.monotonic() if arrival_time is None else arrival_time
        children = [self._new_request(request_id if params.n == 1 else f"{index}_{request_id}", request_id,
                                      index, text, token_ids, params, priority, arrival_time)
                    for index in range(params.n)]
        return ProcessedRequest(request_id, text, token_ids, children)

    def add_processed(self, parent: ProcessedRequest) -> None:
        if parent.request_id in self.parents:
            raise InvalidArgument(None, f"invalid request_id {parent.request_id!r}: a request with this id is already running")
        self.parents[parent.request_id] = parent
        self.num_prompt_tokens += len(parent.prompt_token_ids)
        for child in parent.children:
            self.scheduler.add_request(child)

    def abort_request(self, request_ids: str | list[str]) -> None:
        for request_id in [request_ids] if isinstance(request_ids, str) else request_ids:
            parent = self.parents.pop(request_id, None)
            if parent is not None:
                for child in parent.children:
                    self.scheduler.finish_request(child, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return bool(self.parents)

    # ---- one step ----
    def step(self) -> list[RequestOutput]:
        """One scheduling step. If it raises, the requests it held end with finish_reason "error" (their
        blocks freed, their prefix-cache entries forgotten) and the engine goes on; only a run of failed
        steps (a broken device, a bug hit by every step) escapes as the exception."""
        self.stepping = []
        try:
            outputs = self._step()
        except Exception as error:
            self.num_consecutive_failed_steps += 1
            if self.num_consecutive_failed_steps >= MAX_CONSECUTIVE_FAILED_STEPS:
                raise
            return self._fail_step(error)
        self.num_consecutive_failed_steps = 0
        return outputs

    def _step(self) -> list[RequestOutput]:
        if self.in_flight is not None:
            return self._finish_in_flight()
        scheduled = self.scheduler.schedule()
        self.stepping = scheduled.requests
        if not scheduled.requests:
            return []
        if self.async_scheduling and self._can_overlap(scheduled):
            self.in_flight = self.runner.launch_decode(scheduled.requests)
            self.scheduler.update(scheduled)
            return self._finish_in_flight()
        runner_output = self.runner.execute(scheduled)
        self.scheduler.update(scheduled)
        return self._process(scheduled.requests, runner_output)

    def _fail_step(self, error: Exception) -> list[RequestOutput]:
        """End every request of the failed step (all of them if it failed before it knew which it held)."""
        self.in_flight = None
        parent_ids = (dict.fromkeys(r.parent_request_id for r in self.stepping) if self.stepping
                      else list(self.parents))
        logger.error("engine step failed; its requests end with an error", exc_info=error,
                     extra={"request_ids": list(parent_ids)})
        outputs = []
        for parent_id in parent_ids:
            parent = self.parents.pop(parent_id, None)
            if parent is None:
                continue
            for child in parent.children:
                if not child.is_finished:
                    # Blocks this step wrote may hold garbage K/V: no later request may hit them.
                    forget_cached_blocks(self.kv_cache, child)
                    self.scheduler.finish_request(child, RequestStatus.FINISHED_ERROR)
            outputs.append(self._request_output(parent))
        return outputs

    def get_stats(self) -> EngineStats:
        return EngineStats(self.scheduler.num_running, self.scheduler.num_waiting, self.kv_cache.usage,
                           self.kv_cache.num_free_blocks, self.kv_cache.num_blocks,
                           self.kv_cache.prefix_cache_queries, self.kv_cache.prefix_cache_hits,
                           self.scheduler.num_preemptions, self.num_prompt_tokens, self.num_generation_tokens)

    # ---- asynchronous scheduling ----
    # While the device runs decode step N, the host queues step N+1 (its input ids gathered on the device from
    # step N's samples) and only then waits for step N's tokens and processes them: detokenizing, stop checks and
    # the next launch overlap the device's work instead of leaving it idle between steps. Step N+1 assumes every
    # request goes on; one that stops on step N's token (EOS, a stop string) has one wasted row in step N+1, which
    # is dropped. Only plain decode batches overlap: anything that needs step N's tokens on the host before
    # sampling step N+1 (penalties, grammars, min_tokens still masking, logprobs) or a change in the batch (a
    # waiting request to admit, a prompt chunk) takes the synchronous path for that step.
    def _can_overlap(self, scheduled: SchedulerOutput) -> bool:
        return all(num_new == 1 and request.num_computed_tokens + 1 == request.num_tokens
                   and self._overlap_safe(request, 0)
                   for request, num_new in zip(scheduled.requests, scheduled.num_scheduled_tokens))

    @staticmethod
    def _overlap_safe(request: Request, num_pending: int) -> bool:
        """Can the request's next token be sampled while num_pending of its tokens are still on the device?"""
        params = request.sampling_params
        return (params.logprobs is None and request.grammar is None and request.prompt_logprobs is None
                and params.repetition_penalty == 1.0 and params.frequency_penalty == 0.0
                and params.presence_penalty == 0.0 and request.num_output_tokens + num_pending >= params.min_tokens)

    def _finish_in_flight(self) -> list[RequestOutput]:
        current, self.in_flight = self.in_flight, None
        self.stepping = current.requests
        following = self._launch_following(current)
        token_ids = current.token_ids()  # waits for the device: `following` is queued behind it by now
        none = [None] * len(token_ids)
        outputs = self._process(current.requests, ModelRunnerOutput(token_ids, none, none))
        if following is not None:
            live = [request for request in following.requests if not request.is_finished]
            if live:  # the rest stopped on current's tokens: their rows in `following` are never read
                self.scheduler.update(SchedulerOutput(live, [1] * len(live)))
                self.in_flight = following
        return outputs

    def _launch_following(self, current: DecodeInFlight) -> DecodeInFlight | None:
        """Queue the decode step after `current`, before its tokens are known; None where that isn't safe."""
        scheduler = self.scheduler
        running = [request for request in current.requests if not request.is_finished]
        if len(running) != scheduler.num_running or (scheduler.num_waiting
                                                      and scheduler.num_running < scheduler.max_num_seqs):
            return None  # the batch changes: requests to admit, or running ones that weren't in this step
        # A request that reaches its length limit with current's token is known to stop: leave it out.
        following = [request for request in running if request.num_output_tokens + 1 < request.max_tokens]
        if not following or not all(self._overlap_safe(request, 1) for request in following):
            return None
        for request in following:
            if not self.kv_cache.allocate(request, 1):
                return None  # out of blocks: the synchronous step will preempt
        return self.runner.launch_decode(following, previous=current)

    # ---- internals ----
    def _validate_prompt(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise InvalidArgument("prompt", "invalid prompt: it is empty; allowed: at least one token")
        self._check_token_ids(token_ids, params)
        limit = self.config.max_model_len
        if len(token_ids) >= limit:
            raise InvalidArgument("prompt", f"invalid prompt: it has {len(token_ids)} tokens, but max_model_len is "
                                            f"{limit}; allowed at most {limit - 1} prompt tokens so that one can be "
                                            "generated")
        if self.tokenizer is None and params.stop:
            raise InvalidArgument("stop", "invalid sampling parameter stop: stop strings need a tokenizer")

    def _check_token_ids(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Every token id the request carries must index the vocabulary: the sampler indexes the logits with
        them, and one out of range there fails the whole step."""
        vocab_size = self.vocab_size
        bad = [t for t in prompt_token_ids if not _is_token_id(t, vocab_size)]
        if bad:
            raise InvalidArgument("prompt", f"invalid prompt token ids {bad[:5]}: allowed integers in [0, {vocab_size})")
        for param, token_ids in _sampling_token_ids(params):
            bad = [t for t in token_ids if not _is_token_id(t, vocab_size)]
            if bad:
                raise InvalidArgument(param, f"invalid sampling parameter {param}={bad[:5]}: allowed token ids in "
                                             f"[0, {vocab_size})")

    def _new_request(self, request_id: str, parent_id: str, index: int, text: str | None, token_ids: list[int],
                     params: SamplingParams, priority: int, arrival_time: float) -> Request:
        request = Request(request_id=request_id, prompt_token_ids=token_ids, sampling_params=params,
                          eos_token_id=self.eos_token_id, max_model_len=self.config.max_model_len, prompt=text,
                          priority=priority, arrival_time=arrival_time, parent_request_id=parent_id, index=index)
        if params.seed is not None:
            request.generator = torch.Generator(device=self.device).manual_seed(params.seed + index)
        if self.tokenizer is not None and params.detokenize:
            request.detokenizer = IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens,
                                                         params.spaces_between_special_tokens)
        if params.structured_outputs is not None:
            request.grammar = self.grammar_compiler().new_state(params.structured_outputs)
        return request

    def _process(self, requests: list[Request], runner_output: ModelRunnerOutput) -> list[RequestOutput]:
        touched: dict[str, ProcessedRequest] = {}
        now = time.monotonic()
        for request, token_id, logprobs, prompt_logprobs in zip(
                requests, runner_output.sampled_token_ids, runner_output.logprobs, runner_output.prompt_logprobs):
            if request.is_finished:  # aborted, or (asynchronous scheduling) stopped on the previous step's token
                continue
            if prompt_logprobs is not None:
                request.prompt_logprobs.extend(self._decoded(entry) for entry in prompt_logprobs)
            if token_id is None:
                continue
            self._append_token(request, token_id, logprobs, now)
            parent = self.parents[request.parent_request_id]
            if parent.stream or request.is_finished:
                touched[request.parent_request_id] = parent
        outputs = [self._request_output(parent) for parent in touched.values()
                   if parent.stream or all(child.is_finished for child in parent.children)]
        # Only now, so that a step failing half-way leaves every request it held to _fail_step.
        for output in outputs:
            if output.finished:
                del self.parents[output.request_id]
        return outputs

    def _append_token(self, request: Request, token_id: int, logprobs: dict[int, Logprob] | None,
                      now: float) -> None:
        request.append_output_token(token_id)
        self.num_generation_tokens += 1
        if request.first_token_time is None:
            request.first_token_time = now
        request.last_token_time = now
        if logprobs is not None:
            request.logprobs.append(self._decoded(logprobs))
            request.cumulative_logprob += logprobs[token_id].logprob
        status = _token_stop(request, token_id)
        params = request.sampling_params
        # A grammar's last token is part of the output (the closing brace), unlike EOS or a stop token.
        grammar_done = request.grammar is not None and status is None and _grammar_stop(request, token_id)
        if request.detokenizer is not None and (status is None or params.include_stop_str_in_output):
            new_text = request.detokenizer.push([token_id])
            request.output_text += new_text
            if status is None and params.stop and request.num_output_tokens > params.min_tokens:
                match = find_stop_string(request.output_text, len(new_text), params.stop,
                                         params.include_stop_str_in_output)
                if match is not None:
                    request.stop_reason, truncate_to = match
                    request.output_text = request.output_text[:truncate_to]
                    status = RequestStatus.FINISHED_STOPPED
        if status is None and grammar_done:
            status = RequestStatus.FINISHED_STOPPED
        if status is None and (request.num_output_tokens >= request.max_tokens
                               or request.num_tokens >= request.max_model_len):
            status = RequestStatus.FINISHED_LENGTH
        if status is not None:
            self.scheduler.finish_request(request, status)

    def grammar_compiler(self):
        """serval.guard.structured.GrammarCompiler for this engine's tokenizer, made on first use (llguidance
        loads only when a request asks for structured output)."""
        if self._grammar_compiler is None:
            if self.tokenizer is None:
                raise InvalidArgument("structured_outputs", "invalid sampling parameter structured_outputs: constrained decoding needs a "
                                 "tokenizer")
            from serval.guard.structured import GrammarCompiler
            self._grammar_compiler = GrammarCompiler(self.tokenizer)
        return self._grammar_compiler

    def _decoded(self, logprobs: dict[int, Logprob]) -> dict[int, Logprob]:
        if self.tokenizer is not None:
            for token_id, logprob in logprobs.items():
                logprob.decoded_token = self.tokenizer.decode([token_id])
        return logprobs

    def _request_output(self, parent: ProcessedRequest) -> RequestOutput:
        completions = []
        for child in parent.children:
            text = child.output_text
            if not child.is_finished and child.sampling_params.stop:
                text = text[:len(text) - stop_holdback(text, child.sampling_params.stop)]
            wants_logprobs = child.sampling_params.logprobs is not None
            completions.append(CompletionOutput(
                index=child.index, text=text, token_ids=list(child.output_token_ids),
                cumulative_logprob=child.cumulative_logprob if wants_logprobs else None,
                logprobs=child.logprobs, finish_reason=child.finish_reason, stop_reason=child.stop_reason))
        first = parent.children[0]
        metrics = RequestMetrics(arrival_time=first.arrival_time, first_scheduled_time=first.first_scheduled_time,
                                 first_token_time=first.first_token_time, last_token_time=first.last_token_time,
                                 finished_time=first.finished_time, num_cached_tokens=max(first.num_cached_tokens, 0))
        return RequestOutput(request_id=parent.request_id, prompt=parent.prompt,
                             prompt_token_ids=parent.prompt_token_ids, prompt_logprobs=first.prompt_logprobs,
                             outputs=completions, finished=all(c.is_finished for c in parent.children),
                             metrics=metrics, num_cached_tokens=metrics.num_cached_tokens)


# This many failed steps in a row means the engine itself is broken (a lost device, a bug every step hits), not
# one request: the loop stops so that the process can be restarted.
MAX_CONSECUTIVE_FAILED_STEPS = 3


def _is_token_id(value, vocab_size: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab_size


def _sampling_token_ids(params: SamplingParams) -> list[tuple[str, list]]:
    """(OpenAI body field, token ids) for every token id the sampling parameters carry."""
    fields = [("stop_token_ids", params.stop_token_ids or []), ("logit_bias", list(params.logit_bias or ()))]
    for name in ("allowed_token_ids", "bad_words_token_ids"):  # vLLM's, once SamplingParams carries them
        token_ids = getattr(params, name, None)
        if token_ids:
            fields.append((name, [t for group in token_ids for t in group] if name == "bad_words_token_ids"
                           else list(token_ids)))
    return fields


def forget_cached_blocks(kv_cache: KVCacheManager, request: Request) -> None:
    """Drop the request's blocks from the prefix cache (they stay allocated until freed)."""
    # TODO(kv_cache owner): a public KVCacheManager method for this; until then the eviction helper.
    for block_id in request.block_ids:
        kv_cache._evict(block_id)


def _token_stop(request: Request, token_id: int) -> RequestStatus | None:
    """EOS and stop token ids end a request once min_tokens are out (the sampler masks them before)."""
    params = request.sampling_params
    if request.num_output_tokens <= params.min_tokens:  # the sampler masked them for these
        return None
    if token_id == request.eos_token_id and not params.ignore_eos:
        return RequestStatus.FINISHED_STOPPED
    if token_id in params.stop_token_ids:
        request.stop_reason = token_id
        return RequestStatus.FINISHED_STOPPED
    return None


def _grammar_stop(request: Request, token_id: int) -> bool:
    """Advance the grammar; True when structured output is complete (nothing but EOS could follow)."""
    if not request.grammar.advance(token_id):
        # The sampler only offers tokens the grammar allows, so this is a bug, not a user error: stop rather
        # than emit output that no longer matches.
        logger.error("grammar rejected a sampled token", extra={"request_id": request.request_id,
                                                                "token_id": token_id,
                                                                "error": request.grammar.matcher.get_error()})
        return True
    return request.grammar.terminated


def _checkpoint_dtype(model_path: str) -> torch.dtype | None:
    config_file = os.path.join(model_path, "config.json")
    if not os.path.isfile(config_file):
        return None
    with open(config_file) as f:
        raw = json.load(f)
    name = raw.get("torch_dtype") or raw.get("dtype")
    return getattr(torch, name, None) if isinstance(name, str) else None


def _load_tokenizer_or_none(model_path: str, config: EngineConfig):
    if config.skip_tokenizer_init:
        return None
    from serval.model.tokenizer import load_tokenizer
    try:
        return load_tokenizer(model_path, config.tokenizer)
    except Exception as error:  # dummy weights for a config.json alone need no tokenizer: ids only
        if config.load_format != "dummy":
            raise
        logger.warning("no tokenizer; prompts must be token ids", extra={"reason": str(error)})
        return None


def _eos_token_id(hf_config, tokenizer) -> int | None:
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    eos = getattr(hf_config, "eos_token_id", None)
    return eos[0] if isinstance(eos, list) and eos else eos


def _resolve_config(config: EngineConfig, model_path: str, hf_config) -> EngineConfig:
    """Fill the arguments that depend on the model, and check they agree with each other."""
    model_limit = getattr(hf_config, "max_position_embeddings", None) or 2048
    max_model_len = config.max_model_len or model_limit
    if max_model_len > model_limit:
        raise InvalidArgument("max_model_len", f"invalid engine argument max_model_len={max_model_len}: the model allows at most "
                         f"{model_limit} (max_position_embeddings)")
    max_num_batched_tokens = config.max_num_batched_tokens
    if max_num_batched_tokens is None:
        max_num_batched_tokens = max(2048, config.max_num_seqs) if config.enable_chunked_prefill else max_model_len
    if not config.enable_chunked_prefill and max_num_batched_tokens < max_model_len:
        raise InvalidArgument("max_num_batched_tokens", f"invalid engine argument max_num_batched_tokens={max_num_batched_tokens}: without "
                         f"chunked prefill it must be >= max_model_len ({max_model_len}) so every prompt fits a step")
    return dataclasses.replace(config, model=model_path, max_model_len=max_model_len,
                               max_num_batched_tokens=max_num_batched_tokens)


# Room left beside the KV cache for the CUDA graphs' memory pool and the allocator's fragmentation.
_GPU_RESERVE_BYTES = 1024**3


def _gpu_kv_cache_bytes(config: EngineConfig, model, kv_cache_dtype: torch.dtype, device: torch.device) -> int:
    """What gpu_memory_utilization leaves for the KV cache: utilization x total memory, less the weights and the
    peak activations of a profiling forward over a full step (max_num_batched_tokens), less a reserve; never more
    than is free now (another process may hold part of the card)."""
    activation_bytes = ModelRunner.profile_activation_bytes(model, config.max_num_batched_tokens,
                                                            config.max_num_seqs, config.block_size, kv_cache_dtype,
                                                            device)
    free, total = torch.cuda.mem_get_info(device)
    weights = torch.cuda.memory_allocated(device)
    budget = config.gpu_memory_utilization * total - weights - activation_bytes - _GPU_RESERVE_BYTES
    budget = min(budget, free - activation_bytes - _GPU_RESERVE_BYTES)
    logger.info("gpu memory profiled", extra={"total_gib": round(total / 1024**3, 2),
                                              "weights_gib": round(weights / 1024**3, 2),
                                              "activations_gib": round(activation_bytes / 1024**3, 2),
                                              "kv_cache_gib": round(max(budget, 0) / 1024**3, 2)})
    return max(int(budget), 0)


def _num_kv_blocks(config: EngineConfig, model, kv_cache_dtype: torch.dtype, device: torch.device) -> int:
    """Blocks in the KV pool: its memory (given, profiled, or the CPU default) over one block's bytes in
    kv_cache_dtype, so a float8 cache holds twice the blocks of a 16-bit one."""
    per_block = ModelRunner.kv_cache_bytes_per_block(model, config.block_size, kv_cache_dtype)
    if config.num_gpu_blocks_override is not None:
        num_blocks = config.num_gpu_blocks_override
    elif config.kv_cache_memory_bytes is not None:
        num_blocks = config.kv_cache_memory_bytes // per_block
    elif device.type == "cuda":
        num_blocks = int(_gpu_kv_cache_bytes(config, model, kv_cache_dtype, device) // per_block)
    else:
        num_blocks = DEFAULT_CPU_KV_CACHE_BYTES // per_block
        # No point holding more than every sequence at full length.
        num_blocks = min(num_blocks, config.max_num_seqs * -(-config.max_model_len // config.block_size))
    needed = -(-config.max_model_len // config.block_size)
    if num_blocks < needed:
        raise ValueError(f"the KV cache has {num_blocks} blocks of {config.block_size} tokens, fewer than one "
                         f"sequence of max_model_len={config.max_model_len} needs ({needed}); raise the KV memory "
                         "(kv_cache_memory_bytes, gpu_memory_utilization or num_gpu_blocks_override) or lower "
                         "max_model_len")
    return num_blocks
