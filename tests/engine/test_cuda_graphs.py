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


def run(path: str, prompts: list[list[int]], params: SamplingParams, **engine_args) -> list:
    # A tiny model's blocks are ~1 KB: sized from a 141 GB card's free memory that is ~10^8 blocks, whose
    # bookkeeping alone takes minutes. These tests check kernels and graphs, not memory profiling.
    if engine_args.get("device") == "cuda":
        engine_args.setdefault("num_gpu_blocks_override", 2048)
    llm = LLM(model=path, skip_tokenizer_init=True, block_size=4, max_model_len=256, **engine_args)
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def generate(path: str, prompts: list[list[int]], **engine_args) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    return [o.outputs[0].token_ids for o in run(path, prompts, params, **engine_args)]


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
    # Alone, every step is batch 1 (the GEMVs that leave the norms pending, not cuBLAS): against itself, synchronous.
    alone = [generate(path, prompts[:1], device="cuda", dtype="bfloat16", max_num_seqs=8, async_scheduling=overlap)
             for overlap in (False, True)]
    assert alone[1] == alone[0]


@requires_cuda
def test_fp8_kv_cache_with_graphs_stays_close_to_the_bfloat16_cache(tiny_models):
    """kv_cache_dtype="fp8" in bfloat16 with CUDA graphs (the fused rotary kernel writing float8, the split-K
    decode kernel reading it): each greedy token, scored by the engine with a bfloat16 cache (prompt logprobs
    over prompt + completion), is mostly that engine's top token too, with a close logprob. Measured on an H100:
    mean |logprob error| 0.015 and 95% top-1 (the bfloat16 cache against itself: 0.001 and 100%)."""
    path, hf_model = tiny_models("llama")
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, hf_model.config.vocab_size, (n,), generator=generator).tolist()
               for n in (1, 5, 16, 30, 41, 70, 100)]
    # A fixed KV pool: the second engine must not depend on the first one's memory being freed yet.
    engine_args = dict(device="cuda", dtype="bfloat16", max_num_seqs=8, kv_cache_memory_bytes=2**30)
    error, top1 = scored_greedy_tokens(path, prompts, dict(engine_args, kv_cache_dtype="fp8"), engine_args)
    assert error < 0.05 and top1 >= 0.85, (error, top1)


def scored_greedy_tokens(path: str, prompts: list[list[int]], engine_args: dict,
                         scoring_args: dict) -> tuple[float, float]:
    """Greedy completions of an engine, each token scored by another's prefill (prompt logprobs over prompt +
    completion): (mean |logprob difference|, fraction of the tokens that are the scorer's top token too)."""
    greedy = SamplingParams(temperature=0.0, max_tokens=24, logprobs=1, ignore_eos=True)
    completions = [o.outputs[0] for o in run(path, prompts, greedy, **engine_args)]
    full = [prompt + completion.token_ids for prompt, completion in zip(prompts, completions)]
    scored = run(path, full, SamplingParams(max_tokens=1, prompt_logprobs=1), **scoring_args)
    errors, top1 = [], []
    for prompt, completion, output in zip(prompts, completions, scored):
        for step, token in enumerate(completion.token_ids):
            reference = output.prompt_logprobs[len(prompt) + step][token]
            errors.append(abs(completion.logprobs[step][token].logprob - reference.logprob))
            top1.append(reference.rank == 1)
    return sum(errors) / len(errors), sum(top1) / len(top1)


@requires_cuda
@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_batch_one_blocks_reading_the_norms_in_score_as_the_norm_kernels_do(tiny_models, monkeypatch, quantization):
    """One request at a time, every decode step takes the GEMVs that leave each norm to the next GEMV
    (SERVAL_FUSED_NORM=1; the default for float8): its greedy tokens, scored by a prefill (whose norms are kernels
    of their own), are as close as those of the engine whose batch-1 norms are kernels too."""
    path, hf_model = tiny_models("qwen3")
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, hf_model.config.vocab_size, (n,), generator=generator).tolist()
               for n in (1, 5, 16, 30, 41, 70)]
    engine_args = dict(device="cuda", dtype="bfloat16", max_num_seqs=1, kv_cache_memory_bytes=2**30,
                       quantization=quantization)
    monkeypatch.setenv("SERVAL_FUSED_NORM", "1")  # the default takes it for float8 weights only
    fused = scored_greedy_tokens(path, prompts, engine_args, engine_args)
    monkeypatch.setenv("SERVAL_FUSED_NORM", "0")
    unfused = scored_greedy_tokens(path, prompts, engine_args, engine_args)
    assert fused[0] <= 1.5 * unfused[0] + 0.005 and fused[1] >= unfused[1] - 0.05, (fused, unfused)


@requires_cuda
def test_fp8_weights_and_cache_replayed_from_graphs_equal_eager(tiny_models):
    """quantization="fp8" with kv_cache_dtype="fp8": the graphs (batch 1 through the float8 GEMV, larger batches
    through the per-token quantization kernel and torch._scaled_mm, padded to the captured sizes) give the eager
    steps' tokens."""
    path, _ = tiny_models("qwen3")
    prompts = [[5 + i] * (3 + 7 * i) for i in range(9)]
    engine_args = dict(device="cuda", dtype="bfloat16", max_num_seqs=16, kv_cache_memory_bytes=2**30,
                       quantization="fp8", kv_cache_dtype="fp8")
    eager = generate(path, prompts, enforce_eager=True, **engine_args)
    assert generate(path, prompts, **engine_args) == eager
