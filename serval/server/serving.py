"""The completion and chat handlers. Both prepare prompts, start a FanIn, and then either collect whole choices
or stream deltas; one delta loop serves both, parameterised by a chunk builder (CompletionChunks, ChatChunks)
that knows its API's chunk shape."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi.responses import JSONResponse, Response

from serval.openai import protocol
from serval.openai.logprobs import add_completion_logprobs, chat_logprobs
from serval.openai.protocol import ChatCompletionRequest, CompletionRequest
from serval.openai.sse import Delta, SentState, sse
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
        return protocol.CompletionChoice(
            index=prompt_index * self.n + completion.index,
            text=self.prompt_texts[prompt_index] + text if echo else text,
            logprobs=self._logprobs(output, completion.token_ids, completion.logprobs, echo),
            finish_reason=finish_reason, stop_reason=completion.stop_reason)

    def chunk(self, key: int, prompt_index: int, output: RequestOutput, completion: CompletionOutput, delta: Delta,
              text: str, finish_reason: str | None, first: bool) -> str:
        echo = self.body.echo and first
        choice = protocol.CompletionChoice(
            index=key, text=self.prompt_texts[prompt_index] + text if echo else text,
            logprobs=self._logprobs(output, delta.token_ids, delta.logprobs, echo),
            finish_reason=finish_reason, stop_reason=completion.stop_reason)
        return sse(protocol.CompletionResponse(id=self.call.record.request_id, created=self.created,
                                               model=self.call.record.model, choices=[choice]))

    def usage_chunk(self) -> str:
        return sse(protocol.CompletionResponse(id=self.call.record.request_id, created=self.created,
                                               model=self.call.record.model, choices=[], usage=self.call.usage()))


# ---------------------------------------------------------------- chat
async def create_chat_completion(state: ServerState, body: ChatCompletionRequest, call: Call) -> Response:
    params = call.sampling_params(body)
    admission.check_n(state, params.n)
    messages = body.template_messages()
    contents = call.session.check_input([message["content"] for message in messages], "messages")
    messages = [{**message, "content": content} for message, content in zip(messages, contents)]
    prompt = await state.off_loop(admission.chat_prompt, state.tokenizer, messages, body.add_generation_prompt)
    call.session.check_prompt_tokens(len(prompt["prompt_token_ids"]), "messages")
    admission.check_context(state, len(prompt["prompt_token_ids"]), params.max_tokens, "messages",
                            ContextParams("messages", body.max_tokens_param))
    fan_in = await start(state, call, [prompt], params, [messages], "messages")
    chunks = ChatChunks(call, body, state.tokenizer)
    if body.stream:
        return PendingStream(stream_deltas(fan_in, chunks, call, body.include_usage_in_stream))
    (output,) = await collect(fan_in)
    choices = [chunks.whole_choice(completion, *whole_text(call, completion)) for completion in output.outputs]
    return JSONResponse(protocol.ChatCompletionResponse(id=call.record.request_id, model=call.record.model,
                                                        choices=choices, usage=call.usage()).model_dump())


@dataclass
class ChatChunks:
    """Chat's shapes: every choice opens with an assistant-role delta."""
    call: Call
    body: ChatCompletionRequest
    tokenizer: object
    created: int = field(default_factory=lambda: int(time.time()))

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

    def _event(self, choices: list[protocol.ChatStreamChoice], usage=None) -> str:
        return sse(protocol.ChatCompletionChunk(id=self.call.record.request_id, created=self.created,
                                                model=self.call.record.model, choices=choices, usage=usage))

    def opening(self) -> list[str]:
        return [self._event([protocol.ChatStreamChoice(index=index, delta=protocol.DeltaMessage(
            role="assistant", content=""))]) for index in range(self.n)]

    def whole_choice(self, completion: CompletionOutput, text: str, finish_reason: str | None) -> protocol.ChatChoice:
        return protocol.ChatChoice(index=completion.index, message=protocol.ChatResponseMessage(content=text),
                                   logprobs=self._logprobs(completion.token_ids, completion.logprobs),
                                   finish_reason=finish_reason, stop_reason=completion.stop_reason)

    def chunk(self, key: int, prompt_index: int, output: RequestOutput, completion: CompletionOutput, delta: Delta,
              text: str, finish_reason: str | None, first: bool) -> str:
        return self._event([protocol.ChatStreamChoice(
            index=key, delta=protocol.DeltaMessage(content=text),
            logprobs=self._logprobs(delta.token_ids, delta.logprobs), finish_reason=finish_reason)])

    def usage_chunk(self) -> str:
        return self._event([], usage=self.call.usage())


# ---------------------------------------------------------------- shared
async def start(state: ServerState, call: Call, prompts: list[dict], params, conversations: list[list[dict]],
                param: str) -> FanIn:
    """Hand the prompts to the engine, once the key has the tokens they may use reserved (budgets cannot overshoot
    however many run at once; `release` settles the reservation). A classifier rail's verdicts are asked for at the same time and awaited
    here, while the engine runs the prefill: an unsafe verdict aborts the requests before any output is sent."""
    await state.off_loop(state.engine.compile_grammar, params)  # not on the event loop: it can take seconds
    call.session.reserve(*admission.token_reservation(state, prompts, params))
    admission.check_capacity(state)
    fan_in = FanIn(state.metrics, state.model_name, call.record)
    # No await between the capacity check and the engine taking the requests: concurrent requests see each other.
    fan_in.start(state.engine, prompts, params)
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
                yield chunks.chunk(key, index, output, completion, delta, text, finish_reason, first)
            if rails.all_stopped:
                break  # every choice hit a stop rail: closing the fan-in aborts the engine requests
        if include_usage:
            yield chunks.usage_chunk()
    finally:
        await fan_in.close()
