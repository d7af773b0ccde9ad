"""ModelRunner: turns a SchedulerOutput into flat tensors, runs the model, samples.

The batch is flat (no padding): request i's new tokens are rows query_start_loc[i]:query_start_loc[i+1].
Logits are computed only for rows that are sampled from or that prompt logprobs need. On CUDA, a step where every
request decodes one token replays a captured CUDA graph instead (serval.engine.cuda_graphs), and so does a step
that mixes prefill chunks with decodes, padded to a token bucket (serval.engine.mixed_graphs). With LoRA, each row's
adapter is set on the model's LoRA layers (serval.lora.manager): in an eager step as a LoRABatch (a step without an
adapter runs the base model as if LoRA were off), in a graph step as each row's slot in the graph's inputs (the
graphs are captured with the LoRA kernels in them).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from serval.config import MIXED_GRAPH_MAX_TOKENS
from serval.engine import sampler
from serval.engine.cuda_graphs import DecodeGraphs, gather_input_ids
from serval.engine.kv_groups import KVCacheLayout, assign_kv_cache_groups, group_slots, shared_kv_caches, \
    with_group_metadata
from serval.engine.mixed_graphs import MixedGraphs, mixed_capture_sizes
from serval.engine.profiler import host_range
from serval.engine.request import Request
from serval.engine.scheduler import SchedulerOutput
from serval.engine.spec_decode import rejection_sampler
from serval.engine.spec_decode.draft_model import DraftModel
from serval.engine.spec_decode.eagle3 import Eagle3Drafter
from serval.engine.spec_decode.rejection_sampler import VerifiedTokens
from serval.engine.spec_decode.verify_graphs import VerifyGraphs, max_verify_batch
from serval.kernels import paged_attention as torch_attention
from serval.layers.attention import AttentionMetadata, attention_backend
from serval.outputs import Logprob

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from serval.engine.spec_decode.config import SpeculativeConfig
    from serval.lora.manager import LoRAManager


@dataclass
class ModelRunnerOutput:
    sampled_token_ids: list[int | None]  # per scheduled request; None where its step ended mid-prompt
    logprobs: list[dict[int, Logprob] | None]
    prompt_logprobs: list[list[dict[int, Logprob]] | None]  # new prompt positions this step, in order
    # Per scheduled request: what a speculative verify step kept (sampled_token_ids and logprobs then hold its
    # first token); None for requests without drafts, and all None when nobody speculated.
    verified: list[VerifiedTokens | None] | None = None


@dataclass
class DecodeInFlight:
    """A decode step queued on the device whose sampled tokens the host has not read yet (asynchronous
    scheduling): the next step can take its input ids from `token_ids_device` while this one still runs."""
    requests: list[Request]
    token_ids_device: torch.Tensor  # [n] int64
    token_ids_host: torch.Tensor  # [n] int64, pinned on CUDA: filled by a copy queued after the sampler
    copied: torch.cuda.Event | None  # recorded after that copy; None on CPU, where it is already done
    # launch_step's: the whole step (prefill chunks too), whose computed tokens the engine advances once the step
    # before it is processed; None for a decode step, whose requests are the step.
    scheduled: SchedulerOutput | None = None

    def token_ids(self) -> list[int]:
        """Wait for the step and return its sampled tokens, in request order."""
        if self.copied is not None:
            self.copied.synchronize()
        return self.token_ids_host.tolist()


@dataclass
class DecodeForward:
    """A decode step's forward queued on the device whose logits are not sampled yet (launch_forward)."""
    requests: list[Request]
    logits: torch.Tensor  # [len(requests), vocab] on the device


@dataclass
class StagedForward:
    """A decode forward's inputs, built (and with graphs copied into the graph's buffers) before its launch
    (ModelRunner.stage_forward)."""
    requests: list[Request]
    from_previous: bool  # input ids are rows of the previous step's samples
    graph: object = None  # DecodeGraphs.stage's result, or None: the forward runs eagerly from `eager`
    eager: tuple | None = None  # (input_ids, positions, slot_mapping, seq_lens, group_slot_mappings)


@dataclass
class PromptLogprobRows:
    """The prompt positions of one request whose logprobs this step computes."""
    batch_index: int  # the request's index in the scheduled batch
    rows: list[int]  # flat rows of the batch, one per position
    target_token_ids: list[int]  # the prompt token each position predicts


