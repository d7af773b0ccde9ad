"""The driver side of tensor parallelism (rank 0, the engine process): start the workers, broadcast each step,
watch for failures, stop them.

    start ──► fork ranks 1..N-1 ──► rendezvous ──► every rank loads its shard ──► configure: the resolved engine
    arguments go out, every rank sizes its KV pool, all take the smallest ──► steps ──► shutdown

Every message to the workers (RankSetup, each step's plan, the stop) goes through a shared-memory ring
(serval.distributed.shm_broadcast) that they poll: no collective, no socket per step. A message too big for a slot
falls back to the control group's gloo broadcast, in the ring's order.

Failure is bounded in time: the workers' liveness is checked before each step; a worker that dies during a step
closes its sockets, so the driver's collective fails at once; one that hangs makes the collective time out
(COLLECTIVE_TIMEOUT_S), as does a ring no worker reads any more. Any of these, or a failed forward on the driver
(which leaves the ranks out of step), stops every worker, unlinks the ring's segment and raises WorkerFailedError,
which ends the engine. No worker outlives the driver: they are daemonic (multiprocessing stops them at exit), a
finalizer stops them when the executor is collected, and each watches the driver's process (its step loop too,
while it waits on the ring). No segment outlives it either: shutdown, failure and the finalizer unlink it, and
multiprocessing's resource tracker does if the driver is killed.

The workers come from multiprocessing's fork server, which has torch and serval imported
(serval.distributed.processes): a worker's start costs a fork, not a fresh interpreter's imports.
"""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import weakref
from typing import NoReturn

import torch
import torch.distributed as dist

from serval.config import EngineConfig
from serval.distributed import WorkerFailedError
from serval.distributed import group as groups
from serval.distributed import shm_broadcast
from serval.distributed.processes import new_process, portable_log_formatter
from serval.distributed.shm_broadcast import ShmBroadcastWriter
from serval.distributed.steps import DecodeStep, MixedStep, eager_decode, replay_decode, replay_mixed
from serval.distributed.gguf_shards import check_gguf_layout, gguf_file_of
from serval.distributed.weights import check_quantization, load_rank_model, quantized_layout, rank_config
from serval.distributed.worker import RankSetup, WorkerArgs, agree_num_blocks, worker_main
from serval.engine.cuda_graphs import DecodeGraphs
from serval.engine.mixed_graphs import MixedGraphs
from serval.engine.memory import num_kv_blocks
from serval.engine.model_runner import DecodeForward, DecodeInFlight, ForwardInputs, ModelRunner, StagedForward
from serval.engine.request import Request
from serval.engine.sampler import to_device
from serval.layers.parallel import shard_layout
from serval.openai.errors import InvalidArgument

logger = logging.getLogger(__name__)

_JOIN_TIMEOUT_S = 10.0


