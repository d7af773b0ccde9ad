"""A one-writer, many-reader broadcast through shared memory: how the driver hands each step's plan to the workers
of its host, instead of a gloo broadcast of a pickle (a size, then the bytes, over TCP) per step.

The segment (multiprocessing.shared_memory, created by the driver before it starts the workers) is a ring of
`num_slots` slots of `slot_bytes` each. A slot:

    [written][read by reader 0 .. R-1][padding to 8]  [kind: u8][length: u64]  [payload: slot_bytes]
     flags, one byte each                              the message             its pickle (kind INLINE)

The writer fills the slots in turn. Before reusing one it waits until every reader has read it; then it clears
`written`, writes the payload, clears the read flags, and sets `written` last, so a reader that sees `written` set
and its own flag clear sees the whole message. A reader reads its next slot in turn and sets its flag. A message
larger than a slot travels by the gloo broadcast it replaces: its slot says so (kind GLOO), and every rank then
takes part in that broadcast, in the ring's order.

Waiting. A reader waits for the driver's next plan for about a step (a worker's host runs ahead of its device), so
it first spins (os.sched_yield between looks) for SPIN_S; past that it sleeps SLEEP_S between looks, so an idle
engine's workers cost a wake-up a millisecond, not a core. The price: the first plan after more than SPIN_S of
idleness is seen up to SLEEP_S (plus the kernel's wake-up) late, once; steps that follow each other are seen at
once. The writer waits only when the readers are num_slots plans behind.

Failures. A waiting writer checks the readers' liveness (its caller's check) every CHECK_INTERVAL_S and gives up
after its timeout (COLLECTIVE_TIMEOUT_S in the executor); a waiting reader checks that the writer's process is
still there (serval.distributed.processes.DriverWatch: its pid, not the reader's parent, which may be a fork
server), and raises WriterGoneError when it is not. The writer's owner unlinks the segment at
shutdown or failure; if it is killed outright, multiprocessing's resource tracker (a process of its own, which
its spawned or fork-server children share) unlinks it.
"""
from __future__ import annotations

import os
import pickle
import secrets
import struct
import threading
import time
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Callable

import torch.distributed as dist

from serval.distributed.processes import DriverWatch

NUM_SLOTS = 8
SLOT_BYTES = 1 << 20  # a decode step's plan is a few kB; a long prefill's block tables fit too; past it, gloo
SEGMENT_PREFIX = "serval_tp_"
SPIN_S = 0.02  # longer than a step of a large batch on a GPU: back-to-back steps never reach the sleeps
SLEEP_S = 0.001
CHECK_INTERVAL_S = 0.1

_INLINE, _GLOO = 0, 1
_MESSAGE = struct.Struct("<BQ")  # kind, payload length


class WriterGoneError(RuntimeError):
    """The process that writes the queue (the driver) has exited: no message will come."""


