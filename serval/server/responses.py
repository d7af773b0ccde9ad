"""The Responses API handlers: create (whole or streamed), retrieve, delete, input_items, and the refused cancel.

Create runs the chat path: items become chat-template messages (with the previous response's context first),
the shared admission, `start` and fan-in run them, and the shared delta loop streams them through the output
rails; `ResponseChunks` shapes those deltas into the Responses API's typed events. The answer is stored (when
`store`) before the client sees `response.completed`, so a continuation sent right after finds it.
"""
from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from serval.openai import responses as wire
from serval.openai.errors import APIError
from serval.openai.response_output import EventSequence, OutputAssembler
from serval.openai.responses import ResponsesRequest
from serval.openai.tool_parsers.chat_output import ChatOutputParser
from serval.openai.sse import Delta, sse
from serval.outputs import CompletionOutput, RequestOutput
from serval.server import admission
from serval.server.admission import ContextParams
from serval.server.lifecycle import Call, PendingStream, to_api_error
from serval.server.response_store import ResponseStore, StoredResponse
from serval.server.serving import collect, start, stream_deltas, whole_text
from serval.server.state import ServerState

# input_items' page size bounds, OpenAI's.
DEFAULT_ITEM_LIMIT, MAX_ITEM_LIMIT = 20, 100


def owner_of(state: ServerState, key) -> str:
    """Who a stored response belongs to: the policy key's id; with --api-key alone, that key (hashed, so a new key
    does not inherit the old one's responses); without keys, everyone."""
    if key is not None:
        return f"key:{key.id}"
    if state.config.api_key is not None and not (state.guard is not None and state.guard.requires_keys):
        return "api-key:" + hashlib.sha256(state.config.api_key.encode()).hexdigest()[:32]
    return ""


def not_found(response_id: str, param: str | None = None) -> APIError:
    return APIError(404, f"No response found with id '{response_id}'.", param=param, type="invalid_request_error",
                    code="not_found" if param is None else "previous_response_not_found")


@dataclass
class Conversation:
    """What one create call sends to the model."""
    input_items: list[dict]
    context: list[dict]  # every item before the answer: the previous response's context and output, then input
    messages: list[dict]


async def _conversation(store: ResponseStore, body: ResponsesRequest, owner: str) -> Conversation:
    input_items = body.input_items()
    context = list(input_items)
    if body.previous_response_id is not None:
        previous = await store.get(body.previous_response_id, owner)
        if previous is None:
            raise not_found(body.previous_response_id, "previous_response_id")
        context = previous.continuation() + input_items
    return Conversation(input_items, context, wire.chat_messages(context, body.instructions))


async def create_response(store: ResponseStore, state: ServerState, body: ResponsesRequest, call: Call) -> Response:
    call.param_aliases["max_tokens"] = "max_output_tokens"
    refused = body.unsupported()
    if refused is not None:
        raise APIError(400, refused[1], param=refused[0])
    params = call.sampling_params(body)
    config = state.config
    admission.apply_template_defaults(config, body)
    tool_fields = body.chat_tool_fields(config.enable_auto_tool_choice and config.tool_call_parser is not None)
    output_parsers = admission.chat_output_parsers(config, tool_fields)  # a 400 for a choice the flags can't serve
    parser = output_parsers()
    # the chat path's grammar for tool_choice "required" or named, and structured output after the think section
    params = await state.off_loop(admission.chat_sampling_params, config, state.tokenizer, tool_fields, params, parser)
    owner = owner_of(state, call.session.key)
    conversation = await _conversation(store, body, owner)
    messages = conversation.messages
    contents = call.session.check_input([message["content"] for message in messages], "input")
    messages = [{**message, "content": content} for message, content in zip(messages, contents)]
    try:
        prompt = await state.off_loop(admission.chat_prompt, state.tokenizer, messages, True, body.template_tools(),
                                      body.chat_template_kwargs)
    except APIError as error:  # the template's refusal names chat's field
        error.param = "input" if error.param == "messages" else error.param
        raise
    call.session.check_prompt_tokens(len(prompt["prompt_token_ids"]), "input")
    admission.check_context(state, len(prompt["prompt_token_ids"]), params.max_tokens, "input",
                            ContextParams("input", "max_output_tokens"))
    fan_in = await start(state, call, [prompt], params, [messages], "input")
    answer = ResponseChunks(call, body, store, owner, conversation, state, parser)
    if body.stream:
        return PendingStream(answer.stream(stream_deltas(fan_in, answer, call, include_usage=False)))
    (output,) = await collect(fan_in)
    (completion,) = output.outputs
    text, finish_reason = whole_text(call, completion)
    answer.assembler.feed(text)
    answer.assembler.finish(wire.response_status(finish_reason)[0])
    return JSONResponse(await answer.finished(finish_reason))


