"""EngineCoreClient: the AsyncEngine interface with the engine in a child process. Bad input is refused at
add_request (nothing reaches the core), as AsyncEngine refuses it; a core that cannot start says why instead of
hanging; an aborted stream frees its request in the core; greedy streams equal AsyncEngine's."""
import asyncio
from contextlib import aclosing

import pytest

from serval.config import EngineConfig
from serval.engine.async_engine import AsyncEngine
from serval.engine.core_client import EngineCoreClient
from serval.openai.errors import InvalidArgument
from serval.sampling_params import SamplingParams

ENGINE_ARGS = dict(skip_tokenizer_init=True, max_num_seqs=4, max_num_batched_tokens=32, block_size=4,
                   max_model_len=128, num_gpu_blocks_override=64)
PROMPTS = [[5, 6, 7], [100, 3], [9, 9, 9, 9, 9], [250, 1, 17]]


@pytest.fixture(scope="module")
def client(tiny_models):
    client = EngineCoreClient(EngineConfig(model=tiny_models("llama")[0], **ENGINE_ARGS))
    yield client
    client.shutdown()


async def greedy_tokens(engine, max_tokens=10):
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)

    async def one(index, prompt):
        last = None
        async for last in engine.generate({"prompt_token_ids": prompt}, params, request_id=f"g{index}"):
            pass
        return last.outputs[0].token_ids

    return await asyncio.gather(*(one(index, prompt) for index, prompt in enumerate(PROMPTS)))


def test_greedy_streams_equal_the_in_process_engine(client, tiny_models):
    engine = AsyncEngine(EngineConfig(model=tiny_models("llama")[0], **ENGINE_ARGS))
    try:
        expected = asyncio.run(greedy_tokens(engine))
    finally:
        engine.shutdown()
    assert asyncio.run(greedy_tokens(client)) == expected
    assert client.core_pid is not None and client.num_unfinished_requests == 0


def test_bad_input_is_refused_at_once(client):
    async def add(prompt, params):
        return client.add_request("bad", {"prompt_token_ids": prompt}, params)

    with pytest.raises(InvalidArgument) as error:
        asyncio.run(add([1] * 200, SamplingParams(max_tokens=2)))
    assert error.value.param == "prompt"
    with pytest.raises(InvalidArgument) as error:
        asyncio.run(add([1, 2], SamplingParams(max_tokens=2, stop_token_ids=[10**6])))
    assert error.value.param == "stop_token_ids"
    assert client.num_unfinished_requests == 0 and not client.is_dead


def test_abort_frees_the_request_in_the_core(client):
    async def scenario():
        stream = client.add_request("long", {"prompt_token_ids": [3, 4, 5]},
                                    SamplingParams(max_tokens=100, ignore_eos=True))
        async with aclosing(stream):
            async for output in stream:
                if len(output.outputs[0].token_ids) >= 3:
                    break
        for _ in range(200):
            if client.num_running == 0 and client.get_stats().num_free_blocks == client.get_stats().num_blocks:
                return True
            await asyncio.sleep(0.05)
        return False

    assert asyncio.run(scenario())


def test_start_up_errors_reach_the_caller(tmp_path):
    with pytest.raises((FileNotFoundError, ValueError)):
        EngineCoreClient(EngineConfig(model=str(tmp_path / "no-such-model"), **ENGINE_ARGS))
