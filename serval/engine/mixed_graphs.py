"""CUDA graphs of mixed steps: prefill chunks beside decodes, captured once per token bucket.

Under steady load almost every step mixes one request's prefill chunk with many decodes. Run eagerly, such a step
launches ~10 kernels a layer from Python, and with float8 weights the GPU finishes its GEMMs before the host has
launched the next ones. A step of T tokens over n requests replays instead the graph of the smallest bucket
T_b >= T (MixedGraphs.sizes), its inputs padded into fixed buffers:

    rows 0 .. T-1          the step's tokens, as the eager forward has them (flat, request after request)
    rows T .. T_b-1        padding: token 0 at position 0, slot -1 (the K/V write skips it)
    requests 0 .. n-1      the step's, with their query_start_loc, seq_lens and block tables
    request n              owns the padding rows with seq_len 0: it sees no key, its attention output is 0
    requests n+1 .. R_b-1  no rows (query_start_loc stays at T_b), seq_len 0; R_b = min(T_b, max_num_seqs) + 1
    logits_rows            the sampled rows (the last of each request that samples), padded with row 0

Only logits_rows go through the LM head: at most one per request, so R_b - 1 rows. The attention kernel launches
its query tiles over a grid set by T_b and R_b alone and finds each tile's request on the device
(serval.kernels.triton_attention.flat_tiles), which is what makes one graph valid for any mix of lengths.

With LoRA (`lora`, the model's LoRAContext) the buffer has one more region, each row's adapter slot (-1: none, as
padding rows are), and the graphs are captured with the LoRA kernels in them reading it, as DecodeGraphs does: one
graph serves any mix of adapters and the base (serval.lora.batch.graph_lora_batch groups the rows by slot on the
device).

Steps the graphs don't take run eagerly as before: pure decode (DecodeGraphs), speculative verify (VerifyGraphs),
prompt logprobs, pooling, more tokens than the largest bucket, and every step until a float8
cache's scales have been calculated from a real prefill. On a CPU nothing is captured and run() calls the same
padded forward on the same buffers eagerly (through the Triton interpreter in tests).
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from serval.config import MIXED_GRAPH_MAX_TOKENS
from serval.engine.cuda_graphs import gather_input_ids
from serval.kernels import paged_attention as torch_attention
from serval.layers.attention import AttentionMetadata, attention_backend
from serval.layers.quant.kv_scales import kv_scales_frozen, layers_awaiting_kv_scales
from serval.lora.batch import graph_lora_batch

if TYPE_CHECKING:
    from serval.engine.model_runner import ForwardInputs
    from serval.layers.lora import LoRAContext

logger = logging.getLogger(__name__)


def mixed_capture_sizes(max_num_batched_tokens: int, max_tokens: int = MIXED_GRAPH_MAX_TOKENS,
                        sizes: tuple[int, ...] | None = None) -> list[int]:
    """Token buckets: 16, 32, ..., 512, then every multiple of 256, up to the smaller limit (itself included).
    Padding is at most half a step below 512 tokens, where steps are cheap, and under 256 tokens above.
    sizes (EngineConfig.cudagraph_mixed_sizes): the buckets as given instead, those a step can reach (a size
    above max_num_batched_tokens becomes max_num_batched_tokens); max_tokens is then not read."""
    if sizes:
        reachable = sorted({min(size, max_num_batched_tokens) for size in sizes})
        return [size for size in reachable if size >= 2]
    limit = min(max_num_batched_tokens, max_tokens)
    if limit < 2:  # a step of one token is a decode step
        return []
    sizes = [size for size in (16, 32, 64, 128, 256, 512) if size < limit] + list(range(768, limit, 256))
    return sizes + [limit]


class MixedGraphs:
    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], block_size: int, max_num_seqs: int,
                 max_model_len: int, max_num_batched_tokens: int, device: torch.device,
                 max_tokens: int = MIXED_GRAPH_MAX_TOKENS, lora: LoRAContext | None = None,
                 max_loras: int = 0, sizes: tuple[int, ...] | None = None) -> None:
        if attention_backend(device) is torch_attention:
            raise ValueError("mixed-step graphs need the Triton attention backend: the torch reference reads host "
                             "lengths and writes the padding rows' slot -1 into the cache's last slot")
        self.model = model
        self.lora, self.max_loras = lora, max_loras
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.sizes = mixed_capture_sizes(max_num_batched_tokens, max_tokens, sizes)
        self.device = device
        self.max_blocks = -(-max_model_len // block_size)
        max_tokens = self.sizes[-1] if self.sizes else 0
        max_requests = self._num_requests(max_tokens)
        # One int32 buffer holds every input, so a step needs one host-to-device copy (as DecodeGraphs); the block
        # tables come last so that the copy stops after the step's own rows.
        self._layout = {"input_ids": 0, "positions": max_tokens, "slot_mapping": 2 * max_tokens,
                        "logits_rows": 3 * max_tokens}
        self._layout["query_start_loc"] = self._layout["logits_rows"] + max_requests
        self._layout["seq_lens"] = self._layout["query_start_loc"] + max_requests + 1
        self._layout["block_tables"] = self._layout["seq_lens"] + max_requests
        if lora is not None:  # each row's LoRA slot, before the block tables: a step copies one prefix
            self._layout["lora_slots"] = self._layout["block_tables"]
            self._layout["block_tables"] += max_tokens
        size = self._layout["block_tables"] + max_requests * self.max_blocks
        # Two staging buffers, used in turn: with asynchronous scheduling step N + 1 is filled while step N's copy
        # may still wait in the stream, and step N + 2 only after the host has waited for step N's tokens.
        self._stagings = [torch.zeros(size, dtype=torch.int32, pin_memory=device.type == "cuda") for _ in range(2)]
        self._fills = 0
        self.inputs = torch.zeros(size, dtype=torch.int32, device=device)
        # This step's query_start_loc and seq_lens, padded: AttentionMetadata's host fields (the kernels read the
        # device copies; nothing captured depends on these).
        self._host_query_start_loc: list[int] = []
        self._host_seq_lens: list[int] = []
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.capture_seconds = 0.0  # what capture() took, and the memory its graphs keep (benchmarks report them)
        self.pool_bytes = 0
        # Attention layers that still take a float8 cache's scales from the next prefill: until they have, mixed
        # steps run eagerly (a graph would bake in "don't calculate").
        self._scales_pending = layers_awaiting_kv_scales(model)

    def _num_requests(self, num_tokens: int) -> int:
        """Requests of a bucket's padded batch: every real one has a token, plus the one that owns the padding."""
        return min(num_tokens, self.max_num_seqs) + 1

    def bucket(self, num_tokens: int) -> int | None:
        return next((size for size in self.sizes if size >= num_tokens), None)

    def can_run(self, inputs: ForwardInputs) -> bool:
        if self._scales_pending:
            self._scales_pending = [module for module in self._scales_pending if module.calculate_kv_scales]
            if self._scales_pending:
                return False
        bucket = self.bucket(len(inputs.input_ids))
        num_requests = len(inputs.seq_lens)
        return (bucket is not None and 0 < num_requests < self._num_requests(bucket)
                and len(inputs.logits_rows) < self._num_requests(bucket))

    @torch.inference_mode()
    def run(self, inputs: ForwardInputs, lora_slots: list[int] | None = None, source: torch.Tensor | None = None,
            source_rows: list[int] = ()) -> torch.Tensor:
        """float32 logits [len(inputs.logits_rows), vocab] of the step, by graph replay (or, with no graph
        captured, by the same padded forward run eagerly): ModelRunner.forward_logits' contract. lora_slots: each
        row's adapter slot (-1: none), with LoRA. source_rows: rows whose input id is a row of `source`, the
        previous step's samples on the device (cuda_graphs.gather_input_ids)."""
        bucket = self.bucket(len(inputs.input_ids))
        self._fill(inputs, bucket, lora_slots)
        if source is not None:
            gather_input_ids(self._view("input_ids", bucket), source, list(source_rows))
        if bucket in self.graphs:
            self.graphs[bucket].replay()
            logits = self.logits[bucket]
        else:
            logits = self._forward(bucket)
        return logits[:len(inputs.logits_rows)]

    @torch.inference_mode()
    def capture(self) -> None:
        started = time.monotonic()
        torch.cuda.synchronize()
        allocated = torch.cuda.memory_allocated()
        pool = None
        with kv_scales_frozen(self.model):
            for bucket in reversed(self.sizes):  # largest first: the smaller graphs reuse its memory pool
                self._fill_padding(bucket)
                for _ in range(2):  # warm-up: Triton compiles and cuBLAS picks its kernels outside the capture
                    self._forward(bucket)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.logits[bucket] = self._forward(bucket)
                pool = graph.pool()
                self.graphs[bucket] = graph
        torch.cuda.synchronize()
        self.capture_seconds = time.monotonic() - started
        self.pool_bytes = torch.cuda.memory_allocated() - allocated
        logger.info("mixed-step cuda graphs captured",
                    extra={"token_buckets": len(self.sizes), "max_tokens": self.sizes[-1],
                           "seconds": round(self.capture_seconds, 2), "pool_mib": round(self.pool_bytes / 2**20, 1)})

    def _view(self, name: str, length: int) -> torch.Tensor:
        start = self._layout[name]
        if name == "block_tables":
            return self.inputs[start:start + length * self.max_blocks].view(length, self.max_blocks)
        return self.inputs[start:start + length]

    def _forward(self, bucket: int) -> torch.Tensor:
        """The padded forward of a bucket from the input buffers: float32 logits of its logits_rows; what a graph
        holds."""
        num_requests = self._num_requests(bucket)
        metadata = AttentionMetadata(
            slot_mapping=self._view("slot_mapping", bucket), query_start_loc=self._host_query_start_loc,
            seq_lens=self._host_seq_lens, block_tables=self._view("block_tables", num_requests),
            block_size=self.block_size, max_query_len=bucket, max_seq_len=self.max_model_len,
            seq_lens_tensor=self._view("seq_lens", num_requests),
            query_start_loc_tensor=self._view("query_start_loc", num_requests + 1))
        if self.lora is not None:
            self.lora.batch = graph_lora_batch(self._view("lora_slots", bucket), self.max_loras)
        try:
            hidden = self.model(self._view("input_ids", bucket), self._view("positions", bucket), self.kv_caches,
                                metadata)
        finally:
            if self.lora is not None:
                self.lora.batch = None
        return self.model.compute_logits(hidden.index_select(0, self._view("logits_rows", num_requests - 1)))

    def _fill(self, inputs: ForwardInputs, bucket: int, lora_slots: list[int] | None = None) -> None:
        """Write the step's inputs, padded to the bucket, into the buffers."""
        num_tokens, num_requests = len(inputs.input_ids), len(inputs.seq_lens)
        staging = self._stagings[self._fills % 2].numpy()  # numpy slice assignment from lists: cheaper than torch's
        self._write(staging, inputs, bucket, lora_slots)
        table_start = self._layout["block_tables"]
        table = staging[table_start:table_start + num_requests * self.max_blocks].reshape(num_requests,
                                                                                           self.max_blocks)
        # Entries past a request's blocks keep earlier steps' ids: valid blocks, and no visible key reads them.
        for row, block_ids in zip(table, inputs.block_tables):
            row[:len(block_ids)] = block_ids
        assert num_tokens <= bucket
        self._copy_to_device(num_requests)

    def _fill_padding(self, bucket: int) -> None:
        """Inputs of a step with no real request: the padding request owns every row (what capture runs)."""
        from serval.engine.model_runner import ForwardInputs  # here: model_runner imports this module
        self._write(self._stagings[self._fills % 2].numpy(), ForwardInputs([], [], [], [0], [], [], []), bucket)
        self._copy_to_device(0)

    def _write(self, staging, inputs: ForwardInputs, bucket: int, lora_slots: list[int] | None = None) -> None:
        num_tokens, num_requests = len(inputs.input_ids), len(inputs.seq_lens)
        padded_requests = self._num_requests(bucket)
        for name, values, fill, length in (
                ("input_ids", inputs.input_ids, 0, bucket), ("positions", inputs.positions, 0, bucket),
                ("slot_mapping", inputs.slot_mapping, -1, bucket),
                ("logits_rows", inputs.logits_rows, 0, padded_requests - 1),
                ("query_start_loc", inputs.query_start_loc, bucket, padded_requests + 1),
                ("seq_lens", inputs.seq_lens, 0, padded_requests)):
            start = self._layout[name]
            staging[start:start + len(values)] = values
            staging[start + len(values):start + length] = fill
        if self.lora is not None:  # each row's adapter slot; the padding rows have none
            start = self._layout["lora_slots"]
            staging[start:start + num_tokens] = -1 if lora_slots is None else lora_slots
            staging[start + num_tokens:start + bucket] = -1
        self._host_query_start_loc = inputs.query_start_loc + [bucket] * (padded_requests - num_requests)
        self._host_seq_lens = inputs.seq_lens + [0] * (padded_requests - num_requests)
        assert num_tokens == inputs.query_start_loc[-1]

    def _copy_to_device(self, num_requests: int) -> None:
        # The vectors whole (the parts past this bucket are stale and unread), the block tables only to the step's.
        end = self._layout["block_tables"] + num_requests * self.max_blocks
        self.inputs[:end].copy_(self._stagings[self._fills % 2][:end], non_blocking=True)
        self._fills += 1
