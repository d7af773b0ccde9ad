"""The decode steps every rank runs alike: eager, or a replay of the same captured CUDA graph, with the input ids
sent either in the broadcast plan or, under asynchronous scheduling, from the driver's device.

An eager step of any shape travels as model_runner.ForwardInputs; a decode step (one new token per request) as a
DecodeStep, which says which graph size every rank replays (graph_batch; 0: eager). Under asynchronous scheduling
step N+1 is planned before step N's tokens reach the driver's host: its input ids are the previous step's samples,
still on the driver's device. They go to the workers by a broadcast on the device group (NCCL: queued on the
stream, the host does not wait), right after the plan, so every rank issues its collectives in the same order:

    driver   plan ─► [ids broadcast] ─► forward (the all-reduces, the logits gathered here) ─► sample
    worker   plan ─► [ids broadcast] ─► forward (the all-reduces, its logits' slice sent to the driver)

Every rank captures the same ladder of graph sizes at start (the same max_num_seqs), in the same order, with the
all-reduces inside: torch's NCCL process group can be captured once its communicator exists (the memory profile's
forward has made it), and the capture's warm-up forwards run on every rank together.

With --cudagraph-mixed every rank also captures the same token buckets of mixed prefill/decode steps
(serval.engine.mixed_graphs), after the decode graphs. A step the driver replays from one travels as a MixedStep
naming its bucket; a worker whose own buckets give another stops with an error rather than replay a different graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from serval.engine.cuda_graphs import DecodeGraphs
from serval.engine.mixed_graphs import MixedGraphs
from serval.engine.model_runner import ForwardInputs, ModelRunner
from serval.engine.sampler import to_device
from serval.layers.attention import AttentionMetadata


@dataclass
class DecodeStep:
    """One decode step's plan: request i's new token at positions[i], written to slot_mapping[i]."""
    input_ids: list[int] | None  # None: the previous step's samples, sent by the ids broadcast after this plan
    positions: list[int]
    slot_mapping: list[int]
    seq_lens: list[int]
    block_tables: list[list[int]]  # per request, unpadded
    graph_batch: int  # the captured size every rank replays; 0: every rank runs eagerly

    @property
    def num_requests(self) -> int:
        return len(self.positions)


def exchange_input_ids(step: DecodeStep, ids: torch.Tensor | None, group: dist.ProcessGroup,
                       device: torch.device) -> torch.Tensor | None:
    """The step's input ids on this rank's device when the plan does not carry them: the driver sends `ids`, a
    worker (ids None) receives them. None when the plan carries them."""
    if step.input_ids is not None:
        return None
    if ids is None:
        ids = torch.empty(step.num_requests, dtype=torch.int64, device=device)
    if dist.get_world_size(group) > 1:
        dist.broadcast(ids, src=0, group=group)
    return ids


@torch.inference_mode()
def replay_decode(graphs: DecodeGraphs, step: DecodeStep, ids: torch.Tensor | None,
                  group: dist.ProcessGroup) -> torch.Tensor:
    """Logits [n, vocab] of the step by replaying the graph of size step.graph_batch (DecodeGraphs.run's own, not a
    subclass's: the driver's graphs broadcast before they call this)."""
    n = step.num_requests
    if graphs.padded_batch(n) != step.graph_batch:
        raise RuntimeError(f"tensor-parallel ranks out of step: the driver replays the graph of {step.graph_batch} "
                           f"requests, this rank's ladder gives {graphs.padded_batch(n)} for {n}")
    ids = exchange_input_ids(step, ids, group, graphs.inputs.device)
    rows = step.input_ids if ids is None else list(range(n))  # with a source, the graph's ids are rows of it
    return DecodeGraphs.run(graphs, rows, step.positions, step.slot_mapping, step.seq_lens, step.block_tables,
                            source=ids)


@torch.inference_mode()
def eager_decode(runner: ModelRunner, step: DecodeStep, ids: torch.Tensor | None,
                 group: dist.ProcessGroup) -> torch.Tensor:
    """Logits [n, vocab] of the step, run op by op (no graph captured, or more requests than the largest)."""
    device = runner.device
    ids = exchange_input_ids(step, ids, group, device)
    if ids is None:
        ids = to_device(step.input_ids, torch.int64, device)
    width = max(len(block_ids) for block_ids in step.block_tables)
    block_tables = [block_ids + [0] * (width - len(block_ids)) for block_ids in step.block_tables]
    metadata = AttentionMetadata(slot_mapping=to_device(step.slot_mapping, torch.int64, device),
                                 query_start_loc=list(range(step.num_requests + 1)), seq_lens=step.seq_lens,
                                 block_tables=to_device(block_tables, torch.int32, device),
                                 block_size=runner.block_size)
    hidden = runner.model(ids, to_device(step.positions, torch.int64, device), runner.kv_caches, metadata)
    return runner.model.compute_logits(hidden)


def run_decode(runner: ModelRunner, step: DecodeStep, ids: torch.Tensor | None,
               group: dist.ProcessGroup) -> torch.Tensor:
    if step.graph_batch:
        if runner.graphs is None:
            raise RuntimeError("tensor-parallel ranks out of step: the driver replays a CUDA graph, this rank "
                               "captured none")
        return replay_decode(runner.graphs, step, ids, group)
    return eager_decode(runner, step, ids, group)


@dataclass
class MixedStep:
    """A mixed prefill/decode step every rank replays from the graph of token bucket `bucket`."""
    inputs: ForwardInputs
    bucket: int


@torch.inference_mode()
def replay_mixed(graphs: MixedGraphs | None, step: MixedStep) -> torch.Tensor:
    """Logits of the step from this rank's graph of the driver's bucket (MixedGraphs.run's own, not a subclass's:
    the driver's graphs broadcast before they call this)."""
    if graphs is None:
        raise RuntimeError("tensor-parallel ranks out of step: the driver replays a mixed-step CUDA graph, this rank "
                           "captured none")
    bucket = graphs.bucket(len(step.inputs.input_ids))
    if bucket != step.bucket:
        raise RuntimeError(f"tensor-parallel ranks out of step: the driver replays the mixed-step graph of "
                           f"{step.bucket} tokens, this rank's buckets give {bucket}")
    return MixedGraphs.run(graphs, step.inputs)
