"""Decode steps replayed from CUDA graphs: the ladder of sizes everywhere; replay against eager on a GPU."""
from __future__ import annotations

import pytest
import torch

from serval import LLM, SamplingParams
from serval.engine.cuda_graphs import capture_sizes

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def test_capture_sizes_cover_every_batch_up_to_the_limit():
    assert capture_sizes(1) == [1]
    assert capture_sizes(8) == [1, 2, 4, 8]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    sizes = capture_sizes(256)
    assert sizes[:4] == [1, 2, 4, 8] and sizes[-1] == 256 and sorted(set(sizes)) == sizes
    for n in range(1, 257):
        assert any(size >= n for size in sizes)


def generate(path: str, prompts: list[list[int]], **engine_args) -> list[list[int]]:
    llm = LLM(model=path, skip_tokenizer_init=True, block_size=4, max_model_len=256, **engine_args)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


@requires_cuda
@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
def test_gpu_graphs_match_cpu_engine(tiny_models, arch):
    """The CPU path (torch reference) and the GPU path (Triton kernels, CUDA graphs) give the same greedy tokens
    in float32, with batches of every size from 1 to 11 passing through the graphs as requests finish."""
    path, hf_model = tiny_models(arch)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, hf_model.config.vocab_size, (n,), generator=generator).tolist()
               for n in (1, 3, 8, 15, 16, 17, 30, 41, 64, 70, 100)]
    cpu = generate(path, prompts, device="cpu")
    gpu = generate(path, prompts, device="cuda", dtype="float32", max_num_seqs=12, num_gpu_blocks_override=400)
    assert gpu == cpu


@requires_cuda
def test_graph_replay_equals_eager_in_bfloat16(tiny_models):
    path, hf_model = tiny_models("llama")
    prompts = [[5 + i] * (3 + 7 * i) for i in range(9)]
    eager = generate(path, prompts, device="cuda", dtype="bfloat16", enforce_eager=True, max_num_seqs=16)
    graphs = generate(path, prompts, device="cuda", dtype="bfloat16", max_num_seqs=16)
    assert graphs == eager


@requires_cuda
def test_async_scheduling_on_the_gpu_changes_no_token(tiny_models):
    """Graph steps queued behind unread ones (device-side input ids, double-buffered staging) against the
    synchronous loop, in bfloat16 where the batch-1 steps also take the Triton GEMV."""
    path, hf_model = tiny_models("qwen3")
    prompts = [[7 + i] * (2 + 5 * i) for i in range(6)]
    synchronous = generate(path, prompts, device="cuda", dtype="bfloat16", max_num_seqs=8, async_scheduling=False)
    overlapped = generate(path, prompts, device="cuda", dtype="bfloat16", max_num_seqs=8, async_scheduling=True)
    assert overlapped == synchronous
    alone = generate(path, prompts[:1], device="cuda", dtype="bfloat16", max_num_seqs=8, async_scheduling=True)
    assert alone == synchronous[:1]
