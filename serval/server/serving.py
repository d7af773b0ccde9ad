"""The completion and chat handlers. Both prepare prompts, start a FanIn, and then either collect whole choices
or stream deltas; one delta loop serves both, parameterised by a chunk builder (CompletionChunks, ChatChunks)
that knows its API's chunk shape."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi.responses import JSONResponse, Response

from serval.openai import protocol
from serval.openai.logprobs import add_completion_logprobs, chat_logprobs
from serval.openai.protocol import ChatCompletionRequest, CompletionRequest
from serval.openai.sse import Delta, SentState, sse
from serval.openai.tool_parsers import ToolCallDelta
from serval.openai.tool_parsers.chat_output import ChatDelta, ChatOutputParser
from serval.outputs import CompletionOutput, RequestOutput
from serval.server import admission
from serval.server.admission import ContextParams
from serval.server.fan_in import FanIn
from serval.server.lifecycle import Call, PendingStream
from serval.server.state import ServerState


# ---------------------------------------------------------------- completions
async def create_completion(state: ServerState, body: CompletionRequest, call: Call) -> Response:
    params = call.sampling_params(body)
    admission.check_n(state, params.n)
    raw_prompts = body.prompts()
    texts = await state.off_loop(admission.prompt_texts, state.tokenizer, raw_prompts)
    checkable = [i for i, text in enumerate(texts) if text is not None]
    checked = list(texts)
    for i, text in zip(checkable, call.session.check_input([texts[i] for i in checkable], "prompt")):
        checked[i] = text
    prompts = await state.off_loop(admission.completion_prompts, state.tokenizer, raw_prompts, texts, checked)
    if body.truncate_prompt_tokens is not None:
        prompts = [await state.off_loop(admission.truncate_prompt, state, prompt, body.truncate_prompt_tokens)
                   for prompt in prompts]
    for prompt in prompts:
        call.session.check_prompt_tokens(len(prompt["prompt_token_ids"]), "prompt")
        admission.check_context(state, len(prompt["prompt_token_ids"]), params.max_tokens, "prompt",
                                ContextParams("prompt", "max_tokens"))
    conversations = [[{"role": "user", "content": prompt["prompt"]}] for prompt in prompts]
    fan_in = await start(state, call, prompts, params, conversations, "prompt")
    chunks = CompletionChunks(call, body, state.tokenizer, [prompt["prompt"] for prompt in prompts])
    if body.stream:
        return PendingStream(stream_deltas(fan_in, chunks, call, body.include_usage_in_stream))
    finals = await collect(fan_in)
    choices = [chunks.whole_choice(index, output, completion, *whole_text(call, completion))
               for index, output in enumerate(finals) for completion in output.outputs]
    return JSONResponse(protocol.CompletionResponse(id=call.record.request_id, model=call.record.model,
                                                    choices=choices, usage=call.usage()).model_dump())


@dataclass
class CompletionChunks:
    """The legacy completions API's shapes; `echo` puts the prompt (and its logprobs) before the first text."""
    call: Call
    body: CompletionRequest
    tokenizer: object
    prompt_texts: list[str]
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def n(self) -> int:
        return self.body.n

    @property
    def wants_logprobs(self) -> bool:
        return self.body.logprobs is not None

    def opening(self) -> list[str]:
        return []

    def _logprobs(self, output: RequestOutput, token_ids: list[int], positions, with_prompt: bool):
        if self.body.logprobs is None:
            return None
        logprobs = protocol.CompletionLogprobs()
        if with_prompt:
            add_completion_logprobs(logprobs, output.prompt_token_ids, output.prompt_logprobs, self.body.logprobs,
                                    self.tokenizer)
        add_completion_logprobs(logprobs, token_ids, positions, self.body.logprobs, self.tokenizer)
        return logprobs

    def whole_choice(self, prompt_index: int, output: RequestOutput, completion: CompletionOutput, text: str,
                     finish_reason: str | None) -> protocol.CompletionChoice:
        echo = self.body.echo
        ids = self.body.return_token_ids
        return protocol.CompletionChoice(
            index=prompt_index * self.n + completion.index,
            text=self.prompt_texts[prompt_index] + text if echo else text,
            logprobs=self._logprobs(output, completion.token_ids, completion.logprobs, echo),
            finish_reason=finish_reason, stop_reason=completion.stop_reason,
            prompt_token_ids=list(output.prompt_token_ids) if ids else None,
            token_ids=list(completion.token_ids) if ids else None)

    def chunk(self, key: int, prompt_index: int, output: RequestOutput, completion: CompletionOutput, delta: Delta,
              text: str, finish_reason: str | None, first: bool) -> str:
        echo = self.body.echo and first
        ids = self.body.return_token_ids
        choice = protocol.CompletionChoice(
            index=key, text=self.prompt_texts[prompt_index] + text if echo else text,
            logprobs=self._logprobs(output, delta.token_ids, delta.logprobs, echo),
            finish_reason=finish_reason, stop_reason=completion.stop_reason,
            prompt_token_ids=list(output.prompt_token_ids) if ids and first else None,
            token_ids=list(delta.token_ids) if ids else None)
        return sse(protocol.CompletionResponse(id=self.call.record.request_id, created=self.created,
                                               model=self.call.record.model, choices=[choice]))

    def usage_chunk(self) -> str:
        return sse(protocol.CompletionResponse(id=self.call.record.request_id, created=self.created,
                                               model=self.call.record.model, choices=[], usage=self.call.usage()))


