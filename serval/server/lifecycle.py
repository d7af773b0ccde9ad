"""One OpenAI call from body to log line: read and validate the body, admit it under its key, run the handler until
it answers or the client leaves, stream or answer, and finish it exactly once (key released, span ended, log line
written). Every failure becomes OpenAI's error body; an unexpected one is logged with its details, and the client
gets "internal error" and the request id, never the exception's text."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from serval.engine.async_engine import EngineDeadError, RequestFailedError
from serval.guard.decisions import GuardRejection
from serval.guard.session import GuardSession, NullGuardSession, open_session
from serval.model.generation_config import GenerationDefaults
from serval.openai import protocol
from serval.openai.disconnect import until_disconnect
from serval.openai.errors import APIError, InvalidArgument
from serval.openai.http import OFF_LOOP_BYTES, json_object, parse_json_body, read_body
from serval.openai.protocol import random_id
from serval.openai.sse import DONE, SSE_HEADERS, ClosingStreamingResponse, error_event
from serval.server.admission import check_model, check_priority
from serval.server.request_defaults import with_defaults
from serval.server.request_log import RequestRecord
from serval.server.state import ServerState

logger = logging.getLogger(__name__)

# nginx's code for "client closed request": what the log and metrics say of a request whose client left.
CLIENT_CLOSED = 499
# The id prefix of each operation's responses, OpenAI's.
ID_PREFIXES = {"chat": "chatcmpl", "text_completion": "cmpl", "responses": "resp", "embeddings": "embd",
               "score": "score", "rerank": "rerank"}


@dataclass
class Call:
    """One OpenAI call's state, from admission to its log line."""
    record: RequestRecord
    session: GuardSession | NullGuardSession  # admission, rails, the key's release
    span: Any = None
    fan_in: Any = None  # the FanIn once the engine has the prompts
    # Body fields an engine error names under another name than the client sent (max_completion_tokens).
    param_aliases: dict[str, str] = field(default_factory=dict)
    defaults: GenerationDefaults | None = None  # the model's, for what the body leaves out
    lora_request: Any = None  # serval.lora.LoRARequest when the body's `model` names an adapter
    priority: int = 0  # the body's (vLLM's field), checked against the scheduling policy at admission
    cache_salt: str | None = None  # the body's (vLLM's field): prefix-cache blocks shared only within a salt

    def sampling_params(self, body):
        try:
            params = with_defaults(body.to_sampling_params(), body, self.defaults)
        except ValueError as error:
            raise self.invalid_argument(error) from error
        self.record.note_sampling(params)
        return params

    def invalid_argument(self, error: ValueError) -> APIError:
        api_error = APIError.from_invalid_argument(error)
        api_error.param = self.param_aliases.get(api_error.param, api_error.param)
        return api_error

    def usage(self) -> protocol.UsageInfo:
        record = self.record
        return protocol.UsageInfo.of(record.prompt_tokens, record.completion_tokens, record.cached_tokens)


class PendingStream(Response):
    """What a handler returns to stream: `handle` turns it into the real response once it owns the call."""

    def __init__(self, events: AsyncIterator[str]) -> None:
        super().__init__()
        self.events = events


Handler = Callable[[ServerState, BaseModel, Call], Awaitable[Response]]


async def read_request(state: ServerState, raw: Request, model_cls: type[BaseModel]) -> BaseModel:
    """The body as `model_cls`: size-limited, strict JSON, validated; big bodies parsed off the event loop."""
    data = await read_body(raw, state.config.max_request_body_bytes)
    if len(data) > OFF_LOOP_BYTES:
        return await asyncio.to_thread(_parse, data, model_cls)
    return _parse(data, model_cls)


def _parse(data: bytes, model_cls: type[BaseModel]) -> BaseModel:
    value = json_object(parse_json_body(data))
    unsupported = protocol.unsupported_structured_field(value)
    if unsupported is not None:
        raise APIError(400, protocol.unsupported_structured_message(unsupported), param=unsupported)
    return model_cls.model_validate(value)


async def handle(state: ServerState, raw: Request, model_cls: type[BaseModel], handler: Handler,
                 operation: str) -> Response:
    """Parse, validate, admit and run one OpenAI call; turn every failure into OpenAI's error body."""
    prefix = ID_PREFIXES.get(operation, "cmpl")
    record = RequestRecord(request_id=random_id(prefix), model=state.model_name, operation=operation)
    call = Call(record, open_session(None, record.request_id), defaults=state.generation_defaults)
    streaming = False
    try:
        body = await read_request(state, raw, model_cls)
        record.model = check_model(state, body.model)
        call.lora_request = state.loras.get(record.model)
        call.priority = check_priority(state, getattr(body, "priority", 0))
        call.cache_salt = getattr(body, "cache_salt", None)
        if isinstance(body, protocol.ChatCompletionRequest):
            call.param_aliases["max_tokens"] = body.max_tokens_param  # SamplingParams knows one name
        call.span = _start_span(state, raw, body, record)
        call.session = open_session(state.guard, record.request_id, trace=call.span)
        call.session.use_key(raw.scope.get("state", {}).get("guard_key"))  # authenticated by the middleware
        call.session.admit(record.model)
        response = await until_disconnect(raw, handler(state, body, call))
        if response is None:
            record.status, record.error = CLIENT_CLOSED, "client disconnected"
            return Response(status_code=CLIENT_CLOSED)
        if isinstance(response, PendingStream):
            streaming = True  # from here the stream finishes the call when it ends
            return _stream_response(state, response.events, call)
        return response
    except Exception as error:  # noqa: BLE001 - every failure becomes an error body, never a dead server
        api_error = to_api_error(error, call)
        record.status, record.error = api_error.status, api_error.message
        return api_error.response()
    finally:
        if not streaming:
            finish(state, call)


