"""AsyncEngine: the engine behind the server. One background thread drives step(); each request's
outputs reach its caller through its own asyncio queue.

A thread rather than an asyncio task because a step is seconds of torch work on CPU: the event loop
must stay free to accept connections and stream. torch releases the GIL inside its kernels. Requests
and aborts reach the loop thread through an inbox, so the engine's state has a single writer.

Two things keep the frontend from slowing the engine where they share the CPU cores:
- a step's outputs go to the event loop in one hand-off, and on CPU the engine waits (briefly) until the loop
  has taken them before it starts the next step. torch's intra-op threads occupy every core during a step; an
  event loop that wakes in the middle of one to stream tokens preempts one of them, and the others wait for it
  at the op's barrier. Doing that work between steps costs the same CPU and stalls nothing.
- when the engine goes from idle to busy it gathers the requests arriving together (a burst of clients, one
  request parsed after another by the server) before its first step, for at most a small fraction of a step,
  rather than prefilling the first arrival alone and making the rest wait a whole step for theirs.

On a GPU the loop thread queues work and waits for the device; every torch call it makes releases the GIL and
must take it back. While the event loop streams to hundreds of clients it holds the GIL, and by default Python
hands it over only every 5 ms: a py-spy profile of 256 tool-calling streams on an H200 found the loop thread in
such waits at every torch call of the constrained sampler. So a GPU engine lowers the interpreter's switch interval
to ENGINE_SWITCH_INTERVAL_S.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from serval.config import EngineConfig
from serval.engine.engine import EngineStats, LLMEngine
from serval.engine.input_processor import PromptType
from serval.engine.output_processor import RequestState
from serval.engine.pooling import PoolingRequestOutput
from serval.lora.request import LoRARequest
from serval.openai.errors import InvalidArgument
from serval.outputs import RequestOutput
from serval.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _Stream:
    """Where the loop thread puts one request's outputs: a queue on its caller's event loop."""
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class EngineDeadError(RuntimeError):
    """The engine loop has stopped; no request can be served until the process restarts."""


class RequestFailedError(RuntimeError):
    """This request ended with an error inside the engine (a step that held it failed, or its grammar could not
    go on); its output is not to be trusted. The engine goes on serving other requests. The message is safe to
    show a client: the cause is logged, not carried."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"request {request_id} failed inside the engine and was stopped; other requests are "
                         "unaffected")
        self.request_id = request_id


class RequestStream:
    """One request's outputs as an async iterator: cumulative RequestOutputs, the last with finished=True; an
    error for this request (or the engine's death) is raised from the iteration. Closing it before the end
    (aclose(), leaving `async with aclosing(stream)`, a cancelled wait, or dropping it unread) aborts the
    request and frees its blocks."""

    def __init__(self, engine: "AsyncEngine", request_id: str, stream: _Stream) -> None:
        self.request_id = request_id
        self._engine = engine
        self._stream = stream
        self._done = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._stream.queue.get()
        except BaseException:  # cancelled while waiting: the caller is gone
            self.close()
            raise
        if isinstance(item, BaseException):
            self._done = True
            raise item
        self._done = item.finished
        return item

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._engine.abort(self.request_id)

    def __del__(self) -> None:
        # The garbage collector may run this anywhere, even inside a lock's holder: only the inbox (a
        # SimpleQueue, safe here) is touched, and the loop thread does the rest.
        if not self._done:
            self._done = True
            self._engine._inbox.put(("drop", (self.request_id, self._stream)))


# Gathering a burst of arrivals: keep waiting while requests arrive within this fraction of a step's time (a
# moving average) of each other, at most _MAX_ARRIVAL_GAP_S, and no longer than _ARRIVAL_WINDOW_STEPS steps in
# all. On CPU a step is a few hundred ms (gaps of 20 ms); on a GPU ~10 ms (gaps of 1 ms).
ENGINE_SWITCH_INTERVAL_S = 0.0005
_ARRIVAL_GAP_FRACTION = 0.1
_MAX_ARRIVAL_GAP_S = 0.02
_ARRIVAL_WINDOW_STEPS = 0.25
_STEP_TIME_SMOOTHING = 0.2


