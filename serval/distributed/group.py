"""Process groups for tensor parallelism: the checks made before anything starts, the rendezvous, the groups.

Rank 0 (the engine process) hosts a TCPStore on a free local port that the kernel picks (port 0), so there is
no race for a port; the workers it spawns connect to it. Two groups come out of the rendezvous:
- the device group (the default group): the model's all-reduces and gathers. NCCL on GPUs, gloo on CPU. Its
  timeout bounds how long a hung rank can stall a step before the engine declares itself dead.
- the control group (gloo, on the host): the driver's broadcast of each step's inputs. A worker waits in it
  while the server is idle, so its timeout is effectively infinite; a driver that dies closes its sockets and
  the worker's wait fails at once.
"""
from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from serval.openai.errors import InvalidArgument

LOCALHOST = "127.0.0.1"
# How long a collective may wait for a rank that stopped answering (a hung worker) before it fails.
COLLECTIVE_TIMEOUT_S = float(os.environ.get("SERVAL_DISTRIBUTED_TIMEOUT_S", "120"))
# How long the workers may take to start (spawned Pythons importing torch) and join the rendezvous.
START_TIMEOUT_S = float(os.environ.get("SERVAL_DISTRIBUTED_START_TIMEOUT_S", "600"))
_IDLE_TIMEOUT = datetime.timedelta(days=365)
_JOINED_KEY = "serval/joined/{rank}"


@dataclass
class ParallelGroups:
    rank: int
    world_size: int
    device_group: dist.ProcessGroup  # the model's collectives
    control_group: dist.ProcessGroup  # gloo: the step inputs' broadcast


def check_devices(tensor_parallel_size: int, device: torch.device) -> None:
    """Raise InvalidArgument when more ranks are asked for than this host has devices (GPUs, or CPU cores)."""
    available = torch.cuda.device_count() if device.type == "cuda" else (os.cpu_count() or 1)
    kind = "CUDA devices" if device.type == "cuda" else "CPU cores"
    if tensor_parallel_size > available:
        raise InvalidArgument("tensor_parallel_size", f"invalid engine argument tensor_parallel_size="
                                                      f"{tensor_parallel_size}: this host has {available} {kind}")
    if device.type == "cuda" and device.index not in (None, 0):
        raise InvalidArgument("device", f"invalid engine argument device={device}: with tensor parallelism rank r "
                                        "runs on cuda:r; choose the devices with CUDA_VISIBLE_DEVICES")


def rank_device(device: torch.device, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device.type == "cuda" else device


def open_store(rank: int, world_size: int, port: int = 0) -> dist.TCPStore:
    """Rank 0: a new store on a free port (store.port); the others: a connection to rank 0's."""
    return dist.TCPStore(LOCALHOST, port, world_size, rank == 0, timeout=datetime.timedelta(seconds=START_TIMEOUT_S),
                         wait_for_workers=False)


def announce_joined(store: dist.TCPStore, rank: int) -> None:
    store.set(_JOINED_KEY.format(rank=rank), "1")


def wait_joined(store: dist.TCPStore, processes: list) -> None:
    """Block until every worker has reached the rendezvous; raise naming the first that exited on the way."""
    from serval.distributed import WorkerFailedError

    keys = [_JOINED_KEY.format(rank=rank) for rank in range(1, len(processes) + 1)]
    deadline = time.monotonic() + START_TIMEOUT_S
    while not store.check(keys):
        for rank, process in enumerate(processes, start=1):
            if not process.is_alive():
                raise WorkerFailedError(f"tensor-parallel worker rank {rank} exited during start (exit code "
                                        f"{process.exitcode}); its error is in the log above")
        if time.monotonic() > deadline:
            raise WorkerFailedError(f"tensor-parallel workers did not start within {START_TIMEOUT_S:.0f}s "
                                    "(SERVAL_DISTRIBUTED_START_TIMEOUT_S)")
        time.sleep(0.05)


def init_groups(store: dist.TCPStore, rank: int, world_size: int, device: torch.device) -> ParallelGroups:
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    control_group = dist.new_group(backend="gloo", timeout=_IDLE_TIMEOUT)
    return ParallelGroups(rank, world_size, dist.group.WORLD, control_group)


def destroy_groups() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