def _stream_response(state: ServerState, events: AsyncIterator[str], call: Call) -> ClosingStreamingResponse:
    record = call.record

    async def body() -> AsyncIterator[str]:
        try:
            async with aclosing(events):
                async for event in events:
                    yield event
            yield DONE
        except Exception as error:  # noqa: BLE001 - the status line is sent: report in the stream
            api_error = to_api_error(error, call)
            record.status, record.error = api_error.status, api_error.message
            yield error_event(api_error)
            yield DONE
        except BaseException:  # cancelled: the client went away mid-stream
            record.status, record.error = CLIENT_CLOSED, "client disconnected"
            raise
        finally:
            finish(state, call)

    return ClosingStreamingResponse(body(), headers=SSE_HEADERS)


async def simple(state: ServerState, raw: Request, model_cls: type[BaseModel], handler) -> Response:
    """A small endpoint: body in, JSON out, errors as OpenAI's body."""
    try:
        return JSONResponse(await handler(state, await read_request(state, raw, model_cls)))
    except Exception as error:  # noqa: BLE001
        return to_api_error(error).response()


def to_api_error(error: Exception, call: Call | None = None) -> APIError:
    if isinstance(error, APIError):
        return error
    if isinstance(error, GuardRejection):
        return APIError.from_rejection(error)
    if isinstance(error, ValidationError):
        return APIError.from_validation_error(error)
    if isinstance(error, EngineDeadError):
        return APIError.unavailable("The engine has stopped; the server is restarting.")
    if isinstance(error, RequestFailedError):  # its message names the request only; the cause is in the log
        return APIError(500, str(error), type="server_error", code="request_failed")
    if isinstance(error, InvalidArgument) or type(error) is ValueError:
        return call.invalid_argument(error) if call is not None else APIError.from_invalid_argument(error)
    request_id = call.record.request_id if call is not None else None
    logger.error("unexpected error while handling a request", exc_info=error, extra={"request_id": request_id})
    return APIError(500, f"internal error (request id {request_id})" if request_id else "internal error",
                    type="server_error")


def _start_span(state: ServerState, raw: Request, body, record: RequestRecord):
    if state.tracer is None:
        return None
    max_tokens = (body.requested_max_tokens if isinstance(body, protocol.ChatCompletionRequest)
                  else getattr(body, "max_tokens", None))
    # Pooling bodies (embeddings, score, rerank) have no sampling fields: their attributes are left out.
    sampling = {f"gen_ai.request.{name}": getattr(body, field, None) for name, field in (
        ("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"), ("seed", "seed"),
        ("choice.count", "n"), ("stream", "stream"))}
    return state.tracer.start_request_span(record.operation, record.model, raw.headers, {
        "gen_ai.request.max_tokens": max_tokens, **sampling, "gen_ai.response.id": record.request_id,
        "gen_ai.response.model": record.model})


def finish(state: ServerState, call: Call) -> None:
    """Release the key (charged for what ran, aborted prompts included), end the span, write the log line."""
    record = call.record
    state.open_fan_ins.discard(call.fan_in)
    usage = call.fan_in.usage() if call.fan_in is not None else None
    if call.fan_in is not None:  # a client that left mid-stream: log the tokens it did get and its first-token time
        for output in call.fan_in.latest.values():
            if not output.finished:
                record.add_unfinished(output)
    call.session.release(max(usage.prompt_tokens if usage else 0, record.prompt_tokens),
                         max(usage.completion_tokens if usage else 0, record.completion_tokens))
    if call.span is not None:
        state.tracer.end_request_span(call.span, {
            "gen_ai.usage.input_tokens": record.prompt_tokens,
            "gen_ai.usage.output_tokens": record.completion_tokens,
            "gen_ai.response.finish_reasons": tuple(record.finish_reasons),
            "gen_ai.latency.time_in_queue": record.queue_seconds,
            "gen_ai.latency.time_to_first_token": record.ttft_seconds,
            "gen_ai.latency.e2e": time.monotonic() - record.arrival_time,
            "http.response.status_code": record.status}, error=record.error)
    if state.config.log_requests:
        record.log()
