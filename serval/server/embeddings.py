"""The pooling handlers: /v1/embeddings, /v1/score and /v1/rerank, on a server started with --runner pooling.

Each input becomes one engine request (prefill only, serval.engine.pooling); they run batched by the scheduler and
their results come back in input order. Tokenizing happens on the server's worker thread, never on the event loop.
A generative server answers these endpoints with a 400 naming its runner (and a pooling server answers the
generation endpoints likewise, from the engine).
"""
from __future__ import annotations

import asyncio
import time
from contextlib import aclosing

from fastapi.responses import JSONResponse, Response

from serval.engine.pooling import PoolingRequestOutput, cosine_similarity, pair_token_ids
from serval.openai.embeddings import EmbeddingData, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage, \
    RerankRequest, RerankResponse, RerankUsage, ScoreData, ScoreRequest, ScoreResponse, encode_embedding, \
    rerank_results, score_pairs
from serval.openai.errors import APIError, InvalidArgument
from serval.pooling_params import PoolingParams
from serval.server import admission
from serval.server.lifecycle import Call
from serval.server.state import ServerState


async def create_embedding(state: ServerState, body: EmbeddingRequest, call: Call) -> Response:
    require_pooling(state, "/v1/embeddings", "embed")
    params = PoolingParams(dimensions=body.dimensions)
    prefix = state.engine.instruction_prefix(body.prompt_name)
    inputs = body.inputs()
    texts = [item for item in inputs if isinstance(item, str)]
    checked = iter(call.session.check_input(texts, "input", conversation=False)) if texts else iter(())
    # The guard reads what the user sent; the model's instruction goes before it afterwards.
    inputs = [prefix + next(checked) if isinstance(item, str) else item for item in inputs]
    prompts = await state.off_loop(_tokenized, state.tokenizer, inputs)
    outputs = await run_pooling(state, call, prompts, params)
    data = [EmbeddingData(index=index, embedding=encode_embedding(output.outputs.data.tolist(),
                                                                  body.encoding_format))
            for index, output in enumerate(outputs)]
    return JSONResponse(EmbeddingResponse(id=call.record.request_id, model=call.record.model, data=data,
                                          usage=_usage(outputs)).model_dump())


async def create_score(state: ServerState, body: ScoreRequest, call: Call) -> Response:
    require_pooling(state, "/v1/score")
    pairs = score_pairs(body.text_1, body.text_2)
    scores, outputs = await score(state, call, pairs, PoolingParams(activation=body.activation))
    data = [ScoreData(index=index, score=value) for index, value in enumerate(scores)]
    return JSONResponse(ScoreResponse(id=call.record.request_id, model=call.record.model, data=data,
                                      usage=_usage(outputs)).model_dump())


async def create_rerank(state: ServerState, body: RerankRequest, call: Call) -> Response:
    require_pooling(state, "/v1/rerank")
    documents = body.document_texts()
    scores, outputs = await score(state, call, [(body.query, document) for document in documents],
                                  PoolingParams(activation=body.activation))
    results = rerank_results(scores, documents, body.top_n, body.return_documents)
    usage = RerankUsage(total_tokens=sum(len(output.prompt_token_ids) for output in outputs))
    return JSONResponse(RerankResponse(id=call.record.request_id, model=call.record.model, usage=usage,
                                       results=results).model_dump(exclude_none=True))


def require_pooling(state: ServerState, endpoint: str, task: str | None = None) -> None:
    """400 naming the runner when this server's model can't answer the endpoint."""
    served = state.engine.pooling_task
    if served is None:
        raise APIError(400, f"The model `{state.model_name}` is served by the generate runner (text generation); "
                            f"{endpoint} needs a pooling model (embeddings, score, rerank) served with --runner "
                            "pooling.", param="model", code="wrong_runner")
    if task is not None and served != task:
        raise APIError(400, f"The model `{state.model_name}` is a classifier (the pooling runner's score task); "
                            f"{endpoint} needs an embedding model. Use /v1/score or /v1/rerank.", param="model",
                       code="wrong_runner")


