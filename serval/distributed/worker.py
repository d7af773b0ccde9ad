"""A tensor-parallel worker process (ranks 1..N-1): its shard, its KV pool, then one forward per step broadcast.

The worker keeps no request state: each step's ForwardInputs or DecodeStep carry everything (token ids, positions,
slots, block tables, the graph to replay), and the driver's scheduler decided them. Under asynchronous scheduling
the input ids of a decode step come from the driver's device (serval.distributed.steps); the worker never waits
for its own device, so it runs as far ahead as the driver's plans let it. Its LM head sends its vocabulary slice's
logits to the driver (a gather to rank 0) and keeps none: only the driver samples. The driver's messages come
through a shared-memory ring (serval.distributed.shm_broadcast) the worker polls. It exits when the driver says
stop, when the driver's sockets close (a crash), when the driver's process has exited (a thread waits on it, and
the ring's wait checks every 0.1 s, so a driver killed with SIGKILL leaves no orphan; serval.distributed.processes
says why the driver's pid and not the parent's, which is the fork server), or when its own step fails (the driver's
next collective then fails, and the engine stops).
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from serval.config import EngineConfig
from serval.distributed import group as groups
from serval.distributed.processes import DriverWatch
from serval.distributed.shm_broadcast import ShmBroadcastReader, ShmQueueSpec
from serval.distributed.steps import DecodeStep, MixedStep, replay_mixed, run_decode
from serval.distributed.weights import load_rank_model
from serval.engine.memory import num_kv_blocks
from serval.engine.model_runner import ModelRunner
from serval.layers.quant.kv_scales import enable_kv_scale_calculation
from serval.layers.parallel import ShardLayout

logger = logging.getLogger(__name__)


@dataclass
class WorkerArgs:
    """What a started worker needs to join: its rank, the rendezvous, and what to load."""
    layout: ShardLayout  # its rank is the worker's
    store_port: int
    model_path: str
    config: EngineConfig
    dtype: torch.dtype
    device: torch.device  # the engine's device; the worker runs on rank_device(device, rank)
    log_level: int
    log_formatter: logging.Formatter | None  # the driver's (the server's JSON lines), so one log reads alike
    plan_queue: ShmQueueSpec  # the driver's ring of step plans (its writer: the driver); this worker is reader rank - 1


@dataclass
class RankSetup:
    """The driver's first broadcast: the engine's resolved arguments, from which every rank sizes its KV pool."""
    config: EngineConfig
    kv_cache_dtype: torch.dtype


def worker_main(args: WorkerArgs) -> None:
    """The worker process's entry point."""
    handler = logging.StreamHandler()
    handler.setFormatter(args.log_formatter or logging.Formatter(
        f"%(asctime)s tp-rank-{args.layout.rank} %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=args.log_level, handlers=[handler])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the driver decides
    _exit_with_driver(args.plan_queue.writer_pid)
    try:
        run_worker(args)
    except BaseException:
        logger.exception("tensor-parallel worker failed", extra={"rank": args.layout.rank})
        os._exit(1)  # no interpreter teardown: it could wait on a collective that will never complete
    os._exit(0)


def run_worker(args: WorkerArgs) -> None:
    rank, world_size = args.layout.rank, args.layout.size
    device = groups.rank_device(args.device, rank)
    if device.type == "cpu":  # the ranks share the host's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    store = groups.open_store(rank, world_size, args.store_port)
    groups.announce_joined(store, rank)
    parallel = groups.init_groups(store, rank, world_size, device)
    plans = ShmBroadcastReader(args.plan_queue, rank - 1, parallel.control_group)
    try:
        model = load_rank_model(args.model_path, args.layout, load_format=args.config.load_format, dtype=args.dtype,
                                device=device, seed=args.config.seed, group=parallel.device_group,
                                quantization=args.config.quantization, hf_overrides=args.config.hf_overrides)
        # The driver's messages: RankSetup once, then a ForwardInputs, a DecodeStep or a MixedStep per step; None: stop.
        setup: RankSetup = plans.read()
        config = setup.config
        num_blocks = agree_num_blocks(num_kv_blocks(config, model, setup.kv_cache_dtype, device), parallel)
        if config.calculate_kv_scales:  # as the driver's engine: after the memory profile, before graph capture
            enable_kv_scale_calculation(model)  # each rank's scales from its own heads, which its cache holds
        runner = ModelRunner(model, num_blocks, config.block_size, setup.kv_cache_dtype, device,
                             config.max_num_seqs, config.max_model_len, enforce_eager=config.enforce_eager,
                             max_num_batched_tokens=config.max_num_batched_tokens,
                             cudagraph_mixed=config.cudagraph_mixed,
                             cudagraph_mixed_max_tokens=config.cudagraph_mixed_max_tokens,
                             cudagraph_mixed_sizes=config.cudagraph_mixed_sizes)
        logger.info("tensor-parallel worker ready", extra={"rank": rank, "device": str(device),
                                                           "num_kv_blocks": num_blocks})
        while (inputs := plans.read()) is not None:
            if isinstance(inputs, DecodeStep):
                run_decode(runner, inputs, None, parallel.device_group)
            elif isinstance(inputs, MixedStep):
                replay_mixed(runner.mixed_graphs, inputs)
            else:
                runner.forward_logits(inputs)
    finally:
        plans.close()
        groups.destroy_groups()


def agree_num_blocks(num_blocks: int, parallel: groups.ParallelGroups) -> int:
    """The smallest of every rank's KV pool: the driver's block manager hands out block ids all ranks hold."""
    count = torch.tensor([num_blocks], dtype=torch.int64)
    dist.all_reduce(count, op=dist.ReduceOp.MIN, group=parallel.control_group)
    return int(count.item())


def _exit_with_driver(driver_pid: int) -> None:
    driver = DriverWatch(driver_pid)

    def watch() -> None:
        driver.exited(timeout_s=None)
        os._exit(1)

    threading.Thread(target=watch, name="serval-tp-driver-watch", daemon=True).start()