@dataclass
class ForwardInputs:
    """One eager forward with no Request objects in it: what a tensor-parallel driver broadcasts to its workers
    each step (serval.distributed), and what every rank runs."""
    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    query_start_loc: list[int]
    seq_lens: list[int]
    block_tables: list[list[int]]  # per request, unpadded
    logits_rows: list[int]  # the flat rows whose logits are computed, in order
    # A hybrid KV cache (serval.engine.kv_groups): per group, the slots and the block tables (the fields above then
    # hold group 0's).
    group_slot_mappings: list[list[int]] | None = None
    group_block_tables: list[list[list[int]]] | None = None


@dataclass
class VerifyRows:
    """A request whose step verifies speculative drafts: its last known token and each draft is a row."""
    batch_index: int
    rows: list[int]  # flat rows of the batch: len(draft_token_ids) + 1
    draft_token_ids: list[int]


@dataclass
class _BatchPlan:
    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    query_start_loc: list[int]
    seq_lens: list[int]
    sample_rows: list[int]  # flat row per sampled request
    sampled_requests: list[Request]
    prompt_rows: list[PromptLogprobRows]
    verify_rows: list[VerifyRows]
    group_slot_mappings: list[list[int]] | None = None  # a hybrid KV cache: per group (slot_mapping is group 0's)
    gather_rows: list[int] = field(default_factory=list)  # flat rows whose input id is a previous sample's row