@dataclass(frozen=True)
class ShmQueueSpec:
    """What a reader needs to attach: travels to the workers in WorkerArgs."""
    name: str
    num_readers: int
    num_slots: int
    slot_bytes: int
    writer_pid: int  # the readers watch it: when it exits no message will come

    @property
    def header_bytes(self) -> int:
        return -(-(1 + self.num_readers) // 8) * 8 + _MESSAGE.size

    @property
    def stride(self) -> int:
        return self.header_bytes + self.slot_bytes


def create_segment(num_readers: int, num_slots: int = NUM_SLOTS,
                   slot_bytes: int = SLOT_BYTES) -> tuple[shared_memory.SharedMemory, ShmQueueSpec]:
    """A new zeroed segment for a queue of num_readers readers, named after this process (SEGMENT_PREFIX, pid)."""
    name = f"{SEGMENT_PREFIX}{os.getpid()}_{secrets.token_hex(4)}"
    spec = ShmQueueSpec(name, num_readers, num_slots, slot_bytes, os.getpid())
    segment = shared_memory.SharedMemory(name=name, create=True, size=num_slots * spec.stride)
    segment.buf[:spec.num_slots * spec.stride] = bytes(spec.num_slots * spec.stride)
    return segment, spec


def release_segment(segment: shared_memory.SharedMemory) -> None:
    """Close and unlink the segment; a second call does nothing."""
    try:
        segment.close()
    except BufferError:  # a view into it still alive: the unlink below still frees the name
        pass
    try:
        segment.unlink()
    except FileNotFoundError:
        pass


class ShmBroadcastWriter:
    """The driver's end. `check_readers` raises when a reader's process has exited; write() calls it while it
    waits for a slot, and raises TimeoutError after timeout_s of waiting."""

    def __init__(self, segment: shared_memory.SharedMemory, spec: ShmQueueSpec,
                 fallback_group: dist.ProcessGroup | None, check_readers: Callable[[], None],
                 timeout_s: float) -> None:
        self.segment, self.spec = segment, spec
        self.fallback_group = fallback_group
        self.check_readers = check_readers
        self.timeout_s = timeout_s
        self.next_slot = 0
        self._fence = threading.Lock()  # acquire/release: a full memory barrier between the flag writes

    def write(self, message: object, timeout_s: float | None = None) -> None:
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        buf, spec = self.segment.buf, self.spec
        base = self.next_slot * spec.stride
        readers = range(base + 1, base + 1 + spec.num_readers)
        if buf[base] and not all(buf[flag] for flag in readers):
            limit_s = self.timeout_s if timeout_s is None else timeout_s
            deadline = time.monotonic() + limit_s

            def on_wait() -> None:
                self.check_readers()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"tensor-parallel workers read no step plan for {limit_s:g}s "
                                       "(SERVAL_DISTRIBUTED_TIMEOUT_S)")

            wait_until(lambda: all(buf[flag] for flag in readers), on_wait)
        buf[base] = 0
        inline = len(payload) <= spec.slot_bytes
        start = base + spec.header_bytes
        _MESSAGE.pack_into(buf, start - _MESSAGE.size, _INLINE if inline else _GLOO, len(payload))
        if inline:
            buf[start:start + len(payload)] = payload
        with self._fence:
            for flag in readers:
                buf[flag] = 0
        with self._fence:
            buf[base] = 1
        self.next_slot = (self.next_slot + 1) % spec.num_slots
        if not inline:
            dist.broadcast_object_list([message], src=0, group=self.fallback_group)


class ShmBroadcastReader:
    """A worker's end: reader `reader_index` (0 .. num_readers - 1) of the queue `spec` names."""

    def __init__(self, spec: ShmQueueSpec, reader_index: int, fallback_group: dist.ProcessGroup | None) -> None:
        self.spec = spec
        self.flag = 1 + reader_index
        self.fallback_group = fallback_group
        self.segment = shared_memory.SharedMemory(name=spec.name)
        self.writer = DriverWatch(spec.writer_pid)
        self.next_slot = 0
        self._fence = threading.Lock()

    def read(self) -> object:
        """The writer's next message; raises WriterGoneError once the writer's process has exited."""
        buf, spec = self.segment.buf, self.spec
        base = self.next_slot * spec.stride
        flag = base + self.flag
        if not (buf[base] and not buf[flag]):
            wait_until(lambda: buf[base] and not buf[flag], self._check_writer)
        with self._fence:
            start = base + spec.header_bytes
            kind, length = _MESSAGE.unpack_from(buf, start - _MESSAGE.size)
            message = pickle.loads(buf[start:start + length]) if kind == _INLINE else None
        with self._fence:
            buf[flag] = 1
        self.next_slot = (self.next_slot + 1) % spec.num_slots
        if kind == _GLOO:
            box = [None]
            dist.broadcast_object_list(box, src=0, group=self.fallback_group)
            message = box[0]
        return message

    def _check_writer(self) -> None:
        if self.writer.exited():
            raise WriterGoneError(f"the step plans' writer (pid {self.spec.writer_pid}) has exited")

    def close(self) -> None:
        self.segment.close()
        self.writer.close()


def wait_until(ready: Callable[[], bool], on_wait: Callable[[], None]) -> None:
    """Poll `ready`: spin for SPIN_S, then sleep SLEEP_S between looks; call `on_wait` (which may raise) every
    CHECK_INTERVAL_S."""
    start = time.monotonic()
    next_check = start + CHECK_INTERVAL_S
    while not ready():
        now = time.monotonic()
        if now - start < SPIN_S:
            os.sched_yield()
        else:
            time.sleep(SLEEP_S)
        if now >= next_check:
            on_wait()
            next_check = now + CHECK_INTERVAL_S
