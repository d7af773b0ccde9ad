"""LLMEngine: add requests, step, abort. The synchronous core that LLM and AsyncEngine drive.

One step = schedule (Scheduler) → forward + sample (ModelRunner) → advance → the output processor: stops,
detokenization, RequestOutputs. A step that raises fails the requests it held, not the engine.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from serval.config import EngineConfig
from serval.distributed import WorkerFailedError
from serval.engine.input_processor import InputProcessor, PromptType
from serval.engine.kv_cache import KVCacheManager, model_sliding_window
from serval.engine.kv_groups import HybridKVCacheManager, KVCacheLayout, hybrid_kv_layout, max_blocks_per_sequence
from serval.engine.memory import MemoryUsage, memory_usage, num_kv_blocks
from serval.engine.model_runner import DecodeForward, DecodeInFlight, ModelRunner, ModelRunnerOutput
from serval.engine.output_processor import OutputProcessor, RequestState, SampledToken, StepUpdate
from serval.engine.pooling import PoolingProcessor, PoolingRequestOutput, PoolingRequestState, pooling_engine_config
from serval.engine.profiler import EngineProfiler, host_range
from serval.engine.request import Request, RequestStatus
from serval.engine.scheduler import Scheduler, SchedulerOutput
from serval.engine.spec_decode.decoder import SpecDecoder, SpecDecodeStats
from serval.engine.spec_decode.draft_model import DraftModel
from serval.engine.spec_decode.eagle3 import Eagle3Drafter, load_eagle3_head
from serval.layers.pooling import parse_pooler_overrides
from serval.layers.quant.kv_scales import enable_kv_scale_calculation
from serval.lora.request import LoRARequest
from serval.model.default_model import default_model_path
from serval.model.loader import load_model
from serval.model.pooling_model import is_pooling_model, load_instruction_prompts, load_pooler_config
from serval.openai.errors import InvalidArgument
from serval.pooling_params import PoolingParams
from serval.outputs import RequestOutput
from serval.sampling_params import SamplingParams

if TYPE_CHECKING:
    from serval.engine.structured_output import GrammarState

logger = logging.getLogger(__name__)

# This many failed steps in a row means the engine itself is broken (a lost device, a bug every step hits), not
# one request: the exception escapes, and the process can be restarted.
MAX_CONSECUTIVE_FAILED_STEPS = 3


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
    spec_decode: SpecDecodeStats | None = None  # None without speculative decoding
    # LoRA (vLLM's lora_requests_info): adapter names of the running and waiting requests, max_loras (0: LoRA off).
    running_lora_adapters: list[str] = dataclasses.field(default_factory=list)
    waiting_lora_adapters: list[str] = dataclasses.field(default_factory=list)
    max_lora: int = 0


class LLMEngine:
    def __init__(self, config: EngineConfig, delta_outputs: bool = False) -> None:
        """delta_outputs: step() returns the output processor's OutputDeltas (what is new since the previous
        step) instead of cumulative RequestOutputs; the engine-core process sends those (core_messages)."""
        self.delta_outputs = delta_outputs
        model_path = config.model or default_model_path()
        self.device = config.torch_device()
        self.dtype = config.torch_dtype(_checkpoint_dtype(model_path))
        started = time.monotonic()
        # tensor_parallel_size > 1 (or distributed_executor_backend="mp"): this process is rank 0 of the
        # multi-process executor, whose workers hold the other shards (serval.distributed). Otherwise the model
        # runs here, as it always has.
        self.executor = None
        multi_process = config.tensor_parallel_size > 1 or config.distributed_executor_backend == "mp"
        if config.enable_lora and multi_process:
            raise InvalidArgument("enable_lora", "invalid engine argument enable_lora=True: LoRA does not run with "
                                                 "the multi-process executor (tensor_parallel_size > 1) yet")
        if multi_process:
            from serval.distributed.executor import TensorParallelExecutor
            self.executor = TensorParallelExecutor.start(config, model_path, self.dtype, self.device)
            self.model, self.hf_config = self.executor.model, self.executor.hf_config
        else:
            self.model, self.hf_config = load_model(model_path, load_format=config.load_format, dtype=self.dtype,
                                                    device=self.device, seed=config.seed,
                                                    quantization=config.quantization, runner=config.runner,
                                                    hf_overrides=config.hf_overrides)
        # The resident adapter slots take device memory before the KV cache is sized from what is left.
        self.lora = _lora_manager(config, self.model, self.device, self.dtype)
        self.tokenizer = _load_tokenizer_or_none(model_path, config)
        self.config = _resolve_config(config, model_path, self.hf_config)
        pooler = load_pooler_config(model_path, self.model) if is_pooling_model(self.model) else None
        if pooler is not None and self.executor is not None:
            self.executor.shutdown()
            raise InvalidArgument("runner", "invalid engine arguments: the pooling runner runs in one process; "
                                            "tensor_parallel_size must be 1 and distributed_executor_backend unset")
        if pooler is not None and config.speculative_config is not None:
            raise InvalidArgument("speculative_config", "invalid engine arguments: the pooling runner decodes "
                                                        "nothing, so it takes no speculative_config")
        if pooler is not None:  # --runner pooling (serval.engine.pooling)
            pooler = dataclasses.replace(pooler, **parse_pooler_overrides(config.pooler_config))
            self.config = pooling_engine_config(self.config, pooler)
        else:
            self.config = dataclasses.replace(self.config, runner="generate")
        # The model computes in self.dtype; the KV cache may be stored narrower (kv_cache_dtype="fp8").
        self.kv_cache_dtype = self.config.torch_kv_cache_dtype(self.dtype)
        draft_model = self._load_draft_model()  # before the pool is sized: its weights take memory first
        if self.executor is None:
            num_blocks = num_kv_blocks(self.config, self.model, self.kv_cache_dtype, self.device)
        else:  # every rank sizes its pool (its heads, its memory); all take the smallest
            self.config, num_blocks = self.executor.configure(self.config, self.kv_cache_dtype)
        if self.config.calculate_kv_scales:  # after the memory profile's forward, before graph capture
            enable_kv_scale_calculation(self.model)
        drafter = None
        if draft_model is not None:
            num_blocks = share_blocks_with_draft(num_blocks, self.config, self.model, draft_model, self.kv_cache_dtype)
            drafter = (Eagle3Drafter(draft_model, self.model, num_blocks, self.config.block_size, self.kv_cache_dtype,
                                     self.device, self.config.speculative_config.num_speculative_tokens)
                       if self.config.speculative_config.method == "eagle3" else
                       DraftModel(draft_model, num_blocks, self.config.block_size, self.kv_cache_dtype, self.device))
        kv_layout = _hybrid_layout(self.config, self.model, num_blocks, drafter, self.executor)
        if kv_layout is not None:
            num_blocks = _hybrid_num_blocks(self.config, num_blocks, kv_layout)
            self.kv_cache = HybridKVCacheManager(num_blocks, self.config.block_size, kv_layout.groups,
                                                 self.config.enable_prefix_caching)
        else:
            self.kv_cache = KVCacheManager(num_blocks, self.config.block_size, self.config.enable_prefix_caching,
                                           sliding_window=_freeable_window(self.config, self.model, num_blocks,
                                                                           drafter))
        self.scheduler = Scheduler(self.config, self.kv_cache)
        if self.executor is None:
            self.runner = ModelRunner(self.model, num_blocks, self.config.block_size, self.kv_cache_dtype,
                                      self.device, self.config.max_num_seqs, self.config.max_model_len,
                                      self.config.enforce_eager, drafter, lora=self.lora,
                                      speculative_config=self.config.speculative_config,
                                      max_num_batched_tokens=self.config.max_num_batched_tokens,
                                      cudagraph_mixed=self.config.cudagraph_mixed,
                                      cudagraph_mixed_max_tokens=self.config.cudagraph_mixed_max_tokens,
                                      cudagraph_mixed_sizes=self.config.cudagraph_mixed_sizes, kv_layout=kv_layout)
        else:
            self.runner = self.executor.make_runner(num_blocks, self.config, self.kv_cache_dtype)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.vocab_size = self.model.vocab_size
        self.eos_token_id = _eos_token_id(self.hf_config, self.tokenizer)
        self.input_processor = InputProcessor(self.config, self.tokenizer, self.vocab_size, self.eos_token_id,
                                              self.device)
        self.pooling = (PoolingProcessor(self.model, pooler, self.hf_config, self.input_processor,
                                         self.config.max_model_len, load_instruction_prompts(model_path))
                        if pooler is not None else None)
        self.async_scheduling = (self.config.async_scheduling if self.config.async_scheduling is not None
                                 else self.runner.graphs is not None)
        spec_config = self.config.speculative_config
        self.spec_decoder = SpecDecoder(spec_config, self.vocab_size) if spec_config is not None else None
        if self.spec_decoder is not None and not self.spec_decoder.overlaps_steps:
            # A draft model or EAGLE-3 head runs inside every synchronous target step: nothing queues without it.
            self.async_scheduling = False
        # SERVAL_ASYNC_MIXED_STEPS=0 keeps steps that change the batch synchronous (the A/B of docs/performance.md).
        self.async_mixed_steps = os.environ.get("SERVAL_ASYNC_MIXED_STEPS", "1") != "0"
        # With asynchronous scheduling: the step queued on the device whose tokens are not processed yet.
        self.in_flight: DecodeInFlight | None = None
        # The decode forward queued behind in_flight whose sampling waits for in_flight's tokens (grammars).
        self.queued_forward: DecodeForward | None = None
        self.stepping: list[Request] = []  # the requests the current step holds, to fail if it raises
        self.profiler = EngineProfiler()
        self.num_consecutive_failed_steps = 0
        self.num_prompt_tokens = 0
        logger.info("engine ready", extra={"model": self.config.model, "device": str(self.device),
                                           "dtype": str(self.dtype), "kv_cache_dtype": str(self.kv_cache_dtype),
                                           "num_kv_blocks": num_blocks, "max_model_len": self.config.max_model_len,
                                           "load_seconds": round(time.monotonic() - started, 2)})

    def _load_draft_model(self) -> torch.nn.Module | None:
        spec_config = self.config.speculative_config
        if spec_config is None or spec_config.method not in ("draft_model", "eagle3"):
            return None
        if spec_config.method == "eagle3":
            return load_eagle3_head(spec_config.model, self.model, self.dtype, self.device,
                                    self.config.load_format, self.config.seed)
        draft, _ = load_model(spec_config.model, load_format=self.config.load_format, dtype=self.dtype,
                              device=self.device, seed=self.config.seed)
        if draft.vocab_size != self.model.vocab_size:
            raise InvalidArgument("speculative_config", f"invalid speculative_config: the draft model's vocabulary "
                                                        f"({draft.vocab_size}) differs from the target's "
                                                        f"({self.model.vocab_size}); it must share the tokenizer")
        return draft

    @classmethod
    def from_engine_args(cls, **kwargs) -> "LLMEngine":
        return cls(EngineConfig.from_kwargs(**kwargs))

    # ---- requests in ----
    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None,
                    priority: int = 0, arrival_time: float | None = None, stream: bool = True,
                    lora_request: LoRARequest | None = None) -> None:
        """Validate and queue a request; raises InvalidArgument (and changes nothing) if it is invalid.
        stream=False: step() returns its output only when it has finished."""
        state = self.process_inputs(request_id, prompt, params, priority, arrival_time, lora_request)
        state.stream = stream
        self.add_processed(state)

    def process_inputs(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None,
                       priority: int = 0, arrival_time: float | None = None,
                       lora_request: LoRARequest | None = None) -> RequestState:
        """Tokenize, validate, compile any grammar, read the LoRA adapter if it isn't in host memory, without
        touching engine state (so a frontend thread may call it). A pooling engine takes PoolingParams (and
        returns a PoolingRequestState) and only those."""
        if self.pooling is not None or isinstance(params, PoolingParams):
            if lora_request is not None:
                raise InvalidArgument("model", "LoRA adapters are served by the generate runner, not pooling")
            return self._process_pooling_inputs(request_id, prompt, params, priority, arrival_time)
        adapter = self.lora_adapter(lora_request) if lora_request is not None else None
        processed = self.input_processor.process(request_id, prompt, params, priority, arrival_time)
        for request in processed.requests:
            request.lora_adapter = adapter
        return self.output_processor.new_request_state(request_id, processed.prompt.text, processed.prompt.token_ids,
                                                       processed.requests)

    def _process_pooling_inputs(self, request_id: str, prompt: PromptType, params, priority: int,
                                arrival_time: float | None) -> PoolingRequestState:
        if self.pooling is None:
            raise InvalidArgument("model", f"model {self.config.model!r} is served by the generate runner (text "
                                           "generation); embeddings and scores need a pooling model served with "
                                           "--runner pooling")
        if params is not None and not isinstance(params, PoolingParams):
            raise InvalidArgument("model", f"model {self.config.model!r} is served by the pooling runner "
                                           "(embeddings, score, rerank); it does not generate text: serve a "
                                           "generative model with --runner generate for completions and chat")
        return self.pooling.new_request(request_id, prompt, params or PoolingParams(), priority, arrival_time)

    def add_processed(self, state: RequestState | PoolingRequestState) -> None:
        if isinstance(state, PoolingRequestState):
            self.pooling.add(state)
            self.num_prompt_tokens += len(state.prompt_token_ids)
            self.scheduler.add_request(state.request)
            return
        self.output_processor.add_request(state)
        self.num_prompt_tokens += len(state.prompt_token_ids)
        for request in state.requests:
            self.scheduler.add_request(request)

    def abort_request(self, request_ids: str | list[str]) -> None:
        for request_id in [request_ids] if isinstance(request_ids, str) else request_ids:
            pooling_state = self.pooling.remove(request_id) if self.pooling is not None else None
            if pooling_state is not None:
                self.scheduler.finish_request(pooling_state.request, RequestStatus.FINISHED_ABORTED)
                continue
            state = self.output_processor.remove_request(request_id)
            if state is not None:
                for request in state.requests:
                    self.scheduler.finish_request(request, RequestStatus.FINISHED_ABORTED)

    # ---- LoRA adapters (vLLM's add_lora / remove_lora / list_loras) ----
    def lora_adapter(self, lora_request: LoRARequest):
        """The request's adapter (serval.lora.adapter.LoRAAdapter), read and checked on first use."""
        if self.lora is None:
            raise InvalidArgument("lora_request", "invalid lora_request: this engine runs without LoRA; start it "
                                                  "with enable_lora=True (serve: --enable-lora)")
        return self.lora.get(lora_request)

    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Read and check the adapter now, so its first request doesn't wait for the disk; InvalidArgument if bad."""
        self.lora_adapter(lora_request)
        return True

    def remove_lora(self, lora_int_id: int) -> bool:
        """Forget the adapter in host memory; requests that hold it finish with it."""
        if self.lora is None:
            return False
        self.lora.remove(lora_int_id)
        return True

    def list_loras(self) -> set[int]:
        return set(self.lora.host_adapter_ids()) if self.lora is not None else set()

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished_requests() or (self.pooling is not None
                                                                    and self.pooling.has_unfinished())

    @property
    def pooling_task(self) -> str | None:
        """"embed" (an embedder) or "classify" (a cross-encoder) with --runner pooling; None for a generative model."""
        if self.pooling is None:
            return None
        return "classify" if self.pooling.is_classifier else "embed"

    def instruction_prefix(self, prompt_name: str | None) -> str:
        """The text a pooling model's sentence-transformers config puts before a text input named prompt_name (its
        default prompt when None; "" when it has none). Raises InvalidArgument for a name it doesn't have."""
        return self.pooling.prompts.prefix(prompt_name) if self.pooling is not None else ""

    def grammar_compiler(self):
        return self.input_processor.grammar_compiler()

    # ---- one step ----
    def step(self) -> list[RequestOutput]:
        """One scheduling step. If it raises, the requests it held end with finish_reason "error" (their
        blocks freed, their prefix-cache entries forgotten) and the engine goes on; only a run of failed
        steps (a broken device, a bug hit by every step) escapes as the exception."""
        self.stepping = []
        try:
            with host_range("serval.step"):
                outputs = self._step()
        except Exception as error:
            self.num_consecutive_failed_steps += 1
            if self.num_consecutive_failed_steps >= MAX_CONSECUTIVE_FAILED_STEPS or isinstance(error,
                                                                                               WorkerFailedError):
                raise  # a lost tensor-parallel worker: no later step can run either
            return self._fail_step(error)
        self.num_consecutive_failed_steps = 0
        return outputs

    def _step(self) -> list[RequestOutput]:
        if self.pooling is not None:
            return self._pooling_step()
        if self.in_flight is not None:
            return self._finish_in_flight()
        with host_range("serval.schedule"):
            scheduled = self.scheduler.schedule()
        self.stepping = scheduled.requests
        if not scheduled.requests:
            return []
        self._start_grammar_fill([request for request, num_new in zip(scheduled.requests,
                                                                      scheduled.num_scheduled_tokens)
                                  if request.num_computed_tokens + num_new >= request.num_tokens])
        if self.async_scheduling and self._can_overlap(scheduled):
            with host_range("serval.launch_decode"):
                self.in_flight = self.runner.launch_decode(scheduled.requests)
            self.scheduler.update(scheduled)
            return self._finish_in_flight()
        if self._launches_steps() and all(self._launchable(request, False) for request in scheduled.requests):
            with host_range("serval.launch_step"):
                self.in_flight = self.runner.launch_step(scheduled)
            self.scheduler.update(scheduled)
            return self._finish_in_flight()
        with host_range("serval.execute"):
            runner_output = self.runner.execute(scheduled)
        self.scheduler.update(scheduled)
        if self.spec_decoder is None:
            return self._process(scheduled.requests, runner_output)
        if runner_output.verified is not None:
            self.spec_decoder.accept(scheduled.requests, runner_output.verified, self.kv_cache)
        outputs = self._process(scheduled.requests, runner_output)
        self.spec_decoder.propose(self.scheduler.running)
        return outputs

    def _pooling_step(self) -> list[PoolingRequestOutput]:
        """Prefill chunks of pooling requests; those whose prompt is complete are pooled and finish now."""
        scheduled = self.scheduler.schedule()
        self.stepping = scheduled.requests
        if not scheduled.requests:
            return []
        hidden = self.runner.execute_hidden(scheduled)
        completed = self.pooling.add_hidden_states(scheduled, hidden)
        self.scheduler.update(scheduled)
        outputs = self.pooling.finish(completed)
        for state in completed:
            self.scheduler.finish_request(state.request, RequestStatus.FINISHED_STOPPED)
        return outputs

    def _process(self, requests: list[Request], runner_output: ModelRunnerOutput) -> list[RequestOutput]:
        sampled = [SampledToken(token_id, logprobs, prompt_logprobs) for token_id, logprobs, prompt_logprobs
                   in zip(runner_output.sampled_token_ids, runner_output.logprobs, runner_output.prompt_logprobs)]
        with host_range("serval.process_step"):
            update = self.output_processor.process_step(requests, sampled, time.monotonic())
        if runner_output.verified is not None:
            self._process_verified(requests, runner_output, update)
        return self._finish(update)

    def _process_verified(self, requests: list[Request], runner_output: ModelRunnerOutput,
                          update: StepUpdate) -> None:
        """The tokens after the first of each verify step: a stop (EOS, a stop string, the length limit) on one of
        them drops the rest as it would have without speculation."""
        more = [(request, result) for request, result in zip(requests, runner_output.verified)
                if result is not None and len(result.token_ids) > 1]
        if more:
            self.output_processor.process_more_tokens(
                [request for request, _ in more], [result.token_ids[1:] for _, result in more],
                [result.logprobs[1:] if result.logprobs is not None else None for _, result in more],
                time.monotonic(), update)

    def _finish(self, update: StepUpdate) -> list[RequestOutput]:
        for sequence in update.finished:
            self.scheduler.finish_request(sequence.request, sequence.status)
            if self.spec_decoder is not None:
                self.spec_decoder.on_finished(sequence.request)
        with host_range("serval.make_outputs"):
            if self.delta_outputs:
                return self.output_processor.make_deltas(update.to_report)
            return self.output_processor.make_outputs(update.to_report)

    def _fail_step(self, error: Exception) -> list[RequestOutput]:
        """End every request of the failed step (all of them if it failed before it knew which it held)."""
        self.in_flight = None
        self.queued_forward = None
        if self.pooling is not None:
            return self._fail_pooling_step(error)
        request_ids = (list(dict.fromkeys(request.parent_request_id for request in self.stepping)) if self.stepping
                       else list(self.output_processor.request_states))
        logger.error("engine step failed; its requests end with an error", exc_info=error,
                     extra={"request_ids": request_ids})
        update = self.output_processor.fail_requests(request_ids)
        for sequence in update.finished:
            # Blocks this step wrote may hold garbage K/V: no later request may hit them.
            self.kv_cache.uncache(sequence.request)
        return self._finish(update)

    def _fail_pooling_step(self, error: Exception) -> list[PoolingRequestOutput]:
        request_ids = ([request.request_id for request in self.stepping] if self.stepping
                       else list(self.pooling.states))
        logger.error("engine step failed; its requests end with an error", exc_info=error,
                     extra={"request_ids": request_ids})
        outputs = []
        for request_id in request_ids:
            state = self.pooling.remove(request_id)
            if state is not None:
                self.kv_cache.uncache(state.request)
                self.scheduler.finish_request(state.request, RequestStatus.FINISHED_ERROR)
                outputs.append(self.pooling.failed_output(state))
        return outputs

    def start_profile(self, trace_dir: str | None = None) -> None:
        """Start torch's profiler (serval.engine.profiler) on the calling thread, which must be the one that
        steps. trace_dir defaults to SERVAL_TORCH_PROFILER_DIR; InvalidArgument if neither is set or a profile
        runs already."""
        self.profiler.start(trace_dir)

    def stop_profile(self) -> str:
        """Stop the profile and write its trace; returns the trace's path."""
        return self.profiler.stop()

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any (a single-process engine holds nothing to stop)."""
        if self.executor is not None:
            self.executor.shutdown()

    def memory_usage(self) -> MemoryUsage:
        return memory_usage(self.model, self.runner.kv_caches)

    def get_stats(self) -> EngineStats:
        return EngineStats(self.scheduler.num_running, self.scheduler.num_waiting, self.kv_cache.usage,
                           self.kv_cache.num_free_blocks, self.kv_cache.num_blocks,
                           self.kv_cache.prefix_cache_queries, self.kv_cache.prefix_cache_hits,
                           self.scheduler.num_preemptions, self.num_prompt_tokens,
                           self.output_processor.num_generation_tokens,
                           self.spec_decoder.stats if self.spec_decoder is not None else None,
                           *self._lora_stats())

    def _lora_stats(self) -> tuple[list[str], list[str], int]:
        if self.lora is None:
            return [], [], 0
        def names(requests) -> list[str]:
            return sorted({r.lora_adapter.request.lora_name for r in requests if r.lora_adapter is not None})
        return (names(list(self.scheduler.running)), names([r for _, r in list(self.scheduler.waiting)]),
                self.config.max_loras)

    # ---- asynchronous scheduling ----
    # While the device runs decode step N, the host queues step N+1 (its input ids gathered on the device from
    # step N's samples) and only then waits for step N's tokens and processes them: detokenizing, stop checks and
    # the next launch overlap the device's work instead of leaving it idle between steps. Step N+1 assumes every
    # request goes on; one that stops on step N's token (EOS, a stop string) has one wasted row in step N+1, which
    # is dropped. A batch whose sampling needs step N's tokens on the host (grammars, penalties, bad_words,
    # min_tokens still masking) queues step N+1's forward alone and samples it once step N is processed
    # (_finish_deferred): the forward still overlaps the host's work, and each grammar's next mask is filled on a
    # worker thread meanwhile.
    # A step that changes the batch (a waiting request admitted, a prompt chunk) is queued the same way
    # (_schedule_following): the scheduler plans it with the requests that sample in step N computing that
    # token, its input id gathered on the device. Where that step's sampling would need step N's tokens on the host
    # (grammars, penalties, bad_words, min_tokens still masking) it takes the synchronous path, as does any step
    # with logprobs (read back with the tokens).
    def _can_overlap(self, scheduled: SchedulerOutput) -> bool:
        return all(num_new == 1 and request.num_computed_tokens + 1 == request.num_tokens
                   and self._sampling_deferrable(request)
                   for request, num_new in zip(scheduled.requests, scheduled.num_scheduled_tokens))

    @staticmethod
    def _overlap_safe(request: Request) -> bool:
        """Can the request's next token be sampled while its last token is still on the device? The sampler then
        counts one output too few: min_tokens is safe only once that count is past it, not the true one."""
        params = request.sampling_params
        return (params.logprobs is None and request.grammar is None and params.prompt_logprobs is None
                and params.repetition_penalty == 1.0 and params.frequency_penalty == 0.0
                and params.presence_penalty == 0.0 and not params.bad_words_token_ids
                and request.num_output_tokens >= params.min_tokens)

    @staticmethod
    def _sampling_deferrable(request: Request) -> bool:
        """Can the request's next forward be queued before its last token reaches the host, its sampling queued
        once the host has processed that token? All but logprobs can: the sampler then sees the host's state
        (the grammar's matcher, the tokens penalties count and bad words end with, min_tokens) as the synchronous
        engine does."""
        params = request.sampling_params
        return params.logprobs is None and params.prompt_logprobs is None

    def _launches_steps(self) -> bool:
        """Can steps that change the batch be queued (launch_step)? Not with speculative decoding (drafts are
        proposed from the host's tokens), tensor parallelism (its workers take host input ids) or pooling."""
        return (self.async_scheduling and self.async_mixed_steps and self.spec_decoder is None
                and self.executor is None and self.pooling is None)

    def _launchable(self, request: Request, pending: bool) -> bool:
        """Can the request be in a step queued by launch_step? pending: its last token is on the device."""
        if request.grammar is not None or not self._sampling_deferrable(request):
            return False
        return not pending or self._overlap_safe(request)

    def _schedule_following(self, current: DecodeInFlight) -> DecodeInFlight | None:
        """The step after `current` where the batch changes, scheduled and queued before current's tokens are
        known; None where a request it could hold isn't _launchable (the next step is then synchronous)."""
        if not self._launches_steps():
            return None
        scheduler = self.scheduler
        pending = frozenset(id(request) for request in current.requests if not request.is_finished)
        if not all(self._launchable(request, id(request) in pending) for request in scheduler.running):
            return None
        seats = scheduler.max_num_seqs - scheduler.num_running  # at most this many are admitted
        if not all(self._launchable(request, False) for _, request in scheduler.waiting[:seats]):
            return None
        with host_range("serval.schedule"):
            scheduled = scheduler.schedule(pending)
        if not scheduled.requests:
            return None
        # Until it is processed the step holds its new requests too: a failure ends them with current's.
        self.stepping = current.requests + [request for request in scheduled.requests if id(request) not in pending]
        return self.runner.launch_step(scheduled, current)

    def _finish_in_flight(self) -> list[RequestOutput]:
        current, self.in_flight = self.in_flight, None
        self.stepping = current.requests
        following, self.queued_forward = self.queued_forward, None
        if following is None:
            with host_range("serval.launch_following"):
                following = self._launch_following(current)
        if isinstance(following, DecodeForward):
            return self._finish_deferred(current, following)
        with host_range("serval.token_ids"):
            token_ids = current.token_ids()  # waits for the device: `following` is queued behind it by now
        sampled = [SampledToken(token_id, None, None) for token_id in token_ids]
        with host_range("serval.process_step"):
            update = self.output_processor.process_step(current.requests, sampled, time.monotonic())
        outputs = self._finish(update)
        if following is not None:
            scheduled = following.scheduled or SchedulerOutput(following.requests, [1] * len(following.requests))
            live = [(request, num_new) for request, num_new in zip(scheduled.requests, scheduled.num_scheduled_tokens)
                    if not request.is_finished]
            if live:  # the rest stopped on current's tokens: their rows in `following` are never read
                self.scheduler.update(SchedulerOutput(*map(list, zip(*live))))
                self.in_flight = following
        self._propose_after_overlap()
        return outputs

    def _finish_deferred(self, current: DecodeInFlight, forward: DecodeForward) -> list[RequestOutput]:
        """Process current's tokens while `forward` (the next step) runs, then sample it and queue the forward
        after it. A worker thread feeds each grammar its token and then fills the next masks while the output
        processor works; the output processor reads a grammar's status (accepted, stopped) once its token is fed,
        after its other work on the step (process_step), and the sampler joins the fill."""
        with host_range("serval.token_ids"):
            token_ids = current.token_ids()
        fed = [(request.grammar, token_id) for request, token_id in zip(current.requests, token_ids)
               if request.grammar is not None and not request.is_finished]
        self._start_grammar_fill([request for request in forward.requests if not request.is_finished], fed)
        sampled = [SampledToken(token_id, None, None) for token_id in token_ids]
        with host_range("serval.process_step"):
            update = self.output_processor.process_step(current.requests, sampled, time.monotonic())
        outputs = self._finish(update)
        live = [request for request in forward.requests if not request.is_finished]
        if live:  # the rest stopped on current's tokens: their rows of `forward` are never sampled
            self.scheduler.update(SchedulerOutput(live, [1] * len(live)))
            # The step after `forward` is staged before its sampling, which waits for the masks: between that
            # sampling and the next forward only the replay is left, so the device does not wait for the host.
            following = self._following_requests(live)
            staged = None
            if following is not None:
                with host_range("serval.stage_forward"):
                    staged = self.runner.stage_forward(following, live)
            with host_range("serval.sample_decode"):
                self.in_flight = self.runner.sample_decode(forward, live)
            if following is not None:
                with host_range("serval.launch_forward"):
                    self.queued_forward = self.runner.launch_forward(following, previous=self.in_flight,
                                                                     staged=staged)
        self._propose_after_overlap()
        return outputs

    def _propose_after_overlap(self) -> None:
        """When the overlapped steps end (nothing queued behind the one just processed), propose for the next,
        synchronous step as a synchronous step would have."""
        if self.spec_decoder is not None and self.in_flight is None:
            self.spec_decoder.propose(self.scheduler.running)

    def _start_grammar_fill(self, requests: list[Request], fed: list[tuple[GrammarState, int]] = ()) -> None:
        """Start filling the next-token masks of the requests with a grammar on a worker thread; the sampler
        takes them (serval.engine.structured_output.next_token_bitmask). fed: (grammar, token) pairs whose token
        the worker feeds first."""
        constrained = [request for request in requests if request.grammar is not None]
        draft_token_ids = None
        if self.spec_decoder is not None:  # a verifying request's rows after each draft are filled too
            constrained, draft_token_ids = self.spec_decoder.grammar_fill_drafts(constrained)
        if constrained or fed:
            from serval.engine.structured_output import start_mask_fill  # llguidance loads only when asked for
            with host_range("serval.grammar_fill_start"):
                start_mask_fill([request.grammar for request in constrained],
                                pin_memory=self.device.type == "cuda", draft_token_ids=draft_token_ids,
                                fed=[grammar for grammar, _ in fed], fed_token_ids=[token_id for _, token_id in fed])

    def _launch_following(self, current: DecodeInFlight) -> DecodeInFlight | DecodeForward | None:
        """Queue the decode step after `current`, before its tokens are known: forward and sampling where the
        sampling needs nothing from the host, else the forward alone; None where that isn't safe."""
        following = self._following_requests(current.requests)
        if following is None:
            return self._schedule_following(current)
        if all(self._overlap_safe(request) for request in following):
            return self.runner.launch_decode(following, previous=current)
        return self.runner.launch_forward(following, previous=current)

    def _following_requests(self, current: list[Request]) -> list[Request] | None:
        """The requests of the decode step after the one of `current`, their next slot allocated; None where that
        step can't be queued before current's tokens are known."""
        scheduler = self.scheduler
        running = [request for request in current if not request.is_finished]
        if len(running) != scheduler.num_running or (scheduler.num_waiting
                                                      and scheduler.num_running < scheduler.max_num_seqs):
            return None  # the batch changes: requests to admit, or running ones that weren't in this step
        # A request that reaches its length limit with current's token is known to stop: leave it out.
        following = [request for request in running if request.num_output_tokens + 1 < request.max_tokens]
        if not following or not all(self._sampling_deferrable(request) for request in following):
            return None
        if self.spec_decoder is not None and not self.spec_decoder.drafts_nothing(following, scheduler.num_running):
            return None  # its drafts are proposed from current's tokens: the host must see them first
        for request in following:
            if not self.kv_cache.allocate(request, 1):
                return None  # out of blocks: the synchronous step will preempt
        if self.spec_decoder is not None:
            self.spec_decoder.count_queued_step(scheduler.num_running)
        return following


def _freeable_window(config: EngineConfig, model, num_blocks: int, drafter) -> int | None:
    """The sliding window behind which the KV cache frees blocks (serval.engine.kv_cache), or None to keep every
    block: a model with a full-attention layer; a draft model or an EAGLE-3 head, which reads the target's blocks
    with its own attention; a pool of exactly one max_model_len sequence, which can't spare the null block."""
    if drafter is not None or num_blocks <= -(-config.max_model_len // config.block_size):
        return None
    return model_sliding_window(model)


def _hybrid_layout(config: EngineConfig, model, num_blocks: int, drafter, executor) -> KVCacheLayout | None:
    """The KV cache groups of a model that mixes sliding-window and full layers (serval.engine.kv_groups), or None
    for today's one block table: disable_hybrid_kv_cache_manager; a draft model or EAGLE-3 head (it reads the
    target's blocks through one table); tensor parallelism (its workers build one table); a pool of exactly one
    max_model_len sequence, which can't spare the null block; a num_gpu_blocks_override too small for one such
    sequence in every group."""
    if (config.disable_hybrid_kv_cache_manager or drafter is not None or executor is not None
            or num_blocks <= -(-config.max_model_len // config.block_size)):
        return None
    layout = hybrid_kv_layout(model)
    if layout is None:
        return None
    need = max_blocks_per_sequence(layout, config.max_model_len, config.block_size, config.max_num_batched_tokens)
    return layout if _hybrid_num_blocks(config, num_blocks, layout) > need else None


def _hybrid_num_blocks(config: EngineConfig, num_blocks: int, layout: KVCacheLayout) -> int:
    """A hybrid pool's blocks (each one group's layers): num_gpu_blocks_override as given (vLLM's meaning: the
    pool's block count), else the same memory as num_blocks blocks of every layer."""
    if config.num_gpu_blocks_override is not None:
        return config.num_gpu_blocks_override
    return num_blocks * layout.num_groups


def share_blocks_with_draft(num_blocks: int, config: EngineConfig, model, draft_model,
                            kv_cache_dtype: torch.dtype) -> int:
    """A draft model's cache uses the target's block ids, so a block costs both caches' bytes: the pool sized for
    the target alone shrinks to keep the same memory (unless the user fixed the block count)."""
    if config.num_gpu_blocks_override is not None:
        return num_blocks
    target = ModelRunner.kv_cache_bytes_per_block(model, config.block_size, kv_cache_dtype)
    draft = ModelRunner.kv_cache_bytes_per_block(draft_model, config.block_size, kv_cache_dtype)
    return max(num_blocks * target // (target + draft), -(-config.max_model_len // config.block_size))


def _lora_manager(config: EngineConfig, model, device: torch.device, dtype: torch.dtype):
    if not config.enable_lora:
        return None
    from serval.lora.manager import LoRAManager
    return LoRAManager(model, config.max_loras, config.max_lora_rank, config.lora_host_capacity(), device, dtype)


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
        raise InvalidArgument("max_model_len", f"invalid engine argument max_model_len={max_model_len}: the model "
                                               f"allows at most {model_limit} (max_position_embeddings)")
    max_num_batched_tokens = config.max_num_batched_tokens
    if max_num_batched_tokens is None:
        max_num_batched_tokens = max(2048, config.max_num_seqs) if config.enable_chunked_prefill else max_model_len
    if not config.enable_chunked_prefill and max_num_batched_tokens < max_model_len:
        raise InvalidArgument("max_num_batched_tokens",
                              f"invalid engine argument max_num_batched_tokens={max_num_batched_tokens}: without "
                              f"chunked prefill it must be >= max_model_len ({max_model_len}) so every prompt fits a "
                              "step")
    return dataclasses.replace(config, model=model_path, max_model_len=max_model_len,
                               max_num_batched_tokens=max_num_batched_tokens)