async def score(state: ServerState, call: Call, pairs: list[tuple[str, str]],
                params: PoolingParams) -> tuple[list[float], list[PoolingRequestOutput]]:
    """One score per (first, second) pair: a cross-encoder reads the pair as one prompt; an embedder compares the
    two texts' embeddings by cosine similarity (each distinct text embedded once)."""
    if state.engine.pooling_task == "classify":
        prompts = await state.off_loop(_pair_prompts, state.tokenizer, pairs)
        outputs = await run_pooling(state, call, prompts, params)
        return [float(output.outputs.data[0]) for output in outputs], outputs
    texts = list(dict.fromkeys(text for pair in pairs for text in pair))
    outputs = await run_pooling(state, call, await state.off_loop(_tokenized, state.tokenizer, texts), params)
    embeddings = {text: output.outputs.data for text, output in zip(texts, outputs)}
    return [cosine_similarity(embeddings[first], embeddings[second]) for first, second in pairs], outputs


async def run_pooling(state: ServerState, call: Call, prompts: list[dict],
                      params: PoolingParams) -> list[PoolingRequestOutput]:
    """Run every prompt as its own engine request; their finished outputs, in order. Leaving early (an error, a
    client gone) aborts the ones still running."""
    for prompt in prompts:
        call.session.check_prompt_tokens(len(prompt["prompt_token_ids"]), "input")
    # As generation's admission (serving.start): the key's budget holds the prompts, and --max-waiting-requests
    # applies, with no await between the check and the engine taking the requests.
    call.session.reserve(sum(len(prompt["prompt_token_ids"]) for prompt in prompts), 0)
    admission.check_capacity(state)
    base = call.record.request_id
    streams = []
    tasks: list[asyncio.Task] = []
    try:
        for index, prompt in enumerate(prompts):
            streams.append(state.engine.add_request(f"{base}-{index}", prompt, params))
        tasks = [asyncio.ensure_future(_final(stream)) for stream in streams]
        outputs = await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.close()
    for output in outputs:
        _observe(state, call, output)
    return outputs


async def _final(stream) -> PoolingRequestOutput:
    final = None
    async with aclosing(stream):
        async for output in stream:
            final = output
    return final


def _observe(state: ServerState, call: Call, output: PoolingRequestOutput) -> None:
    """The request's log record and the metrics a generation request feeds, less the token-timing ones."""
    metrics = state.metrics
    num_prompt_tokens = len(output.prompt_token_ids)
    call.record.prompt_tokens += num_prompt_tokens
    call.record.cached_tokens += output.num_cached_tokens
    call.record.finish_reasons.append(output.finish_reason)
    metrics.request_success.labels(metrics.model_name, output.finish_reason).inc()
    metrics.prompt_tokens.observe(num_prompt_tokens)
    if output.metrics is not None:
        finished = output.metrics.finished_time or time.monotonic()
        metrics.e2e_latency.observe(finished - output.metrics.arrival_time)
        if output.metrics.first_scheduled_time is not None:
            metrics.queue_time.observe(output.metrics.first_scheduled_time - output.metrics.arrival_time)
            metrics.prefill_time.observe(finished - output.metrics.first_scheduled_time)


def _usage(outputs: list[PoolingRequestOutput]) -> EmbeddingUsage:
    num_tokens = sum(len(output.prompt_token_ids) for output in outputs)
    return EmbeddingUsage(prompt_tokens=num_tokens, total_tokens=num_tokens)


def _tokenized(tokenizer, inputs: list[str | list[int]]) -> list[dict]:
    """Engine prompts: strings through the tokenizer (its special tokens, as the model was trained), token arrays
    as they are."""
    prompts = []
    for item in inputs:
        if isinstance(item, str):
            if tokenizer is None:
                raise InvalidArgument("input", "invalid input: this server has no tokenizer; send token arrays")
            prompts.append({"prompt": item, "prompt_token_ids": tokenizer.encode(item)})
        else:
            prompts.append({"prompt_token_ids": list(item)})
    return prompts


def _pair_prompts(tokenizer, pairs: list[tuple[str, str]]) -> list[dict]:
    return [{"prompt": first + second, "prompt_token_ids": pair_token_ids(tokenizer, first, second)}
            for first, second in pairs]
