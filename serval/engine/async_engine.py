"""AsyncEngine: the engine behind the server. One background thread drives step(); each request's
outputs reach its caller through its own asyncio queue.

A thread rather than an asyncio task because a step is seconds of torch work on CPU: the event loop
must stay free to accept connections and stream. torch releases the GIL inside its kernels. Requests
and aborts reach the loop thread through an inbox, so the engine's state has a single writer.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from serval.config import EngineConfig
from serval.engine.engine import LLMEngine, ProcessedRequest, PromptType
from serval.outputs import RequestOutput
from serval.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class EngineDeadError(RuntimeError):
    pass


class AsyncEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.engine = LLMEngine(config)
        self.config = self.engine.config
        self.tokenizer = self.engine.tokenizer
        self._streams: dict[str, _Stream] = {}
        self._streams_lock = threading.Lock()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # ("add", ProcessedRequest) | ("abort", id)
        self._stopped = threading.Event()
        self._dead: BaseException | None = None
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="serval-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, **kwargs) -> "AsyncEngine":
        return cls(EngineConfig.from_kwargs(**kwargs))

    async def generate(self, prompt: PromptType, sampling_params: SamplingParams | None = None,
                       request_id: str | None = None, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Yield the request's cumulative output after every step that changes it; the last one has
        finished=True. Invalid input raises ValueError before anything is queued; leaving the iteration
        early (client gone, task cancelled) aborts the request and frees its blocks."""
        if self._dead is not None:
            raise EngineDeadError(f"the engine loop has stopped: {self._dead!r}")
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        processed = self.engine.process_inputs(request_id, prompt, sampling_params, priority)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._streams_lock:
            if request_id in self._streams:
                raise ValueError(f"invalid request_id {request_id!r}: a request with this id is already running")
            self._streams[request_id] = stream
        self._inbox.put(("add", processed))
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        with self._streams_lock:
            self._streams.pop(request_id, None)
        self._inbox.put(("abort", request_id))

    def get_stats(self):
        return self.engine.get_stats()

    @property
    def num_unfinished_requests(self) -> int:
        with self._streams_lock:
            return len(self._streams)

    def shutdown(self) -> None:
        self._stopped.set()
        self._inbox.put(("stop", None))
        self._thread.join(timeout=10)

    # ---- the loop thread ----
    def _loop(self) -> None:
        try:
            while not self._stopped.is_set():
                self._drain_inbox(block=not self.engine.has_unfinished_requests())
                if self.engine.has_unfinished_requests():
                    for output in self.engine.step():
                        self._deliver(output.request_id, output, last=output.finished)
        except BaseException as error:  # the engine is broken: fail every waiting caller, loudly
            logger.exception("engine loop died")
            self._dead = error
            with self._streams_lock:
                streams, self._streams = self._streams, {}
            for stream in streams.values():
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, EngineDeadError(repr(error)))

    def _drain_inbox(self, block: bool) -> None:
        while True:
            try:
                kind, payload = self._inbox.get(block=block, timeout=None)
            except queue.Empty:
                return
            block = False
            if kind == "add":
                self._add(payload)
            elif kind == "abort":
                self.engine.abort_request(payload)

    def _add(self, processed: ProcessedRequest) -> None:
        with self._streams_lock:
            if processed.request_id not in self._streams:
                return  # aborted before it reached the engine
        try:
            self.engine.add_processed(processed)
        except ValueError as error:
            self._deliver(processed.request_id, error, last=True)

    def _deliver(self, request_id: str, item, last: bool) -> None:
        with self._streams_lock:
            stream = self._streams.pop(request_id, None) if last else self._streams.get(request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
