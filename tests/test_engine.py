"""The engine against Hugging Face transformers on the same weights, under batching pressure:
fewer sequence slots than prompts, a token budget that chunks prefills, a block pool that preempts."""
import random

import pytest
import torch

from serval import LLM, SamplingParams
from tests.conftest import ARCHITECTURES

NUM_NEW_TOKENS = 12


def make_prompts(vocab_size: int, count: int = 12, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, 2, 5, 9, 16, 17, 23, 31, 40, 47, 55, 70][:count]
    shared = [rng.randrange(3, vocab_size) for _ in range(20)]
    prompts = []
    for i, length in enumerate(lengths):
        # Every third prompt shares a 20-token prefix, so the prefix cache has something to hit.
        head = shared[:min(length, 20)] if i % 3 == 0 else []
        prompts.append(head + [rng.randrange(3, vocab_size) for _ in range(length - len(head))])
    return prompts


def hf_greedy(model, prompt: list[int], num_new: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=num_new, min_new_tokens=num_new,
                             do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def pressured_llm(path: str, prefix_caching: bool) -> LLM:
    return LLM(model=path, skip_tokenizer_init=True, max_num_seqs=4, max_num_batched_tokens=32, block_size=4,
               num_gpu_blocks_override=40, max_model_len=128, enable_prefix_caching=prefix_caching)


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix-cache", "no-prefix-cache"])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_greedy_matches_transformers(tiny_models, arch, prefix_caching):
    path, hf_model = tiny_models(arch)
    prompts = make_prompts(hf_model.config.vocab_size)
    llm = pressured_llm(path, prefix_caching)
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        assert output.prompt_token_ids == prompt
        assert output.outputs[0].token_ids == hf_greedy(hf_model, prompt, NUM_NEW_TOKENS), f"prompt of {len(prompt)}"
        assert output.outputs[0].finish_reason == "length"
    stats = llm.engine.get_stats()
    assert stats.num_preemptions > 0, "the block pool was meant to force preemption"
    assert stats.num_free_blocks == stats.num_blocks
    assert (stats.prefix_cache_hits > 0) == prefix_caching
    llm.engine.kv_cache.check_invariants([])


def test_prompt_logprobs_match_transformers(tiny_models):
    path, hf_model = tiny_models("qwen3")
    prompts = make_prompts(hf_model.config.vocab_size, count=6, seed=1)
    llm = pressured_llm(path, prefix_caching=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(max_tokens=1, prompt_logprobs=3, temperature=0.0), use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        with torch.no_grad():
            reference = torch.log_softmax(hf_model(torch.tensor([prompt])).logits[0].float(), dim=-1)
        assert output.prompt_logprobs[0] is None
        assert len(output.prompt_logprobs) == len(prompt)
        for position in range(1, len(prompt)):
            entry = output.prompt_logprobs[position]
            token = prompt[position]
            assert entry[token].logprob == pytest.approx(reference[position - 1, token].item(), abs=1e-4)
            top3 = torch.topk(reference[position - 1], 3).indices.tolist()
            assert set(top3) <= set(entry)


def test_sample_logprobs_match_transformers(tiny_models):
    path, hf_model = tiny_models("llama")
    prompt = make_prompts(hf_model.config.vocab_size, seed=2)[6]
    llm = pressured_llm(path, prefix_caching=True)
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(max_tokens=4, logprobs=2, temperature=0.0, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    tokens = prompt + out.token_ids
    with torch.no_grad():
        reference = torch.log_softmax(hf_model(torch.tensor([tokens])).logits[0].float(), dim=-1)
    for step, token in enumerate(out.token_ids):
        row = reference[len(prompt) - 1 + step]
        assert out.logprobs[step][token].logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert out.logprobs[step][token].rank == 1  # greedy picks the top token
    assert out.cumulative_logprob == pytest.approx(sum(out.logprobs[i][t].logprob for i, t in enumerate(out.token_ids)))


def test_triton_kernels_in_the_engine_match_transformers(tiny_models, monkeypatch):
    """The whole engine on the Triton attention kernels (the interpreter here, compiled on a GPU): chunked prefill,
    prefix hits and split-K decode give transformers' greedy tokens."""
    pytest.importorskip("triton")
    monkeypatch.setenv("SERVAL_ATTENTION_BACKEND", "triton")
    path, hf_model = tiny_models("qwen2")
    prompts = [make_prompts(hf_model.config.vocab_size)[i] for i in (6, 9)]  # 23 and 47 tokens, a shared prefix
    llm = LLM(model=path, skip_tokenizer_init=True, max_num_seqs=4, max_num_batched_tokens=16, block_size=4,
              max_model_len=128)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf_model, prompt, 4), f"prompt of {len(prompt)}"
    assert llm.engine.get_stats().prefix_cache_hits > 0