def kv_cache_shape(model: torch.nn.Module, num_blocks: int, block_size: int) -> tuple[int, ...]:
    """One layer's KV cache shape: the model's own (`model.kv_cache_shape`, e.g. DeepSeek-V3's latent cache) or
    full K and V, [2, blocks, block_size, kv_heads, head_dim]."""
    if hasattr(model, "kv_cache_shape"):
        return tuple(model.kv_cache_shape(num_blocks, block_size))
    return (2, num_blocks, block_size, model.num_kv_heads, model.head_dim)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int,
                 kv_cache_dtype: torch.dtype, device: torch.device, max_num_seqs: int = 1, max_model_len: int = 1,
                 enforce_eager: bool = True, drafter: DraftModel | Eagle3Drafter | None = None,
                 lora: "LoRAManager | None" = None,
                 speculative_config: "SpeculativeConfig | None" = None, max_num_batched_tokens: int = 0,
                 cudagraph_mixed: bool = False, cudagraph_mixed_max_tokens: int = MIXED_GRAPH_MAX_TOKENS,
                 kv_layout: KVCacheLayout | None = None, cudagraph_mixed_sizes: tuple[int, ...] | None = None) -> None:
        """kv_cache_dtype: the cache's element type, the model's dtype or float8_e4m3fn (EngineConfig's
        torch_kv_cache_dtype); the attention layers convert on write and on read. cudagraph_mixed: with decode
        graphs, capture mixed prefill/decode steps too, per token bucket up to max_num_batched_tokens and
        cudagraph_mixed_max_tokens, or the buckets cudagraph_mixed_sizes when given. kv_layout: a hybrid KV cache's
        groups (serval.engine.kv_groups): layers share tensors of num_blocks blocks, and each group's block tables
        come from request.kv_group_block_ids."""
        self.model = model
        self.drafter = drafter  # speculative decoding with a draft model: it runs beside the target every step
        # An EAGLE-3 head runs after the target (it reads the target's hidden states and the tokens it kept).
        self.drafter_follows_target = isinstance(drafter, Eagle3Drafter)
        self.lora = lora
        self.block_size = block_size
        self.device = device
        shape = kv_cache_shape(model, num_blocks, block_size)
        self.kv_layout = kv_layout
        if kv_layout is None:
            self.kv_caches = [torch.zeros(shape, dtype=kv_cache_dtype, device=device) for _ in range(model.num_layers)]
        else:
            self.kv_caches = shared_kv_caches(kv_layout, shape, kv_cache_dtype, device)
            assign_kv_cache_groups(model, kv_layout)
        self.graphs: DecodeGraphs | None = None
        # Graphs need the Triton kernels, whose lengths come from device buffers; the torch reference reads host lists
        # (as does a model whose attention has no such kernel yet: supports_cuda_graphs = False).
        if device.type == "cuda" and not enforce_eager and attention_backend(device) is not torch_attention \
                and getattr(model, "supports_cuda_graphs", True):
            if self.drafter_follows_target:  # graph replays leave the hidden states the head reads in one buffer
                drafter.reserve_graph_rows(max(max_num_seqs, max_verify_batch(max_num_seqs, speculative_config)
                                               * (speculative_config.num_speculative_tokens + 1)))
            self.graphs = DecodeGraphs(model, self.kv_caches, block_size, max_num_seqs, max_model_len, device,
                                       **self._graph_lora_args(), num_kv_groups=self._num_kv_groups())
            self.graphs.capture()
        self.mixed_graphs: MixedGraphs | None = None
        # Not with an EAGLE-3 head: it reads the hidden states of a step's rows, which mixed steps keep eagerly.
        # Not yet with a hybrid KV cache: its graphs would need a block table per group (decode graphs have them).
        if (self.graphs is not None and cudagraph_mixed and not self.drafter_follows_target and kv_layout is None
                and mixed_capture_sizes(max_num_batched_tokens, cudagraph_mixed_max_tokens, cudagraph_mixed_sizes)):
            self.mixed_graphs = MixedGraphs(model, self.kv_caches, block_size, max_num_seqs, max_model_len,
                                            max_num_batched_tokens, device, max_tokens=cudagraph_mixed_max_tokens,
                                            sizes=cudagraph_mixed_sizes, **self._graph_lora_args())
            try:
                self.mixed_graphs.capture()
            except torch.cuda.OutOfMemoryError as error:  # a tight --gpu-memory-utilization: mixed steps run eagerly
                logger.warning("mixed-step cuda graphs not captured: out of memory", extra={"error": str(error)[:200]})
                self.mixed_graphs = None
                torch.cuda.empty_cache()
        # Speculation's steps get graphs too: the target's verify step (k + 1 rows a request) and the draft's decode
        # steps, up to the largest batch that speculates.
        self.verify_graphs: VerifyGraphs | None = None
        if self.graphs is not None and speculative_config is not None and kv_layout is None:
            max_batch = max_verify_batch(max_num_seqs, speculative_config)
            self.verify_graphs = VerifyGraphs(model, self.kv_caches, block_size, max_batch, max_model_len,
                                              speculative_config.num_speculative_tokens + 1, device)
            self.verify_graphs.capture()
            if drafter is not None:
                drafter.capture_graphs(max_batch, max_model_len)

    @staticmethod
    def kv_cache_bytes_per_block(model: torch.nn.Module, block_size: int, kv_cache_dtype: torch.dtype) -> int:
        per_layer = kv_cache_shape(model, 1, block_size)
        return model.num_layers * math.prod(per_layer) * kv_cache_dtype.itemsize

    @staticmethod
    @torch.inference_mode()
    def profile_activation_bytes(model: torch.nn.Module, num_tokens: int, num_seqs: int, block_size: int,
                                 kv_cache_dtype: torch.dtype, device: torch.device) -> int:
        """Peak memory of the largest step the scheduler can make (num_tokens tokens, logits for num_seqs rows)
        beyond what is allocated before it, on CUDA: one prompt of num_tokens over a scratch KV cache just big
        enough, which is not counted (in the real cache's dtype, so the kernels profiled are the ones that run)."""
        num_blocks = -(-num_tokens // block_size)
        shape = kv_cache_shape(model, num_blocks, block_size)
        kv_caches = [torch.zeros(shape, dtype=kv_cache_dtype, device=device) for _ in range(model.num_layers)]
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        metadata = AttentionMetadata(
            slot_mapping=torch.arange(num_tokens, device=device), query_start_loc=[0, num_tokens],
            seq_lens=[num_tokens], block_tables=torch.arange(num_blocks, dtype=torch.int32, device=device)[None],
            block_size=block_size)
        positions = torch.arange(num_tokens, device=device) % model.config.max_position_embeddings
        hidden = model(torch.zeros(num_tokens, dtype=torch.int64, device=device), positions, kv_caches, metadata)
        logits = model.compute_logits(hidden[-num_seqs:])
        # The sampler's working copies of the logits (probabilities, noise, sort) are a few times their size.
        logits.softmax(dim=-1).sort(dim=-1)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del kv_caches, hidden, logits
        torch.cuda.empty_cache()
        return peak

    @torch.inference_mode()
    def execute(self, scheduled: SchedulerOutput) -> ModelRunnerOutput:
        if self.drafter is not None:
            self.drafter.propose([request for request, num_new
                                  in zip(scheduled.requests, scheduled.num_scheduled_tokens)
                                  if request.num_computed_tokens + num_new > request.num_tokens])
        with host_range("serval.prepare_inputs"):
            plan = self._plan(scheduled)
        if self.drafter is not None and not self.drafter_follows_target:
            self.drafter.forward(plan.input_ids, plan.positions, plan.query_start_loc, plan.seq_lens,
                                 scheduled.requests)
        if self._takes_decode_graph(scheduled.requests, plan):
            logits = self._decode_graph_logits(scheduled.requests, plan)
            out = self._outputs(scheduled, plan, logits, logits[:0])
            if self.drafter_follows_target:
                self.drafter.follow_target(scheduled.requests, plan.positions, plan.query_start_loc,
                                           out.sampled_token_ids, out.verified, graph_rows_per_request=1)
            return out
        prompt_flat_rows = [row for prompt_rows in plan.prompt_rows for row in prompt_rows.rows]
        verify_flat_rows = [row for verify_rows in plan.verify_rows for row in verify_rows.rows]
        inputs = self._forward_inputs(scheduled.requests, plan,
                                      plan.sample_rows + prompt_flat_rows + verify_flat_rows)
        # A speculative verify step (at most k + 1 rows a request) replays a graph too.
        graph_rows_per_request = None
        if (self.verify_graphs is not None and plan.verify_rows and not self._has_lora(scheduled.requests)
                and self.verify_graphs.can_run(plan.query_start_loc)):
            logits = self.verify_graphs.run(inputs)
            graph_rows_per_request = self.verify_graphs.num_query_tokens
        else:
            logits = self._mixed_or_eager_logits(scheduled.requests, plan, inputs)
        num_sampled, num_prompt = len(plan.sample_rows), len(prompt_flat_rows)
        out = self._outputs(scheduled, plan, logits[:num_sampled], logits[num_sampled:num_sampled + num_prompt])
        if plan.verify_rows:
            self._verify(scheduled, plan, logits[num_sampled + num_prompt:], out)
        if self.drafter_follows_target:
            self.drafter.follow_target(scheduled.requests, plan.positions, plan.query_start_loc,
                                       out.sampled_token_ids, out.verified, graph_rows_per_request)
        return out

    @staticmethod
    def _verify(scheduled: SchedulerOutput, plan: _BatchPlan, verify_logits: torch.Tensor,
                out: ModelRunnerOutput) -> None:
        """Speculative verification: the rows of each request with drafts → the tokens it keeps."""
        requests = [scheduled.requests[verify_rows.batch_index] for verify_rows in plan.verify_rows]
        verified = rejection_sampler.verify(verify_logits, requests,
                                            [verify_rows.draft_token_ids for verify_rows in plan.verify_rows])
        out.verified = [None] * len(scheduled.requests)
        for verify_rows, result in zip(plan.verify_rows, verified):
            out.verified[verify_rows.batch_index] = result
            out.sampled_token_ids[verify_rows.batch_index] = result.token_ids[0]
            out.logprobs[verify_rows.batch_index] = result.logprobs[0] if result.logprobs is not None else None

    @torch.inference_mode()
    def execute_hidden(self, scheduled: SchedulerOutput) -> torch.Tensor:
        """The final hidden states [T, hidden] of every scheduled token, flat in batch order, nothing sampled (the
        pooling runner, serval.engine.pooling)."""
        plan = self._plan(scheduled)
        return self._forward_eager(self._tensor(plan.input_ids, torch.int64), plan.positions, plan.slot_mapping,
                                   plan.query_start_loc, plan.seq_lens, scheduled.requests, plan.group_slot_mappings)

    @torch.inference_mode()
    def launch_decode(self, requests: list[Request], previous: DecodeInFlight | None = None) -> DecodeInFlight:
        """Queue a decode step (one new token per request at position num_computed_tokens) and its sampling,
        without waiting for the device. Input ids come from the requests' tokens or, when `previous` is given,
        from the tokens `previous` sampled on the device, which the host need not have seen: that is what lets
        step N+1 be queued while step N runs. Requests must not need logprobs (they are read back eagerly)."""
        return self.sample_decode(self.launch_forward(requests, previous), requests)

    @torch.inference_mode()
    def stage_forward(self, requests: list[Request], previous_requests: list[Request] | None = None
                      ) -> StagedForward:
        """launch_forward's host work, done ahead of it: the step's inputs, and with graphs their copy into the
        graph's buffers (DecodeGraphs.stage). previous_requests: the requests, in order, of the step whose samples
        will be launch_forward's `previous` (its input ids are rows of them); None: the requests' own last tokens.
        A constrained batch stages step N + 2 while step N + 1's masks are still being filled, so that only the
        replay is left between step N + 1's sampling and step N + 2's forward (serval.engine.engine)."""
        positions = [request.num_computed_tokens for request in requests]
        group_slot_mappings = None
        if self.kv_layout is None:
            slot_mapping = [slot for request, p in zip(requests, positions) for slot in self._slots(request, p, p + 1)]
        else:
            group_slot_mappings = [[table[p // self.block_size] * self.block_size + p % self.block_size
                                    for table, p in zip(tables, positions)]
                                   for tables in zip(*(request.kv_group_block_ids for request in requests))]
            slot_mapping = group_slot_mappings[0]
        seq_lens = [p + 1 for p in positions]
        if previous_requests is None:
            input_ids = [request.all_token_ids[p] for request, p in zip(requests, positions)]
        else:
            row = {id(request): i for i, request in enumerate(previous_requests)}
            input_ids = [row[id(request)] for request in requests]  # rows of the previous step's samples
        staged = StagedForward(requests, previous_requests is not None)
        if self.graphs is not None and self._graphs_serve_lora(requests) and self.graphs.can_run(len(requests)):
            staged.graph = self.graphs.stage(input_ids, positions, slot_mapping, seq_lens,
                                             [request.block_ids for request in requests],
                                             lora_slots=self._lora_slots(requests),
                                             **self._graph_groups(requests, group_slot_mappings))
        else:
            staged.eager = (input_ids, positions, slot_mapping, seq_lens, group_slot_mappings)
        return staged

    @torch.inference_mode()
    def launch_forward(self, requests: list[Request], previous: DecodeInFlight | None = None,
                       staged: StagedForward | None = None) -> DecodeForward:
        """launch_decode's forward without its sampling, which sample_decode queues later: a request whose next
        token depends on host state (its grammar's matcher, its penalties) is sampled only once the host has
        processed `previous`'s tokens, while this forward already runs. staged: stage_forward's for these requests
        with `previous`'s requests (None: staged now)."""
        if staged is None:
            staged = self.stage_forward(requests, previous.requests if previous is not None else None)
        assert staged.requests is requests and staged.from_previous == (previous is not None)
        source = previous.token_ids_device if previous is not None else None
        if staged.graph is not None:
            # The graph's output buffer: read by sample_decode before the next replay, which the stream orders.
            logits = self.graphs.replay(staged.graph, source)
        else:
            input_ids, positions, slot_mapping, seq_lens, group_slot_mappings = staged.eager
            ids = self._tensor(input_ids, torch.int64)
            if source is not None:
                ids = source.index_select(0, ids)
            hidden = self._forward_eager(ids, positions, slot_mapping, list(range(len(requests) + 1)), seq_lens,
                                         requests, group_slot_mappings)
            logits = self.model.compute_logits(hidden)
        return DecodeForward(requests, logits)

    @torch.inference_mode()
    def sample_decode(self, forward: DecodeForward, requests: list[Request]) -> DecodeInFlight:
        """Queue the sampling of `requests` (forward's, in its order, less any that stopped since) from forward's
        logits, without waiting for the device."""
        logits = forward.logits
        if len(requests) != len(forward.requests):
            row = {id(request): i for i, request in enumerate(forward.requests)}
            logits = logits.index_select(0, self._tensor([row[id(request)] for request in requests], torch.int64))
        return self._queue_sampling(logits, requests)

    def _queue_sampling(self, logits: torch.Tensor, requests: list[Request],
                        scheduled: SchedulerOutput | None = None) -> DecodeInFlight:
        token_ids = sampler.sample_token_tensor(logits, requests)
        if self.device.type != "cuda":
            return DecodeInFlight(requests, token_ids, token_ids, None, scheduled)
        host = torch.empty(len(requests), dtype=torch.int64, pin_memory=True)
        host.copy_(token_ids, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return DecodeInFlight(requests, token_ids, host, copied, scheduled)

    @torch.inference_mode()
    def launch_step(self, scheduled: SchedulerOutput, previous: DecodeInFlight | None = None) -> DecodeInFlight:
        """Queue a step of any shape (prefill chunks beside decodes) and its sampling without waiting for the
        device: asynchronous scheduling of a step that changes the batch. `previous`: the step queued before this
        one, whose sampled requests here compute the token it sampled (Scheduler.schedule's `pending`), their input
        ids gathered from its samples on the device. No request may need logprobs, prompt logprobs, speculative
        drafts or a grammar (the engine checks): the sampling reads nothing back. The DecodeInFlight's requests are
        those that sample, in batch order."""
        pending = ({id(request): row for row, request in enumerate(previous.requests)}
                   if previous is not None else None)
        with host_range("serval.prepare_inputs"):
            plan = self._plan(scheduled, pending)
        source = previous.token_ids_device if previous is not None and plan.gather_rows else None
        requests = scheduled.requests
        if self._takes_decode_graph(requests, plan):
            logits = self._decode_graph_logits(requests, plan, source)
        else:
            logits = self._mixed_or_eager_logits(requests, plan, self._forward_inputs(requests, plan,
                                                                                     plan.sample_rows), source)
        return self._queue_sampling(logits, plan.sampled_requests, scheduled)

    def _takes_decode_graph(self, requests: list[Request], plan: _BatchPlan) -> bool:
        """Every request computes one token and samples it, in a batch the decode graphs hold."""
        num_requests = len(requests)
        return (self.graphs is not None and self._graphs_serve_lora(requests) and not plan.prompt_rows
                and len(plan.sample_rows) == num_requests and len(plan.input_ids) == num_requests
                and self.graphs.can_run(num_requests))

    def _decode_graph_logits(self, requests: list[Request], plan: _BatchPlan,
                             source: torch.Tensor | None = None) -> torch.Tensor:
        """The decode graph's logits; with `source`, plan.gather_rows' input ids are gathered from it first."""
        args = (plan.input_ids, plan.positions, plan.slot_mapping, plan.seq_lens,
                [request.block_ids for request in requests])
        kwargs = dict(lora_slots=self._lora_slots(requests), **self._graph_groups(requests, plan.group_slot_mappings))
        if source is None:  # run: what a tensor-parallel driver's graphs override
            return self.graphs.run(*args, **kwargs)
        return self.graphs.replay(self.graphs.stage(*args, **kwargs), source, plan.gather_rows)

    def _forward_inputs(self, requests: list[Request], plan: _BatchPlan, logits_rows: list[int]) -> ForwardInputs:
        inputs = ForwardInputs(plan.input_ids, plan.positions, plan.slot_mapping, plan.query_start_loc,
                               plan.seq_lens, [request.block_ids for request in requests], logits_rows)
        if self.kv_layout is not None:
            inputs.group_slot_mappings = plan.group_slot_mappings
            inputs.group_block_tables = self._group_block_tables(requests)
            inputs.block_tables = inputs.group_block_tables[0]
        return inputs

    def _mixed_or_eager_logits(self, requests: list[Request], plan: _BatchPlan, inputs: ForwardInputs,
                               source: torch.Tensor | None = None) -> torch.Tensor:
        """A step's logits from the mixed-step graphs where they take it (no prompt logprobs, no verify rows), else
        from the eager forward; with `source`, plan.gather_rows' input ids are gathered from it first."""
        if (self.mixed_graphs is not None and not plan.prompt_rows and not plan.verify_rows
                and (self.mixed_graphs.lora is not None or not self._has_lora(requests))
                and self.mixed_graphs.can_run(inputs)):
            lora_slots = self._lora_row_slots(requests, plan.query_start_loc)
            if source is not None:
                return self.mixed_graphs.run(inputs, lora_slots, source, plan.gather_rows)
            # Without LoRA the base graphs' call: what a tensor-parallel driver's graphs override.
            return self.mixed_graphs.run(inputs) if lora_slots is None else self.mixed_graphs.run(inputs, lora_slots)
        self._prepare_lora(requests, plan.query_start_loc)
        try:
            if source is not None:
                return self.forward_logits(inputs, source, plan.gather_rows)
            return self.forward_logits(inputs)  # the tensor-parallel runner's override takes inputs alone
        finally:
            self._clear_lora()

    @torch.inference_mode()
    def forward_logits(self, inputs: ForwardInputs, source: torch.Tensor | None = None,
                       source_rows: list[int] = ()) -> torch.Tensor:
        """float32 logits [len(inputs.logits_rows), vocab] of one eager forward. source_rows: rows whose input id
        is a row of `source`, the previous step's samples on the device (cuda_graphs.gather_input_ids)."""
        metadata = AttentionMetadata(slot_mapping=self._tensor(inputs.slot_mapping, torch.int64),
                                     query_start_loc=inputs.query_start_loc, seq_lens=inputs.seq_lens,
                                     block_tables=self._padded_block_tables(inputs.block_tables),
                                     block_size=self.block_size)
        if inputs.group_slot_mappings is not None:
            with_group_metadata(metadata, [self._tensor(slots, torch.int64) for slots in inputs.group_slot_mappings],
                                [self._padded_block_tables(tables) for tables in inputs.group_block_tables])
        input_ids = self._tensor(inputs.input_ids, torch.int64)
        if source is not None:
            gather_input_ids(input_ids, source, list(source_rows))
        hidden = self.model(input_ids, self._tensor(inputs.positions, torch.int64), self.kv_caches, metadata)
        rows, num_rows = inputs.logits_rows, len(inputs.input_ids)
        if len(rows) == num_rows and rows == list(range(num_rows)):  # every row in order (verify only): no gather
            return self.model.compute_logits(hidden)
        return self.model.compute_logits(hidden[self._tensor(rows, torch.int64)])

    def _forward_eager(self, input_ids: torch.Tensor, positions: list[int], slot_mapping: list[int],
                       query_start_loc: list[int], seq_lens: list[int], requests: list[Request],
                       group_slot_mappings: list[list[int]] | None = None) -> torch.Tensor:
        """Hidden states of a flat batch, run op by op (no graph)."""
        if self.kv_layout is not None:
            group_tables = [self._padded_block_tables(tables) for tables in self._group_block_tables(requests)]
            metadata = AttentionMetadata(slot_mapping=self._tensor(slot_mapping, torch.int64),
                                         query_start_loc=query_start_loc, seq_lens=seq_lens,
                                         block_tables=group_tables[0], block_size=self.block_size)
            with_group_metadata(metadata, [self._tensor(slots, torch.int64) for slots in group_slot_mappings],
                                group_tables)
        else:
            metadata = AttentionMetadata(slot_mapping=self._tensor(slot_mapping, torch.int64),
                                         query_start_loc=query_start_loc, seq_lens=seq_lens,
                                         block_tables=self._block_tables(requests), block_size=self.block_size)
        self._prepare_lora(requests, query_start_loc)
        try:
            return self.model(input_ids, self._tensor(positions, torch.int64), self.kv_caches, metadata)
        finally:
            self._clear_lora()

    def _prepare_lora(self, requests: list[Request], query_start_loc: list[int]) -> None:
        """Set the step's LoRA batch (each row's adapter) on the model; nothing without LoRA."""
        if self.lora is not None:
            rows_per_request = [end - start for start, end in zip(query_start_loc, query_start_loc[1:])]
            self.lora.prepare([request.lora_adapter for request in requests], rows_per_request)

    def _clear_lora(self) -> None:
        if self.lora is not None:
            self.lora.clear()

    def _has_lora(self, requests: list[Request]) -> bool:
        return self.lora is not None and any(request.lora_adapter is not None for request in requests)

    def _graph_lora_args(self) -> dict:
        """DecodeGraphs' LoRA arguments: the graphs take adapters when LoRA is on (none without it: the base graphs)."""
        return {} if self.lora is None else {"lora": self.lora.context, "max_loras": self.lora.max_loras}

    def _graphs_serve_lora(self, requests: list[Request]) -> bool:
        """Whether the decode graphs can run these requests' adapters (graphs captured without LoRA run none)."""
        return self.graphs.lora is not None or not self._has_lora(requests)

    def _lora_slots(self, requests: list[Request]) -> list[int] | None:
        """Each request's resident adapter slot for a graph step (-1: none); None without LoRA."""
        if self.lora is None:
            return None
        return self.lora.slots_for([request.lora_adapter for request in requests])

    def _num_kv_groups(self) -> int:
        return 0 if self.kv_layout is None else self.kv_layout.num_groups

    def _group_block_tables(self, requests: list[Request]) -> list[list[list[int]]]:
        """A hybrid KV cache's block tables: per group, per request."""
        return [list(tables) for tables in zip(*(request.kv_group_block_ids for request in requests))]

    def _graph_groups(self, requests: list[Request], group_slot_mappings: list[list[int]] | None) -> dict:
        """DecodeGraphs.run's per-group inputs (slots, block tables) as its `groups` argument; none without a hybrid
        KV cache."""
        if self.kv_layout is None:
            return {}
        return {"groups": list(zip(group_slot_mappings, self._group_block_tables(requests)))}

    def _lora_row_slots(self, requests: list[Request], query_start_loc: list[int]) -> list[int] | None:
        """Each flat row's resident adapter slot for a mixed-step graph (-1: none); None without LoRA."""
        slots = self._lora_slots(requests)
        if slots is None:
            return None
        return [slot for slot, start, end in zip(slots, query_start_loc, query_start_loc[1:])
                for _ in range(end - start)]

    def _slots(self, request: Request, start: int, end: int) -> list[int]:
        """The KV-cache slots of a request's positions [start, end), through its block table."""
        blocks, block_size = request.block_ids, self.block_size
        return [blocks[p // block_size] * block_size + p % block_size for p in range(start, end)]

    def _plan(self, scheduled: SchedulerOutput, pending: dict[int, int] | None = None) -> _BatchPlan:
        """pending: id(request) -> its row in the previous step's samples, for the requests whose last token is
        still on the device (launch_step): the input id of that token's row is the sample's row, which
        cuda_graphs.gather_input_ids turns into the token on the device."""
        plan = _BatchPlan([], [], [], [0], [], [], [], [], [])
        if self.kv_layout is not None:
            plan.group_slot_mappings = [[] for _ in range(self.kv_layout.num_groups)]
        for batch_index, (request, num_new) in enumerate(zip(scheduled.requests, scheduled.num_scheduled_tokens)):
            start, end = request.num_computed_tokens, request.num_computed_tokens + num_new
            row0 = plan.query_start_loc[-1]
            num_tokens = request.num_tokens
            plan.input_ids.extend(request.all_token_ids[start:end])
            if pending and id(request) in pending:
                plan.gather_rows.append(len(plan.input_ids))
                plan.input_ids.append(pending[id(request)])
                num_tokens += 1
            num_drafts = end - num_tokens
            if num_drafts > 0:  # the drafts follow the known tokens (no copy of the whole sequence to slice)
                plan.input_ids.extend(request.spec_token_ids[:num_drafts])
            plan.positions.extend(range(start, end))
            if plan.group_slot_mappings is None:
                plan.slot_mapping.extend(self._slots(request, start, end))
            else:
                for slots, table in zip(plan.group_slot_mappings, request.kv_group_block_ids):
                    slots.extend(group_slots(table, self.block_size, start, end))
            plan.query_start_loc.append(row0 + num_new)
            plan.seq_lens.append(end)
            if request.sampling_params.prompt_logprobs is not None:
                # Position p predicts token p + 1; positions already done (before a preemption) are skipped.
                first = max(start, request.num_prompt_logprobs_computed)
                last = min(end, request.num_prompt_tokens - 1)
                if first < last:
                    rows = [row0 + p - start for p in range(first, last)]
                    plan.prompt_rows.append(PromptLogprobRows(batch_index, rows,
                                                              request.all_token_ids[first + 1:last + 1]))
            if num_drafts > 0:
                rows = list(range(row0 + num_new - num_drafts - 1, row0 + num_new))
                plan.verify_rows.append(VerifyRows(batch_index, rows,
                                                   request.spec_token_ids[:num_drafts]))
            elif end == num_tokens:
                plan.sample_rows.append(row0 + num_new - 1)
                plan.sampled_requests.append(request)
        if plan.group_slot_mappings is not None:
            plan.slot_mapping = plan.group_slot_mappings[0]
        return plan

    def _outputs(self, scheduled: SchedulerOutput, plan: _BatchPlan, sample_logits: torch.Tensor,
                 prompt_logits: torch.Tensor) -> ModelRunnerOutput:
        num_requests = len(scheduled.requests)
        out = ModelRunnerOutput([None] * num_requests, [None] * num_requests, [None] * num_requests)
        if plan.sampled_requests:
            with host_range("serval.sample"):  # waits for the device: the tokens are read back
                sampled = sampler.sample(sample_logits, plan.sampled_requests)
            position = {id(request): i for i, request in enumerate(scheduled.requests)}
            for request, token_id, logprobs in zip(plan.sampled_requests, sampled.sampled_token_ids, sampled.logprobs):
                out.sampled_token_ids[position[id(request)]] = token_id
                out.logprobs[position[id(request)]] = logprobs
        offset = 0
        for prompt_rows in plan.prompt_rows:
            request = scheduled.requests[prompt_rows.batch_index]
            chunk = prompt_logits[offset:offset + len(prompt_rows.rows)]
            out.prompt_logprobs[prompt_rows.batch_index] = sampler.compute_prompt_logprobs(
                chunk, self._tensor(prompt_rows.target_token_ids, torch.int64), request.sampling_params.prompt_logprobs)
            offset += len(prompt_rows.rows)
        return out

    def _block_tables(self, requests: list[Request]) -> torch.Tensor:
        return self._padded_block_tables([request.block_ids for request in requests])

    def _padded_block_tables(self, block_tables: list[list[int]]) -> torch.Tensor:
        width = max(len(block_ids) for block_ids in block_tables)
        return self._tensor([block_ids + [0] * (width - len(block_ids)) for block_ids in block_tables], torch.int32)

    def _tensor(self, values, dtype: torch.dtype) -> torch.Tensor:
        return sampler.to_device(values, dtype, self.device)