@dataclass
class ResponseChunks:
    """One response's answer: the chunk builder the shared delta loop streams with (its `chunk` gives the text
    deltas to the assembler), and the final Response, stored when the client asked."""
    call: Call
    body: ResponsesRequest
    store: ResponseStore
    owner: str
    conversation: Conversation
    state: ServerState
    parser: ChatOutputParser
    created_at: int = field(default_factory=lambda: int(time.time()))
    events: EventSequence = field(default_factory=EventSequence)
    finish_reason: str | None = None
    n = 1
    wants_logprobs = False

    def __post_init__(self) -> None:
        self.assembler = OutputAssembler(self.events, self.parser)

    def response(self, status: str, output: list[dict], **fields) -> dict:
        return wire.response_object(self.call.record.request_id, self.call.record.model, self.body, self.created_at,
                                    status, output, **fields)

    # ---- the delta loop's chunk builder
    def opening(self) -> list[str]:
        in_progress = self.response("in_progress", [])
        return [sse(self.events.event("response.created", response=in_progress)),
                sse(self.events.event("response.in_progress", response=in_progress))]

    def chunk(self, key: int, prompt_index: int, output: RequestOutput, completion: CompletionOutput, delta: Delta,
              text: str, finish_reason: str | None, first: bool) -> str:
        if finish_reason is not None:
            self.finish_reason = finish_reason
        return "".join(sse(event) for event in self.assembler.feed(text))

    def usage_chunk(self) -> str:
        return ""

    # ---- the end
    async def finished(self, finish_reason: str | None) -> dict:
        """The final Response, stored first when `store`."""
        record = self.call.record
        status, incomplete_details = wire.response_status(finish_reason)
        reasoning_tokens = await self.state.off_loop(count_tokens, self.state.tokenizer, self.assembler.reasoning_text)
        response = self.response(status, self.assembler.items, incomplete_details=incomplete_details,
                                 usage_=wire.usage(record.prompt_tokens, record.completion_tokens,
                                                   record.cached_tokens, min(reasoning_tokens,
                                                                             record.completion_tokens)))
        if self.body.store:
            await self.store.put(StoredResponse(record.request_id, self.owner, response,
                                                self.conversation.input_items, self.conversation.context))
        return response

    async def stream(self, deltas: AsyncIterator[str]) -> AsyncIterator[str]:
        """The delta loop's events, then the closing ones; a failure is `response.failed`, not a bare error."""
        try:
            async for event in deltas:
                if event:
                    yield event
            status, _ = wire.response_status(self.finish_reason)
            closing = self.assembler.finish(status)
            response = await self.finished(self.finish_reason)
        except Exception as error:  # noqa: BLE001 - the status line is sent: report in the stream
            api_error = to_api_error(error, self.call)
            self.call.record.status, self.call.record.error = api_error.status, api_error.message
            failed = self.response("failed", self.assembler.items, error={
                "code": "server_error" if api_error.status >= 500 else "invalid_prompt",
                "message": api_error.message})
            yield sse(self.events.event("response.failed", response=failed))
            return
        finally:
            await deltas.aclose()
        for event in closing:
            yield sse(event)
        yield sse(self.events.event(f"response.{response['status']}", response=response))


def count_tokens(tokenizer, text: str) -> int:
    """usage's reasoning_tokens: the think section's text re-tokenized (the parser splits text, not tokens)."""
    return len(tokenizer.encode(text, add_special_tokens=False)) if text else 0


# ---------------------------------------------------------------- stored responses
def _request_owner(state: ServerState, raw: Request) -> str:
    return owner_of(state, raw.scope.get("state", {}).get("guard_key"))


async def retrieve_response(store: ResponseStore, state: ServerState, raw: Request, response_id: str) -> Response:
    stored = await store.get(response_id, _request_owner(state, raw))
    if stored is None:
        return not_found(response_id).response()
    return JSONResponse(stored.response)


async def delete_response(store: ResponseStore, state: ServerState, raw: Request, response_id: str) -> Response:
    if not await store.delete(response_id, _request_owner(state, raw)):
        return not_found(response_id).response()
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})


async def list_input_items(store: ResponseStore, state: ServerState, raw: Request, response_id: str) -> Response:
    query = raw.query_params
    try:
        limit = int(query.get("limit", DEFAULT_ITEM_LIMIT))
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_ITEM_LIMIT:
        return APIError(400, f"limit must be an integer from 1 to {MAX_ITEM_LIMIT}, got {query.get('limit')!r}",
                        param="limit").response()
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        return APIError(400, f"order must be 'asc' or 'desc', got {order!r}", param="order").response()
    stored = await store.get(response_id, _request_owner(state, raw))
    if stored is None:
        return not_found(response_id).response()
    try:
        return JSONResponse(wire.item_page(stored.input_items, limit, order, query.get("after")))
    except ValueError as error:
        return APIError.from_invalid_argument(error).response()


def refuse_cancel(response_id: str) -> Response:
    return APIError(400, f"Cannot cancel response '{response_id}': only background responses can be cancelled, "
                         "and this server does not run them (background: true is refused).",
                    param="response_id").response()
