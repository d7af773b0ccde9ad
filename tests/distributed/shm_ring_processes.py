"""What the processes of tests/distributed/test_shm_broadcast.py run: readers of the ring and a writer that dies.

Apart from the test module so that a spawned process imports torch and the ring only, not the test module's
engine, transformers and fixtures (seconds a process, on every spawn)."""
from __future__ import annotations

import time

import torch

from serval.distributed import group as groups
from serval.distributed.processes import start_context
from serval.distributed.shm_broadcast import (ShmBroadcastReader, ShmBroadcastWriter, WriterGoneError,
                                              create_segment)

NUM_SLOTS, SLOT_BYTES = 4, 4096
# Bounds on waiting for another process's reaction, not timings: each passes in well under a second when it works.
DEADLINE_S = 60.0


def read_all(spec, rank: int, port: int, results) -> None:
    """A reader process: join the gloo group (for the big messages), read until None, send back what came."""
    store = groups.open_store(rank, spec.num_readers + 1, port)
    parallel = groups.init_groups(store, rank, spec.num_readers + 1, torch.device("cpu"))
    reader = ShmBroadcastReader(spec, rank - 1, parallel.control_group)
    received = []
    while (message := reader.read()) is not None:
        received.append(message)
    results.put((rank, received))
    reader.close()
    groups.destroy_groups()


def read_one_then_hang(spec, ready) -> None:
    reader = ShmBroadcastReader(spec, 0, None)
    reader.read()
    ready.set()
    time.sleep(3600)


def read_until_the_writer_goes(spec, marker: str) -> None:
    reader = ShmBroadcastReader(spec, 0, None)
    try:
        while True:
            reader.read()
    except WriterGoneError as error:
        with open(marker, "w") as f:
            f.write(type(error).__name__)


def write_then_wait(marker: str, reader_pid, segment_name) -> None:
    """A writer process with its own reader child: one message, then it waits to be killed."""
    segment, spec = create_segment(1, NUM_SLOTS, SLOT_BYTES)
    segment_name.put(spec.name)
    # From the fork server, as the engine's workers: the reader's parent is not the writer.
    reader = start_context().Process(target=read_until_the_writer_goes, args=(spec, marker))
    reader.start()
    reader_pid.put(reader.pid)
    ShmBroadcastWriter(segment, spec, None, lambda: None, DEADLINE_S).write("hello")
    time.sleep(3600)