class ArrivalGate:
    """When the engine goes from idle to busy: take in the requests arriving together before the first step (the
    module docstring says why). Used by the loop thread here and by the engine-core process's step loop."""

    def __init__(self) -> None:
        self.step_s = 0.0  # moving average of a step's time

    def observe_step(self, seconds: float) -> None:
        self.step_s += _STEP_TIME_SMOOTHING * (seconds - self.step_s)

    def gather(self, inbox: queue.SimpleQueue, handle) -> None:
        """Pass each (kind, payload) arriving in the window to handle."""
        gap = min(_MAX_ARRIVAL_GAP_S, _ARRIVAL_GAP_FRACTION * self.step_s)
        deadline = time.monotonic() + _ARRIVAL_WINDOW_STEPS * self.step_s
        while (remaining := deadline - time.monotonic()) > 0 and gap > 0:
            try:
                kind, payload = inbox.get(timeout=min(gap, remaining))
            except queue.Empty:
                return
            handle(kind, payload)


# How long a CPU engine waits for the event loop to take a step's outputs (it is not worth more than this).
_HANDOFF_TIMEOUT_S = 0.05


class AsyncEngine:
    """The server's view of the engine: add_request → a RequestStream, abort, and public questions (is_dead,
    errored, num_waiting, num_running, get_stats). Nothing else is the server's business."""

    def __init__(self, config: EngineConfig) -> None:
        self.engine = LLMEngine(config)
        self.config = self.engine.config
        self.tokenizer = self.engine.tokenizer
        self.core_pid: int | None = None  # the engine runs in this process (EngineCoreClient: in its own)
        self._streams: dict[str, _Stream] = {}
        self._streams_lock = threading.Lock()
        # ("add", RequestState) | ("abort", id) | ("drop", (id, _Stream)) | ("call", (Future, function, args))
        # | ("stop", None)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._num_in_inbox = 0  # sequences accepted by add_request that the loop thread has not scheduled yet
        self._stopped = threading.Event()
        self._dead: BaseException | None = None
        self._ids = itertools.count()
        self._yield_between_steps = self.engine.device.type == "cpu"
        if self.engine.device.type == "cuda":
            sys.setswitchinterval(min(sys.getswitchinterval(), ENGINE_SWITCH_INTERVAL_S))
        self._arrivals = ArrivalGate()
        self._thread = threading.Thread(target=self._loop, name="serval-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, **kwargs) -> "AsyncEngine":
        return cls(EngineConfig.from_kwargs(**kwargs))

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None,
                    priority: int = 0, lora_request: LoRARequest | None = None) -> RequestStream:
        """Validate the request now, queue it, and return its output stream. Call it on the event loop that
        will read the stream. Raises InvalidArgument (nothing is queued) for bad input or a request id that is
        already running, EngineDeadError if the engine has stopped."""
        if self._dead is not None:
            raise _dead_error(self._dead)
        state = self.engine.process_inputs(request_id, prompt, params, priority, lora_request=lora_request)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._streams_lock:
            if request_id in self._streams:
                raise InvalidArgument(None, f"invalid request_id {request_id!r}: a request with this id is "
                                            "already running")
            self._streams[request_id] = stream
            self._num_in_inbox += len(state.requests)
        self._inbox.put(("add", state))
        return RequestStream(self, request_id, stream)

    async def generate(self, prompt: PromptType, sampling_params: SamplingParams | None = None,
                       request_id: str | None = None, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """add_request as an async generator (vLLM's form): yields the request's cumulative outputs."""
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        async with aclosing(self.add_request(request_id, prompt, sampling_params, priority)) as stream:
            async for output in stream:
                yield output

    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Read and check an adapter into host memory (blocking: call it off the event loop); InvalidArgument if
        it is bad. The engine loop goes on stepping meanwhile."""
        return self.engine.add_lora(lora_request)

    def remove_lora(self, lora_int_id: int) -> bool:
        """Forget an adapter; requests already holding it finish with it."""
        return self.engine.remove_lora(lora_int_id)

    def abort(self, request_id: str) -> None:
        with self._streams_lock:
            self._streams.pop(request_id, None)
        self._inbox.put(("abort", request_id))

    def start_profile(self, trace_dir: str | None = None) -> None:
        """Start torch's profiler on the loop thread (LLMEngine.start_profile; blocking: call it off the event
        loop)."""
        self._on_loop_thread(self.engine.start_profile, trace_dir)

    def stop_profile(self) -> str:
        """Stop the profile; returns the path of the trace written."""
        return self._on_loop_thread(self.engine.stop_profile)

    def _on_loop_thread(self, function, *args):
        if self._dead is not None:
            raise _dead_error(self._dead)
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("call", (future, function, args)))
        return future.result()

    def warm_grammar_compiler(self) -> None:
        """Build the vocabulary's grammar view now, not under the GIL of a serving process at the first
        constrained request (a second or more for a large vocabulary)."""
        self.engine.grammar_compiler().ll_tokenizer

    def prepare_sampling(self, params):
        """InputProcessor.prepare_sampling: the server calls it on a worker thread before add_request."""
        return self.engine.input_processor.prepare_sampling(params)

    @property
    def is_dead(self) -> bool:
        """True once the loop thread has stopped for good (errored says why); requests are then refused."""
        return self._dead is not None

    @property
    def errored(self) -> BaseException | None:
        """The exception that stopped the engine loop, or None while it runs."""
        return self._dead

    @property
    def num_waiting(self) -> int:
        """Sequences accepted but not running: those in the scheduler's queue and those on their way to it."""
        return self.engine.scheduler.num_waiting + self._num_in_inbox

    @property
    def num_running(self) -> int:
        return self.engine.scheduler.num_running

    @property
    def pooling_task(self) -> str | None:
        """"embed" or "classify" for a pooling engine (--runner pooling); None for a generative one."""
        return self.engine.pooling_task

    def instruction_prefix(self, prompt_name: str | None) -> str:
        """The pooling model's instruction text for prompt_name (LLMEngine.instruction_prefix)."""
        return self.engine.instruction_prefix(prompt_name)

    def memory_usage(self):
        """Bytes of weights and KV cache (serval.engine.memory.MemoryUsage), for the server's banner."""
        return self.engine.memory_usage()

    def get_stats(self) -> EngineStats:
        stats = self.engine.get_stats()
        return dataclasses.replace(stats, num_requests_waiting=stats.num_requests_waiting + self._num_in_inbox)

    @property
    def num_unfinished_requests(self) -> int:
        """Requests whose stream is still open (kept for the current server)."""
        with self._streams_lock:
            return len(self._streams)

    def shutdown(self) -> None:
        self._stopped.set()
        self._inbox.put(("stop", None))
        self._thread.join(timeout=10)
        self.engine.shutdown()  # tensor-parallel workers stop with the engine, not at interpreter exit

    # ---- the loop thread ----
    def _loop(self) -> None:
        try:
            while not self._stopped.is_set():
                idle = not self.engine.has_unfinished_requests()
                self._drain_inbox(block=idle)
                if idle and self.engine.has_unfinished_requests():
                    self._arrivals.gather(self._inbox, self._handle)
                if self.engine.has_unfinished_requests():
                    started = time.monotonic()
                    outputs = self.engine.step()
                    self._arrivals.observe_step(time.monotonic() - started)
                    self._deliver_step(outputs)
        except BaseException as error:  # the engine is broken: fail every waiting caller, loudly
            logger.exception("engine loop died")
            self._dead = error
            with self._streams_lock:
                streams, self._streams = self._streams, {}
            for stream in streams.values():
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, _dead_error(error))
            self._fail_calls(error)

    def _fail_calls(self, error: BaseException) -> None:
        """Calls waiting for a loop thread that will not run them again."""
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "call":
                payload[0].set_exception(_dead_error(error))

    def _drain_inbox(self, block: bool) -> None:
        while True:
            try:
                kind, payload = self._inbox.get(block=block, timeout=None)
            except queue.Empty:
                return
            block = False
            self._handle(kind, payload)

    def _handle(self, kind: str, payload) -> None:
        if kind == "add":
            self._add(payload)
        elif kind == "abort":
            self.engine.abort_request(payload)
        elif kind == "drop":  # a stream nobody holds any more; its id may already belong to a newer request
            request_id, stream = payload
            with self._streams_lock:
                if self._streams.get(request_id) is not stream:
                    return
                del self._streams[request_id]
            self.engine.abort_request(request_id)
        elif kind == "call":
            future, function, args = payload
            try:
                future.set_result(function(*args))
            except Exception as error:  # noqa: BLE001 - the caller raises it
                future.set_exception(error)

    def _add(self, state: RequestState) -> None:
        try:
            with self._streams_lock:
                if state.request_id not in self._streams:
                    return  # aborted before it reached the engine
            try:
                self.engine.add_processed(state)
            except ValueError as error:
                self._deliver(state.request_id, error, last=True)
        finally:
            # Counted out only once the scheduler counts it: num_waiting may count a request twice for a moment,
            # never zero times.
            with self._streams_lock:
                self._num_in_inbox -= len(state.requests)

    def _deliver_step(self, outputs: list[RequestOutput]) -> None:
        """Every output of a step to its caller's queue: one hand-off per event loop (see the module docstring)."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput | Exception]]] = {}
        with self._streams_lock:
            for output in outputs:
                stream = (self._streams.pop(output.request_id, None) if output.finished
                          else self._streams.get(output.request_id))
                if stream is not None:
                    item = RequestFailedError(output.request_id) if _failed(output) else output
                    batches.setdefault(stream.loop, []).append((stream.queue, item))
        handed_off = []
        for loop, items in batches.items():
            done = threading.Event() if self._yield_between_steps else None
            try:
                loop.call_soon_threadsafe(_put_all, loop, items, done)
            except RuntimeError:  # that caller's loop has closed: nobody is waiting for these
                continue
            if done is not None:
                handed_off.append(done)
        for done in handed_off:
            done.wait(_HANDOFF_TIMEOUT_S)

    def _deliver(self, request_id: str, item, last: bool) -> None:
        with self._streams_lock:
            stream = self._streams.pop(request_id, None) if last else self._streams.get(request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)


def start_engine(config: EngineConfig):
    """The server's engine: EngineCoreClient (the step loop in its own process) when engine_process_enabled,
    else AsyncEngine (a thread of this one). Both answer the same calls."""
    if engine_process_enabled(config):
        from serval.engine.core_client import EngineCoreClient
        return EngineCoreClient(config)
    return AsyncEngine(config)


def engine_process_enabled(config: EngineConfig) -> bool:
    """engine_process, or where it is None (auto): the SERVAL_ENGINE_PROCESS environment variable ("1" or "0",
    as vLLM's VLLM_ENABLE_V1_MULTIPROCESSING), else on for a CUDA device and off on CPU. On a GPU the engine
    thread waits for the GIL behind the event loop; on CPU the step's torch threads already use every core, and a
    second process only adds the copy of every output."""
    if config.engine_process is not None:
        return config.engine_process
    forced = os.environ.get("SERVAL_ENGINE_PROCESS")
    if forced in ("0", "1"):
        return forced == "1"
    return config.torch_device().type == "cuda"


def _dead_error(cause: BaseException) -> EngineDeadError:
    # The message goes to clients: the cause is logged and chained, not quoted.
    error = EngineDeadError("the engine has stopped after an internal error; the server needs a restart")
    error.__cause__ = cause
    return error


def _failed(output: RequestOutput) -> bool:
    if isinstance(output, PoolingRequestOutput):
        return output.finish_reason == "error"
    return output.finished and any(completion.finish_reason == "error" for completion in output.outputs)


def _put_all(loop: asyncio.AbstractEventLoop, items: list[tuple[asyncio.Queue, RequestOutput | Exception]],
             done: threading.Event | None) -> None:
    """On the event loop: queue each output; then, once the streams they woke have run, set done."""
    for stream_queue, item in items:
        stream_queue.put_nowait(item)
    if done is not None:
        loop.call_soon(done.set)
