"""The OpenAI-compatible HTTP server: FastAPI on uvicorn, the AsyncEngine behind it.

Every route answers OpenAI's error body on failure; user input never yields a 500. A request whose client
goes away (streaming or not) is cancelled, which aborts its engine requests and frees their KV blocks.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

import serval
from serval.engine.async_engine import AsyncEngine, EngineDeadError
from serval.guard.decisions import Decision, GuardRejection
from serval.guard.guard import Guard, RequestContext
from serval.guard.output import OutputFilter
from serval.guard.policy import PolicyError
from serval.outputs import CompletionOutput, Logprob, RequestOutput
from serval.sampling_params import SamplingParams
from serval.openai import protocol
from serval.openai.disconnect import until_disconnect
from serval.server.metrics import CONTENT_TYPE, ServerMetrics
from serval.openai.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                    TokenizeRequest, random_id)
from serval.server.request_log import RequestRecord
from serval.server.tracing import RequestTracer

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# nginx's code for "client closed request": what the log and metrics say of a request whose client left.
CLIENT_CLOSED = 499
_DONE = object()  # a prompt's generator has ended
_PARAM_IN_MESSAGE = re.compile(r"^invalid (?:sampling parameter |engine argument )?([a-z_]+)")


class APIError(Exception):
    """An error with the fields of OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = protocol.ErrorResponse(error=protocol.ErrorInfo(message=self.message, type=self.type,
                                                               param=self.param, code=self.code))
        return JSONResponse(body.model_dump(), status_code=self.status, headers=self.headers)

    @classmethod
    def from_rejection(cls, rejection: GuardRejection) -> "APIError":
        headers = {"Retry-After": str(rejection.retry_after)} if rejection.retry_after is not None else None
        return cls(rejection.status, rejection.message, type=rejection.type, param=rejection.param,
                   code=rejection.code, headers=headers)

    @classmethod
    def from_value_error(cls, error: ValueError, default_param: str | None = None) -> "APIError":
        """The engine and SamplingParams say 'invalid <argument>...': that argument is OpenAI's param."""
        match = _PARAM_IN_MESSAGE.match(str(error))
        return cls(400, str(error), param=match.group(1) if match else default_param)

    @classmethod
    def from_validation_error(cls, error: ValidationError) -> "APIError":
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        message = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in error.errors())
        return cls(400, message, param=param)


class Generation:
    """The engine requests of one HTTP request (one per prompt), merged into one stream of outputs.

    Each prompt's generator runs in its own task; closing the Generation cancels them, which aborts
    their engine requests. Inter-token latency and per-request histograms are observed here.
    """

    def __init__(self, server: "OpenAIServer", record: RequestRecord) -> None:
        self.server = server
        self.record = record
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tasks: list[asyncio.Task] = []
        self.failed: Exception | None = None
        self.latest: dict[int, RequestOutput] = {}  # each prompt's last output: what a key is charged for

    async def start(self, prompts: list[dict], params: SamplingParams) -> None:
        """Queue every prompt; raises the first prompt's ValueError if any is invalid (nothing then runs)."""
        for index, prompt in enumerate(prompts):
            request_id = self.record.request_id if len(prompts) == 1 else f"{self.record.request_id}-{index}"
            stream = self.server.engine.generate(prompt, params, request_id=request_id)
            self.tasks.append(asyncio.create_task(self._produce(index, stream)))
        # engine.generate validates synchronously before its first await, so after one turn of the loop
        # (tasks run in creation order) every prompt is either queued or failed.
        await asyncio.sleep(0)
        if self.failed is not None:
            await self.close()
            raise self.failed

    async def _produce(self, index: int, stream: AsyncIterator[RequestOutput]) -> None:
        metrics = self.server.metrics
        num_tokens, previous_time = 0, time.monotonic()
        try:
            async with aclosing(stream):
                async for output in stream:
                    now = time.monotonic()
                    total = sum(len(completion.token_ids) for completion in output.outputs)
                    if num_tokens and total > num_tokens:  # the first token's wait is TTFT, not ITL
                        metrics.observe_tokens(total - num_tokens, now - previous_time)
                    if total > num_tokens:
                        num_tokens, previous_time = total, now
                    if output.finished:
                        self.record.add_finished(output)
                        metrics.observe_finished(output, now)
                    self.latest[index] = output
                    self.queue.put_nowait((index, output))
        except Exception as error:  # noqa: BLE001 - handed to the consumer, which answers with it
            self.failed = self.failed or error
            self.queue.put_nowait((index, error))
        else:
            self.queue.put_nowait((index, _DONE))

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, cumulative output) until every prompt is done; raises a prompt's error."""
        remaining = len(self.tasks)
        while remaining:
            index, item = await self.queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item

    def usage(self) -> tuple[int, int]:
        """(prompt, completion) tokens so far, aborted prompts included: a client that leaves early still pays."""
        prompt = sum(len(output.prompt_token_ids) for output in self.latest.values())
        completion = sum(len(c.token_ids) for output in self.latest.values() for c in output.outputs)
        return prompt, completion

    async def close(self) -> None:
        """Cancel what still runs (aborting it in the engine). Safe to call more than once."""
        unfinished = [task for task in self.tasks if not task.done()]
        if not unfinished:
            return
        for task in unfinished:
            task.cancel()
        self.server.metrics.request_success.labels(self.server.model_name, "abort").inc(len(unfinished))
        self.record.finish_reasons.extend(["abort"] * len(unfinished))
        await asyncio.gather(*unfinished, return_exceptions=True)