class TensorParallelExecutor:
    """The driver's handle on its workers and its own shard (`model`)."""

    def __init__(self, processes: list[multiprocessing.Process], parallel: groups.ParallelGroups,
                 model: torch.nn.Module, hf_config, device: torch.device,
                 plans: ShmBroadcastWriter | None = None) -> None:
        self.processes = processes
        self.plans = plans  # None at tensor_parallel_size=1: no worker to tell
        self.parallel = parallel
        self.model = model
        self.hf_config = hf_config
        self.device = device
        self.failed: WorkerFailedError | None = None
        # An engine that fails after this point (or is dropped without shutdown) still frees its workers and
        # the process group, so that another engine can start in this process.
        self._finalizer = weakref.finalize(self, _release, processes, plans)

    @classmethod
    def start(cls, config: EngineConfig, model_path: str, dtype: torch.dtype,
              device: torch.device) -> "TensorParallelExecutor":
        """Check the request (devices, heads), start the workers, load rank 0's shard. Raises InvalidArgument for
        a size this host or model cannot take, WorkerFailedError for a worker that could not start."""
        size = config.tensor_parallel_size
        groups.check_devices(size, device)
        if dist.is_initialized():
            raise RuntimeError("this process already belongs to a torch.distributed group (another tensor-parallel "
                               "engine?); shut that engine down first (LLMEngine.shutdown)")
        try:
            hf_config = rank_config(model_path, config.load_format, config.hf_overrides)
        except ValueError as error:
            raise InvalidArgument("hf_overrides", str(error)) from None
        try:
            check_quantization(hf_config, config.quantization)
        except ValueError as error:
            raise InvalidArgument("quantization", str(error)) from None
        try:
            layout = quantized_layout(shard_layout(hf_config, 0, size, config.enable_expert_parallel), hf_config)
            if (gguf_file := gguf_file_of(model_path, config.load_format)) is not None:
                check_gguf_layout(gguf_file, layout)
        except ValueError as error:
            param = "enable_expert_parallel" if str(error).startswith("enable_expert_parallel") else \
                "load_format" if "GGUF mixture-of-experts" in str(error) else "tensor_parallel_size"
            raise InvalidArgument(param, str(error)) from None
        store = groups.open_store(0, size)
        segment, spec = shm_broadcast.create_segment(num_readers=size - 1) if size > 1 else (None, None)
        processes = [new_process(worker_main, (
            WorkerArgs(dataclasses.replace(layout, rank=rank), store.port, model_path, config, dtype, device,
                       logging.getLogger().getEffectiveLevel(), portable_log_formatter(), spec),),
            name=f"serval-tp-rank-{rank}", daemon=True) for rank in range(1, size)]
        plans = None
        try:
            for process in processes:
                process.start()
            groups.wait_joined(store, processes)
            parallel = groups.init_groups(store, 0, size, groups.rank_device(device, 0))
            if segment is not None:
                plans = ShmBroadcastWriter(segment, spec, parallel.control_group,
                                           lambda: _raise_if_exited(processes), groups.COLLECTIVE_TIMEOUT_S)
            model = load_rank_model(model_path, layout, load_format=config.load_format, dtype=dtype, device=device,
                                    seed=config.seed, group=parallel.device_group, quantization=config.quantization,
                                    hf_overrides=config.hf_overrides)
        except BaseException:
            _release(processes, None)
            if segment is not None:
                shm_broadcast.release_segment(segment)
            raise
        logger.info("tensor-parallel workers started", extra={
            "tensor_parallel_size": size, "worker_pids": [p.pid for p in processes],
            "backend": dist.get_backend(parallel.device_group)})
        return cls(processes, parallel, model, hf_config, device, plans)

    def configure(self, config: EngineConfig, kv_cache_dtype: torch.dtype) -> tuple[EngineConfig, int]:
        """Send the engine's resolved arguments to the workers; return them and the KV pool's blocks, the fewest
        any rank holds. CUDA graphs and asynchronous scheduling run as they do on one device (serval.distributed.
        steps): every rank captures the same graphs, and the plans carry which one each step replays."""
        self.broadcast(RankSetup(config, kv_cache_dtype))
        try:
            num_blocks = num_kv_blocks(config, self.model, kv_cache_dtype, self.device)
        except ValueError:  # too little KV memory: the user's error as it is, and no worker left waiting
            self._finalizer()
            raise
        return config, self.run_guarded(lambda: agree_num_blocks(num_blocks, self.parallel))

    def make_runner(self, num_blocks: int, config: EngineConfig, kv_cache_dtype: torch.dtype) -> ModelRunner:
        return self.run_guarded(lambda: ParallelModelRunner(self, num_blocks, config, kv_cache_dtype))

    def broadcast(self, message: RankSetup | ForwardInputs | DecodeStep | MixedStep | None) -> None:
        self.check_workers()
        if not self.processes:  # tensor_parallel_size=1 through the executor: nobody to tell, no pickling per step
            return
        self.run_guarded(lambda: self.plans.write(message))

    def check_workers(self) -> None:
        """Raise WorkerFailedError if the executor has failed or a worker has exited."""
        if self.failed is not None:
            raise self.failed
        for rank, process in enumerate(self.processes, start=1):
            if not process.is_alive():
                self._fail(f"tensor-parallel worker rank {rank} (pid {process.pid}) exited with code "
                           f"{process.exitcode}")

    def run_guarded(self, action):
        """Run a step of the ranks' protocol; any failure in it leaves them out of step for good."""
        if self.failed is not None:
            raise self.failed
        try:
            return action()
        except Exception as error:
            for process in self.processes:
                process.join(timeout=0.5)  # a worker that just died: let its exit code be known
            dead = [f"rank {rank} (exit code {p.exitcode})" for rank, p in enumerate(self.processes, start=1)
                    if not p.is_alive()]
            self._fail(f"tensor-parallel step failed ({type(error).__name__}: {error}); "
                       f"workers gone: {', '.join(dead) or 'none'}", error)

    def _fail(self, message: str, cause: BaseException | None = None) -> NoReturn:
        self.failed = WorkerFailedError(message)
        logger.error("tensor parallelism failed; stopping the workers", extra={"reason": message})
        _stop(self.processes, False)
        if self.plans is not None:
            shm_broadcast.release_segment(self.plans.segment)
        raise self.failed from cause

    def shutdown(self) -> None:
        """Tell the workers to stop, wait for them (then terminate any left), leave the process group."""
        if self.failed is None and all(process.is_alive() for process in self.processes):
            try:
                self.plans.write(None, timeout_s=_JOIN_TIMEOUT_S)
            except Exception:  # a worker died meanwhile: _stop deals with the rest
                logger.warning("a tensor-parallel worker did not take the stop message")
        self._finalizer.detach()
        groups.destroy_groups()
        _stop(self.processes, True)
        if self.plans is not None:
            shm_broadcast.release_segment(self.plans.segment)


