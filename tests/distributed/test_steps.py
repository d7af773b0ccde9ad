"""Decode steps across ranks (serval.distributed.steps): asynchronous scheduling under tensor parallelism (step N+1
planned while step N runs, its input ids sent from the driver's device) gives the synchronous engine's tokens; on
GPUs, every rank replays its captured graphs (the all-reduces inside), decode and, with --cudagraph-mixed, mixed
prefill/decode steps, and the tokens equal the in-process engine's."""
from __future__ import annotations

import pytest
import torch

from serval import LLM, SamplingParams
from tests.conftest import build_tiny_model
from tests.engine.test_engine import NUM_NEW_TOKENS, make_prompts, pressured_llm
from tests.model.tiny_models import build_tiny

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
requires_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")


def greedy_params(count: int) -> list[SamplingParams]:
    """Plain greedy, and greedy with a repetition penalty every other request: the latter's sampling waits for the
    host to process the previous token (the deferred path), the former's is queued with its forward."""
    return [SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True,
                           repetition_penalty=1.0 if i % 2 else 1.3) for i in range(count)]


def token_ids(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [output.outputs[0].token_ids for output in outputs]


def test_async_scheduling_across_ranks_gives_the_synchronous_tokens(tmp_path):
    """CPU, gloo, two ranks: the workers follow the driver's plans in order, including the decode steps queued
    before the previous step's tokens reached the driver's host (their ids go over the device group)."""
    hf_model = build_tiny_model(tmp_path, "llama")
    prompts = make_prompts(hf_model.config.vocab_size)
    params = greedy_params(len(prompts))
    expected = token_ids(pressured_llm(str(tmp_path), prefix_caching=True), prompts, params)
    llm = pressured_llm(str(tmp_path), prefix_caching=True, tensor_parallel_size=2, async_scheduling=True)
    try:
        assert llm.engine.async_scheduling
        assert token_ids(llm, prompts, params) == expected
        stats = llm.engine.get_stats()
        assert stats.num_free_blocks == stats.num_blocks
    finally:
        llm.shutdown()
    assert not [p for p in llm.engine.executor.processes if p.is_alive()]


def gpu_llm(path: str, **engine_args) -> LLM:
    return LLM(model=path, skip_tokenizer_init=True, device="cuda", dtype="float32", block_size=4, max_model_len=256,
               max_num_seqs=12, num_gpu_blocks_override=400, **engine_args)


def gpu_prompts(vocab_size: int) -> list[list[int]]:
    """Batches of every size from 1 to 11 pass through the graphs as the requests finish."""
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab_size, (n,), generator=generator).tolist()
            for n in (1, 3, 8, 15, 16, 17, 30, 41, 64, 70, 100)]


def check_graphs_match_in_process(path: str, vocab_size: int, cudagraph_mixed: bool = False,
                                  **executor_args) -> None:
    """cudagraph_mixed: both engines replay mixed prefill/decode steps from graphs too (the executor's from every
    rank's, the plan naming the bucket)."""
    prompts = gpu_prompts(vocab_size)
    params = greedy_params(len(prompts))
    single = gpu_llm(path, cudagraph_mixed=cudagraph_mixed)
    assert single.engine.runner.graphs is not None and single.engine.async_scheduling
    expected = token_ids(single, prompts, params)
    single.shutdown()
    del single
    torch.cuda.empty_cache()
    llm = gpu_llm(path, cudagraph_mixed=cudagraph_mixed, **executor_args)
    try:
        assert llm.engine.executor is not None
        assert llm.engine.runner.graphs is not None and llm.engine.runner.graphs.graphs
        if cudagraph_mixed:
            assert type(llm.engine.runner.mixed_graphs).__name__ == "DriverMixedGraphs"
            assert llm.engine.runner.mixed_graphs.graphs
        assert llm.engine.async_scheduling
        assert token_ids(llm, prompts, params) == expected
    finally:
        llm.shutdown()
    assert not [p for p in llm.engine.executor.processes if p.is_alive()]


@requires_cuda
def test_graphs_through_the_executor_on_one_gpu(tmp_path):
    """tensor_parallel_size=1 through the multi-process executor (what benchmarks/tp_bench.py times): its graphs
    and asynchronous steps give the in-process engine's tokens."""
    hf_model = build_tiny_model(tmp_path, "llama")
    check_graphs_match_in_process(str(tmp_path), hf_model.config.vocab_size, distributed_executor_backend="mp")


@requires_cuda
def test_mixed_step_graphs_through_the_executor_on_one_gpu(tmp_path):
    """--cudagraph-mixed through the executor at size 1 (tp_bench's like-for-like comparison with mixed graphs on):
    the in-process engine's tokens."""
    hf_model = build_tiny_model(tmp_path, "llama")
    check_graphs_match_in_process(str(tmp_path), hf_model.config.vocab_size, cudagraph_mixed=True,
                                  distributed_executor_backend="mp")


@requires_two_gpus
def test_mixed_step_graphs_on_two_gpus(tmp_path):
    """Every rank captures the same token buckets (all-reduces and the logits' gather inside) and replays the
    driver's."""
    hf_model = build_tiny_model(tmp_path, "llama")
    check_graphs_match_in_process(str(tmp_path), hf_model.config.vocab_size, cudagraph_mixed=True,
                                  tensor_parallel_size=2)


@requires_two_gpus
def test_graphs_with_all_reduces_inside_on_two_gpus(tmp_path):
    """Two ranks on two GPUs: NCCL all-reduces captured in each rank's graphs, replayed in step."""
    hf_model = build_tiny_model(tmp_path, "llama")
    check_graphs_match_in_process(str(tmp_path), hf_model.config.vocab_size, tensor_parallel_size=2)


@requires_two_gpus
@pytest.mark.parametrize("family, engine_args", [
    ("qwen3_moe", dict(enable_expert_parallel=True)),  # whole experts a rank, unowned slots weighted 0 in graphs
    ("gpt_oss", {}),  # experts split by rows, sinks with the heads
], ids=["qwen3_moe-expert-parallel", "gpt_oss-sliced"])
def test_moe_graphs_on_two_gpus(tmp_path, family, engine_args):
    hf_model = build_tiny(tmp_path, family)
    check_graphs_match_in_process(str(tmp_path), hf_model.config.vocab_size, tensor_parallel_size=2, **engine_args)