# ---------------------------------------------------------------- chat
async def create_chat_completion(state: ServerState, body: ChatCompletionRequest, call: Call) -> Response:
    admission.apply_template_defaults(state.config, body)
    params = call.sampling_params(body)
    admission.check_n(state, params.n)
    output_parsers = admission.chat_output_parsers(state.config, body)
    params = await state.off_loop(admission.chat_sampling_params, state.config, state.tokenizer, body, params,
                                  output_parsers())
    messages = body.template_messages()
    contents = call.session.check_input([message["content"] for message in messages], "messages")
    messages = [{**message, "content": content} for message, content in zip(messages, contents)]
    prompt = await state.off_loop(admission.chat_prompt, state.tokenizer, messages, body.add_generation_prompt,
                                  body.template_tools(), body.chat_template_kwargs, body.continue_final_message)
    if body.truncate_prompt_tokens is not None:
        prompt = await state.off_loop(admission.truncate_prompt, state, prompt, body.truncate_prompt_tokens)
    call.session.check_prompt_tokens(len(prompt["prompt_token_ids"]), "messages")
    admission.check_context(state, len(prompt["prompt_token_ids"]), params.max_tokens, "messages",
                            ContextParams("messages", body.max_tokens_param))
    fan_in = await start(state, call, [prompt], params, [messages], "messages")
    chunks = ChatChunks(call, body, state.tokenizer, output_parsers, prompt["prompt_token_ids"])
    if body.stream:
        return PendingStream(stream_deltas(fan_in, chunks, call, body.include_usage_in_stream))
    (output,) = await collect(fan_in)
    choices = [chunks.whole_choice(completion, *whole_text(call, completion)) for completion in output.outputs]
    return JSONResponse(protocol.ChatCompletionResponse(
        id=call.record.request_id, model=call.record.model, choices=choices, usage=call.usage(),
        prompt_token_ids=list(prompt["prompt_token_ids"]) if body.return_token_ids else None).model_dump())


