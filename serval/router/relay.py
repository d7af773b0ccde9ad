"""One backend stream relayed to the client, chunk by chunk as it arrives (no buffering; parsing only when the
guard's output rails rewrite it), settled exactly once however it ends."""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import aiohttp

from serval.openai.errors import APIError
from serval.openai.sse import DONE, error_event
from serval.router import metrics as m

if TYPE_CHECKING:
    from serval.router.gateway import Attempt, Router
    from serval.router.guarding import StreamRewriter

DONE_EVENT = DONE.encode()


def ends_with_done(chunk: bytes) -> bool:
    """Whether a relayed chunk ends the SSE stream: what the client has then is a complete answer."""
    return chunk.rstrip().endswith(b"data: [DONE]")


class StreamRelay:
    """close() settles the attempt exactly once (in-flight count, breaker, metrics, log line) however the
    response ends, even when the client left before the first chunk was sent and the generator never ran."""

    def __init__(self, router: "Router", attempt: "Attempt", response: aiohttp.ClientResponse, first: bytes,
                 chunks, rewriter: "StreamRewriter | None" = None) -> None:
        self.router, self.attempt, self.response = router, attempt, response
        self.first, self.chunks, self.rewriter = first, chunks, rewriter
        self.outcome = m.CLIENT_DISCONNECT  # until the stream ends one way or the other
        # A client may close its connection as soon as it reads [DONE], before the backend's stream has ended:
        # that is a finished answer, not a disconnect.
        self.done_sent = False
        self.closed = False

    async def events(self):
        try:
            async for chunk in (self._passed() if self.rewriter is None else self._rewritten()):
                yield chunk
                self.done_sent = ends_with_done(chunk)  # once it has been sent: the client may now leave
            self.outcome = m.SUCCESS
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            if self.done_sent:
                self.outcome = m.SUCCESS  # the backend went away after its answer was complete
                return
            # Too late to retry: the client has bytes. Say so inside the stream, as `serval serve` does.
            self.outcome = m.STREAM_ERROR
            message = f"backend {self.attempt.backend.name} failed mid-stream: {type(error).__name__}"
            yield (error_event(APIError(502, message, type="server_error", code="backend_failed")) + DONE).encode()
        finally:
            await self.close()

    async def _passed(self):
        yield self.first
        async for chunk in self.chunks:
            yield chunk

    async def _rewritten(self):
        """The stream through the guard's output rails, event by event."""
        rewriter = self.rewriter
        async for chunk in self._passed():
            out = rewriter.feed(chunk)
            if out:
                yield out
            if rewriter.all_stopped:  # every choice ended by a stop rail: end here, the backend is dropped
                yield DONE_EVENT
                return
        tail = rewriter.end()
        if tail:
            yield tail

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        attempt, router = self.attempt, self.router
        if self.outcome == m.CLIENT_DISCONNECT and self.done_sent:
            self.outcome = m.SUCCESS
        attempt.request.session.release()
        backend = attempt.backend
        backend.in_flight -= 1
        if self.outcome == m.SUCCESS:
            backend.breaker.record_success()
        elif self.outcome == m.STREAM_ERROR:
            backend.breaker.record_failure(router.clock())
        else:
            backend.breaker.release()
        router.finished(attempt, self.outcome, 200, stream=True)
        if self.outcome == m.SUCCESS and self.response.content.at_eof():
            self.response.release()  # the connection goes back to the pool
        else:
            self.response.close()  # dropping the connection is what tells the backend to abort the request

