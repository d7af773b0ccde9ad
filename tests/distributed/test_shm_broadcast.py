"""The shared-memory ring of step plans (serval.distributed.shm_broadcast) across processes: every reader
gets every message in order, past many laps of the ring, with messages bigger than a slot sent by gloo in their
place; a reader that hangs or dies gives the writer a bounded error; readers of a writer that dies exit; and a
tensor-parallel engine whose worker is killed leaves no segment in /dev/shm."""
from __future__ import annotations

import os
import signal
import time
from multiprocessing import shared_memory

import pytest
import torch

from serval import LLM, SamplingParams
from serval.distributed import WorkerFailedError
from serval.distributed import group as groups
from serval.distributed.processes import start_context
from serval.distributed.shm_broadcast import SEGMENT_PREFIX, ShmBroadcastWriter, create_segment, release_segment
from serval.distributed.steps import DecodeStep
from tests.conftest import build_tiny_model
from tests.distributed.shm_ring_processes import (DEADLINE_S, NUM_SLOTS, SLOT_BYTES, read_all, read_one_then_hang,
                                                  write_then_wait)


def messages() -> list[object]:
    """Five laps of a four-slot ring: DecodeStep plans, plain values, and two messages too big for a slot."""
    out: list[object] = []
    for i in range(20):
        out.append(DecodeStep([i] * 4, [i, i + 1, i + 2, i + 3], list(range(4)), [i + 1] * 4,
                              [[0, 1, 2]] * 4, graph_batch=i % 3))
        if i in (3, 11):
            out.append(bytes([i]) * (3 * SLOT_BYTES))  # past a slot: gloo
        out.append({"step": i})
    return out


def test_every_reader_gets_every_message_in_order_past_many_laps():
    context = start_context()
    num_readers = 2
    segment, spec = create_segment(num_readers, NUM_SLOTS, SLOT_BYTES)
    store = groups.open_store(0, num_readers + 1)
    results = context.Queue()
    readers = [context.Process(target=read_all, args=(spec, rank, store.port, results), daemon=True)
               for rank in range(1, num_readers + 1)]
    for process in readers:
        process.start()
    try:
        parallel = groups.init_groups(store, 0, num_readers + 1, torch.device("cpu"))
        writer = ShmBroadcastWriter(segment, spec, parallel.control_group, lambda: None, DEADLINE_S)
        sent = messages()
        for message in sent + [None]:
            writer.write(message)
        received = dict(results.get(timeout=DEADLINE_S) for _ in readers)
        assert received == {rank: sent for rank in range(1, num_readers + 1)}
        assert writer.next_slot == (len(sent) + 1) % NUM_SLOTS
    finally:
        groups.destroy_groups()
        release_segment(segment)
        for process in readers:
            process.join(timeout=DEADLINE_S)
            process.kill()


def test_a_reader_that_hangs_or_dies_gives_the_writer_a_bounded_error():
    context = start_context()
    segment, spec = create_segment(1, NUM_SLOTS, SLOT_BYTES)
    ready = context.Event()
    reader = context.Process(target=read_one_then_hang, args=(spec, ready), daemon=True)
    reader.start()

    def check_readers() -> None:
        if not reader.is_alive():
            raise WorkerFailedError(f"reader exited with code {reader.exitcode}")

    try:
        writer = ShmBroadcastWriter(segment, spec, None, check_readers, timeout_s=0.5)
        writer.write("first")
        assert ready.wait(DEADLINE_S)
        for i in range(NUM_SLOTS):  # the ring's other slots, then "first"'s again, which was read: no wait
            writer.write(i)
        with pytest.raises(TimeoutError, match=r"read no step plan for 0.5s"):
            writer.write("over slot 1, unread")  # a hung reader: the timeout
        reader.kill()
        reader.join(DEADLINE_S)
        writer.timeout_s = DEADLINE_S
        with pytest.raises(WorkerFailedError, match=f"exited with code {-signal.SIGKILL}"):
            writer.write("again")  # a dead reader: its exit, long before the timeout
    finally:
        reader.kill()
        release_segment(segment)


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_readers_of_a_writer_that_dies_exit(tmp_path):
    context = start_context()
    marker = str(tmp_path / "reader-exit")
    reader_pid, segment_name = context.Queue(), context.Queue()
    writer = context.Process(target=write_then_wait, args=(marker, reader_pid, segment_name))  # it has a child
    writer.start()
    name, pid = segment_name.get(timeout=DEADLINE_S), reader_pid.get(timeout=DEADLINE_S)
    try:
        time.sleep(0.5)  # let the reader take "hello" and settle into its idle wait (the sleeping phase)
        assert running(pid) and not os.path.exists(marker)
        os.kill(writer.pid, signal.SIGKILL)
        writer.join(DEADLINE_S)
        deadline = time.monotonic() + DEADLINE_S
        while running(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not running(pid)
        with open(marker) as f:
            assert f.read() == "WriterGoneError"
    finally:
        if running(pid):
            os.kill(pid, signal.SIGKILL)
        try:  # the killed writer's segment: this process's resource tracker would unlink it at exit
            release_segment(shared_memory.SharedMemory(name=name))
        except FileNotFoundError:
            pass


def our_segments() -> list[str]:
    return [name for name in os.listdir("/dev/shm") if name.startswith(f"{SEGMENT_PREFIX}{os.getpid()}_")]


def test_a_killed_worker_leaves_no_segment(tmp_path):
    build_tiny_model(tmp_path, "llama")
    llm = LLM(model=str(tmp_path), skip_tokenizer_init=True, tensor_parallel_size=2, max_model_len=64,
              num_gpu_blocks_override=32, block_size=4)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    try:
        output = llm.generate([{"prompt_token_ids": [5, 6, 7]}], params, use_tqdm=False)[0]
        assert len(output.outputs[0].token_ids) == 4
        assert len(our_segments()) == 1
        worker = llm.engine.executor.processes[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(DEADLINE_S)
        with pytest.raises(WorkerFailedError):
            llm.generate([{"prompt_token_ids": [5, 6, 7]}], params, use_tqdm=False)
        assert our_segments() == []
    finally:
        llm.shutdown()
    assert our_segments() == [] and not worker.is_alive()
