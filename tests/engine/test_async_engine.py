"""AsyncEngine: many concurrent streams through one background loop, aborts, bad input."""
import asyncio
import time
from contextlib import aclosing

import pytest

from serval import AsyncEngine, LLM, SamplingParams
from serval.config import EngineConfig
from serval.engine.async_engine import EngineDeadError, RequestFailedError
from serval.openai.errors import InvalidArgument
from tests.engine.test_engine import fail_once, hf_greedy

ENGINE_ARGS = dict(skip_tokenizer_init=True, max_num_seqs=4, max_num_batched_tokens=32, block_size=4,
                   max_model_len=128, num_gpu_blocks_override=64)


@pytest.fixture(scope="module")
def engine(tiny_models):
    engine = AsyncEngine(EngineConfig(model=tiny_models("llama")[0], **ENGINE_ARGS))
    yield engine
    engine.shutdown()


def wait_idle(engine, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.get_stats()
        if stats.num_free_blocks == stats.num_blocks and not engine.engine.has_unfinished_requests():
            return True
        time.sleep(0.02)
    return False


async def collect(engine, prompt, params, request_id=None):
    outputs = []
    async for output in engine.generate({"prompt_token_ids": prompt}, params, request_id=request_id):
        outputs.append(output)
    return outputs


def test_concurrent_streams_match_offline_generation(engine, tiny_models):
    prompts = [[3 + i] * (5 + 7 * i) for i in range(10)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)

    async def main():
        return await asyncio.gather(*(collect(engine, p, params) for p in prompts))

    streams = asyncio.run(main())
    offline = LLM(model=tiny_models("llama")[0], **ENGINE_ARGS).generate(
        [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for stream, reference in zip(streams, offline):
        assert [len(o.outputs[0].token_ids) for o in stream] == list(range(1, 9))  # one token per step, in order
        assert stream[-1].finished and not any(o.finished for o in stream[:-1])
        assert stream[-1].outputs[0].token_ids == reference.outputs[0].token_ids
    assert wait_idle(engine)


def test_leaving_a_stream_early_aborts_and_frees_blocks(engine):
    before = engine.get_stats().num_generation_tokens

    async def main():
        async for output in engine.generate({"prompt_token_ids": [9] * 20},
                                            SamplingParams(max_tokens=100, ignore_eos=True)):
            if len(output.outputs[0].token_ids) >= 3:
                break
        return await collect(engine, [4, 5], SamplingParams(max_tokens=3, ignore_eos=True))

    other = asyncio.run(main())
    assert other[-1].finished and len(other[-1].outputs[0].token_ids) == 3
    assert wait_idle(engine)
    assert engine.get_stats().num_generation_tokens - before < 100 + 3  # the abandoned one stopped early


def test_cancelled_task_aborts(engine):
    before = engine.get_stats().num_generation_tokens

    async def main():
        first_output = asyncio.Event()

        async def consume():
            async for _ in engine.generate({"prompt_token_ids": [7] * 20},
                                           SamplingParams(max_tokens=100, ignore_eos=True)):
                first_output.set()

        task = asyncio.create_task(consume())
        await first_output.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert wait_idle(engine)
    assert engine.get_stats().num_generation_tokens - before < 100


def test_bad_input_raises_to_its_caller_only(engine):
    async def main():
        good = asyncio.create_task(collect(engine, [4, 5, 6], SamplingParams(max_tokens=5, ignore_eos=True)))
        with pytest.raises(ValueError, match="max_model_len"):
            await collect(engine, [1] * 500, SamplingParams())
        with pytest.raises(ValueError, match="empty"):
            await collect(engine, [], SamplingParams())
        return await good

    outputs = asyncio.run(main())
    assert outputs[-1].finished and len(outputs[-1].outputs[0].token_ids) == 5


def test_duplicate_request_id_is_rejected(engine):
    async def main():
        first = asyncio.create_task(collect(engine, [4] * 10, SamplingParams(max_tokens=100, ignore_eos=True), "dup"))
        await asyncio.sleep(0.05)
        with pytest.raises(ValueError, match="already running"):
            await collect(engine, [5], SamplingParams(), "dup")
        return await first

    assert asyncio.run(main())[-1].finished
    assert wait_idle(engine)


@pytest.mark.parametrize("spacing_s, same_step", [(0.005, True), (0.08, False)])
def test_a_burst_of_arrivals_is_prefilled_together(tiny_models, spacing_s, same_step):
    """An idle engine waits for requests arriving close together (gaps within a fraction of a step) and prefills
    them in one step; one that comes later than that is not waited for. Steps are made to look 200 ms long, as
    on CPU with a real model: gaps up to 20 ms are waited for, 50 ms in all."""
    engine = AsyncEngine(EngineConfig(model=tiny_models("llama")[0], **ENGINE_ARGS))
    try:
        async def main():
            engine._arrivals.step_s = 0.2
            first = asyncio.create_task(collect(engine, [3, 4, 5], SamplingParams(max_tokens=2, ignore_eos=True)))
            await asyncio.sleep(spacing_s)
            second = await collect(engine, [6, 7, 8], SamplingParams(max_tokens=2, ignore_eos=True))
            return await first, second

        first, second = asyncio.run(main())
        # Requests prefilled in the same step get their first token at the same instant (one clock read per step).
        scheduled = [outputs[-1].metrics.first_token_time for outputs in (first, second)]
        assert (scheduled[0] == scheduled[1]) == same_step, scheduled
        assert first[-1].outputs[0].token_ids and second[-1].outputs[0].token_ids
    finally:
        engine.shutdown()


def test_add_request_validates_before_returning(engine):
    """add_request is synchronous: bad input raises InvalidArgument with the body field at fault, at the call,
    and a duplicate running id is refused the same way; nothing is queued for either."""
    async def main():
        with pytest.raises(InvalidArgument) as error:
            engine.add_request("too-long", {"prompt_token_ids": [1] * 500}, SamplingParams())
        assert error.value.param == "prompt" and "max_model_len" in str(error.value)
        running = engine.add_request("dup2", {"prompt_token_ids": [4] * 10},
                                     SamplingParams(max_tokens=50, ignore_eos=True))
        with pytest.raises(InvalidArgument, match="already running") as error:
            engine.add_request("dup2", {"prompt_token_ids": [5]}, SamplingParams())
        assert error.value.param is None
        async with aclosing(running):
            outputs = [output async for output in running]
        return outputs

    outputs = asyncio.run(main())
    assert outputs[-1].finished and len(outputs[-1].outputs[0].token_ids) == 50
    assert not engine.is_dead and engine.errored is None
    assert wait_idle(engine)


def test_a_burst_is_counted_waiting_at_once(engine):
    """num_waiting counts requests still in the inbox: right after add_request returns, before the loop thread
    has seen them (the server's queue limit and the waiting gauge read it)."""
    async def main():
        params = SamplingParams(max_tokens=4, ignore_eos=True)
        before = engine.num_waiting + engine.num_running
        streams = [engine.add_request(f"burst-{i}", {"prompt_token_ids": [3 + i] * 4}, params) for i in range(12)]
        counted = engine.num_waiting + engine.num_running - before
        stats_counted = engine.get_stats().num_requests_waiting + engine.get_stats().num_requests_running - before
        finals = []
        for stream in streams:
            async with aclosing(stream):
                finals.append([output async for output in stream][-1])
        return counted, stats_counted, finals

    counted, stats_counted, finals = asyncio.run(main())
    assert counted >= 12 and stats_counted >= 12
    assert all(final.finished and len(final.outputs[0].token_ids) == 4 for final in finals)
    assert wait_idle(engine)
    assert engine.num_waiting == 0 and engine.num_running == 0


def test_closing_or_dropping_an_unread_stream_aborts(engine):
    before = engine.get_stats().num_generation_tokens

    async def main():
        params = SamplingParams(max_tokens=100, ignore_eos=True)
        closed = engine.add_request("closed", {"prompt_token_ids": [6] * 8}, params)
        await closed.aclose()
        engine.add_request("dropped", {"prompt_token_ids": [7] * 8}, params)  # never read: garbage at once
        await asyncio.sleep(0.2)

    asyncio.run(main())
    assert wait_idle(engine)
    assert engine.get_stats().num_generation_tokens - before < 100  # neither ran to its 100 tokens


def test_a_failed_step_errors_its_streams_and_the_engine_serves_on(tiny_models):
    path, hf_model = tiny_models("llama")
    engine = AsyncEngine(EngineConfig(model=path, **ENGINE_ARGS))
    try:
        fail_once(engine.engine.runner)
        params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)

        async def main():
            with pytest.raises(RequestFailedError, match="failed inside the engine"):
                await collect(engine, [3, 4, 5], params)
            return await collect(engine, [6, 7, 8, 9], params)

        outputs = asyncio.run(main())
        assert not engine.is_dead and engine.errored is None
        assert outputs[-1].outputs[0].token_ids == hf_greedy(hf_model, [6, 7, 8, 9], 6)
        assert wait_idle(engine)
    finally:
        engine.shutdown()


def test_an_engine_whose_every_step_fails_is_dead(tiny_models):
    """A run of failed steps is the engine, not a request: the loop stops, is_dead and errored say so, waiting
    streams get EngineDeadError and new requests are refused at once."""
    engine = AsyncEngine(EngineConfig(model=tiny_models("llama")[0], **ENGINE_ARGS))
    try:
        def broken(scheduled):
            raise RuntimeError("device lost")

        engine.engine.runner.execute = broken
        params = SamplingParams(max_tokens=4, ignore_eos=True)

        async def main():
            for attempt in range(10):
                try:
                    await collect(engine, [3, 4, 5], params)
                except EngineDeadError:
                    break
                except RequestFailedError:
                    continue
            with pytest.raises(EngineDeadError) as error:
                engine.add_request("after", {"prompt_token_ids": [3]}, params)
            assert "device lost" not in str(error.value)  # clients see no internal text; the cause is chained
            assert error.value.__cause__ is engine.errored
            return attempt

        attempts = asyncio.run(main())
        assert attempts >= 1  # the first failures were the requests'; the engine died of the run of them
        assert engine.is_dead and isinstance(engine.errored, RuntimeError)
    finally:
        engine.shutdown()
