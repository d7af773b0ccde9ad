"""The fan-in of one HTTP request's engine requests (one per prompt, each with its n choices) into one stream.

Each prompt's engine stream is read by its own task; closing the fan-in cancels them, which closes their streams
and so aborts the engine requests. Inter-token latency and the per-request histograms are observed here.
"""
from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from collections.abc import AsyncIterator
from dataclasses import dataclass

from serval.outputs import RequestOutput
from serval.server.metrics import ServerMetrics
from serval.server.request_log import RequestRecord

_DONE = object()  # a prompt's stream has ended


@dataclass
class Usage:
    """Tokens so far, aborted prompts included: a client that leaves early still pays for what ran."""
    prompt_tokens: int = 0
    completion_tokens: int = 0


class FanIn:
    def __init__(self, metrics: ServerMetrics, model_name: str, record: RequestRecord) -> None:
        self.metrics, self.model_name, self.record = metrics, model_name, record
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tasks: list[asyncio.Task] = []
        self.streams: list = []  # the engine's RequestStreams, parallel to tasks
        self.latest: dict[int, RequestOutput] = {}  # each prompt's last output: what a key is charged for
        self.interrupted: Exception | None = None

    def start(self, engine, prompts: list[dict], params, lora_request=None, priority: int = 0) -> None:
        """Hand every prompt to the engine; if one is invalid, close what started and raise its error (the
        engine validates in add_request, so nothing of a refused request runs)."""
        for index, prompt in enumerate(prompts):
            request_id = self.record.request_id if len(prompts) == 1 else f"{self.record.request_id}-{index}"
            try:
                stream = (engine.add_request(request_id, prompt, params, priority) if lora_request is None
                          else engine.add_request(request_id, prompt, params, priority, lora_request=lora_request))
            except BaseException:
                self._cancel_started()
                raise
            self.streams.append(stream)
            self.tasks.append(asyncio.create_task(self._read(index, stream)))

    def interrupt(self, error: Exception) -> None:
        """End the fan-in with `error` (the server's shutdown deadline): the reader gets it in place of its next
        output, even when outputs are queued (a slow client's stream) or none will come."""
        self.interrupted = error
        self.queue.put_nowait((-1, error))

    async def _read(self, index: int, stream) -> None:
        num_tokens, previous_time = 0, time.monotonic()
        try:
            async with aclosing(stream):
                async for output in stream:
                    now = time.monotonic()
                    total = sum(len(completion.token_ids) for completion in output.outputs)
                    if num_tokens and total > num_tokens:  # the first token's wait is TTFT, not ITL
                        self.metrics.observe_tokens(total - num_tokens, now - previous_time)
                    if total > num_tokens:
                        num_tokens, previous_time = total, now
                    if output.finished:
                        self.record.add_finished(output)
                        self.metrics.observe_finished(output, now)
                    self.latest[index] = output
                    self.queue.put_nowait((index, output))
        except Exception as error:  # noqa: BLE001 - handed to the reader, which answers with it
            self.queue.put_nowait((index, error))
        else:
            self.queue.put_nowait((index, _DONE))

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, cumulative output) until every prompt is done; raises a prompt's error."""
        remaining = len(self.tasks)
        while remaining:
            if self.interrupted is not None:
                raise self.interrupted
            index, item = await self.queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item

    def usage(self) -> Usage:
        return Usage(sum(len(output.prompt_token_ids) for output in self.latest.values()),
                     sum(len(c.token_ids) for output in self.latest.values() for c in output.outputs))

    async def close(self) -> None:
        """Cancel what still runs (aborting it in the engine). Safe to call more than once."""
        unfinished = self._cancel_started()
        if unfinished:
            await asyncio.gather(*unfinished, return_exceptions=True)

    def _cancel_started(self) -> list[asyncio.Task]:
        unfinished = [task for task in self.tasks if not task.done()]
        for task, stream in zip(self.tasks, self.streams):
            if not task.done():
                task.cancel()
                stream.close()  # a task cancelled before its first step never enters its `aclosing`
        if unfinished:
            self.metrics.request_success.labels(self.model_name, "abort").inc(len(unfinished))
            self.record.finish_reasons.extend(["abort"] * len(unfinished))
        return unfinished