class ParallelModelRunner(ModelRunner):
    """The driver's ModelRunner: every forward's plan goes to the workers first, then runs on rank 0's shard.

    Four kinds of forward reach the workers: an eager step of any shape (forward_logits: ForwardInputs), a decode
    step replayed from a graph (the graphs' run: a DecodeStep with its graph size), an eager decode step queued
    by asynchronous scheduling (launch_forward: a DecodeStep without a graph), and a mixed prefill/decode step
    replayed from a graph (the mixed graphs' run: a MixedStep with its token bucket). At size 1 nothing is sent and
    every step is the in-process runner's (tp_bench's tp1 pair compares the two)."""

    def __init__(self, executor: TensorParallelExecutor, num_blocks: int, config: EngineConfig,
                 kv_cache_dtype: torch.dtype) -> None:
        # With graphs, the capture runs here, on every rank at once (each worker builds its runner now too).
        super().__init__(executor.model, num_blocks, config.block_size, kv_cache_dtype, executor.device,
                         config.max_num_seqs, config.max_model_len, enforce_eager=config.enforce_eager,
                         max_num_batched_tokens=config.max_num_batched_tokens, cudagraph_mixed=config.cudagraph_mixed,
                         cudagraph_mixed_max_tokens=config.cudagraph_mixed_max_tokens,
                         cudagraph_mixed_sizes=config.cudagraph_mixed_sizes)
        self.executor = executor
        if self.graphs is not None:
            self.graphs.__class__ = DriverDecodeGraphs
            self.graphs.executor = executor
        if self.mixed_graphs is not None:
            self.mixed_graphs.__class__ = DriverMixedGraphs
            self.mixed_graphs.executor = executor

    def forward_logits(self, inputs: ForwardInputs) -> torch.Tensor:
        self.executor.broadcast(inputs)
        return self.executor.run_guarded(lambda: super(ParallelModelRunner, self).forward_logits(inputs))

    @torch.inference_mode()
    def launch_forward(self, requests: list[Request], previous: DecodeInFlight | None = None,
                       staged: StagedForward | None = None) -> DecodeForward:
        if not self.executor.processes or (self.graphs is not None and self.graphs.can_run(len(requests))):
            # The graphs' run sends the plan; at size 1 there is nobody to send it to, so the in-process step.
            return super().launch_forward(requests, previous, staged)
        positions = [request.num_computed_tokens for request in requests]
        ids = None if previous is None else previous_samples(previous, requests)
        step = DecodeStep(None if ids is not None else [r.all_token_ids[p] for r, p in zip(requests, positions)],
                          positions, [r.block_ids[p // self.block_size] * self.block_size + p % self.block_size
                                      for r, p in zip(requests, positions)],
                          [p + 1 for p in positions], [request.block_ids for request in requests], graph_batch=0)
        self.executor.broadcast(step)
        group = self.executor.parallel.device_group
        return DecodeForward(requests, self.executor.run_guarded(lambda: eager_decode(self, step, ids, group)))


class DriverDecodeGraphs(DecodeGraphs):
    """The driver's decode graphs: a replay first sends its plan (and, with asynchronous scheduling, its input
    ids), so that every rank replays the same graph at once. Staging ahead (DecodeGraphs.stage) only keeps the
    inputs: the replay sends them with the ids."""
    executor: TensorParallelExecutor

    def stage(self, input_ids, positions, slot_mapping, seq_lens, block_tables, lora_slots=None, groups=None):
        return input_ids, positions, slot_mapping, seq_lens, block_tables

    def replay(self, staged, source: torch.Tensor | None = None) -> torch.Tensor:
        input_ids, positions, slot_mapping, seq_lens, block_tables = staged
        if not self.executor.processes:  # size 1: no rank to send the plan or the ids to; the in-process replay
            return self.executor.run_guarded(lambda: DecodeGraphs.replay(self, DecodeGraphs.stage(
                self, input_ids, positions, slot_mapping, seq_lens, block_tables), source))
        ids = None if source is None else source.index_select(0, to_device(input_ids, torch.int64, source.device))
        step = DecodeStep(None if ids is not None else list(input_ids), positions, slot_mapping, seq_lens,
                          block_tables, graph_batch=self.padded_batch(len(input_ids)))
        self.executor.broadcast(step)
        group = self.executor.parallel.device_group
        return self.executor.run_guarded(lambda: replay_decode(self, step, ids, group))


class DriverMixedGraphs(MixedGraphs):
    """The driver's mixed-step graphs: a replay first sends its plan and bucket, so that every rank replays the
    same graph at once."""
    executor: TensorParallelExecutor

    def run(self, inputs: ForwardInputs) -> torch.Tensor:
        step = MixedStep(inputs, self.bucket(len(inputs.input_ids)))
        self.executor.broadcast(step)
        return self.executor.run_guarded(lambda: replay_mixed(self, step))


def previous_samples(previous: DecodeInFlight, requests: list[Request]) -> torch.Tensor:
    """The tokens `previous` sampled for `requests`, in their order, on the device (the host need not have them)."""
    row = {id(request): i for i, request in enumerate(previous.requests)}
    rows = to_device([row[id(request)] for request in requests], torch.int64, previous.token_ids_device.device)
    return previous.token_ids_device.index_select(0, rows)


def _release(processes: list[multiprocessing.Process], plans: ShmBroadcastWriter | None) -> None:
    _stop(processes, False)
    groups.destroy_groups()
    if plans is not None:
        shm_broadcast.release_segment(plans.segment)


def _raise_if_exited(processes: list[multiprocessing.Process]) -> None:
    for rank, process in enumerate(processes, start=1):
        if not process.is_alive():
            raise WorkerFailedError(f"tensor-parallel worker rank {rank} (pid {process.pid}) exited with code "
                                    f"{process.exitcode}")


def _stop(processes: list[multiprocessing.Process], graceful: bool) -> None:
    """Wait a little for exiting workers (graceful), then terminate, then kill what is left."""
    if graceful:
        for process in processes:
            process.join(timeout=_JOIN_TIMEOUT_S)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=_JOIN_TIMEOUT_S)
        if process.is_alive():
            process.kill()
            process.join()