@dataclass
class ChatChunks:
    """Chat's shapes: every choice opens with an assistant-role delta. Each choice's text (after the output rails,
    which so see the reasoning and the calls too) goes through its own output parser: reasoning, content and tool
    calls apart."""
    call: Call
    body: ChatCompletionRequest
    tokenizer: object
    new_parser: Callable[[], ChatOutputParser] = ChatOutputParser
    prompt_token_ids: list[int] = field(default_factory=list)  # sent in the first chunk with return_token_ids
    created: int = field(default_factory=lambda: int(time.time()))
    parsers: dict[int, ChatOutputParser] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.body.n

    @property
    def wants_logprobs(self) -> bool:
        return self.body.logprobs

    def _logprobs(self, token_ids: list[int], positions):
        if not self.body.logprobs:
            return None
        return chat_logprobs(token_ids, positions, self.body.top_logprobs or 0, self.tokenizer)

    def _event(self, choices: list[protocol.ChatStreamChoice], usage=None, prompt_token_ids=None) -> str:
        return sse(protocol.ChatCompletionChunk(id=self.call.record.request_id, created=self.created,
                                                model=self.call.record.model, choices=choices, usage=usage,
                                                prompt_token_ids=prompt_token_ids))

    def opening(self) -> list[str]:
        prompt_ids = list(self.prompt_token_ids) if self.body.return_token_ids else None
        return [self._event([protocol.ChatStreamChoice(index=index, delta=protocol.DeltaMessage(
            role="assistant", content=""))], prompt_token_ids=prompt_ids if index == 0 else None)
            for index in range(self.n)]

    def whole_choice(self, completion: CompletionOutput, text: str, finish_reason: str | None) -> protocol.ChatChoice:
        parser = self.new_parser()
        parser.feed(text)
        parser.finish()
        parsed = parser.result()
        message = protocol.ChatResponseMessage(
            content=text if plain(parser) else parsed.content, reasoning_content=parsed.reasoning,
            tool_calls=[protocol.AssistantToolCall(**call.to_openai()) for call in parsed.tool_calls])
        return protocol.ChatChoice(index=completion.index, message=message,
                                   logprobs=self._logprobs(completion.token_ids, completion.logprobs),
                                   finish_reason=api_finish_reason(parser, finish_reason),
                                   stop_reason=completion.stop_reason,
                                   token_ids=list(completion.token_ids) if self.body.return_token_ids else None)

    def chunk(self, key: int, prompt_index: int, output: RequestOutput, completion: CompletionOutput, delta: Delta,
              text: str, finish_reason: str | None, first: bool) -> str | None:
        """The choice's next chunk, or None when its parser holds everything back (a marker may be forming)."""
        parser = self.parsers.get(key)
        if parser is None:
            parser = self.parsers[key] = self.new_parser()
        parsed = parser.feed(text)
        if finish_reason is not None:
            last = parser.finish()
            parsed = ChatDelta(parsed.reasoning + last.reasoning, parsed.content + last.content,
                               merge_tool_call_deltas(parsed.tool_calls + last.tool_calls))
        if not parsed and finish_reason is None and not self.wants_logprobs and not self.body.return_token_ids:
            return None  # (with token ids every delta is sent: its ids are not held back with its text)
        if plain(parser):
            message = protocol.DeltaMessage(content=text)
        else:
            message = protocol.DeltaMessage(
                content=parsed.content or None, reasoning_content=parsed.reasoning or None,
                tool_calls=[protocol.DeltaToolCall(**item.to_openai()) for item in parsed.tool_calls] or None)
        return self._event([protocol.ChatStreamChoice(
            index=key, delta=message, logprobs=self._logprobs(delta.token_ids, delta.logprobs),
            finish_reason=api_finish_reason(parser, finish_reason),
            token_ids=list(delta.token_ids) if self.body.return_token_ids else None)])

    def usage_chunk(self) -> str:
        return self._event([], usage=self.call.usage())


def plain(parser: ChatOutputParser) -> bool:
    """No reasoning and no tool calls to parse: the text is the content, as it always was."""
    return parser.reasoning is None and parser.tools is None


def api_finish_reason(parser: ChatOutputParser, finish_reason: str | None) -> str | None:
    if finish_reason is None or finish_reason == "content_filter":
        return finish_reason
    return parser.result().finish_reason(finish_reason)


