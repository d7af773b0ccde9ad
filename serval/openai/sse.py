"""Server-sent events as OpenAI's streaming clients read them: one `data:` line per JSON chunk, an error event when
a stream fails after its status line was sent, and `data: [DONE]` at the end. The server and the router share it."""
from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel
from starlette.responses import StreamingResponse

if TYPE_CHECKING:
    from serval.openai.errors import APIError
    from serval.outputs import CompletionOutput, SampleLogprobs

DONE = "data: [DONE]\n\n"
# Proxies (nginx) buffer responses unless told not to; a buffered stream reaches the client all at once.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(payload: BaseModel | dict) -> str:
    """One event carrying `payload` as JSON."""
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


def error_event(api_error: "APIError") -> str:
    """The event that tells a client its stream failed: OpenAI's error body, since the status line is already 200."""
    return sse(api_error.body())


class ClosingStreamingResponse(StreamingResponse):
    """A streaming response that closes its body iterator however the response ends (Starlette leaves a cancelled
    one suspended, so its `finally` would never run), then awaits `on_close` if given."""

    def __init__(self, content, on_close: Callable[[], Awaitable[None]] | None = None, **kwargs) -> None:
        kwargs.setdefault("media_type", "text/event-stream")
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def stream_response(self, send) -> None:
        try:
            async with aclosing(self.body_iterator):
                await super().stream_response(send)
        finally:
            if self.on_close is not None:
                await self.on_close()


class SentState:
    """What a stream has sent of each choice, so that each chunk carries only what is new."""

    def __init__(self) -> None:
        self.text: dict[int, int] = {}
        self.tokens: dict[int, int] = {}
        self.done: set[int] = set()

    def first(self, key: int) -> bool:
        return self.tokens.get(key, 0) == 0 and self.text.get(key, 0) == 0

    def delta(self, key: int, completion: "CompletionOutput") -> "Delta | None":
        """What is new in choice `key`'s cumulative `completion`, or None when nothing is."""
        if key in self.done:
            return None
        sent_text, sent_tokens = self.text.get(key, 0), self.tokens.get(key, 0)
        text = completion.text[sent_text:]
        token_ids = completion.token_ids[sent_tokens:]
        if not text and not token_ids and completion.finish_reason is None:
            return None
        logprobs = completion.logprobs[sent_tokens:] if completion.logprobs is not None else None
        self.text[key] = max(sent_text, len(completion.text))
        self.tokens[key] = len(completion.token_ids)
        if completion.finish_reason is not None:
            self.done.add(key)
        return Delta(text, token_ids, logprobs)


@dataclass(slots=True)
class Delta:
    """The new part of one choice since the last chunk."""
    text: str
    token_ids: list[int]
    logprobs: "SampleLogprobs | None"