class OpenAIServer:
    def __init__(self, engine: AsyncEngine, served_model_names: list[str], api_key: str | None = None,
                 max_waiting_requests: int | None = None, tracer: RequestTracer | None = None,
                 log_requests: bool = True, guard: Guard | None = None) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_names = served_model_names
        self.model_name = served_model_names[0]
        self.api_key = api_key
        self.max_waiting_requests = max_waiting_requests
        self._num_starting = 0  # prompts past check_capacity, not yet in the engine (see check_capacity)
        self.tracer = tracer
        self.log_requests = log_requests
        self.metrics = ServerMetrics(self.model_name, engine.get_stats)
        self.max_model_len = engine.config.max_model_len
        self.guard = guard
        # request id -> (the key it was admitted under, its Generation once started): released in _finish
        self._admitted: dict[str, list] = {}
        if guard is not None:
            guard.observers.append(_GuardObserver(self.metrics, tracer))
            self.metrics.add_key_usage(guard.keys)
            if api_key is not None and guard.requires_keys:
                logger.warning("--api-key is ignored: the policy file's keys decide who may call",
                               extra={"policy": guard.policy.source})

    def reload_policy(self) -> None:
        """SIGHUP: re-read the policy; a bad file is logged and the running policy stays."""
        if self.guard is None:
            logger.warning("SIGHUP ignored: the server runs without --policy")
            return
        try:
            self.guard.reload()
        except PolicyError as error:
            logger.error("policy reload failed; keeping the running policy", extra={"error": str(error)})

    # ---------------------------------------------------------------- checks
    def check_model(self, name: str | None) -> str:
        if name is None or name in self.model_names:
            return self.model_name
        raise APIError(404, f"The model `{name}` does not exist; this server serves {self.model_names}.",
                       param="model", code="model_not_found")

    def check_capacity(self) -> None:
        if self.max_waiting_requests is None:
            return
        stats = self.engine.get_stats()
        # Requests in the engine's inbox are not in the scheduler's count yet, and those admitted here but not yet
        # handed to the engine (start() awaits once in between) are in neither: count both as waiting.
        waiting = max(stats.num_requests_waiting, self.engine.num_unfinished_requests - stats.num_requests_running)
        waiting += self._num_starting
        if waiting >= self.max_waiting_requests:
            raise APIError(429, f"The server is overloaded: {waiting} requests are waiting, the limit is "
                                f"{self.max_waiting_requests} (--max-waiting-requests). Retry later.",
                           type="rate_limit_error", code="rate_limit_exceeded")

    def check_context(self, num_prompt_tokens: int, max_tokens: int | None, where: str) -> None:
        limit = self.max_model_len
        if num_prompt_tokens >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your {where} "
                                f"has {num_prompt_tokens} tokens; at most {limit - 1} leave room for one to be "
                                "generated. Please reduce the length of the " + where + ".",
                           param="messages" if where == "messages" else "prompt", code="context_length_exceeded")
        if max_tokens is not None and num_prompt_tokens + max_tokens > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the {where}, "
                                f"{max_tokens} in the completion). Please reduce the length of the {where} or "
                                "completion.", param="max_tokens", code="context_length_exceeded")

    def require_tokenizer(self):
        if self.tokenizer is None:
            raise APIError(400, "This model was loaded without a tokenizer: send prompts as token ids to "
                                "/v1/completions.", param="prompt")
        return self.tokenizer

    # ---------------------------------------------------------------- prompts
    def completion_prompt(self, prompt: str | list[int]) -> dict:
        if isinstance(prompt, str):
            return {"prompt": prompt, "prompt_token_ids": self.require_tokenizer().encode(prompt)}
        text = self.tokenizer.decode(prompt) if self.tokenizer is not None else ""
        return {"prompt": text, "prompt_token_ids": list(prompt)}

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> dict:
        tokenizer = self.require_tokenizer()
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
        except Exception as error:  # jinja's TemplateError and raise_exception() in templates: bad messages
            raise APIError(400, f"The chat template rejected the messages: {error}", param="messages") from error
        return {"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}

    # ---------------------------------------------------------------- completions
    async def create_completion(self, body: CompletionRequest, record: RequestRecord,
                                ctx: RequestContext) -> Response:
        params = body.to_sampling_params()
        prompts = [self.completion_prompt(prompt) for prompt in self.guarded_prompts(body.prompts(), ctx)]
        for prompt in prompts:
            if self.guard is not None:
                self.guard.check_prompt_tokens(len(prompt["prompt_token_ids"]), ctx, "prompt")
            self.check_context(len(prompt["prompt_token_ids"]), params.max_tokens, "prompt")
        conversations = [[{"role": "user", "content": prompt["prompt"]}] for prompt in prompts]
        generation = await self.start(record, prompts, params, ctx, conversations, "prompt")
        if body.stream:
            return self.sse(self.stream_completion(body, record, generation, prompts, params, ctx))
        finals = await self.collect(generation)
        choices = []
        for index, output in enumerate(finals):
            for completion in output.outputs:
                text, finish_reason = self.filter_output(completion, ctx)
                logprobs = None
                if body.logprobs is not None:
                    logprobs = protocol.CompletionLogprobs()
                    if body.echo:
                        _add_completion_logprobs(logprobs, output.prompt_token_ids, output.prompt_logprobs,
                                                 body.logprobs, self.tokenizer)
                    _add_completion_logprobs(logprobs, completion.token_ids, completion.logprobs, body.logprobs,
                                             self.tokenizer)
                if body.echo:
                    text = prompts[index]["prompt"] + text
                choices.append(protocol.CompletionChoice(
                    index=index * params.n + completion.index, text=text, logprobs=logprobs,
                    finish_reason=finish_reason, stop_reason=completion.stop_reason))
        return JSONResponse(protocol.CompletionResponse(
            id=record.request_id, model=record.model, choices=choices, usage=_usage(record)).model_dump())

    async def stream_completion(self, body: CompletionRequest, record: RequestRecord, generation: Generation,
                                prompts: list[dict], params: SamplingParams,
                                ctx: RequestContext) -> AsyncIterator[str]:
        created = int(time.time())
        sent = _SentState()
        rails = _StreamRails(self.guard, ctx, len(prompts) * params.n)
        try:
            async for index, output in generation.outputs():
                for completion in output.outputs:
                    key = index * params.n + completion.index
                    first = sent.first(key)
                    delta = sent.delta(key, completion)
                    if delta is None or rails.done(key):
                        continue
                    text, token_ids, logprobs = delta
                    text, finish_reason = rails.filter(key, text, completion.finish_reason)
                    if not text and finish_reason is None and body.logprobs is None:
                        continue  # the rails hold this delta back (a match may be forming)
                    if body.echo and first:
                        text = prompts[index]["prompt"] + text
                    chunk_logprobs = None
                    if body.logprobs is not None:
                        chunk_logprobs = protocol.CompletionLogprobs()
                        if body.echo and first:
                            _add_completion_logprobs(chunk_logprobs, output.prompt_token_ids, output.prompt_logprobs,
                                                     body.logprobs, self.tokenizer)
                        _add_completion_logprobs(chunk_logprobs, token_ids, logprobs, body.logprobs, self.tokenizer)
                    chunk = protocol.CompletionResponse(
                        id=record.request_id, created=created, model=record.model,
                        choices=[protocol.CompletionChoice(index=key, text=text, logprobs=chunk_logprobs,
                                                           finish_reason=finish_reason,
                                                           stop_reason=completion.stop_reason)])
                    yield _sse(chunk)
                if rails.all_stopped():
                    break  # every choice hit a stop rail: closing the generation aborts the engine requests
            if body.include_usage_in_stream:
                yield _sse(protocol.CompletionResponse(id=record.request_id, created=created, model=record.model,
                                                       choices=[], usage=_usage(record)))
        finally:
            await generation.close()

    # ---------------------------------------------------------------- chat
    async def create_chat_completion(self, body: ChatCompletionRequest, record: RequestRecord,
                                     ctx: RequestContext) -> Response:
        params = body.to_sampling_params()
        messages = body.template_messages()
        if self.guard is not None:
            contents = self.guard.check_input([message["content"] for message in messages], ctx, "messages")
            messages = [{**message, "content": content} for message, content in zip(messages, contents)]
        prompt = self.chat_prompt(messages, body.add_generation_prompt)
        if self.guard is not None:
            self.guard.check_prompt_tokens(len(prompt["prompt_token_ids"]), ctx, "messages")
        self.check_context(len(prompt["prompt_token_ids"]), params.max_tokens, "messages")
        generation = await self.start(record, [prompt], params, ctx, [messages])
        top_logprobs = body.top_logprobs or 0
        if body.stream:
            return self.sse(self.stream_chat(body, record, generation, params, top_logprobs, ctx))
        (output,) = await self.collect(generation)
        choices = []
        for completion in output.outputs:
            text, finish_reason = self.filter_output(completion, ctx)
            choices.append(protocol.ChatChoice(
                index=completion.index, message=protocol.ChatResponseMessage(content=text),
                logprobs=_chat_logprobs(completion.token_ids, completion.logprobs, top_logprobs, self.tokenizer)
                if body.logprobs else None,
                finish_reason=finish_reason, stop_reason=completion.stop_reason))
        return JSONResponse(protocol.ChatCompletionResponse(
            id=record.request_id, model=record.model, choices=choices, usage=_usage(record)).model_dump())

    async def stream_chat(self, body: ChatCompletionRequest, record: RequestRecord, generation: Generation,
                          params: SamplingParams, top_logprobs: int, ctx: RequestContext) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(choices: list[protocol.ChatStreamChoice], usage=None) -> str:
            return _sse(protocol.ChatCompletionChunk(id=record.request_id, created=created, model=record.model,
                                                     choices=choices, usage=usage))

        sent = _SentState()
        rails = _StreamRails(self.guard, ctx, params.n)
        try:
            for index in range(params.n):
                yield chunk([protocol.ChatStreamChoice(index=index, delta=protocol.DeltaMessage(
                    role="assistant", content=""))])
            async for _, output in generation.outputs():
                for completion in output.outputs:
                    delta = sent.delta(completion.index, completion)
                    if delta is None or rails.done(completion.index):
                        continue
                    text, token_ids, logprobs = delta
                    text, finish_reason = rails.filter(completion.index, text, completion.finish_reason)
                    if not text and finish_reason is None and not body.logprobs:
                        continue  # the rails hold this delta back (a match may be forming)
                    yield chunk([protocol.ChatStreamChoice(
                        index=completion.index, delta=protocol.DeltaMessage(content=text),
                        logprobs=_chat_logprobs(token_ids, logprobs, top_logprobs, self.tokenizer)
                        if body.logprobs else None,
                        finish_reason=finish_reason)])
                if rails.all_stopped():
                    break  # every choice hit a stop rail: closing the generation aborts the engine requests
            if body.include_usage_in_stream:
                yield chunk([], usage=_usage(record))
        finally:
            await generation.close()

    # ---------------------------------------------------------------- shared
    async def start(self, record: RequestRecord, prompts: list[dict], params: SamplingParams,
                    ctx: RequestContext | None = None, conversations: list[list[dict]] | None = None,
                    param: str = "messages") -> Generation:
        """Queue the prompts. With a classifier rail, its verdicts on `conversations` are asked for at the same
        time and awaited here, while the engine runs the prefill: an unsafe verdict aborts the generation
        before any output is sent."""
        self.check_capacity()
        self._num_starting += len(prompts)  # no await since the check: concurrent requests see each other
        verdicts = None
        if self.guard is not None and self.guard.has_classifier and conversations:
            verdicts = asyncio.gather(*[self.guard.classify_input(c, ctx, param) for c in conversations])
        generation = Generation(self, record)
        if record.request_id in self._admitted:
            self._admitted[record.request_id][1] = generation
        try:
            try:
                await generation.start(prompts, params)
            finally:
                self._num_starting -= len(prompts)  # now in the engine's own count, or failed
            if verdicts is not None:
                await verdicts
        except BaseException:
            if verdicts is not None and not verdicts.done():
                verdicts.cancel()
            await generation.close()
            raise
        return generation

    # ---------------------------------------------------------------- guard
    def guarded_prompts(self, prompts: list[str | list[int]], ctx: RequestContext) -> list[str | list[int]]:
        """Completion prompts through the input rails. Token-id prompts are checked as their decoded text (so
        ids are no way around the rails) and re-encoded only if a rail redacted them."""
        if self.guard is None:
            return prompts
        texts = [p if isinstance(p, str) or self.tokenizer is None else self.tokenizer.decode(p) for p in prompts]
        checkable = [i for i, t in enumerate(texts) if isinstance(t, str)]
        checked = self.guard.check_input([texts[i] for i in checkable], ctx, "prompt")
        guarded = list(prompts)
        for i, text in zip(checkable, checked):
            if text != texts[i]:
                guarded[i] = text if isinstance(prompts[i], str) else self.tokenizer.encode(text)
        return guarded

    def filter_output(self, completion: CompletionOutput, ctx: RequestContext) -> tuple[str, str | None]:
        """A whole completion through the output rails: (text, finish_reason)."""
        output_filter = self.guard.output_filter(ctx) if self.guard is not None else None
        if output_filter is None:
            return completion.text, completion.finish_reason
        step = output_filter.filter_all(completion.text)
        return step.text, "content_filter" if step.stopped else completion.finish_reason

    @staticmethod
    async def collect(generation: Generation) -> list[RequestOutput]:
        finals: dict[int, RequestOutput] = {}
        try:
            async for index, output in generation.outputs():
                if output.finished:
                    finals[index] = output
        finally:
            await generation.close()
        return [finals[index] for index in sorted(finals)]

    def sse(self, events: AsyncIterator[str]) -> StreamingResponse:
        """Marks the response as streaming; `handle` wraps it so the stream owns the request's record."""
        return _PendingStream(events)

    async def handle(self, raw: Request, model_cls: type[BaseModel],
                     handler: Callable, operation: str) -> Response:
        """Parse, validate, run one OpenAI request; turn every failure into OpenAI's error body."""
        prefix = "chatcmpl" if operation == "chat" else "cmpl"
        record = RequestRecord(request_id=random_id(prefix), model=self.model_name, operation=operation)
        span, streaming = None, False
        try:
            data = await _json_body(raw)
            unsupported = protocol.unsupported_structured_field(data)
            if unsupported is not None:
                raise APIError(400, protocol.unsupported_structured_message(unsupported), param=unsupported)
            body = model_cls.model_validate(data)
            record.model = self.check_model(body.model)
            span = self._start_span(raw, body, record)
            ctx = RequestContext(record.request_id, trace=span)
            if self.guard is not None:
                key = raw.scope.get("state", {}).get("guard_key")
                ctx.key_id = key.id if key is not None else None
                self.guard.admit(key, record.model, ctx)
                self._admitted[record.request_id] = [key, None]
            response = await until_disconnect(raw, handler(body, record, ctx))
            if response is None:
                record.status, record.error = CLIENT_CLOSED, "client disconnected"
                return Response(status_code=CLIENT_CLOSED)
            if isinstance(response, _PendingStream):
                streaming = True  # from here the stream logs the request when it ends
                return self._stream_response(response.events, record, span)
            return response
        except Exception as error:  # noqa: BLE001 - every failure becomes an error body, never a dead server
            api_error = _to_api_error(error)
            record.status, record.error = api_error.status, api_error.message
            return api_error.response()
        finally:
            if not streaming:
                self._finish(record, span)

    def _stream_response(self, events: AsyncIterator[str], record: RequestRecord, span) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            try:
                async with aclosing(events):
                    async for event in events:
                        yield event
                yield "data: [DONE]\n\n"
            except Exception as error:  # noqa: BLE001 - the status line is sent: report in the stream
                api_error = _to_api_error(error)
                record.status, record.error = api_error.status, api_error.message
                yield _sse(protocol.ErrorResponse(error=protocol.ErrorInfo(
                    message=api_error.message, type=api_error.type, param=api_error.param, code=api_error.code)))
                yield "data: [DONE]\n\n"
            except BaseException:  # cancelled: the client went away mid-stream
                record.status, record.error = CLIENT_CLOSED, "client disconnected"
                raise
            finally:
                self._finish(record, span)

        return _ClosingStreamingResponse(body(), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def _start_span(self, raw: Request, body, record: RequestRecord):
        if self.tracer is None:
            return None
        max_tokens = body.requested_max_tokens if isinstance(body, ChatCompletionRequest) else body.max_tokens
        return self.tracer.start_request_span(record.operation, record.model, raw.headers, {
            "gen_ai.request.max_tokens": max_tokens, "gen_ai.request.temperature": body.temperature,
            "gen_ai.request.top_p": body.top_p, "gen_ai.request.top_k": body.top_k,
            "gen_ai.request.seed": body.seed, "gen_ai.request.choice.count": body.n,
            "gen_ai.request.stream": body.stream, "gen_ai.response.id": record.request_id,
            "gen_ai.response.model": record.model})

    def _finish(self, record: RequestRecord, span) -> None:
        admitted = self._admitted.pop(record.request_id, None)
        if admitted is not None:
            key, generation = admitted
            prompt, completion = generation.usage() if generation is not None else (0, 0)
            self.guard.release(key, max(prompt, record.prompt_tokens), max(completion, record.completion_tokens))
        if span is not None:
            self.tracer.end_request_span(span, {
                "gen_ai.usage.input_tokens": record.prompt_tokens,
                "gen_ai.usage.output_tokens": record.completion_tokens,
                "gen_ai.response.finish_reasons": tuple(record.finish_reasons),
                "gen_ai.latency.time_in_queue": record.queue_seconds,
                "gen_ai.latency.time_to_first_token": record.ttft_seconds,
                "gen_ai.latency.e2e": time.monotonic() - record.arrival_time,
                "http.response.status_code": record.status}, error=record.error)
        if self.log_requests:
            record.log()

    # ---------------------------------------------------------------- the small endpoints
    def tokenize(self, body: TokenizeRequest) -> dict:
        self.check_model(body.model)
        tokenizer = self.require_tokenizer()
        if body.messages is not None:
            messages = ChatCompletionRequest(messages=body.messages).template_messages()
            tokens = self.chat_prompt(messages, body.add_generation_prompt)["prompt_token_ids"]
        else:
            tokens = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"count": len(tokens), "max_model_len": self.max_model_len, "tokens": tokens,
                "token_strs": tokenizer.convert_ids_to_tokens(tokens)}

    def detokenize(self, body: DetokenizeRequest) -> dict:
        self.check_model(body.model)
        tokenizer = self.require_tokenizer()
        bad = [token for token in body.tokens if not 0 <= token < len(tokenizer)]
        if bad:
            raise APIError(400, f"invalid token ids {bad[:5]}: allowed integers in [0, {len(tokenizer)})",
                           param="tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    def models(self) -> dict:
        cards = [protocol.ModelCard(id=name, root=self.engine.config.model, max_model_len=self.max_model_len)
                 for name in self.model_names]
        return protocol.ModelList(data=cards).model_dump()

    def healthy(self) -> bool:
        return getattr(self.engine, "_dead", None) is None


# -------------------------------------------------------------------- the app
def build_app(server: OpenAIServer) -> FastAPI:
    app = FastAPI(title="Serval", version=serval.__version__, docs_url=None, redoc_url=None)
    app.state.server = server

    @app.post("/v1/completions")
    async def completions(raw: Request):
        return await server.handle(raw, CompletionRequest, server.create_completion, "text_completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(raw: Request):
        return await server.handle(raw, ChatCompletionRequest, server.create_chat_completion, "chat")

    @app.get("/v1/models")
    async def models():
        return server.models()

    @app.get("/health")
    async def health():
        if not server.healthy():
            return APIError(503, "the engine has stopped", type="server_error").response()
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": serval.__version__}

    @app.post("/tokenize")
    async def tokenize(raw: Request):
        return await _simple(raw, TokenizeRequest, server.tokenize)

    @app.post("/detokenize")
    async def detokenize(raw: Request):
        return await _simple(raw, DetokenizeRequest, server.detokenize)

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return APIError(error.status_code, str(error.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def unexpected(_: Request, error: Exception):
        logger.exception("unhandled error")
        return APIError(500, f"internal error: {error!r}", type="server_error").response()

    routes = {route.path for route in app.routes}
    return _ObservedApp(app, server, routes)


class _ObservedApp:
    """ASGI wrapper: API-key check on /v1 and HTTP metrics. Plain ASGI rather than BaseHTTPMiddleware, which
    would stand between the handlers and the disconnect messages they watch for."""

    def __init__(self, app: FastAPI, server: OpenAIServer, routes: set[str]) -> None:
        self.app, self.server, self.routes = app, server, routes
        self.state = app.state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.monotonic()
        status = 500
        path = scope["path"]

        async def observed_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            guard = self.server.guard
            if guard is not None and guard.requires_keys and path.startswith("/v1"):
                try:
                    key = guard.authenticate(_header(scope, b"authorization"), RequestContext())
                except GuardRejection as rejection:
                    status = rejection.status
                    return await APIError.from_rejection(rejection).response()(scope, receive, send)
                scope.setdefault("state", {})["guard_key"] = key
            elif self.server.api_key is not None and path.startswith("/v1") and not self._authorized(scope):
                status = 401
                response = APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                                    code="invalid_api_key").response()
                return await response(scope, receive, send)
            await self.app(scope, receive, observed_send)
        finally:
            handler = path if path in self.routes else "other"
            self.server.metrics.observe_http(scope["method"], handler, status, time.monotonic() - started)

    def _authorized(self, scope) -> bool:
        headers = dict(scope["headers"])
        return headers.get(b"authorization", b"").decode("latin-1") == f"Bearer {self.server.api_key}"


def serve(engine: AsyncEngine, host: str, port: int, served_model_names: list[str], api_key: str | None = None,
          max_waiting_requests: int | None = None, otlp_traces_endpoint: str | None = None,
          log_requests: bool = True, access_log: bool = True, log_level: str = "info",
          guard: Guard | None = None) -> None:
    """Run the server until SIGINT/SIGTERM; the engine is shut down on exit. SIGHUP reloads the policy."""
    tracer = RequestTracer(otlp_traces_endpoint) if otlp_traces_endpoint else None
    server = OpenAIServer(engine, served_model_names, api_key, max_waiting_requests, tracer, log_requests, guard)
    app = build_app(server)

    @contextlib.asynccontextmanager
    async def lifespan(_):
        if guard is not None:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, server.reload_policy)
        logger.info("serving", extra={"url": f"http://{host}:{port}", "model": server.model_name,
                                      "model_path": engine.config.model, "max_model_len": server.max_model_len,
                                      "policy": guard.policy.source if guard is not None else None})
        yield
        if guard is not None:
            await guard.classifier_client.close()

    app.app.router.lifespan_context = lifespan
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=access_log,
                            log_level=log_level, timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run()
    finally:
        if tracer is not None:
            tracer.shutdown()
        engine.shutdown()


# -------------------------------------------------------------------- helpers
class _PendingStream(Response):
    """What a handler returns to stream: `handle` turns it into the real response once it owns the record."""

    def __init__(self, events: AsyncIterator[str]) -> None:
        super().__init__()
        self.events = events


class _ClosingStreamingResponse(StreamingResponse):
    """Closes the body iterator however the response ends (Starlette leaves a cancelled one suspended)."""

    async def stream_response(self, send) -> None:
        async with aclosing(self.body_iterator):
            await super().stream_response(send)


class _StreamRails:
    """The output rails of one streamed response: a filter per choice, and which choices a stop rail ended."""

    def __init__(self, guard: Guard | None, ctx: RequestContext, num_choices: int) -> None:
        self.guard, self.ctx, self.num_choices = guard, ctx, num_choices
        self.filters: dict[int, OutputFilter | None] = {}
        self.stopped: set[int] = set()

    def done(self, key: int) -> bool:
        return key in self.stopped

    def all_stopped(self) -> bool:
        return len(self.stopped) == self.num_choices

    def filter(self, key: int, text: str, finish_reason: str | None) -> tuple[str, str | None]:
        if key not in self.filters:
            self.filters[key] = self.guard.output_filter(self.ctx) if self.guard is not None else None
        output_filter = self.filters[key]
        if output_filter is None:
            return text, finish_reason
        step = output_filter.push(text)
        if not step.stopped and finish_reason is not None:
            last = output_filter.finish()
            step = type(step)(step.text + last.text, last.stopped)
        if step.stopped:
            self.stopped.add(key)
            return step.text, "content_filter"
        return step.text, finish_reason


class _GuardObserver:
    """Guard decisions and rail latencies into the server's metrics, and a span per rail under the request's."""

    def __init__(self, metrics: ServerMetrics, tracer: RequestTracer | None) -> None:
        self.metrics, self.tracer = metrics, tracer

    def decision(self, decision: Decision, ctx: RequestContext) -> None:
        self.metrics.observe_guard_decision(decision.rail, decision.action)

    def latency(self, rail: str, seconds: float, ctx: RequestContext) -> None:
        self.metrics.observe_guard_latency(rail, seconds)
        if self.tracer is not None and ctx.trace is not None:
            from opentelemetry import trace
            end = time.time_ns()
            span = self.tracer.tracer.start_span(f"guard {rail}", context=trace.set_span_in_context(ctx.trace),
                                                 start_time=end - int(seconds * 1e9),
                                                 attributes={"serval.guard.rail": rail})
            span.end(end_time=end)


def _header(scope, name: bytes) -> str | None:
    value = dict(scope["headers"]).get(name)
    return value.decode("latin-1") if value is not None else None


class _SentState:
    """What a stream has sent of each choice, to send only what is new."""

    def __init__(self) -> None:
        self.text: dict[int, int] = {}
        self.tokens: dict[int, int] = {}
        self.done: set[int] = set()

    def first(self, key: int) -> bool:
        return self.tokens.get(key, 0) == 0 and self.text.get(key, 0) == 0

    def delta(self, key: int, completion: CompletionOutput):
        """(new text, new token ids, their logprobs) or None when nothing is new for this choice."""
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
        return text, token_ids, logprobs


async def _json_body(raw: Request):
    data = await raw.body()
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise APIError(400, f"The body is not valid JSON: {error}") from error


async def _simple(raw: Request, model_cls: type[BaseModel], handler: Callable) -> Response:
    try:
        return JSONResponse(handler(model_cls.model_validate(await _json_body(raw))))
    except Exception as error:  # noqa: BLE001
        return _to_api_error(error).response()


def _to_api_error(error: Exception) -> APIError:
    if isinstance(error, APIError):
        return error
    if isinstance(error, GuardRejection):
        return APIError.from_rejection(error)
    if isinstance(error, ValidationError):
        return APIError.from_validation_error(error)
    if isinstance(error, EngineDeadError):
        return APIError(503, f"The engine has stopped: {error}", type="server_error")
    if isinstance(error, ValueError):
        return APIError.from_value_error(error)
    logger.exception("unexpected error while handling a request", exc_info=error)
    return APIError(500, f"internal error: {error!r}", type="server_error")


def _sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


def _usage(record: RequestRecord) -> protocol.UsageInfo:
    return protocol.UsageInfo.of(record.prompt_tokens, record.completion_tokens, record.cached_tokens)


def _token_text(token_id: int, position: dict[int, Logprob] | None, tokenizer) -> str:
    if position is not None and token_id in position and position[token_id].decoded_token is not None:
        return position[token_id].decoded_token
    return tokenizer.decode([token_id]) if tokenizer is not None else str(token_id)


def _top(position: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    ranked = sorted(position.items(), key=lambda item: item[1].rank if item[1].rank is not None else 1 << 30)
    return ranked[:k]


def _add_completion_logprobs(target: protocol.CompletionLogprobs, token_ids: list[int],
                             positions: list | None, k: int, tokenizer) -> None:
    offset = target.text_offset[-1] + len(target.tokens[-1]) if target.tokens else 0
    for step, token_id in enumerate(token_ids):
        position = positions[step] if positions is not None and step < len(positions) else None
        token = _token_text(token_id, position, tokenizer)
        target.tokens.append(token)
        target.text_offset.append(offset)
        offset += len(token)
        if position is None:
            target.token_logprobs.append(None)
            target.top_logprobs.append(None)
            continue
        target.token_logprobs.append(position[token_id].logprob if token_id in position else None)
        target.top_logprobs.append({_token_text(t, position, tokenizer): lp.logprob for t, lp in _top(position, k)}
                                   if k else None)


def _chat_logprobs(token_ids: list[int], positions: list | None, k: int, tokenizer) -> protocol.ChatLogprobs:
    content = []
    for step, token_id in enumerate(token_ids):
        position = positions[step] if positions is not None and step < len(positions) else None
        token = _token_text(token_id, position, tokenizer)
        if position is None or token_id not in position:
            continue
        top = [protocol.TopLogprob(token=_token_text(t, position, tokenizer), logprob=lp.logprob,
                                   bytes=list(_token_text(t, position, tokenizer).encode()))
               for t, lp in _top(position, k)]
        content.append(protocol.TokenLogprob(token=token, logprob=position[token_id].logprob,
                                             bytes=list(token.encode()), top_logprobs=top))
    return protocol.ChatLogprobs(content=content)