def merge_tool_call_deltas(deltas: list[ToolCallDelta]) -> list[ToolCallDelta]:
    """Argument fragments of one call in one chunk joined, as the parsers join them within one delta (the entry
    that opens a call stays apart: it carries the name, the next ones the arguments)."""
    merged: list[ToolCallDelta] = []
    for item in deltas:
        if merged and merged[-1].index == item.index and merged[-1].id is None and item.id is None:
            previous = merged[-1].function
            previous.arguments = (previous.arguments or "") + (item.function.arguments or "")
        else:
            merged.append(item)
    return merged


# ---------------------------------------------------------------- shared
async def start(state: ServerState, call: Call, prompts: list[dict], params, conversations: list[list[dict]],
                param: str) -> FanIn:
    """Hand the prompts to the engine, once the key has the tokens they may use reserved (budgets cannot overshoot
    however many run at once; `release` settles the reservation). A classifier rail's verdicts are asked for at the same time and awaited
    here, while the engine runs the prefill: an unsafe verdict aborts the requests before any output is sent."""
    # Not on the event loop: a grammar can take seconds to compile, a long bad_words list one to tokenize.
    params = await state.off_loop(state.engine.prepare_sampling, params)
    if call.lora_request is not None:  # in host memory before add_request (a cache miss reads the disk)
        await asyncio.to_thread(state.engine.add_lora, call.lora_request)
    call.session.reserve(*admission.token_reservation(state, prompts, params))
    admission.check_capacity(state)
    if call.cache_salt is not None:
        prompts = [{**prompt, "cache_salt": call.cache_salt} for prompt in prompts]
    fan_in = FanIn(state.metrics, state.model_name, call.record)
    # No await between the capacity check and the engine taking the requests: concurrent requests see each other.
    fan_in.start(state.engine, prompts, params, call.lora_request, call.priority)
    call.fan_in = fan_in
    state.open_fan_ins.add(fan_in)  # until `finish`: what the shutdown deadline interrupts
    verdicts = asyncio.ensure_future(call.session.classify(conversations, param))
    try:
        await verdicts
    except BaseException:
        verdicts.cancel()
        await fan_in.close()
        raise
    return fan_in


def whole_text(call: Call, completion: CompletionOutput) -> tuple[str, str | None]:
    """A whole completion through the output rails: (text, finish_reason)."""
    step = call.session.filter_whole(completion.text)
    return step.text, "content_filter" if step.stopped else completion.finish_reason


async def collect(fan_in: FanIn) -> list[RequestOutput]:
    finals: dict[int, RequestOutput] = {}
    try:
        async for index, output in fan_in.outputs():
            if output.finished:
                finals[index] = output
    finally:
        await fan_in.close()
    return [finals[index] for index in sorted(finals)]


async def stream_deltas(fan_in: FanIn, chunks: "CompletionChunks | ChatChunks", call: Call,
                        include_usage: bool) -> AsyncIterator[str]:
    """The delta loop both APIs stream with: what is new in each choice, through the rails, as `chunks` shapes
    it. Choice keys are global: prompt index × n + choice index."""
    n = chunks.n
    sent = SentState()
    rails = call.session.choice_filters(len(fan_in.tasks) * n)
    try:
        for event in chunks.opening():
            yield event
        async for index, output in fan_in.outputs():
            for completion in output.outputs:
                key = index * n + completion.index
                first = sent.first(key)
                delta = sent.delta(key, completion)
                if delta is None or rails.done(key):
                    continue
                step = rails.filter(key, delta.text, completion.finish_reason is not None)
                text = step.text
                finish_reason = "content_filter" if step.stopped else completion.finish_reason
                if not text and finish_reason is None and not chunks.wants_logprobs:
                    continue  # the rails hold this delta back (a match may be forming)
                event = chunks.chunk(key, index, output, completion, delta, text, finish_reason, first)
                if event is not None:
                    yield event
            if rails.all_stopped:
                break  # every choice hit a stop rail: closing the fan-in aborts the engine requests
        if include_usage:
            yield chunks.usage_chunk()
    finally:
        await fan_in.close()
