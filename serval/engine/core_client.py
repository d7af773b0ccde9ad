"""EngineCoreClient: the AsyncEngine interface in the API process, with the engine's step loop in a process of its
own (serval.engine.core_process; vLLM V1's AsyncLLM in front of EngineCore).

Why a process: an engine thread shares the GIL with the event loop, which needs tens of microseconds of it per
streamed delta. With hundreds of streams the loop holds it for a third of a GPU step, and the engine thread waits
behind it at every torch call (a py-spy profile of 256 tool-calling streams on an H200 showed it). Two processes,
two GILs: the core steps while the event loop streams.

What runs where:
- here: the tokenizer (templates, prompts, the server's logprob text) and the input processor's checks, so
  add_request refuses bad input at once, as AsyncEngine does; one thread sends, one reads. The reader unpickles
  each step's message once, rebuilds the cumulative RequestOutputs from their deltas, and hands them to each
  event loop in one call.
- in the core: LLMEngine (scheduler, model, sampler, grammars, detokenization, LoRA adapters) and its stats,
  which come with every step's message; /metrics reads the latest.

If the core dies, the reader sees the connection close: the engine is dead (EngineDeadError for every stream and
every new request, /health 503).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import logging
import multiprocessing
import queue
import threading
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

import torch

from serval.config import EngineConfig
from serval.distributed.processes import new_process, portable_log_formatter
from serval.engine import core_messages as messages
from serval.engine.async_engine import RequestFailedError, RequestStream, _dead_error, _failed, _put_all, _Stream
from serval.engine.core_process import CoreArgs, core_main
from serval.engine.engine import EngineStats
from serval.engine.input_processor import InputProcessor, PromptType
from serval.engine.profiler import profiler_dir
from serval.lora.request import LoRARequest
from serval.openai.errors import InvalidArgument
from serval.outputs import RequestOutput
from serval.pooling_params import PoolingParams
from serval.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# How long shutdown waits for the core to stop its workers and exit before it terminates it.
_SHUTDOWN_TIMEOUT_S = 15.0


class EngineCoreClient:
    """The server's view of an engine running in another process: the same public questions as AsyncEngine."""

    def __init__(self, config: EngineConfig) -> None:
        self._connection, core_end = multiprocessing.Pipe(duplex=True)
        root = logging.getLogger()
        # Not daemonic: a daemonic process may not start the tensor-parallel workers. The core exits with us
        # instead (its connection closes), and shutdown() stops it. CUDA and threads here: a fork of the fork
        # server, never of this process.
        self._process = new_process(core_main, (CoreArgs(core_end, config, root.getEffectiveLevel(),
                                                         portable_log_formatter()),),
                                    name="serval-engine-core", daemon=False)
        self._process.start()
        core_end.close()  # ours closed, the core's end is its only one: its exit reads as EOF here
        ready = self._wait_ready()
        self.core_pid = ready.pid
        self.config = ready.config
        self._ready = ready
        self.tokenizer = _load_tokenizer(ready) if ready.has_tokenizer else None
        self._input_processor = InputProcessor(ready.config, self.tokenizer, ready.vocab_size, ready.eos_token_id,
                                               torch.device("cpu"))
        self._stats: EngineStats = ready.stats
        self._num_sent = 0  # sequences sent to the core; the core reports how many it has taken in
        self._num_added = 0
        self._streams: dict[str, _Stream] = {}
        self._streams_lock = threading.Lock()
        self._decoder = messages.OutputDecoder()
        self._forget: queue.SimpleQueue = queue.SimpleQueue()  # aborted ids the reader drops its state for
        self._calls: dict[int, concurrent.futures.Future] = {}
        self._call_ids = itertools.count()
        self._ids = itertools.count()
        self._dead: BaseException | None = None
        self._closing = False  # shutdown() asked the core to stop: its exit is no failure
        # What goes to the core: ("send", message) | ("drop", (id, _Stream)) | ("stop", None). A queue and a
        # thread, so add_request on the event loop neither pickles nor writes to the pipe.
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="serval-core-sender", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name="serval-core-reader", daemon=True)
        self._sender.start()
        self._reader.start()
        logger.info("engine core process started", extra={"core_pid": self.core_pid, "model": self.config.model})

    def _wait_ready(self) -> messages.CoreReady:
        while not self._connection.poll(0.5):
            if not self._process.is_alive():
                raise RuntimeError(f"the engine core process exited with code {self._process.exitcode} while "
                                   "starting (out of memory?); see its log above")
        try:
            reply = messages.loads(self._connection.recv_bytes())[0]
        except (EOFError, OSError):
            self._process.join(timeout=5)
            raise RuntimeError(f"the engine core process exited with code {self._process.exitcode} while "
                               "starting (out of memory?); see its log above") from None
        if isinstance(reply, messages.StartupFailed):
            self._process.join(timeout=10)
            raise reply.error.exception()
        return reply

    @classmethod
    def from_engine_args(cls, **kwargs) -> "EngineCoreClient":
        return cls(EngineConfig.from_kwargs(**kwargs))

    # ---- requests ----
    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None,
                    priority: int = 0, lora_request: LoRARequest | None = None) -> RequestStream:
        """As AsyncEngine.add_request: validated here (InvalidArgument at once); a LoRA adapter that fails to load
        in the core, or a pooling request the core refuses, raises from the stream instead."""
        if self._dead is not None:
            raise _dead_error(self._dead)
        arrival_time = time.monotonic()
        if self._ready.pooling_task is not None or isinstance(params, PoolingParams):
            tokenized = self._input_processor.tokenize_prompt(prompt)
            num_sequences = 1
        else:
            processed = self._input_processor.process(request_id, prompt, params, priority, arrival_time)
            tokenized, num_sequences = processed.prompt, len(processed.requests)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._streams_lock:
            if request_id in self._streams:
                raise InvalidArgument(None, f"invalid request_id {request_id!r}: a request with this id is "
                                            "already running")
            self._streams[request_id] = stream
            self._num_sent += num_sequences
        prompt = {"prompt": tokenized.text, "prompt_token_ids": tokenized.token_ids}
        if tokenized.cache_salt is not None:
            prompt["cache_salt"] = tokenized.cache_salt
        self._inbox.put(("send", messages.AddRequest(request_id, prompt, params, priority, arrival_time,
                                                     lora_request)))
        return RequestStream(self, request_id, stream)

    async def generate(self, prompt: PromptType, sampling_params: SamplingParams | None = None,
                       request_id: str | None = None, priority: int = 0) -> AsyncIterator[RequestOutput]:
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        async with aclosing(self.add_request(request_id, prompt, sampling_params, priority)) as stream:
            async for output in stream:
                yield output

    def abort(self, request_id: str) -> None:
        with self._streams_lock:
            self._streams.pop(request_id, None)
        self._forget.put(request_id)
        self._inbox.put(("send", messages.AbortRequest(request_id)))

    # ---- blocking calls (off the event loop) ----
    def add_lora(self, lora_request: LoRARequest) -> bool:
        return self._call("add_lora", lora_request)

    def remove_lora(self, lora_int_id: int) -> bool:
        return self._call("remove_lora", lora_int_id)

    def prepare_sampling(self, params):
        """InputProcessor.prepare_sampling here, where add_request checks the request; the core compiles its own
        copy of a grammar on its receiver thread, and takes the bad words as tokenized here."""
        return self._input_processor.prepare_sampling(params)

    def warm_grammar_compiler(self) -> None:
        """Build the vocabulary's grammar view on both sides now rather than at the first constrained request."""
        self._input_processor.grammar_compiler().ll_tokenizer
        self._call("warm_grammar_compiler", None)

    def start_profile(self, trace_dir: str | None = None) -> None:
        """Start torch's profiler in the core, on its step thread (LLMEngine.start_profile)."""
        self._call("start_profile", trace_dir or profiler_dir())

    def stop_profile(self) -> str:
        """Stop the core's profile; returns the path of the trace it wrote."""
        return self._call("stop_profile", None)

    def _call(self, method: str, argument):
        if self._dead is not None:
            raise _dead_error(self._dead)
        future: concurrent.futures.Future = concurrent.futures.Future()
        call_id = next(self._call_ids)
        with self._streams_lock:
            self._calls[call_id] = future
        self._inbox.put(("send", messages.CallRequest(call_id, method, argument)))
        return future.result()

    # ---- public questions ----
    @property
    def is_dead(self) -> bool:
        return self._dead is not None

    @property
    def errored(self) -> BaseException | None:
        return self._dead

    @property
    def num_waiting(self) -> int:
        return self._stats.num_requests_waiting + self._num_in_transit()

    @property
    def num_running(self) -> int:
        return self._stats.num_requests_running

    @property
    def pooling_task(self) -> str | None:
        return self._ready.pooling_task

    def instruction_prefix(self, prompt_name: str | None) -> str:
        prompts = self._ready.instruction_prompts
        return prompts.prefix(prompt_name) if prompts is not None else ""

    def memory_usage(self):
        return self._ready.memory_usage

    def get_stats(self) -> EngineStats:
        stats = self._stats
        return dataclasses.replace(stats, num_requests_waiting=stats.num_requests_waiting + self._num_in_transit())

    @property
    def num_unfinished_requests(self) -> int:
        with self._streams_lock:
            return len(self._streams)

    def _num_in_transit(self) -> int:
        return max(0, self._num_sent - self._num_added)

    def shutdown(self) -> None:
        """Stop the core (its tensor-parallel workers with it) and wait for it; terminate it if it hangs."""
        self._closing = True
        self._inbox.put(("stop", None))
        self._process.join(timeout=_SHUTDOWN_TIMEOUT_S)
        if self._process.is_alive():
            logger.warning("engine core did not stop in time; terminating it", extra={"core_pid": self.core_pid})
            self._process.terminate()
            self._process.join(timeout=5)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
        self._connection.close()

    # ---- the sender thread ----
    def _send_loop(self) -> None:
        while True:
            batch, stop = [], False
            kind, payload = self._inbox.get()
            while True:
                if kind == "send":
                    batch.append(payload)
                elif kind == "drop":  # a stream nobody holds any more; its id may belong to a newer request
                    request_id, stream = payload
                    with self._streams_lock:
                        if self._streams.get(request_id) is stream:
                            del self._streams[request_id]
                            batch.append(messages.AbortRequest(request_id))
                            self._forget.put(request_id)
                elif kind == "stop":
                    batch.append(messages.Shutdown())
                    stop = True
                try:
                    kind, payload = self._inbox.get_nowait()
                except queue.Empty:
                    break
            try:
                self._connection.send_bytes(messages.dumps(batch))
            except (OSError, ValueError):  # the core is gone: the reader reports it
                return
            if stop:
                return

    # ---- the reader thread ----
    def _read_loop(self) -> None:
        try:
            while True:
                batch = messages.loads(self._connection.recv_bytes())
                for message in batch:
                    self._receive(message)
        except (EOFError, OSError) as error:
            self._die(messages.PortableError("runtime", f"the engine core process exited ({error!r})"))

    def _receive(self, message) -> None:
        if isinstance(message, messages.StepMessage):
            self._deliver_step(message)
        elif isinstance(message, messages.CallReply):
            with self._streams_lock:
                future = self._calls.pop(message.call_id, None)
            if future is not None:
                if message.error is not None:
                    future.set_exception(message.error.exception())
                else:
                    future.set_result(message.result)
        elif isinstance(message, messages.CoreDied):
            self._die(message.error)

    def _deliver_step(self, message: messages.StepMessage) -> None:
        while True:
            try:
                self._decoder.forget(self._forget.get_nowait())
            except queue.Empty:
                break
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        with self._streams_lock:
            self._stats, self._num_added = message.stats, message.num_added
            for error in message.errors:
                stream = self._streams.pop(error.request_id, None)
                if stream is not None:
                    batches.setdefault(stream.loop, []).append((stream.queue, error.error.exception()))
            for delta in message.outputs:
                # An OutputDelta (a tuple), or a pooling output whole.
                is_delta = type(delta) is tuple
                request_id, finished = (delta[0], delta[2]) if is_delta else (delta.request_id, delta.finished)
                stream = self._streams.pop(request_id, None) if finished else self._streams.get(request_id)
                if stream is None:
                    if is_delta:
                        self._decoder.forget(request_id)
                    continue
                output = self._decoder.decode(delta) if is_delta else delta
                item = RequestFailedError(output.request_id) if _failed(output) else output
                batches.setdefault(stream.loop, []).append((stream.queue, item))
        taken = _StepTaken(self._inbox, message.step, len(batches)) if message.step is not None else None
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, loop, items, taken)
            except RuntimeError:  # that caller's loop has closed
                if taken is not None:
                    taken.set()
        if taken is not None and not batches:
            self._inbox.put(("send", messages.StepTaken(message.step)))

    def _die(self, error: messages.PortableError) -> None:
        if self._dead is not None:
            return
        cause = error.exception()
        if not self._closing:
            logger.error("the engine core process has stopped; the server cannot serve until it restarts",
                         extra={"core_pid": self.core_pid, "error": error.message})
        self._dead = cause
        with self._streams_lock:
            streams, self._streams = self._streams, {}
            calls, self._calls = self._calls, {}
        for stream in streams.values():
            try:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, _dead_error(cause))
            except RuntimeError:
                pass
        for future in calls.values():
            future.set_exception(_dead_error(cause))


class _StepTaken:
    """Stands for _put_all's threading.Event: once every event loop given the step's outputs has run the streams
    they woke, the core hears so (StepTaken)."""

    def __init__(self, inbox: queue.SimpleQueue, step: int, num_loops: int) -> None:
        self.inbox, self.step, self.num_left = inbox, step, num_loops
        self.lock = threading.Lock()

    def set(self) -> None:
        with self.lock:
            self.num_left -= 1
            if self.num_left:
                return
        self.inbox.put(("send", messages.StepTaken(self.step)))


def _load_tokenizer(ready: messages.CoreReady):
    from serval.model.tokenizer import load_tokenizer
    return load_tokenizer(ready.config.model, ready.config.tokenizer)
