"""The engine-against-transformers checks every model family's tests run: greedy tokens through an engine forced to
batch, chunk prefills, preempt and hit the prefix cache, and prompt logprobs."""
from __future__ import annotations

import pytest
import torch

from serval import LLM, SamplingParams
from tests.engine.test_engine import NUM_NEW_TOKENS, hf_greedy, make_prompts, pressured_llm


def check_greedy_matches_transformers(path: str, hf_model, prefix_caching: bool) -> None:
    """A dozen prompts through an engine forced to batch, chunk prefills and preempt: transformers' tokens."""
    prompts = make_prompts(hf_model.config.vocab_size)
    llm = pressured_llm(path, prefix_caching)
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf_model, prompt, NUM_NEW_TOKENS), f"prompt of {len(prompt)}"
    stats = llm.engine.get_stats()
    assert stats.num_preemptions > 0, "the block pool was meant to force preemption"
    assert (stats.prefix_cache_hits > 0) == prefix_caching
    assert stats.num_free_blocks == stats.num_blocks
    llm.engine.kv_cache.check_invariants([])


def check_prompt_logprobs_match_transformers(path: str, hf_model) -> None:
    prompts = make_prompts(hf_model.config.vocab_size, count=6, seed=1)
    llm: LLM = pressured_llm(path, prefix_caching=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(max_tokens=1, prompt_logprobs=2, temperature=0.0), use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        with torch.no_grad():
            reference = torch.log_softmax(hf_model(torch.tensor([prompt])).logits[0].float(), dim=-1)
        for position in range(1, len(prompt)):
            token = prompt[position]
            got = output.prompt_logprobs[position][token].logprob
            assert got == pytest.approx(reference[position - 1, token].item(), abs=1e-4), f"position {position}"
