"""torch.profiler over a serving engine, as vLLM's: SERVAL_TORCH_PROFILER_DIR (vLLM's VLLM_TORCH_PROFILER_DIR) names
where traces go; start_profile/stop_profile (LLM, the server's POST /start_profile and /stop_profile) bracket what
is traced; each stop writes one Chrome trace, <host>_<pid>.<time_ns>.pt.trace.json.gz, as torch's
tensorboard_trace_handler names them.

torch's profiler records the CPU ops of the thread that started it only, so EngineProfiler.start runs on the
engine's step thread (the engine loop, the engine-core process's main thread), as vLLM's worker starts it in its
busy loop. host_range marks an engine phase: a record_function range on that thread. The threads beside it (the
core's receiver and output threads, the grammar fill worker) are invisible to torch's profiler: their ranges are
timed here and written into the trace at stop, on their own thread rows, on the trace's clock (wall time).

When no profiler runs, host_range costs a global read and a no-op context (~0.1 us): record_function alone costs
~1-7 us even with no profiler, too much for the ten ranges of every step. The module flag is the one piece of
global state here: a range on any thread must see whether a profile is on without a reference to the engine.
"""
from __future__ import annotations

import gzip
import json
import os
import socket
import threading
import time
from contextlib import AbstractContextManager

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from serval.openai.errors import InvalidArgument

PROFILER_DIR_ENV = "SERVAL_TORCH_PROFILER_DIR"
# vLLM's VLLM_TORCH_PROFILER_RECORD_SHAPES and _WITH_STACK; both off here unless set to 1 (vLLM keeps stacks on):
# a 256-row step's trace grows by an order of magnitude with them.
RECORD_SHAPES_ENV = "SERVAL_TORCH_PROFILER_RECORD_SHAPES"
WITH_STACK_ENV = "SERVAL_TORCH_PROFILER_WITH_STACK"
TRACE_SUFFIX = ".pt.trace.json.gz"


class _NoRange(AbstractContextManager):
    def __exit__(self, *exc) -> None:
        return None


_NO_RANGE = _NoRange()


class _TimedRange(AbstractContextManager):
    """A range on a thread torch's profiler does not record: (name, native thread id, start ns, end ns)."""
    __slots__ = ("name", "start_ns", "sink")

    def __init__(self, name: str, sink: list) -> None:
        self.name, self.sink = name, sink

    def __enter__(self) -> "_TimedRange":
        self.start_ns = time.time_ns()
        return self

    def __exit__(self, *exc) -> None:
        self.sink.append((self.name, threading.get_native_id(), threading.current_thread().name, self.start_ns,
                          time.time_ns()))


class _Recording:
    def __init__(self, thread_id: int) -> None:
        self.thread_id = thread_id  # threading.get_ident() of the profiled (step) thread
        self.off_thread: list = []  # _TimedRange's tuples; list.append is atomic under the GIL


_recording: _Recording | None = None


def host_range(name: str) -> AbstractContextManager:
    """`with host_range("serval.schedule"):` marks a host phase in the trace while a profile runs."""
    recording = _recording
    if recording is None:
        return _NO_RANGE
    if threading.get_ident() == recording.thread_id:
        return record_function(name)
    return _TimedRange(name, recording.off_thread)


def profiler_dir() -> str | None:
    return os.environ.get(PROFILER_DIR_ENV) or None


class EngineProfiler:
    """One engine's profile: start and stop it on the engine's step thread."""

    def __init__(self) -> None:
        self._profile: profile | None = None
        self._trace_dir: str | None = None

    @property
    def running(self) -> bool:
        return self._profile is not None

    def start(self, trace_dir: str | None = None) -> None:
        global _recording
        trace_dir = trace_dir or profiler_dir()
        if trace_dir is None:
            raise InvalidArgument(None, f"the profiler is off: set {PROFILER_DIR_ENV} to the directory for its "
                                        "traces before starting the engine")
        if self._profile is not None or _recording is not None:
            raise InvalidArgument(None, "the profiler is already running; POST /stop_profile (stop_profile()) "
                                        "first")
        os.makedirs(trace_dir, exist_ok=True)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self._profile = profile(activities=activities, record_shapes=os.environ.get(RECORD_SHAPES_ENV) == "1",
                                with_stack=os.environ.get(WITH_STACK_ENV) == "1")
        self._profile.start()
        self._trace_dir = trace_dir
        _recording = _Recording(threading.get_ident())

    def stop(self) -> str:
        """Stop and write the trace; returns its path."""
        global _recording
        if self._profile is None:
            raise InvalidArgument(None, "the profiler is not running; POST /start_profile (start_profile()) first")
        recording, _recording = _recording, None
        prof, self._profile = self._profile, None
        prof.stop()
        name = f"{socket.gethostname()}_{os.getpid()}.{time.time_ns()}"
        raw_path = os.path.join(self._trace_dir, name + ".tmp.json")
        prof.export_chrome_trace(raw_path)
        path = os.path.join(self._trace_dir, name + TRACE_SUFFIX)
        with open(raw_path) as f:
            trace = json.load(f)
        trace["traceEvents"].extend(_off_thread_events(recording.off_thread, trace))
        # Level 1: a trace of 256-row GPU steps can be tens of MB, written while the step loop waits.
        with gzip.open(path + ".tmp", "wt", compresslevel=1) as f:  # renamed when whole: never read half-written
            json.dump(trace, f)
        os.replace(path + ".tmp", path)
        os.remove(raw_path)
        return path


def _off_thread_events(ranges: list, trace: dict) -> list[dict]:
    """The off-thread ranges as the trace's own events: ts in us from the trace's baseTimeNanoseconds (Kineto's
    events are wall-clock times less that base)."""
    base_us = trace.get("baseTimeNanoseconds", 0) / 1e3
    pid = os.getpid()
    events, names = [], {}
    for name, tid, thread_name, start_ns, end_ns in ranges:
        names[tid] = thread_name
        events.append({"ph": "X", "cat": "user_annotation", "name": name, "pid": pid, "tid": tid,
                       "ts": start_ns / 1e3 - base_us, "dur": (end_ns - start_ns) / 1e3})
    events += [{"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": thread_name}}
               for tid, thread_name in names.items()]
    return events
